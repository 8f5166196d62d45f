"""A causal LM's `export --quantize int8|int4`: MatMulNBits weights, written from a quantized model's own codes
(or rounded to nearest for a float model), held to a perplexity rise against torch measured on real text."""

import json

import numpy as np
import onnx
import pytest
import torch
from helpers import slimtune as slimtune_cli

import slimtune
from slimtune.errors import SlimtuneError
from slimtune.export import export_onnx
from slimtune.onnx_nbits import nbits_nodes, nbits_tensors
from slimtune.quantize.codes import dequantize_codes, quantize_codes


def _run_node(x: np.ndarray, tensors: dict, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """One MatMulNBits node alone in ONNX Runtime, fp32 arithmetic (accuracy_level 0): the layout only."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes, inits = nbits_nodes("x", "y", "w", tensors, k, n, bits, block, accuracy_level=0)
    graph = helper.make_graph(nodes, "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, ir_version=8, opset_imports=[helper.make_opsetid("", 17),
                                                                  helper.make_opsetid("com.microsoft", 1)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(["y"], {"x": x})[0]


@pytest.mark.parametrize(("bits", "scheme", "group", "k"), [
    (4, "asymmetric", 32, 96), (4, "symmetric", 64, 128), (4, "asymmetric_float", 32, 64),
    (8, "asymmetric", 32, 96), (8, "symmetric", None, 48),  # per channel: one scale over 48 -> blocks of 16
    (4, "asymmetric", 48, 96),  # a group that is no power of two: blocks of 16 repeat its scale
])
def test_the_node_computes_the_dequantized_weights(bits, scheme, group, k):
    gen = torch.Generator().manual_seed(0)
    n = 24
    weight = torch.randn(n, k, generator=gen)
    codes, scale, zero = quantize_codes(weight, bits, scheme, group)
    block, tensors = nbits_tensors(codes, scale, zero, bits, group or k)
    assert block in (16, 32, 64) and tensors["B"].dtype == np.uint8
    assert ("zero_points" in tensors) == (scheme == "asymmetric")
    assert ("zero_shift" in tensors) == (scheme == "asymmetric_float")  # the fast path: a correction beside it
    x = torch.randn(5, k, generator=gen)
    want = (x @ dequantize_codes(codes, scale, zero).T).numpy()
    assert np.abs(_run_node(x.numpy(), tensors, k, n, bits, block) - want).max() < 1e-4


@pytest.fixture(scope="module")
def gptq_int4(tiny_llama_dir, text_files, tmp_path_factory):
    """The tiny Llama after slimtune's GPTQ int4 (groups of 32, integer zero points) and an int8 head."""
    out = tmp_path_factory.mktemp("gptq") / "run"
    recipe = {"task": "causal-lm", "model": str(tiny_llama_dir),
              "data": {"train": str(text_files / "train.txt"), "eval": str(text_files / "eval.txt"),
                       "block_size": 32},
              "stages": [{"stage": "quantize", "method": "weight_only", "head": True, "bits": 4, "group_size": 32,
                          "algorithm": "gptq", "symmetric": False, "head_bits": 8, "calibration_batches": 2,
                          "calibration_batch_size": 4}]}
    slimtune.run(recipe, out, progress=False)
    return out / "model"


def test_a_quantized_model_exports_its_own_codes(gptq_int4, tmp_path):
    model = slimtune.load_model(gptq_int4)
    report = export_onnx(gptq_int4, tmp_path / "onnx", quantize="int4")  # measured on its run's eval text
    layers = {name for name, m in model.named_modules() if type(m).__name__ == "QuantizedLinear"}
    assert set(report["nbits"]["own_codes"]) == layers and not report["nbits"]["rounded"]
    assert report["nbits"]["bits"]["lm_head"] == "int8, blocks of 32"
    assert report["nbits"]["bits"]["model.layers.0.mlp.down_proj"] == "int4, blocks of 32"
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("MatMulNBits") == len(layers)
    constants = {t.name for t in graph.initializer}
    assert not [node for node in graph.node if node.op_type == "MatMul" and node.input[1] in constants]
    # the same weights as torch's: only ORT's int8 activations move the perplexity
    assert report["parity"] == "pass" and report["tokens"] > 100
    assert abs(report["rise_pct"]) < 2 and report["onnx_perplexity"] == pytest.approx(report["torch_perplexity"],
                                                                                      rel=0.02)
    assert "eval.txt" in report["parity_detail"] and report["int_greedy"]["prompts"] == 3
    assert json.loads((tmp_path / "onnx" / "export.json").read_text()) == report
    fp32 = export_onnx(gptq_int4, tmp_path / "fp32")
    assert report["size_mb"] < fp32["size_mb"] * 0.6  # the int8 head (the bulk here) and int4 layers


def test_a_float_model_is_rounded_and_checked_from_the_cli(tiny_llama_dir, text_files, tmp_path):
    proc = slimtune_cli("export", tiny_llama_dir, "--out", tmp_path / "onnx", "--quantize", "int8", "--data",
                        text_files / "eval.txt", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report["quantize"] == "int8" and not report["nbits"]["own_codes"] and len(report["nbits"]["rounded"]) == 15
    assert report["parity"] == "pass"
    assert "int8 weights: 0 layers with their own codes, 15 rounded here, 1 int8 embedding tables (1 rounded " \
           "here)" in proc.stderr
    assert "parity pass: perplexity" in proc.stderr
    # the float input-embedding table too: int8 rows, one scale each, read by GatherBlockQuantized
    graph = onnx.load(str(tmp_path / "onnx" / "model.onnx")).graph
    assert [n.op_type for n in graph.node].count("GatherBlockQuantized") == 1
    assert not [n for n in graph.node if n.op_type == "Gather" and n.input[0] in {t.name for t in graph.initializer}
                and len(next(t for t in graph.initializer if t.name == n.input[0]).dims) == 2
                and next(t for t in graph.initializer if t.name == n.input[0]).data_type == onnx.TensorProto.FLOAT]


def test_the_perplexity_policy_refuses_and_leaves_nothing(tiny_llama_dir, text_files, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SlimtuneError, match=r"the int4 graph misses the export policy: perplexity .* vs torch .*"
                                            r"max -1%.*try quantizing in a run first") as e:
        export_onnx(tiny_llama_dir, work / "onnx", quantize="int4", data=text_files / "eval.txt", max_drop=-1)
    assert "\n" not in str(e.value) and list(work.iterdir()) == []
    report = export_onnx(tiny_llama_dir, work / "onnx", quantize="int4", data=text_files / "eval.txt", max_drop=-1,
                         force=True)
    assert report["parity"] == "fail" and report["forced"]
    # without text: exported, and said to be unchecked
    proc = slimtune_cli("export", tiny_llama_dir, "--out", tmp_path / "plain", "--quantize", "int4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: int4 accuracy not measured: greedy generations differ" in proc.stderr
    proc = slimtune_cli("export", tiny_llama_dir, "--out", tmp_path / "x", "--quantize", "dynamic")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "error: --quantize dynamic: not available for a causal-lm model (its modes: int8, int4)")
    assert not (tmp_path / "x").exists()


def test_codes_onnx_runtime_cannot_carry_are_rounded_at_their_own_bits(tiny_llama_dir, text_files, tmp_path):
    """int4 layers with a float zero point go in as they are; the int8 head with one (ORT refuses a float zero
    point at 8 bits) is rounded again, at 8 bits, not at --quantize's 4."""
    recipe = {"task": "causal-lm", "model": str(tiny_llama_dir),
              "data": {"train": str(text_files / "train.txt"), "eval": str(text_files / "eval.txt"),
                       "block_size": 32},
              "stages": [{"stage": "quantize", "method": "weight_only", "head": True, "bits": 4, "group_size": 32,
                          "algorithm": "rtn", "symmetric": False, "zero_point": "float", "head_bits": 8,
                          "calibration_batches": 1, "calibration_batch_size": 4}]}
    slimtune.run(recipe, tmp_path / "run", progress=False)
    report = export_onnx(tmp_path / "run" / "model", tmp_path / "onnx", quantize="int4")
    assert report["nbits"]["rounded"] == ["lm_head"] and len(report["nbits"]["own_codes"]) == 14
    assert report["nbits"]["bits"]["lm_head"] == "int8, blocks of 32"
    assert report["parity"] == "pass" and abs(report["rise_pct"]) < 2
