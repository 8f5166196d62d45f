"""`stage: lowrank` (truncated SVD into two thin Linears) on tiny random BERTs: ranks, the FLOP rule,
saving/loading, ONNX export, resume and bad input."""

import json
import shutil

import pytest
import torch
from torch import nn

import slimtune
from slimtune.lowrank import apply_lowrank_skeleton_, choose_ranks, factorize_, factorized_linear
from slimtune.prune.unstructured import select_linears

FT = {"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16}
EVAL = {"stage": "evaluate", "speed": False}
IDS = torch.tensor([[101, 2023, 2003, 1037, 2307, 3185, 102, 0], [101, 7592, 102, 0, 0, 0, 0, 0]])
MASK = (IDS != 0).long()


def tiny_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=8000, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def recipe(tiny_model_dir, sst2_small, *stages) -> dict:
    return {"model": str(tiny_model_dir),
            "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 48},
            "stages": list(stages)}


def logits(model, ids=IDS, mask=MASK) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(input_ids=ids, attention_mask=mask).logits


# ------------------------------------------------------------------------------------ the algebra
def test_full_rank_factors_reproduce_the_layer():
    torch.manual_seed(0)
    linear = nn.Linear(24, 40)
    thin = factorized_linear(linear, 24)
    x = torch.randn(5, 24)
    assert [type(m) for m in thin] == [nn.Linear, nn.Linear] and thin[0].bias is None
    assert torch.allclose(thin(x), linear(x), atol=1e-5)


def test_a_rank_deficient_layer_is_reproduced_at_its_rank_with_fewer_params():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(48, 4) @ torch.randn(4, 64))  # rank 4
    x = torch.randn(3, 64)
    before = model(x)
    report = factorize_(model, {"0": 4})
    layer = report["layers"]["0"]
    assert isinstance(model[0], nn.Sequential) and model[0][0].weight.shape == (4, 64)
    assert torch.allclose(model(x), before, atol=1e-4)
    assert layer["rel_weight_error"] < 1e-6 and layer["energy_kept"] == pytest.approx(1.0)
    assert (layer["params_before"], layer["params_after"]) == (48 * 64 + 48, 4 * 64 + 4 * 48 + 48)


@pytest.mark.parametrize(("energy", "rank"), [(0.5, 1), (0.8, 2), (25 / 30, 2), (0.84, 3), (0.9, 3), (0.97, 4),
                                              (1.0, 4)])
