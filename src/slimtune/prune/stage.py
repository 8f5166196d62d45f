"""`stage: prune` — magnitude, activation (Wanda, N:M), structured (heads / FFN neurons / layers
physically removed) and iterative prune -> recover rounds; recovery runs on the one training loop,
optionally with a distillation loss from the unpruned model.

Masks (magnitude, activation) are held during recovery and made permanent at the end of the stage,
so the saved model is a plain HF model with zeros. Structured pruning leaves smaller matrices.

Resume: a killed prune stage restarts from its beginning (deterministic, so it ends the same), from
the stage-start weights kept in OUT/checkpoints/; a resume past a finished structured prune stage
rebuilds the pruned shapes recorded in the run state, and the checkpoint's weights fill them.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from slimtune.batching import batch_indices, collate
from slimtune.checkpoint import stage_start_snapshot
from slimtune.distill.losses import cached_distill_loss, online_distill_loss
from slimtune.distill.teachers import check_teacher, teacher_soft_targets
from slimtune.errors import SlimtuneError
from slimtune.prune import structured as st
from slimtune.prune import unstructured as un
from slimtune.recipe import PruneStage, TeacherSpec
from slimtune.train import (
    cross_entropy_loss,
    optimizer_steps,
    seed_everything,
    train,
)

if TYPE_CHECKING:
    from slimtune.runner import RunState


def _calibration(run: RunState, cfg: PruneStage) -> list[dict]:
    """The first `calibration_batches` batches of a seeded shuffle of the train split."""
    order = batch_indices(run.data.train.lengths, cfg.calibration_batch_size, shuffle=True, seed=cfg.seed)
    batches = [collate(run.data.train, idx, run.pad_id) for idx in order[: cfg.calibration_batches]]
    if not batches:
        raise SlimtuneError("prune: calibration set is empty (the train split has no rows)")
    return batches


def _structured_(model, cfg: PruneStage, batches: list[dict], share: float, origin: dict) -> dict:
    """Remove `share` of the configured heads / neurons (fractions of the stage-start counts) and, in
    the last round, the configured layers; returns what was applied."""
    gradient = cfg.importance == "gradient"
    plan: dict = {}
    if cfg.layers and share >= 1.0:  # whole layers go at once (a fraction of a layer is not a thing)
        importance = st.layer_importance(model, batches) if gradient else st.head_importance_by_weight(model).sum(1)
        plan["dropped_layers"] = st.plan_layers(importance, cfg.layers)
        st.drop_layers_(model, plan["dropped_layers"])
    now = st.structured_config_update(model)
    if cfg.heads:
        importance = st.head_importance(model, batches) if gradient else st.head_importance_by_weight(model)
        fraction = _fraction_now(cfg.heads * share, origin["heads_per_layer"], now["heads_per_layer"])
        keep = st.plan_heads(importance, fraction, uniform=cfg.uniform)
        plan["dropped_empty_layers"] = st.prune_heads_(model, keep, drop_empty_layers=cfg.drop_empty_layers)
    if cfg.ffn:
        importance = st.ffn_importance(model, batches if gradient else None)
        fraction = _fraction_now(cfg.ffn * share, origin["intermediate_per_layer"], now["intermediate_per_layer"])
        st.prune_ffn_(model, st.plan_ffn(importance, fraction, uniform=cfg.uniform))
    plan["shapes"] = st.structured_config_update(model)
    return plan


def _fraction_now(target: float, original: list[int], current: list[int]) -> float:
    """Share of what is left to remove now, so that `target` of the stage-start count is gone overall
    (per-layer averages: earlier rounds already removed some)."""
    keep = (sum(original) / len(original)) * (1 - target)
    return min(max(0.0, 1 - keep / (sum(current) / len(current))), 0.999)


def _masks_(model, cfg: PruneStage, method: str, batches: list[dict], share: float) -> dict:
    sparsity = None if cfg.sparsity is None else cfg.sparsity * share
    if method == "activation":
        report = un.prune_activation_(model, batches, sparsity=sparsity, n_m=cfg.n_m, targets=cfg.targets,
                                      ignore=cfg.ignore)
    else:
        report = un.prune_magnitude_(model, sparsity=sparsity, threshold=cfg.threshold, scope=cfg.scope,
                                     norm=cfg.norm, targets=cfg.targets, ignore=cfg.ignore)
    return {"sparsity": round(report.overall, 4)}


def validate_recover(run: RunState, rc) -> None:
    """A recovery teacher must exist and classify exactly the data's labels (checked before the run)."""
    if rc is not None and rc.teacher is not None:
        check_teacher(TeacherSpec(path=rc.teacher), run.data.id2label)


