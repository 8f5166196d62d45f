"""Calibration inputs of Linear layers, and the weight algorithms that use them.

  gptq  GPTQ (Frantar et al. 2022): columns quantized in order, each one's rounding error spread over
        the columns not yet quantized through the inverse Hessian H = sum x x^T of the layer's inputs
        (dampened by 1% of its mean diagonal; lazy block updates of 128 columns; a group's scale is
        computed when the loop enters it, from the error-updated weights)
  awq   activation-aware scaling (Lin et al. 2023): input channel j scaled by s_j = mean|x_j|^a before
        round-to-nearest, a chosen on a grid to minimise the layer's output error; the module keeps s
        (`input_scale`) and divides it back out, so the float weight is unchanged up to rounding
Inputs are captured with forward pre-hooks on the calibration batches (padding positions dropped);
the forward stops as soon as every hooked module has seen its input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from slimtune.adapt.layers import anatomy
from slimtune.batching import model_inputs
from slimtune.errors import SlimtuneError
from slimtune.quantize.codes import dequantize_codes, group_params, quantize_codes, to_codes, zero_point_dtype

AWQ_GRID = [i / 10 for i in range(11)]  # exponents a tried for s = mean|x|^a; a = 0 is plain RTN
GPTQ_DAMP = 0.01  # x mean diag(H), added to the diagonal before inversion
GPTQ_BLOCK = 128  # columns per lazy-update block


class _Stop(Exception):
    """Raised by a capture hook once it has what it needs: the rest of the forward is skipped."""


def valid_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Input rows [n, features] without padding positions (when the batch mask lines up with `x`)."""
    x = x.detach()
    if mask is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
        return x[mask.bool()].float()
    return x.reshape(-1, x.shape[-1]).float()


def forward_all(model: nn.Module, batches: list[dict], hooks: dict[nn.Module, Callable],
                state: dict | None = None) -> None:
    """Run the calibration batches through `model` (eval mode, no grad) with forward pre-hooks on modules;
    `state` holds the current batch's attention mask and the modules seen in it."""
    state = {} if state is None else state
    handles = [m.register_forward_pre_hook(h) for m, h in hooks.items()]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                state["mask"], state["seen"] = batch.get("attention_mask"), set()
                try:
                    model(**model_inputs(batch))
                except _Stop:
                    pass
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def input_stats(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict]) -> dict[str, dict]:
    """Per module: sum of x x^T, sum of |x| and the row count of its inputs (padding excluded). The
    forward stops once every module has seen its input (first call per batch)."""
    state: dict = {}
    acc = {m: {"hessian": 0.0, "abs_sum": 0.0, "rows": 0} for m in modules.values()}

    def hook(module, args):
        if module in state["seen"]:
            return
        x = valid_rows(args[0], state.get("mask"))
        stats = acc[module]
        stats["hessian"] = stats["hessian"] + x.T @ x
        stats["abs_sum"] = stats["abs_sum"] + x.abs().sum(0)
        stats["rows"] += x.shape[0]
        state["seen"].add(module)
        if len(state["seen"]) == len(acc):
            raise _Stop

    forward_all(model, batches, {m: hook for m in acc}, state=state)
    for name, m in modules.items():
        if not acc[m]["rows"]:
            raise SlimtuneError(f"the calibration batches never reach {name}")
    return {name: acc[m] for name, m in modules.items()}


def sequential_groups(model: nn.Module, names: list[str]) -> list[list[str]]:
    """Targets grouped by transformer block (one calibration pass per block, earlier blocks already
    quantized); a target outside the layer stack is a group of its own. `names` in execution order."""
    try:
        prefix = anatomy(model).layers + "."
    except SlimtuneError:
        prefix = None
    groups: dict[str, list[str]] = {}
    for name in names:
        block = name[len(prefix):].split(".", 1)[0] if prefix and name.startswith(prefix) else None
        groups.setdefault(f"{prefix}{block}" if block is not None else name, []).append(name)
    return list(groups.values())


def output_mse(diff: torch.Tensor, stats: dict) -> float:
    """Mean over calibration rows and outputs of ((W - Wq) x)^2, from sum x x^T: tr(D H D^T) / (n out)."""
    return float(((diff @ stats["hessian"]) * diff).sum() / (stats["rows"] * diff.shape[0]))


def rtn_output_mse(model: nn.Module, diffs: dict[nn.Module, torch.Tensor], batches: list[dict]) -> dict:
    """Per Linear: output MSE of its weight error on the full-precision model's calibration inputs."""
    state: dict = {}
    acc = {m: [0.0, 0] for m in diffs}

    def make(module):
        def hook(_, args):
            x = valid_rows(args[0], state.get("mask"))
            acc[module][0] += float(((x @ diffs[module].T) ** 2).sum())
            acc[module][1] += x.numel() // x.shape[-1] * diffs[module].shape[0]
        return hook

    forward_all(model, batches, {m: make(m) for m in diffs}, state=state)
    return {m: (s / n if n else None) for m, (s, n) in acc.items()}


