"""Rewrites of an exported ONNX graph that make it cheaper to run and keep what it computes.

ONNX Runtime's own optimizer does not do these (measured on MiniLM, one 20-token sentence, 2 threads):

- `static_reshapes_`: the TorchScript exporter turns each `view(batch, seq, heads, dim)` into a chain
  Shape -> Gather -> Unsqueeze -> Concat that runs on every call; with the output shape known
  symbolically, the target becomes a constant using ONNX's 0 ("copy this dimension") and the chain
  goes (MiniLM: 26 of 27 reshapes, 37 fewer nodes after ORT's optimizer, ~2% at batch 1).
- `fuse_shared_input_matmuls_`: the query, key and value projections read the same int8 activation;
  one MatMulInteger over their concatenated weights, then a Split, replaces three (~5% at batch 1,
  where each small GEMM call costs more than its arithmetic). Exact: integer sums do not change when
  columns are concatenated; the weight scales must be one shared scalar or per-column vectors.
- `write_weight_codes_`: puts the torch model's own int8 codes and scales into the graph ONNX
  Runtime's quantizer wrote, so layers with per-tensor, shared or per-channel scales all compute
  what the torch simulation computes (ORT's quantizer has one granularity for the whole graph).
- `quantized_gathers_`: embedding tables stored as the torch model's own int8 codes, read by ORT's
  GatherBlockQuantized (dequantizes only the rows it gathers): the int8 file is as small as the int8
  weights (MiniLM: the fp32 word table alone is 47 MB of a 54 MB file).

And the rewrites of ORT's int8 graphs that make them compute what slimtune's torch simulation does
(`fixed_scale_graph`, `fused_integer_matmuls`, `float_skip_inputs`; see each).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

# ONNX Runtime's quantizer names a weight's int8 copy, scale and zero point by these suffixes
# (onnxruntime.quantization.quant_utils: TENSOR_NAME_QUANT_SUFFIX, ...)
QUANT_SUFFIXES = ("_quantized", "_scale", "_zero_point")


def weight_key(array: np.ndarray) -> int:
    """A key of a weight's values: a graph initializer and the torch tensor it was exported from (in the
    layout the graph holds) get the same key, which is how a node is matched to its module."""
    return hash(np.ascontiguousarray(array, dtype=np.float32).tobytes())


def load(path: Path):
    import onnx

    return onnx.load(str(path))


def save(model, path: Path) -> Path:
    import onnx

    drop_dead_nodes_(model)
    onnx.save(model, str(path))
    return path


def drop_dead_nodes_(model) -> int:
    """Remove nodes no graph output depends on, then initializers nothing reads; returns nodes removed."""
    g = model.graph
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    removed = len(g.node) - len(keep)
    del g.node[:]
    g.node.extend(reversed(keep))
    unused = [init for init in g.initializer if init.name not in needed]
    for init in unused:
        g.initializer.remove(init)
    return removed


def static_reshapes_(model) -> int:
    """Give every Reshape whose output shape is known in terms of its input's dimensions a constant
    target (0 = keep that input dimension, at most one -1); returns how many were rewritten."""
    from onnx import numpy_helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
        dims = vi.type.tensor_type.shape.dim
        shapes[vi.name] = [d.dim_param if d.HasField("dim_param") else
                           (d.dim_value if d.HasField("dim_value") else None) for d in dims]
    constants = {init.name for init in model.graph.initializer}
    rewritten = 0
    for node in model.graph.node:
        if node.op_type != "Reshape" or node.input[1] in constants:
            continue
        src, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if not src or not out or None in src or None in out:
            continue
        target = [d if isinstance(d, int) and d > 0 else 0 if j < len(src) and src[j] == d else -1
                  for j, d in enumerate(out)]
        if target.count(-1) > 1 or any(isinstance(d, int) and d <= 0 for d in out):
            continue
        name = f"{node.output[0]}_static_shape"
        model.graph.initializer.append(numpy_helper.from_array(np.array(target, dtype=np.int64), name))
        node.input[1] = name
        rewritten += 1
    return rewritten


def write_weight_codes_(model, codes: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> list[str]:
    """For each float weight name: its int8 codes [K, N] (as MatMul reads them), scale (scalar or [N])
    and zero point replace the ones the quantizer wrote. Returns the names it found no int8 copy of."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    missing = []
    for weight, (q, scale, zero) in codes.items():
        q_name, s_name, z_name = (weight + suffix for suffix in QUANT_SUFFIXES)
        if q_name not in inits or s_name not in inits:
            missing.append(weight)
            continue
        zero = np.zeros_like(scale, dtype=q.dtype) if zero is None else zero.astype(q.dtype)
        for name, value in ((q_name, q), (s_name, scale.astype(np.float32)), (z_name, zero)):
            if name in inits:
                inits[name].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(value), name))
    return missing


