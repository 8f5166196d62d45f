"""Integer codes of a weight matrix and their float value, for every scheme slimtune stores.

  symmetric   codes in [-(2^(b-1)-1), 2^(b-1)-1], scale = max|w| / (2^(b-1)-1) per row or group
  asymmetric  codes in [-2^(b-1), 2^(b-1)-1] with a zero point; the range always includes 0
  asymmetric_float  the same codes over each group's own [min, max] with a float zero point (w = (c - z) s,
              z unrounded): llama.cpp's Q4_1 "scale + min" grid, and the layout torch's int4-pack kernel
              takes natively; no grid shift from rounding z, so a weight already on such a grid stays on it
  fixed_point Qm.n: code = round(w * 2^n) saturated to m + n bits plus a sign bit; scale 2^-n
  binary      codes {-1, +1}, scale a = mean|w| per row (XNOR-Net)
  ternary     codes {-1, 0, +1}, threshold 0.7 mean|w|, a = mean of |w| above it (Ternary Weight Networks)
Rounding is to nearest, half to even (torch.round, as numpy and ONNX Runtime). Activations are
quantized like ONNX Runtime's QuantizeLinear to uint8 (per tensor, asymmetric).
"""

from __future__ import annotations

import torch

# schemes whose codes are round(w / scale) [+ zero point]: what GPTQ / AWQ and the packed kernels take
SCALED_SCHEMES = ("symmetric", "asymmetric", "asymmetric_float")
TERNARY_THRESHOLD = 0.7  # x mean|w| (Ternary Weight Networks' approximation of the optimal threshold)


