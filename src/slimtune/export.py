"""`slimtune export MODEL_DIR --format onnx [--quantize dynamic|static] --out DIR`.

OUT holds `model.onnx` (dynamic batch and sequence axes), the tokenizer files and config.json, so
onnxruntime + tokenizers alone can serve it, plus `export.json` saying what was done and measured.

What the export does, in order, each step measured rather than assumed:
1. torch -> ONNX (TorchScript exporter, opset 17: the dynamo exporter's graphs lack the value_info
   ONNX Runtime's quantizer needs). Quantized slimtune models are exported dequantized: their weights
   already sit on the int8 grid, so ONNX Runtime's own per-channel quantization finds the same codes.
2. ONNX Runtime's transformer optimizer (attention / LayerNorm / GELU fusion) — kept only if it is
   faster on a sample here; it needs uniform heads, so per-layer head counts skip it.
3. Optional int8: `dynamic` (weights int8 per channel, activations quantized per call) or `static`
   (activation ranges calibrated on sample batches; QDQ and integer-operator graphs are both built and
   the faster one kept).
4. A parity check on a sample: fp32 max |logit difference| vs torch <= 1e-4; int8 accuracy within
   0.5 pt of the torch model (with --data) or argmax agreement (without labels).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune import onnx_graph
from slimtune.batching import EncodedDataset, batch_indices, collate
from slimtune.errors import SlimtuneError
from slimtune.evaluate import batched_logits, predict_logits, time_forward
from slimtune.io import atomic_dir, atomic_write_text, check_output_path
from slimtune.models import (
    load_model,
    load_tokenizer,
    preprocessing_of,
    read_config,
    resolve_model_path,
)
from slimtune.quantize.core import dequantize_
from slimtune.tasks import task_of_model

FP32_TOLERANCE = 1e-4
INT8_TOLERANCE_PT = 0.5


# ------------------------------------------------------------------------------- ONNX Runtime model
class OnnxClassifier:
    """An exported model run by ONNX Runtime: feeds what the graph declares, returns logits."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        self.path = Path(path)
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.session.run(["logits"], onnx_feed(batch, self.inputs))[0]

    def predict_logits(self, ds: EncodedDataset, pad_id: int, batch_size: int = 64) -> np.ndarray:
        return batched_logits(self, ds, batch_size, pad_id)


