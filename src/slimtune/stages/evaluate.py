"""`stage: evaluate` — every metric of the task on the eval split, plus parameters, size and CPU speed
(batch-1 latency and batch-32 throughput, with the threads and CPU recorded next to them)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field

from slimtune.config import Strict
from slimtune.distributed import on_main
from slimtune.evaluate import count_parameters, tensors_size_mb
from slimtune.stages.base import Run


class EvaluateConfig(Strict):
    stage: Literal["evaluate"]
    speed: bool = True  # measure latency / throughput
    latency_runs: int = Field(50, ge=1)
    throughput_batches: int = Field(10, ge=1)
    threads: int | None = Field(None, ge=1, description="torch threads for speed (default: all)")


def measure(run: Run, speed: bool = True, latency_runs: int = 50, throughput_batches: int = 10,
            threads: int | None = None) -> dict:
    """The task's metrics of the run's model on the eval split, its size, and (with `speed`) its speed.
    Under torchrun every rank scores its share of the split; rank 0 alone times the model (the others would
    compete for its cores) and sends the figures to the others."""
    model, ds = run.model, run.data.eval
    metrics = run.task.evaluate(model, ds, run.data.labels, run.pad_id)
    params, trainable = count_parameters(model)
    metrics |= {"params": params, "trainable_params": trainable, "size_mb": tensors_size_mb(model)}
    if speed:
        metrics |= on_main(lambda: run.task.measure_speed(model, ds, run.pad_id, latency_runs=latency_runs,
                                                          throughput_batches=throughput_batches, threads=threads))
    return metrics


class Evaluate:
    name: ClassVar[str] = "evaluate"
    Config: ClassVar[type] = EvaluateConfig
    measures: ClassVar[bool] = True  # measures the model it is given, changes nothing (the report's rows)

    def __init__(self, config: EvaluateConfig):
        self.config = config

    def validate(self, run: Run) -> None:
        """Nothing to check beyond the config."""

    def rebuild(self, run: Run) -> None:
        """Measuring changes nothing."""

    def run(self, run: Run) -> dict:
        cfg = self.config
        metrics = measure(run, cfg.speed, cfg.latency_runs, cfg.throughput_batches, cfg.threads)
        return {"stage": "evaluate", "split": run.data.info.get("eval_source", "eval"), **metrics}