def test_energy_picks_the_smallest_rank_keeping_that_share(energy, rank):
    # singular values 4, 3, 2, 1, 0, 0: squared 16, 9, 4, 1 of 30
    q1, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))
    q2, _ = torch.linalg.qr(torch.randn(8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    model = nn.Sequential(nn.Linear(8, 6, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.copy_(q1 @ torch.diag(torch.tensor([4.0, 3, 2, 1, 0, 0], dtype=torch.float64)) @ q2.T)
    assert choose_ranks(model, ["0"], energy=energy) == {"0": rank}


def test_rank_and_energy_are_exclusive():
    model = nn.Sequential(nn.Linear(8, 6))
    for kwargs in ({}, {"rank": 2, "energy": 0.5}):
        with pytest.raises(slimtune.SlimtuneError, match="exactly one of rank or energy"):
            choose_ranks(model, ["0"], **kwargs)


def test_layers_where_factors_would_not_reduce_flops_are_skipped():
    model = tiny_classifier()
    names = list(select_linears(model))  # the 12 encoder Linears: 32x32 attention, 32<->64 FFN
    before = logits(model)
    # rank 20: 20*(32+32) = 1280 >= 1024 for attention; 20*(32+64) = 1920 < 2048 for the FFN
    report = factorize_(model, choose_ranks(model, names, rank=20))
    ffn = [n for n in names if n.endswith("intermediate.dense") or n.endswith("layer.0.output.dense")
           or n.endswith("layer.1.output.dense")]
    assert sorted(report["layers"]) == sorted(ffn)
    assert len(report["layers"]) == 4 and len(report["skipped"]) == 8
    assert all("no fewer FLOPs" in s["reason"] for s in report["skipped"].values())
    assert type(model.get_submodule("bert.encoder.layer.0.attention.self.query")) is nn.Linear
    assert isinstance(model.get_submodule("bert.encoder.layer.0.intermediate.dense"), nn.Sequential)
    assert model.config.slimtune_lowrank == {n: 20 for n in report["layers"]}
    # rank 20 of 32 on a random weight is a real approximation, and the report measures it
    assert all(0.05 < info["rel_weight_error"] < 0.5 and info["energy_kept"] < 0.99 for info in report["layers"].values())
    assert not torch.equal(logits(model), before)
    report = factorize_(model, {"bert.encoder.layer.0.attention.self.query": 40})
    assert "min(in, out) = 32" in report["skipped"]["bert.encoder.layer.0.attention.self.query"]["reason"]


def test_skeleton_names_a_missing_or_wrong_module():
    model = tiny_classifier()
    with pytest.raises(slimtune.SlimtuneError, match="'bert.encoder.layer.7.output.dense' not found"):
        apply_lowrank_skeleton_(model, {"bert.encoder.layer.7.output.dense": 4})
    with pytest.raises(slimtune.SlimtuneError, match="'bert.encoder.layer.0.output' is a BertOutput, not an nn.Linear"):
        apply_lowrank_skeleton_(model, {"bert.encoder.layer.0.output": 4})


# ----------------------------------------------------------------------------- the stage in a run
@pytest.fixture(scope="module")
def lowrank_run(tmp_path_factory, tiny_model_dir, sst2_small):
    """finetune -> lowrank rank 8 with distilled recovery -> evaluate; also the in-memory model saved."""
    import slimtune.runner as runner

    saved = {}
    original = runner.save_model_dir

    def capture(run, *args, **kwargs):
        saved["model"] = run.model
        original(run, *args, **kwargs)

    out = tmp_path_factory.mktemp("lowrank") / "out"
    stage = {"stage": "lowrank", "rank": 8,
             "recover": {"epochs": 1, "lr": 5e-4, "batch_size": 16, "distill_from_unpruned": True}}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "save_model_dir", capture)
        metrics = slimtune.run(recipe(tiny_model_dir, sst2_small, FT, stage, EVAL), out, progress=False)
    return metrics, out, saved["model"]


def test_lowrank_stage_metrics_and_saved_config(lowrank_run):
    metrics, out, _ = lowrank_run
    s = metrics["stages"][1]
    assert s["stage"] == "lowrank" and len(s["layers"]) == 12 and s["skipped"] == {}
    assert all(info["rank"] == 8 and info["params_after"] < info["params_before"] for info in s["layers"].values())
    assert s["params_after"] < s["params_before"] and metrics["final"]["params"] == s["params_after"]
    assert s["recover"]["history"] and 0 <= s["accuracy_before_recovery"] <= 1
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["slimtune_lowrank"] == {name: 8 for name in s["layers"]}
    from safetensors.torch import load_file

    keys = load_file(str(out / "model" / "model.safetensors"))
    p = "bert.encoder.layer.1.attention.self.value"
    assert keys[f"{p}.0.weight"].shape == (8, 32) and keys[f"{p}.1.weight"].shape == (32, 8)
    assert f"{p}.1.bias" in keys and f"{p}.0.bias" not in keys and f"{p}.weight" not in keys


def test_saved_lowrank_model_loads_with_identical_logits(lowrank_run):
    _, out, in_memory = lowrank_run
    loaded = slimtune.load_model(out / "model")
    assert isinstance(loaded.get_submodule("bert.encoder.layer.0.output.dense"), nn.Sequential)
    assert torch.equal(logits(loaded), logits(in_memory))


def test_saved_lowrank_model_exports_to_onnx(lowrank_run, tmp_path):
    import onnxruntime as ort

    _, out, _ = lowrank_run
    model = slimtune.load_model(out / "model")

    class Logits(nn.Module):  # the graph's one output: the logits tensor
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask).logits

    path = tmp_path / "model.onnx"
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(Logits(model), (IDS, MASK), str(path), dynamo=False, opset_version=17,
                      input_names=["input_ids", "attention_mask"], output_names=["logits"],
                      dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = torch.randint(1000, 2000, (3, 11))  # another batch size and length than the export's
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    assert torch.allclose(torch.from_numpy(got), logits(model, ids, mask), atol=1e-4)


def test_resume_past_a_lowrank_stage_rebuilds_the_factors(tmp_path, tiny_model_dir, sst2_small):
    stages = [FT | {"max_steps": 2}, {"stage": "lowrank", "energy": 0.6, "ignore": ["query"]},
              FT | {"max_steps": 3}, EVAL]
    out = tmp_path / "out"
    first = slimtune.run(recipe(tiny_model_dir, sst2_small, *stages), out, progress=False, keep_checkpoints=True)
    s = first["stages"][1]
    assert s["layers"] and not any(name.endswith("query") for name in s["layers"])
    assert all(0.6 <= info["energy_kept"] for info in s["layers"].values())
    shutil.copytree(out / "model", tmp_path / "first")
    (out / "metrics.json").unlink()
    shutil.rmtree(out / "model")
    again = slimtune.run(recipe(tiny_model_dir, sst2_small, *stages), out, resume=True, progress=False)
    assert again["final"]["params"] == first["final"]["params"]
    assert torch.equal(logits(slimtune.load_model(out / "model")), logits(slimtune.load_model(tmp_path / "first")))


@pytest.mark.parametrize(("stage", "message"), [
    ({"rank": 4, "energy": 0.9}, r"stages.1 \(lowrank\): set exactly one of rank or energy"),
    ({}, r"stages.1 \(lowrank\): set exactly one of rank or energy"),
    ({"rank": 4, "targets": ["nothing_like_this", "query"]}, r"lowrank: targets \['nothing_like_this'\] match no"),
    ({"energy": 1.5}, "energy: Input should be less than or equal to 1"),
])
def test_bad_lowrank_input_fails_before_any_output(tmp_path, tiny_model_dir, sst2_small, stage, message):
    with pytest.raises(slimtune.SlimtuneError, match=message):
        slimtune.run(recipe(tiny_model_dir, sst2_small, FT, {"stage": "lowrank"} | stage), tmp_path / "out",
                     progress=False)
    assert not (tmp_path / "out").exists()