# ---------------------------------------------------------------------------------- GPTQ and AWQ
def upper_cholesky_of_inverse(h: torch.Tensor, damp_ratio: float = GPTQ_DAMP,
                              what: str = "quantize: gptq") -> torch.Tensor:
    """Upper Cholesky factor of H^-1 (float64) with `damp_ratio` x mean diag(H) added to the diagonal;
    more dampening if H is not positive definite (GPTQ and SparseGPT both update weights through it)."""
    damp = damp_ratio * torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype)
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(h + damp * eye)
        if not info:
            return torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
        damp *= 10
    raise SlimtuneError(f"{what}: the calibration Hessian is not positive definite even when dampened")


def gptq_codes(w: torch.Tensor, hessian: torch.Tensor, bits: int, scheme: str, group_size: int | None):
    """GPTQ for one weight matrix; returns (codes, scale, zero_point) like `quantize_codes`."""
    weight = w.detach().float().clone()
    rows, cols = weight.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that are always 0: their weights do not matter
    h[dead, dead] = 1
    weight[:, dead] = 0
    hinv = upper_cholesky_of_inverse(h).float()
    gs = group_size or cols
    scale = torch.ones(rows, cols // gs)
    zero = torch.zeros(rows, cols // gs) if zero_point_dtype(scheme) is not None else None
    if group_size is None:
        s, z = group_params(weight, bits, scheme)
        scale[:, 0] = s
        if zero is not None:
            zero[:, 0] = z
    codes = torch.zeros(rows, cols)
    block = gs * max(1, GPTQ_BLOCK // gs) if group_size else GPTQ_BLOCK  # groups never straddle a block
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        w1, err1, hinv1 = weight[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        diagonal = hinv1.diagonal().tolist()
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:  # entering a group: its scale comes from its error-updated weights
                g = col // gs
                if group_size:
                    s, z = group_params(w1[:, i:i + gs], bits, scheme)
                    scale[:, g] = s
                    if zero is not None:
                        zero[:, g] = z
                s, z = scale[:, g], (zero[:, g] if zero is not None else None)
            q = to_codes(w1[:, i], s, z, bits, scheme)
            codes[:, col] = q
            err = (w1[:, i] - (q if z is None else q - z) * s) / diagonal[i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # spread the error over the columns still to come
            err1[:, i] = err
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes.to(torch.int8), scale, None if zero is None else zero.to(zero_point_dtype(scheme))


def awq_codes(w: torch.Tensor, stats: dict, bits: int, scheme: str, group_size: int | None):
    """AWQ scaling search; returns (codes, scale, zero_point, input_scale s, exponent a, output mse)."""
    w = w.detach().float()
    mean_abs = stats["abs_sum"] / stats["rows"]
    mean_abs = mean_abs.clamp(min=float(mean_abs.max()) * 1e-4 + 1e-12)  # dead channels: no infinite 1/s
    best = None
    for a in AWQ_GRID:
        s = mean_abs ** a
        s = s / torch.sqrt(s.max() * s.min())  # centred around 1, as in AWQ
        codes, scale, zero = quantize_codes(w * s, bits, scheme, group_size)
        mse = output_mse(w - dequantize_codes(codes, scale, zero) / s, stats)
        if best is None or mse < best[-1]:
            best = (codes, scale, zero, s, a, mse)
    return best


def observe_input_ranges(model: nn.Module, modules: dict[str, nn.Module],
                         batches: list[dict]) -> dict[str, tuple[float, float]]:
    """Per-tensor (min, max) of each module's input over `batches`, padding positions included (ONNX
    Runtime sees whole tensors too). Static quantized Linears pass float inputs through meanwhile."""
    if not batches:
        raise SlimtuneError("quantize: the calibration set is empty")
    ranges = {m: [math.inf, -math.inf] for m in modules.values()}

    def hook(module, args):
        x = args[0].detach()
        ranges[module][0] = min(ranges[module][0], float(x.min()))
        ranges[module][1] = max(ranges[module][1], float(x.max()))

    observing = [m for m in modules.values() if hasattr(m, "observing")]  # static QuantizedLinears
    for m in observing:
        m.observing = True
    try:
        forward_all(model, batches, {m: hook for m in modules.values()})
    finally:
        for m in observing:
            m.observing = False
    for name, m in modules.items():
        if ranges[m][0] > ranges[m][1]:
            raise SlimtuneError(f"quantize: {name} received no input from the calibration batches")
    return {name: tuple(ranges[m]) for name, m in modules.items()}
