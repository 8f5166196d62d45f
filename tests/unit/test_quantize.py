"""Quantization on tiny random BERTs: codes, errors, GPTQ/AWQ, fixed point, static calibration, mixed
precision, the saved contract (save -> load_model -> identical logits) and `stage: quantize` end to end."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import slimtune
from slimtune.errors import SlimtuneError
from slimtune.models import load_model, save_hf_model
from slimtune.quantize import codes as qcodes
from slimtune.quantize import core
from slimtune.quantize.calibration import gptq_codes, observe_input_ranges
from slimtune.quantize.core import (
    QuantizedEmbedding,
    QuantizedLinear,
    calibrate_activations_,
    dequantize_,
    dequantize_codes,
    fake_quantize,
    layer_spec,
    quantize_,
    quantize_codes,
    quantized_size_bytes,
)
from slimtune.quantize.mixed import assign_bits, choose_bits

EVAL = {"stage": "evaluate", "speed": False}
ENCODER = "bert.encoder.layer"


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=500, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


def batches(n: int = 4, seed: int = 1) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        mask = torch.ones(6, 10, dtype=torch.long)
        mask[0, 7:] = 0  # some padding, as real calibration batches have
        out.append({"input_ids": torch.randint(1, 500, (6, 10), generator=g), "attention_mask": mask})
    return out


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def encoder_specs(model, **spec) -> dict:
    return {n: layer_spec(**spec) for n, m in model.named_modules() if isinstance(m, nn.Linear) and ENCODER in n}


# ------------------------------------------------------------------------------------------ codes
@pytest.mark.parametrize("scheme", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_codes_stay_in_the_range_of_their_bits(bits, scheme):
    w = torch.randn(16, 64) * 3 + 0.5
    codes, scale, zero = quantize_codes(w, bits, scheme, group_size=16)
    lo, hi = qcodes.code_range(bits, scheme)
    assert codes.dtype == torch.int8 and scale.shape == (16, 4)
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    assert int(codes.min()) == lo or int(codes.max()) == hi  # the range is used, not wasted
    if scheme == "asymmetric":
        assert zero.dtype == torch.int8 and int(zero.min()) >= lo and int(zero.max()) <= hi
    else:
        assert zero is None and hi == 2 ** (bits - 1) - 1 and lo == -hi


def q4_1_grid(rows: int, cols: int, block: int = 32) -> torch.Tensor:
    """Weights as a dequantized llama.cpp Q4_1 file holds them: per block of 32, w = m + d q with q in
    0..15 (both ends used) and a float minimum m."""
    torch.manual_seed(0)
    q = torch.randint(0, 16, (rows, cols // block, block)).float()
    q[..., 0], q[..., 1] = 0, 15
    d, m = torch.rand(rows, cols // block, 1) * 0.02 + 0.001, -torch.rand(rows, cols // block, 1) * 0.1
    return (m + d * q).reshape(rows, cols)


@pytest.mark.parametrize("gptq", [False, True])
def test_a_float_zero_point_keeps_weights_on_a_q4_1_grid_exactly(gptq):
    w = q4_1_grid(16, 128)
    h = torch.eye(128) + 0.1  # any positive definite Hessian: GPTQ has no error to spread on exact codes

    def error(scheme):
        codes = gptq_codes(w, h, 4, scheme, 32) if gptq else quantize_codes(w, 4, scheme, 32)
        return float((dequantize_codes(*codes) - w).abs().max() / w.abs().max())

    assert error("asymmetric_float") < 1e-5
    # an integer zero point shifts the grid by up to half a step: every weight is rounded again
    assert error("asymmetric") > 1e-2
    codes, scale, zero = quantize_codes(w, 4, "asymmetric_float", 32)
    assert zero.dtype == torch.float32 and int(codes.min()) == -8 and int(codes.max()) == 7


def test_int8_error_is_small_and_int4_groups_beat_int4_per_channel():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(1, 256) * 2  # input channels of different magnitudes
    rel = lambda q: float((w - q).norm() / w.norm())  # noqa: E731
    assert rel(fake_quantize(w, 8, "symmetric")) < 0.01
    assert rel(fake_quantize(w, 8, "asymmetric")) < 0.01
    assert rel(fake_quantize(w, 4, "symmetric", group_size=32)) < rel(fake_quantize(w, 4, "symmetric")) * 0.9


def test_fixed_point_is_exact_in_range_and_saturates_outside():
    frac = 4
    exact = torch.tensor([[0.0, 0.0625, -0.5, 1.9375, -2.0, 1.25]])  # multiples of 2^-4 inside Q1.4
    codes, scale, zero = quantize_codes(exact, 6, "fixed_point", None, int_bits=1, frac_bits=frac)
    assert zero is None and torch.equal(scale, torch.full((1, 1), 2.0 ** -frac))
    assert torch.equal(dequantize_codes(codes, scale), exact)
    out = torch.tensor([[5.0, -7.0, 2.0]])
    assert dequantize_codes(*quantize_codes(out, 6, "fixed_point", None, 1, frac)[:2]).tolist() == \
        [[1.9375, -2.0, 1.9375]]
    wide, _, _ = quantize_codes(torch.tensor([[100.5]]), 12, "fixed_point", None, int_bits=7, frac_bits=4)
    assert wide.dtype == torch.int16 and int(wide) == 1608


def test_binary_and_ternary_code_sets_and_scales():
    torch.manual_seed(0)
    w = torch.randn(8, 40)
    codes, scale, _ = quantize_codes(w, 1, "binary", None)
    assert set(codes.unique().tolist()) == {-1, 1}
    assert torch.allclose(scale[:, 0], w.abs().mean(1))
    codes, scale, _ = quantize_codes(w, 2, "ternary", None)
    assert set(codes.unique().tolist()) == {-1, 0, 1}
    keep = w.abs() > 0.7 * w.abs().mean(1, keepdim=True)
    assert torch.equal(codes != 0, keep)
    assert torch.allclose(scale[:, 0], (w.abs() * keep).sum(1) / keep.sum(1))


def test_gptq_has_lower_output_error_than_rtn_on_correlated_inputs():
    torch.manual_seed(0)
    mix = torch.randn(64, 64)
    x = torch.randn(2048, 64) @ mix + 0.3 * torch.randn(2048, 64)  # strongly correlated input channels
    w = torch.randn(32, 64)
    h = x.T @ x
    out_err = lambda q: float(((x @ (w - q).T) ** 2).mean())  # noqa: E731
    for gs in (None, 16):
        rtn = dequantize_codes(*quantize_codes(w, 4, "symmetric", gs))
        gptq = dequantize_codes(*gptq_codes(w, h, 4, "symmetric", gs))
        assert out_err(gptq) < 0.8 * out_err(rtn)


# ------------------------------------------------------------------------------------ quantize_
@pytest.mark.parametrize("algorithm", ["gptq", "awq"])
def test_calibrated_algorithms_never_lose_to_rtn_on_calibration_data(algorithm):
    model = tiny_bert()
    report = quantize_(model, encoder_specs(model, bits=4, group_size=16), batches(), algorithm=algorithm)
    assert len(report) == 12
    for layer in report.values():
        assert layer["output_mse"] <= layer["rtn_output_mse"] * (1 + 1e-5)
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n in report)
    if algorithm == "awq":
        assert all(m.input_scale is not None for m in model.modules() if isinstance(m, QuantizedLinear))


SPECS = {
    "int8_dynamic": dict(bits=8, activations="dynamic"),
    "int8_asym_static": dict(bits=8, scheme="asymmetric", activations="static"),
    "int4_groups": dict(bits=4, group_size=16),
    "int4_asym": dict(bits=4, scheme="asymmetric"),
    "fixed_point": dict(bits=7, scheme="fixed_point", int_bits=1, frac_bits=5),
    "fixed_point_16": dict(bits=16, scheme="fixed_point", int_bits=3, frac_bits=12),
    "binary": dict(bits=1, scheme="binary"),
    "ternary": dict(bits=2, scheme="ternary"),
}


@pytest.mark.parametrize("name", list(SPECS))
def test_saved_quantized_model_loads_back_with_identical_logits(tmp_path, name):
    model = tiny_bert()
    specs = encoder_specs(model, **SPECS[name]) | {"bert.embeddings.word_embeddings": layer_spec(kind="embedding")}
    quantize_(model, specs, batches(), method=name)
    if SPECS[name].get("activations") == "static":
        calibrate_activations_(model, batches())
    save_hf_model(model, None, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["slimtune_quantization"]
    assert config["method"] == name and len(config["layers"]) == 13
    loaded = load_model(tmp_path)
    assert isinstance(loaded.bert.embeddings.word_embeddings, QuantizedEmbedding)
    b = batches(1, seed=7)[0]
    assert torch.equal(logits(loaded, b), logits(model, b))


@pytest.mark.parametrize("algorithm", ["rtn", "gptq", "awq"])
def test_dequantize_gives_a_plain_model_with_the_same_logits(algorithm):
    model = tiny_bert()
    specs = encoder_specs(model, bits=4, group_size=16) | {"bert.embeddings.word_embeddings": layer_spec(kind="embedding")}
    quantize_(model, specs, batches(), algorithm=algorithm)
    b = batches(1, seed=7)[0]
    before = logits(model, b)
    plain = dequantize_(copy.deepcopy(model))
    assert not any(isinstance(m, core.QUANTIZED) for m in plain.modules())
    assert not hasattr(plain.config, "slimtune_quantization")
    assert torch.allclose(logits(plain, b), before, atol=1e-5)
    assert not torch.allclose(before, logits(tiny_bert(), b), atol=1e-4)  # quantization did change something


def test_static_calibration_fills_activation_ranges_like_ort_minmax():
    model = tiny_bert()
    name = f"{ENCODER}.0.intermediate.dense"
    seen = []
    hook = model.get_submodule(name).register_forward_pre_hook(lambda _, a: seen.append(a[0].detach()))
    for b in batches():
        logits(model, b)
    hook.remove()
    lo, hi = min(float(x.min()) for x in seen), max(float(x.max()) for x in seen)
    assert lo < 0 < hi
    float_ranges = observe_input_ranges(model, {name: model.get_submodule(name)}, batches())
    assert float_ranges[name] == (lo, hi)
    specs = encoder_specs(model, bits=8, activations="static")
    quantize_(model, specs)
    layer = model.get_submodule(name)
    calibrate_activations_(model, batches(), {n: (0.0, 1.0) for n in specs} | float_ranges)
    assert layer.act_scale.item() == pytest.approx((hi - lo) / 255, rel=1e-6)
    assert layer.act_zero_point.item() == round(-lo / layer.act_scale.item())
    report = calibrate_activations_(model, batches())  # observed now, with int8 weights: nearly the same
    assert layer.act_scale.item() == pytest.approx((hi - lo) / 255, rel=1e-2)
    assert report[name]["zero_point"] == layer.act_zero_point.item()
    x = torch.randn(3, 32)
    expected = (torch.clamp(torch.round(x / layer.act_scale) + layer.act_zero_point, 0, 255)
                - layer.act_zero_point) * layer.act_scale
    assert torch.allclose(layer(x), nn.functional.linear(expected, layer.dequantized_weight(), layer.bias))


def test_dynamic_activations_follow_each_tensors_range():
    x = torch.tensor([[-1.0, 0.5, 3.0]])
    q = qcodes.dynamic_quantize_activations(x)
    scale = 4.0 / 255
    assert torch.allclose(q, (torch.clamp(torch.round(x / scale) + round(1 / scale), 0, 255) - round(1 / scale)) * scale)


@pytest.mark.parametrize("activations", ["dynamic", "static"])
def test_int8_layers_compute_ort_integer_arithmetic_bit_for_bit(activations):
    """MatMulInteger / MatMulIntegerToFloat: exact integer sums, then one multiply by s_x * s_w, then
    the bias. Computed here in int64, independently of the module's float32 arithmetic."""
    torch.manual_seed(0)
    linear = nn.Linear(96, 24)
    codes, scale, _ = quantize_codes(linear.weight.detach(), 8, "symmetric", None)
    layer = QuantizedLinear.from_linear(linear, codes, scale, None, layer_spec(activations=activations))
    assert layer.integer_kernel
    x = torch.randn(5, 7, 96) * 3
    if activations == "static":
        s, zp = qcodes.activation_params(-5.0, 7.0)
        layer.act_scale.fill_(s)
        layer.act_zero_point.fill_(zp)
        s, zp = layer.act_scale, layer.act_zero_point
    else:
        s, zp = qcodes.dynamic_activation_params(x)
    xq = (torch.clamp(torch.round(x / s) + zp, 0, 255) - zp).to(torch.int64)
    acc = xq @ codes.to(torch.int64).T
    want = acc.to(torch.float32) * (s * scale.view(-1)) + linear.bias.detach()
    with torch.no_grad():
        got = layer(x)
    assert torch.equal(got, want)
    # the float simulation (dequantize, then a float matmul) agrees up to rounding only
    assert torch.allclose(got, linear.bias + qcodes.fake_quantize_activations(x, s, zp) @ layer.weight.T, atol=1e-4)


