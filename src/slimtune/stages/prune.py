"""`stage: prune` — magnitude, activation (Wanda, N:M), sparsegpt (OBS mask and weight update from each
layer's input Hessian, N:M too), structured (heads / FFN neurons / layers physically removed), each in
one shot or in iterative prune -> recover rounds (`iterative: {rounds: 3}`);
recovery runs on the one training loop, optionally distilled from the unpruned model or a teacher.

Masks (magnitude, activation, sparsegpt) are held during recovery and made permanent at the end of the stage,
so the saved model is a plain HF model with zeros. Structured pruning leaves smaller matrices.

Resume: a killed prune stage restarts from its beginning (deterministic, so it ends the same), from
the stage-start weights kept in OUT/checkpoints/; a resume past a finished structured prune stage
rebuilds the pruned shapes recorded in the run state, and the checkpoint's weights fill them.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from slimtune.batching import calibration_batches
from slimtune.config import RecoverConfig, Strict, tagged_union
from slimtune.errors import SlimtuneError
from slimtune.prune import structured as st
from slimtune.prune import unstructured as un
from slimtune.prune.sparsegpt import prune_sparsegpt_
from slimtune.stages.base import Run, open_compression, trainable_record
from slimtune.stages.recovery import RecoveryLoss, recover, recovery_auto, recovery_loss, validate_recover
from slimtune.train import LoopSettings, optimizer_steps, seed_everything


# ------------------------------------------------------------------------------------------ configs
class Rounds(Strict):
    """N rounds of prune -> recover -> evaluate; each round moves 1/N of the way to the final amounts."""

    rounds: int = Field(3, ge=1)
    max_drop: float = Field(0.01, ge=0, description="stop when the dev metric falls this far below the start")


class MaskRounds(Rounds):
    rewind: bool = Field(False, description="reset survivors to the stage-start weights before each recovery "
                                            "(lottery-ticket style)")


class MagnitudePrune(Strict):
    stage: Literal["prune"]
    method: Literal["magnitude"] = "magnitude"
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of the target weights set to zero")
    threshold: float | None = Field(None, ge=0, description="zero every |w| below this instead")
    scope: Literal["per_layer", "global"] = "per_layer"
    norm: Literal["l1", "l2", "none"] = "l1"
    schedule: Literal["oneshot", "gradual"] = Field(
        "oneshot", description="gradual = cubic schedule (Zhu & Gupta) during recovery")
    gradual_end: float = Field(0.8, gt=0, le=1, description="gradual: share of the recovery steps by which the "
                                                            "final sparsity is reached; the rest recovers at it")
    targets: list[str] | None = Field(None, description="module-name patterns (default: encoder Linears)")
    ignore: list[str] | None = None
    recover: RecoverConfig | None = None
    iterative: MaskRounds | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _amount(self):
        if (self.sparsity is None) == (self.threshold is None):
            raise ValueError("magnitude pruning needs exactly one of sparsity or threshold")
        if self.schedule == "gradual" and (self.sparsity is None or self.recover is None):
            raise ValueError("schedule gradual needs sparsity (not threshold) and a recover section to run during")
        return self


class CalibrationSamples(Strict):
    samples: int = Field(ge=1, description="train rows (blocks, for a causal LM) to calibrate on")


class ActivationPrune(Strict):
    """Wanda: |W| * ||X|| from calibration batches, unstructured or N:M."""

    stage: Literal["prune"]
    method: Literal["activation"]
    sparsity: float | None = Field(None, ge=0, lt=1, description="fraction of the target weights set to zero")
    n_m: tuple[int, int] | None = Field(None, description="N:M sparsity, e.g. [2, 4]")
    targets: list[str] | None = Field(None, description="module-name patterns (default: encoder Linears)")
    ignore: list[str] | None = None
    calibration_batches: int = Field(8, ge=1, description="train batches for the activation statistics")
    calibration_batch_size: int = Field(16, ge=1)
    calibration: CalibrationSamples | None = Field(None, description="exactly this many train rows instead "
                                                   "(calibration_batches x calibration_batch_size otherwise)")
    recover: RecoverConfig | None = None
    iterative: MaskRounds | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _amount(self):
        if (self.sparsity is None) == (self.n_m is None):
            raise ValueError(f"{self.method} pruning needs exactly one of sparsity or n_m")
        if self.n_m is not None and not 0 < self.n_m[0] < self.n_m[1]:
            raise ValueError(f"n_m {list(self.n_m)}: N of every M weights stay, so 0 < N < M (e.g. [2, 4])")
        return self


class SparseGPTPrune(ActivationPrune):
    """SparseGPT: masks chosen and surviving weights updated from each layer's input Hessian, block by
    block (slimtune.prune.sparsegpt)."""

    method: Literal["sparsegpt"]
    block_size: int = Field(128, ge=1, description="columns per mask-selection and lazy-update block")
    damp: float = Field(0.01, gt=0, description="x mean diag(H) added to the Hessian's diagonal")


class StructuredPrune(Strict):
    """Attention heads, FFN neurons and whole layers physically removed."""

    stage: Literal["prune"]
    method: Literal["structured"]
    heads: float = Field(0.0, ge=0, lt=1, description="fraction of attention heads removed")
    ffn: float = Field(0.0, ge=0, lt=1, description="fraction of FFN intermediate neurons removed")
    layers: int = Field(0, ge=0, description="whole encoder layers removed")
    importance: Literal["gradient", "weight"] = "gradient"
    uniform: bool = Field(True, description="the same number of heads/neurons removed in every layer")
    drop_empty_layers: bool = False  # a layer that loses every head is dropped instead of refused
    calibration_batches: int = Field(8, ge=1, description="train batches for gradient importance")
    calibration_batch_size: int = Field(16, ge=1)
    recover: RecoverConfig | None = None
    iterative: Rounds | None = None
    seed: int = 42

    @model_validator(mode="after")
    def _amount(self):
        if not (self.heads or self.ffn or self.layers):
            raise ValueError("structured pruning needs heads, ffn or layers")
        if self.recover is not None and self.recover.hidden_weight and self.layers:
            raise ValueError(f"recover.hidden_weight matches every layer's hidden states with the unpruned "
                             f"model's, which cannot follow removing whole layers (layers: {self.layers})")
        return self


# method -> config; the stage runs each through the same rounds (a new method: its config + one line here)
PRUNE_METHODS = {"magnitude": MagnitudePrune, "activation": ActivationPrune, "sparsegpt": SparseGPTPrune,
                 "structured": StructuredPrune}
PruneConfig = tagged_union(PRUNE_METHODS, "method", default="magnitude")


@dataclass
class PruneState:
    """What `rebuild` needs: the shapes a structured prune left (None for masks: no shape changes)."""

    shapes: dict | None = None


# ------------------------------------------------------------------------------------------- stage
def _structured_(model, cfg, batches: list[dict], share: float, origin: dict, loss_fn) -> dict:
    """Remove `share` of the configured heads / neurons (fractions of the stage-start counts) and, in
    the last round, the configured layers; returns what was applied."""
    gradient = cfg.importance == "gradient"
    plan: dict = {}
    if cfg.layers and share >= 1.0:  # whole layers go at once (a fraction of a layer is not a thing)
        importance = (st.layer_importance(model, batches, loss_fn) if gradient
                      else st.head_importance_by_weight(model).sum(1))
        plan["dropped_layers"] = st.plan_layers(importance, cfg.layers)
        st.drop_layers_(model, plan["dropped_layers"])
    now = st.structured_config_update(model)
    if cfg.heads:
        importance = st.head_importance(model, batches, loss_fn) if gradient else st.head_importance_by_weight(model)
        fraction = _fraction_now(cfg.heads * share, origin["heads_per_layer"], now["heads_per_layer"])
        keep = st.plan_heads(importance, fraction, uniform=cfg.uniform)
        plan["dropped_empty_layers"] = st.prune_heads_(model, keep, drop_empty_layers=cfg.drop_empty_layers)
    if cfg.ffn:
        importance = st.ffn_importance(model, batches if gradient else None, loss_fn)
        fraction = _fraction_now(cfg.ffn * share, origin["intermediate_per_layer"], now["intermediate_per_layer"])
        st.prune_ffn_(model, st.plan_ffn(importance, fraction, uniform=cfg.uniform))
    plan["shapes"] = st.structured_config_update(model)
    return plan


def _fraction_now(target: float, original: list[int], current: list[int]) -> float:
    """Share of what is left to remove now, so that `target` of the stage-start count is gone overall
    (per-layer averages: earlier rounds already removed some)."""
    keep = (sum(original) / len(original)) * (1 - target)
    return min(max(0.0, 1 - keep / (sum(current) / len(current))), 0.999)


def _masks_(model, cfg, batches: list[dict], share: float) -> dict:
    sparsity = None if cfg.sparsity is None else cfg.sparsity * share
    if cfg.method == "activation":
        report = un.prune_activation_(model, batches, sparsity=sparsity, n_m=cfg.n_m, targets=cfg.targets,
                                      ignore=cfg.ignore)
    elif cfg.method == "sparsegpt":
        report = prune_sparsegpt_(model, batches, sparsity=sparsity, n_m=cfg.n_m, targets=cfg.targets,
                                  ignore=cfg.ignore, block_size=cfg.block_size, damp=cfg.damp)
    else:
        report = un.prune_magnitude_(model, sparsity=sparsity, threshold=cfg.threshold, scope=cfg.scope,
                                     norm=cfg.norm, targets=cfg.targets, ignore=cfg.ignore)
    return {"sparsity": round(report.overall, 4)}




def _rewind_(model, start_state: dict) -> None:
    """Masked Linears keep their masks; every surviving weight takes its stage-start value."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".parametrizations.weight.original", ".weight")
            if key in start_state and start_state[key].shape == p.shape:
                p.copy_(start_state[key])


