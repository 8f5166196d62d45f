"""Structured pruning that removes what it prunes: attention heads, FFN neurons and whole layers.

Pruned parts leave the model: the Linear layers are sliced into smaller ones, heads and layers
disappear, so the saved file is smaller and the forward pass faster (no masks full of zeros).
Works on BERT/RoBERTa-style encoder layers (attention.self.query ..., attention.output.dense) and,
for neurons and layers, MPNet-style ones.

Saving (`structured_config_update`, run by every prune_*_ call): uniform FFN widths with all heads
kept is a plain HF model. Removed heads or uneven widths record `heads_per_layer` /
`intermediate_per_layer` and `slimtune_format: pruned` in the config; a BertForSequenceClassification
becomes a PrunedBertForSequenceClassification (model_type `slimtune_pruned_bert`), which
transformers' Auto classes load once `slimtune` is imported (see slimtune.models).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from slimtune.adapt.layers import anatomy
from slimtune.batching import cross_entropy_loss
from slimtune.config import PRUNED_MODEL_TYPE
from slimtune.errors import SlimtuneError

Batches = Sequence[dict[str, torch.Tensor]]
LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]


@dataclass(frozen=True)
class _Layout:
    """Where the prunable Linears of one encoder layer live (paths relative to the layer)."""

    attn: str  # the module holding num_attention_heads / all_head_size / attention_head_size
    q: str
    k: str
    v: str
    o: str  # attention output projection; its input is the concatenated per-head contexts
    ffn_in: str
    ffn_out: str
    heads_removable: bool = True


LAYOUTS = (
    _Layout("attention.self", "attention.self.query", "attention.self.key", "attention.self.value",
            "attention.output.dense", "intermediate.dense", "output.dense"),  # BERT, RoBERTa, ELECTRA...
    # MPNet adds one relative position bias of shape [heads, ...] to every layer: heads must stay.
    _Layout("attention.attn", "attention.attn.q", "attention.attn.k", "attention.attn.v",
            "attention.attn.o", "intermediate.dense", "output.dense", heads_removable=False),
)


def _has(module: nn.Module, path: str) -> bool:
    try:
        module.get_submodule(path)
    except AttributeError:
        return False
    return True


def _encoder(model: nn.Module) -> tuple[nn.ModuleList, _Layout]:
    layers = model.get_submodule(anatomy(model).layers)
    for lay in LAYOUTS:
        if all(_has(layers[0], p) for p in (lay.q, lay.k, lay.v, lay.o, lay.ffn_in, lay.ffn_out)):
            return layers, lay
    raise SlimtuneError(f"{type(layers[0]).__name__}: structured pruning supports BERT/RoBERTa-style "
                        "(attention.self.query...) and MPNet-style (attention.attn.q...) encoder layers only")


def _heads(layer: nn.Module, lay: _Layout) -> tuple[int, int]:
    """(number of heads, head size) of one layer as it is now."""
    attn = layer.get_submodule(lay.attn)
    return attn.num_attention_heads, attn.attention_head_size


def _width(layer: nn.Module, lay: _Layout) -> int:
    return layer.get_submodule(lay.ffn_in).out_features


# ------------------------------------------------------------------------------ gates (masking)
@contextmanager
def _input_gates(modules: list[nn.Module], gates: Sequence[torch.Tensor], repeat: list[int]):
    def hook(g, r):
        return lambda mod, args: (args[0] * g.repeat_interleave(r), *args[1:])

    handles = [m.register_forward_pre_hook(hook(g, r)) for m, g, r in zip(modules, gates, repeat, strict=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def head_gates(model: nn.Module, gates: Sequence[torch.Tensor]):
    """Context: multiply head h of layer i's context by gates[i][h] (the output projection's input).

    This is the old `head_mask` (which scaled the attention probabilities; the context is linear in
    them), which transformers 5 dropped: 0 is exactly a removed head, d loss / d gate is Michel's score.
    """
    layers, lay = _encoder(model)
    return _input_gates([la.get_submodule(lay.o) for la in layers], gates, [_heads(la, lay)[1] for la in layers])


def neuron_gates(model: nn.Module, gates: Sequence[torch.Tensor]):
    """Context: multiply FFN neuron j of layer i (its activation) by gates[i][j]; 0 = a removed neuron."""
    layers, lay = _encoder(model)
    return _input_gates([la.get_submodule(lay.ffn_out) for la in layers], gates, [1] * len(layers))


@contextmanager
def skip_layers(model: nn.Module, skipped: Sequence[int]):
    """Context: the given layers pass their input through unchanged, as if dropped."""
    def identity(mod, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return h if isinstance(out, torch.Tensor) else (h, *out[1:])

    layers, _ = _encoder(model)
    handles = [layers[i].register_forward_hook(identity, with_kwargs=True) for i in skipped]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


# ------------------------------------------------------------------------------------ importance
def _check_batches(batches: Batches | None) -> list:
    batches = list(batches or [])
    if not batches:
        raise SlimtuneError("structured pruning: the calibration set is empty (no batches to score on)")
    return batches


@contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off while scoring: the scores should not depend on the dropout draw."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _gate_grads(model: nn.Module, batches: Batches, loss_fn: LossFn | None, sizes: list[int], gated) -> list:
    """|d loss / d gate| per gate, summed over batches (absolute value per batch, as Michel et al.)."""
    batches, loss_fn = _check_batches(batches), loss_fn or cross_entropy_loss
    device = next(model.parameters()).device
    gates = [torch.ones(n, device=device, requires_grad=True) for n in sizes]
    scores = [torch.zeros(n, device=device) for n in sizes]
    with _eval_mode(model), gated(model, gates):
        for batch in batches:
            for s, g in zip(scores, torch.autograd.grad(loss_fn(model, batch), gates), strict=True):
                s += g.abs()
    return scores


def _rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Stack per-layer scores; layers with fewer heads (already pruned) are padded with NaN."""
    out = torch.full((len(rows), max(len(r) for r in rows)), float("nan"))
    for i, r in enumerate(rows):
        out[i, : len(r)] = r.detach().float().cpu()
    return out


