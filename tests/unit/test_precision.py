"""bf16 autocast in the one loop: detected from the CPU's flags, switched off by `precision: fp32`, close to
fp32 on a tiny model (a BERT, a BiLSTM word student, a fake-quantized BERT, a distillation loss), and named
in the loop's record and progress line. The weights, gradients and optimizer stay fp32."""

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import BertConfig, BertForSequenceClassification

from slimtune import distributed
from slimtune.batching import EncodedDataset, logits_of, model_inputs
from slimtune.config import LoopConfig
from slimtune.distill.losses import soft_target_loss
from slimtune.quantize.qat import prepare_qat_, weight_spec
from slimtune.train import LoopSettings, TrainContext, cross_entropy_loss, train
from slimtune.wordmodels import WordBiLSTMClassifier, word_config

CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8481C\n"
           "flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8\n"
           "processor\t: 1\nflags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512_vnni avx512_bf16 amx_bf16 amx_tile\n")
CPU = torch.device("cpu")


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0))


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(1)
    ids = [torch.randint(1, 100, (int(torch.randint(3, 20, (1,), generator=g)),), generator=g).tolist()
           for _ in range(64)]
    return EncodedDataset(ids, [int(x[0] > 50) for x in ids])


class Scalars:
    """Stands in for TensorBoard's SummaryWriter: keeps what the loop logs."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.values.setdefault(tag, []).append(float(value))


def settings(precision: str, **kw) -> LoopSettings:
    cfg = LoopConfig(epochs=1, lr=1e-3, batch_size=16, metric="loss", keep_best=False, seed=3, precision=precision)
    return LoopSettings.from_config(cfg, lr=cfg.lr, batch_size=cfg.batch_size, **kw)


def losses_by_precision(model_fn, ds, loss_fn=cross_entropy_loss, **kw) -> dict[str, list[float]]:
    out = {}
    for precision in ("fp32", "bf16"):
        model, scalars = model_fn(), Scalars()
        res = train(model, ds, settings(precision, **kw), TrainContext(progress=False, tb=scalars), loss_fn=loss_fn)
        assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never touches the weights
        assert res.steps == 4
        out[precision] = scalars.values["train/loss"]
    return out


# ------------------------------------------------------------------ detection and the recipe key
def test_bf16_is_detected_from_the_cpu_flags():
    assert distributed.cpu_bf16_flags(CPUINFO) == ["avx512_bf16", "amx_bf16"]
    assert distributed.cpu_bf16_flags("flags\t\t: fpu avx2 avx512f avx512_vnni amx_tile\n") == []  # no bf16 math
    assert distributed.cpu_bf16_flags("flags\t\t: fpu avx2 avx512_bf16\n") == ["avx512_bf16"]  # e.g. Zen 4
    assert distributed.cpu_bf16_flags("") == []  # no flags line: fp32
    assert distributed.describe_precision(CPU, "bf16", bf16_flags=["avx512_bf16"]) == "bf16 autocast (avx512_bf16)"
    assert distributed.describe_precision(CPU, None, bf16_flags=[]) == "fp32 (no bf16 in this CPU)"


def test_auto_takes_bf16_on_a_cpu_with_it_for_a_wide_model_only(monkeypatch):
    """MiniLM (hidden 384) trained 1.57x faster under bf16 at equal accuracy; a hidden-32 model is slower."""
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda cpuinfo=None: ["amx_bf16"])
    assert distributed.precision_for(CPU, "auto", 384) == "bf16"
    assert distributed.precision_for(CPU, "auto", 32) is None
    assert distributed.precision_for(CPU, "auto") is None  # a model without a hidden size: fp32
    assert distributed.describe_precision(CPU, None, "auto", bf16_flags=["amx_bf16"], width=32) == (
        "fp32 (precision: auto; hidden size 32 < 256: bf16 casts would cost more than they save; `precision: bf16` "
        "forces it)")
    assert distributed.describe_precision(CPU, None, "auto", bf16_flags=["amx_bf16"]) == (
        "fp32 (precision: auto; the model declares no hidden size, and auto takes bf16 only from 256; "
        "`precision: bf16` forces it)")
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda cpuinfo=None: [])
    assert distributed.precision_for(CPU, "auto", 384) is None


def test_precision_fp32_turns_bf16_off():
    assert LoopConfig().precision == "auto"
    assert distributed.precision_for(CPU, "fp32") is None
    assert distributed.describe_precision(CPU, None, "fp32", bf16_flags=["amx_bf16"]) == "fp32 (precision: fp32)"
    assert distributed.precision_for(CPU, "bf16") == "bf16"  # forced: emulated where not native
    assert "emulated" in distributed.describe_precision(CPU, "bf16", "bf16", bf16_flags=[])
    with pytest.raises(ValidationError, match="precision"):
        LoopConfig(precision="fp16")
    assert settings("fp32").precision == "fp32"


@pytest.mark.parametrize("flags", [["avx512_bf16"], []])
def test_the_loop_autocasts_forward_and_loss_only_where_bf16_is_on(ds, monkeypatch, flags):
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda cpuinfo=None: list(flags))  # any machine
    for precision, expected in (("bf16", torch.bfloat16), ("auto", None), ("fp32", None)):
        seen = []
        train(tiny_bert(), ds, settings(precision, max_steps=2), TrainContext(progress=False),
              loss_fn=_watching_loss(seen), eval_fn=_watching_eval(seen))
        assert seen == [expected, expected, "eval fp32"], (precision, flags)


def _watching_loss(seen: list):
    def loss_fn(model, batch):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return cross_entropy_loss(model, batch)

    return loss_fn


def _watching_eval(seen: list):
    def eval_fn(model):
        seen.append("eval autocast" if torch.is_autocast_enabled("cpu") else "eval fp32")
        return {"loss": 1.0}

    return eval_fn


# ------------------------------------------------------------------ bf16 trains like fp32
def test_a_bf16_step_gives_a_finite_loss_close_to_fp32(ds):
    losses = losses_by_precision(tiny_bert, ds)
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)
    assert losses["bf16"] != losses["fp32"]  # it did run in bf16


def test_a_bilstm_word_student_trains_under_bf16(ds):
    def student():
        torch.manual_seed(0)
        return WordBiLSTMClassifier(word_config("bilstm", 100, {0: "a", 1: "b"}, embed_dim=16, hidden=8,
                                                dropout=0.0))

    losses = losses_by_precision(student, ds)
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=1e-2)


@pytest.mark.parametrize("method", ["qat", "binary"])
def test_fake_quantized_training_under_bf16_stays_close_to_fp32(ds, method):
    """bf16 rounds an int8 grid value k*s by at most |k|*s/512 <= s/4: a quarter step, the size of the
    rounding it also applies to the activations; the codes the model is saved with come from the fp32
    latent weights, so the converted model is unchanged in kind."""
    def model():
        m = tiny_bert()
        targets = [n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear) and "classifier" not in n]
        prepare_qat_(m, targets, weight_spec(method))
        return m

    losses = losses_by_precision(model, ds)
    assert all(math.isfinite(v) for v in losses["bf16"])
    assert losses["bf16"] == pytest.approx(losses["fp32"], rel=2e-2)


def test_the_distillation_loss_is_computed_in_fp32_under_bf16_autocast(ds):
    model = tiny_bert()
    batch = {"input_ids": torch.randint(1, 100, (4, 7)), "attention_mask": torch.ones(4, 7, dtype=torch.long)}
    targets = torch.softmax(torch.randn(4, 2), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = logits_of(model(**model_inputs(batch)))
        loss = soft_target_loss(logits, targets, temperature=2.0)
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32
    reference = soft_target_loss(logits.detach().float(), targets, temperature=2.0)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-6)  # the loss itself adds no bf16 rounding


# ------------------------------------------------------------------ the record
def test_the_record_and_the_progress_line_name_the_precision(ds, monkeypatch, capsys):
    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda cpuinfo=None: ["avx512_bf16"])
    res = train(tiny_bert(), ds, settings("bf16", max_steps=2), TrainContext(progress=True, tag="s0-finetune"))
    summary = res.summary()
    assert summary["train_precision"] == "bf16 autocast (avx512_bf16)"
    assert set(summary["seconds_by_phase"]) == {"data", "forward", "backward", "all_reduce", "optimizer", "other"}
    assert summary["seconds_by_phase"]["forward"] > 0
    assert sum(res.phase_seconds.values()) == pytest.approx(res.train_seconds, rel=1e-6)
    assert "s0-finetune: 2 steps, precision: bf16 autocast (avx512_bf16)" in capsys.readouterr().err

    monkeypatch.setattr(distributed, "cpu_bf16_flags", lambda cpuinfo=None: [])
    res = train(tiny_bert(), ds, settings("auto", max_steps=1), TrainContext(progress=False))
    assert res.summary()["train_precision"] == "fp32 (no bf16 in this CPU)"
