"""Quantization-aware training (binary, ternary, int8/int4 QAT) on tiny random BERTs: the straight-through
estimator, the codes, exact conversion, learning a word task, save/load, distillation and resume."""

import copy
from types import SimpleNamespace

import pytest
import torch
from helpers import eval_split, make_run, stage_config
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from slimtune.batching import EncodedDataset
from slimtune.checkpoint import CheckpointStore, read_checkpoint
from slimtune.errors import SlimtuneError
from slimtune.models import load_model, save_hf_model
from slimtune.prune.unstructured import select_linears
from slimtune.quantize.core import fake_quantize
from slimtune.quantize.qat import (
    FakeQuantEmbedding,
    FakeQuantLinear,
    convert_qat_,
    prepare_qat_,
    weight_spec,
)
from slimtune.quantize.targets import word_embedding_name
from slimtune.stages.quantize import Quantize

CFG = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=64, num_labels=2, max_position_embeddings=64)
SPECS = {"binary": weight_spec("binary"), "ternary": weight_spec("ternary"), "int8": weight_spec("qat", 8),
         "int4-asym-g8": weight_spec("qat", 4, group_size=8, symmetric=False)}
IDS = torch.tensor([[1, 12, 5, 40, 33, 2], [1, 70, 81, 6, 2, 0]])
MASK = (IDS != 0).long()


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return BertForSequenceClassification(CFG)


def word_task(n, seed):
    """Label 1 if the sentence holds word 6, label 0 if it holds word 5 (exactly one of them, anywhere
    among random filler words): learnable only by finding that word."""
    g = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for _ in range(n):
        filler = torch.randint(10, 100, (int(torch.randint(4, 12, (1,), generator=g)),), generator=g).tolist()
        label = int(torch.randint(0, 2, (1,), generator=g))
        filler.insert(int(torch.randint(0, len(filler) + 1, (1,), generator=g)), 5 + label)
        ids.append([1, *filler, 2])
        labels.append(label)
    return EncodedDataset(ids, labels)


@pytest.fixture(scope="module")
def data():
    return SimpleNamespace(train=word_task(256, seed=1), eval=word_task(96, seed=2))


def run_state(model, data, **kw):
    return make_run(model, data, **kw)


def stage(method, **kw):
    train = {"epochs": 1, "lr": 1e-3, "batch_size": 16, "distill_from_full": False} | kw.pop("train", {})
    return stage_config(stage="quantize", method=method, train=train, **kw)


def run_qat(run, cfg):
    return Quantize(cfg).run(run)


def train_config(cfg):
    return cfg.train


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=MASK).logits


@pytest.fixture(scope="module")
def fine_tuned(data):
    """A full-precision model that has learned the word task (the stage-start model of most tests)."""
    from slimtune.config import LoopConfig
    from slimtune.train import LoopSettings, TrainContext, train

    model = tiny_model()
    train(model, data.train, LoopSettings.from_config(LoopConfig(epochs=6), lr=2e-3, batch_size=16),
          TrainContext(progress=False))
    return model


# ------------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("name", list(SPECS))
def test_ste_forward_is_quantized_and_backward_reaches_the_latent_weights(name):
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    spec = SPECS[name]
    fq = FakeQuantLinear(linear, spec)
    assert fq.weight is linear.weight and list(fq.state_dict()) == ["weight", "bias"]  # checkpoints fit
    x = torch.randn(4, 16)
    out = fq(x)
    q = fake_quantize(linear.weight.detach(), spec["bits"], spec["scheme"], spec["group_size"])
    assert torch.equal(out, nn.functional.linear(x, q, linear.bias))
    assert not torch.equal(q, linear.weight)  # the forward really is quantized
    out.square().sum().backward()
    grad_wrt_q = (2 * out).T @ x  # d/dW of sum(out^2) if out = x W^T + b, evaluated at W = q
    assert linear.weight.grad.abs().sum() > 0
    assert torch.allclose(linear.weight.grad, grad_wrt_q, atol=1e-5)  # straight through (|w| <= 1 here)


