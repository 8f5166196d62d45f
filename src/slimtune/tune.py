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
import copy
import difflib
import fcntl
import json
import math
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from slimtune.batching import pad_id_of
from slimtune.errors import SlimtuneError
from slimtune.io import atomic_write_bytes, atomic_write_text, check_output_path, output_errors
from slimtune.models import load_model, load_tokenizer
from slimtune.recipe import Recipe, load_recipe, parse_recipe, read_yaml, recipe_to_yaml, set_key
from slimtune.runner import run
from slimtune.stages.base import console
from slimtune.studies import TrialStopped, local_storage, open_storage, open_study, pruning_observer, redact
from slimtune.tasks import Task, get_task

STUDY = "tune"  # the study's name in its storage
PRUNERS = ("median", "halving", "none")
DIST_KEYS = ("low", "high", "log", "step", "choices")
HEARTBEAT_S = 60  # a shared (--storage) study: a trial whose process died is failed and queued again
LOCK = ".tune.lock"  # in DIR: one tune at a time; its presence marks a tune directory
SPACE_EXAMPLE = "e.g. `stages.0.lr: {low: 1.0e-5, high: 1.0e-4, log: true}`"


# ------------------------------------------------------------------------------------------ the space
def load_space(path: str | Path, recipe: Recipe) -> dict[str, dict]:
    """The search space file `path`, each distribution checked (`parse_distribution`) and each key and value
    checked against `recipe`'s schema (`check_space`)."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        got = "an empty mapping" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise SlimtuneError(f"{path}: a search space must be a mapping of recipe keys to distributions "
                            f"({SPACE_EXAMPLE}), got {got}")
    space = {}
    for key, spec in raw.items():
        if not isinstance(key, str) or not key:
            raise SlimtuneError(f"{path}: {key!r}: a key must be a dotted recipe key such as stages.0.lr")
        space[key] = parse_distribution(spec, f"{path}: {key}")
    check_space(space, recipe, str(path))
    return space


def parse_distribution(spec: Any, where: str) -> dict:
    """One distribution of a space, normalised: `{"choices": [...]}`, or `{"low", "high", "log", "step",
    "int"}` (an int range when low, high and step are all written as integers)."""
    if not isinstance(spec, dict):
        raise SlimtuneError(f"{where}: expected a distribution ({{low, high}}, {{low, high, log: true}}, "
                            f"{{low, high, step}} or {{choices: [...]}}), got {spec!r}")
    for k in spec:
        if k not in DIST_KEYS:
            close = difflib.get_close_matches(str(k), DIST_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(DIST_KEYS)}"
            raise SlimtuneError(f"{where}: unknown key '{k}' in a distribution ({hint})")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            others = ", ".join(k for k in spec if k != "choices")
            raise SlimtuneError(f"{where}: choices cannot be combined with {others}")
        if not isinstance(choices, list) or not choices:
            raise SlimtuneError(f"{where}: empty choices (give a list of at least one value)")
        for c in choices:
            if not (c is None or isinstance(c, bool | int | float | str)):
                raise SlimtuneError(f"{where}: choices must be numbers, strings, booleans or null (got {c!r})")
        if len({json.dumps(c) for c in choices}) < len(choices):
            raise SlimtuneError(f"{where}: a choice is listed twice")
        return {"choices": list(choices)}
    for k in ("low", "high"):
        if k not in spec:
            raise SlimtuneError(f"{where}: missing '{k}' (a range needs low and high; or give choices)")
    low, high, step = (_number(spec.get(k), k, where) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SlimtuneError(f"{where}: log must be true or false (got {log!r})")
    if not low < high:
        raise SlimtuneError(f"{where}: empty range (low {low:g} >= high {high:g})")
    if log and step is not None:
        raise SlimtuneError(f"{where}: a log range takes no step")
    if log and low <= 0:
        raise SlimtuneError(f"{where}: a log range needs low > 0 (got {low:g})")
    if step is not None:
        if step <= 0:
            raise SlimtuneError(f"{where}: step must be > 0 (got {step:g})")
        if not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
            raise SlimtuneError(f"{where}: high - low ({high - low:g}) is not a multiple of step {step:g}")
    is_int = all(isinstance(spec.get(k), int) for k in ("low", "high")) and isinstance(spec.get("step", 1), int)
    return {"low": low, "high": high, "log": log, "step": step, "int": is_int}


def _number(value: Any, name: str, where: str) -> Any:
    """A range bound as written (an int stays an int); a string such as `1e-5` (YAML 1.1 reads it as text)
    is read as a float."""
    if value is None and name == "step":
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SlimtuneError(f"{where}: {name} must be a number (got {value!r})")
    return value


def check_space(space: dict[str, dict], recipe: Recipe, source: str) -> None:
    """Every key of `space` names a field of `recipe` and every value it can take is valid there: the recipe
    is parsed with the key set to each choice, or to low, high and a value between them (a float range on an
    integer field is refused here, not in trial 7). A key matching no field is the recipe's own error, with
    "did you mean"."""
    raw = _raw(recipe)
    for key, dist in space.items():
        for value in _probes(dist):
            probe = copy.deepcopy(raw)
            try:
                set_key(probe, key, value)
            except SlimtuneError as e:
                raise SlimtuneError(f"{source}: {e}") from None
            try:
                parsed = parse_recipe(probe, source=source)
            except SlimtuneError as e:
                message = str(e)
                raise SlimtuneError(message if "unknown key" in message or "unknown stage" in message
                                    else f"{message} (the space's value {value!r})") from None
            _check_selection(parsed, f"{source}: {key}")


def _probes(dist: dict) -> list:
    if "choices" in dist:
        return dist["choices"]
    low, high = dist["low"], dist["high"]
    if dist["int"]:
        return [low, high]
    inside = math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low))) if dist["log"] else \
        low + 0.37 * (high - low)
    return [low, high, inside if dist["step"] is None else low + dist["step"]]


def _check_selection(recipe: Recipe, source: str) -> None:
    if getattr(recipe.data, "select_fraction", None) == 0:
        raise SlimtuneError(f"{source}: data.select_fraction 0 would choose on the eval split; tune chooses on "
                            "the selection split (a share of the train data): give it a share > 0")


# A field name of a stage config (or of the sub-config its method selects, like finetune's `lora`) -> its
# range in the default space, from the recipe's value and the field's own bounds (None: not tuned).
def _lr(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if not isinstance(value, int | float) or isinstance(value, bool):  # lr: auto
        return {"low": 1e-5, "high": 1e-4, "log": True}
    return {"low": float(f"{value / 3:.2g}"), "high": float(f"{value * 3:.2g}"), "log": True}


def _batch_size(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if not isinstance(value, int) or isinstance(value, bool):  # batch_size: auto
        return {"choices": [16, 32]}
    return {"choices": sorted({max(1, value // 2), value, value * 2})}


def _epochs(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if value >= 1:
        low = max(1, math.floor(value / 2))
        return {"low": low, "high": max(low + 1, math.ceil(value))}
    return {"low": value / 2, "high": min(1.0, value * 2)}


def _fixed(low: float, high: float) -> Callable[..., dict]:
    return lambda value, lo, hi: {"low": low, "high": high}


def _weight_or_scale(value: Any, lo: float | None, hi: float | None) -> dict | None:
    """A weight in [0, 1] (distillation's alpha), or a scale (LoRA's alpha) around its value."""
    if hi is not None and hi <= 1:
        return {"low": 0.1, "high": 0.9}
    return {"choices": sorted({value / 2, value, value * 2})}


def _rank(value: Any, lo: float | None, hi: float | None) -> dict | None:
    return {"choices": sorted({max(1, value // 2), value, value * 2})}


def _temperature(value: Any, lo: float | None, hi: float | None) -> dict | None:
    return {"low": 1.0, "high": max(4.0, 2.0 * value)}


def _share(value: Any, lo: float | None, hi: float | None) -> dict | None:
    """A share removed or kept (pruning ratios, sparsity, low-rank energy): 0.2 either side; not tuned when
    the recipe leaves it unset or at 0 (that part is not compressed)."""
    if not value:
        return None
    low, high = round(max(0.05, value - 0.2), 2), round(min(0.95, value + 0.2, hi if hi is not None else 1), 2)
    return {"low": low, "high": high} if low < high else None


RULES: dict[str, Callable[[Any, float | None, float | None], dict | None]] = {
    "lr": _lr, "batch_size": _batch_size, "epochs": _epochs, "warmup_ratio": _fixed(0.0, 0.2),
    "weight_decay": _fixed(0.0, 0.1), "r": _rank, "alpha": _weight_or_scale, "temperature": _temperature,
    "sparsity": _share, "heads": _share, "ffn": _share, "energy": _share,
}


def default_space(recipe: Recipe) -> dict[str, dict]:
    """The space that follows from the recipe's stages: every field of a stage config (and of the sub-config
    its `method` selects, e.g. `lora` when method is lora) that `RULES` knows, ranged around its value."""
    space: dict[str, dict] = {}
    for i, cfg in enumerate(recipe.stages):
        for key, name, value, bounds in _fields(cfg, f"stages.{i}"):
            rule = RULES.get(name)
            dist = rule(value, *bounds) if rule is not None and value is not None else None
            if dist is not None:
                space[key] = parse_distribution(dist, f"default space: {key}")
    return space


def _fields(cfg: BaseModel, prefix: str) -> Iterator[tuple[str, str, Any, tuple[float | None, float | None]]]:
    method = getattr(cfg, "method", None)
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            if name == method:  # the method's own sub-config (finetune's lora: only when method is lora)
                yield from _fields(value, f"{prefix}.{name}")
            continue
        yield f"{prefix}.{info.alias or name}", name, value, _bounds(info)


def _bounds(info: Any) -> tuple[float | None, float | None]:
    """A field's lower and upper bounds from its schema (`Field(ge=0, le=1)`), None where it has none."""
    lo = hi = None
    for m in info.metadata:
        lo = next((v for v in (getattr(m, "ge", None), getattr(m, "gt", None)) if v is not None), lo)
        hi = next((v for v in (getattr(m, "le", None), getattr(m, "lt", None)) if v is not None), hi)
    return lo, hi


