"""`stage: distill` on `task: causal-lm`: tiny random Llamas (conftest's `tiny_llama_dir` recipe, 4 layers for
the teacher) with MiniLM's real tokenizer; per-token KL with the teacher run online, layer-dropped students."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import save_tiny_llama

import slimtune
from slimtune.config import CausalLMData
from slimtune.distill.online import row_distill_loss
from slimtune.distill.students import layer_indices, select_layers
from slimtune.distill.teachers import Teacher
from slimtune.errors import SlimtuneError
from slimtune.lmdata import IGNORE_INDEX, collate_lm, prepare_lm_data
from slimtune.recipe import parse_recipe
from slimtune.tasks.causal_lm import CausalLM

T, ALPHA = 2.0, 0.7


def lm_recipe(model, text_files, *stages):
    return {"task": "causal-lm", "model": str(model),
            "data": {"train": str(text_files / "train.txt"), "eval": str(text_files / "eval.txt"), "block_size": 32},
            "stages": list(stages)}


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, minilm_path, text_files):
    """A 4-layer tiny Llama fine-tuned on the text: a teacher with something to teach."""
    base = save_tiny_llama(tmp_path_factory.mktemp("llama4"), minilm_path, num_layers=4, seed=1)
    out = tmp_path_factory.mktemp("teacher") / "run"
    slimtune.run(lm_recipe(base, text_files, {"stage": "finetune", "epochs": 8, "lr": 1e-2, "batch_size": 8}),
                 out, progress=False)
    return out / "model"


@pytest.fixture(scope="module")
def eval_blocks(teacher_dir, text_files):
    from transformers import AutoTokenizer

    data = prepare_lm_data(CausalLMData(train=text_files / "train.txt", eval=text_files / "eval.txt", block_size=32),
                           AutoTokenizer.from_pretrained(teacher_dir))
    return collate_lm(data.eval, list(range(len(data.eval))), pad_id=0)


class Fixed(torch.nn.Module):
    """A 'model' whose logits are given (a teacher for the hand computation)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, input_ids, attention_mask=None):
        return self.logits


# ----------------------------------------------------------------------------------------- the loss
def test_loss_is_the_hand_computed_kl_and_cross_entropy_on_scored_next_tokens():
    torch.manual_seed(0)
    B, L, V = 2, 5, 7
    student = torch.randn(B, L, V, requires_grad=True)
    t1, t2 = torch.randn(B, L, V) * 2, torch.randn(B, L, V)
    labels = torch.randint(0, V, (B, L))
    labels[0, 1] = labels[1, 3:] = IGNORE_INDEX  # a masked prompt token, right padding
    batch = {"input_ids": torch.zeros(B, L, dtype=torch.long), "attention_mask": torch.ones(B, L), "labels": labels}
    teachers = [Teacher("a", None, Fixed(t1), None, 3.0), Teacher("b", None, Fixed(t2), None, 1.0)]

    kl_sum = ce_sum = 0.0
    n, s = 0, student.detach()
    for b in range(B):
        for t in range(L - 1):  # position t predicts token t + 1
            if labels[b, t + 1] == IGNORE_INDEX:
                continue
            p = 0.75 * torch.softmax(t1[b, t] / T, -1) + 0.25 * torch.softmax(t2[b, t] / T, -1)
            log_q = torch.log_softmax(s[b, t] / T, -1)
            kl_sum += float((p * (p.log() - log_q)).sum())
            ce_sum += float(-torch.log_softmax(s[b, t], -1)[labels[b, t + 1]])
            n += 1
    assert n == 5  # 4 + 4 positions, minus the masked target and the two padded ones
    want = ALPHA * kl_sum / n * T**2 + (1 - ALPHA) * ce_sum / n

    loss = row_distill_loss(teachers, CausalLM().distill_rows, T, ALPHA)(Fixed(student), batch)
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    # a masked target, padding and the last position (nothing follows) learn nothing; scored ones do
    grad = student.grad.abs().sum(-1)
    assert grad[0, 0] == grad[1, 2:].sum() == grad[:, -1].sum() == 0 and bool((grad[0, 1:4] > 0).all())
    # the teacher's own distribution: no soft loss left, only the hard part
    same = row_distill_loss([Teacher("s", None, Fixed(student.detach()), None, 1.0)], CausalLM().distill_rows, T, 1.0)
    assert float(same(Fixed(student.detach()), batch)) == pytest.approx(0.0, abs=1e-6)


