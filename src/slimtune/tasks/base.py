"""The `Task` protocol: everything that depends on what the model *does* (classify, generate, answer).

Stages, the runner, eval, predict and export ask the run's task and never test its name. A task owns:
- reading and encoding its data, and collating a batch (`prepare_data`, `collate`, `eval_dataset`);
- its training loss (`loss`);
- what distillation matches: per-example or per-token soft targets, and where they sit in the logits
  (`soft_targets`, `distill_rows`);
- its metrics, the primary one and its direction (`eval_fn` for the loop, `evaluate` for a full report);
- what predict and a server return (`predictions`);
- the ONNX export: what is traced, with which names and dynamic axes, and how the task checks the graph
  itself when a row-by-row comparison cannot (`onnx_signature`; a decoder: its KV cache and greedy
  generations), the int8 modes its graph takes (`onnx_quantize`), and how far an exported graph's
  outputs are from torch's (`compare_outputs`);
- what a user must be warned about in its final metrics (`warnings`);
- the model class used to load (`load_pretrained`, `model_class`).

Adding a task: one new module in this package with a class satisfying `Task`, plus one line in
`slimtune.tasks.TASKS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch
from torch import nn

from slimtune.batching import EncodedDataset
from slimtune.config import Preprocessing
from slimtune.data import TaskData

EvalFn = Callable[[nn.Module], dict]


@dataclass(frozen=True)
class Metric:
    """The primary metric of a task and its direction (accuracy up, perplexity down, F1 up)."""

    name: str
    higher_is_better: bool = True

    def better(self, a: float, b: float | None) -> bool:
        return b is None or (a > b if self.higher_is_better else a < b)


@dataclass
class OnnxSignature:
    """What `torch.onnx.export` traces for a task's model, and how the exported fp32 graph is checked."""

    module: nn.Module  # flat tensors in, flat tensors out (e.g. a transformers cache object does not trace)
    example: tuple[torch.Tensor, ...]  # one traced call; the axes named in dynamic_axes vary at run time
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    # the task's own check of the fp32 graph: (graph path, threads) -> a measurement that
    # `slimtune.parity.greedy_verdict` judges (a decoder: greedy generations of torch and of the graph).
    # None: export compares the graph's outputs row by row on its parity sample (`compare_outputs`)
    check: Callable[[Path, int | None], dict] | None = None
    # the exported tokenizer.json pads and truncates at max_length (batches of a classifier); False keeps
    # it as trained (a decoder's prompts are neither padded nor cut)
    pad_tokenizer: bool = True


