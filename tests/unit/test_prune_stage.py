"""`stage: prune` through `slimtune.run` on a tiny random BERT: every method, recovery, saving, errors."""

import shutil

import pytest
import torch
from safetensors.torch import load_file

import slimtune

FT = {"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16}
EVAL = {"stage": "evaluate", "speed": False}
RECOVER = {"epochs": 1, "lr": 5e-4, "batch_size": 16}


def run(tmp_path, tiny_model_dir, sst2_small, *stages, name="out", **kw):
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48},
              "stages": list(stages)}
    return slimtune.run(recipe, tmp_path / name, progress=False, **kw)


def encoder_zeros(path) -> float:
    weights = load_file(str(path / "model" / "model.safetensors"))
    enc = [v for k, v in weights.items() if ".encoder." in k and k.endswith(".weight") and v.ndim == 2]
    return sum(int((v == 0).sum()) for v in enc) / sum(v.numel() for v in enc)


def test_magnitude_oneshot_with_recovery_saves_a_plain_model_with_zeros(tmp_path, tiny_model_dir, sst2_small):
    from transformers import AutoModelForSequenceClassification

    m = run(tmp_path, tiny_model_dir, sst2_small, FT,
            {"stage": "prune", "method": "magnitude", "sparsity": 0.5, "scope": "global", "recover": RECOVER}, EVAL)
    s = m["stages"][1]
    assert s["final_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert encoder_zeros(tmp_path / "out") == pytest.approx(0.5, abs=0.01)  # masks held through recovery
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")  # plain HF, no slimtune keys


def test_gradual_magnitude_reaches_its_target_during_recovery(tmp_path, tiny_model_dir, sst2_small):
    m = run(tmp_path, tiny_model_dir, sst2_small, FT,
            {"stage": "prune", "method": "magnitude", "sparsity": 0.8, "schedule": "gradual", "gradual_end": 0.5,
             "recover": RECOVER | {"epochs": 4}}, EVAL)
    assert m["stages"][1]["final_sparsity"] == pytest.approx(0.8, abs=0.01)
    assert encoder_zeros(tmp_path / "out") == pytest.approx(0.8, abs=0.01)
    recover = m["stages"][1]["rounds"][0]["recover"]  # the kept best is one at the final sparsity
    assert [h["step"] for h in recover["history"]] == [recover["steps"] // 4, recover["steps"] // 2,
                                                       3 * recover["steps"] // 4, recover["steps"]]
    assert recover["best_step"] >= recover["steps"] // 2


def test_activation_two_four(tmp_path, tiny_model_dir, sst2_small):
    run(tmp_path, tiny_model_dir, sst2_small, FT, {"stage": "prune", "method": "activation", "n_m": [2, 4]}, EVAL)
    weights = load_file(str(tmp_path / "out" / "model" / "model.safetensors"))
    q = weights["bert.encoder.layer.0.attention.self.query.weight"].reshape(-1, 4)
    assert torch.all((q == 0).sum(1) == 2)


def test_structured_heads_and_ffn_with_distillation_from_the_unpruned_model(tmp_path, tiny_model_dir, sst2_small):
    from transformers import AutoModelForSequenceClassification

    m = run(tmp_path, tiny_model_dir, sst2_small, FT,
            {"stage": "prune", "method": "structured", "heads": 0.5, "ffn": 0.5,
             "recover": RECOVER | {"distill_from_unpruned": True}}, EVAL)
    s = m["stages"][1]
    assert s["rounds"][0]["shapes"]["heads_per_layer"] == [1, 1]
    assert s["rounds"][0]["shapes"]["intermediate_per_layer"] == [32, 32]
    assert s["params_after"] < s["params_before"] == m["final"]["params"] + (s["params_before"] - s["params_after"])
    ours = slimtune.load_model(tmp_path / "out" / "model")
    auto = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    ids = torch.tensor([[101, 2023, 2003, 1037, 2307, 3185, 102]])
    with torch.no_grad():
        assert torch.allclose(ours(input_ids=ids).logits, auto.eval()(input_ids=ids).logits, atol=1e-6)


def test_structured_ffn_and_layer_pruning_is_a_plain_hf_model(tmp_path, tiny_model_dir, sst2_small):
    from transformers import AutoModelForSequenceClassification

    run(tmp_path, tiny_model_dir, sst2_small, FT,
        {"stage": "prune", "method": "structured", "ffn": 0.5, "layers": 1, "importance": "weight"}, EVAL)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "model")
    assert model.config.num_hidden_layers == 1 and model.config.intermediate_size == 32


def test_iterative_rounds_stop_past_max_drop_and_keep_the_last_good_round(tmp_path, tiny_model_dir, sst2_small,
                                                                          monkeypatch):
    from slimtune.stages.base import Run

    scores = iter([0.90, 0.90, 0.85, 0.80])  # stage start, round 0, round 1 (too low), ...
    monkeypatch.setattr(Run, "primary_metric", lambda self, model: next(scores))
    m = run(tmp_path, tiny_model_dir, sst2_small, FT,
            {"stage": "prune", "method": "magnitude", "sparsity": 0.9, "recover": RECOVER | {"max_steps": 3},
             "iterative": {"rounds": 3, "max_drop": 0.02, "rewind": True}}, EVAL)
    s = m["stages"][1]
    assert [r["share"] for r in s["rounds"]] == [0.3333, 0.6667]
    assert "stopped" in s["rounds"][1] and "stopped" not in s["rounds"][0]
    assert s["final_sparsity"] == pytest.approx(0.3, abs=0.01)  # round 0's model is the one kept
    assert encoder_zeros(tmp_path / "out") == pytest.approx(0.3, abs=0.01)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory, tiny_model_dir, sst2_small):
    """A tiny classifier fine-tuned on the 300 rows: a recovery teacher."""
    out = tmp_path_factory.mktemp("teacher")
    run(out, tiny_model_dir, sst2_small, {"stage": "finetune", "epochs": 2, "lr": 2e-3, "batch_size": 16}, EVAL)
    return out / "out" / "model"