def gather_block_size(width: int) -> int | None:
    """The block GatherBlockQuantized reads a row in: a power of two from 16 to 256 dividing the width."""
    for block in (256, 128, 64, 32, 16):
        if width % block == 0:
            return block
    return None


def quantized_gathers_(model, tables: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None]]) -> list[str]:
    """Each Gather of a float table named in `tables` (name -> int8 codes [V, D], scale [V], integer zero
    point [V] or None; (codes - zero) * scale is the table) becomes a com.microsoft GatherBlockQuantized of
    uint8 codes (code + 128, zero point + 128) with the row's scale in every block: the same values, exactly.
    Returns the tables it rewrote."""
    from onnx import helper, numpy_helper

    g = model.graph
    done = []
    for node in list(g.node):
        if node.op_type != "Gather" or node.input[0] not in tables or \
                any(a.name == "axis" and a.i != 0 for a in node.attribute):
            continue
        codes, scale, zero = tables[node.input[0]]
        block = gather_block_size(codes.shape[1])
        if block is None:
            continue
        blocks = codes.shape[1] // block
        name = node.input[0]
        zero = np.zeros(len(codes), np.int16) if zero is None else zero.astype(np.int16)
        arrays = {name + "_quantized": (codes.astype(np.int16) + 128).astype(np.uint8),
                  name + "_scale": np.repeat(scale.astype(np.float32)[:, None], blocks, axis=1),
                  name + "_zero_point": np.repeat((zero + 128).astype(np.uint8)[:, None], blocks, axis=1)}
        g.initializer.extend(numpy_helper.from_array(np.ascontiguousarray(v), k) for k, v in arrays.items())
        replacement = helper.make_node("GatherBlockQuantized", [*arrays][:1] + [node.input[1], *[*arrays][1:]],
                                       list(node.output), name=node.name + "_int8", domain="com.microsoft", bits=8,
                                       block_size=block, gather_axis=0, quantize_axis=1)
        g.node.insert(list(g.node).index(node), replacement)
        g.node.remove(node)
        done.append(name)
    if done and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return done


def _node_index(nodes) -> tuple[dict[str, list], dict[str, object]]:
    """(readers: tensor -> the nodes reading it, producer: tensor -> the node writing it)."""
    readers, producer = defaultdict(list), {}
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
        for name in node.output:
            producer[name] = node
    return readers, producer


def _integer_matmul_tail(mm, readers: dict, producer: dict) -> tuple | None:
    """(cast, mul, scales, add or None) of ORT's dynamic-quantizer chain after a MatMulInteger:
    Cast -> Mul by (a_scale * b_scale, a Mul read by it alone) [-> Add(bias)], each node the only
    reader of the one before; None when the chain is not there."""
    def only_reader(name, op):
        r = readers.get(name, [])
        return r[0] if len(r) == 1 and r[0].op_type == op else None

    cast = only_reader(mm.output[0], "Cast")
    mul = cast and only_reader(cast.output[0], "Mul")
    if not mul:
        return None
    scales = producer.get(next(i for i in mul.input if i != cast.output[0]))
    if scales is None or scales.op_type != "Mul" or len(readers[scales.output[0]]) != 1:
        return None
    return cast, mul, scales, only_reader(mul.output[0], "Add")


