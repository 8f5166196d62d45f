"""A decoder graph's MatMuls as ONNX Runtime `MatMulNBits` (int4 / int8 weights in blocks), and its perplexity.

Why this exists: ORT's MatMulNBits kernels decode SmolLM2 2.3-5x faster than torch fp32 on a CPU (two runs)
(docs/benchmarks.md, "ONNX decoder export"), but ORT's own `MatMulNBitsQuantizer` can only round the float
weights it is given. A model quantized by slimtune (RTN, GPTQ, a float zero point) already has its
codes; rounding their dequantized values again would land on another grid whenever a group's codes do not
span the whole range (GPTQ moves them), and a float zero point has no equivalent in ORT's quantizer at all.
So the node is written here from the model's own codes. A Linear without codes is rounded to nearest by
slimtune's own `quantize_codes` (asymmetric, 0 in the range: the scheme of ORT's quantizer) in blocks of
`block_size`. The layout written is MatMulNBits' (com.microsoft, ORT >= 1.17):

    B            uint8 [N, k_blocks, block_size * bits / 8]  codes + 2^(bits-1); two 4-bit codes a byte, low first
    scales       float [N, k_blocks]
    zero_points  uint8 [N, ceil(k_blocks * bits / 8)] (integer, + 2^(bits-1), packed like B); absent for
                 symmetric codes and float zero points (ORT then uses 2^(bits-1))
    weight = (code - zero_point) * scale, which is slimtune's `dequantize_codes` with both shifted alike.
A float zero point z (the `asymmetric_float` scheme) is carried exactly as a correction beside the node:
x (c - z) s = x c s + (x summed per block) (-z s).

A MatMul's constant weight is matched to its torch module by content (`onnx_graph.weight_key`): the exported
graph holds each Linear's dequantized W^T as an initializer (constant-folded), so equal bytes name the module
whose codes to write. A quantized embedding table goes in as its own int8 codes (GatherBlockQuantized), as in
a classifier's int8 graph.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune import onnx_graph
from slimtune.errors import SlimtuneError
from slimtune.lmdata import IGNORE_INDEX
from slimtune.onnx_decoder import OnnxDecoder
from slimtune.onnx_int8 import table_codes
from slimtune.quantize.codes import pack_nibbles
from slimtune.quantize.core import QuantizedLinear, quantize_codes

MS_DOMAIN = "com.microsoft"
# int8 activations x int4/int8 weights (VNNI / AMX integer kernels): the fastest level measured here; the
# perplexity check of the export measures what it costs
ACCURACY_LEVEL = 4
RTN_SCHEME = "asymmetric"
MIN_BLOCK = 16  # MatMulNBits' smallest block


def model_codes(model: nn.Module) -> dict[int, tuple[str, QuantizedLinear, bool]]:
    """content key of W^T -> (module name, module, carried) for every weight-only QuantizedLinear. `carried`: its
    codes go into MatMulNBits as they are (4 or 8 bits, scaled codes, no per-input AWQ scale, which varies inside
    a block; a float zero point only at 4 bits: ORT 1.31 refuses it at 8, "only 2b and 4b ... for unpacked
    compute"). The others are rounded again, at their own bits when those are 4 or 8."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear) and module.activations is None:
            carried = (module.bits in (4, 8) and module.input_scale is None
                       and module.scheme in ("symmetric", "asymmetric", "asymmetric_float")
                       and not (module.scheme == "asymmetric_float" and module.bits == 8))
            key = onnx_graph.weight_key(module.dequantized_weight().detach().float().T.numpy())
            found[key] = (name, module, carried)
    return found


def _block_of(group: int, k: int) -> int:
    """The MatMulNBits block for codes with one scale per `group` input columns: the largest power of two
    that divides the group (blocks then repeat its scale), at most 256."""
    block = 256
    while block >= MIN_BLOCK and group % block:
        block //= 2
    if block < MIN_BLOCK:
        raise SlimtuneError(f"a quantization group of {group} input columns (of {k}) has no power-of-two block of "
                            f"at least {MIN_BLOCK} that divides it: MatMulNBits cannot carry these codes")
    return block


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """uint8 values in [0, 2^bits) along the last axis, packed as MatMulNBits wants."""
    if bits == 8:
        return values.astype(np.uint8)
    flat = torch.from_numpy(values.reshape(-1, values.shape[-1]).astype(np.int16) - 8).to(torch.int8)
    return pack_nibbles(flat).numpy().reshape(*values.shape[:-1], -1)


