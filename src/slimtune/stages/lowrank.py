"""`stage: lowrank` — truncated SVD of the selected Linears (`slimtune.lowrank`), each replaced by two thin
Linears where that saves FLOPs, with optional recovery training (the prune stage's, shared).

Resume: a killed lowrank stage restarts from its stage-start weights (the SVD is deterministic); a resume
past a finished one rebuilds the factors recorded in the stage's state, and the checkpoint's weights fill them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from slimtune.config import RecoverConfig, Strict
from slimtune.errors import SlimtuneError
from slimtune.lowrank import CONFIG_KEY, apply_lowrank_skeleton_, choose_ranks, factorize_, is_factorised, record_ranks_
from slimtune.modules import module_at, select_linears
from slimtune.stages.base import Run, console, count_params, open_compression, trainable_record
from slimtune.stages.recovery import recover, recovery_loss, validate_recover
from slimtune.train import seed_everything


class LowrankConfig(Strict):
    stage: Literal["lowrank"]
    rank: int | None = Field(None, ge=1, description="keep this many singular values per layer")
    energy: float | None = Field(None, gt=0, le=1, description="or: the smallest rank keeping this share of "
                                                                "the squared singular values")
    targets: list[str] | None = Field(None, description="module-name patterns (default: every encoder Linear)")
    ignore: list[str] | None = None
    recover: RecoverConfig | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _one_amount(self):
        if (self.rank is None) == (self.energy is None):
            raise ValueError("set exactly one of rank or energy")
        return self


@dataclass
class LowrankState:
    """The factors this stage made ({module path: rank}), rebuilt on --resume."""

    ranks: dict[str, int] = field(default_factory=dict)


class Lowrank:
    name: ClassVar[str] = "lowrank"
    Config: ClassVar[type] = LowrankConfig

    def __init__(self, config: LowrankConfig):
        self.config = config

    def _targets(self, model: nn.Module) -> dict[str, nn.Linear]:
        try:
            return select_linears(model, self.config.targets, self.config.ignore, purpose="factorise")
        except SlimtuneError as e:
            raise SlimtuneError(f"lowrank: {e}") from None

    def validate(self, run: Run) -> None:
        """A rank too large for a layer is not an error: that layer is skipped and reported."""
        self._targets(run.model)
        validate_recover(run, self.config.recover)

    def run(self, run: Run) -> dict:
        cfg, primary = self.config, run.task.primary.name
        fmt = getattr(getattr(run.model, "config", None), "slimtune_format", None)
        if fmt not in (None, "pruned"):
            raise SlimtuneError(f"lowrank: a '{fmt}' model cannot be saved with low-rank layers")
        # recovery checkpoints: a resume restarts the stage from the stage-start weights
        start = open_compression(run, "lowrank", snapshot=cfg.recover is not None)
        model = run.model
        loss = recovery_loss(run, cfg.recover, model)
        before = dict(getattr(model.config, CONFIG_KEY, None) or {})
        report = factorize_(model, choose_ranks(model, list(self._targets(model)), rank=cfg.rank, energy=cfg.energy))
        # before recovery, so every checkpoint of this and later stages can rebuild the factors
        made = {k: v for k, v in (getattr(model.config, CONFIG_KEY, None) or {}).items() if before.get(k) != v}
        run.save_state(LowrankState(ranks=made))
        console.print(f"lowrank: {len(report['layers'])} layers factorised, {len(report['skipped'])} skipped")
        metrics: dict = {"stage": "lowrank", "method": "svd", "rank": cfg.rank, "energy": cfg.energy,
                         f"start_{primary}": start.metric, **report}
        metrics[f"{primary}_before_recovery"] = run.primary_metric(model) if report["layers"] else start.metric
        if cfg.recover is not None:
            seed_everything(cfg.seed)
            metrics |= recover(run, cfg.recover, model, loss, phase=0)
            metrics[primary] = run.primary_metric(model)
        else:
            metrics[primary] = metrics[f"{primary}_before_recovery"]
        return metrics | {"params_before": start.params, "params_after": count_params(model), **trainable_record(model)}

    def rebuild(self, run: Run) -> None:
        """On --resume past a finished lowrank stage: rebuild its factors (weights come from the checkpoint).
        Factors already in place are left alone."""
        state = run.load_state(LowrankState)
        model = run.model
        for path, rank in (state.ranks if state else {}).items():
            if not is_factorised(module_at(model, path, CONFIG_KEY), rank):
                apply_lowrank_skeleton_(model, {path: rank})
                record_ranks_(model, {path: rank})