def _integer_matmul_chains(model) -> dict[tuple, list[dict]]:
    """MatMulInteger -> Cast -> Mul(a_scale * b_scale) -> Add(bias) chains with constant weights, grouped
    by the int8 activation (and its scale and zero point) they read."""
    g = model.graph
    inits = {init.name for init in g.initializer}
    readers, producer = _node_index(g.node)

    def constant(name):
        """The initializer behind `name`, also through Identity nodes (the exporter writes one initializer
        for equal tensors, e.g. the all-zero biases of a fresh model, and Identity copies of it)."""
        node = producer.get(name)
        if node is not None and node.op_type == "Identity":
            name = node.input[0]
        return name if name in inits else None

    groups = defaultdict(list)
    for mm in g.node:
        if mm.op_type != "MatMulInteger" or len(mm.input) < 4 or mm.input[1] not in inits or mm.input[3] not in inits:
            continue
        tail = _integer_matmul_tail(mm, readers, producer)
        if tail is None or tail[3] is None:
            continue
        cast, mul, scales, add = tail
        b_scale = [i for i in scales.input if i in inits]
        a_scale = [i for i in scales.input if i not in inits]
        bias = [constant(i) for i in add.input if constant(i)]
        if len(b_scale) != 1 or len(a_scale) != 1 or len(bias) != 1:
            continue
        groups[(mm.input[0], mm.input[2], a_scale[0])].append(
            {"nodes": (mm, cast, mul, add, scales), "w": mm.input[1], "zp": mm.input[3], "scale": b_scale[0],
             "bias": bias[0], "out": add.output[0]})
    return groups


def fuse_shared_input_matmuls_(model) -> int:
    """One integer matmul + Split for each group of matmuls reading the same int8 activation, when their
    weight scales (and zero points) are one shared scalar or all per-column; returns groups fused."""
    from onnx import helper, numpy_helper

    g = model.graph
    values = {init.name: init for init in g.initializer}
    array = lambda name: numpy_helper.to_array(values[name])  # noqa: E731
    replaced, removed, fused = {}, set(), 0
    for (a, a_zp, a_scale), chain in _integer_matmul_chains(model).items():
        if len(chain) < 2:
            continue
        scales, zps = [array(c["scale"]) for c in chain], [array(c["zp"]) for c in chain]
        weights = [array(c["w"]) for c in chain]
        scalar = all(s.size == 1 for s in scales + zps)
        if scalar and not (all(s.item() == scales[0].item() for s in scales)
                           and all(z.item() == zps[0].item() for z in zps)):
            continue  # different per-tensor scales would need a per-column vector: slower at batch 1
        if not scalar and not all(s.size == w.shape[1] and z.size == w.shape[1]
                                  for s, z, w in zip(scales, zps, weights, strict=True)):
            continue
        base = f"{chain[0]['nodes'][0].name}_shared_input{fused}"
        fused_values = {
            "_w": np.concatenate(weights, axis=1),
            "_zp": zps[0] if scalar else np.concatenate(zps),
            "_scale": scales[0] if scalar else np.concatenate(scales),
            "_bias": np.concatenate([array(c["bias"]) for c in chain]),
            "_split": np.array([w.shape[1] for w in weights], dtype=np.int64)}
        for suffix, value in fused_values.items():
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value), base + suffix))
        # the same op chain ORT's quantizer writes, so its MatMulIntegerToFloat fusion applies
        # nodes are keyed by their first output (unique in an ONNX graph): protobuf hands out a new
        # Python wrapper, with a new id(), each time a node is read
        replaced[chain[0]["nodes"][0].output[0]] = [
            helper.make_node("Mul", [a_scale, base + "_scale"], [base + "_ab_scale"], name=base + "_scales_mul"),
            helper.make_node("MatMulInteger", [a, base + "_w", a_zp, base + "_zp"], [base + "_int"],
                             name=base + "_quant"),
            helper.make_node("Cast", [base + "_int"], [base + "_float"], name=base + "_cast", to=1),
            helper.make_node("Mul", [base + "_float", base + "_ab_scale"], [base + "_scaled"], name=base + "_mul"),
            helper.make_node("Add", [base + "_scaled", base + "_bias"], [base + "_out"], name=base + "_add"),
            helper.make_node("Split", [base + "_out", base + "_split"], [c["out"] for c in chain],
                             name=base + "_split", axis=-1)]
        removed.update(n.output[0] for c in chain for n in c["nodes"])
        fused += 1
    nodes = []
    for node in g.node:
        nodes.extend(replaced.get(node.output[0], []))
        if node.output[0] not in removed:
            nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)
    return fused