def nbits_tensors(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
                  group: int) -> tuple[int, dict[str, np.ndarray]]:
    """(block size, {B, scales, zero_points?}) of signed codes [N, K] with one scale per `group` columns."""
    n, k = codes.shape
    block = _block_of(group, k)
    repeat = group // block
    k_blocks = math.ceil(k / block)
    offset = 2 ** (bits - 1)
    pad = k_blocks * block - k
    unsigned = (codes.to(torch.int16) + offset).numpy()
    if pad:  # a zero weight in the padding: the code of the zero point (or the offset)
        unsigned = np.pad(unsigned, ((0, 0), (0, pad)), constant_values=offset)
    b = _pack(unsigned.reshape(n, k_blocks, block), bits)
    scales = scale.float().repeat_interleave(repeat, dim=1)[:, :k_blocks].numpy()
    out = {"B": b, "scales": np.ascontiguousarray(scales, dtype=np.float32)}
    if zero is not None:
        z = zero.repeat_interleave(repeat, dim=1)[:, :k_blocks]
        if z.is_floating_point():
            # ORT takes a float zero point only on its slow path (it dequantizes every weight on every call:
            # SmolLM2 decoded at 0.42x torch fp32). Exact and fast instead: (c - z) s = c s - z s, so the node
            # runs on the codes with no zero point, plus each block's input sum times -z s (two small MatMuls)
            indicator = np.zeros((k, k_blocks), np.float32)
            indicator[np.arange(k), np.arange(k) // block] = 1.0
            out["block_sums"] = indicator
            out["zero_shift"] = np.ascontiguousarray((-(z.float() * scale.float().repeat_interleave(
                repeat, dim=1)[:, :k_blocks])).T.numpy(), dtype=np.float32)
        else:
            z_unsigned = (z.to(torch.int16) + offset).numpy()
            out["zero_points"] = _pack(z_unsigned, bits)
    return block, out


def nbits_nodes(input_name: str, output_name: str, prefix: str, tensors: dict[str, np.ndarray], k: int, n: int,
                bits: int, block: int, accuracy_level: int = ACCURACY_LEVEL) -> tuple[list, list]:
    """(the nodes, their initializers) computing input @ W^T for the tensors of `nbits_tensors`: one
    MatMulNBits, and for float zero points the block sums' correction added to it."""
    from onnx import helper, numpy_helper

    initializers = [numpy_helper.from_array(array, f"{prefix}_{part}") for part, array in tensors.items()]
    inputs = [f"{prefix}_{part}" for part in ("B", "scales", "zero_points") if part in tensors]
    shifted = "zero_shift" in tensors
    main = f"{prefix}_codes" if shifted else output_name
    nodes = [helper.make_node("MatMulNBits", [input_name, *inputs], [main], name=f"{prefix}_matmul",
                              domain=MS_DOMAIN, K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level)]
    if shifted:
        nodes += [helper.make_node("MatMul", [input_name, f"{prefix}_block_sums"], [f"{prefix}_sums"],
                                   name=f"{prefix}_sum_blocks"),
                  helper.make_node("MatMul", [f"{prefix}_sums", f"{prefix}_zero_shift"], [f"{prefix}_shift"],
                                   name=f"{prefix}_zero_points"),
                  helper.make_node("Add", [main, f"{prefix}_shift"], [output_name], name=f"{prefix}_add_shift")]
    return nodes, initializers


def write_nbits_graph(src: Path, dest: Path, model: nn.Module, plain: nn.Module, bits: int, block_size: int) -> dict:
    """`src` (the float export of `plain`, the dequantized copy of `model`) with every MatMul of a constant 2-D
    weight as MatMulNBits and a quantized embedding table as GatherBlockQuantized (slimtune.onnx_graph), written
    to `dest`. Returns which layers kept their own codes and which were rounded here (`bits`, blocks of
    `block_size`)."""
    from onnx import helper, numpy_helper

    if bits not in (4, 8):
        raise SlimtuneError(f"MatMulNBits weights: {bits} bits (4 or 8)")
    graph_model = onnx_graph.load(src)
    graph = graph_model.graph
    inits = {t.name: t for t in graph.initializer}
    own = model_codes(model)
    report = {"own_codes": [], "rounded": [], "kept_float": [], "bits": {}}
    new_nodes = []
    for node in graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        array = numpy_helper.to_array(weight) if weight is not None else None
        if array is None or array.ndim != 2 or array.dtype != np.float32:
            new_nodes.append(node)
            continue
        k, n = array.shape
        name, module, carried = own.get(onnx_graph.weight_key(array), (node.name or node.output[0], None, False))
        if carried:
            group = module.group_size or k
            layer_bits = module.bits
            block, tensors = nbits_tensors(module.qweight, module.scale, module.zero_point, layer_bits, group)
            report["own_codes"].append(name)
        else:
            if k < MIN_BLOCK:
                report["kept_float"].append(name)
                new_nodes.append(node)
                continue
            # a quantized layer whose codes cannot be carried keeps its bits (an int8 head stays int8)
            layer_bits = module.bits if module is not None and module.bits in (4, 8) else bits
            group = block_size if k % block_size == 0 else k
            codes, scale, zero = quantize_codes(torch.from_numpy(array.T.copy()), layer_bits, RTN_SCHEME, group)
            block, tensors = nbits_tensors(codes, scale, zero, layer_bits, group)
            report["rounded"].append(name)
        report["bits"][name] = f"int{layer_bits}, blocks of {block}"
        nodes, initializers = nbits_nodes(node.input[0], node.output[0], f"{node.input[1]}_nbits", tensors, k, n,
                                          layer_bits, block)
        graph.initializer.extend(initializers)
        new_nodes.extend(nodes)
    if not report["own_codes"] and not report["rounded"]:
        raise SlimtuneError(f"{src}: no MatMul with a constant weight to quantize")
    del graph.node[:]
    graph.node.extend(new_nodes)
    if not any(o.domain == MS_DOMAIN for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    spec = (getattr(model.config, "slimtune_quantization", None) or {}).get("layers", {})
    tables = table_codes(model, plain, graph, spec)
    rounded_table = _rounded_input_table(plain, graph, tables)
    report["quantized_tables"] = onnx_graph.quantized_gathers_(graph_model, tables | rounded_table)
    report["rounded_tables"] = [t for t in rounded_table if t in report["quantized_tables"]]
    tmp = dest.with_name(dest.name + ".tmp")
    onnx_graph.save(graph_model, tmp)  # drops the float weights nothing reads any more
    tmp.replace(dest)
    return report


def _rounded_input_table(plain: nn.Module, graph, tables: dict) -> dict:
    """The input-embedding table of a model that has no codes for it, rounded to int8 with one symmetric scale
    per row ({graph table name: (codes, scale, None)}), as GatherBlockQuantized reads it. A float table is a
    third of SmolLM2's int8 graph (113 of 270 MB); the export's perplexity check measures what rounding costs.
    Matched by content, so a rotary cache or any other gathered constant is never touched."""
    from onnx import numpy_helper

    embeddings = plain.get_input_embeddings() if hasattr(plain, "get_input_embeddings") else None
    if embeddings is None or not isinstance(getattr(embeddings, "weight", None), torch.Tensor):
        return {}
    table = embeddings.weight.detach().float()
    key = onnx_graph.weight_key(table.numpy())
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    for init in graph.initializer:
        if init.name in gathered and init.name not in tables and \
                onnx_graph.weight_key(numpy_helper.to_array(init)) == key:
            codes, scale, _ = quantize_codes(table, 8, "symmetric", None)
            return {init.name: (codes.numpy().astype(np.int8), scale.numpy()[:, 0], None)}
    return {}


# ------------------------------------------------------------------------------------- perplexity
def token_nlls_onnx(graph: Path, ds, threads: int | None = None) -> np.ndarray:
    """The NLL of every scored token of `ds` (eval windows: one prefill call each, no past) under the graph."""
    decoder = OnnxDecoder(graph, threads)
    out = []
    for ids, labels in zip(ds.input_ids, ds.token_labels, strict=True):
        logits, _ = decoder.step(np.asarray([ids], np.int64), decoder.empty_past(), 0)
        out.append(_scored_nll(logits[0].astype(np.float64), labels))
    return np.concatenate(out) if out else np.zeros(0)


@torch.inference_mode()
def token_nlls_torch(model: nn.Module, ds) -> np.ndarray:
    """The same NLLs under the torch model, window by window (the reference of the export's check)."""
    model.eval()
    out = []
    for ids, labels in zip(ds.input_ids, ds.token_labels, strict=True):
        logits = model(input_ids=torch.tensor([ids])).logits[0].double().numpy()
        out.append(_scored_nll(logits, labels))
    return np.concatenate(out) if out else np.zeros(0)


def _scored_nll(logits: np.ndarray, labels: list[int]) -> np.ndarray:
    """Position t predicts token t+1; only scored targets count (as slimtune.tasks.causal_lm.token_nll)."""
    targets = np.asarray(labels[1:])
    keep = targets != IGNORE_INDEX
    rows = logits[:-1][keep]
    top = rows.max(-1, keepdims=True)
    log_z = np.log(np.exp(rows - top).sum(-1)) + top[:, 0]
    return log_z - rows[np.arange(len(rows)), targets[keep]]


def perplexity_comparison(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Perplexity of the torch model and of the graph on the same tokens, the rise in percent, and the 95%
    interval of that rise from the per-token differences (a paired measurement: the noise of which text
    was chosen cancels)."""
    diff = candidate - reference
    n = len(diff)
    sd = float(diff.std(ddof=1)) if n > 1 else 0.0
    rise = math.exp(float(diff.mean())) - 1
    half = math.exp(float(diff.mean()) + 1.96 * sd / math.sqrt(max(n, 1))) - 1 - rise
    return {"tokens": n, "torch_perplexity": math.exp(float(reference.mean())),
            "onnx_perplexity": math.exp(float(candidate.mean())), "rise_pct": 100 * rise,
            "rise_interval_pct": 100 * half}


__all__ = ["model_codes", "nbits_nodes", "nbits_tensors", "perplexity_comparison", "token_nlls_onnx",
           "token_nlls_torch", "write_nbits_graph"]
