"""Opt-in `lr: auto` (LR range test) and `batch_size: auto` (fastest batch that fits).

Both probe the real model on real training batches and leave the model exactly as they found
it (weights, gradients and torch RNG restored), so the training run that follows is unaffected
apart from the values they pick.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from slimtune.batching import EncodedDataset, batch_indices
from slimtune.train import BatchFn, LossFn, make_optimizer


class _Preserved:
    """Context manager: snapshot weights + RNG, restore them on exit."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.rng = torch.get_rng_state()
        self.was_training = self.model.training
        return self

    def __exit__(self, *exc):
        self.model.load_state_dict(self.state)
        self.model.zero_grad(set_to_none=True)
        torch.set_rng_state(self.rng)
        self.model.train(self.was_training)
        return False


def find_lr(model: nn.Module, ds: EncodedDataset, loss_fn: LossFn, make_batch: BatchFn, batch_size: int,
            weight_decay: float = 0.01, steps: int = 80, lr_min: float = 1e-7, lr_max: float = 1.0,
            seed: int = 0) -> tuple[float, list[tuple[float, float]]]:
    """Smith's LR range test: raise the lr geometrically each step, track the smoothed loss.

    Returns (suggested lr, [(lr, smoothed loss)...]). The suggestion is the lr at the minimum
    smoothed loss divided by 10 — the usual rule, which stays on the safe side of divergence.
    """
    batches = batch_indices(ds.lengths, batch_size, shuffle=True, seed=seed)
    steps = max(10, min(steps, len(batches) * 3))
    curve: list[tuple[float, float]] = []
    with _Preserved(model):
        model.train()
        opt = make_optimizer(model, lr_min, weight_decay)
        factor = (lr_max / lr_min) ** (1 / (steps - 1))
        avg, best = 0.0, math.inf
        for i in range(steps):
            lr = lr_min * factor**i
            for g in opt.param_groups:
                g["lr"] = lr
            loss = loss_fn(model, make_batch(ds, batches[i % len(batches)]))
            if not torch.isfinite(loss):
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            avg = 0.9 * avg + 0.1 * loss.item()  # exponential smoothing, bias-corrected below
            smooth = avg / (1 - 0.9 ** (i + 1))
            curve.append((lr, smooth))
            best = min(best, smooth)
            if i > 5 and smooth > 4 * best:  # diverged: the rest of the curve is noise
                break
    lrs, losses = np.array([c[0] for c in curve]), np.array([c[1] for c in curve])
    suggestion = float(lrs[int(np.argmin(losses))] / 10) if len(curve) else 5e-5
    return float(np.clip(suggestion, 1e-6, 1e-2)), curve


def find_batch_size(model: nn.Module, ds: EncodedDataset, loss_fn: LossFn, make_batch: BatchFn,
                    candidates: tuple[int, ...] = (8, 16, 32, 64, 128), trials: int = 3,
                    tolerance: float = 0.9, seed: int = 0) -> tuple[int, dict[int, float]]:
    """Time forward+backward per example for each candidate batch size on real batches.

    On a CPU memory rarely binds, throughput does: bigger batches stop paying off once the cores
    are saturated. Returns the *smallest* batch within `tolerance` of the best throughput (more
    optimizer steps per epoch for the same speed), plus the measured examples/s per candidate.
    A candidate that runs out of memory ends the search.
    """
    measured: dict[int, float] = {}
    with _Preserved(model):
        model.train()
        for bs in candidates:
            if bs > len(ds):
                break
            batches = batch_indices(ds.lengths, bs, shuffle=True, seed=seed)[: trials + 1]
            try:
                times = []
                for idx in batches:  # the first is a warm-up
                    t0 = time.perf_counter()
                    loss_fn(model, make_batch(ds, idx)).backward()
                    times.append((time.perf_counter() - t0) / len(idx))
                    model.zero_grad(set_to_none=True)
            except RuntimeError as e:  # CPU allocator: "DefaultCPUAllocator: can't allocate memory"
                if "memory" in str(e).lower():
                    break
                raise
            measured[bs] = 1.0 / float(np.median(times[1:] if len(times) > 1 else times))
    if not measured:
        return min(candidates[0], len(ds)), measured
    best = max(measured.values())
    chosen = min(bs for bs, eps in measured.items() if eps >= tolerance * best)
    return chosen, measured