def test_quantized_size_counts_codes_at_their_bit_width():
    model = tiny_bert()
    before = quantized_size_bytes(model)
    quantize_(model, encoder_specs(model, bits=4, group_size=16))
    linear_weights = sum(m.qweight.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    scales = sum(m.scale.numel() for m in model.modules() if isinstance(m, QuantizedLinear))
    assert before - quantized_size_bytes(model) == linear_weights * 4 - linear_weights // 2 - scales * 4


def test_skeleton_rebuild_on_resume_fits_the_quantized_state_dict():
    from helpers import make_run, stage_config

    from slimtune.stages.quantize import Quantize

    model = tiny_bert()
    quantize_(model, encoder_specs(model, bits=4, scheme="asymmetric"), method="weight_only")
    run = make_run(tiny_bert(seed=3), SimpleNamespace(train=SimpleNamespace(labels=[0, 1]), eval=SimpleNamespace(labels=[])),
                   progress={"states": {"0": {"spec": model.config.slimtune_quantization}}})
    Quantize(stage_config(stage="quantize", method="weight_only", bits=4)).rebuild(run)
    run.model.load_state_dict(model.state_dict(), strict=True)
    b = batches(1)[0]
    assert torch.equal(logits(run.model, b), logits(model, b))


# ---------------------------------------------------------------------------------------- mixed
def test_assign_bits_squeezes_the_least_sensitive_layers_first():
    table = {"a": 0.5, "b": 0.01, "c": 0.2, "d": 0.05}
    sizes = {"a": 100, "b": 100, "c": 100, "d": 100}
    assert assign_bits(table, sizes, [2, 4, 8], 5.0) == {"a": 8, "b": 2, "c": 8, "d": 2}
    assert assign_bits(table, sizes, [4, 8], 8.0) == {"a": 8, "b": 8, "c": 8, "d": 8}
    with pytest.raises(SlimtuneError, match="below the narrowest"):
        assign_bits(table, sizes, [4, 8], 3.0)


@pytest.mark.parametrize("sensitivity", ["output_error", "accuracy"])
def test_mixed_respects_the_budget_and_keeps_the_most_sensitive_layer_widest(sensitivity):
    from slimtune.prune.unstructured import select_linears

    model = tiny_bert()
    targets = select_linears(model)
    b = batches()
    labels = [logits(model, x).argmax(-1) for x in b]

    def eval_fn(m):  # agreement with the full-precision predictions
        agree = sum(int((logits(m, x).argmax(-1) == y).sum()) for x, y in zip(b, labels, strict=True))
        return {"accuracy": agree / sum(len(y) for y in labels)}

    before = logits(model, b[0])
    bits, table = choose_bits(model, [2, 4, 8], 4.0, sensitivity, b, eval_fn, targets=targets)
    assert torch.equal(logits(model, b[0]), before)  # every layer restored after its measurement
    sizes = {n: m.weight.numel() for n, m in targets.items()}
    assert sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values()) <= 4.0
    if sensitivity == "output_error":
        assert bits[max(table, key=table.get)] == max(bits.values()) == 8
        assert bits[min(table, key=table.get)] == 2


