"""What `slimtune tune` leaves in DIR once the study is done: best_recipe.yaml, trials.png, tune.md /
tune.json, and the one-line formatting of a trial's values."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_write_bytes, atomic_write_text
from slimtune.recipe import Recipe, parse_recipe, recipe_to_yaml
from slimtune.stages.base import console
from slimtune.studies import redact
from slimtune.tasks import Task
from slimtune.tune_space import TuneJob, with_params


# ------------------------------------------------------------------------------------------ the result
def finish(study: Any, job: TuneJob, task: Task, recipe: Recipe, recipe_path: Path) -> dict:
    from optuna.trial import TrialState

    out, metric = Path(job.out), task.primary
    trials = study.get_trials(deepcopy=False)
    rows = [_row(t) for t in trials if t.state != TrialState.WAITING]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    splits = complete[0].user_attrs.get("splits", {}) if complete else {}
    summary: dict[str, Any] = {
        "recipe": str(recipe_path), "study": redact(job.storage), "primary": metric.name,
        "direction": "higher is better" if metric.higher_is_better else "lower is better",
        # every trial's objective and the pruner's curves; the eval split is only reported, for the best trial
        "chosen_on": f"selection split ({splits.get('select') or 'held back from train'})",
        "scored_on": f"eval split ({splits.get('eval') or 'the recipe eval data'})",
        "space": job.space,
        "counts": {s: sum(r["state"] == s for r in rows) for s in ("complete", "pruned", "fail", "interrupted",
                                                                    "running")},
        "trials": rows}
    if not complete:
        _write_summary(out, summary)
        raise SlimtuneError(f"{out}: no trial finished ({summary['counts']['pruned']} pruned, "
                            f"{summary['counts']['fail']} failed): see {out / 'tune.md'}")
    best = study.best_trial
    summary["best"] = _row(best)
    summary["importances"] = _importances(study, complete)
    best_recipe = parse_recipe(with_params(job.raw, best.params), source="the best trial's recipe")
    ev = best.user_attrs.get("eval", {}).get(metric.name)
    atomic_write_text(out / "best_recipe.yaml", (
        f"# slimtune tune {recipe_path}: trial {best.number} of {len(rows)}, chosen on the selection split "
        f"({metric.name} {best.value:.4f})\n# its eval-split {metric.name}: "
        f"{'n/a' if ev is None else f'{ev:.4f}'} (reported, not chosen on); run it as is: slimtune run "
        f"best_recipe.yaml --out DIR\n") + recipe_to_yaml(best_recipe))
    _plot(trials, metric.name, metric.higher_is_better, summary["importances"], out / "trials.png")
    _write_summary(out, summary)
    console.print(f"best: trial {best.number} {format_params(best.params)} — "
                  f"chosen on the selection split: {metric.name} {best.value:.4f}; scored on the eval split: "
                  f"{'n/a' if ev is None else f'{ev:.4f}'}; recipe: {out / 'best_recipe.yaml'}", highlight=False)
    return summary


def _row(t: Any) -> dict:
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    selection = t.value if t.state.name == "COMPLETE" else None  # a pruned trial's value is its last evaluation
    state = "interrupted" if t.state.name == "FAIL" and "error" not in t.user_attrs else t.state.name.lower()
    return {"number": t.number, "state": state, "selection": selection, "eval": t.user_attrs.get("eval"),
            "params": t.params, "last_evaluation": last, "pruned_at": t.user_attrs.get("pruned_at"),
            "error": t.user_attrs.get("error"), "dir": t.user_attrs.get("dir")}


def _importances(study: Any, complete: list) -> dict | None:
    """Optuna's parameter importances (its default evaluator), once a few trials finished; None otherwise."""
    if len(complete) < 3 or len(complete[0].params) < 2:
        return None
    import warnings

    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return {k: float(v) for k, v in optuna.importance.get_param_importances(study).items()}
    except Exception:  # noqa: BLE001 - a nicety: too few distinct values, a constant objective...
        return None


