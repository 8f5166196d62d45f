"""`slimtune tune RECIPE --trials N [--space SPACE.yaml] [--jobs N] [--storage URL] --out DIR`: the recipe's
hyperparameters (learning rate, batch size, epochs, warm-up, weight decay, LoRA's r and alpha, distillation's
temperature and alpha, pruning ratios...) searched with Optuna, each trial a real run of the recipe.

How it stays honest: a trial is scored by the task's primary metric on the run's *selection split* (rows
carved from the train data, `data.select_fraction`), measured on the model the trial's run wrote; its
dev evaluations during training (the same split) feed the pruner, which stops a trial whose curve is
worse than the others' at the same evaluation (median, or successive halving). The eval split is never
chosen on: the best trial's eval-split figures come from its own run and are reported as such.

A search space maps recipe keys (the dotted paths of `slimtune run --set`: `stages.0.lr`,
`stages.0.lora.r`) to distributions: `{low, high}` and `{low, high, log: true}` floats, `{low, high,
step}` ints (low and high written as integers), `{choices: [...]}`. Every key and every value is checked
against the recipe's schema before DIR exists. Without `--space` the space follows from the recipe's stage
configs (`default_space`): every field a rule in `RULES` knows, ranged around the recipe's own value.

DIR holds the study (`study.db`, unless `--storage` names another), every trial's run (`trials/NNNN`; a
pruned trial's run is removed), `best_recipe.yaml` (`slimtune run` takes it as is), `trials.png` (the
objective per trial, best so far) and `tune.md` / `tune.json`. An interrupted tune resumes: finished trials
stay finished and `--trials` counts the study's total; a trial that was running when the process died is
run again with the same parameters. `--jobs N` runs N processes on the one study.
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from slimtune.batching import pad_id_of
from slimtune.errors import SlimtuneError
from slimtune.io import check_output_path, output_errors
from slimtune.models import load_model, load_tokenizer
from slimtune.recipe import Recipe, load_recipe, parse_recipe
from slimtune.runner import run
from slimtune.stages.base import console
from slimtune.studies import TrialStopped, local_storage, open_storage, open_study, pruning_observer, redact
from slimtune.tasks import Task, get_task
from slimtune.tune_report import escape_markup, finish, format_params
from slimtune.tune_space import (
    RULES,
    TuneJob,
    check_selection,
    check_space,
    default_space,
    load_space,
    raw_recipe,
    with_params,
)

STUDY = "tune"  # the study's name in its storage
PRUNERS = ("median", "halving", "none")
HEARTBEAT_S = 60  # a shared (--storage) study: a trial whose process died is failed and queued again
LOCK = ".tune.lock"  # in DIR: one tune at a time; its presence marks a tune directory


# ------------------------------------------------------------------------------------------ the tune
def tune(recipe_path: str | Path, out: str | Path, *, trials: int, space: str | Path | None = None, jobs: int = 1,
         storage: str | None = None, pruner: Any = "median", seed: int = 0, overrides: list[str] | None = None,
         first: list[dict] | None = None) -> dict:
    """Tune the recipe's hyperparameters into `out`; returns DIR/tune.json's content. `first`: parameter
    sets tried before the sampler proposes its own (by default the recipe's own values, when the space
    holds them)."""
    if trials < 1:
        raise SlimtuneError(f"--trials {trials}: a tune needs at least 1 trial")
    if jobs < 1:
        raise SlimtuneError(f"--jobs {jobs}: give 1 or more processes")
    if isinstance(pruner, str) and pruner not in PRUNERS:
        close = difflib.get_close_matches(pruner, PRUNERS, n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"choose from {', '.join(PRUNERS)}"
        raise SlimtuneError(f"--pruner {pruner}: unknown pruner ({hint})")
    recipe = load_recipe(recipe_path, overrides)
    check_selection(recipe, str(recipe_path))
    if space is not None:
        dists = load_space(space, recipe)
    else:
        dists = default_space(recipe)
        if not dists:
            raise SlimtuneError(f"{recipe_path}: no stage has a field the default space tunes "
                                f"({', '.join(RULES)}); give --space")
        check_space(dists, recipe, "default space")
    task = get_task(recipe.task)
    out = check_output_path(Path(out).expanduser().resolve(), kind="directory")
    if out.is_dir() and any(out.iterdir()) and not (out / LOCK).exists():
        raise SlimtuneError(f"{out}: output directory exists and is not a tune directory (give a new --out, or "
                            "the directory of the tune to resume)")
    shared = storage is not None
    if shared:  # a storage elsewhere is opened (and refused) before DIR exists
        open_storage(storage, heartbeat_s=HEARTBEAT_S)
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        url = storage if shared else local_storage(out)
        study = open_study(open_storage(url, heartbeat_s=HEARTBEAT_S if shared else None), STUDY,
                           directions=["maximize" if task.primary.higher_is_better else "minimize"], seed=seed)
        raw = raw_recipe(recipe)
        _same_study(study, raw, dists, redact(url) if shared else str(out / "study.db"), shared)
        fresh = not study.trials
        if not shared:
            _requeue_interrupted(study, out)
        for params in first if first is not None else [_baseline(raw, dists)] if fresh else []:
            if params:
                study.enqueue_trial(params, skip_if_exists=True)
        job = TuneJob(raw=raw, space=dists, out=str(out), storage=url, local=not shared, trials=trials, seed=seed,
                   pruner=pruner, generation=len(study.trials))
        remaining = trials - len(_counted(study.get_trials(deepcopy=False)))
        if remaining > 0:
            console.print(f"tune: {remaining} trial(s) to run ({trials} in all) in {min(jobs, remaining)} "
                          f"process(es); study {redact(url)}", highlight=False)
            _run_processes(job, remaining, jobs)
        return finish(study, job, task, recipe, Path(recipe_path))


def _same_study(study: Any, raw: dict, space: dict, where: str, shared: bool) -> None:
    """A resumed study must be the same recipe and space: its trials are compared with the new ones (machines
    sharing a --storage may keep their files elsewhere: only the space is compared there)."""
    made = {"space": space} if shared else {"recipe": raw, "space": space}
    saved = {k: study.user_attrs.get(k) for k in made}
    if all(v is None for v in saved.values()):
        for k, v in made.items():
            study.set_user_attr(k, v)
        return
    for k, v in made.items():
        if json.loads(json.dumps(v)) != saved[k]:
            raise SlimtuneError(f"{where}: the study was made with another {'search space' if k == 'space' else k}; "
                                "resume with the same recipe, --set and --space, or tune into a new --out")


def _requeue_interrupted(study: Any, out: Path) -> None:
    """Trials left running by a process that was killed (this DIR is locked: nobody else runs them) are failed;
    those and the ones stopped by Ctrl-C (failed without an error of their own) have their partial runs
    removed and their parameters queued again, once."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(t.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    for t in trials:
        if t.state == TrialState.FAIL and "error" not in t.user_attrs and t.number not in retried:
            shutil.rmtree(out / "trials" / f"{t.number:04d}", ignore_errors=True)
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
            console.print(f"trial {t.number} was interrupted: it runs again", highlight=False)