# ----------------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_with_the_module_named():
    model = tiny_bert()
    with pytest.raises(SlimtuneError, match="LayerNorm.*not an nn.Linear"):
        quantize_(model, {f"{ENCODER}.0.output.LayerNorm": layer_spec()})
    with pytest.raises(SlimtuneError, match="bits 9 not supported"):
        quantize_(model, {f"{ENCODER}.0.output.dense": layer_spec(bits=9)})
    with pytest.raises(SlimtuneError, match="group_size 24 does not divide .*64"):
        quantize_(model, {f"{ENCODER}.0.output.dense": layer_spec(bits=4, group_size=24)})
    with pytest.raises(SlimtuneError, match="calibration set is empty"):
        quantize_(model, encoder_specs(model, bits=4), [], algorithm="gptq")
    with pytest.raises(SlimtuneError, match="'bert.nope' does not exist"):
        core.apply_quantization_skeleton_(model, {"layers": {"bert.nope": layer_spec()}})
    quantize_(model, encoder_specs(model, bits=8, activations="static"))
    with pytest.raises(SlimtuneError, match="calibration set is empty"):
        calibrate_activations_(model, [])


# ------------------------------------------------------------------------------ stage end to end
def run(tmp_path, tiny_model_dir, sst2_small, *stages, name="out", keep_checkpoints=False, **data):
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32, **data},
              "stages": list(stages)}
    return slimtune.run(recipe, tmp_path / name, progress=False, keep_checkpoints=keep_checkpoints)