# ------------------------------------------------------------------------------------------ the tune
@dataclass
class _Job:
    """What every process of a tune needs (picklable: `--jobs` starts processes with spawn)."""

    raw: dict  # the recipe, resolved
    space: dict[str, dict]
    out: str
    storage: str
    local: bool  # the study is DIR/study.db (else a shared --storage)
    trials: int  # the study's total
    seed: int
    pruner: Any  # a name of PRUNERS, or an Optuna pruner
    generation: int  # trials in the study when this tune started (a resumed sampler draws new points)


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
    _check_selection(recipe, str(recipe_path))
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
        raw = _raw(recipe)
        _same_study(study, raw, dists, redact(url) if shared else str(out / "study.db"), shared)
        fresh = not study.trials
        if not shared:
            _requeue_interrupted(study, out)
        for params in first if first is not None else [_baseline(raw, dists)] if fresh else []:
            if params:
                study.enqueue_trial(params, skip_if_exists=True)
        job = _Job(raw=raw, space=dists, out=str(out), storage=url, local=not shared, trials=trials, seed=seed,
                   pruner=pruner, generation=len(study.trials))
        remaining = trials - len(_counted(study.get_trials(deepcopy=False)))
        if remaining > 0:
            console.print(f"tune: {remaining} trial(s) to run ({trials} in all) in {min(jobs, remaining)} "
                          f"process(es); study {redact(url)}", highlight=False)
            _run_processes(job, remaining, jobs)
        return _finish(study, job, task, recipe, Path(recipe_path))