def test_binary_ste_stops_the_gradient_of_latent_weights_beyond_one():
    linear = nn.Linear(4, 2)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.5, -1.5, 0.2, 0.1], [0.3, 0.3, -0.3, 2.0]]))
    FakeQuantLinear(linear, SPECS["binary"])(torch.ones(1, 4)).sum().backward()
    g = linear.weight.grad
    assert g[0, 1] == 0 and g[1, 3] == 0
    assert (g[0, [0, 2, 3]] != 0).all() and (g[1, :3] != 0).all()


# ------------------------------------------------------------------------------- codes, conversion
@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_binary_and_ternary_codes_and_per_channel_alpha(method):
    model = tiny_model()
    targets = select_linears(model)
    latent = {n: m.weight.detach().clone() for n, m in targets.items()}
    prepare_qat_(model, targets, weight_spec(method))
    convert_qat_(model, method)
    allowed = {-1, 1} if method == "binary" else {-1, 0, 1}
    for name, w in latent.items():
        q = model.get_submodule(name)
        assert type(q).__name__ == "QuantizedLinear"
        assert q.qweight.dtype == torch.int8 and set(q.qweight.unique().tolist()) <= allowed
        assert q.scale.shape == (w.shape[0], 1)  # one alpha per output channel
        a = w.abs()
        if method == "binary":
            alpha = a.mean(1, keepdim=True)  # XNOR-Net
            assert (w != 0).all() and torch.equal(q.qweight, torch.sign(w).to(torch.int8))
        else:
            kept = a > 0.7 * a.mean(1, keepdim=True)  # TWN's threshold
            alpha = (a * kept).sum(1, keepdim=True) / kept.sum(1, keepdim=True)
            assert torch.equal(q.qweight.abs().bool(), kept)
            assert torch.equal(q.qweight[kept], torch.sign(w[kept]).to(torch.int8))
        assert torch.allclose(q.scale, alpha, rtol=1e-5)
    layers = model.config.slimtune_quantization["layers"]
    assert model.config.slimtune_quantization["method"] == method
    assert set(layers) == set(latent) and {v["scheme"] for v in layers.values()} == {method}


@pytest.mark.parametrize("name", list(SPECS))
def test_converted_model_gives_the_fake_quant_models_logits(name):
    model = tiny_model()
    emb = word_embedding_name(model)
    prepare_qat_(model, select_linears(model), SPECS[name], embedding=emb)
    assert isinstance(model.get_submodule(emb), FakeQuantEmbedding)
    with torch.no_grad():  # latent weights a training step would have moved
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    before = logits(model)
    report = convert_qat_(model, "qat")
    assert not any(isinstance(m, FakeQuantLinear | FakeQuantEmbedding) for m in model.modules())
    assert type(model.get_submodule(emb)).__name__ == "QuantizedEmbedding"
    assert torch.equal(logits(model), before)  # the very codes the forward used
    assert set(report) == set(select_linears(tiny_model())) | {emb}


def test_prepare_refuses_a_module_that_is_not_a_linear():
    model = tiny_model()
    with pytest.raises(SlimtuneError, match="not an nn.Linear"):
        prepare_qat_(model, ["bert.embeddings.word_embeddings"], SPECS["int8"])
    with pytest.raises(SlimtuneError, match="takes bits 8 or 4"):
        weight_spec("qat", 2)


def test_default_training_and_method_learning_rates():
    t = train_config(stage_config(stage="quantize", method="binary"))
    assert (t.epochs, t.lr, t.distill_from_full) == (1, 5e-4, True)
    assert train_config(stage_config(stage="quantize", method="qat")).lr == 1e-4
    assert train_config(stage("ternary", train={"lr": 3e-3})).lr == 3e-3  # the recipe's lr wins
    assert train_config(stage_config(stage="quantize", method="ternary", train={"epochs": 2})).lr == 5e-4