def saved_and_loaded_logits(tmp_path, monkeypatch, run_recipe):
    """Run a recipe, keeping the in-memory model the runner saves; returns (its dev logits, the dev
    logits of the model `load_model` reads back from OUT/model)."""
    from helpers import eval_split

    from slimtune import runner
    from slimtune.evaluate import predict_logits

    kept = {}
    save = runner.save_model_dir

    def keep_and_save(run, *args):
        kept["model"] = run.model
        save(run, *args)

    monkeypatch.setattr(runner, "save_model_dir", keep_and_save)
    metrics = run_recipe()
    loaded, ds, _ = eval_split(tmp_path / "out" / "model", tmp_path / "dev.jsonl")
    return metrics, predict_logits(kept["model"], ds), predict_logits(loaded, ds)


QUANTIZE = {"stage": "quantize", "calibration_batches": 2, "calibration_batch_size": 8}
STAGE_CASES = {
    "dynamic_int8": {"method": "dynamic_int8"},
    "static_int8": {"method": "static_int8", "symmetric": False},
    "gptq_int4": {"method": "weight_only", "bits": 4, "group_size": 16, "algorithm": "gptq"},
    "awq_int4": {"method": "weight_only", "bits": 4, "algorithm": "awq", "embeddings": False},
    "fixed_point": {"method": "fixed_point", "int_bits": 0, "frac_bits": 7},
    "mixed": {"method": "mixed", "mixed": {"bits": [2, 4, 8], "budget_bits": 5}},
}


