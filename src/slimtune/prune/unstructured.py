"""Unstructured pruning of `nn.Linear` weights: magnitude (one-shot or gradual) and activation-aware (Wanda).

Works on any `nn.Linear` targets, so encoders and causal LMs share it. A pruned weight is held at
zero by a mask: a torch parametrization `weight = original * mask`, recomputed at every access, so
the optimizer updates `original` while the effective weight stays zero through recovery training.
The mask is a buffer of the model, so training checkpoints hold it. (Not `torch.nn.utils.prune`:
its modules cannot be deep-copied, and its `weight` attribute is stale between forwards.)
`make_permanent_` folds the masks into plain weights with zeros: the saved model is a plain HF model.

Masks only ever shrink: pruning a masked layer again keeps its earlier zeros (no regrowth).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from slimtune.batching import model_inputs
from slimtune.errors import SlimtuneError
from slimtune.modules import select_linears

NORMS = ("l1", "l2", "none")
SCOPES = ("per_layer", "global")
# Never pruned by default when a model has no recognisable layer stack: task heads and embeddings.


@dataclass
class PruneReport:
    per_layer: dict[str, float] = field(default_factory=dict)  # module name -> fraction of zero weights
    overall: float = 0.0
    n_weights: int = 0
    n_zeros: int = 0

    def summary(self) -> dict:
        return {"overall": round(self.overall, 4), "n_weights": self.n_weights, "n_zeros": self.n_zeros,
                "per_layer": {k: round(v, 4) for k, v in self.per_layer.items()}}


# --- targets ----------------------------------------------------------------------------------


# --- masks ------------------------------------------------------------------------------------


class WeightMask(nn.Module):
    """weight = original * mask (a bool buffer), recomputed at every access of `linear.weight`."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


def mask_of(linear: nn.Module) -> torch.Tensor | None:
    if not parametrize.is_parametrized(linear, "weight"):
        return None
    return next((p.mask for p in linear.parametrizations.weight if isinstance(p, WeightMask)), None)


def set_mask_(linear: nn.Linear, keep: torch.Tensor) -> None:
    """Hold `linear.weight` at zero where `keep` is False, on top of any mask it already has."""
    keep = keep.to(device=linear.weight.device, dtype=torch.bool)
    mask = mask_of(linear)
    if mask is None:
        parametrize.register_parametrization(linear, "weight", WeightMask(keep.clone()))
    else:
        mask &= keep  # in place: the buffer the optimizer's run and checkpoints already know


def _keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """False at the `n_prune` lowest scores (ties broken by position, so the count is exact)."""
    keep = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
    if n_prune > 0:
        keep[torch.argsort(scores.flatten(), stable=True)[:n_prune]] = False
    return keep.view_as(scores)


