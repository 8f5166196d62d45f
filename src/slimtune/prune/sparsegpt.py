"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning that repairs what it removes.

For each Linear, H = X^T X over its calibration inputs (padding excluded). Columns are visited in
blocks of `block_size`; within a block, the pruning mask is chosen by the OBS saliency
w^2 / [H^-1]_jj^2 (lowest pruned: per block over all rows for a sparsity, per group of M columns for
N:M), and each column's error (w - w_masked) / [H^-1]_jj is spread over the columns still to come
through the upper Cholesky factor of H^-1 — GPTQ's update with "set to zero" in place of "round".
Blocks of the transformer are processed in order, each calibrated on inputs that already went
through the pruned blocks before it (sequential, as in the paper), with the blocks' inputs carried
from one block to the next (`slimtune.quantize.blockwise`, shared with GPTQ and AWQ).

Written here rather than taken from a library: no maintained package prunes arbitrary HF models
with SparseGPT offline (llm-compressor needs a GPU-oriented stack and its own model wrappers).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.modules import select_linears
from slimtune.prune.unstructured import PruneReport, set_mask_, sparsity_report
from slimtune.quantize.blockwise import calibrate_blockwise_
from slimtune.quantize.calibration import input_stats, upper_cholesky_of_inverse

BLOCK_SIZE = 128  # columns per lazy-update block (the paper's)


@torch.no_grad()
def sparsegpt_weight(w: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None,
                     n_m: tuple[int, int] | None = None, block_size: int = BLOCK_SIZE,
                     damp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """(updated weight, keep mask) of one [out, in] weight matrix from its input Hessian."""
    weight = w.detach().float().clone()
    rows, cols = weight.shape
    h = hessian.double().clone()
    dead = torch.diag(h) == 0  # inputs that are always zero: their weights never matter
    h[dead, dead] = 1
    weight[:, dead] = 0
    hinv = upper_cholesky_of_inverse(h, damp, what="prune: sparsegpt").float()
    keep = torch.ones(rows, cols, dtype=torch.bool)
    n_keep, m = n_m if n_m else (0, 0)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1, err1, hinv1 = weight[:, i1:i2].clone(), torch.zeros(rows, i2 - i1), hinv[i1:i2, i1:i2]
        diagonal = hinv1.diagonal()
        pruned = torch.zeros_like(w1, dtype=torch.bool)
        if not n_m:  # adaptive mask: the lowest saliencies of this block, over all its rows
            saliency = w1 ** 2 / diagonal.reshape(1, -1) ** 2
            n_prune = int(saliency.numel() * sparsity)
            if n_prune:
                pruned.view(-1)[torch.argsort(saliency.flatten(), stable=True)[:n_prune]] = True
        for i in range(i2 - i1):
            if n_m and i % m == 0:  # each group of M columns: prune the M - N least salient per row
                saliency = w1[:, i:i + m] ** 2 / diagonal[i:i + m].reshape(1, -1) ** 2
                worst = torch.topk(saliency, m - n_keep, dim=1, largest=False).indices
                pruned.scatter_(1, i + worst, True)
            col = w1[:, i]
            masked = torch.where(pruned[:, i], torch.zeros_like(col), col)
            err = (col - masked) / diagonal[i]
            w1[:, i:].addr_(err, hinv1[i, i:], alpha=-1)  # the other weights make up for what went
            w1[:, i] = masked
            err1[:, i] = err
        weight[:, i1:i2] = w1
        keep[:, i1:i2] = ~pruned
        weight[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return weight * keep, keep


@torch.no_grad()
def prune_sparsegpt_(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], sparsity: float | None = None,
                     n_m: tuple[int, int] | None = None, targets: list[str] | None = None,
                     ignore: list[str] | None = None, block_size: int = BLOCK_SIZE,
                     damp: float = 0.01) -> PruneReport:
    """SparseGPT on the target Linears (default: the layer stack), one transformer block after another;
    masks as in `slimtune.prune.unstructured` (held through recovery, made permanent by `make_permanent_`)."""
    if (sparsity is None) == (n_m is None):
        raise SlimtuneError("give exactly one of sparsity or n_m")
    if sparsity is not None and not 0 <= sparsity < 1:
        raise SlimtuneError(f"sparsity {sparsity} outside [0, 1)")
    linears = select_linears(model, targets, ignore)
    if n_m is not None:
        bad = [name for name, lin in linears.items() if lin.in_features % n_m[1]]
        if bad:
            raise SlimtuneError(f"n_m {tuple(n_m)}: in_features of {bad[0]} is not a multiple of {n_m[1]}")
    batches = list(batches)

    def prune(stats: dict[str, dict]) -> None:
        for name, st in stats.items():
            weight, keep = sparsegpt_weight(linears[name].weight, st["hessian"], sparsity, n_m, block_size, damp)
            _write_weight_(linears[name], weight)
            set_mask_(linears[name], keep)

    done = calibrate_blockwise_(model, linears, batches, prune)
    rest = {name: lin for name, lin in linears.items() if name not in done}  # targets outside the stack
    if rest:
        prune(input_stats(model, rest, batches))
    return sparsity_report(model, linears)


def _write_weight_(linear: nn.Linear, weight: torch.Tensor) -> None:
    """Replace the weight's values (the trainable original under an existing mask)."""
    target = linear.parametrizations.weight.original if hasattr(linear, "parametrizations") else linear.weight
    target.copy_(weight.to(target.dtype))
