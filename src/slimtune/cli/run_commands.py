"""Commands that run recipes: run (and its --nproc launch), demo, search, tune, report."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from slimtune.cli.app import app, print_final
from slimtune.errors import SlimtuneError

DEMO_DIR = Path(__file__).parent.parent / "demo_data"
PANEL = "Run recipes"


@app.command("run", rich_help_panel=PANEL)
def run_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML file", metavar="RECIPE", show_default=False)],
    out: Annotated[Path, typer.Option("--out", "-o", help="run directory to create", metavar="DIR")],
    set_: Annotated[list[str] | None, typer.Option(
        "--set", metavar="KEY=VALUE", help="override a recipe key, e.g. --set data.max_length=64 "
        "--set stages.0.epochs=3 (repeat for several keys)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a killed run from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing non-empty OUT")] = False,
    keep_checkpoints: Annotated[bool | None, typer.Option(
        "--keep-checkpoints", help="keep OUT/checkpoints/ after the run (also the recipe key keep_checkpoints)",
        show_default=False)] = None,
    nproc: Annotated[int | None, typer.Option(
        "--nproc", metavar="N", show_default=False,
        help="train with N local processes (data parallel, torchrun; at most one per core on CPU, one per GPU); "
        "batch_size stays the global batch (docs/distributed.md)")] = None,
    device: Annotated[str | None, typer.Option(
        "--device", metavar="DEVICE", show_default=False,
        help="auto (CUDA when available), cpu, cuda or cuda:N (default: the recipe key device, auto)")] = None,
):
    """Run a recipe: every stage in order, then write OUT/ (model, metrics.json, report.html, report.md...)."""
    if nproc is not None:
        args = ["run", str(recipe), "--out", str(out), *(a for item in set_ or [] for a in ("--set", item)),
                *(["--resume"] if resume else []), *(["--overwrite"] if overwrite else []),
                *(["--keep-checkpoints"] if keep_checkpoints else []), *(["--device", device] if device else [])]
        if _launch_ranks(nproc, args, device or _recipe_device(recipe, set_ or [])):
            return
    from slimtune.runner import run

    metrics = run(recipe, out, overwrite=overwrite, resume=resume, overrides=set_ or [],
                  keep_checkpoints=keep_checkpoints, device=device)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, rank 0 speaks for the job
        print_final({"final": metrics["final"]}, title=f"{out}")


def _launch_ranks(nproc: int, args: list[str], device: str | None) -> bool:
    """`slimtune ARGS` in `nproc` processes (True), or nothing to launch for one process (False). Checked
    before anything starts; a rank that fails makes the whole job fail at once, naming the rank (exit 1)."""
    from slimtune import distributed

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise SlimtuneError(f"--nproc {nproc}: this is already one of {os.environ['WORLD_SIZE']} processes "
                            "started by torchrun; drop --nproc")
    distributed.check_nproc(nproc, device)
    if nproc == 1:
        return False
    try:
        distributed.launch(nproc, args)
    except distributed.LaunchFailed as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    return True


def _recipe_device(recipe: Path, overrides: list[str]) -> str | None:
    """The recipe's `device` (read cheaply, for --nproc's check before anything starts); the run itself
    reports an unreadable recipe."""
    import yaml

    for item in reversed(overrides):
        if item.startswith("device="):
            return item.split("=", 1)[1]
    try:
        raw = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ValueError):
        return None
    device = raw.get("device") if isinstance(raw, dict) else None
    return device if isinstance(device, str) else None

@app.command("demo", rich_help_panel=PANEL)
def demo_cmd(
    out: Annotated[Path | None, typer.Option("--out", "-o", help="run directory (default: runs/demo-TIME)",
                                             metavar="DIR")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing non-empty OUT")] = False,
):
    """The embedded default: fine-tune the bundled MiniLM on the bundled SST-2, then evaluate it."""
    from slimtune.runner import run

    out = out or Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    typer.echo("slimtune demo: fine-tunes all-MiniLM-L6-v2 on 6,920 SST-2 sentences (2 epochs), evaluating on "
               "872 before and after; after its first steps it says how long it takes on this machine", err=True)
    metrics = run(DEMO_DIR / "demo.yaml", out, overwrite=overwrite)
    before = next(s for s in metrics["stages"] if s["stage"] == "evaluate")
    print_final({"MiniLM, new head (before)": before, "MiniLM fine-tuned (after)": metrics["final"]},
                 title="slimtune demo: all-MiniLM-L6-v2 on SST-2 (dev split)")
    typer.echo(f"run directory: {out.resolve()}  (report: {out / 'report.html'})", err=True)


@app.command("search", rich_help_panel=PANEL)
def search_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML whose stages fine-tune the base model", metavar="RECIPE",
                                           show_default=False)],
    max_size_mb: Annotated[float, typer.Option("--max-size-mb", help="the shipped artifact's size on disk",
                                               metavar="S")],
    max_latency_ms: Annotated[float, typer.Option("--max-latency-ms", help="batch-1 latency of the shipped artifact",
                                                  metavar="L")],
    max_drop: Annotated[float, typer.Option("--max-drop", help="points of the primary metric below the fine-tuned "
                                            "base model, on the selection split", metavar="D")],
    out: Annotated[Path, typer.Option("--out", "-o", help="search directory (resumes when it exists)", metavar="DIR")],
    teacher: Annotated[str | None, typer.Option(help="distil students from this fine-tuned model instead of the "
                                                "base model", metavar="DIR")] = None,
    trials: Annotated[int, typer.Option(help="candidates to measure in all (a resumed search counts the "
                                        "finished ones)", min=1, metavar="N")] = 12,
    select_fraction: Annotated[float, typer.Option(help="share of the train rows held back to choose on",
                                                   min=0.01, max=0.5)] = 0.15,
    epochs: Annotated[float, typer.Option(help="distillation epochs (recovery: half)", min=0.1)] = 2.0,
    seed: Annotated[int, typer.Option(help="the split's and the sampler's seed")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key")] = None,
):
    """The most accurate model under a size and latency budget: candidate pipelines (student depth, structured
    pruning, int8) measured for real on a selection split, the chosen one reported on the eval split."""
    from slimtune.search import Budget, search

    summary = search(recipe, out, Budget(max_size_mb, max_latency_ms, max_drop), trials=trials, teacher=teacher,
                     select_fraction=select_fraction, epochs=epochs, seed=seed, overrides=set_ or [])
    sys.stdout.write(json.dumps({k: summary.get(k) for k in ("met", "best", "reported", "closest")
                                 if k in summary}, default=str) + "\n")
    if not summary["met"]:
        raise typer.Exit(1)


@app.command("tune", rich_help_panel=PANEL)
def tune_cmd(
    recipe: Annotated[Path, typer.Argument(help="recipe YAML to tune", metavar="RECIPE", show_default=False)],
    trials: Annotated[int, typer.Option("--trials", help="trials in the study in all (a resumed tune counts the "
                                        "ones already run)", metavar="N")],
    out: Annotated[Path, typer.Option("--out", "-o", help="tune directory: study.db, trials/, best_recipe.yaml, "
                                      "trials.png, tune.md (resumes when it exists)", metavar="DIR")],
    space: Annotated[Path | None, typer.Option(
        "--space", metavar="SPACE.yaml", show_default=False,
        help="recipe keys -> distributions, e.g. 'stages.0.lr: {low: 1.0e-5, high: 1.0e-4, log: true}', "
        "'stages.0.batch_size: {choices: [16, 32]}', 'stages.0.epochs: {low: 1, high: 4, step: 1}' "
        "(default: a space that follows from the recipe's stages)")] = None,
    jobs: Annotated[int, typer.Option("--jobs", help="trials run at once, each in its own process on the one "
                                      "study", metavar="N")] = 1,
    storage: Annotated[str | None, typer.Option(
        "--storage", metavar="URL", show_default=False,
        help="the study somewhere several machines share: postgresql://..., mysql+pymysql://..., sqlite:///... or "
        "journal:PATH (default: DIR/study.db; docs/tuning.md)")] = None,
    pruner: Annotated[str, typer.Option(help="stops trials whose selection-split curve lags: median, halving "
                                        "(successive halving) or none")] = "median",
    seed: Annotated[int, typer.Option(help="the sampler's seed")] = 0,
    set_: Annotated[list[str] | None, typer.Option("--set", metavar="KEY=VALUE", help="override a recipe key")] = None,
):
    """Tune a recipe's hyperparameters with Optuna (TPE, pruned on the selection split): every trial a real run,
    the best one chosen on the selection split, reported with its eval-split figures, written as best_recipe.yaml."""
    from slimtune.tune import tune

    summary = tune(recipe, out, trials=trials, space=space, jobs=jobs, storage=storage, pruner=pruner, seed=seed,
                   overrides=set_ or [])
    sys.stdout.write(json.dumps({k: summary.get(k) for k in ("best", "chosen_on", "scored_on", "counts")},
                                default=str) + "\n")


@app.command("report", rich_help_panel=PANEL)
def report_cmd(
    run_dirs: Annotated[list[Path], typer.Argument(help="finished run directories: the first gets the report, "
                                                   "the others are compared rows", metavar="RUN_DIR...",
                                                   show_default=False)],
):
    """Write RUN_DIR/report.html (self-contained) and report.md: every model of the run with its metrics,
    size and speed (naming the runtime), a Pareto plot, training curves, the recipe and the machine."""
    from slimtune.report_page import write_report

    written = write_report(run_dirs[0], compare=run_dirs[1:])
    typer.echo(f"report: {written['html']}  (markdown: {written['md']})", err=True)
