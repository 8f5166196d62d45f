"""THE training loop. Fine-tuning, distillation and prune-recovery all call `train` and differ
only in the `loss_fn`, `make_batch` and `eval_fn` they inject.

`train` reads top to bottom: resume -> per epoch, optimizer steps (`_Loop.train_step`: collate -> loss
-> backward over grad_accum micro-batches, clip, AdamW step, schedule step) -> eval / checkpoint ->
`finish` (the kept best or averaged weights). It runs on `LoopSettings`: final values only (the caller
resolves `auto` and picks a phase's lr), the metric's direction included. Everything a resume needs
(weights, optimizer, scheduler, torch RNG, counters) goes into an atomic checkpoint; the batch order of
an epoch is a pure function of (seed, phase, epoch), so a resumed run replays exactly the batches it missed.

Under torchrun (slimtune.distributed) the same loop runs in every process: `batch_size` stays the global
batch, each rank trains on its part of it, the gradients are averaged over the ranks before clipping, and
only rank 0 writes checkpoints and logs. The batch order, the step and the checkpoints are the one-process
ones, so a run resumes on any number of processes.

The forward pass and the loss run under bf16 autocast where the device has bf16 and the model gains from it
(`precision: auto`, the default: a GPU, or a CPU with avx512_bf16 / AMX and a model of hidden size >= 256;
`fp32` turns it off; distributed.precision_for decides): weights, gradients, clipping and AdamW stay fp32,
and evaluations run outside autocast, in fp32.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.batching import EncodedDataset, batch_indices, collate, cross_entropy_loss
from slimtune.checkpoint import CheckpointStore, load_weights, read_checkpoint
from slimtune.config import LoopConfig
from slimtune.distributed import (
    all_reduce_sum,
    autocast,
    average_gradients_,
    broadcast_module_,
    device_of,
    exit_hook,
    grad_scaler,
    is_main,
    loop_precision,
    model_width,
    rank_rows,
    to_device,
    world,
)
from slimtune.ema import WeightEMA
from slimtune.progress import StepReporter

LossFn = Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
UnitsFn = Callable[[dict[str, torch.Tensor]], int]  # what a loss averages over in a batch (rows, tokens)
BatchFn = Callable[[EncodedDataset, list[int]], dict[str, torch.Tensor]]
EvalFn = Callable[[nn.Module], dict]
# where a step's time goes: collation + copy to the device, the forward pass and loss (under autocast), the
# backward pass, the exchange with the other ranks, clip + AdamW + schedule, and the rest (hooks, the average)
PHASES = ("data", "forward", "backward", "all_reduce", "optimizer", "other")




@dataclass(frozen=True)
class LoopSettings:
    """One run of the loop, resolved: every value final (no `auto`), the metric's direction included.

    Build it with `from_config`: the defaults live in `LoopConfig`, not here."""

    lr: float
    batch_size: int
    epochs: float  # a fractional last epoch is cut short
    max_steps: int | None
    grad_accum: int
    weight_decay: float
    grad_clip: float | None
    schedule: str  # linear, cosine, constant, plateau
    warmup_ratio: float
    plateau_factor: float
    plateau_patience: int
    metric: str  # the key of the eval record that picks the best weights
    higher_is_better: bool  # the metric's direction (accuracy up; loss, perplexity down)
    eval_every: int | None  # None: at each epoch's end
    early_stopping_patience: int | None  # evaluations without gain tolerated; None: no early stopping
    min_delta: float  # a smaller gain counts as none (for the kept best and early stopping)
    keep_best: bool
    ema_decay: float | None
    seed: int
    checkpoint_every: int | None
    bucket_by_length: bool
    precision: str  # auto, fp32, bf16 (distributed.precision_for resolves auto per device)

    def __post_init__(self):
        if isinstance(self.lr, str) or isinstance(self.batch_size, str):
            raise ValueError(f"lr={self.lr!r}, batch_size={self.batch_size!r}: resolve 'auto' before the loop")
        if not self.lr > 0 or self.batch_size < 1:
            raise ValueError(f"lr={self.lr!r}, batch_size={self.batch_size!r}: expected lr > 0 and batch_size >= 1")

    @classmethod
    def from_config(cls, cfg: LoopConfig, *, lr: float, batch_size: int, epochs: float | None = None,
                    higher_is_better: bool | None = None, **overrides) -> LoopSettings:
        """`cfg`'s loop keys with the resolved `lr` and `batch_size` (never "auto"), `epochs` (a phase's
        cap) and any other field in `overrides`. `higher_is_better` defaults to: only `loss` goes down."""
        for name, value in (("lr", lr), ("batch_size", batch_size)):
            if isinstance(value, str):
                raise ValueError(f"{name}={value!r}: resolve 'auto' before building LoopSettings")
        es = cfg.early_stopping
        values = dict(
            lr=float(lr), batch_size=int(batch_size), epochs=cfg.epochs if epochs is None else epochs,
            max_steps=cfg.max_steps, grad_accum=cfg.grad_accum, weight_decay=cfg.weight_decay,
            grad_clip=cfg.grad_clip, schedule=cfg.schedule, warmup_ratio=cfg.warmup_ratio,
            plateau_factor=cfg.plateau_factor, plateau_patience=cfg.plateau_patience,
            metric=cfg.metric or "loss",  # callers with a task pass its primary metric (Run.fit)
            eval_every=cfg.eval_every, early_stopping_patience=es.patience if es else None,
            min_delta=es.min_delta if es else 0.0, keep_best=cfg.keep_best, ema_decay=cfg.ema_decay,
            seed=cfg.seed, checkpoint_every=cfg.checkpoint_every, bucket_by_length=cfg.bucket_by_length,
            precision=cfg.precision,
        ) | overrides
        if higher_is_better is None:
            higher_is_better = values["metric"] != "loss"
        return cls(**values, higher_is_better=higher_is_better)

    def improves(self, value: float, best: float | None) -> bool:
        """Whether `value` beats `best` by more than `min_delta`, in the metric's direction."""
        if best is None:
            return True
        return value > best + self.min_delta if self.higher_is_better else value < best - self.min_delta