def code_range(bits: int, scheme: str) -> tuple[int, int]:
    """Smallest and largest code. Symmetric codes use the restricted range [-(2^(b-1)-1), 2^(b-1)-1]
    (like ONNX Runtime's symmetric int8 weights), so +/- amax are both exact."""
    if scheme == "symmetric":
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    if scheme in ("binary", "ternary"):
        return -1, 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_params(wg: torch.Tensor, bits: int, scheme: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scale (and zero point, as float integers) of each group = the last dim of `wg`."""
    qmin, qmax = code_range(bits, scheme)
    if scheme == "symmetric":
        scale = wg.abs().amax(-1) / qmax
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    if scheme == "asymmetric_float":  # min and max land exactly on the first and last code
        lo, hi = wg.amin(-1), wg.amax(-1)
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, qmin - lo / scale
    if scheme == "asymmetric":  # the range always holds 0, so a zero weight is exact
        lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)
        scale = (hi - lo) / (qmax - qmin)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        return scale, torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    if scheme == "binary":  # XNOR-Net: alpha = mean|w| minimises ||w - alpha sign(w)||
        return wg.abs().mean(-1), None
    keep = wg.abs() > TERNARY_THRESHOLD * wg.abs().mean(-1, keepdim=True)
    return (wg.abs() * keep).sum(-1) / keep.sum(-1).clamp(min=1), None


def to_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int,
              scheme: str) -> torch.Tensor:
    """Float integer codes of `wg`; `scale` / `zero` broadcast against it (one per group)."""
    qmin, qmax = code_range(bits, scheme)
    if scheme == "binary":
        return torch.where(wg >= 0, 1.0, -1.0)
    if scheme == "ternary":
        return torch.sign(wg) * (wg.abs() > TERNARY_THRESHOLD * wg.abs().mean(-1, keepdim=True))
    if scheme == "asymmetric_float":  # a float zero point: round after adding it
        return torch.clamp(torch.round(wg / scale + zero), qmin, qmax)
    q = torch.round(wg / scale)
    return torch.clamp(q + zero if zero is not None else q, qmin, qmax)


def zero_point_dtype(scheme: str) -> torch.dtype | None:
    """How a scheme stores its zero points (None: it has none)."""
    return {"asymmetric": torch.int8, "asymmetric_float": torch.float32}.get(scheme)


NIBBLE_OFFSET = 8  # codes of 4 bits or fewer lie in [-8, 7]: stored as code + 8 in one half of a byte


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in [-8, 7], [rows, cols] -> uint8 [rows, ceil(cols / 2)]: column 2j in the low half of
    byte j, column 2j + 1 in the high half (a meta tensor gives a meta tensor of that shape)."""
    rows, cols = codes.shape
    if codes.is_meta:
        return torch.empty(rows, (cols + 1) // 2, dtype=torch.uint8, device="meta")
    u = (codes.to(torch.int16) + NIBBLE_OFFSET).to(torch.uint8)
    if cols % 2:
        u = torch.cat([u, torch.full((rows, 1), NIBBLE_OFFSET, dtype=torch.uint8, device=u.device)], dim=1)
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The inverse of `pack_nibbles`: uint8 [rows, ceil(cols / 2)] -> int8 codes [rows, cols]."""
    both = torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :cols]
    return (both.to(torch.int16) - NIBBLE_OFFSET).to(torch.int8)


def code_dtype(bits: int) -> torch.dtype:
    return torch.int8 if bits <= 8 else torch.int16


def quantize_codes(w: torch.Tensor, bits: int, scheme: str, group_size: int | None, int_bits: int | None = None,
                   frac_bits: int | None = None, per_tensor: bool = False,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(codes [rows, cols] int8/int16, scale [rows, n_groups] float32, zero point int8 or None).

    Round to nearest (half to even). fixed_point: Qm.n with m = int_bits, n = frac_bits, a sign bit
    extra: code = round(w * 2^n), saturated to [-2^(m+n), 2^(m+n) - 1]; scale 2^-n.
    per_tensor: one scale for the whole matrix, stored repeated per row (the layout stays [rows, 1]).
    """
    w = w.detach().float()
    rows, cols = w.shape
    if per_tensor:
        codes, scale, zero = quantize_codes(w.reshape(1, -1), bits, scheme, None, int_bits, frac_bits)
        return (codes.reshape(rows, cols), scale.expand(rows, 1).contiguous(),
                None if zero is None else zero.expand(rows, 1).contiguous())
    if scheme == "fixed_point":
        limit = 2 ** (int_bits + frac_bits)
        codes = torch.clamp(torch.round(w * 2.0 ** frac_bits), -limit, limit - 1)
        scale = torch.full((rows, 1), 2.0 ** -frac_bits)
        return codes.to(code_dtype(1 + int_bits + frac_bits)), scale, None
    gs = group_size or cols
    wg = w.reshape(rows, cols // gs, gs)
    scale, zero = group_params(wg, bits, scheme)
    codes = to_codes(wg, scale[..., None], None if zero is None else zero[..., None], bits, scheme)
    return (codes.reshape(rows, cols).to(torch.int8), scale.float(),
            None if zero is None else zero.to(zero_point_dtype(scheme)))


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                     group_size: int | None = None) -> torch.Tensor:
    """(codes - zero_point) * scale, each scale covering `cols / n_groups` consecutive codes of a row."""
    rows, cols = codes.shape
    groups = scale.shape[-1]
    if group_size is not None and cols != groups * group_size:
        raise ValueError(f"{groups} scales of group_size {group_size} do not cover {cols} columns")
    c = codes.float().reshape(rows, groups, cols // groups)
    if zero_point is not None:
        c = c - zero_point.float()[..., None]
    return (c * scale.float()[..., None]).reshape(rows, cols)


def fake_quantize(w: torch.Tensor, bits: int, scheme: str, group_size: int | None = None,
                  int_bits: int | None = None, frac_bits: int | None = None, per_tensor: bool = False) -> torch.Tensor:
    """The value `w` takes once quantized (no gradient trick: QAT adds its straight-through estimator)."""
    codes, scale, zero = quantize_codes(w, bits, scheme, group_size, int_bits, frac_bits, per_tensor)
    return dequantize_codes(codes, scale, zero).to(w.dtype)


def activation_codes(x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int) -> torch.Tensor:
    """ONNX Runtime's QuantizeLinear to uint8 with the zero point taken off again: the integers
    clamp(round(x / s) + zp, 0, 255) - zp (round half to even, like ORT), held in x's float dtype."""
    return torch.clamp(torch.round(x / scale) + zero_point, 0, 255) - zero_point


def fake_quantize_activations(x: torch.Tensor, scale: torch.Tensor | float, zero_point: torch.Tensor | int):
    """ONNX Runtime's QuantizeLinear -> DequantizeLinear to uint8."""
    return activation_codes(x, scale, zero_point) * scale


def activation_params(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric scale / zero point of a range widened to hold 0 (ORT's compute_scale_zp)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(torch.tensor((hi - lo) / 255.0, dtype=torch.float32))
    if scale == 0.0:
        return 1.0, 0
    return scale, int(min(max(round(-lo / scale), 0), 255))


def dynamic_activation_params(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ORT's DynamicQuantizeLinear parameters: the range of this very tensor, widened to hold 0, over
    255 steps (float32 arithmetic, as ORT); scale 1 for an all-zero tensor."""
    lo, hi = x.detach().min().clamp(max=0), x.detach().max().clamp(min=0)
    scale = (hi - lo) / 255
    if scale == 0:
        return torch.ones_like(scale), torch.zeros_like(scale)
    return scale, torch.clamp(torch.round(-lo / scale), 0, 255)


def dynamic_quantize_activations(x: torch.Tensor) -> torch.Tensor:
    """x as ORT's DynamicQuantizeLinear -> dequantize leaves it."""
    return fake_quantize_activations(x, *dynamic_activation_params(x))