def _plot(trials: list, metric: str, higher: bool, importances: dict | None, path: Path) -> None:
    """trials.png: the objective of every trial (finished: dots; pruned: its last evaluation, crossed) and the
    best so far; the parameters' importances beside it when known."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or opened
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator
    from optuna.trial import TrialState

    fig, axes = plt.subplots(1, 2 if importances else 1, figsize=(11 if importances else 7, 4), squeeze=False)
    ax = axes[0][0]
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and t.intermediate_values]
    ax.scatter([t.number for t in done], [t.value for t in done], color="tab:blue", label="finished", zorder=3)
    if pruned:
        ax.scatter([t.number for t in pruned], [t.intermediate_values[max(t.intermediate_values)] for t in pruned],
                   color="tab:gray", marker="x", label="pruned (last evaluation)", zorder=3)
    best, xs, ys = None, [], []
    for t in sorted(trials, key=lambda t: t.number):  # carried over every later trial, pruned ones included
        if t.state == TrialState.COMPLETE and (best is None or (t.value > best if higher else t.value < best)):
            best = t.value
        if best is not None:
            xs.append(t.number)
            ys.append(best)
    ax.step(xs, ys, where="post", color="tab:orange", label="best so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("trial")
    ax.set_ylabel(f"{metric} (selection split)")
    ax.set_title(f"slimtune tune: {metric}, {'higher' if higher else 'lower'} is better")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if importances:
        names = list(importances)[::-1]
        axes[0][1].barh(names, [importances[n] for n in names], color="tab:green")
        axes[0][1].set_title("parameter importance")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _write_summary(out: Path, summary: dict) -> None:
    atomic_write_text(out / "tune.json", json.dumps(summary, indent=2, default=str))
    m = summary["primary"]
    keys = list(summary["space"])
    counts = ", ".join(f"{n} {state}" for state, n in summary["counts"].items() if n)
    lines = [f"# slimtune tune: {summary['recipe']}", "",
             f"- objective: {m} ({summary['direction']}) on the {summary['chosen_on']}: every trial's score and "
             "the pruner's curves",
             f"- reported: the best trial's {m} on the {summary['scored_on']}, never chosen on",
             f"- trials: {len(summary['trials'])} ({counts}); study: {summary['study']}"]
    if "best" in summary:
        b = summary["best"]
        lines += [f"- best: trial {b['number']}, {m} {b['selection']:.4f} on the selection split, "
                  f"{(b['eval'] or {}).get(m, float('nan')):.4f} on the eval split; `slimtune run best_recipe.yaml "
                  "--out DIR` trains it", "", "![trials](trials.png)"]
    if summary.get("importances"):
        lines += ["", "Parameter importance: " + ", ".join(f"{k} {v:.2f}" for k, v in summary["importances"].items())]
    lines += ["", f"| trial | state | {m} (selection split) | " + " | ".join(keys) + " |",
              "|" + " --- |" * (3 + len(keys))]
    for r in summary["trials"]:
        if r["selection"] is not None:
            sel = f"{r['selection']:.4f}"
        elif r["pruned_at"]:
            sel = f"{r['pruned_at']['value']:.4f} at {r['pruned_at']['point']}"
        else:
            sel = ""
        lines.append(f"| {r['number']} | {r['state']} | {sel} | "
                     + " | ".join(format_value(r["params"][k]) if k in r["params"] else "" for k in keys) + " |")
    atomic_write_text(out / "tune.md", "\n".join(lines) + "\n")


def format_value(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def format_params(params: dict) -> str:
    """`[stages.0.lr=0.001, ...]`, escaped for rich (which would read the brackets as markup)."""
    return escape_markup("[" + ", ".join(f"{k}={format_value(v)}" for k, v in params.items()) + "]")


def escape_markup(text: str) -> str:
    from rich.markup import escape

    return escape(text)