@dataclass
class TrainContext:
    """What the runner hands the loop: where to checkpoint/log and how to resume."""

    checkpoints: CheckpointStore | None = None
    tb: object | None = None  # torch.utils.tensorboard.SummaryWriter
    tag: str = "train"  # unique per stage/phase: a checkpoint resumes only the loop with its tag
    resume: Path | None = None  # a complete checkpoint to continue from (only if its tag matches)
    runner_state: dict = field(default_factory=dict)  # saved in every checkpoint (finished stages...)
    progress: bool = True
    pad_id: int = 0


@dataclass
class TrainResult:
    steps: int = 0
    epochs_run: float = 0.0
    examples_seen: int = 0
    train_seconds: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    best_loss: float | None = None  # the kept evaluation's loss: breaks ties of a discrete metric
    stopped_early: bool = False
    lr: float = 0.0
    batch_size: int = 0
    history: list[dict] = field(default_factory=list)
    best_state: dict | None = field(default=None, repr=False)  # keep_best without a checkpoint store
    precision: str = ""  # what the forward and loss ran in: "bf16 autocast (avx512_bf16)", "fp32 (...)"
    phase_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    @property
    def examples_per_s(self) -> float:
        return self.examples_seen / self.train_seconds if self.train_seconds else 0.0

    def summary(self) -> dict:
        keys = ("steps", "epochs_run", "examples_seen", "train_seconds", "best_metric", "best_step",
                "stopped_early", "lr", "batch_size", "history")
        out = {k: getattr(self, k) for k in keys}
        out["examples_per_s"] = round(self.examples_per_s, 2)
        out["train_seconds"] = round(self.train_seconds, 2)
        out["train_precision"] = self.precision
        out["seconds_by_phase"] = {k: round(v, 3) for k, v in self.phase_seconds.items()}
        return out


RESUMED_RESULT_FIELDS = ("examples_seen", "train_seconds", "best_metric", "best_step", "best_loss", "history",
                         "stopped_early", "phase_seconds")


class _PhaseClock:
    """The seconds of the optimizer steps by phase (PHASES), as perf_counter laps: a few calls of ~0.1 us per
    step, against steps of 0.05-2 s, so the loop always keeps them (`seconds_by_phase` in its summary). CPU
    ops are synchronous, so there a lap is its phase's compute; on CUDA kernels run asynchronously and the
    split is only indicative (the loss's `.item()` waits for the backward pass)."""

    def __init__(self, seconds: dict[str, float]):
        self.seconds, self.start = seconds, time.perf_counter()
        self.last = self.start

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[phase] += now - self.last
        self.last = now