# ------------------------------------------------------------------------------- the stage
def test_qat_int8_learns_a_word_task_from_scratch_and_reports_ptq_accuracy(data):
    run = run_state(tiny_model(), data)
    m = run_qat(run, stage("qat", bits=8, train={"epochs": 8, "lr": 2e-3}))
    assert m["start_accuracy"] < 0.7 and m["accuracy_before_training"] < 0.7  # random init: chance level
    assert m["accuracy"] >= 0.9  # chance is 0.5
    assert m["accuracy"] == pytest.approx(m["train"]["best_metric"])  # converted = trained fake-quant model
    assert (m["method"], m["bits"], m["epochs_run"]) == ("qat", 8, 8)
    assert len(m["train"]["history"]) == 8
    assert run.progress.states["0"]["spec"] == run.model.config.slimtune_quantization  # what a resume rebuilds


def test_save_then_load_model_gives_identical_logits(data, fine_tuned, tmp_path):
    run = run_state(copy.deepcopy(fine_tuned), data)
    run_qat(run, stage("ternary", embeddings=True, train={"max_steps": 4}))
    save_hf_model(run.model, None, tmp_path)
    loaded = load_model(tmp_path)
    assert torch.equal(logits(loaded), logits(run.model))
    assert type(loaded.get_submodule("bert.encoder.layer.1.output.dense")).__name__ == "QuantizedLinear"


@pytest.mark.parametrize("method", ["binary", "ternary"])
def test_distillation_from_the_full_precision_model(data, fine_tuned, monkeypatch, method):
    calls, teachers = [], []
    import slimtune.distill.losses as losses
    import slimtune.stages.quantize_training as qt

    real_loss, real_make = losses.soft_target_loss, qt._soft_targets_of
    monkeypatch.setattr(losses, "soft_target_loss", lambda *a: calls.append(1) or real_loss(*a))
    monkeypatch.setattr(qt, "_soft_targets_of", lambda teacher, tcfg: teachers.append(teacher) or real_make(teacher, tcfg))
    run = run_state(copy.deepcopy(fine_tuned), data)
    m = run_qat(run, stage(method, train={"epochs": 2, "lr": 5e-4, "distill_from_full": True, "alpha": 0.7}))
    assert len(calls) == 2 * 16  # every training batch (256 rows / 16)
    assert m["distilled"] and m["start_accuracy"] >= 0.9
    assert 0 <= m["accuracy"] <= 1 and 0 <= m["accuracy_before_training"] <= 1  # honest numbers, whatever they are
    teacher = teachers[0]  # the stage-start model, frozen and full precision through training
    assert not any(p.requires_grad for p in teacher.parameters())
    assert not any(isinstance(mod, FakeQuantLinear | FakeQuantEmbedding) for mod in teacher.modules())
    assert torch.equal(logits(teacher), logits(fine_tuned))


def test_a_killed_qat_stage_resumes_mid_training_and_ends_identically(data, fine_tuned, tmp_path, monkeypatch):
    cfg = stage("qat", bits=4, group_size=8, train={"epochs": 2, "checkpoint_every": 5, "distill_from_full": True})
    ref = run_state(copy.deepcopy(fine_tuned), data, checkpoints=CheckpointStore(tmp_path / "ref"))
    ref_metrics = run_qat(ref, cfg)

    store = CheckpointStore(tmp_path / "killed")
    import slimtune.stages.base as stage_base

    real_train, seen = stage_base.train, {"n": 0, "kill_at": 23}  # after the step-20 checkpoint, mid second epoch

    def counted_train(model, train_ds, settings, ctx, loss_fn, **kw):
        def loss(m, batch):
            seen["n"] += 1
            if seen["n"] == seen["kill_at"]:
                raise KeyboardInterrupt
            return loss_fn(m, batch)

        return real_train(model, train_ds, settings, ctx, loss_fn=loss, **kw)

    monkeypatch.setattr(stage_base, "train", counted_train)
    with pytest.raises(KeyboardInterrupt):
        run_qat(run_state(copy.deepcopy(fine_tuned), data, checkpoints=store), cfg)
    state, _ = read_checkpoint(store.latest())
    assert state["loop"]["step"] == 20 and not state["loop"]["finished"]

    # As after a kill: the runner's model has other weights (earlier stages are not re-run)
    resumed = run_state(tiny_model(seed=7), data, checkpoints=store, resume=store.latest(),
                        progress=state["runner"])
    seen.update(n=0, kill_at=-1)
    metrics = run_qat(resumed, cfg)
    assert seen["n"] == 2 * 16 - 20  # only the batches the killed run had not trained on
    assert torch.equal(logits(resumed.model), logits(ref.model))
    ref_sd, sd = ref.model.state_dict(), resumed.model.state_dict()
    assert list(sd) == list(ref_sd) and all(torch.equal(sd[k], ref_sd[k]) for k in sd)
    for key in ("start_accuracy", "accuracy_before_training", "accuracy", "epochs_run"):
        assert metrics[key] == ref_metrics[key]
    assert [h["accuracy"] for h in metrics["train"]["history"]] == [h["accuracy"] for h in ref_metrics["train"]["history"]]


