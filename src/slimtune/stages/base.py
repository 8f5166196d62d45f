"""What every stage shares: the `Stage` protocol, the typed `Run` it works on, and the opening of the
compression stages (PEFT guard, stage-start snapshot, start metric, parameter counts).

A stage is a class built from its typed config (`Stage(cfg)`), with
- `validate(run)`: every check that configs and the loaded model allow, before OUT is touched;
- `run(run) -> metrics`: change or measure `run.model`, return a JSON-able record (with "stage");
- `rebuild(run)`: on `--resume` past this finished stage, redo its structural change (smaller matrices,
  quantized modules, a new student...) without training, so the checkpoint's weights fit.
A stage keeps what `rebuild` needs in its own typed state (`run.save_state(...)` / `run.load_state(...)`),
saved in every checkpoint. Stages never import each other; shared machinery lives in lower layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, TypeVar

import torch
from pydantic import BaseModel
from rich.console import Console
from torch import nn

from slimtune.adapt.lora import is_peft
from slimtune.autotune import find_batch_size, find_lr
from slimtune.batching import EncodedDataset, encode, pad_id_of
from slimtune.checkpoint import CheckpointStore, stage_start_snapshot
from slimtune.config import LoopConfig, Preprocessing
from slimtune.distributed import autocast, model_width, on_main, precision_for, to_device
from slimtune.errors import SlimtuneError
from slimtune.tasks import Task, TaskData
from slimtune.train import LoopSettings, LossFn, TrainContext, TrainResult, train

console = Console(stderr=True, soft_wrap=True)  # messages stay one line (greppable logs)
State = TypeVar("State")


@dataclass
class Progress:
    """What a checkpoint records about the run beyond the weights (JSON in state.json)."""

    stage: int = 0  # the stage being run
    done: list[dict] = field(default_factory=list)  # metrics of the finished stages
    auto: dict[str, dict] = field(default_factory=dict)  # stage index -> resolved lr / batch_size
    phases: list[dict] = field(default_factory=list)  # finished phases of the current stage
    states: dict[str, dict] = field(default_factory=dict)  # stage index -> that stage's typed state
    start: dict = field(default_factory=dict)  # the starting model's measurement (the report's reference)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, saved: dict) -> Progress:
        return cls(**{f.name: saved[f.name] for f in dataclasses.fields(cls) if f.name in saved})


@dataclass
class Run:
    """The model, its data and where the run lives: what every stage reads and changes."""

    task: Task
    model: nn.Module
    tokenizer: Any
    data: TaskData
    preprocessing: Preprocessing
    base_model: str  # the recipe's model (alias or absolute path)
    stage_index: int = 0
    stage_name: str = ""
    checkpoints: CheckpointStore | None = None
    tb: Any = None  # torch.utils.tensorboard.SummaryWriter
    resume: Path | None = None  # the checkpoint the interrupted stage continues from
    progress: Progress = field(default_factory=Progress)
    show_progress: bool = True
    out: Path | None = None
    # sees every dev evaluation of every training loop, with the loop's tag (a search watches its candidates)
    on_eval: Callable[[str, dict], None] | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # where models train and measure

    @property
    def pad_id(self) -> int:
        return pad_id_of(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self.preprocessing.max_length

    def eval_fn(self, eval_ds: EncodedDataset | None = None, pad_id: int | None = None):
        """The task's dev evaluation that decisions use (checkpoints, early stopping, a stage's own
        choices): of `eval_ds`, by default the run's selection split, never the split it reports."""
        return self.task.eval_fn(self.data.select if eval_ds is None else eval_ds,
                                 self.pad_id if pad_id is None else pad_id)

    def adopt_tokenizer(self, tokenizer, select: EncodedDataset | None = None) -> None:
        """`tokenizer` becomes the run's and every split is re-encoded with it from its cleaned texts
        (`select`: the selection split, already encoded with it)."""
        reencode = lambda ds: encode(tokenizer, ds.texts, ds.labels, ds.pairs, self.max_length)  # noqa: E731
        eval_ds = reencode(self.data.eval)
        if self.data.selects_on_eval:
            select = eval_ds
        elif select is None:
            select = reencode(self.data.select)
        self.data = TaskData(train=reencode(self.data.train), eval=eval_ds, labels=self.data.labels,
                             info=self.data.info, select=select)
        self.tokenizer = tokenizer

    def primary_metric(self, model: nn.Module) -> float:
        """The task's primary metric of `model` on the eval split (stages report it before and after)."""
        return self.eval_fn(self.data.eval)(model)[self.task.primary.name]

    def train_context(self, phase: int | None = None, pad_id: int | None = None) -> TrainContext:
        tag = f"s{self.stage_index}-{self.stage_name}" + ("" if phase is None else f"-p{phase}")
        return TrainContext(checkpoints=self.checkpoints, tb=self.tb, tag=tag, resume=self.resume,
                            runner_state=self.progress, progress=self.show_progress,
                            pad_id=self.pad_id if pad_id is None else pad_id)

    def loop_metric(self, cfg: LoopConfig) -> str:
        """The dev metric that picks the best weights: `cfg.metric`, else the task's primary one."""
        metric = cfg.metric or self.task.primary.name
        if metric not in self.task.loop_metrics:
            raise SlimtuneError(f"metric: '{metric}' is not a metric of task {self.task.name} "
                                f"(choose from {', '.join(self.task.loop_metrics)})")
        return metric

    def loop_direction(self, cfg: LoopConfig) -> bool:
        """True when a larger loop metric is better (the task says, per metric)."""
        return self.task.loop_metrics[self.loop_metric(cfg)]

    def fit(self, model: nn.Module, cfg: LoopConfig, *, lr: float, batch_size: int, loss_fn: LossFn | None = None,
            make_batch: Callable | None = None, train_ds: EncodedDataset | None = None,
            eval_ds: EncodedDataset | None = None, pad_id: int | None = None, phase: int | None = None,
            epochs: float | None = None, resume: bool = True, **hooks) -> TrainResult:
        """The one training loop on this run's data with the task's loss, collation and dev metrics on the
        selection split (each overridable); `lr` / `batch_size` are final values (auto already resolved)."""
        pad = self.pad_id if pad_id is None else pad_id
        eval_ds = self.data.select if eval_ds is None else eval_ds
        ctx = self.train_context(phase, pad_id=pad)
        if not resume:
            ctx.resume = None
        settings = LoopSettings.from_config(cfg, lr=lr, batch_size=batch_size, epochs=epochs,
                                            higher_is_better=self.loop_direction(cfg), metric=self.loop_metric(cfg))
        if self.on_eval is not None:
            hooks["on_eval"] = _observed(self.on_eval, ctx.tag, hooks.get("on_eval"))
        model.to(self.device)  # a stage's new model (a student, a copy) trains where the run does
        return train(model, self.data.train if train_ds is None else train_ds, settings, ctx,
                     loss_fn=loss_fn or self.task.loss, loss_units=self.task.loss_units,
                     make_batch=make_batch or (lambda ds, idx: self.task.collate(ds, idx, pad)),
                     eval_fn=self.eval_fn(eval_ds, pad) if len(eval_ds) else None, phase=phase or 0, **hooks)

    # ---- typed per-stage state, kept in checkpoints for --resume
    def save_state(self, state: Any) -> None:
        self.progress.states[str(self.stage_index)] = dataclasses.asdict(state)

    def load_state(self, kind: type[State]) -> State | None:
        saved = self.progress.states.get(str(self.stage_index))
        return None if saved is None else kind(**saved)

    # ---- lr: auto / batch_size: auto
    def resolve_auto(self, cfg: LoopConfig, model: nn.Module, loss_fn: LossFn,
                     train_ds: EncodedDataset | None = None,
                     make_batch: Callable | None = None) -> tuple[float, int]:
        """`lr: auto` / `batch_size: auto` on `model` as it will train (adapters, frozen parts and the
        loss already in place), computed once per stage and kept in checkpoints for resumes."""
        saved = self.progress.auto.get(str(self.stage_index))
        if saved:
            return saved["lr"], saved["batch_size"]
        # under torchrun rank 0 runs the range tests alone (timings on shared cores would mislead) and every
        # rank trains with its result
        lr, bs = on_main(lambda: self._find_auto(cfg, model, loss_fn, train_ds, make_batch))
        self.progress.auto[str(self.stage_index)] = {"lr": float(lr), "batch_size": int(bs)}
        return float(lr), int(bs)

    def _find_auto(self, cfg: LoopConfig, model: nn.Module, loss_fn: LossFn, train_ds: EncodedDataset | None,
                   make_batch: Callable | None) -> tuple[float, int]:
        pad, device = self.pad_id, self.device
        collate = make_batch or (lambda ds, idx: self.task.collate(ds, idx, pad))
        make_batch = lambda ds, idx: to_device(collate(ds, idx), device)  # noqa: E731
        model.to(device)
        train_ds = train_ds or self.data.train
        bs, lr = cfg.batch_size, cfg.lr
        probe_loss = loss_fn
        if precision_for(device, cfg.precision, model_width(model)) == "bf16":  # probe at the loop's speed, numerics

            def probe_loss(m: nn.Module, batch: dict) -> torch.Tensor:
                with autocast(device, "bf16"):
                    return loss_fn(m, batch)

        if bs == "auto":
            bs, speeds = find_batch_size(model, train_ds, probe_loss, make_batch, seed=cfg.seed)
            console.print(f"batch_size auto: {bs} (examples/s by batch size: "
                          f"{ {k: round(v, 1) for k, v in speeds.items()} })")
        if lr == "auto":
            lr, _ = find_lr(model, train_ds, probe_loss, make_batch, bs, cfg.weight_decay, seed=cfg.seed)
            console.print(f"lr auto (LR range test): {lr:.2e}")
        return float(lr), int(bs)