def head_importance(model: nn.Module, batches: Batches, loss_fn: LossFn | None = None) -> torch.Tensor:
    """[layers, heads] gradient importance (Michel et al. 2019), L2-normalised within each layer."""
    layers, lay = _encoder(model)
    scores = _rows(_gate_grads(model, batches, loss_fn, [_heads(la, lay)[0] for la in layers], head_gates))
    # the paper's layer-wise normalisation: deeper layers have larger gradients, yet a global plan compares them
    return scores / scores.nan_to_num().norm(dim=-1, keepdim=True).clamp_min(1e-20)


@torch.no_grad()
def head_importance_by_weight(model: nn.Module) -> torch.Tensor:
    """[layers, heads] data-free importance: L2 norm of each head's Q/K/V rows and output columns."""
    layers, lay = _encoder(model)
    rows = []
    for la in layers:
        n, d = _heads(la, lay)
        sq = sum(la.get_submodule(p).weight.view(n, -1).pow(2).sum(1) for p in (lay.q, lay.k, lay.v))
        o = la.get_submodule(lay.o).weight
        rows.append((sq + o.view(o.shape[0], n, d).pow(2).sum((0, 2))).sqrt())
    return _rows(rows)


def ffn_importance(model: nn.Module, batches: Batches | None = None, loss_fn: LossFn | None = None) -> list:
    """Per layer, a [intermediate] score per FFN neuron.

    With batches: first-order Taylor |sum activation x gradient| (= |d loss / d neuron gate|) per
    batch, summed. Without: ||input row|| x ||output column|| of the neuron's two weights.
    """
    layers, lay = _encoder(model)
    if batches is not None:
        return [s.cpu() for s in _gate_grads(model, batches, loss_fn, [_width(la, lay) for la in layers], neuron_gates)]
    with torch.no_grad():
        return [(la.get_submodule(lay.ffn_in).weight.norm(dim=1) * la.get_submodule(lay.ffn_out).weight.norm(dim=0))
                .cpu() for la in layers]


@torch.no_grad()
def layer_importance(model: nn.Module, batches: Batches, loss_fn: LossFn | None = None) -> torch.Tensor:
    """[layers] loss increase on the batches when the layer is skipped (may be negative).

    Measured rather than summed from head/FFN scores: those are normalised per layer (so not
    comparable across layers) and ignore the residual stream. Costs one pass over the batches per
    layer, cheap for the 6-12 layers of an encoder.
    """
    batches, loss_fn = _check_batches(batches), loss_fn or cross_entropy_loss
    layers, _ = _encoder(model)

    def loss(skipped: list[int]) -> float:
        with skip_layers(model, skipped):
            return sum(loss_fn(model, b).item() for b in batches) / len(batches)

    with _eval_mode(model):
        base = loss([])
        return torch.tensor([loss([i]) - base for i in range(len(layers))])


# ------------------------------------------------------------------------------------------ plans
def _keep_count(n: int, fraction: float) -> int:
    if not 0 <= fraction < 1:
        raise SlimtuneError(f"structured pruning: fraction {fraction} is outside [0, 1)")
    return n - int(fraction * n + 0.5)


