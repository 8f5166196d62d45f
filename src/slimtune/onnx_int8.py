"""ONNX Runtime int8 for an exported float graph: which nodes to quantize, dynamic and static graphs.

The scope follows the torch model: a plain model gets every weight matmul quantized; a
slimtune-quantized one gets exactly its quantized layers, with its own weight codes and (static)
its own activation scales, so the deployed graph computes what the torch simulation computed.
Static int8 builds several candidate graphs; the caller's `speed` and `parity` choose among them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from torch import nn

from slimtune import onnx_graph
from slimtune.errors import SlimtuneError
from slimtune.graph_model import onnx_feed


def quantization_scope(model: nn.Module, plain: nn.Module, graph: Path) -> dict:
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
        return {"exclude": [], "gather": True, "overrides": {}, "per_channel": True, "codes": {}, "qdq": True,
                "tables": {}}
    digests = {}
    for name, node in nodes.items():
        w = numpy_helper.to_array(weights[next(i for i in node.input if i in weights)])
        digests[onnx_graph.weight_key(w.T if node.op_type == "MatMul" else w)] = name
    linears = [layer for layer, entry in spec.items() if entry.get("kind", "linear") == "linear"]
    # int8 runs: exactly the layers whose activations torch quantizes (their weight-only pooler stays
    # float, as in torch). A weight-only model (mixed, ternary, ...) is served int8 by all its quantized
    # layers: ORT then quantizes activations that torch keeps float, which the parity check measures.
    served = [layer for layer in linears if spec[layer].get("activations")] or linears
    keep, overrides, codes = set(), {}, {}
    for layer in served:
        w = plain.get_submodule(layer).weight.detach().numpy()
        node = digests.get(onnx_graph.weight_key(w))
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
    # The embedding tables are not ORT's to quantize: their values already sit on slimtune's int8 grid, and
    # ORT's own Gather quantization would round them a second time (onto a grid with its own zero point
    # rounding), which moved 2 of 872 SST-2 predictions away from the torch model's. Their own codes go in
    # instead (`tables`, read by GatherBlockQuantized): the same values, a quarter of the bytes.
    # The dynamic quantizer first rewrites each Gemm into MatMul "<name>_MatMul" + Add: exclude both
    # names, or the float pooler and classifier come out int8
    exclude = set(nodes) - keep
    exclude |= {f"{name}_MatMul" for name in exclude if nodes[name].op_type == "Gemm"}
    per_tensor = [bool(spec[layer].get("per_tensor")) for layer in served]
    # ORT's static QDQ quantizer writes its own weight codes, with one granularity for the whole graph
    qdq_exact = len(set(per_tensor)) <= 1 and not any(spec[layer].get("scale_group") for layer in served)
    return {"exclude": sorted(exclude), "gather": False, "overrides": overrides,
            "per_channel": not (per_tensor and all(per_tensor)), "codes": codes, "qdq": qdq_exact,
            "tables": table_codes(model, plain, g, spec)}


def table_codes(model: nn.Module, plain: nn.Module, g, spec: dict) -> dict:
    """Graph table name -> (int8 codes, per-row scale, integer zero point or None) of each quantized embedding
    whose codes fit GatherBlockQuantized: 8 bits or fewer, one scale per row, an integer zero point."""
    from onnx import numpy_helper

    gathered = {n.input[0] for n in g.node if n.op_type == "Gather"}
    by_digest = {onnx_graph.weight_key(numpy_helper.to_array(init)): init.name
                 for init in g.initializer if init.name in gathered}
    tables = {}
    for layer, entry in spec.items():
        module = model.get_submodule(layer)
        if entry.get("kind") != "embedding" or not hasattr(module, "qweight") or entry.get("bits", 8) > 8:
            continue
        name = by_digest.get(onnx_graph.weight_key(plain.get_submodule(layer).weight.detach().numpy()))
        scale = module.scale.detach().numpy()
        zero = None if module.zero_point is None else module.zero_point.detach().numpy()
        if name is None or scale.shape[-1] != 1 or (zero is not None and not np.array_equal(zero, np.round(zero))):
            continue
        tables[name] = (module.qweight.detach().numpy().astype(np.int8), scale[:, 0],
                        None if zero is None else zero[:, 0].astype(np.int16))
    return tables


def _onnx_codes(layer: nn.Module, spec: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A quantized Linear's codes as ONNX MatMul reads them ([in, out]), its scale and zero point: one
    value for a per-tensor layer, one per output column otherwise."""
    q = layer.qweight.detach().numpy().T
    scale = layer.scale.detach().numpy()[:, 0]
    zero = None if layer.zero_point is None else layer.zero_point.detach().numpy()[:, 0]
    if spec.get("per_tensor"):
        scale, zero = scale[:1].reshape(()), None if zero is None else zero[:1].reshape(())
    return q, scale, zero