class Stage(Protocol):
    """One step of a recipe. `name` is its `stage:` tag; `Config` its typed config (a pydantic model, or
    an Annotated union of per-method models discriminated on `method`)."""

    name: ClassVar[str]
    Config: ClassVar[Any]
    config: BaseModel
    # (optional) True for a stage that only measures the model it is given: the runner then measures no
    # report row of its own before it

    def __init__(self, config: BaseModel) -> None: ...

    def validate(self, run: Run) -> None: ...

    def run(self, run: Run) -> dict: ...

    def rebuild(self, run: Run) -> None: ...


@dataclass
class StageStart:
    """What a compression stage measured before changing the model."""

    metric: float  # the task's primary metric on the eval split
    params: int


def open_compression(run: Run, stage: str, snapshot: bool = True) -> StageStart:
    """The opening every compression stage shares: refuse an unmerged LoRA adapter, keep the stage-start
    weights (a killed stage restarts from them), and measure the start metric and the parameter count."""
    if is_peft(run.model):
        raise SlimtuneError(f"{stage}: the model is an unmerged LoRA adapter; set lora.save_adapter_only: false")
    if snapshot:
        stage_start_snapshot(run, run.model)
    # the first stage starts from the model the runner has just measured (the report's start): not twice
    measured = run.progress.start.get(run.task.primary.name) if run.stage_index == 0 else None
    metric = measured if measured is not None else run.primary_metric(run.model)
    return StageStart(metric=metric, params=count_params(run.model))


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def trainable_record(model: nn.Module) -> dict:
    """trainable_params / trainable_pct of `model` as it is now (every training stage reports them)."""
    total, trainable = count_params(model), count_params(model, trainable_only=True)
    return {"trainable_params": trainable, "trainable_pct": round(100 * trainable / total, 3) if total else 0.0}


def _observed(observer: Callable[[str, dict], None], tag: str, hook: Callable[[dict], bool] | None):
    """A loop's `on_eval` that shows each record to the run's observer first (it may raise `RunStopped`)."""
    def on_eval(record: dict) -> bool:
        observer(tag, record)
        return bool(hook(record)) if hook is not None else False
    return on_eval
