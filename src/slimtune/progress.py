"""Training progress, for a person at a terminal and for a log file.

At a terminal (stderr is a TTY): a rich progress bar with step, loss, lr, examples/s and the time left;
until the first step has run it says "starting" instead of showing a NaN loss and 0 ex/s.
In a log (stderr redirected: `make demo > log 2>&1`, CI, nohup): one plain line every `every_steps`
steps or `every_seconds` seconds, whichever comes first, with the same figures and an ETA.
Either way, once the first steps are timed, one line says how long the whole loop will take on this
machine (examples/s are measured over the steps so far, evaluation passes excluded).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

FORECAST_AFTER_STEPS = 10  # steps timed before the first duration forecast (the very first are slower)
FORECAST_AFTER_SECONDS = 20.0  # ... or this long, whichever comes first


def duration(seconds: float) -> str:
    """12s, 4m05s, 1h02m."""
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


class StepReporter:
    """Shows the steps of one training loop (see the module docstring). `enabled=False` is silent. `detail`
    (e.g. "precision: bf16 autocast (amx_bf16)") is said once, at the start."""

    def __init__(self, enabled: bool, total: int, tag: str, start_step: int = 0, *, every_steps: int = 50,
                 every_seconds: float = 30.0, stream: TextIO | None = None, tty: bool | None = None,
                 detail: str | None = None):
        self.enabled, self.total, self.tag, self.detail = enabled, total, tag, detail
        self.every_steps, self.every_seconds = every_steps, every_seconds
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.start_step = self.last_step = self.printed_step = start_step
        self.train_seconds = self.window_seconds = 0.0
        self.examples = self.window_examples = 0
        self.last_line = time.monotonic()
        self.forecast_done = False
        self._last_loss, self._last_lr = float("nan"), 0.0
        self._bar = self._task = None

    def __enter__(self) -> StepReporter:
        if self.enabled and self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                                 console=Console(file=self.stream), transient=False)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.tag, total=self.total, completed=self.start_step, stats="starting")
            if self.detail:
                self._write(f"{self.tag}: {self.detail}")
        elif self.enabled:
            self._write(f"{self.tag}: {self.total} steps" + (f", resuming at step {self.start_step}"
                                                             if self.start_step else "")
                        + (f", {self.detail}" if self.detail else ""))
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif self.enabled and exc[0] is None and self.last_step not in (self.start_step, self.printed_step):
            self._write(self._line(self.last_step, self._last_loss, self._last_lr, self._rate(final=True)))

    def update(self, step: int, loss: float, lr: float, examples: int, seconds: float) -> None:
        """After optimizer step `step`: its loss and lr, and the examples and seconds it took."""
        self.last_step, self._last_loss, self._last_lr = step, loss, lr
        self.train_seconds += seconds
        self.examples += examples
        self.window_seconds += seconds
        self.window_examples += examples
        if not self.enabled:
            return
        due = ((step - self.start_step) % self.every_steps == 0 or step >= self.total
               or time.monotonic() - self.last_line >= self.every_seconds)
        if self._bar is not None:
            self._bar.update(self._task, completed=step, stats=f"loss {loss:.4f}  lr {lr:.2e}  "
                                                               f"{self._rate():.0f} ex/s")
        elif due:
            self._write(self._line(step, loss, lr, self._rate()))
            self.printed_step = step
        if due:  # the rate shown is the recent one: a new window starts
            self.window_seconds, self.window_examples, self.last_line = 0.0, 0, time.monotonic()
        self._maybe_forecast(step)

    def _rate(self, final: bool = False) -> float:
        seconds, examples = ((self.train_seconds, self.examples) if final or not self.window_seconds
                             else (self.window_seconds, self.window_examples))
        return examples / seconds if seconds else 0.0

    def _eta(self, step: int) -> float:
        done = step - self.start_step
        return (self.total - step) * self.train_seconds / done if done else 0.0

    def _line(self, step: int, loss: float, lr: float, rate: float) -> str:
        return (f"{self.tag} step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%)  loss {loss:.4f}  "
                f"lr {lr:.2e}  {rate:.1f} ex/s  ETA {duration(self._eta(step))}")

    def _maybe_forecast(self, step: int) -> None:
        done = step - self.start_step
        if self.forecast_done or step >= self.total or not (
                done >= FORECAST_AFTER_STEPS or self.train_seconds >= FORECAST_AFTER_SECONDS):
            return
        self.forecast_done = True
        rate = self.examples / self.train_seconds if self.train_seconds else 0.0
        self._write(f"{self.tag}: {self.total - step} steps to go at {rate:.1f} ex/s on this machine: about "
                    f"{duration(self._eta(step))} more (measured over {done} steps; evaluations add to it)")

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.console.print(line, highlight=False, markup=False)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()