def test_alpha_zero_is_the_tasks_own_loss_and_never_runs_the_teacher(tiny_llama_dir, text_files):
    from transformers import AutoTokenizer

    model = slimtune.load_model(tiny_llama_dir)
    data = prepare_lm_data(CausalLMData(train=text_files / "train.txt", block_size=32),
                           AutoTokenizer.from_pretrained(tiny_llama_dir))
    batch = collate_lm(data.train, [0, 1, 2], pad_id=0)

    class Broken(torch.nn.Module):
        def forward(self, **_):
            raise AssertionError("the teacher ran with alpha 0")

    loss = row_distill_loss([Teacher("x", None, Broken(), None, 1.0)], CausalLM().distill_rows, T, 0.0)(model, batch)
    assert float(loss.detach()) == pytest.approx(float(CausalLM().loss(model, batch).detach()), rel=1e-5)


# ------------------------------------------------------------------------------------ layer selection
def test_a_layer_count_keeps_evenly_spaced_layers_with_the_first_and_the_last():
    assert layer_indices(2, 4) == [0, 3]
    kept = layer_indices(20, 30)
    assert len(set(kept)) == 20 and kept[0] == 0 and kept[-1] == 29 and kept == sorted(kept)
    assert max(b - a for a, b in zip(kept, kept[1:], strict=False)) == 2  # about every third layer dropped
    assert layer_indices([3, 1], 4) == [3, 1]
    with pytest.raises(SlimtuneError, match=r"student.layers: 5 layers asked, the model has 4"):
        layer_indices(5, 4)


def test_dropped_decoder_layers_renumber_the_kv_cache_and_per_layer_config(teacher_dir):
    teacher = slimtune.load_model(teacher_dir)
    teacher.config.layer_types = ["full_attention"] * 4  # a per-layer config list the KV cache is built from
    student = select_layers(teacher, [0, 2, 3])
    assert student.config.num_hidden_layers == 3 and student.config.layer_types == ["full_attention"] * 3
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    assert teacher.config.num_hidden_layers == 4 and len(teacher.model.layers) == 4  # a copy: the teacher stays
    ids = torch.tensor([[101, 1996, 2314, 3216]])
    with torch.no_grad():  # cached decoding gives what recomputing every step gives
        cached = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        plain = student.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, use_cache=False)
    assert torch.equal(cached, plain)