def test_recovery_learns_a_cached_teachers_soft_targets(tmp_path, tiny_model_dir, sst2_small, teacher_dir,
                                                        monkeypatch):
    import slimtune.stages.recovery as stage
    from slimtune.batching import model_inputs

    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))
    seen = []

    def spy(temperature, alpha):  # records what the loss is given
        inner = cached_distill_loss(temperature, alpha)
        return lambda m, batch: seen.append(batch) or inner(m, batch)

    cached_distill_loss = stage.cached_distill_loss
    monkeypatch.setattr(stage, "cached_distill_loss", spy)
    m = run(tmp_path, tiny_model_dir, sst2_small,
            {"stage": "prune", "method": "magnitude", "sparsity": 0.3,
             "recover": RECOVER | {"teacher": str(teacher_dir), "alpha": 1.0, "temperature": 3.0}}, EVAL)
    assert len(list((tmp_path / "home" / "teacher-cache").glob("*.safetensors"))) == 1  # labelled once, kept
    assert len(seen) == m["stages"][0]["rounds"][0]["recover"]["steps"]
    teacher = slimtune.load_model(teacher_dir).eval()
    with torch.no_grad():  # every batch's soft targets are the teacher's own distribution at T = 3
        for batch in seen[:3]:
            want = torch.softmax(teacher(**model_inputs(batch)).logits / 3.0, dim=-1)
            assert torch.allclose(batch["soft_targets"], want, atol=1e-5)
    assert m["stages"][0]["final_sparsity"] == pytest.approx(0.3, abs=0.01)


@pytest.mark.parametrize(("stage", "message"), [
    ({"method": "magnitude", "sparsity": 1.0}, "sparsity: Input should be less than 1"),
    ({"method": "magnitude", "sparsity": 0.5, "recover": {"teacher": "/nowhere/teacher"}}, "/nowhere/teacher"),
    ({"method": "magnitude", "sparsity": 0.5, "recover": {"teacher": "t", "distill_from_unpruned": True}},
     "choose one source of soft targets"),
    ({"method": "magnitude", "sparsity": 0.5, "targets": ["nothing_like_this"]}, "match no nn.Linear module"),
    ({"method": "structured", "heads": 0.9}, "pruning every head would remove the layer"),
    ({"method": "structured"}, "structured pruning needs heads, ffn or layers"),
    ({"method": "magnitude", "sparsity": 0.5, "recover": {"hidden_weight": 1.0}}, "hidden_weight needs distill_from"),
    ({"method": "structured", "layers": 1, "recover": {"distill_from_unpruned": True, "hidden_weight": 1.0}},
     "cannot follow removing whole layers"),
])
def test_bad_prune_input(tmp_path, tiny_model_dir, sst2_small, stage, message):
    with pytest.raises(slimtune.SlimtuneError, match=message):
        run(tmp_path, tiny_model_dir, sst2_small, {"stage": "prune"} | stage)
    assert not (tmp_path / "out").exists()