def _keep_top_per_row(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune > 0:
        keep.scatter_(1, torch.argsort(scores, dim=1, stable=True)[:, :n_prune], False)
    return keep


def _keep_n_of_m(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest of every m consecutive weights along the input dim (2:4 for sparse kernels)."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


# --- magnitude --------------------------------------------------------------------------------


def magnitude_scores(linear: nn.Linear, norm: str = "l1") -> torch.Tensor:
    """Importance of each weight of `linear`, comparable across layers for a global ranking.

    l1:   |w| / mean|W|     (n·|w| / ‖W‖₁)
    l2:   w² / mean(W²)     (n·w² / ‖W‖₂²: the weight's share of its layer's energy)
    none: |w|               (raw magnitude: classic global pruning, which strips small-scale layers)

    Within one layer the three rank weights identically, so per-layer masks do not depend on `norm`.
    Across layers (scope="global") l1 and l2 are scale-free: l2 is |w| over the layer's RMS, which
    exceeds its mean |w| when a few large weights dominate, so heavy-tailed layers lose more of their
    typical weights under l2 and sparsity spreads more evenly under l1. The norms are of the current
    (masked) weights: a layer already pruned hard has a smaller norm, its survivors rank higher, and
    global pruning does not collapse it.
    """
    _check_choice("norm", norm, NORMS)
    w = linear.weight.detach().float()
    if norm == "l1":
        return w.abs() / w.abs().mean().clamp_min(1e-12)
    if norm == "l2":
        return w.square() / w.square().mean().clamp_min(1e-24)
    return w.abs()


@torch.no_grad()
def prune_magnitude_(model: nn.Module, sparsity: float | None = None, threshold: float | None = None,
                     scope: str = "per_layer", norm: str = "l1", targets: list[str] | None = None,
                     ignore: list[str] | None = None) -> PruneReport:
    """Zero the least important weights of the targets: a `sparsity` fraction of each layer
    (per_layer) or of all targets together (global), or every weight with |w| < `threshold`
    (an absolute threshold on the raw weight, whatever the scope and norm)."""
    if (sparsity is None) == (threshold is None):
        raise SlimtuneError("give exactly one of sparsity or threshold")
    _check_choice("scope", scope, SCOPES)
    _check_choice("norm", norm, NORMS)
    linears = select_linears(model, targets, ignore)
    if threshold is not None:
        if threshold < 0:
            raise SlimtuneError(f"threshold {threshold} is negative")
        for lin in linears.values():
            set_mask_(lin, lin.weight.abs() >= threshold)
    else:
        _prune_to_(linears, _check_sparsity(sparsity), scope, norm)
    return sparsity_report(model, linears)


def _prune_to_(linears: dict[str, nn.Linear], sparsity: float, scope: str, norm: str) -> None:
    scores = {n: magnitude_scores(lin, norm) for n, lin in linears.items()}
    if scope == "per_layer":
        for n, lin in linears.items():
            set_mask_(lin, _keep_top(scores[n], round(sparsity * scores[n].numel())))
        return
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = _keep_top(flat, round(sparsity * flat.numel()))
    for (n, lin), part in zip(linears.items(), keep.split([s.numel() for s in scores.values()]), strict=True):
        set_mask_(lin, part.view_as(scores[n]))


# --- gradual (Zhu & Gupta 2017) ---------------------------------------------------------------


def ramp_steps(total_steps: int, start_frac: float, end_frac: float) -> tuple[int, int]:
    """(t0, t1): the steps where the cubic ramp starts and where it reaches the final sparsity."""
    start = round(start_frac * total_steps)
    return start, max(round(end_frac * total_steps), start)


def cubic_sparsity(step: int, total_steps: int, final_sparsity: float, initial_sparsity: float = 0.0,
                   start_frac: float = 0.0, end_frac: float = 0.8, every: int | None = None) -> float:
    """s_t = s_f + (s_i - s_f)(1 - (t - t0)/(t1 - t0))³ between t0 = start_frac·total and
    t1 = end_frac·total, constant between pruning events every `every` steps (default: 20 events);
    0 before t0 (dense training), s_f from t1 on. Prunes fast early, when many weights are redundant,
    and slowly near the end, giving the network time to recover."""
    _check_schedule(total_steps, final_sparsity, initial_sparsity, start_frac, end_frac, every)
    start, end = ramp_steps(total_steps, start_frac, end_frac)
    if step < start:
        return 0.0
    if step >= end:
        return final_sparsity
    every = every or max(1, (end - start) // 20)
    t = start + (step - start) // every * every
    return final_sparsity + (initial_sparsity - final_sparsity) * (1 - (t - start) / (end - start)) ** 3


class GradualPruner:
    """Gradual magnitude pruning during training: `train(..., on_step=pruner.step)`.

    Create it before `train()`: it wraps the targets in all-ones masks at once, so the optimizer that
    `train()` builds already holds the masked parameters. It keeps no state of its own: the target
    sparsity is a pure function of the step, and the masks are buffers in the model, saved in every
    checkpoint. A resumed run loads the masks of step r and continues with on_step(r + 1): the same
    masks at the same steps as an uninterrupted run (and with fresh masks, the next call prunes up to
    the schedule). Beware `keep_best`: restoring an earlier best-dev state restores its less sparse
    masks too; let only evaluations from `final_step` on compete (`train(..., best_from_step=)`).
    """

    def __init__(self, model: nn.Module, final_sparsity: float, total_steps: int, *,
                 initial_sparsity: float = 0.0, start_frac: float = 0.0, end_frac: float = 0.8,
                 every: int | None = None, scope: str = "per_layer", norm: str = "l1",
                 targets: list[str] | None = None, ignore: list[str] | None = None):
        _check_schedule(total_steps, final_sparsity, initial_sparsity, start_frac, end_frac, every)
        _check_choice("scope", scope, SCOPES)
        _check_choice("norm", norm, NORMS)
        self.model, self.scope, self.norm = model, scope, norm
        self.schedule = dict(total_steps=total_steps, final_sparsity=final_sparsity, initial_sparsity=initial_sparsity,
                             start_frac=start_frac, end_frac=end_frac, every=every)
        self.linears = select_linears(model, targets, ignore)
        for lin in self.linears.values():
            set_mask_(lin, torch.ones_like(lin.weight, dtype=torch.bool))
        self.n_weights = sum(lin.weight.numel() for lin in self.linears.values())

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, **self.schedule)

    @property
    def final_step(self) -> int:
        """The first step at the final sparsity: the masks change no more from there."""
        sch = self.schedule
        return ramp_steps(sch["total_steps"], sch["start_frac"], sch["end_frac"])[1]

    @torch.no_grad()
    def step(self, step: int) -> PruneReport | None:
        """Prune up to the schedule's sparsity at `step`; None when the masks are already there."""
        masked = sum(int((~mask_of(lin)).sum()) for lin in self.linears.values())
        # per-layer rounding may leave up to one weight per layer short of target·n: that is "there"
        if self.sparsity_at(step) * self.n_weights - masked <= len(self.linears):
            return None
        _prune_to_(self.linears, self.sparsity_at(step), self.scope, self.norm)
        return sparsity_report(self.model, self.linears)

    __call__ = step


# --- activation-aware (Wanda, Sun et al. 2023) ------------------------------------------------


@torch.no_grad()
def collect_input_norms(model: nn.Module, linears: dict[str, nn.Linear],
                        batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ of every input feature j of each linear, over all real tokens of the calibration
    batches (dicts from `slimtune.batching.collate`): padding positions are left out when the batch
    has an attention_mask, so the norms do not depend on how the sample was batched."""
    sq = {n: torch.zeros(lin.in_features, dtype=torch.float64, device=lin.weight.device)
          for n, lin in linears.items()}
    tokens: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(name: str):
        def accumulate(module, args):
            x, mask = args[0].detach(), tokens["mask"]
            if mask is not None and x.shape[:-1] == mask.shape:
                x = x[mask]  # per-token inputs: real tokens only (a pooler's [B, H] input has no padding)
            sq[name] += x.reshape(-1, x.shape[-1]).double().square().sum(0)
        return accumulate

    handles = [lin.register_forward_pre_hook(hook(n)) for n, lin in linears.items()]
    was_training, seen = model.training, 0
    model.eval()
    try:
        for batch in batches:
            mask = batch.get("attention_mask")
            tokens["mask"] = None if mask is None else mask.bool()
            model(**model_inputs(batch))
            seen += 1
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not seen:
        raise SlimtuneError("calibration set is empty")
    return {n: s.sqrt().float() for n, s in sq.items()}


@torch.no_grad()
def prune_activation_(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], sparsity: float | None = None,
                      n_m: tuple[int, int] | None = None, targets: list[str] | None = None,
                      ignore: list[str] | None = None) -> PruneReport:
    """Wanda: score |W_ij|·‖X_j‖₂, so a small weight on a high-energy input feature survives.

    `sparsity`: prune that fraction of each output row (Wanda's comparison group), or `n_m=(N, M)`:
    keep the N best of every M consecutive weights along the input dim (2:4 semi-structured).
    One calibration pass over the dense model (the reference code re-collects each block's inputs
    after pruning the blocks before it; one pass keeps this architecture-agnostic).
    """
    if (sparsity is None) == (n_m is None):
        raise SlimtuneError("give exactly one of sparsity or n_m")
    linears = select_linears(model, targets, ignore)
    if n_m is not None:
        n, m = n_m
        if not 0 < n <= m:
            raise SlimtuneError(f"n_m {tuple(n_m)}: need 0 < N <= M")
        bad = [name for name, lin in linears.items() if lin.in_features % m]
        if bad:
            raise SlimtuneError(f"n_m {tuple(n_m)}: in_features of {bad[0]} is not a multiple of {m}")
    else:
        _check_sparsity(sparsity)
    norms = collect_input_norms(model, linears, batches)
    for name, lin in linears.items():
        scores = lin.weight.abs().float() * norms[name]  # broadcast over the input columns
        keep = _keep_n_of_m(scores, *n_m) if n_m else _keep_top_per_row(scores, round(sparsity * lin.in_features))
        set_mask_(lin, keep)
    return sparsity_report(model, linears)


def make_permanent_(model: nn.Module) -> PruneReport:
    """Fold every mask into its weight and drop the masking machinery: plain `nn.Linear`s with zeros,
    which `save_pretrained` writes as a plain HF model. Returns the sparsity of the layers it touched."""
    masked = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and mask_of(m) is not None}
    for lin in masked.values():
        _unmask_(lin)
    return sparsity_report(model, masked)


def _unmask_(linear: nn.Linear) -> None:
    """torch's remove_parametrizations without its `delattr(module.__class__, "weight")`: deep copies
    of a masked model share the injected ParametrizedLinear class, and that delattr would break them."""
    if len(linear.parametrizations) > 1 or len(linear.parametrizations.weight) > 1:  # not only our mask
        parametrize.remove_parametrizations(linear, "weight", leave_parametrized=True)
        return
    original = linear.parametrizations.weight.original
    with torch.no_grad():
        original.copy_(linear.weight)  # the same Parameter object: an optimizer holding it stays valid
    del linear.parametrizations
    linear.__class__ = linear.__class__.__bases__[0]  # the class parametrize subclassed
    linear.weight = original


@torch.no_grad()
def sparsity_report(model: nn.Module, linears: dict[str, nn.Linear] | None = None) -> PruneReport:
    """Zeros / weights of each linear (default: the default targets) and overall."""
    linears = select_linears(model) if linears is None else linears
    report = PruneReport()
    for name, lin in linears.items():
        w = lin.weight
        zeros = int((w == 0).sum())
        report.per_layer[name] = zeros / w.numel()
        report.n_weights += w.numel()
        report.n_zeros += zeros
    report.overall = report.n_zeros / report.n_weights if report.n_weights else 0.0
    return report


def _check_sparsity(sparsity: float) -> float:
    if not 0 <= sparsity < 1:
        raise SlimtuneError(f"sparsity {sparsity} outside [0, 1)")
    return float(sparsity)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise SlimtuneError(f"{what} {value!r} is not one of {', '.join(choices)}")


def _check_schedule(total_steps: int, final: float, initial: float, start_frac: float, end_frac: float,
                    every: int | None) -> None:
    _check_sparsity(final)
    if not 0 <= initial <= final:
        raise SlimtuneError(f"initial_sparsity {initial} outside [0, final_sparsity {final}]")
    if not 0 <= start_frac <= end_frac <= 1:
        raise SlimtuneError(f"start_frac {start_frac} / end_frac {end_frac}: need 0 <= start <= end <= 1")
    if total_steps < 1 or (every is not None and every < 1):
        raise SlimtuneError(f"total_steps {total_steps} and every {every} must be >= 1")
