"""Mixed precision: per-layer weight bit widths from a sensitivity analysis, under a size budget.

Each target Linear is quantized alone (round to nearest, at the lowest candidate width) while every
other layer stays in full precision; the damage it does is its sensitivity: the drop in dev accuracy,
or the logit error on calibration batches relative to the logits' size. Layers then lose bits from
the least sensitive up, one candidate width at a time, until the parameter-weighted average width
fits the budget, so the layers that hurt most when squeezed keep the most bits (HAWQ-style ordering
with a measured rather than Hessian-estimated sensitivity).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from slimtune.batching import logits_of, model_inputs
from slimtune.errors import SlimtuneError
from slimtune.modules import select_linears
from slimtune.quantize.core import fake_quantize

SENSITIVITIES = ("accuracy", "output_error")


def _logits(model: nn.Module, batches: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [logits_of(model(**model_inputs(b))).float() for b in batches]


def layer_sensitivity(model: nn.Module, targets: dict[str, nn.Linear], bits: int, sensitivity: str,
                      calibration: list[dict] | None, eval_fn: Callable[[nn.Module], dict] | None = None,
                      group_size: int | None = None, symmetric: bool = True, metric: str = "accuracy",
                      higher_is_better: bool = True) -> dict[str, float]:
    """{name: damage when only that layer's weight is quantized to `bits`}; the model is left as it was.
    sensitivity "accuracy" measures the fall of the dev `metric` (the task's primary one)."""
    if sensitivity not in SENSITIVITIES:
        raise SlimtuneError(f"quantize: mixed.sensitivity {sensitivity!r} ({', '.join(SENSITIVITIES)})")
    if sensitivity == "accuracy" and eval_fn is None:
        raise SlimtuneError("quantize: mixed.sensitivity accuracy needs an evaluation set")
    if sensitivity == "output_error" and not calibration:
        raise SlimtuneError("quantize: the calibration set is empty")
    was_training = model.training
    model.eval()
    if sensitivity == "accuracy":
        sign = 1.0 if higher_is_better else -1.0
        base = eval_fn(model)[metric]
        measure = lambda: sign * (base - eval_fn(model)[metric])  # noqa: E731
    else:
        reference = _logits(model, calibration)
        size = sum(float((r ** 2).sum()) for r in reference) / sum(r.numel() for r in reference)

        def measure() -> float:  # mean squared logit error, relative to the mean squared logit
            err = sum(float(((q - r) ** 2).sum()) for q, r in zip(_logits(model, calibration), reference,
                                                                  strict=True))
            return err / sum(r.numel() for r in reference) / max(size, 1e-12)

    scheme = "symmetric" if symmetric else "asymmetric"
    table = {}
    try:
        for name, linear in targets.items():
            original = linear.weight.data
            linear.weight.data = fake_quantize(original, bits, scheme, group_size)
            try:
                table[name] = float(measure())
            finally:
                linear.weight.data = original
    finally:
        model.train(was_training)
    return table


def assign_bits(sensitivity: dict[str, float], sizes: dict[str, int], candidates: list[int],
                budget_bits: float) -> dict[str, int]:
    """Every layer starts at the widest candidate; the least sensitive layers step down first, one
    candidate at a time, until sum(bits * size) / sum(size) <= budget_bits."""
    widths = sorted(set(candidates))
    if budget_bits < widths[0]:
        raise SlimtuneError(f"quantize: mixed.budget_bits {budget_bits} is below the narrowest candidate "
                            f"({widths[0]} bits)")
    total = sum(sizes.values())
    bits = {name: widths[-1] for name in sensitivity}
    average = lambda: sum(bits[n] * sizes[n] for n in bits) / total  # noqa: E731
    for name in sorted(sensitivity, key=lambda n: sensitivity[n]):
        for width in reversed(widths[:-1]):
            if average() <= budget_bits:
                return bits
            bits[name] = width
    return bits


def choose_bits(model: nn.Module, candidates: list[int], budget_bits: float, sensitivity: str,
                calibration: list[dict] | None, eval_fn: Callable[[nn.Module], dict] | None = None,
                targets: dict[str, nn.Linear] | None = None, group_size: int | None = None,
                symmetric: bool = True, metric: str = "accuracy", higher_is_better: bool = True
                ) -> tuple[dict[str, int], dict[str, float]]:
    """(bits per target layer, sensitivity per target layer). Default targets: the encoder Linears."""
    if targets is None:
        targets = select_linears(model, purpose="quantize")
    if not candidates:
        raise SlimtuneError("quantize: mixed.bits needs at least one candidate width")
    table = layer_sensitivity(model, targets, min(candidates), sensitivity, calibration, eval_fn,
                              group_size=group_size, symmetric=symmetric, metric=metric,
                              higher_is_better=higher_is_better)
    sizes = {name: linear.weight.numel() for name, linear in targets.items()}
    return assign_bits(table, sizes, candidates, budget_bits), table


def average_bits(bits: dict[str, int], targets: dict[str, nn.Module]) -> float:
    sizes = {name: targets[name].weight.numel() for name in bits}
    return sum(bits[n] * sizes[n] for n in bits) / sum(sizes.values())