def validate_prune(run: RunState, cfg: PruneStage) -> None:
    validate_recover(run, cfg.recover)
    if cfg.recover is not None and cfg.recover.hidden_weight and cfg.layers:
        raise SlimtuneError(f"prune: recover.hidden_weight matches every layer's hidden states with the unpruned "
                            f"model's, which cannot follow removing whole layers (layers: {cfg.layers})")


def recovery_loss(run: RunState, rc, model) -> tuple:
    """(loss_fn, make_batch) of a stage's recovery, prepared once at stage start, before anything is
    pruned or factorised: the labels alone, the soft targets of a frozen copy of `model` (the stage-start
    model), or those of a fine-tuned teacher run once over the train texts (cached on disk)."""
    if rc is None or not (rc.distill_from_unpruned or rc.teacher is not None):
        return cross_entropy_loss, None
    if rc.distill_from_unpruned:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return online_distill_loss(frozen, rc.temperature, rc.alpha, rc.hidden_weight), None
    from slimtune.runner import console

    soft = teacher_soft_targets(rc.teacher, run.data.train, run.data.id2label, run.data_cfg.max_length,
                                rc.temperature, log=console.print)

    def make_batch(ds, idx):
        return collate(ds, idx, run.pad_id) | {"soft_targets": soft[torch.tensor(idx)]}

    return cached_distill_loss(rc.temperature, rc.alpha), make_batch


def _recover(run: RunState, cfg: PruneStage, model, loss: tuple, phase: int, pruner=None) -> dict:
    """Recovery training with the `recovery_loss` prepared at stage start."""
    rc = cfg.recover
    if rc is None:
        return {}
    loss_fn, make_batch = loss
    ctx = run.train_context(phase=phase)
    ctx.resume = None  # the stage restarts from its beginning on resume (see the module docstring)
    lr, bs = run.resolve_auto(rc, model, loss_fn, make_batch=make_batch)
    # gradual pruning changes the masks until the ramp ends: a "best" from before would bring denser
    # masks back, so only evaluations at the final sparsity compete
    res = train(model, run.data.train, run.data.eval, rc, ctx, loss_fn=loss_fn, make_batch=make_batch, phase=phase,
                lr=lr, batch_size=bs,
                on_step=pruner.step if pruner is not None else None,
                best_from_step=pruner.final_step if pruner is not None else 0)
    return {"recover": res.summary()}


def _one_round(run: RunState, cfg: PruneStage, model, loss: tuple, method: str, share: float, phase: int,
               batches: list[dict], origin: dict | None) -> dict:
    seed_everything(cfg.seed + phase)
    record: dict = {"round": phase, "share": round(share, 4)}
    pruner = None
    if method == "structured":
        record |= _structured_(model, cfg, batches, share, origin)
    elif method == "magnitude" and cfg.schedule == "gradual" and cfg.recover is not None:
        if cfg.sparsity is None:
            raise SlimtuneError("prune: schedule gradual needs sparsity (not threshold)")
        steps = optimizer_steps(len(run.data.train), run.resolve_auto(cfg.recover, model, cross_entropy_loss)[1],
                                cfg.recover)
        pruner = un.GradualPruner(model, cfg.sparsity * share, steps, scope=cfg.scope, norm=cfg.norm,
                                  targets=cfg.targets, ignore=cfg.ignore, end_frac=cfg.gradual_end)
    else:
        record |= _masks_(model, cfg, method, batches, share)
    record |= _recover(run, cfg, model, loss, phase, pruner)
    if method != "structured":
        record["sparsity"] = round(un.sparsity_report(model, _targets(model, cfg)).overall, 4)
    record["accuracy"] = run.eval_accuracy(model)
    return record


