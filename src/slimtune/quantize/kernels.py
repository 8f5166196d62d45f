"""Packed-weight matmuls for weight-only int8 / int4 Linears: what makes a quantized decoder decode
faster than fp32 rather than merely smaller on disk.

A dequantize-then-matmul layer reads its codes AND writes a float copy of the weight at every call,
so at batch 1 (decode) it is slower than fp32. torch ships CPU kernels that multiply straight from
packed integer weights: `aten._weight_int8pack_mm` (int8, one scale per output row) and
`aten._weight_int4pack_mm_for_cpu` (uint4 in torch's tiled layout, a (scale, zero) pair per group of
32/64/128/256 inputs). Measured here (AMD EPYC avx512_bf16, 2 threads, a 576 -> 1536 layer at batch 1):
fp32 F.linear 74 us, int8-pack 29 us, int4-pack 30 us; the 49152 x 576 LM head 8.4 ms / 1.3 ms /
0.7 ms. Both kernels are fast only with bf16 activations (fp32 inputs take a generic path 5x slower
than fp32 F.linear; fp16 is slower still), so the packed path rounds the activations to bf16 for the
matmul and returns the caller's dtype: the layer's numerics are those of a bf16-activation matmul
(about 0.3% relative output error against the float product of the same codes), and the perplexity a
quantize stage reports is measured through this very path.

Layouts (codes and scales are slimtune's saved form, `slimtune.quantize.core`; the packed copy is
built once from them and never saved):
  int8  codes c, scale s per output row, zero point z (asymmetric) or none:
        x (c - z)^T s = int8pack(x, c, s) - sum(x) (z s)
  int4  codes c in [-8, 7], (scale s, zero point z) per group: w = (c - z) s = (u - 8) s + (-z s) with
        u = c + 8 in [0, 15], exactly torch's uint4 form w = (u - 8) * scale + zero.
AWQ's per-input scale divides the activations first (x W^T with W = deq / input_scale per column).
Anything else (int8 in groups, other widths, fixed point, activation quantization) has no kernel: the
layer dequantizes and runs the float matmul; `kernel_of` names which path a layer takes, and why.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.quantize.codes import SCALED_SCHEMES

INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's int4-pack kernel supports
INT4_INNER_K_TILES = 2  # torch's tiling of K in the packed int4 layout (2, 4 or 8; in_features % 32 == 0)


def kernel_of(module: nn.Module) -> tuple[str, str]:
    """(kernel, reason): "int8_pack" or "int4_pack" when the layer's codes fit a packed kernel,
    else "float" and why not."""
    if module.activations is not None:
        return "float", "quantized activations (simulated as ONNX Runtime runs them)"
    if module.scheme not in SCALED_SCHEMES:
        return "float", f"{module.scheme} codes"
    if module.bits == 8:
        if module.group_size is not None:
            return "float", "int8 in groups (the int8 kernel takes one scale per output row)"
        return "int8_pack", "int8, one scale per output row"
    if module.bits == 4:
        groups = module.group_size or module.in_features
        if groups not in INT4_GROUPS:
            return "float", f"int4 groups of {groups} (the int4 kernel takes groups of {INT4_GROUPS})"
        if module.in_features % (16 * INT4_INNER_K_TILES):
            return "float", f"{module.in_features} input features (the int4 kernel needs a multiple of 32)"
        if module.out_features % 16:
            return "float", f"{module.out_features} output features (the int4 kernel needs a multiple of 16)"
        return "int4_pack", f"int4, groups of {groups}"
    return "float", f"{module.bits}-bit codes"


def _available(kernel: str) -> bool:
    ops = torch.ops.aten
    return {"int8_pack": hasattr(ops, "_weight_int8pack_mm"),
            "int4_pack": hasattr(ops, "_weight_int4pack_mm_for_cpu")}.get(kernel, False)


def use_packed(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call takes the packed kernel: inference on CPU, not under tracing / export (an
    exported graph holds the plain float matmul) and not while gradients flow through the input."""
    if module.kernel == "float" or x.device.type != "cpu" or x.dtype not in (torch.float32, torch.bfloat16):
        return False
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling():
        return False
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters())):
        return False
    return _available(module.kernel)


def _version(module: nn.Module) -> tuple:
    # the packed copy follows the codes: a load_state_dict or copy_ into them bumps their version
    tensors = [t for t in (module.qweight, module.scale, module.zero_point) if t is not None]
    return tuple((t.data_ptr(), t._version) for t in tensors)


def _pack(module: nn.Module) -> dict:
    codes, scale = module.qweight, module.scale.float()
    zero = None if module.zero_point is None else module.zero_point.float()
    if module.kernel == "int8_pack":
        # unit scales in the kernel and the float32 scales applied after it: a bf16 scale would add a
        # systematic error of up to 0.4% per output row, as large as the int8 rounding itself
        packed = {"codes": codes.contiguous(), "ones": torch.ones(codes.shape[0], dtype=torch.bfloat16),
                  "scale": scale[:, 0].contiguous()}
        if zero is not None:  # the zero point's share of every output: sum(x) * z * s
            packed["zero_times_scale"] = zero[:, 0] * scale[:, 0]
        return packed
    groups = module.group_size or module.in_features
    uint4 = (codes.to(torch.int32) + 8).contiguous()
    zero_float = -(zero * scale) if zero is not None else torch.zeros_like(scale)
    # [in / group, out, 2]: one (scale, zero) pair per group and output row
    scales_and_zeros = torch.stack([scale, zero_float], dim=-1).transpose(0, 1).contiguous().to(torch.bfloat16)
    return {"codes": torch.ops.aten._convert_weight_to_int4pack_for_cpu(uint4, INT4_INNER_K_TILES),
            "scales_and_zeros": scales_and_zeros, "group_size": groups}


def packed_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """y = x W^T + b through the packed kernel (the packed copy is built on first use)."""
    version = _version(module)
    if getattr(module, "_packed_version", None) != version:
        module._packed, module._packed_version = _pack(module), version
    packed = module._packed
    dtype, shape = x.dtype, x.shape
    x2 = x.reshape(-1, shape[-1])
    if module.input_scale is not None:
        x2 = x2 / module.input_scale
    xb = x2.to(torch.bfloat16).contiguous()
    if module.kernel == "int8_pack":
        y = torch.ops.aten._weight_int8pack_mm(xb, packed["codes"], packed["ones"]).to(dtype) * packed["scale"]
        if "zero_times_scale" in packed:
            y = y - x2.sum(-1, keepdim=True).to(dtype) * packed["zero_times_scale"].to(dtype)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, packed["codes"], packed["group_size"],
                                                       packed["scales_and_zeros"]).to(dtype)
    if module.bias is not None:
        y = y + module.bias.to(dtype)
    return y.reshape(*shape[:-1], module.out_features)
