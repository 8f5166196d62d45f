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