def _plan(scores: list[torch.Tensor], fraction: float, uniform: bool) -> list[torch.Tensor]:
    """Sorted indices to keep per layer: the top scores per layer, or globally."""
    if uniform:
        return [s.topk(_keep_count(len(s), fraction)).indices.sort().values for s in scores]
    flat = torch.cat(scores)
    keep = torch.zeros(len(flat), dtype=torch.bool)
    keep[flat.topk(_keep_count(len(flat), fraction)).indices] = True
    return [idx.nonzero().flatten() for idx in keep.split([len(s) for s in scores])]


def plan_heads(importance: torch.Tensor, fraction: float, uniform: bool = True) -> dict[int, list[int]]:
    """Heads to keep per layer after removing `fraction` of them (same count per layer, or global)."""
    rows = [r[~r.isnan()] for r in importance.float()]
    return {i: k.tolist() for i, k in enumerate(_plan(rows, fraction, uniform))}


def plan_ffn(importance: Sequence[torch.Tensor], fraction: float, uniform: bool = True) -> dict[int, torch.Tensor]:
    """FFN neurons to keep per layer after removing `fraction` of them (same count per layer, or global)."""
    return dict(enumerate(_plan([s.float() for s in importance], fraction, uniform)))


def plan_layers(importance: torch.Tensor, n: int) -> list[int]:
    """The `n` least important layers, to drop."""
    if not 0 <= n < len(importance):
        raise SlimtuneError(f"structured pruning: cannot drop {n} of {len(importance)} layers")
    return sorted(importance.argsort()[:n].tolist())


# --------------------------------------------------------------------------------------- removal
def _slice_linear(lin: nn.Module, idx: torch.Tensor, dim: int) -> nn.Linear:
    """A new smaller Linear keeping output rows (dim 0) or input columns (dim 1) `idx`."""
    if not isinstance(lin, nn.Linear):
        raise SlimtuneError(f"structured pruning: expected nn.Linear, found {type(lin).__name__}")
    w = lin.weight.detach().index_select(dim, idx.to(lin.weight.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias.index_select(0, idx.to(w.device)) if dim == 0 else lin.bias)
    new.requires_grad_(lin.weight.requires_grad)
    return new


def _replace(layer: nn.Module, path: str, idx: torch.Tensor, dim: int) -> None:
    parent, _, name = path.rpartition(".")
    holder = layer.get_submodule(parent)
    setattr(holder, name, _slice_linear(getattr(holder, name), idx, dim))


def _keep_heads(layer: nn.Module, lay: _Layout, keep: list[int]) -> None:
    attn = layer.get_submodule(lay.attn)
    d, dev = attn.attention_head_size, layer.get_submodule(lay.q).weight.device
    rows = (torch.tensor(keep, device=dev)[:, None] * d + torch.arange(d, device=dev)).flatten()
    for p in (lay.q, lay.k, lay.v):
        _replace(layer, p, rows, 0)
    _replace(layer, lay.o, rows, 1)
    # the forward reshapes to (-1, head size), so these two attributes are all that changes
    attn.num_attention_heads, attn.all_head_size = len(keep), len(keep) * d


def _keep_neurons(layer: nn.Module, lay: _Layout, keep: torch.Tensor) -> None:
    _replace(layer, lay.ffn_in, keep, 0)
    _replace(layer, lay.ffn_out, keep, 1)


def _checked(kind: str, i: int, keep, n_layers: int, size: int) -> list[int]:
    keep = sorted({int(k) for k in keep})
    if not 0 <= i < n_layers:
        raise SlimtuneError(f"structured pruning: layer {i} does not exist (the model has {n_layers})")
    if keep and not 0 <= keep[0] <= keep[-1] < size:
        raise SlimtuneError(f"layer {i}: {kind} index out of range (the layer has {size})")
    return keep


def prune_heads_(model: nn.Module, heads_to_keep: dict[int, Sequence[int]], drop_empty_layers: bool = False) -> list:
    """Remove every head not listed, in place (layers not in the dict keep all). Returns dropped layers."""
    layers, lay = _encoder(model)
    if not lay.heads_removable:
        raise SlimtuneError(f"{type(layers[0].get_submodule(lay.attn)).__name__}: removing heads is not "
                            "supported (its relative position bias is shared by all layers)")
    plan = {i: _checked("head", i, k, len(layers), _heads(layers[i], lay)[0]) for i, k in heads_to_keep.items()}
    empty = sorted(i for i, k in plan.items() if not k)
    if empty and not drop_empty_layers:
        raise SlimtuneError(f"layer {empty[0]}: pruning every head would remove the layer; use layers: to drop it")
    for i, keep in plan.items():
        if keep and len(keep) < _heads(layers[i], lay)[0]:
            _keep_heads(layers[i], lay, keep)
    if empty:
        drop_layers_(model, empty)
    structured_config_update(model)
    return empty


def prune_ffn_(model: nn.Module, neurons_to_keep: dict[int, torch.Tensor | Sequence[int]]) -> None:
    """Remove every FFN neuron not listed, in place (layers not in the dict keep all)."""
    layers, lay = _encoder(model)
    plan = {i: _checked("neuron", i, k, len(layers), _width(layers[i], lay)) for i, k in neurons_to_keep.items()}
    for i, keep in plan.items():
        if not keep:
            raise SlimtuneError(f"layer {i}: pruning every FFN neuron is not supported; use layers: to drop it")
        if len(keep) < _width(layers[i], lay):
            _keep_neurons(layers[i], lay, torch.tensor(keep))
    structured_config_update(model)


def drop_layers_(model: nn.Module, layers_to_drop: Sequence[int]) -> None:
    """Remove whole encoder layers, in place."""
    path = anatomy(model).layers
    layers, _ = _encoder(model)
    drop = {int(i) for i in layers_to_drop}
    if bad := sorted(i for i in drop if not 0 <= i < len(layers)):
        raise SlimtuneError(f"structured pruning: layer {bad[0]} does not exist (the model has {len(layers)})")
    if len(drop) == len(layers):
        raise SlimtuneError("structured pruning: cannot drop every layer")
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, nn.ModuleList(la for i, la in enumerate(layers) if i not in drop))
    model.config.num_hidden_layers = len(layers) - len(drop)
    structured_config_update(model)