def _raw(recipe: Recipe) -> dict:
    return yaml.safe_load(recipe_to_yaml(recipe))


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


def _run_processes(job: _Job, remaining: int, jobs: int) -> None:
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


def _optimize(job: _Job, n_trials: int, worker: int, threads: int | None) -> None:
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


def _with_params(raw: dict, params: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in params.items():
        set_key(out, key, value)
    return out


def _trial_recipe(raw: dict, params: dict) -> dict:
    """A trial's recipe: the recipe with the trial's values, without the report's extra measurements (the
    starting model, each stage's output) that tuning does not read."""
    out = _with_params(raw, params)
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

    params = _params(trial.params)
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial  # the eval split is not shown here: it is reported for the chosen trial only
        console.print(f"trial {trial.number}: {metric} {trial.value:.4f} on the selection split {params}; best so "
                      f"far: trial {best.number} ({best.value:.4f})", highlight=False)
    elif trial.state == TrialState.PRUNED:
        at = trial.user_attrs.get("pruned_at", {})
        console.print(f"trial {trial.number}: pruned at {at.get('point', '?')} ({metric} "
                      f"{at.get('value', float('nan')):.4f} on the selection split) {params}", highlight=False)
    else:
        console.print(f"trial {trial.number}: failed: {_escape(trial.user_attrs.get('error', 'interrupted'))} {params}",
                      highlight=False)


def _fmt(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _params(params: dict) -> str:
    """`[stages.0.lr=0.001, ...]`, escaped for rich (which would read the brackets as markup)."""
    return _escape("[" + ", ".join(f"{k}={_fmt(v)}" for k, v in params.items()) + "]")


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)


# ------------------------------------------------------------------------------------------ the result
def _finish(study: Any, job: _Job, task: Task, recipe: Recipe, recipe_path: Path) -> dict:
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
    best_recipe = parse_recipe(_with_params(job.raw, best.params), source="the best trial's recipe")
    ev = best.user_attrs.get("eval", {}).get(metric.name)
    atomic_write_text(out / "best_recipe.yaml", (
        f"# slimtune tune {recipe_path}: trial {best.number} of {len(rows)}, chosen on the selection split "
        f"({metric.name} {best.value:.4f})\n# its eval-split {metric.name}: "
        f"{'n/a' if ev is None else f'{ev:.4f}'} (reported, not chosen on); run it as is: slimtune run "
        f"best_recipe.yaml --out DIR\n") + recipe_to_yaml(best_recipe))
    _plot(trials, metric.name, metric.higher_is_better, summary["importances"], out / "trials.png")
    _write_summary(out, summary)
    console.print(f"best: trial {best.number} {_params(best.params)} — "
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
                     + " | ".join(_fmt(r["params"][k]) if k in r["params"] else "" for k in keys) + " |")
    atomic_write_text(out / "tune.md", "\n".join(lines) + "\n")