# ----------------------------------------------------------------------------- a distillation run
def kl_to_teacher(teacher, student, batch) -> float:
    """Mean per-token KL(teacher || student) at T = 1 on the scored positions of `batch`."""
    rows = CausalLM().distill_rows
    with torch.no_grad():
        t, _ = rows(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
        s, _ = rows(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch)
    return float(F.kl_div(F.log_softmax(s, -1), F.softmax(t, -1), reduction="batchmean"))


def test_four_layer_teacher_to_two_layer_student_learns_saves_reloads_and_generates(tmp_path, teacher_dir, text_files,
                                                                                     eval_blocks):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher = slimtune.load_model(teacher_dir)
    start_kl = kl_to_teacher(teacher, select_layers(teacher, [0, 3]), eval_blocks)
    distill = {"stage": "distill", "teacher": str(teacher_dir), "student": {"layers": 2}, "temperature": 1.0,
               "alpha": ALPHA, "epochs": 4, "lr": 3e-3, "batch_size": 8}
    metrics = slimtune.run(lm_recipe(teacher_dir, text_files, distill, {"stage": "evaluate", "speed": False}),
                           tmp_path / "out", progress=False)
    stage, final = metrics["stages"][0], metrics["final"]
    assert stage["student"] == "layers" and stage["student_source"] == "teacher layers [0, 3]"
    assert stage["soft_targets"] == "token" and stage["transfer_rows"] > 0
    teacher_ppl = stage["teachers"][0]["dev_perplexity"]
    # dropping half the layers hurts (measured 50 -> 69); distillation wins it back (40)
    assert stage["start_perplexity"] > teacher_ppl
    assert final["perplexity"] < 0.8 * stage["start_perplexity"]
    assert "distilled from" in (tmp_path / "out" / "report.md").read_text().lower()

    saved = tmp_path / "out" / "model"
    model = AutoModelForCausalLM.from_pretrained(saved).eval()  # transformers alone
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    # measured: 0.20 -> 0.03 (plain fine-tuning on the text alone, alpha 0, moves away from the teacher: 0.37)
    assert kl_to_teacher(teacher, model, eval_blocks) < 0.5 * start_kl
    tok = AutoTokenizer.from_pretrained(saved)
    ids = tok("the quiet river runs past", return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
        plain = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=False)
    assert out.shape[1] == ids.shape[1] + 8 and torch.equal(out, plain)
    assert tok.decode(out[0, ids.shape[1]:]).strip()
    reloaded = slimtune.load_model(saved)
    assert math.isclose(kl_to_teacher(model, reloaded, eval_blocks), 0.0, abs_tol=1e-6)


# ----------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("options, message", [
    ({"student": {"arch": "bilstm"}}, r"stages.0.student.arch: a word-level bilstm student classifies whole texts"),
    ({"student": {"layers": 2, "hidden": 64}}, r"stages.0.student.hidden: a key of word-level students only"),
    ({"transfer_augment": {"copies": 2}}, r"stages.0.transfer_augment: EDA copies"),
    ({"teacher": ["a", "b"], "combine": "best"}, r"stages.0.combine: 'best' picks, per example, the teacher"),
    ({"soft_loss": "mse"}, r"stages.0.soft_loss: 'mse' matches the logits"),
    ({"intermediate": {"loss": "mse"}}, r"stages.0.intermediate: hidden-state and attention matching"),
    ({"cache": "t.safetensors"}, r"stages.0.cache: per-token teacher outputs are never cached"),
])
def test_options_a_causal_lm_cannot_use_are_refused_when_the_recipe_is_read(options, message):
    raw = {"task": "causal-lm", "model": "smollm2", "data": {"train": "a.txt"},
           "stages": [{"stage": "distill", "teacher": "smollm2", **options}]}
    with pytest.raises(SlimtuneError, match=message) as err:
        parse_recipe(raw)
    assert "\n" not in str(err.value)
    parse_recipe({**raw, "task": "text-classification", "data": {"train": "a.csv"}})  # a classifier may


def test_a_teacher_of_another_vocabulary_or_task_is_one_line_before_out_exists(tmp_path, tiny_llama_dir, text_files,
                                                                               tiny_model_dir, minilm_path):
    from transformers import BertTokenizerFast

    other = save_tiny_llama(tmp_path / "other", minilm_path)
    vocab = sorted(BertTokenizerFast.from_pretrained(minilm_path).get_vocab().items(), key=lambda kv: kv[1])
    words = [w for w, _ in vocab]
    words = words[:999] + words[999:][::-1]  # same tokens and specials, other ids for every word piece
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True).save_pretrained(other)
    cases = [(other, r"teacher '.*other': the vocabularies differ \(token '.*' has id \d+ vs \d+\) between it and "
                     r"the student"),
             (tiny_model_dir, r"teacher '.*': a text-classification model; this run distils a causal-lm model")]
    for teacher, message in cases:
        distill = {"stage": "distill", "teacher": str(teacher), "epochs": 1}
        with pytest.raises(SlimtuneError, match=message) as err:
            slimtune.run(lm_recipe(tiny_llama_dir, text_files, distill), tmp_path / "out", progress=False)
        assert "\n" not in str(err.value) and not (tmp_path / "out").exists()