def onnx_feed(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """The graph inputs `names` as int64 arrays; single-text tasks carry no token types: segment 0
    everywhere, as the tokenizer would give."""
    ids = batch["input_ids"]
    return {name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy().astype(np.int64)
            for name in names}


# ----------------------------------------------------------------------------------------- export
def export_onnx(model_dir: str | Path, out: str | Path, *, quantize: str | None = None, data: Path | None = None,
                optimize: bool = True, sample_size: int = 256, calibration_batches: int = 8,
                threads: int | None = None, overwrite: bool = False, sample: EncodedDataset | None = None,
                model: nn.Module | None = None, calibration: list[dict] | None = None) -> dict:
    """Export a model directory to OUT (see the module docstring); returns the export report.

    `sample` (labelled, already encoded) replaces --data for the parity check and calibration; `model`
    is the in-memory model of `model_dir` when the caller has it (the runner), else it is loaded;
    `calibration` (collated batches) replaces the sample's first batches for static calibration."""
    if quantize not in (None, "dynamic", "static"):
        raise SlimtuneError(f"--quantize {quantize!r}: expected dynamic or static")
    path = resolve_model_path(model_dir)
    config = read_config(path)
    if config.get("slimtune_format") == "word-classifier":
        raise SlimtuneError(f"{path}: word-level BiLSTM/CNN classifiers are not exportable to ONNX (their packed "
                            "LSTM sequences have no ONNX equivalent); they run in torch")
    out = check_output_path(Path(out).expanduser().resolve(), kind="directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SlimtuneError(f"{out}: output directory exists and is not empty (use --overwrite to replace it)")
    if quantize == "static" and data is None and sample is None:
        raise SlimtuneError("--quantize static needs --data FILE: its activation ranges are calibrated on your text")
    model = load_model(path) if model is None else model
    tokenizer = load_tokenizer(path)
    check_consistent_config(model, path)
    if sample is not None:
        labelled = True
    else:
        sample, labelled = _sample(path, model, tokenizer, data, sample_size)
    pad = int(tokenizer.pad_token_id or 0)
    plain = plain_float_model(model)
    report: dict = {"source": str(path), "quantize": quantize, "sample_size": len(sample), "labelled": labelled}
    with tempfile.TemporaryDirectory() as work_dir, atomic_dir(out) as tmp:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        torch_to_onnx(plain, fp32, with_token_types="token_type_ids" in _input_names(tokenizer))
        report["fp32_max_abs_diff"] = _max_abs_diff(plain, OnnxClassifier(fp32, threads), sample, pad)
        if report["fp32_max_abs_diff"] > FP32_TOLERANCE:
            raise SlimtuneError(f"{path}: ONNX fp32 parity failed: max |logit diff| "
                                f"{report['fp32_max_abs_diff']:.2e} > {FP32_TOLERANCE:g}")
        # int8 quantizes the unfused graph: ORT's fused attention ops stay float, which made a fused
        # dynamic-int8 MiniLM 0.66x as fast as the unfused one here
        graph, report["fusion"] = (_maybe_fuse(plain, fp32, work, sample, pad, threads) if optimize and not quantize
                                   else (fp32, "not applied before int8" if quantize else "off"))
        if optimize:
            graph, report["static_reshapes"] = _static_reshapes(plain, graph, work / "static.onnx", sample, pad)
        if quantize:
            scope = _quantization_scope(model, plain, graph)
            batches = calibration or _sample_batches(sample, pad, calibration_batches)
            parity = lambda g: _int8_parity(model, OnnxClassifier(g, threads), sample, pad, labelled)  # noqa: E731
            graph, report["int8_format"], checked = _quantize(graph, work, quantize, scope, batches, sample, pad,
                                                              threads, parity=parity)
            report.update(checked)
            if report["parity"] == "fail":
                raise SlimtuneError(f"{path}: int8 ONNX parity failed ({report['parity_detail']})")
        else:
            report["parity"] = "pass"
        shutil.copyfile(graph, tmp / "model.onnx")
        tokenizer.save_pretrained(tmp)
        plain.config.save_pretrained(tmp)  # an HF config (labels, sizes): tooling that reads it needs no slimtune
        report["size_mb"] = round((tmp / "model.onnx").stat().st_size / 1e6, 3)
        atomic_write_text(tmp / "export.json", json.dumps(report, indent=2))
    return report


def int8_activations(model: nn.Module) -> str | None:
    """'dynamic' / 'static' when the model's quantized layers quantize their activations: such a model
    deploys as an ONNX Runtime int8 graph."""
    spec = getattr(getattr(model, "config", None), "slimtune_quantization", None) or {}
    modes = {layer.get("activations") for layer in spec.get("layers", {}).values()} - {None}
    return "static" if "static" in modes else modes.pop() if modes else None


def check_consistent_config(model: nn.Module, path: Path) -> None:
    """A config that disagrees with the weights would export a graph that lies about its model."""
    cfg = getattr(model, "config", None)
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if cfg is None or layers is None:
        raise SlimtuneError(f"{path}: not a transformer encoder classifier (no config / encoder layers)")
    if cfg.num_hidden_layers != len(layers):
        raise SlimtuneError(f"{path}/config.json: num_hidden_layers is {cfg.num_hidden_layers} but the model has "
                            f"{len(layers)} layers")
    n_labels = len(cfg.id2label)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if head.out_features != n_labels:
        raise SlimtuneError(f"{path}/config.json: id2label has {n_labels} labels but the classifier outputs "
                            f"{head.out_features}")


def plain_float_model(model: nn.Module) -> nn.Module:
    """A deep copy with quantized modules replaced by float ones holding the dequantized weights."""
    plain = copy.deepcopy(model).eval()
    if getattr(plain.config, "slimtune_quantization", None):
        dequantize_(plain)
    if hasattr(plain, "set_attn_implementation"):
        plain.set_attn_implementation("eager")  # sdpa's masking paths do not trace to dynamic shapes
    return plain


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def torch_to_onnx(model: nn.Module, dest: Path, with_token_types: bool) -> None:
    import warnings

    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    example = tuple(torch.ones(2, 8, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 8, dtype=torch.long)
                    for n in names)
    outputs = task_of_model(model.config).onnx_outputs()
    axes = {n: {0: "batch", 1: "sequence"} for n in names} | {o: {0: "batch"} for o in outputs}
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore")  # TracerWarnings about python bools in masking code: harmless here
        torch.onnx.export(_LogitsOnly(model), example, str(dest), input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=17, dynamo=False, do_constant_folding=True)


def _input_names(tokenizer) -> list[str]:
    return list(getattr(tokenizer, "model_input_names", ["input_ids", "attention_mask"]))


def _sample(path: Path, model: nn.Module, tokenizer, data: Path | None, size: int) -> tuple[EncodedDataset, bool]:
    """The parity / calibration sample: the first `size` rows of --data, else sentences made of random
    vocabulary tokens (enough for logit parity, not for accuracy)."""
    if data is not None:
        ds = task_of_model(model.config).eval_dataset(Path(data), tokenizer, model.config, preprocessing_of(path))
        return ds.subset(range(min(size, len(ds)))), True
    gen = torch.Generator().manual_seed(0)
    specials = set(tokenizer.all_special_ids)
    vocab = [i for i in range(min(len(tokenizer), 30000)) if i not in specials]
    ids = []
    for n in torch.randint(4, 40, (size,), generator=gen).tolist():
        words = [vocab[j] for j in torch.randint(0, len(vocab), (n,), generator=gen).tolist()]
        ids.append([t for t in (tokenizer.cls_token_id,) if t is not None] + words
                   + [t for t in (tokenizer.sep_token_id,) if t is not None])
    return EncodedDataset(input_ids=ids, labels=[0] * size), False


def _max_abs_diff(model: nn.Module, clf: OnnxClassifier, ds: EncodedDataset, pad: int) -> float:
    return float(np.abs(predict_logits(model, ds, pad_id=pad) - clf.predict_logits(ds, pad)).max())


def _int8_parity(model: nn.Module, clf: OnnxClassifier, ds: EncodedDataset, pad: int, labelled: bool) -> dict:
    torch_pred = predict_logits(model, ds, pad_id=pad).argmax(-1)
    onnx_pred = clf.predict_logits(ds, pad).argmax(-1)
    if labelled:
        labels = np.asarray(ds.labels)
        acc_t, acc_o = float((torch_pred == labels).mean()), float((onnx_pred == labels).mean())
        drop = 100 * (acc_t - acc_o)
        return {"torch_accuracy": acc_t, "onnx_accuracy": acc_o, "parity": "pass" if drop <= INT8_TOLERANCE_PT
                else "fail", "parity_detail": f"accuracy {acc_o:.4f} vs torch {acc_t:.4f} ({drop:+.2f} pt drop, "
                                              f"tolerance {INT8_TOLERANCE_PT} pt)"}
    agree = float((torch_pred == onnx_pred).mean())
    return {"argmax_agreement": agree, "parity": "pass" if agree >= 0.95 else "fail",
            "parity_detail": f"argmax agreement {agree:.3f} on unlabelled random text (pass --data for accuracy)"}


def _speed(path: Path, ds: EncodedDataset, pad: int, threads: int | None) -> float:
    """Sample cost (ms) of a graph: batch-32 time plus 32 x batch-1 latency, so neither regime is ignored."""
    s = time_forward(OnnxClassifier(path, threads), ds, pad, latency_runs=20, throughput_batches=4)
    return 32 * 1000 / s["throughput_eps"] + 32 * s["latency_ms_b1"]


def _attention_shape(model: nn.Module) -> tuple[int, int] | None:
    """(heads, attention width) when every layer has the same heads; None otherwise."""
    heads = {m.num_attention_heads for m in model.modules() if hasattr(m, "num_attention_heads")
             and hasattr(m, "attention_head_size")}
    if len(heads) != 1:
        return None
    layer = next(m for m in model.modules() if hasattr(m, "attention_head_size"))
    return heads.pop(), layer.num_attention_heads * layer.attention_head_size


def _maybe_fuse(model: nn.Module, fp32: Path, work: Path, ds: EncodedDataset, pad: int,
                threads: int | None) -> tuple[Path, str]:
    shape = _attention_shape(model)
    if shape is None:
        return fp32, "skipped (heads differ between layers)"
    if model.config.model_type not in ("bert", "slimtune_pruned_bert", "mpnet", "roberta", "distilbert"):
        return fp32, f"skipped (no fusion rules for {model.config.model_type})"
    from onnxruntime.transformers.optimizer import optimize_model

    fused = work / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=shape[0], hidden_size=shape[1]).save_model_to_file(
        str(fused))
    if _max_abs_diff(model, OnnxClassifier(fused), ds, pad) > FP32_TOLERANCE:
        return fp32, "rejected (fused graph outside the parity tolerance)"
    plain_ms, fused_ms = _speed(fp32, ds, pad, threads), _speed(fused, ds, pad, threads)
    if fused_ms < plain_ms:
        return fused, f"kept ({plain_ms / fused_ms:.2f}x faster on the sample)"
    return fp32, f"dropped (fused {fused_ms:.0f} ms vs {plain_ms:.0f} ms unfused on the sample)"


def _static_reshapes(model: nn.Module, graph: Path, dest: Path, ds: EncodedDataset, pad: int) -> tuple[Path, int]:
    """`graph` with constant reshape targets (see slimtune.onnx_graph), kept if its logits still match."""
    g = onnx_graph.load(graph)
    n = onnx_graph.static_reshapes_(g)
    if not n:
        return graph, 0
    onnx_graph.save(g, dest)
    if _max_abs_diff(model, OnnxClassifier(dest), ds, pad) > FP32_TOLERANCE:
        return graph, 0
    return dest, n


def _quantization_scope(model: nn.Module, plain: nn.Module, graph: Path) -> dict:
    """Which graph nodes ONNX Runtime may quantize. A plain model: every weight matmul and the embedding.
    A slimtune-quantized model: exactly its quantized layers (found by their weights, which the float
    export carries unchanged), so the deployed graph computes what the torch simulation computed."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(graph), load_external_data=False).graph
    weights = {init.name: init for init in g.initializer}
    nodes = {n.name: n for n in g.node if n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input)}
    spec = (getattr(model.config, "slimtune_quantization", None) or {}).get("layers", {})
    if not spec:
        return {"exclude": [], "gather": True, "overrides": {}, "per_channel": True, "codes": {}, "qdq": True}
    digests = {}
    for name, node in nodes.items():
        w = numpy_helper.to_array(weights[next(i for i in node.input if i in weights)])
        digests[hash(np.ascontiguousarray(w.T if node.op_type == "MatMul" else w).tobytes())] = name
    linears = [layer for layer, entry in spec.items() if entry.get("kind", "linear") == "linear"]
    # int8 runs: exactly the layers whose activations torch quantizes (their weight-only pooler stays
    # float, as in torch). A weight-only model (mixed, ternary, ...) is served int8 by all its quantized
    # layers: ORT then quantizes activations that torch keeps float, which the parity check measures.
    served = [layer for layer in linears if spec[layer].get("activations")] or linears
    keep, overrides, codes = set(), {}, {}
    for layer in served:
        w = plain.get_submodule(layer).weight.detach().numpy()
        node = digests.get(hash(np.ascontiguousarray(w).tobytes()))
        keep.add(node)
        quantized = model.get_submodule(layer)
        if node is not None and nodes[node].op_type == "MatMul" and hasattr(quantized, "qweight"):
            codes[next(i for i in nodes[node].input if i in weights)] = _onnx_codes(quantized, spec[layer])
        if node is not None and getattr(quantized, "act_scale", None) is not None:
            # static: ORT takes torch's calibrated scale / zero point instead of calibrating its own
            # (its float graph sees other ranges than torch's already-int8 layers did)
            activation = next(i for i in nodes[node].input if i not in weights)
            overrides[activation] = [{"scale": np.array(quantized.act_scale.item(), dtype=np.float32),
                                      "zero_point": np.array(quantized.act_zero_point.item(), dtype=np.uint8)}]
    # The embedding tables stay float: their values already sit on slimtune's int8 grid, and ORT's own
    # Gather quantization would round them a second time (onto a grid with its own zero point rounding),
    # which moved 2 of 872 SST-2 predictions away from the torch model's. The cost is file size only.
    # The dynamic quantizer first rewrites each Gemm into MatMul "<name>_MatMul" + Add: exclude both
    # names, or the float pooler and classifier come out int8
    exclude = set(nodes) - keep
    exclude |= {f"{name}_MatMul" for name in exclude if nodes[name].op_type == "Gemm"}
    per_tensor = [bool(spec[layer].get("per_tensor")) for layer in served]
    # ORT's static QDQ quantizer writes its own weight codes, with one granularity for the whole graph
    qdq_exact = len(set(per_tensor)) <= 1 and not any(spec[layer].get("scale_group") for layer in served)
    return {"exclude": sorted(exclude), "gather": False, "overrides": overrides,
            "per_channel": not (per_tensor and all(per_tensor)), "codes": codes, "qdq": qdq_exact}


def _onnx_codes(layer: nn.Module, spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A quantized Linear's codes as ONNX MatMul reads them ([in, out]), its scale and zero point: one
    value for a per-tensor layer, one per output column otherwise."""
    q = layer.qweight.detach().numpy().T
    scale = layer.scale.detach().numpy()[:, 0]
    zero = None if layer.zero_point is None else layer.zero_point.detach().numpy()[:, 0]
    if spec.get("per_tensor"):
        scale, zero = scale[:1].reshape(()), None if zero is None else zero[:1].reshape(())
    return q, scale, zero


def _sample_batches(ds: EncodedDataset, pad: int, n_batches: int) -> list[dict]:
    order = batch_indices(ds.lengths, 16, shuffle=True, seed=0)[:n_batches]
    if not order:
        raise SlimtuneError("--quantize static: the calibration sample is empty")
    return [collate(ds, idx, pad, with_labels=False) for idx in order]


def _quantize(graph: Path, work: Path, mode: str, scope: dict, batches: list[dict], ds: EncodedDataset,
              pad: int, threads: int | None, parity) -> tuple[Path, str, dict]:
    """(graph, what was done, its parity report) of the unfused fp32 `graph`. Static int8 builds its
    candidate graphs and keeps the fastest one that passes the parity check (else the most accurate,
    which then fails the check)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if mode == "dynamic":
        dynamic = _dynamic_graph(graph, work / "int8-dynamic.onnx", scope)
        return dynamic, "dynamic (integer ops)", parity(dynamic)
    candidates = {}
    dynamic = scope["overrides"] and _dynamic_graph(graph, work / "int8-dynamic.onnx", scope)
    if dynamic and onnx_graph.fixed_scale_graph(dynamic, work / "int8-static-integer.onnx", scope["overrides"]):
        candidates["integer ops"] = work / "int8-static-integer.onnx"
    # Static ranges only for the inputs of weight matmuls (what slimtune's static_int8 simulates in
    # torch): quantizing softmax outputs, attention score matmuls and residual adds with calibrated
    # min/max ranges cost 6.6 pt of SST-2 accuracy on MiniLM here. ORT's integer-operator format must
    # requantize every matmul's output to uint8 (QLinearMatMul); the QDQ graph can keep outputs float.
    excluded = onnx_graph.activation_matmuls(graph) + scope["exclude"]
    common = {"TensorQuantOverrides": scope["overrides"]} if scope["overrides"] else {}
    formats = ({"QDQ": (QuantFormat.QDQ, common | {"OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"]})}
               if scope["qdq"] or not candidates else {})
    if not candidates:  # a plain model: no torch scales, ORT calibrates (and may requantize outputs)
        formats["QOperator"] = (QuantFormat.QOperator, common)
    for name, (fmt, options) in formats.items():
        dest = work / f"int8-static-{name}.onnx"
        quantize_static(str(graph), str(dest), _CalibrationReader(graph, batches), quant_format=fmt,
                        per_channel=scope["per_channel"], activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=excluded,
                        extra_options=options)
        if fmt == QuantFormat.QDQ:
            onnx_graph.float_skip_inputs(dest)
        candidates[name] = dest
    checked = {k: (dest, _speed(dest, ds, pad, threads), parity(dest)) for k, dest in candidates.items()}
    passing = [k for k, v in checked.items() if v[2]["parity"] == "pass"]
    best = (min(passing, key=lambda k: checked[k][1]) if passing else
            max(checked, key=lambda k: checked[k][2].get("onnx_accuracy", checked[k][2].get(
                "argmax_agreement", 0))))
    notes = "; ".join(f"{k} {v[1]:.0f} ms, {v[2]['parity']}" for k, v in checked.items())
    return checked[best][0], f"static {best} (sample: {notes})", checked[best][2]


def _dynamic_graph(graph: Path, dest: Path, scope: dict) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Gather"] if scope["gather"] else [])
    # MatMulConstBOnly: only weight matmuls, as slimtune's torch simulation (not the attention ones)
    quantize_dynamic(str(graph), str(dest), per_channel=scope["per_channel"], weight_type=QuantType.QInt8,
                     op_types_to_quantize=ops,
                     nodes_to_exclude=scope["exclude"], extra_options={"MatMulConstBOnly": True})
    if scope["codes"]:
        # ORT quantizes every weight with one granularity; the torch model may mix per-channel,
        # per-tensor and shared scales: its own codes make the graph compute exactly what it does
        model = onnx_graph.load(dest)
        missing = onnx_graph.write_weight_codes_(model, scope["codes"])
        if missing:
            raise SlimtuneError(f"ONNX export: no int8 weight found in the quantized graph for {missing[:3]}")
        onnx_graph.fuse_shared_input_matmuls_(model)
        onnx_graph.save(model, dest)
    return dest


class _CalibrationReader:
    """Feeds collated batches to ONNX Runtime's calibrator (as int64 arrays of the graph's inputs)."""

    def __init__(self, graph: Path, batches: list[dict]):
        import onnxruntime as ort

        names = [i.name for i in ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"]).get_inputs()]
        self.feeds = iter([onnx_feed(b, names) for b in batches])

    def get_next(self):
        return next(self.feeds, None)
