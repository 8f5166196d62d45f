"""`stage: finetune` — methods full, freeze, head, lora and iterative on the one training loop.

full       every parameter trains
freeze     embeddings (optional) + the first `freeze_layers` encoder layers stay fixed
head       only the task head (pooler + classifier) trains
lora       low-rank adapters on `lora.target_modules` + the full head, merged back at the end
iterative  cascaded unfreezing: head first, then layer groups top-down; each phase runs until
           the dev metric stops improving by `min_delta` for `patience` evals
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from slimtune.adapt.layers import Anatomy, anatomy
from slimtune.adapt.lora import apply_lora, merge_lora
from slimtune.errors import SlimtuneError
from slimtune.recipe import EarlyStopping, FinetuneStage
from slimtune.train import cross_entropy_loss, set_trainable, train

if TYPE_CHECKING:
    from slimtune.runner import RunState


def trainable_predicate(cfg: FinetuneStage, an: Anatomy):
    if cfg.method == "full":
        return lambda name: True
    if cfg.method == "head":
        return lambda name: an.part_of(name) == "head"
    if cfg.method == "freeze":
        if cfg.freeze_layers > an.num_layers:
            raise SlimtuneError(f"freeze_layers: {cfg.freeze_layers} is more than the model's "
                                f"{an.num_layers} encoder layers")

        def trainable(name: str) -> bool:
            part = an.part_of(name)
            if part == "embeddings":
                return not cfg.freeze_embeddings
            return part == "head" or part >= cfg.freeze_layers

        return trainable
    raise ValueError(cfg.method)


def iterative_phases(an: Anatomy, cfg: FinetuneStage) -> list[set]:
    """Parts trainable in each phase: {'head'}, then + top group, ... (+ embeddings)."""
    phases, parts = [], {"head"}
    phases.append(set(parts))
    top = an.num_layers
    while top > 0:
        low = max(0, top - cfg.iterative.group_size)
        parts |= set(range(low, top))
        phases.append(set(parts))
        top = low
    if cfg.iterative.include_embeddings:
        phases.append(parts | {"embeddings"})
    return phases


def run_finetune(run: RunState, cfg: FinetuneStage) -> dict:
    model = run.model
    lr, bs = run.resolve_auto(cfg, model, cross_entropy_loss)
    metrics: dict = {"stage": "finetune", "method": cfg.method, "lr": lr, "batch_size": bs}
    total = sum(p.numel() for p in model.parameters())

    if cfg.method == "iterative":
        metrics["phases"] = _run_iterative(run, cfg, lr, bs)
        metrics["trainable_params"] = metrics["phases"][-1]["trainable_params"]
    else:
        if cfg.method == "lora":
            model = run.model = apply_lora(model, cfg.lora, run.base_model)
        else:
            set_trainable(model, trainable_predicate(cfg, anatomy(model)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        res = train(model, run.data.train, run.data.eval, cfg, run.train_context(), lr=lr, batch_size=bs)
        metrics.update(res.summary())
        metrics["trainable_params"] = trainable
        if cfg.method == "lora" and not cfg.lora.save_adapter_only:
            run.model = merge_lora(model)
    metrics["trainable_pct"] = round(100 * metrics["trainable_params"] / total, 3)
    for p in run.model.parameters():  # later stages decide for themselves what trains
        p.requires_grad_(True)
    return metrics


def _run_iterative(run: RunState, cfg: FinetuneStage, lr: float, bs: int) -> list[dict]:
    model: nn.Module = run.model
    an = anatomy(model)
    it = cfg.iterative
    # Each phase: at most max_epochs_per_phase, ended early by the patience / min_delta criterion,
    # finishing on its best weights (keep_best) so the next phase starts from them.
    phase_cfg = cfg.model_copy(update={
        "epochs": it.max_epochs_per_phase, "keep_best": True,
        "early_stopping": EarlyStopping(patience=it.patience, min_delta=it.min_delta)})
    done_phases: list[dict] = run.runner_state.setdefault("phases", [])
    results = []
    for k, parts in enumerate(iterative_phases(an, cfg)):
        if k < len(done_phases):  # finished before a resume: its weights are in the checkpoint
            results.append(done_phases[k])
            continue
        trainable = set_trainable(model, lambda name, parts=parts: an.part_of(name) in parts)
        res = train(model, run.data.train, run.data.eval, phase_cfg, run.train_context(phase=k),
                    phase=k, lr=lr * it.lr_decay**k, batch_size=bs)
        layers = sorted(p for p in parts if isinstance(p, int))
        record = {"phase": k, "trainable": sorted(str(p) for p in parts if not isinstance(p, int)) +
                  ([f"layers {layers[0]}-{layers[-1]}"] if layers else []),
                  "trainable_params": trainable, **res.summary()}
        done_phases.append(record)
        results.append(record)
    return results