@pytest.mark.parametrize("case", list(STAGE_CASES))
def test_quantize_stage_saves_a_model_that_loads_back_with_identical_logits(tmp_path, monkeypatch, tiny_model_dir,
                                                                           sst2_small, case):
    import shutil

    shutil.copy(sst2_small[1], tmp_path / "dev.jsonl")
    m, in_memory, reloaded = saved_and_loaded_logits(
        tmp_path, monkeypatch, lambda: run(tmp_path, tiny_model_dir, sst2_small, QUANTIZE | STAGE_CASES[case], EVAL))
    assert (in_memory == reloaded).all()
    s = m["stages"][0]
    assert s["stage"] == "quantize" and s["method"] == STAGE_CASES[case]["method"]
    assert s["size_bytes_quantized"] < s["size_bytes_before"] and s["calibration"]["batches"] == 2
    # 12 encoder Linears; with embeddings: word, position and token-type tables (as ORT), and for the
    # int8 methods the pooler, weight-only
    emb = STAGE_CASES[case].get("embeddings", True)
    pooler = emb and STAGE_CASES[case]["method"] in ("dynamic_int8", "static_int8")
    assert len(s["layers"]) == 12 + 3 * emb + pooler
    assert ("bert.pooler.dense" in s["layers"]) == pooler and "classifier" not in s["layers"]
    assert all(v["rel_error"] < 1 for v in s["layers"].values())
    assert m["final"]["accuracy"] == s["accuracy"]
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    assert config["slimtune_quantization"]["method"] == STAGE_CASES[case]["method"]
    if case == "static_int8":
        assert all(r["scale"] > 0 for r in s["activation_ranges"].values())
    if case == "fixed_point":
        assert all("saturated" in v and "max_abs_error" in v for k, v in s["layers"].items() if ENCODER in k)
    if case == "mixed":
        assert s["average_bits"] <= 5 and set(s["bits_per_layer"].values()) <= {2, 4, 8}
        assert len(s["sensitivity"]["per_layer"]) == 12