def make_optimizer(model: nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    # No weight decay on biases and LayerNorm weights (the BERT recipe): decaying them only hurts.
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    # The fused kernel: measured on 2 CPU cores with MiniLM's 22.7M params, one AdamW step took
    # 31 ms fused vs 265 ms with the default (foreach) kernel — half of a whole batch-32 step.
    try:
        return torch.optim.AdamW(groups, lr=lr, fused=True)
    except (RuntimeError, ValueError):  # dtypes/devices the fused kernel does not support
        return torch.optim.AdamW(groups, lr=lr)


def make_scheduler(optimizer, settings: LoopSettings, total_steps: int):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(settings.warmup_ratio * total_steps)
    if settings.schedule == "linear":
        return get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if settings.schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    # constant, and plateau: constant after warmup; ReduceLROnPlateau scales it on dev evals.
    return get_constant_schedule_with_warmup(optimizer, warmup)


def optimizer_steps(n_examples: int, settings: LoopSettings) -> int:
    """How many optimizer steps `train` takes (schedules that span a whole run need it up front)."""
    total_batches = math.ceil(settings.epochs * math.ceil(n_examples / settings.batch_size))
    total = math.ceil(total_batches / settings.grad_accum)
    return min(total, settings.max_steps) if settings.max_steps else total


def train(model: nn.Module, train_ds: EncodedDataset, settings: LoopSettings, ctx: TrainContext, *,
          loss_fn: LossFn = cross_entropy_loss, make_batch: BatchFn | None = None, eval_fn: EvalFn | None = None,
          phase: int = 0, on_eval: Callable[[dict], bool] | None = None,
          on_step: Callable[[int], None] | None = None, best_from_step: int = 0,
          loss_units: UnitsFn | None = None) -> TrainResult:
    """Train `model` in place on `train_ds`; `eval_fn(model)` (None: no evaluation) each epoch or `eval_every`.

    `make_batch` defaults to `collate` with `ctx.pad_id`. `on_eval(record)` may return True to stop (the
    iterative method's phase criterion). `on_step(step)` runs after every optimizer step, before that
    step's eval and checkpoint (gradual pruning updates its masks there). A resumed run does not replay
    the steps it skips: the hook's state must live in the model (saved with the checkpoint) or follow from
    the step number alone. Evaluations before `best_from_step` are logged only: they cannot become the
    kept best nor count towards early stopping's patience (gradual pruning: the masks are still moving).
    With `ema_decay`, a moving average of the weights starts at `best_from_step`; evaluations, the kept
    best and the final model then use the averaged weights.
    `loss_units(batch)`: what `loss_fn` averages over (default: rows); under torchrun a rank's loss is
    weighted by its share of the global batch's units.
    """
    pad = ctx.pad_id
    loop = _Loop(model, train_ds, settings, ctx, loss_fn, make_batch or (lambda ds, idx: collate(ds, idx, pad)),
                 eval_fn, phase, on_eval, on_step, best_from_step, loss_units)
    torch.manual_seed(settings.seed + 1000 * phase)
    if loop.resume():  # killed after this loop ended: its final weights are loaded
        return loop.state.result
    broadcast_module_(model)  # every rank starts from rank 0's weights (as DDP does)
    st, s = loop.state, settings
    done = st.result.stopped_early or st.step >= loop.total_steps
    last_eval = st.result.history[-1]["step"] if st.result.history else -1
    model.train()
    with loop.progress_bar():
        while not done and st.epoch < math.ceil(s.epochs):
            order = loop.epoch_batches(st.epoch)
            while st.batch_pos < len(order):
                epoch_end = loop.train_step(order)
                done = st.step >= loop.total_steps
                if s.eval_every and st.step % s.eval_every == 0 and not epoch_end:
                    done, last_eval = loop.evaluate() or done, st.step
                if done:
                    break
                if s.checkpoint_every and st.step % s.checkpoint_every == 0 and not epoch_end:
                    loop.checkpoint()
            if last_eval != st.step:  # epoch end, or the step that ended training
                done, last_eval = loop.evaluate() or done, st.step
            if st.batch_pos >= len(order):
                st.epoch, st.batch_pos = st.epoch + 1, 0
            done = done or st.step >= loop.total_steps
            if not done:  # the last one is written by `finish`, after restoring the best weights
                loop.checkpoint()
    return loop.finish()


@dataclass
class _LoopState:
    """Where a loop run is: what its checkpoints save and a resume restores."""

    result: TrainResult
    epoch: int = 0
    batch_pos: int = 0  # batches of this epoch's order already trained on
    step: int = 0  # optimizer steps taken
    since_best: int = 0  # evaluations since the best one (early stopping)
    ema: WeightEMA | None = None  # the average of the weights, once it has started


class _Loop:
    """The parts of one `train` run: the model, its optimizer and schedules, and the loop's state."""

    def __init__(self, model: nn.Module, train_ds: EncodedDataset, settings: LoopSettings, ctx: TrainContext,
                 loss_fn: LossFn, make_batch: BatchFn, eval_fn: EvalFn | None, phase: int,
                 on_eval: Callable[[dict], bool] | None, on_step: Callable[[int], None] | None,
                 best_from_step: int, loss_units: UnitsFn | None = None):
        s = self.s = settings
        self.model, self.train_ds, self.ctx, self.phase = model, train_ds, ctx, phase
        self.loss_fn, self.make_batch, self.eval_fn = loss_fn, make_batch, eval_fn
        self.on_eval, self.on_step, self.best_from_step = on_eval, on_step, best_from_step
        self.loss_units = loss_units or (lambda batch: len(batch["input_ids"]))
        self.lengths = train_ds.lengths
        self.batches_per_epoch = math.ceil(len(train_ds) / s.batch_size)
        self.total_batches = math.ceil(s.epochs * self.batches_per_epoch)
        self.total_steps = optimizer_steps(len(train_ds), s)
        self.optimizer = make_optimizer(model, s.lr, s.weight_decay)
        self.params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.scheduler = make_scheduler(self.optimizer, s, self.total_steps)
        self.world, self.device = world(), device_of(model)
        # bf16 autocast around forward + loss where the device has bf16 (GPUs; CPUs with avx512_bf16 / AMX for
        # models wide enough to gain), unless `precision: fp32`; fp16 + GradScaler on older GPUs. Weights,
        # gradients and AdamW stay fp32.
        self.precision, self.precision_note = loop_precision(self.device, s.precision, model_width(model))
        self.scaler = grad_scaler(self.device, self.precision)
        self.plateau = None
        if s.schedule == "plateau":
            self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
                self.optimizer, mode="max" if s.higher_is_better else "min", factor=s.plateau_factor,
                patience=s.plateau_patience)
        self.state = _LoopState(TrainResult(lr=s.lr, batch_size=s.batch_size, precision=self.precision_note))
        self._reporter: StepReporter | None = None

    def resume(self) -> bool:
        """Continue from `ctx.resume` if it is a checkpoint of this loop (same tag); returns whether that
        loop had already finished. Any other start clears the kept best of an earlier loop."""
        ctx, st = self.ctx, self.state
        state, trainer = read_checkpoint(ctx.resume) if ctx.resume is not None else ({}, {})
        if state.get("tag") != ctx.tag:
            if ctx.checkpoints is not None:
                ctx.checkpoints.clear_best()  # a fresh loop: an earlier stage's best must not leak in
            return False
        load_weights(self.model, ctx.resume / "model.safetensors")
        self.optimizer.load_state_dict(trainer["optimizer"])
        self.scheduler.load_state_dict(trainer["scheduler"])
        if self.plateau is not None:
            self.plateau.load_state_dict(trainer["plateau"])
        torch.set_rng_state(trainer["torch_rng"])
        if self.scaler is not None and trainer.get("scaler"):
            self.scaler.load_state_dict(trainer["scaler"])
        if trainer.get("ema") is not None:
            st.ema = WeightEMA(self.model, self.s.ema_decay)
            st.ema.load_state_dict(trainer["ema"])
        loop = state["loop"]
        st.epoch, st.batch_pos, st.step, st.since_best = (loop[k] for k in ("epoch", "batch_pos", "step", "since_best"))
        for k in RESUMED_RESULT_FIELDS:
            if k in loop:  # phase_seconds: not in checkpoints written before it existed
                setattr(st.result, k, loop[k])
        if not loop.get("finished"):
            return False
        st.result.steps, st.result.epochs_run = loop["step"], loop["epochs_run"]
        return True

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`: a pure function of (seed, phase, epoch), so a resume replays them."""
        seed = self.s.seed * 1_000_003 + self.phase * 1009 + epoch
        order = batch_indices(self.lengths, self.s.batch_size, shuffle=True, seed=seed, bucket=self.s.bucket_by_length)
        return order[: self.total_batches - epoch * self.batches_per_epoch]  # a fractional last epoch

    def train_step(self, order: list[list[int]]) -> bool:
        """One optimizer step over the next grad_accum batches of `order` (fewer at the epoch's end):
        backward each (this rank's part of each), average the gradients over the ranks, clip, AdamW,
        schedule; then `on_step`, the average, the log. Returns whether the epoch ended."""
        s, st, res, w = self.s, self.state, self.state.result, self.world
        clock, seen, loss_sum = _PhaseClock(res.phase_seconds), 0, 0.0
        for _ in range(s.grad_accum):
            rows = order[st.batch_pos]
            mine = rank_rows(rows, w)
            # a rank past the rows of a short last batch computes nothing: its gradient counts as zero
            batch = to_device(self.make_batch(self.train_ds, mine), self.device) if mine else None
            clock.lap("data")
            if w.size > 1:  # a rank's mean weighted by its share of the loss's units: the average is the batch's
                units = self.loss_units(batch) if mine else 0
                total = all_reduce_sum([float(units)])[0]
                weight = units * w.size / total if total else 1.0
                clock.lap("all_reduce")
            if mine:
                with autocast(self.device, self.precision):
                    loss = self.loss_fn(self.model, batch) / s.grad_accum
                if w.size > 1:
                    loss = loss * weight
                clock.lap("forward")
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
                loss_sum += loss.item()
                clock.lap("backward")
            seen += len(rows)
            st.batch_pos += 1
            if st.batch_pos >= len(order):
                break
        loss_sum = average_gradients_(self.params, loss_sum)  # over the ranks (DDP's arithmetic); else a no-op
        clock.lap("all_reduce")
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if s.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        clock.lap("optimizer")
        st.step += 1
        exit_hook(st.step)
        if self.on_step is not None:
            self.on_step(st.step)
        if st.ema is not None:
            st.ema.update()
        elif s.ema_decay and st.step >= self.best_from_step:  # the average starts from these weights
            st.ema = WeightEMA(self.model, s.ema_decay)
        clock.lap("other")
        elapsed = clock.last - clock.start
        res.train_seconds += elapsed
        res.examples_seen += seen
        self._log_step(loss_sum, self.optimizer.param_groups[0]["lr"], seen, elapsed)
        return st.batch_pos >= len(order)

    def evaluate(self) -> bool:
        """Dev eval (of the averaged weights once the average runs): history and tensorboard, the plateau
        schedule, the kept best, early stopping and `on_eval`. Returns True when training should stop."""
        if self.eval_fn is None:
            return False
        s, st, res, ctx = self.s, self.state, self.state.result, self.ctx
        with st.ema.swapped_in() if st.ema is not None else contextlib.nullcontext():
            rec = {"step": st.step, "epoch": round(st.epoch + st.batch_pos / self.batches_per_epoch, 3),
                   **self.eval_fn(self.model)}
            if st.ema is not None:
                rec["weights"] = "ema"
            res.history.append(rec)
            self.model.train()
            for k, v in rec.items():  # every metric the task's eval returns (accuracy, perplexity, ...)
                if ctx.tb is not None and k not in ("step", "epoch") and isinstance(v, int | float):
                    ctx.tb.add_scalar(f"{ctx.tag}/eval_{k}", v, st.step)
            value = rec[s.metric]
            self._plateau_step(value)
            if st.step < self.best_from_step:
                pass  # neither a best nor a miss for early stopping: the model is still being changed under it
            elif s.improves(value, res.best_metric) or self._wins_tie(rec):
                res.best_metric, res.best_step, res.best_loss, st.since_best = value, st.step, rec.get("loss"), 0
                self._keep_best(value)
            else:
                st.since_best += 1
            stop = s.early_stopping_patience is not None and st.since_best > s.early_stopping_patience
            if self.on_eval is not None and self.on_eval(rec):
                stop = True
            res.stopped_early = res.stopped_early or stop
            return stop

    def _wins_tie(self, rec: dict) -> bool:
        """An evaluation that equals the best on the metric but has a lower loss. Accuracy on a small selection
        split ties often (30 rows: steps of 0.033), and the first of the tied checkpoints may be a barely
        trained model: a 3-layer student kept its first epoch, which predicted one class for 97% of the dev
        rows (0.45 dev accuracy against 0.73 for the later, tied, lower-loss epoch)."""
        best, loss = self.state.result, rec.get("loss")
        return (self.s.metric != "loss" and rec[self.s.metric] == best.best_metric and loss is not None
                and best.best_loss is not None and loss < best.best_loss)

    def _plateau_step(self, value: float) -> None:
        if self.plateau is None:
            return
        before = [g["lr"] for g in self.optimizer.param_groups]
        self.plateau.step(value)
        # The warm-up LambdaLR recomputes lr from base_lrs every step: carry the reduction into them.
        self.scheduler.base_lrs = [base * g["lr"] / old if old > 0 else base for base, g, old
                                   in zip(self.scheduler.base_lrs, self.optimizer.param_groups, before, strict=True)]

    def _keep_best(self, value: float) -> None:
        """The model's weights (the average, when it runs) as the best so far, if `keep_best`."""
        if not self.s.keep_best:
            return
        if self.ctx.checkpoints is not None:
            self.ctx.checkpoints.save_best(self.model, {"tag": self.ctx.tag, "step": self.state.step,
                                                        self.s.metric: value})
        else:
            self.state.result.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def checkpoint(self, finished: bool = False) -> None:
        if self.ctx.checkpoints is None or not is_main():  # rank 0 writes; every rank holds the same state
            return
        st = self.state
        trainer = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "torch_rng": torch.get_rng_state()}
        if self.scaler is not None:
            trainer["scaler"] = self.scaler.state_dict()
        if self.plateau is not None:
            trainer["plateau"] = self.plateau.state_dict()
        if st.ema is not None:
            trainer["ema"] = st.ema.state_dict()
        loop = {"epoch": st.epoch, "batch_pos": st.batch_pos, "step": st.step, "since_best": st.since_best,
                **{k: getattr(st.result, k) for k in RESUMED_RESULT_FIELDS},
                "finished": finished, "epochs_run": st.result.epochs_run}
        self.ctx.checkpoints.save(self.model, trainer, {"tag": self.ctx.tag, "loop": loop,
                                                        "runner": self.ctx.runner_state})

    def finish(self) -> TrainResult:
        """The final weights (the kept best, else the average) and a last checkpoint holding them, so a
        resume after this point skips the loop."""
        s, st, res = self.s, self.state, self.state.result
        res.steps = st.step
        res.epochs_run = round(min(s.epochs, st.step * s.grad_accum / self.batches_per_epoch), 3)
        if s.keep_best and res.best_step is not None and res.best_step != st.step:
            _restore_best(self.model, self.ctx, res)
        elif st.ema is not None:  # the average is what was evaluated last
            st.ema.copy_to_model()
        self.checkpoint(finished=True)
        return res

    @contextlib.contextmanager
    def progress_bar(self) -> Iterator[None]:
        with StepReporter(self.ctx.progress and is_main(), self.total_steps, self.ctx.tag, self.state.step,
                          detail=f"precision: {self.precision_note}") as reporter:
            self._reporter = reporter
            yield

    def _log_step(self, loss: float, lr: float, examples: int, seconds: float) -> None:
        step, ctx = self.state.step, self.ctx
        self._reporter.update(step, loss, lr, examples, seconds)
        if ctx.tb is not None:
            ctx.tb.add_scalar(f"{ctx.tag}/loss", loss, step)
            ctx.tb.add_scalar(f"{ctx.tag}/lr", lr, step)
            ctx.tb.add_scalar(f"{ctx.tag}/examples_per_s", examples / seconds, step)


def _restore_best(model: nn.Module, ctx: TrainContext, res: TrainResult) -> None:
    if ctx.checkpoints is not None:
        ctx.checkpoints.load_best(model)
    elif res.best_state is not None:
        model.load_state_dict(res.best_state)


def set_trainable(model: nn.Module, trainable: Callable[[str], bool]) -> int:
    """requires_grad from a predicate on parameter names; returns the trainable count."""
    n = 0
    for name, p in model.named_parameters():
        p.requires_grad_(trainable(name))
        n += p.numel() if p.requires_grad else 0
    return n


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