def quantize_graph(graph: Path, work: Path, mode: str, scope: dict, batches: list[dict],
                   speed: Callable[[Path], float], parity: Callable[[Path], dict]) -> tuple[Path, str, dict]:
    """(graph, what was done, its parity report) of the unfused fp32 `graph`. Static int8 builds its
    candidate graphs and keeps the fastest one that passes the parity check (else the most accurate,
    which then fails the check)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    if mode == "dynamic":
        dynamic = _with_tables(_dynamic_graph(graph, work / "int8-dynamic.onnx", scope), scope)
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
        with _without_preprocessing_hint():
            quantize_static(str(graph), str(dest), _CalibrationReader(graph, batches), quant_format=fmt,
                            per_channel=scope["per_channel"], activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul", "Gemm"],
                            nodes_to_exclude=excluded, extra_options=options)
        if fmt == QuantFormat.QDQ:
            onnx_graph.float_skip_inputs(dest)
        candidates[name] = dest
    candidates = {k: _with_tables(dest, scope) for k, dest in candidates.items()}
    checked = {k: (dest, speed(dest), parity(dest)) for k, dest in candidates.items()}
    passing = [k for k, v in checked.items() if v[2]["parity"] != "fail"]  # "unchecked": nothing to judge by
    best = (min(passing, key=lambda k: checked[k][1]) if passing else
            min(checked, key=lambda k: checked[k][2]["drop_pt"]))
    notes = "; ".join(f"{k} {v[1]:.0f} ms, {v[2]['parity']}" for k, v in checked.items())
    return checked[best][0], f"static {best} (sample: {notes})", checked[best][2]


@contextlib.contextmanager
def _without_preprocessing_hint() -> Iterator[None]:
    """ONNX Runtime's quantizers log "Please consider to run pre-processing before quantization" (with
    a link to an image-classification example) on every call. Its pre-processing runs symbolic shape
    inference and ORT's graph optimizer first; slimtune's graph already carries torch's shapes, and it
    quantizes the unfused graph on purpose (see `export_onnx`), so the hint does not apply here."""
    def drop_hint(record: logging.LogRecord) -> bool:
        return "pre-processing before quantization" not in record.getMessage()

    root = logging.getLogger()  # ORT logs through the root logger
    root.addFilter(drop_hint)
    try:
        yield
    finally:
        root.removeFilter(drop_hint)


def _with_tables(graph: Path, scope: dict) -> Path:
    """`graph` with the torch model's int8 embedding codes in place of its float tables (when it has any)."""
    if scope["tables"]:
        model = onnx_graph.load(graph)
        if onnx_graph.quantized_gathers_(model, scope["tables"]):
            onnx_graph.save(model, graph)
    return graph


def _dynamic_graph(graph: Path, dest: Path, scope: dict) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    ops = ["MatMul", "Gemm"] + (["Gather"] if scope["gather"] else [])
    # MatMulConstBOnly: only weight matmuls, as slimtune's torch simulation (not the attention ones)
    with _without_preprocessing_hint():
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
