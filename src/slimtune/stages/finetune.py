"""`stage: finetune` — methods full, freeze, head, lora and iterative on the one training loop.

full       every parameter trains
freeze     embeddings (optional) + the first `freeze_layers` encoder layers stay fixed
head       only the task head (pooler + classifier) trains
lora       low-rank adapters on `lora.target_modules` + the full head, merged back at the end
iterative  cascaded unfreezing: head first, then layer groups top-down; each phase runs until
           the dev metric stops improving by `min_delta` for `patience` evals
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from slimtune.adapt.layers import Anatomy, anatomy
from slimtune.adapt.lora import apply_lora, merge_lora
from slimtune.config import EarlyStopping, IterativeConfig, LoopConfig, LoraConfig
from slimtune.errors import SlimtuneError
from slimtune.stages.base import Run, count_params
from slimtune.train import set_trainable


class FinetuneConfig(LoopConfig):
    stage: Literal["finetune"]
    method: Literal["full", "freeze", "head", "lora", "iterative"] = "full"
    freeze_layers: int = Field(3, ge=0, description="method=freeze: first N encoder layers frozen")
    freeze_embeddings: bool = Field(True, description="method=freeze: the embeddings frozen too")
    lora: LoraConfig = LoraConfig()
    iterative: IterativeConfig = IterativeConfig()


def trainable_predicate(cfg: FinetuneConfig, an: Anatomy):
    if cfg.method in ("full", "lora"):  # lora: PEFT itself freezes all but the adapters and the head
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


def iterative_phases(an: Anatomy, cfg: FinetuneConfig) -> list[set]:
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


class Finetune:
    name: ClassVar[str] = "finetune"
    Config: ClassVar[type] = FinetuneConfig

    def __init__(self, config: FinetuneConfig):
        self.config = config

    def validate(self, run: Run) -> None:
        run.loop_direction(self.config)
        if self.config.method == "freeze":
            trainable_predicate(self.config, anatomy(run.model))

    def rebuild(self, run: Run) -> None:
        if self.config.method == "lora" and self.config.lora.save_adapter_only:
            run.model = apply_lora(run.model, self.config.lora, run.base_model,  # the checkpoint holds adapters
                                   task_type=run.task.peft_task_type, train_head=run.task.new_head)

    def run(self, run: Run) -> dict:
        cfg = self.config
        total = count_params(run.model)
        metrics: dict = {"stage": "finetune", "method": cfg.method}
        if cfg.method == "iterative":
            metrics["phases"] = self._iterative(run, metrics)
            metrics["trainable_params"] = metrics["phases"][-1]["trainable_params"]
        else:
            # adapters / frozen parts first: lr and batch size auto are tuned on the model as it trains
            if cfg.method == "lora":
                run.model = apply_lora(run.model, cfg.lora, run.base_model, task_type=run.task.peft_task_type,
                                       train_head=run.task.new_head)
            else:
                set_trainable(run.model, trainable_predicate(cfg, anatomy(run.model)))
            model = run.model
            trainable = count_params(model, trainable_only=True)
            lr, bs = run.resolve_auto(cfg, model, run.task.loss)
            metrics |= {"lr": lr, "batch_size": bs}
            res = run.fit(model, cfg, lr=lr, batch_size=bs)
            metrics.update(res.summary())
            metrics["trainable_params"] = trainable
            if cfg.method == "lora" and not cfg.lora.save_adapter_only:
                run.model = merge_lora(model)
        metrics["trainable_pct"] = round(100 * metrics["trainable_params"] / total, 3)
        for p in run.model.parameters():  # later stages decide for themselves what trains
            p.requires_grad_(True)
        return metrics

    def _iterative(self, run: Run, metrics: dict) -> list[dict]:
        cfg = self.config
        model: nn.Module = run.model
        an = anatomy(model)
        it = cfg.iterative
        # Each phase: at most max_epochs_per_phase, ended early by the patience / min_delta criterion,
        # finishing on its best weights (keep_best) so the next phase starts from them.
        phase_cfg = cfg.model_copy(update={
            "epochs": it.max_epochs_per_phase, "keep_best": True,
            "early_stopping": EarlyStopping(patience=it.patience, min_delta=it.min_delta)})
        phases = iterative_phases(an, cfg)
        done_phases: list[dict] = run.progress.phases
        lr = bs = None
        results = []
        for k, parts in enumerate(phases):
            if k < len(done_phases):  # finished before a resume: its weights are in the checkpoint
                results.append(done_phases[k])
                continue
            trainable = set_trainable(model, lambda name, parts=parts: an.part_of(name) in parts)
            if lr is None:  # auto values are tuned on the first phase's trainable set, kept for the rest
                lr, bs = run.resolve_auto(cfg, model, run.task.loss)
                metrics |= {"lr": lr, "batch_size": bs}
            res = run.fit(model, phase_cfg, lr=lr * it.lr_decay**k, batch_size=bs, phase=k)
            layers = sorted(p for p in parts if isinstance(p, int))
            record = {"phase": k, "trainable": sorted(str(p) for p in parts if not isinstance(p, int)) +
                      ([f"layers {layers[0]}-{layers[-1]}"] if layers else []),
                      "trainable_params": trainable, **res.summary()}
            done_phases.append(record)
            results.append(record)
        if lr is None:  # every phase finished before a resume
            lr, bs = run.resolve_auto(cfg, model, run.task.loss)
            metrics |= {"lr": lr, "batch_size": bs}
        return results