def test_codes_of_four_bits_or_fewer_are_saved_two_a_byte(tmp_path, tiny_model_dir, sst2_small):
    from safetensors import safe_open

    codes = torch.randint(-8, 8, (5, 7), dtype=torch.int8)
    packed = qcodes.pack_nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 4)
    assert torch.equal(qcodes.unpack_nibbles(packed, 7), codes)
    assert qcodes.pack_nibbles(codes.to("meta")).shape == (5, 4)  # what the model-directory gate compares
    m = run(tmp_path, tiny_model_dir, sst2_small, QUANTIZE | STAGE_CASES["gptq_int4"], EVAL)
    with safe_open(tmp_path / "out" / "model" / "model.safetensors", "pt") as f:
        name = next(k for k in f.keys() if k.endswith("layer.0.attention.self.query.qweight"))
        saved = f.get_tensor(name)
    model = load_model(tmp_path / "out" / "model")
    in_memory = model.get_submodule(name.removesuffix(".qweight")).qweight
    assert saved.dtype == torch.uint8 and saved.shape == (in_memory.shape[0], in_memory.shape[1] // 2)
    assert in_memory.dtype == torch.int8 and torch.equal(qcodes.pack_nibbles(in_memory), saved)
    assert m["final"]["packed_mb"] < m["final"]["size_mb"]  # `slimtune pack` codes the nibble pairs
    # a directory saved before nibble storage (one code a byte) still loads, to the same codes
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "out" / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors = {k: qcodes.unpack_nibbles(v, v.shape[1] * 2) if v.dtype == torch.uint8 else v
               for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    old = load_model(tmp_path / "out" / "model")
    assert torch.equal(old.get_submodule(name.removesuffix(".qweight")).qweight, in_memory)


def test_lora_adapter_is_merged_before_quantization(tmp_path, tiny_model_dir, sst2_small):
    lora = {"stage": "finetune", "method": "lora", "max_steps": 2, "batch_size": 16, "lr": 1e-3,
            "lora": {"r": 4, "target_modules": ["query", "value"], "save_adapter_only": True}}
    m = run(tmp_path, tiny_model_dir, sst2_small, lora, QUANTIZE | {"method": "dynamic_int8"}, EVAL)
    assert m["stages"][1]["lora_merged"] is True
    assert isinstance(load_model(tmp_path / "out" / "model").bert.encoder.layer[0].attention.self.query,
                      QuantizedLinear)


@pytest.mark.parametrize("stage, message", [
    ({"method": "weight_only", "bits": 3}, r"stages.0.bits: invalid value 3 \(expected 8 or 4\)"),
    ({"method": "weight_only", "weight_scales": "per_tensor"},
     r"stages.0.weight_scales: not a key of method weight_only \(it applies to dynamic_int8, static_int8\)"),
    ({"method": "mixed", "weight_scales": "auto"}, "not a key of method mixed"),
    ({"method": "weight_only", "bits": 4, "group_size": 24}, "group_size 24 does not divide the 32 input features of bert.encoder.layer.0.attention.self.query"),
    ({"targets": ["nothing_like_this"]}, "match no nn.Linear"),
    ({"method": "mixed", "mixed": {"bits": [5, 8]}}, r"stages.0.mixed.bits: bits \[5\] not supported"),
    ({"method": "fixed_point", "int_bits": 8, "frac_bits": 8}, "at most 16"),
    ({"method": "dynamic_int8", "algorithm": "gptq"}, r"algorithm: not a key of method dynamic_int8 \(it applies to weight_only\)"),
])
def test_bad_stage_config_is_refused_before_the_output_exists(tmp_path, tiny_model_dir, sst2_small, stage, message):
    with pytest.raises(SlimtuneError, match=message):
        run(tmp_path, tiny_model_dir, sst2_small, {"stage": "quantize"} | stage)
    assert not (tmp_path / "out").exists()


def test_resume_past_a_finished_quantize_stage_rebuilds_the_quantized_modules(tmp_path, monkeypatch, tiny_model_dir,
                                                                              sst2_small):
    from slimtune.stages.quantize import Quantize

    stages = [QUANTIZE | {"method": "weight_only", "bits": 4, "group_size": 16, "symmetric": False},
              {"stage": "finetune", "method": "full", "max_steps": 4, "batch_size": 16, "lr": 1e-3,
               "checkpoint_every": 2}, EVAL]
    first = run(tmp_path, tiny_model_dir, sst2_small, *stages, keep_checkpoints=True)
    out = tmp_path / "out"
    assert any((out / "checkpoints").glob("ckpt-*"))
    (out / "metrics.json").unlink()  # as if killed after the last checkpoint
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
              "stages": stages}
    rebuilt = []
    rebuild = Quantize.rebuild
    monkeypatch.setattr(Quantize, "rebuild", lambda self, r: (rebuilt.append(self.config.method), rebuild(self, r)))
    resumed = slimtune.run(recipe, out, resume=True, progress=False)
    assert rebuilt == ["weight_only"]
    assert resumed["final"]["accuracy"] == first["final"]["accuracy"]
    assert isinstance(load_model(out / "model").bert.encoder.layer[1].output.dense, QuantizedLinear)


# ------------------------------------------------------------------------ weight_scales: auto
def test_shared_input_groups_are_each_attention_blocks_query_key_value():
    from slimtune.quantize.granularity import shared_input_groups

    model = tiny_bert()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ENCODER in n}
    groups = shared_input_groups(model, linears, batches(1)[0])
    assert groups == [[f"{ENCODER}.{i}.attention.self.{p}" for p in ("query", "key", "value")] for i in range(2)]