def _baseline(raw: dict, space: dict) -> dict | None:
    """The recipe's own values of the space's keys, when the space holds every one of them."""
    params = {}
    for key, dist in space.items():
        node: Any = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else node[int(part)] if isinstance(node, list) and \
                part.isdigit() and int(part) < len(node) else None
        value = _in_space(dist, node)
        if value is _OUTSIDE:
            return None
        params[key] = value
    return params


_OUTSIDE = object()


def _in_space(dist: dict, value: Any) -> Any:
    """`value` as the distribution holds it (epochs 2.0 -> 2 for an int range), or `_OUTSIDE`."""
    if "choices" in dist:  # 16 and 16.0 are one value; True is not 1
        return next((c for c in dist["choices"] if c == value and isinstance(c, bool) == isinstance(value, bool)),
                    _OUTSIDE)
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _OUTSIDE
    if dist["int"]:
        if not float(value).is_integer():
            return _OUTSIDE
        value = int(value)
    if not dist["low"] <= value <= dist["high"]:
        return _OUTSIDE
    step = dist["step"]
    on_grid = step is None or math.isclose((value - dist["low"]) / step, round((value - dist["low"]) / step))
    return value if on_grid else _OUTSIDE


def _counted(trials: list) -> list:
    """Trials that count toward --trials: finished, pruned, or failed with an error of their own (an
    interrupted one runs again instead)."""
    from optuna.trial import TrialState

    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or (t.state == TrialState.FAIL and "error" in t.user_attrs)]


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One tune at a time in DIR (its processes share the parent's lock)."""
    with output_errors(out):
        fd = os.open(out / LOCK, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlimtuneError(f"{out}: another slimtune tune is running in this directory") from None
        yield
    finally:
        os.close(fd)


def _run_processes(job: TuneJob, remaining: int, jobs: int) -> None:
    """`remaining` trials shared among `jobs` processes: this one and jobs - 1 started with spawn (torch does
    not survive a fork), each `study.optimize` on the same storage, each with its share of the CPU threads."""
    import multiprocessing

    shares = [n for n in (remaining // jobs + (i < remaining % jobs) for i in range(jobs)) if n]
    if len(shares) == 1:
        _optimize(job, shares[0], 0, None)
        return
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_optimize, args=(job, n, i, threads), name=f"slimtune-tune-{i}")
               for i, n in enumerate(shares[1:], start=1)]
    for w in workers:
        w.start()
    try:
        with _torch_threads(threads):
            _optimize(job, shares[0], 0, None)
    except BaseException:
        for w in workers:
            w.terminate()
        raise
    finally:
        for w in workers:
            w.join()
    failed = [(w.name, w.exitcode) for w in workers if w.exitcode]
    if failed:
        codes = ", ".join(f"{name}: exit {code}" for name, code in failed)
        raise SlimtuneError(f"--jobs: {len(failed)} tune process(es) failed ({codes}; their errors are above); the "
                            "study keeps every finished trial: run the command again to resume")


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch  # lazy: only a tune with --jobs changes the thread count

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _optimize(job: TuneJob, n_trials: int, worker: int, threads: int | None) -> None:
    """One process's share of the trials (`worker` 0 is the tune's own process)."""
    import optuna

    if threads is not None:
        import torch  # a spawned worker: its share of the cores

        torch.set_num_threads(threads)
    task = get_task(job.raw["task"])
    storage = open_storage(job.storage, heartbeat_s=None if job.local else HEARTBEAT_S, retry_stale=not job.local)
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # each trial's outcome is one line of ours (`_announce`)
    sampler = optuna.samplers.TPESampler(seed=(job.seed * 1_000_003 + job.generation * 101 + worker) % 2**32,
                                         n_startup_trials=max(2, min(10, job.trials // 3)))
    study = optuna.load_study(study_name=STUDY, storage=storage, sampler=sampler, pruner=_pruner(job.pruner))
    primary = task.primary

    def objective(trial: optuna.Trial) -> float:
        params = {key: _suggest(trial, key, dist) for key, dist in job.space.items()}
        trial_dir = Path(job.out) / "trials" / f"{trial.number:04d}"
        raw = _trial_recipe(job.raw, params)
        try:
            metrics = run(raw, trial_dir, overwrite=True, progress=False,
                          on_eval=pruning_observer(trial, primary.name))
            value, data_info = selection_metric(trial_dir / "model", parse_recipe(raw), task)
        except TrialStopped as e:
            trial.set_user_attr("pruned_at", e.record)
            raise optuna.TrialPruned(str(e)) from None
        except SlimtuneError as e:
            trial.set_user_attr("error", str(e))
            raise
        final = metrics["final"]
        trial.set_user_attr("eval", {k: final.get(k) for k in task.final_keys if final.get(k) is not None})
        trial.set_user_attr("dir", str(trial_dir))
        trial.set_user_attr("splits", {"select": data_info.get("select_source"),
                                       "eval": data_info.get("eval_file") or data_info.get("eval_source")})
        return value

    def after(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        _announce(study, trial, primary.name)
        if len(_counted(study.get_trials(deepcopy=False))) >= job.trials:
            study.stop()  # the total is reached (other processes or machines ran the rest)

    study.optimize(objective, n_trials=n_trials, catch=(SlimtuneError,), callbacks=[after], gc_after_trial=True)


def _pruner(spec: Any) -> Any:
    import optuna

    if not isinstance(spec, str):
        return spec
    if spec == "median":  # never at a trial's first evaluation: a smaller lr starts slower
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1)
    if spec == "halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def _suggest(trial: Any, key: str, dist: dict) -> Any:
    if "choices" in dist:
        return trial.suggest_categorical(key, dist["choices"])
    if dist["int"]:
        return trial.suggest_int(key, dist["low"], dist["high"], step=dist["step"] or 1, log=dist["log"])
    return trial.suggest_float(key, dist["low"], dist["high"], step=dist["step"], log=dist["log"])


def _trial_recipe(raw: dict, params: dict) -> dict:
    """A trial's recipe: the recipe with the trial's values, without the report's extra measurements (the
    starting model, each stage's output) that tuning does not read."""
    out = with_params(raw, params)
    out["report"] = {**out.get("report", {}), "start": False, "stages": False}
    out["keep_checkpoints"] = False
    return out


def selection_metric(model_dir: Path, recipe: Recipe, task: Task) -> tuple[float, dict]:
    """The task's primary metric of the model in `model_dir` on the selection split of `recipe`'s data (carved
    from the train data exactly as the run carved it: seeded), and the data's description."""
    model = load_model(model_dir)
    tokenizer = load_tokenizer(model_dir)
    data_cfg = recipe.data
    if getattr(data_cfg, "augment", None) is not None:  # augmentation touches training rows only
        data_cfg = data_cfg.model_copy(update={"augment": None})
    data = task.prepare_data(data_cfg, tokenizer, task.output_space(data_cfg, model_dir), model_config=model.config)
    if data.selects_on_eval:
        raise SlimtuneError(f"{recipe.data.train}: no selection split could be carved from the train data "
                            "(too few rows for data.select_fraction): tune would choose on the eval split")
    value = task.eval_fn(data.select, pad_id_of(tokenizer))(model)[task.primary.name]
    return float(value), data.info


def _announce(study: Any, trial: Any, metric: str) -> None:
    from optuna.trial import TrialState

    params = format_params(trial.params)
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial  # the eval split is not shown here: it is reported for the chosen trial only
        console.print(f"trial {trial.number}: {metric} {trial.value:.4f} on the selection split {params}; best so "
                      f"far: trial {best.number} ({best.value:.4f})", highlight=False)
    elif trial.state == TrialState.PRUNED:
        at = trial.user_attrs.get("pruned_at", {})
        console.print(f"trial {trial.number}: pruned at {at.get('point', '?')} ({metric} "
                      f"{at.get('value', float('nan')):.4f} on the selection split) {params}", highlight=False)
    else:
        error = escape_markup(trial.user_attrs.get("error", "interrupted"))
        console.print(f"trial {trial.number}: failed: {error} {params}", highlight=False)
