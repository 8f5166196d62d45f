"""Low-rank factorisation: truncated SVD of selected `nn.Linear` layers, each replaced by two thin Linears.

W (out x in) ~ U_r S_r V_r^T is split as B = U_r sqrt(S_r) (out x r) and A = sqrt(S_r) V_r^T (r x in), and
the layer becomes `nn.Sequential(Linear(in, r, bias=False), Linear(r, out, bias=<as before>))`. A plain
Sequential keeps the model exportable (ONNX sees two MatMuls) and its state dict simple: P.0.weight,
P.1.weight, P.1.bias. A layer is replaced only where r * (in + out) < in * out, i.e. where it gets fewer
multiply-adds and parameters; the others are left alone and reported as skipped.

The rank is fixed (`rank`) or, per layer, the smallest r keeping `energy` of the squared singular values.
Saving: `model.config.slimtune_lowrank = {module path: rank}` (in the order applied, so a factor of an
earlier low-rank stage can itself be factorised); `slimtune.models.load_model` rebuilds the empty factors
with `apply_lowrank_skeleton_` before loading the weights strictly. The stage is `slimtune.stages.lowrank`.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.modules import module_at, replace_module

CONFIG_KEY = "slimtune_lowrank"


# --------------------------------------------------------------------------------------- ranks
def _svd64(linear: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # float64: the factors of a near-full rank must reproduce the layer to float32 precision
    return torch.linalg.svd(linear.weight.detach().double(), full_matrices=False)


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest r with sum(S[:r]^2) / sum(S^2) >= energy (S sorted in decreasing order)."""
    sq = singular_values.double() ** 2
    total = float(sq.sum())
    if total == 0.0:  # an all-zero weight: one component is as good as any
        return 1
    kept = torch.cumsum(sq, 0) / total
    # a relative tolerance so that energy: 1.0 (or a share met exactly) is not lost to rounding
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype))) + 1


def choose_ranks(model: nn.Module, names, rank: int | None = None, energy: float | None = None) -> dict[str, int]:
    """{module name: rank} for the Linears `names`: `rank` for each, or the rank that keeps `energy`."""
    if (rank is None) == (energy is None):
        raise SlimtuneError("lowrank: set exactly one of rank or energy")
    if rank is not None:
        if rank < 1:
            raise SlimtuneError(f"lowrank: rank must be >= 1, got {rank}")
        return {name: int(rank) for name in names}
    if not 0 < energy <= 1:
        raise SlimtuneError(f"lowrank: energy must be in (0, 1], got {energy}")
    weight = lambda name: module_at(model, name, CONFIG_KEY).weight.detach().double()  # noqa: E731
    return {name: rank_for_energy(torch.linalg.svdvals(weight(name)), energy)
            for name in names}


# ------------------------------------------------------------------------------------ factorising
def _factor_module(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Empty thin factors shaped for `linear` (its dtype, device and trainability)."""
    w = linear.weight
    kw = {"dtype": w.dtype, "device": w.device}
    thin = nn.Sequential(nn.Linear(linear.in_features, rank, bias=False, **kw),
                         nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **kw))
    thin.requires_grad_(w.requires_grad)
    thin.train(linear.training)
    return thin


def factorized_linear(linear: nn.Linear, rank: int, svd: tuple | None = None) -> nn.Sequential:
    """`linear` as Linear(in, rank) -> Linear(rank, out) from its truncated SVD (no FLOP rule applied);
    `svd`: the (U, S, Vh) of its weight in float64, when already computed."""
    u, s, vh = svd if svd is not None else _svd64(linear)
    thin = _factor_module(linear, rank)
    root = s[:rank].sqrt()
    with torch.no_grad():
        thin[0].weight.copy_(root[:, None] * vh[:rank])
        thin[1].weight.copy_(u[:, :rank] * root[None, :])
        if linear.bias is not None:
            thin[1].bias.copy_(linear.bias)
    return thin


def _params(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def skip_reason(linear: nn.Module, rank: int) -> str | None:
    """Why a layer is not factorised at `rank` (None: it is)."""
    if type(linear) is not nn.Linear:  # masked (parametrized) or quantized Linears hold other weights
        return f"a {type(linear).__name__}, not a plain nn.Linear"
    n_in, n_out = linear.in_features, linear.out_features
    if rank >= min(n_in, n_out):
        return f"rank {rank} >= min(in, out) = {min(n_in, n_out)}"
    if rank * (n_in + n_out) >= n_in * n_out:
        return f"rank {rank}: r*(in+out) = {rank * (n_in + n_out)} >= in*out = {n_in * n_out} (no fewer FLOPs)"
    return None


def factorize_(model: nn.Module, names_to_rank: dict[str, int]) -> dict:
    """Replace each listed Linear by its rank-r factors, where that reduces FLOPs; in place.

    Returns {"layers": {name: rank, energy kept, params before/after, relative weight error},
             "skipped": {name: {"rank", "reason"}}}; `model.config.slimtune_lowrank` records the ranks."""
    layers, skipped = {}, {}
    for name, rank in names_to_rank.items():
        linear = module_at(model, name, CONFIG_KEY)
        reason = skip_reason(linear, rank)
        if reason is not None:
            skipped[name] = {"rank": int(rank), "reason": reason}
            continue
        svd = _svd64(linear)
        thin = factorized_linear(linear, rank, svd)
        s, w = svd[1], linear.weight.detach().double()
        approx = thin[1].weight.detach().double() @ thin[0].weight.detach().double()
        norm = float(torch.linalg.matrix_norm(w))
        layers[name] = {
            "rank": int(rank), "in": linear.in_features, "out": linear.out_features,
            "energy_kept": round(float((s[:rank] ** 2).sum() / (s ** 2).sum()) if norm else 1.0, 6),
            "params_before": _params(linear), "params_after": sum(p.numel() for p in thin.parameters()),
            "rel_weight_error": round(float(torch.linalg.matrix_norm(w - approx)) / norm if norm else 0.0, 6)}
        replace_module(model, name, thin)
    record_ranks_(model, {name: info["rank"] for name, info in layers.items()})
    return {"layers": layers, "skipped": skipped}


# ---------------------------------------------------------------------------------- the skeleton
def record_ranks_(model: nn.Module, spec: dict[str, int]) -> None:
    """Add `spec` to the ranks the config records (save_pretrained writes them into config.json)."""
    config = getattr(model, "config", None)
    if config is None or not spec:
        return
    setattr(config, CONFIG_KEY, {**(getattr(config, CONFIG_KEY, None) or {}), **spec})


def apply_lowrank_skeleton_(model: nn.Module, spec: dict) -> None:
    """Replace each Linear of `spec` ({module path: rank}, in order) by empty factors of that rank, so
    the state dict of a saved low-rank model loads strictly."""
    if not isinstance(spec, dict):
        raise SlimtuneError(f"{CONFIG_KEY}: expected {{module path: rank}}, got {type(spec).__name__}")
    for path, rank in spec.items():
        module = module_at(model, path, CONFIG_KEY)
        if type(module) is not nn.Linear:
            raise SlimtuneError(f"{CONFIG_KEY}: module '{path}' is a {type(module).__name__}, not an nn.Linear")
        if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
            raise SlimtuneError(f"{CONFIG_KEY}: module '{path}': rank must be a positive integer, got {rank!r}")
        replace_module(model, path, _factor_module(module, rank))


def is_factorised(module: nn.Module, rank: int) -> bool:
    return (isinstance(module, nn.Sequential) and len(module) == 2 and isinstance(module[0], nn.Linear)
            and module[0].out_features == rank)
