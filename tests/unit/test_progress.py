"""Training progress: a bar at a terminal, plain lines in a log, and a forecast of the loop's duration."""

import io
import re

from slimtune.progress import StepReporter, duration


def _run(reporter: StepReporter, steps: int, seconds_per_step: float = 0.5) -> None:
    with reporter:
        for step in range(reporter.start_step + 1, steps + 1):
            reporter.update(step, loss=1.0 / step, lr=5e-5, examples=32, seconds=seconds_per_step)


def test_a_log_gets_a_line_every_n_steps_with_loss_lr_speed_and_eta():
    log = io.StringIO()  # not a TTY: `make demo > log`
    _run(StepReporter(True, total=120, tag="finetune", every_steps=50, every_seconds=1e9, stream=log), 120)
    lines = log.getvalue().splitlines()
    steps = [line for line in lines if " step " in line]
    assert [re.search(r"step (\d+)/120", line).group(1) for line in steps] == ["50", "100", "120"]
    first = steps[0]
    assert "loss 0.0200" in first and "lr 5.00e-05" in first and "64.0 ex/s" in first and "ETA 35s" in first
    assert lines[0] == "finetune: 120 steps"
    forecast = [line for line in lines if "on this machine" in line]
    assert len(forecast) == 1 and "110 steps to go at 64.0 ex/s" in forecast[0] and "about 55s more" in forecast[0]
    assert "nan" not in log.getvalue()


def test_a_log_line_is_also_written_after_every_seconds():
    log = io.StringIO()
    reporter = StepReporter(True, total=1000, tag="t", every_steps=10_000, every_seconds=0.0, stream=log)
    _run(reporter, 3)
    assert sum(" step " in line for line in log.getvalue().splitlines()) == 3  # each step (30 s here: 0)


def test_a_resumed_loop_says_where_it_resumes_and_times_only_its_own_steps():
    log = io.StringIO()
    _run(StepReporter(True, total=100, tag="t", start_step=60, every_steps=20, every_seconds=1e9, stream=log), 100)
    lines = log.getvalue().splitlines()
    assert lines[0] == "t: 100 steps, resuming at step 60"
    assert any("step 80/100 (80%)" in line and "ETA 10s" in line for line in lines)


def test_a_terminal_gets_a_bar_that_never_shows_nan_or_zero_speed(monkeypatch):
    out = io.StringIO()
    reporter = StepReporter(True, total=4, tag="finetune", stream=out, tty=True)
    with reporter:
        task = reporter._bar.tasks[0]
        assert task.fields["stats"] == "starting"  # before the first step: no "loss nan ... 0 ex/s"
        reporter.update(1, loss=0.7, lr=1e-4, examples=32, seconds=0.25)
        assert task.fields["stats"] == "loss 0.7000  lr 1.00e-04  128 ex/s"


def test_disabled_is_silent():
    log = io.StringIO()
    _run(StepReporter(False, total=30, tag="t", stream=log), 30)
    assert log.getvalue() == ""


def test_duration():
    assert [duration(s) for s in (0, 12.4, 65, 3600 * 2 + 120)] == ["0s", "12s", "1m05s", "2h02m"]