def test_auto_scales_per_channel_only_for_outlier_rows_and_shares_query_key_value_scale():
    from slimtune.quantize.granularity import choose_weight_scales

    model = tiny_bert()
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight[5] *= 40  # BERT's outlier-dimension pattern
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ENCODER in n}
    chosen = choose_weight_scales(model, linears, batches(1)[0], ratio=10)
    per_channel = [n for n, c in chosen.items() if not c["per_tensor"]]
    assert per_channel == [f"{ENCODER}.1.output.dense"]
    assert chosen[f"{ENCODER}.0.attention.self.value"]["scale_group"] == f"{ENCODER}.0.attention.self.query"
    assert chosen[f"{ENCODER}.0.intermediate.dense"]["scale_group"] is None
    specs = {n: layer_spec(activations="dynamic", per_tensor=c["per_tensor"], scale_group=c["scale_group"])
             for n, c in chosen.items()}
    weights = {n: m.weight.detach().clone() for n, m in linears.items()}
    quantize_(model, specs)
    group = [f"{ENCODER}.0.attention.self.{p}" for p in ("query", "key", "value")]
    # the shared scale is the per-tensor scale of the three matrices stacked: the largest |w| / 127
    want = torch.cat([weights[n] for n in group]).abs().max() / 127
    for n in group:
        layer = model.get_submodule(n)
        assert torch.allclose(layer.scale, want.expand_as(layer.scale))
        assert torch.equal(layer.qweight, torch.round(weights[n] / want).to(torch.int8))
    outlier = model.get_submodule(f"{ENCODER}.1.output.dense")
    assert len(set(outlier.scale.flatten().tolist())) > 1


def test_scale_group_needs_per_tensor():
    model = tiny_bert()
    with pytest.raises(SlimtuneError, match="scale_group needs per_tensor"):
        quantize_(model, {f"{ENCODER}.0.attention.self.query": layer_spec(scale_group="g")})