def _drop(start: float, now: float, higher_is_better: bool) -> float:
    return start - now if higher_is_better else now - start


class Prune:
    name: ClassVar[str] = "prune"
    Config: ClassVar[object] = PruneConfig
    methods: ClassVar[dict] = PRUNE_METHODS

    def __init__(self, config: MagnitudePrune | ActivationPrune | SparseGPTPrune | StructuredPrune):
        self.config = config

    @property
    def masks(self) -> bool:
        return self.config.method != "structured"

    def validate(self, run: Run) -> None:
        validate_recover(run, self.config.recover)
        if self.masks:
            un.select_linears(run.model, self.config.targets, self.config.ignore)

    def run(self, run: Run) -> dict:
        cfg, primary = self.config, run.task.primary
        start = open_compression(run, "prune")
        t0 = time.perf_counter()
        model = run.model
        batches = self._calibration(run)
        loss = recovery_loss(run, cfg.recover, model)
        rounds = cfg.iterative.rounds if cfg.iterative else 1
        rewind = copy.deepcopy(model.state_dict()) if getattr(cfg.iterative, "rewind", False) else None
        origin = None if self.masks else st.structured_config_update(model)
        records, kept = [], None
        for k in range(rounds):
            before = copy.deepcopy(model) if rounds > 1 else None
            if rewind is not None and k > 0:  # survivors back to their stage-start values, masks kept
                _rewind_(model, rewind)
            record = self._round(run, model, loss, (k + 1) / rounds, k, batches, origin)
            records.append(record)
            drop = _drop(start.metric, record[primary.name], primary.higher_is_better)
            if rounds > 1 and drop > cfg.iterative.max_drop:
                record["stopped"] = (f"dev {primary.name} {record[primary.name]:.4f} fell more than "
                                     f"{cfg.iterative.max_drop} from {start.metric:.4f}; keeping round {k - 1}")
                kept = before
                break
        if kept is not None:
            model = run.model = kept
        if self.masks:
            un.make_permanent_(model)
        run.save_state(PruneState(shapes=None if self.masks else st.structured_config_update(model)))
        params = sum(p.numel() for p in model.parameters())
        return {"stage": "prune", "method": cfg.method, "iterative": cfg.iterative is not None,
                "seconds": round(time.perf_counter() - t0, 1),  # pruning and recovery, not the start metric
                f"start_{primary.name}": start.metric, "rounds": records, "params_before": start.params,
                "params_after": params, **trainable_record(model),
                "final_sparsity": round(un.sparsity_report(model, self._targets(model)).overall, 4)
                if self.masks else None}

    def _calibration(self, run: Run) -> list[dict]:
        cfg = self.config
        if cfg.method == "magnitude":  # weights alone decide
            return []
        size, count = cfg.calibration_batch_size, cfg.calibration_batches
        if getattr(cfg, "calibration", None) is not None:  # exactly `samples` rows
            size = min(size, cfg.calibration.samples)
            count = -(-cfg.calibration.samples // size)
        batches = calibration_batches(run.data.train, count, size, cfg.seed, run.pad_id, collate_fn=run.task.collate,
                                      device=run.device)
        if not batches:
            raise SlimtuneError("prune: calibration set is empty (the train split has no rows)")
        if getattr(cfg, "calibration", None) is not None:
            extra = sum(len(b["input_ids"]) for b in batches) - cfg.calibration.samples
            if extra > 0:
                batches[-1] = {k: v[:-extra] for k, v in batches[-1].items()}
        return batches

    def _targets(self, model):
        return un.select_linears(model, self.config.targets, self.config.ignore)

    def _round(self, run: Run, model, loss: RecoveryLoss, share: float, phase: int, batches: list[dict],
               origin: dict | None) -> dict:
        cfg = self.config
        seed_everything(cfg.seed + phase)
        record: dict = {"round": phase, "share": round(share, 4)}
        pruner = None
        if not self.masks:
            record |= _structured_(model, cfg, batches, share, origin, run.task.loss)
        elif cfg.method == "magnitude" and cfg.schedule == "gradual":
            # the schedule spans the recovery's steps: resolved (auto included) with the recovery loss
            lr, bs = recovery_auto(run, cfg.recover, model, loss)
            steps = optimizer_steps(len(run.data.train), LoopSettings.from_config(cfg.recover, lr=lr, batch_size=bs))
            pruner = un.GradualPruner(model, cfg.sparsity * share, steps, scope=cfg.scope, norm=cfg.norm,
                                      targets=cfg.targets, ignore=cfg.ignore, end_frac=cfg.gradual_end)
        else:
            record |= _masks_(model, cfg, batches, share)
        # gradual pruning changes the masks until the ramp ends: a "best" from before would bring denser
        # masks back, so only evaluations at the final sparsity compete
        record |= recover(run, cfg.recover, model, loss, phase, on_step=pruner.step if pruner else None,
                          best_from_step=pruner.final_step if pruner else 0)
        if self.masks:
            record["sparsity"] = round(un.sparsity_report(model, self._targets(model)).overall, 4)
        record[run.task.primary.name] = run.primary_metric(model)
        return record

    def rebuild(self, run: Run) -> None:
        """On --resume past a finished structured prune stage: shrink the model to the recorded shapes."""
        state = run.load_state(PruneState)
        if state is None or not state.shapes:
            return
        shapes, model = state.shapes, run.model
        n = len(shapes["heads_per_layer"])
        have = st.anatomy(model).num_layers
        if n < have:
            st.drop_layers_(model, list(range(n, have)))
        st.prune_heads_(model, {i: list(range(h)) for i, h in enumerate(shapes["heads_per_layer"])})
        st.prune_ffn_(model, {i: list(range(w)) for i, w in enumerate(shapes["intermediate_per_layer"])})
