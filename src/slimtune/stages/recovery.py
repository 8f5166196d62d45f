"""Recovery training after a structural change (prune, lowrank): shared by those stages, a stage itself
of none. The recovery loss is prepared once at stage start, before anything changes: the task's loss
alone, the soft targets of a frozen copy of the stage-start model, or those of a fine-tuned teacher run
once over the train texts (cached on disk).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from slimtune.config import RecoverConfig, TeacherSpec
from slimtune.distill.losses import cached_distill_loss, online_distill_loss
from slimtune.distill.teachers import check_teacher, teacher_soft_targets
from slimtune.stages.base import Run, console
from slimtune.train import LossFn


@dataclass
class RecoveryLoss:
    loss_fn: LossFn
    make_batch: Callable | None = None  # None: the task's collation


def validate_recover(run: Run, rc: RecoverConfig | None) -> None:
    """A recovery teacher must exist and produce exactly the data's outputs (checked before the run)."""
    if rc is not None and rc.teacher is not None:
        check_teacher(TeacherSpec(path=rc.teacher), run.data.id2label)


def recovery_loss(run: Run, rc: RecoverConfig | None, model: nn.Module) -> RecoveryLoss:
    if rc is None or not (rc.distill_from_unpruned or rc.teacher is not None):
        return RecoveryLoss(run.task.loss)
    if rc.distill_from_unpruned:
        frozen = copy.deepcopy(model).eval().requires_grad_(False)
        return RecoveryLoss(online_distill_loss(frozen, rc.temperature, rc.alpha, rc.hidden_weight))
    soft = teacher_soft_targets(rc.teacher, run.data.train, run.data.id2label, run.max_length, rc.temperature,
                                log=console.print, device=run.device)
    pad = run.pad_id

    def make_batch(ds, idx):
        return run.task.collate(ds, idx, pad) | {"soft_targets": soft[torch.tensor(idx)]}

    return RecoveryLoss(cached_distill_loss(rc.temperature, rc.alpha), make_batch)


def recovery_auto(run: Run, rc: RecoverConfig, model: nn.Module, loss: RecoveryLoss) -> tuple[float, int]:
    """lr / batch_size of the recovery (auto values tuned with the recovery loss itself)."""
    return run.resolve_auto(rc, model, loss.loss_fn, make_batch=loss.make_batch)


def recover(run: Run, rc: RecoverConfig | None, model: nn.Module, loss: RecoveryLoss, phase: int,
            on_step=None, best_from_step: int = 0) -> dict:
    """Recovery training with the loss prepared at stage start. A stage that changes structure restarts
    from its beginning on resume, so the loop never continues a checkpoint here."""
    if rc is None:
        return {}
    lr, bs = recovery_auto(run, rc, model, loss)
    res = run.fit(model, rc, lr=lr, batch_size=bs, loss_fn=loss.loss_fn, make_batch=loss.make_batch, phase=phase,
                  resume=False, on_step=on_step, best_from_step=best_from_step)
    return {"recover": res.summary()}