def _targets(model, cfg: PruneStage):
    return un.select_linears(model, cfg.targets, cfg.ignore)


def run_prune(run: RunState, cfg: PruneStage) -> dict:
    from slimtune.adapt.lora import is_peft

    model = run.model
    if is_peft(model):
        raise SlimtuneError("prune: the model is an unmerged LoRA adapter; set lora.save_adapter_only: false")
    stage_start_snapshot(run, model)
    method = cfg.iterative.method if cfg.method == "iterative" else cfg.method
    if method in ("magnitude", "activation") and cfg.sparsity is None and cfg.threshold is None \
            and cfg.n_m is None:
        raise SlimtuneError(f"prune: method {method} needs sparsity" + (" or threshold" if method == "magnitude"
                                                                          else " or n_m"))
    if method == "structured" and not (cfg.heads or cfg.ffn or cfg.layers):
        raise SlimtuneError("prune: structured needs heads, ffn or layers")
    batches = _calibration(run, cfg)
    params_before = sum(p.numel() for p in model.parameters())
    start_acc = run.eval_accuracy(model)
    loss = recovery_loss(run, cfg.recover, model)
    rounds = cfg.iterative.rounds if cfg.method == "iterative" else 1
    rewind = copy.deepcopy(model.state_dict()) if cfg.method == "iterative" and cfg.iterative.rewind else None
    if rewind is not None and method == "structured":
        raise SlimtuneError("prune: iterative.rewind works with magnitude/activation masks, not structured")
    origin = st.structured_config_update(model) if method == "structured" else None
    records, kept = [], None
    for k in range(rounds):
        before = copy.deepcopy(model) if rounds > 1 else None
        if rewind is not None and k > 0:  # survivors back to their stage-start values, masks kept
            _rewind_(model, rewind)
        record = _one_round(run, cfg, model, loss, method, (k + 1) / rounds, k, batches, origin)
        records.append(record)
        if rounds > 1 and start_acc - record["accuracy"] > cfg.iterative.max_drop:
            record["stopped"] = f"dev accuracy {record['accuracy']:.4f} fell more than {cfg.iterative.max_drop} " \
                                f"below {start_acc:.4f}; keeping round {k - 1}"
            kept = before
            break
    if kept is not None:
        model = run.model = kept
    if method != "structured":
        un.make_permanent_(model)
    run.runner_state.setdefault("prune_shapes", {})[str(run.stage_index)] = st.structured_config_update(model) \
        if method == "structured" else None
    params = sum(p.numel() for p in model.parameters())
    return {"stage": "prune", "method": cfg.method, "start_accuracy": start_acc, "rounds": records,
            "params_before": params_before, "params_after": params,
            "trainable_params": params, "trainable_pct": 100.0,
            "final_sparsity": None if method == "structured" else round(
                un.sparsity_report(model, _targets(model, cfg)).overall, 4)}


def _rewind_(model, start_state: dict) -> None:
    """Masked Linears keep their masks; every surviving weight takes its stage-start value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".parametrizations.weight.original", ".weight")
            if key in start_state and start_state[key].shape == p.shape:
                p.copy_(start_state[key])


def rebuild_prune(run: RunState, cfg: PruneStage) -> None:
    """On --resume past a finished structured prune stage: shrink the model to the recorded shapes."""
    shapes = run.runner_state.get("prune_shapes", {}).get(str(run.stage_index))
    if not shapes:
        return
    model = run.model
    n = len(shapes["heads_per_layer"])
    have = st.anatomy(model).num_layers
    if n < have:
        st.drop_layers_(model, list(range(n, have)))
    st.prune_heads_(model, {i: list(range(h)) for i, h in enumerate(shapes["heads_per_layer"])})
    st.prune_ffn_(model, {i: list(range(w)) for i, w in enumerate(shapes["intermediate_per_layer"])})