def test_resume_past_a_structured_prune_rebuilds_the_shapes(tmp_path, tiny_model_dir, sst2_small):
    stages = [{"stage": "prune", "method": "structured", "heads": 0.5, "ffn": 0.5, "importance": "weight"},
              FT, EVAL]
    first = run(tmp_path, tiny_model_dir, sst2_small, *stages, keep_checkpoints=True)  # as if killed before the end
    out = tmp_path / "out"
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48}, "stages": stages}
    again = slimtune.run(recipe, out, resume=True, progress=False)
    assert again["final"]["accuracy"] == first["final"]["accuracy"]
    assert again["final"]["params"] == first["final"]["params"]


def test_hidden_state_loss_is_zero_for_the_frozen_copy_and_grows_with_pruning():
    """recover.hidden_weight: the token-level MSE of every hidden state against the unpruned model's,
    padding left out; the model itself scores exactly the soft-target loss alone."""
    import copy

    from transformers import BertConfig, BertForSequenceClassification

    from slimtune.distill.losses import hidden_state_mse, online_distill_loss
    from slimtune.prune.unstructured import prune_magnitude_

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64)).eval()
    frozen = copy.deepcopy(model)
    batch = {"input_ids": torch.randint(1, 100, (4, 9)), "attention_mask": torch.ones(4, 9, dtype=torch.long),
             "labels": torch.tensor([0, 1, 0, 1])}
    batch["attention_mask"][0, 5:] = 0
    plain, with_hidden = online_distill_loss(frozen, 2.0, 1.0), online_distill_loss(frozen, 2.0, 1.0, 10.0)
    assert with_hidden(model, batch).item() == pytest.approx(plain(model, batch).item(), abs=1e-7)
    prune_magnitude_(model, sparsity=0.5)
    gap = with_hidden(model, batch) - plain(model, batch)
    with torch.no_grad():
        s = model(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
        t = frozen(**{k: v for k, v in batch.items() if k != "labels"}, output_hidden_states=True).hidden_states
    assert gap.item() == pytest.approx(10.0 * hidden_state_mse(s, t, batch["attention_mask"]).item(), rel=1e-5)
    assert gap.item() > 0
    # padded positions do not count: changing a padded token's hidden state changes nothing
    moved = tuple(h.clone() for h in s)
    moved[-1][0, 7] += 100.0
    assert hidden_state_mse(moved, t, batch["attention_mask"]) == hidden_state_mse(s, t, batch["attention_mask"])


def test_gradual_auto_lr_is_tuned_once_with_the_recovery_loss(tmp_path, tiny_model_dir, sst2_small, monkeypatch):
    """The gradual schedule needs the recovery's step count before it starts: the lr range test runs once,
    with the recovery's own (distillation) loss, and the recovery then trains at that lr."""
    import slimtune.stages.base as base
    import slimtune.stages.prune as prune_stage
    from slimtune.tasks.classification import TextClassification

    built, probed = [], []

    def spy_recovery_loss(run, rc, model):
        built.append(recovery_loss(run, rc, model))
        return built[-1]

    def spy_find_lr(model, ds, loss_fn, make_batch, *args, **kw):
        probed.append(loss_fn)
        return 3e-4, []

    recovery_loss = prune_stage.recovery_loss
    monkeypatch.setattr(prune_stage, "recovery_loss", spy_recovery_loss)
    monkeypatch.setattr(base, "find_lr", spy_find_lr)
    m = run(tmp_path, tiny_model_dir, sst2_small,
            {"stage": "prune", "method": "magnitude", "sparsity": 0.5, "schedule": "gradual",
             "recover": RECOVER | {"lr": "auto", "distill_from_unpruned": True, "max_steps": 4}}, EVAL)
    assert len(probed) == 1  # once for the stage: the schedule and the recovery share it
    assert len(built) == 1 and probed[0] is built[0].loss_fn
    assert getattr(probed[0], "__func__", None) is not TextClassification.loss
    # the distillation loss reads the frozen unpruned copy: its closure holds a model, cross-entropy has none
    frozen = [c.cell_contents for c in probed[0].__closure__ or () if isinstance(c.cell_contents, torch.nn.Module)]
    assert len(frozen) == 1 and not any(p.requires_grad for p in frozen[0].parameters())
    recover = m["stages"][0]["rounds"][0]["recover"]
    assert recover["lr"] == 3e-4 and recover["steps"] == 4
    assert m["stages"][0]["final_sparsity"] == pytest.approx(0.5, abs=0.01)
