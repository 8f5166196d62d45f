"""The Optuna plumbing that `slimtune search` and `slimtune tune` share: a study kept in a storage that
survives the process (by default SQLite in the command's directory, `DIR/study.db`, so an interrupted
command resumes), sampled by a seeded TPE sampler, and the runner's `on_eval` observer that turns every
dev evaluation of a run (on its selection split) into a point of the trial's learning curve.

SQLite takes one writer at a time: several processes sharing `study.db` (`slimtune tune --jobs N`) wait
for the lock (`SQLITE_TIMEOUT_S`) instead of failing at once; Optuna's own writes are small next to a
trial's training. Several machines share a study through a database server (`--storage
postgresql://...`, `mysql+pymysql://...`) or a journal file (`journal:PATH`; docs/tuning.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from slimtune.errors import RunStopped, SlimtuneError

STUDY_FILE = "study.db"
SQLITE_TIMEOUT_S = 120  # how long a process waits for another one's write to the SQLite study
JOURNAL = "journal:"  # `journal:PATH`: Optuna's JournalStorage on a file (NFS without working fcntl locks)


def local_storage(out: Path) -> str:
    """The study database of a command's directory: `DIR/study.db`."""
    return f"sqlite:///{Path(out) / STUDY_FILE}"


def open_storage(url: str, *, heartbeat_s: int | None = None, retry_stale: bool = False) -> Any:
    """An Optuna storage for `url`: an SQLAlchemy URL (sqlite:///..., postgresql://..., mysql+pymysql://...)
    or `journal:PATH`. SQLite waits `SQLITE_TIMEOUT_S` for a lock held by another process. `heartbeat_s`:
    each running trial records a heartbeat, and a trial whose process died is failed after two missed
    beats (`retry_stale`: and its parameters are queued again)."""
    import optuna

    if url.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path = Path(url.removeprefix(JOURNAL)).expanduser()
        if not path.parent.is_dir():
            raise SlimtuneError(f"--storage {url}: {path.parent} is not a directory")
        return JournalStorage(JournalFileBackend(str(path)))
    kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite") else {}
    try:
        with warnings.catch_warnings():  # heartbeats and their retry callback are "experimental" in Optuna 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            stale = optuna.storages.RetryHeartbeatStaleTrialCallback
            retry = stale(max_retry=1) if retry_stale and heartbeat_s else None
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=heartbeat_s,
                                              heartbeat_stale_trial_callback=retry)
    except ImportError as e:  # the database's driver (psycopg2, pymysql...) is not installed
        raise SlimtuneError(f"--storage {redact(url)}: {redact(str(e), url)}") from None
    except Exception as e:  # noqa: BLE001 - SQLAlchemy's URL and connection errors: one line naming the storage
        raise SlimtuneError(f"--storage {redact(url)}: cannot open the study storage "
                            f"({redact(' '.join(str(e).split()), url)[:300]})") from None


def redact(text: str, url: str | None = None) -> str:
    """`text` without the password of the storage URL `url` (default: `text` is the URL):
    postgresql://user:secret@host/db -> postgresql://user:***@host/db."""
    scheme, sep, rest = (url or text).partition("://")
    creds, at, _ = rest.rpartition("@")
    password = creds.split(":", 1)[1] if sep and at and ":" in creds else ""
    return text.replace(f":{password}@", ":***@").replace(password, "***") if password else text


def open_study(storage: Any, name: str, *, directions: Sequence[str], seed: int, pruner: Any = None,
               sampler: Any = None) -> Any:
    """Create the study `name` in `storage`, or load it when it exists (a resumed command), with a seeded
    TPE sampler. A study of that name with other directions is refused: it was made for another objective."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = sampler or optuna.samplers.TPESampler(seed=seed)
    try:
        study = optuna.create_study(directions=list(directions), sampler=sampler, pruner=pruner, storage=storage,
                                    study_name=name, load_if_exists=True)
    except ValueError as e:
        raise SlimtuneError(f"study '{name}': {e}") from None
    found = [d.name.lower() for d in study.directions]
    if found != [d.lower() for d in directions]:
        raise SlimtuneError(f"study '{name}' exists with objectives {found}, not {list(directions)}: it was made "
                            "by another command or recipe (use another directory or --storage)")
    return study


def eval_points(metric: str, see: Callable[[str, int, float], None]) -> Callable[[str, dict], None]:
    """The runner's `on_eval` observer of one run (`slimtune.run(..., on_eval=)`): every dev evaluation (on
    the run's selection split) that carries `metric` is shown to `see(point, step, value)`, where `point`
    names it by loop kind and number (`finetune#2`, `prune-p0#1`: the stage index is left out, so that
    pipelines of different lengths compare) and `step` counts the run's evaluations (0, 1, 2...). `see`
    may raise `RunStopped` (the runner then stops the run and removes its output)."""
    seen: dict[str, int] = {}
    steps = [0]

    def observe(tag: str, record: dict) -> None:
        if metric not in record or record[metric] is None:
            return
        kind = tag.split("-", 1)[-1]  # "s1-prune-p0" -> "prune-p0"
        seen[kind] = seen.get(kind, 0) + 1
        step = steps[0]
        steps[0] += 1
        see(f"{kind}#{seen[kind]}", step, float(record[metric]))
    return observe


class TrialStopped(RunStopped):
    """A trial's run stopped by its study's pruner at a dev evaluation; `record` says where (JSON-able)."""

    def __init__(self, record: dict):
        self.record = record
        super().__init__(f"pruned at {record['point']} (step {record['step']}): {record['value']:.4f}")


def pruning_observer(trial: Any, metric: str) -> Callable[[str, dict], None]:
    """The `on_eval` observer of trial `trial`'s run: each selection-split evaluation of `metric` is reported
    to the study (`trial.report(value, step)`), and the run stops (`TrialStopped`) when the study's pruner
    says so."""
    def see(point: str, step: int, value: float) -> None:
        trial.report(value, step)
        if trial.should_prune():
            raise TrialStopped({"point": point, "step": step, "value": value})
    return eval_points(metric, see)