# ------------------------------------------------------------------------------- through the runner
def test_runner_qat_stage_killed_mid_training_resumes_to_the_same_saved_model(tmp_path, tiny_model_dir, sst2_small,
                                                                              monkeypatch):
    """`slimtune.run` -> stage.py -> run_qat, the real checkpoints and `resume=True`: a run killed in the
    middle of QAT ends with the saved model and metrics of an uninterrupted run, and the saved model
    loads back (slimtune.load_model) to the accuracy the run reported."""
    from safetensors.torch import load_file

    import slimtune
    import slimtune.stages.base as stage_base

    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48},
              "stages": [{"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16},
                         {"stage": "quantize", "method": "ternary",
                          "train": {"epochs": 1, "lr": 1e-3, "batch_size": 32, "checkpoint_every": 4}},
                         {"stage": "evaluate", "speed": False}]}
    ref = slimtune.run(recipe, tmp_path / "ref", progress=False)

    real_train, calls = stage_base.train, {"n": 0}

    def killed_train(model, train_ds, settings, ctx, *, loss_fn, **kw):
        def loss(m, batch):
            calls["n"] += 1
            if calls["n"] == 7:  # after the step-4 checkpoint of the QAT loop (300 rows: 10 steps)
                raise KeyboardInterrupt
            return loss_fn(m, batch)

        qat_loop = "quantize" in ctx.tag  # the finetune stage before it trains as usual
        return real_train(model, train_ds, settings, ctx, loss_fn=loss if qat_loop else loss_fn, **kw)

    monkeypatch.setattr(stage_base, "train", killed_train)
    with pytest.raises(KeyboardInterrupt):
        slimtune.run(recipe, tmp_path / "out", progress=False)
    monkeypatch.setattr(stage_base, "train", real_train)
    latest, _ = read_checkpoint(CheckpointStore(tmp_path / "out" / "checkpoints").latest())
    assert latest["tag"] == "s1-quantize" and latest["loop"]["step"] == 4
    again = slimtune.run(recipe, tmp_path / "out", resume=True, progress=False)

    s = again["stages"][1]
    assert s["method"] == "ternary" and s["bits"] == 2 and len(s["layers"]) == 12 + 1  # + the word embeddings
    assert again["final"]["accuracy"] == ref["final"]["accuracy"] == s["accuracy"] == ref["stages"][1]["accuracy"]
    assert s["accuracy_before_training"] == ref["stages"][1]["accuracy_before_training"]
    saved, expected = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("out", "ref"))
    assert saved.keys() == expected.keys() and all(torch.equal(saved[k], expected[k]) for k in saved)
    model_dir = tmp_path / "out" / "model"
    model, _, eval_fn = eval_split(model_dir, sst2_small[1])
    assert eval_fn(model)["accuracy"] == s["accuracy"]
    assert set(model.bert.encoder.layer[0].attention.self.query.qweight.unique().tolist()) <= {-1, 0, 1}
