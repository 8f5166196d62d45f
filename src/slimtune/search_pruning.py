"""Stopping a search candidate early once it can no longer meet the accuracy budget.

Why not one of Optuna's pruners: they watch a single objective's learning curve (a multi-objective
study has no `should_prune`), and a median rule on accuracy alone would stop exactly the shallow, fast
candidates that a latency budget is looking for. The accuracy budget, though, is a hard constraint: a
candidate that cannot end within `max_drop` of the reference is not worth finishing, however fast.

The rule, at every dev evaluation of a candidate's training loops (its distillation epochs, its
pruning recovery...): take the largest gain that any finished candidate made from the same point (same
loop kind, same evaluation number) to its final selection metric. If the candidate's metric now plus
that gain plus a noise margin still ends below the budget's floor, it stops: no candidate seen so far
has recovered that much from there. Until `min_finished` candidates have passed a point, nothing stops
there. The curves are the candidates' own selection split (carved from the search's training rows);
the gains are measured against their final metric on the search's selection split, so both sides of
the comparison are the same kind of number for every candidate.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import RunStopped
from slimtune.io import atomic_write_text
from slimtune.studies import eval_points

CURVE_FILE = "search_curve.json"  # beside a finished candidate's metrics.json: its dev evaluations


class CandidateStopped(RunStopped):
    """A candidate stopped by `HopelessPruner`; `record` says where and why (JSON-able)."""

    def __init__(self, record: dict):
        self.record = record
        super().__init__(f"stopped at {record['point']}: {record['metric']:.4f}, and the largest later gain "
                         f"seen ({record['best_gain']:+.4f}) cannot reach {record['floor']:.4f}")


@dataclass
class HopelessPruner:
    floor: float  # the final selection metric the budget needs at least (at most, if lower is better)
    metric: str  # the task's primary metric, as named in the loops' eval records
    higher_is_better: bool = True
    margin: float = 0.0  # noise allowance, in the metric's units
    min_finished: int = 2  # finished candidates that must have passed a point before it can stop one
    curves: dict[str, dict[str, float]] = field(default_factory=dict)  # finished key -> {point: metric}
    finals: dict[str, float] = field(default_factory=dict)  # finished key -> final selection metric
    running: dict[str, dict[str, float]] = field(default_factory=dict)

    @classmethod
    def for_budget(cls, reference: float, max_drop_pt: float, metric: str, higher_is_better: bool,
                   margin_pt: float = 0.5) -> HopelessPruner:
        """`max_drop_pt` points below `reference`; a metric in [0, 1] counts a point as 0.01."""
        per_point = 0.01 if higher_is_better and reference <= 1 else 1.0
        allowed = max_drop_pt * per_point
        floor = reference - allowed if higher_is_better else reference + allowed
        return cls(floor=floor, metric=metric, higher_is_better=higher_is_better, margin=margin_pt * per_point)

    def _up(self, value: float) -> float:
        """`value` oriented so that larger is better."""
        return value if self.higher_is_better else -value

    def best_gain(self, point: str) -> tuple[float, int]:
        """The largest (oriented) gain from `point` to the end among the finished candidates, and how many
        finished candidates passed `point`."""
        gains = [self._up(self.finals[k]) - self._up(curve[point]) for k, curve in self.curves.items()
                 if point in curve]
        return (max(gains), len(gains)) if gains else (0.0, 0)

    def watch(self, key: str) -> Callable[[str, dict], None]:
        """The `on_eval` observer of candidate `key`'s run: records its curve, raises `CandidateStopped`."""
        curve = self.running.setdefault(key, {})

        def see(point: str, step: int, value: float) -> None:  # point: "prune-p0#1" (the same in every pipeline)
            curve[point] = value
            gain, passed = self.best_gain(point)
            if passed >= self.min_finished and self._up(value) + gain + self.margin < self._up(self.floor):
                raise CandidateStopped({"point": point, "metric": value, "best_gain": gain if self.higher_is_better
                                        else -gain, "floor": self.floor, "finished_compared": passed})
        return eval_points(self.metric, see)

    def finish(self, key: str, final: float, run_dir: Path) -> None:
        """Candidate `key` finished with selection metric `final`: its curve (watched now, or saved in
        `run_dir` by an earlier, interrupted search) joins the ones later candidates are compared with."""
        saved = run_dir / CURVE_FILE
        curve = self.running.pop(key, None)
        if curve is not None:
            atomic_write_text(saved, json.dumps(curve))
        elif saved.is_file():
            curve = json.loads(saved.read_text(encoding="utf-8"))
        if curve:
            self.curves[key], self.finals[key] = curve, final

    def forget(self, key: str) -> None:
        self.running.pop(key, None)