class Task(Protocol):
    name: ClassVar[str]
    primary: ClassVar[Metric]
    # the keys of metrics.json's `final` this task always writes (None when not measured)
    final_keys: ClassVar[tuple[str, ...]]
    # metrics the training loop can select checkpoints on (LoopConfig.metric), with their direction
    loop_metrics: ClassVar[dict[str, bool]]
    # the keys `measure_speed` writes into `final` (latency and throughput; prefill and decode tokens/s)
    speed_keys: ClassVar[tuple[str, ...]]
    # PEFT's task type for LoRA, and whether the head is new (trains fully beside adapters) or pretrained
    peft_task_type: ClassVar[str]
    new_head: ClassVar[bool]
    # the stages ("prune") or stage methods ("prune:magnitude") that work on this task's models (None: all)
    supported_stages: ClassVar[tuple[str, ...] | None]
    # the recipe's `data:` section for this task (a pydantic model with `train` and `eval` paths)
    data_config: ClassVar[type]
    # the `export --quantize` modes (ONNX Runtime int8) its graph takes; () exports fp32 only
    onnx_quantize: ClassVar[tuple[str, ...]]
    # what distillation matches: "example" = one output distribution per example (small: each teacher labels
    # the transfer set once, cached on disk); "token" = one per scored token (a vocabulary-wide distribution
    # per token is too large to keep: the teachers run online, frozen, on each training batch)
    soft_targets: ClassVar[Literal["example", "token"]]

    def output_space(self, data: Any, start: Path | None = None) -> dict[int, str]:
        """What the model's head must produce, read cheaply before the model loads (labels...). `start`:
        the run's starting model; one already trained for these outputs keeps its own (a classifier's
        label ids and order)."""

    def start_note(self, start: Path, outputs: dict[int, str]) -> str | None:
        """One line for the run's output when the starting model's trained head cannot be kept for
        `outputs` (a classifier fine-tuned for other labels gets a new head); None otherwise."""

    def preprocessing(self, data: Any) -> Preprocessing:
        """The record saved with the model (`slimtune_preprocessing`) that eval, predict, export and
        generate read back, from the recipe's data section."""

    def load_pretrained(self, path: Path, outputs: dict[int, str]) -> nn.Module:
        """The starting model of a run: a pretrained directory with this task's head (a new head when the
        directory's own was trained for other outputs)."""

    def model_class(self) -> type:
        """The transformers Auto class that loads a saved model of this task."""

    def prepare_data(self, data: Any, tokenizer, outputs: dict[int, str],
                     embedding_weight: torch.Tensor | None = None, model_config: Any = None) -> TaskData:
        """Read, clean, split and encode the recipe's data (`model_config`: limits such as the context)."""

    def eval_dataset(self, path: Path, tokenizer, model_config: Any, pre: Preprocessing,
                     limit: int | None = None, stride: int | None = None) -> EncodedDataset:
        """A file for `slimtune eval`, treated exactly as the model's training data was; `limit`: its
        first N rows (or tokens of a text), `stride`: the eval window step of a language model."""

    def collate(self, ds: EncodedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        """One padded batch."""

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training loss of a batch."""

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        """What the loss averages over in `batch` (rows; a language model: scored tokens). Under torchrun a
        rank's mean over its part of a global batch is weighted by its share of these, so the averaged
        gradient is the whole batch's."""

    def distill_rows(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The output distributions distillation matches, as logit rows [N, V], and each row's hard target
        [N]: one row per example for a classifier, one per scored next-token position for a language model
        (the positions and targets of its `loss`)."""

    def eval_fn(self, ds: EncodedDataset, pad_id: int) -> EvalFn:
        """The loop's dev evaluation: model -> {metric: value} (keys of `loop_metrics`)."""

    def evaluate(self, model: nn.Module, ds: EncodedDataset, outputs: dict[int, str], pad_id: int) -> dict:
        """Every metric of the task on `ds` (the evaluate stage, `slimtune eval`)."""

    def measure_speed(self, model: nn.Module, ds: EncodedDataset, pad_id: int, latency_runs: int = 50,
                      throughput_batches: int = 10, threads: int | None = None) -> dict:
        """CPU speed on `ds` (the keys of `speed_keys`, plus threads and CPU)."""

    def predictions(self, logits: torch.Tensor, outputs: dict[int, str]) -> list[dict]:
        """What predict and a server return for a batch of model outputs."""

    def onnx_signature(self, model: nn.Module, tokenizer, source: Path) -> OnnxSignature:
        """What export traces (a float, eval-mode `model`), its names and dynamic axes, and the task's own
        check of the graph if it has one. Refuses, naming `source`, a model whose config disagrees with its
        weights or that the graph cannot carry."""

    def write_artifacts(self, final: dict, out: Path) -> list[str]:
        """Files next to metrics.json that this task's report needs (e.g. a confusion matrix); their names."""

    def compare_outputs(self, reference: np.ndarray, candidate: np.ndarray, ds: EncodedDataset,
                        labelled: bool) -> dict:
        """How far a deployed graph's outputs (`candidate`) are from the torch model's (`reference`) on `ds`:
        `rows`, `agreement`, `changed`; with labels also `torch_<primary>`, `onnx_<primary>`, `drop_pt` (points
        of the primary metric lost) and `drop_interval_pt` (95% half-width of that drop on this many rows)."""

    def warnings(self, final: dict) -> list[str]:
        """What a user must know about the final metrics before trusting them (a model that predicts one
        answer everywhere, one no better than a trivial baseline, an eval split too small to tell); one line each."""