# ------------------------------------------------------------------------------- config and load
@strict
class PrunedBertConfig(BertConfig):
    """BertConfig plus the per-layer shapes of a structurally pruned model."""

    model_type = PRUNED_MODEL_TYPE
    heads_per_layer: list[int] | None = None
    intermediate_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _register_auto_model()  # the model class needs modeling_bert, so it is registered on first use


_PRUNED_KEYS = ("heads_per_layer", "intermediate_per_layer", "slimtune_format")


class PrunedBertForSequenceClassification(BertForSequenceClassification):
    """A BertForSequenceClassification built at full size, then shrunk to the config's shapes."""

    config_class = PrunedBertConfig

    def __init__(self, config: PrunedBertConfig):
        super().__init__(config)
        shrink_to_config(self)


def structured_config_update(model: nn.Module) -> dict:
    """Record the per-layer shapes in model.config (see the module docstring); returns them."""
    layers, lay = _encoder(model)
    cfg = model.config
    heads, widths = [_heads(la, lay)[0] for la in layers], [_width(la, lay) for la in layers]
    cfg.num_hidden_layers = len(layers)
    if len(set(widths)) == 1:
        cfg.intermediate_size = widths[0]
    if all(h == cfg.num_attention_heads for h in heads) and len(set(widths)) == 1:  # a plain HF model
        for key in _PRUNED_KEYS:
            cfg.__dict__.pop(key, None)
        if isinstance(cfg, PrunedBertConfig):
            cfg.__class__ = BertConfig
        if type(model) is PrunedBertForSequenceClassification:
            model.__class__ = BertForSequenceClassification
        return {"format": "hf", "heads_per_layer": heads, "intermediate_per_layer": widths}
    cfg.heads_per_layer, cfg.intermediate_per_layer, cfg.slimtune_format = heads, widths, "pruned"
    if type(model) is BertForSequenceClassification:  # same layout, more config: Auto classes can load it
        cfg.__class__ = PrunedBertConfig
        model.__class__ = PrunedBertForSequenceClassification
        _register_auto_model()
    return {"format": "pruned", "heads_per_layer": heads, "intermediate_per_layer": widths}


def shrink_to_config(model: nn.Module) -> nn.Module:
    """Shrink a full-size model's layers to the config's recorded shapes (weights to be loaded after)."""
    layers, lay = _encoder(model)
    cfg = model.config
    heads = getattr(cfg, "heads_per_layer", None) or [_heads(la, lay)[0] for la in layers]
    widths = getattr(cfg, "intermediate_per_layer", None) or [_width(la, lay) for la in layers]
    if not len(heads) == len(widths) == len(layers):
        raise SlimtuneError(f"config heads_per_layer / intermediate_per_layer do not have {len(layers)} entries")
    for la, h, w in zip(layers, heads, widths, strict=True):
        if h != _heads(la, lay)[0]:  # which heads/neurons does not matter: the weights are loaded next
            _keep_heads(la, lay, list(range(h)))
        if w != _width(la, lay):
            _keep_neurons(la, lay, torch.arange(w))
    return model


@functools.cache
def _register_auto_model() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.register(PrunedBertConfig, PrunedBertForSequenceClassification, exist_ok=True)