# ------------------------------------------------------------------- int8 graphs from ORT's quantizers
def fixed_scale_graph(dynamic: Path, dest: Path, scales: dict) -> bool:
    """Static int8 as integer ops: the dynamic graph with each DynamicQuantizeLinear replaced by a
    QuantizeLinear at torch's calibrated scale / zero point. ORT then fuses MatMulInteger + scale Mul +
    bias Add into one MatMulIntegerToFloat (from the QDQ graph it fuses no bias: 36 more passes over
    MiniLM's activations). False when an activation has no torch scale."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(dynamic))
    nodes = []
    for node in model.graph.node:
        if node.op_type != "DynamicQuantizeLinear":
            nodes.append(node)
            continue
        if node.input[0] not in scales:
            return False
        scale, zero_point = scales[node.input[0]][0]["scale"], scales[node.input[0]][0]["zero_point"]
        # the scale / zero point become initializers under the names the node produced them as, so
        # the matmuls and scale multiplies that read them stay as they are
        model.graph.initializer.extend([numpy_helper.from_array(scale.reshape(()), node.output[1]),
                                        numpy_helper.from_array(zero_point.reshape(()), node.output[2])])
        nodes.append(helper.make_node("QuantizeLinear", [node.input[0], node.output[1], node.output[2]],
                                      [node.output[0]], name=node.name))
    model.graph.ClearField("node")
    model.graph.node.extend(fused_integer_matmuls(nodes))
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(model, str(dest))
    return True


def fused_integer_matmuls(nodes: list) -> list:
    """MatMulInteger -> Cast -> Mul(a_scale * b_scale) [-> Add(bias)] as one MatMulIntegerToFloat (an ORT
    contrib op: the same arithmetic in one pass). ORT fuses this itself only while a_scale is computed
    at run time; with a constant a_scale, constant folding removes the scale Mul it looks for first."""
    from onnx import helper

    readers, producer = _node_index(nodes)
    dropped, fused = set(), {}
    for mm in (n for n in nodes if n.op_type == "MatMulInteger"):
        tail = _integer_matmul_tail(mm, readers, producer)
        if tail is None:
            continue
        cast, mul, scales, add = tail
        bias = add and next(i for i in add.input if i != mul.output[0])
        last = add if bias else mul
        fused[id(mm)] = helper.make_node(
            "MatMulIntegerToFloat", [mm.input[0], mm.input[1], *scales.input, mm.input[2], mm.input[3]]
            + ([bias] if bias else []), [last.output[0]], name=mm.name + "_fused", domain="com.microsoft")
        dropped |= {id(cast), id(mul), id(scales)} | ({id(add)} if bias else set())
    return [fused.get(id(n), n) for n in nodes if id(n) not in dropped]


def float_skip_inputs(graph: Path) -> None:
    """Give the float tensor back to every consumer of a quantized activation that is not a matmul.

    ORT's QDQ quantizer puts QuantizeLinear -> DequantizeLinear on a tensor and hands the dequantized
    copy to all its consumers, so the residual Add after a LayerNorm reads rounded values; in torch (and
    in ORT's integer-operator graphs) only the matmul reads them. Rewired, the graph computes what the
    torch model does (SST-2: 16 of 872 predictions differed before, across 0.07 mean |logit diff|)."""
    import onnx

    model = onnx.load(str(graph))
    g = model.graph
    quantized_from = {n.output[0]: n.input[0] for n in g.node if n.op_type == "QuantizeLinear"}
    float_of = {n.output[0]: quantized_from[n.input[0]] for n in g.node
                if n.op_type == "DequantizeLinear" and n.input[0] in quantized_from}
    for node in g.node:
        if node.op_type not in ("MatMul", "Gemm", "QuantizeLinear"):
            for k, name in enumerate(node.input):
                if name in float_of:
                    node.input[k] = float_of[name]
    onnx.save(model, str(graph))


def activation_matmuls(graph: Path) -> list[str]:
    """MatMul nodes with no weight input (attention scores, attention x values)."""
    import onnx

    g = onnx.load(str(graph), load_external_data=False).graph
    weights = {init.name for init in g.initializer}
    # a weight may reach its MatMul through a Transpose/Cast of an initializer
    weights |= {n.output[0] for n in g.node if n.op_type in ("Transpose", "Cast") and n.input[0] in weights}
    return [n.name for n in g.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]
