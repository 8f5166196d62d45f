"""Helpers shared by the integration tests: run the real CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

# The recipe of issue 3, which must work as written.
ISSUE_RECIPE = """\
task: text-classification
model: minilm
data:
  train: data/train.jsonl
  eval: data/dev.jsonl
  text_field: text
  label_field: label
  max_length: 128
stages:
  - stage: finetune
    method: lora
    epochs: 1
    lr: 5.0e-4
    batch_size: 32
    lora: {r: 8, alpha: 16}
  - stage: evaluate
"""


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEMO = Path(__file__).resolve().parents[1] / "src" / "slimtune" / "demo_data"


def sst2_file(split: str) -> Path:
    """SST-2 from ../shared when present, else the copy bundled for the demo (same rows): never a skip."""
    shared = SHARED / "sst2" / f"{split}.jsonl"
    return shared if shared.is_file() else DEMO / f"{split}.jsonl"


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def slimtune(*args, cwd: Path | None = None, input: str | None = None, timeout: int = 900):
    """`slimtune ARGS...` as a user types it; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, "-m", "slimtune", *map(str, args)], cwd=cwd, env={**os.environ, **OFFLINE}, input=input,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, model, train, eval_=None, stages=None, **data) -> Path:
    import yaml

    recipe = {"task": "text-classification", "model": str(model),
              "data": {"train": str(train), **({"eval": str(eval_)} if eval_ else {}), "max_length": 64, **data},
              "stages": stages or [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 1e-3, "batch_size": 16},
                                   {"stage": "evaluate", "latency_runs": 3, "throughput_batches": 1}]}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# No Chinese set ships with the project: sentences written for the tests (好评 = positive, 差评 = negative).
CHINESE_REVIEWS = [("这部电影非常好看，演员的表演很精彩", "好评"), ("剧情太无聊了，浪费时间", "差评"),
                   ("我很喜欢这个故事", "好评"), ("画面粗糙，对白生硬", "差评"),
                   ("音乐动人，值得推荐", "好评"), ("看完很失望，不推荐", "差评")]


def write_chinese_csv(path: Path, copies: int = 5) -> Path:
    """A CSV with Chinese column names (句子 = sentence, 标签 = label)."""
    rows = CHINESE_REVIEWS * copies
    path.write_text("句子,标签\n" + "\n".join(f"{t},{label}" for t, label in rows) + "\n", encoding="utf-8")
    return path


# causal-LM tests: a small repetitive text a tiny decoder learns in a few epochs, and a chat template in the
# usual shape (user turn, then the assistant header the model answers after)
LM_TEXT = "\n".join(
    f"= section {i} =\nthe {w} river runs past the old mill , and the miller counts {i} sacks of grain before dawn ."
    for i, w in enumerate(["quiet", "long", "cold", "wide", "slow", "dark", "bright", "deep"] * 6))
LM_CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|> {{ m.content }} [SEP] {% endfor %}"
                    "{% if add_generation_prompt %}<|assistant|> {% endif %}")


def save_tiny_llama(path: Path, tokenizer_dir, num_layers: int = 2, seed: int = 0, hidden: int = 32) -> Path:
    """A random Llama (hidden 32, 4 heads, 2 KV heads, context 256) with MiniLM's real tokenizer (from
    `tokenizer_dir`) and the chat template above, saved as a plain HF directory at `path`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = LM_CHAT_TEMPLATE
    tok.eos_token = "[SEP]"
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id,
                      tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def make_run(model, data, tokenizer=None, **kw):
    """A `slimtune.stages.Run` for stage tests on an inline model (text classification, default preprocessing)."""
    from slimtune.config import Preprocessing
    from slimtune.data import TaskData
    from slimtune.stages.base import Progress, Run
    from slimtune.tasks import get_task

    if not isinstance(data, TaskData):
        labels = sorted(set(data.train.labels) | set(data.eval.labels))
        data = TaskData(train=data.train, eval=data.eval, labels={i: str(i) for i in labels})
    if isinstance(kw.get("progress"), dict):
        kw["progress"] = Progress.from_dict(kw["progress"])
    return Run(task=get_task("text-classification"), model=model, tokenizer=tokenizer, data=data,
               preprocessing=Preprocessing(), base_model="tiny", show_progress=False, **kw)


def stage_config(**raw):
    """One validated stage config, as the recipe parser builds it (`stage_config(stage="prune", ...)`)."""
    from pydantic import TypeAdapter

    from slimtune.recipe import StageConfig

    return TypeAdapter(StageConfig).validate_python(raw)


def eval_split(model_dir, data_file):
    """(model, dataset, eval_fn): `data_file` encoded as `slimtune eval` does, and the task's metrics of a model."""
    from slimtune.batching import pad_id_of
    from slimtune.models import load_model, load_tokenizer, preprocessing_of
    from slimtune.tasks import task_of_model

    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    task = task_of_model(model.config)
    ds = task.eval_dataset(data_file, tokenizer, model.config, preprocessing_of(model_dir))
    return model, ds, task.eval_fn(ds, pad_id_of(tokenizer))


def spy_intermediate_loss(monkeypatch) -> list[float]:
    """Make the distill stage's loss also record, at every training step, how much its intermediate terms
    (hidden-state MSE, attention KL) added: the same loss without them, on the same dropout masks, is
    subtracted. The returned list fills as the stage trains (one value per loss call)."""
    import torch

    import slimtune.stages.distill as distill_stage

    real = distill_stage.make_distill_loss
    added: list[float] = []

    def make(**kw):
        full = real(**kw)
        plain = real(**(kw | {"mapping": [], "use_mse": False, "use_attention": False, "weight": 0.0}))

        def loss_fn(model, batch):
            rng = torch.get_rng_state()
            loss = full(model, batch)
            with torch.random.fork_rng(devices=[]), torch.no_grad():  # the RNG continues as without the spy
                torch.set_rng_state(rng)
                added.append(float(loss.detach() - plain(model, batch)))
            return loss

        return loss_fn

    monkeypatch.setattr(distill_stage, "make_distill_loss", make)
    return added
