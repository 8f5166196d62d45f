"""`slimtune learn MODEL_DIR --feedback DB --out DIR`: a served classifier learns from its feedback into new
model versions; one that forgot what it knew is not promoted.

1. The feedback rows not learned yet (after the last id MODEL_DIR's `version.json` consumed from the same
   store; the store is opened read-only), labels mapped through the model's id2label (unknown: skipped).
2. Mixed with a seeded, stratified replay sample of the original training data (`replay_ratio` per
   feedback row): `--replay DATA`, else the training rows of the run MODEL_DIR comes from (RUN/recipe.yaml,
   split as the run split it: never its eval rows).
3. A full fine-tune through the runner with MODEL_DIR as `model` (its labels, their order, its head and
   its preprocessing record are kept), small lr, in a temp directory inside DIR.
4. Old and new model measured on the old eval set (`--eval DATA`, else the run's eval split) and on the
   feedback rows (the new model trained on them): accuracy, macro F1 over the classes present.
5. DIR/vNNNN appears in one rename (the model directory, `version.json`, `learn_report.json` / `.md`), then
   `DIR/current` (a relative symlink) is switched to it in one rename, unless the new model lost more than
   `max_forget` points of old-eval accuracy: then it is kept for inspection, marked not promoted.

Interrupted anywhere (Ctrl-C, SIGTERM through the CLI, an exception) nothing changes: the store was only
read, a version appears whole or not at all, `current` is switched last. One learn at a time per DIR (a
lock file), which lets a learn remove the temp entries a killed one left. `watch` polls the store, learns
every `every` new rows and announces a promotion to a server (`POST URL/admin/reload`).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import yaml

from slimtune.batching import encode, pad_id_of
from slimtune.config import DataConfig, Preprocessing, names_causal_lm
from slimtune.data import label_id, preprocessor_for, read_table, stratified_sample, stratified_split
from slimtune.errors import SlimtuneError
from slimtune.feedback import FeedbackStore
from slimtune.io import atomic_dir, atomic_write_text, check_output_path, output_errors
from slimtune.models import load_model, load_tokenizer, preprocessing_of, read_config, resolve_model_path
from slimtune.runner import run as run_recipe
from slimtune.server_client import request_reload
from slimtune.stages.base import console
from slimtune.tasks import task_of_model

VERSION_FILE, CURRENT = "version.json", "current"
EXIT_NOTHING_NEW, EXIT_NOT_PROMOTED = 1, 3  # the CLI's exit codes (a user error is 2, as everywhere)
_VERSION = re.compile(r"v(\d{4,})")
Example = tuple[str, str | None, str]  # text, second text of a pair (or None), label name


class NothingToLearn(SlimtuneError):
    """Fewer new feedback rows than asked for: no version is made."""


@dataclass
class LearnResult:
    version: str
    path: Path
    promoted: bool
    record: dict
    message: str


def learn(model_dir: str | Path, feedback: str | Path, out: str | Path, *, replay: str | Path | None = None,
          eval_data: str | Path | None = None, max_forget: float = 1.0, epochs: float = 2.0, lr: float = 2e-5,
          replay_ratio: float = 4.0, min_new: int = 1, batch_size: int = 16, seed: int = 0,
          progress: bool | None = None) -> LearnResult:
    """One new version of MODEL_DIR in OUT from the feedback rows it has not learned yet (module docstring)."""
    source = check_classifier(model_dir)
    out = check_output_path(Path(out).expanduser().resolve(), kind="directory")
    if (out / CURRENT).exists() and not (out / CURRENT).is_symlink():
        raise SlimtuneError(f"{out / CURRENT}: exists and is not a symlink (learn points it at the promoted version)")
    parent = version_record(source)
    with _locked(out):
        with FeedbackStore(feedback, readonly=True) as store:
            after = consumed_id(parent, store.store_id)
            rows, store_id = store.rows(after_id=after), store.store_id
        if len(rows) < max(min_new, 1):
            since = f"after id {after} (learned by {source})" if after else "in the store"
            raise NothingToLearn(f"{feedback}: {len(rows)} new feedback rows {since}; --min-new is {min_new}")
        model, tokenizer, pre = load_model(source), load_tokenizer(source), preprocessing_of(source)
        outputs = {int(k): str(v) for k, v in model.config.id2label.items()}
        label2id = {name: i for i, name in outputs.items()}
        fresh, unknown = [], Counter()
        for row in rows:
            found = _label_id(row.label, label2id)
            if found is None:
                unknown[row.label] += 1
            else:
                fresh.append((row.text, (row.pair or "") if pre.text_pair_field else None, outputs[found]))
        if not fresh:
            raise SlimtuneError(f"{feedback}: none of the {len(rows)} new feedback rows has a label of the model "
                                f"(found {_listed(unknown)}; the model knows {', '.join(label2id)})")
        if unknown:
            console.print(f"skipped {sum(unknown.values())} feedback rows with labels the model does not know: "
                          f"{_listed(unknown)}", highlight=False)
        run_dir = (parent or {}).get("origin_run") or _run_of(source)
        work = Path(tempfile.mkdtemp(prefix=".learn-work-", dir=out))
        try:
            pool, eval_file, sources = _replay_and_eval(work, run_dir, replay, eval_data, pre, label2id, replay_ratio)
            n = min(round(replay_ratio * len(fresh)), len(pool))
            replayed = [pool[i] for i in stratified_sample([e[2] for e in pool], n, seed)] if n else []
            train_file = _write_examples(work / "train.jsonl", fresh + replayed, pre)
            task = task_of_model(model.config)
            sets = {"old_eval": task.eval_dataset(eval_file, tokenizer, model.config, pre),
                    "feedback": _encoded(fresh, tokenizer, pre, label2id)}
            before = measure(model, sets, outputs, pad_id_of(tokenizer))
            del model
            recipe = {"task": task.name, "model": str(source),
                      "data": {**pre.model_dump(mode="json"), "train": str(train_file), "eval": str(eval_file),
                               "select_fraction": 0},  # nothing is chosen (keep_best off): the eval split only reports
                      "stages": [{"stage": "finetune", "method": "full", "epochs": epochs, "lr": lr,
                                  "batch_size": batch_size, "seed": seed, "keep_best": False}],
                      "report": {"start": False, "stages": False, "speed": False}}
            run_recipe(recipe, work / "run", progress=progress)
            after_figures = measure(load_model(work / "run" / "model"), sets, outputs, pad_id_of(tokenizer))
            forget = 100 * (before["old_eval"]["accuracy"] - after_figures["old_eval"]["accuracy"])
            promoted = forget <= max_forget
            name = next_version(out)
            current = os.readlink(out / CURRENT) if (out / CURRENT).is_symlink() else None
            message = (f"{name}: promoted; {out / CURRENT} -> {name}" if promoted else
                       f"{name}: NOT promoted: it lost {forget:.2f} pt of accuracy on the old eval set (more than "
                       f"--max-forget {max_forget:g} pt); {out / CURRENT} unchanged ({current or 'none yet'}); the "
                       f"version is kept for inspection")
            record = {
                "version": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "created_unix": time.time(),
                "parent": {"path": str(source), "version": (parent or {}).get("version")},
                "origin_run": str(run_dir) if run_dir else None,
                "feedback": {"store": str(Path(feedback).resolve()), "store_id": store_id, "first_id": rows[0].id,
                             "last_id": rows[-1].id, "new_rows": len(rows), "used": len(fresh),
                             "skipped_unknown_label": sum(unknown.values()), "unknown_labels": dict(unknown)},
                "replay": {"source": sources["replay"], "rows": len(replayed), "available": len(pool),
                           "ratio": replay_ratio},
                "eval": {"source": sources["eval"], "rows": len(sets["old_eval"])},
                "training": {"method": "full", "epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed,
                             "rows": len(fresh) + len(replayed)},
                "before": before, "after": after_figures, "forget_pt": forget, "max_forget_pt": max_forget,
                "promoted": promoted, "message": message}
            with atomic_dir(out / name) as tmp:
                for item in (work / "run" / "model").iterdir():
                    os.replace(item, tmp / item.name)  # same filesystem: the work directory is in OUT
                atomic_write_text(tmp / VERSION_FILE, json.dumps(record, indent=2))
                report = {k: v for k, v in record.items() if k not in ("training", "created_unix", "origin_run")}
                atomic_write_text(tmp / "learn_report.json", json.dumps(report, indent=2))
                atomic_write_text(tmp / "learn_report.md", report_markdown(record))
        except KeyboardInterrupt:  # the runner may have said "--resume": not here, its directory goes too
            console.print(f"learn interrupted: no version written, {out / CURRENT} unchanged")
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        if promoted:
            _point_current(out, name)
    return LearnResult(name, out / name, promoted, record, message)


# ------------------------------------------------------------------------------------------ inputs
def check_classifier(model_dir: str | Path) -> Path:
    """The resolved model directory (DIR/current -> DIR/vNNNN), refused unless it is a classifier."""
    source = resolve_model_path(model_dir).resolve()
    if names_causal_lm(read_config(source)):
        raise SlimtuneError(f"{source}: a causal language model; feedback learning is for classifiers "
                            "(text-classification models) for now")
    return source


def version_record(path: Path) -> dict | None:
    """The `version.json` of a directory an earlier learn wrote; None for any other model directory."""
    file = Path(path) / VERSION_FILE
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else None
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"{file}: unreadable version record ({e})") from None


def consumed_id(record: dict | None, store_id: str | None) -> int:
    """The last feedback id a version learned from, if it learned from this store; else 0."""
    fb = (record or {}).get("feedback") or {}
    return int(fb.get("last_id") or 0) if fb.get("store_id") == store_id else 0


def _run_of(source: Path) -> Path | None:
    """RUN when `source` is RUN/model of a finished run (what export does to find held-back rows)."""
    run = source.parent
    finished = (run / "metrics.json").is_file() and (run / "recipe.yaml").is_file()
    return run if source.name == "model" and finished else None


def _label_id(value, label2id: dict[str, int], label_names: dict[int, str] | None = None) -> int | None:
    with contextlib.suppress(ValueError):  # not a label at all (an empty string, a float...)
        return label_id(value, label2id, label_names)
    return None


def _examples(path: Path, fields: Preprocessing, label2id: dict[str, int], fmt: str = "auto",
              label_names: dict[int, str] | None = None) -> list[Example]:
    """The labelled rows of a data file; rows whose label the model does not know are left out (and said)."""
    table = read_table(Path(path), fmt)
    names = {i: name for name, i in label2id.items()}
    out, unknown = [], Counter()
    texts = [fields.text_field] + ([fields.text_pair_field] if fields.text_pair_field else [])
    for i, row in enumerate(table.rows):
        if fields.label_field not in row or not all(isinstance(row.get(f), str) for f in texts):
            raise SlimtuneError(f"{table.where(i)}: needs the text field(s) {', '.join(map(repr, texts))} and the "
                                f"label field '{fields.label_field}' (fields present: {', '.join(row) or 'none'})")
        found = _label_id(row[fields.label_field], label2id, label_names)
        if found is None:
            unknown[str(row[fields.label_field])] += 1
            continue
        out.append((row[fields.text_field], row[fields.text_pair_field] if fields.text_pair_field else None,
                    names[found]))
    if unknown:
        console.print(f"{path}: left out {sum(unknown.values())} rows with labels the model does not know: "
                      f"{_listed(unknown)}", highlight=False)
    return out


def _replay_and_eval(work: Path, run_dir: str | Path | None, replay, eval_data, pre: Preprocessing,
                     label2id: dict[str, int], ratio: float) -> tuple[list[Example], Path, dict]:
    """The replay pool, the old eval set's file and where both come from: the options, else the run."""
    cfg = _run_data(Path(run_dir)) if run_dir and (replay is None or eval_data is None) else None
    run_train = run_eval = None
    if cfg is not None:
        run_train = _examples(cfg.train, cfg, label2id, cfg.format, cfg.label_names)
        if cfg.eval is not None:
            run_eval = _examples(cfg.eval, cfg, label2id, cfg.format, cfg.label_names)
        else:  # the run's own split (data.prepare_data): the model's label ids, stratified, seeded
            kept, held = stratified_split([label2id[e[2]] for e in run_train], cfg.eval_fraction, cfg.split_seed)
            run_train, run_eval = [run_train[i] for i in kept], [run_train[i] for i in held]
        if cfg.eval_limit:
            run_eval = [run_eval[i] for i in stratified_sample([label2id[e[2]] for e in run_eval], cfg.eval_limit,
                                                               cfg.split_seed)]
    if eval_data is not None:
        eval_file, eval_source = Path(eval_data), str(eval_data)
    elif run_eval is not None:
        eval_file = _write_examples(work / "eval.jsonl", run_eval, pre)
        eval_source = f"the eval split of the run {run_dir} ({cfg.eval or f'held out of {cfg.train}'})"
    else:
        raise SlimtuneError("no old eval set to judge forgetting on: MODEL_DIR is not RUN/model of a finished run "
                            "(nor a version learned from one); pass --eval DATA (labelled rows it was judged on)")
    if replay is not None:
        pool, replay_source = _examples(Path(replay), pre, label2id), str(replay)
    elif run_train is not None:
        pool, replay_source = run_train, f"the training rows of the run {run_dir} ({cfg.train})"
    elif ratio == 0:
        pool, replay_source = [], None
    else:
        raise SlimtuneError("no training data to replay: MODEL_DIR is not RUN/model of a finished run (nor a version "
                            "learned from one); pass --replay DATA (rows of its training data), or --replay-ratio 0 "
                            "to learn from the feedback alone (it may then forget)")
    return pool, eval_file, {"replay": replay_source, "eval": eval_source}


def _run_data(run: Path) -> DataConfig:
    recipe_file = run / "recipe.yaml"
    try:
        raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        return DataConfig(**raw["data"]).model_copy(update={"augment": None})
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as e:
        raise SlimtuneError(f"{recipe_file}: cannot read the run's data section ({' '.join(str(e).split())[:200]}); "
                            "pass --replay DATA and --eval DATA") from None


def _write_examples(path: Path, examples: list[Example], pre: Preprocessing) -> Path:
    def row(text: str, pair: str | None, label: str) -> dict:
        return {pre.text_field: text, pre.label_field: label} | (
            {pre.text_pair_field: pair or ""} if pre.text_pair_field else {})

    atomic_write_text(path, "".join(json.dumps(row(*e), ensure_ascii=False) + "\n" for e in examples))
    return path


def _encoded(examples: list[Example], tokenizer, pre: Preprocessing, label2id: dict[str, int]):
    clean = preprocessor_for(pre)
    pairs = [clean(e[1] or "") for e in examples] if pre.text_pair_field else None
    return encode(tokenizer, [clean(e[0]) for e in examples], [label2id[e[2]] for e in examples], pairs,
                  pre.max_length)


def measure(model, sets: dict, outputs: dict[int, str], pad_id: int) -> dict:
    """Accuracy and macro F1 (over the classes present in the set's labels) of `model` on each set."""
    task = task_of_model(model.config)
    figures = {}
    for name, ds in sets.items():
        present = {i: outputs[i] for i in sorted(set(ds.labels))}
        with warnings.catch_warnings():  # feedback rows of one class: sklearn's confusion-matrix remark
            warnings.filterwarnings("ignore", message="A single label was found")
            m = task.evaluate(model, ds, present, pad_id)
        figures[name] = {"accuracy": m["accuracy"], "f1_macro": m["f1_macro"], "rows": len(ds)}
    return figures


# ----------------------------------------------------------------------------------------- versions
def next_version(out: Path) -> str:
    numbers = [int(m.group(1)) for p in out.iterdir() if (m := _VERSION.fullmatch(p.name)) and p.is_dir()]
    return f"v{max(numbers, default=0) + 1:04d}"


def _point_current(out: Path, name: str) -> None:
    """`current` -> name, switched in one rename (a reader sees the old target or the new one)."""
    tmp = out / f".{CURRENT}.tmp-{os.getpid()}"
    with output_errors(out):
        tmp.unlink(missing_ok=True)
        os.symlink(name, tmp)
        os.replace(tmp, out / CURRENT)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """One learn at a time in OUT; under the lock, what a killed learn left behind is removed."""
    with output_errors(out):
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out / ".learn.lock", os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SlimtuneError(f"{out}: another slimtune learn is writing this directory") from None
        for stale in [*out.glob(".*.tmp-*"), *out.glob(".learn-work-*")]:  # temp entries a kill -9 left
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def _listed(counts: Counter) -> str:
    return ", ".join(f"'{k}' x{v}" for k, v in counts.most_common(8)) + (" ..." if len(counts) > 8 else "")


# ------------------------------------------------------------------------------------------ reports
_COLUMNS = (("old_eval", "accuracy"), ("old_eval", "f1_macro"), ("feedback", "accuracy"), ("feedback", "f1_macro"))
_HEADERS = ("old eval accuracy", "old eval macro F1", "feedback accuracy", "feedback macro F1")


def _rows(record: dict) -> list[tuple[str, list[str]]]:
    parent = record["parent"]["version"] or Path(record["parent"]["path"]).name
    before, after = record["before"], record["after"]
    return [(f"before ({parent})", [f"{before[s][k]:.4f}" for s, k in _COLUMNS]),
            (f"after ({record['version']})", [f"{after[s][k]:.4f}" for s, k in _COLUMNS]),
            ("change (pt)", [f"{100 * (after[s][k] - before[s][k]):+.2f}" for s, k in _COLUMNS])]


def report_markdown(record: dict) -> str:
    fb, replay, ev = record["feedback"], record["replay"], record["eval"]
    lines = [f"# slimtune learn: {record['version']}", "", f"**{record['message']}**", "",
             "| model | " + " | ".join(_HEADERS) + " |", "| --- |" + " ---: |" * len(_HEADERS)]
    lines += [f"| {name} | " + " | ".join(cells) + " |" for name, cells in _rows(record)]
    lines += ["", f"- feedback: ids {fb['first_id']}-{fb['last_id']} of {fb['store']}: {fb['new_rows']} new rows, "
              f"{fb['used']} used, {fb['skipped_unknown_label']} skipped (labels the model does not know)",
              f"- replay: {replay['rows']} of {replay['available']} rows of {replay['source'] or 'nothing'}",
              f"- old eval set: {ev['rows']} rows, {ev['source']}",
              f"- forgetting: {record['forget_pt']:+.2f} pt of old eval accuracy lost (at most "
              f"{record['max_forget_pt']:g} pt to be promoted)",
              "- the new model's feedback figures are on rows it was trained on", ""]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------- watch
def reload_server(url: str, model_dir: Path, token: str | None = None, timeout: float = 120.0) -> str:
    """POST URL/admin/reload {"model_dir": ...} with the bearer token (--token, else $SLIMTUNE_TOKEN); the
    outcome as one line. A failure is reported, not raised: the version is promoted either way."""
    try:
        answer = request_reload(url, token or os.environ.get("SLIMTUNE_TOKEN"), str(Path(model_dir).resolve()),
                                timeout=timeout)
    except SlimtuneError as e:
        return f"reload of {url} failed: {e}"
    return f"server {url} reloaded: now serving {answer.get('model_version', '?')}"


def pending(model_dir: str | Path, feedback: str | Path, out: Path) -> tuple[int, int]:
    """(new rows, the id they follow): rows after the last id a version in OUT (or MODEL_DIR) was
    made from, promoted or not, so a refused version is not retried until `every` more rows came."""
    if not Path(feedback).is_file():
        return 0, 0
    with FeedbackStore(feedback, readonly=True) as store:
        records = [version_record(resolve_model_path(model_dir))]
        records += [version_record(p) for p in out.glob("v*") if _VERSION.fullmatch(p.name)] if out.is_dir() else []
        last = max(consumed_id(r, store.store_id) for r in records)
        return store.count(after_id=last), last


def watch(model_dir: str | Path, feedback: str | Path, out: str | Path, *, every: int = 100,
          poll_seconds: float = 30.0, server: str | None = None, token: str | None = None,
          max_cycles: int | None = None, sleep: Callable[[float], None] = time.sleep,
          log: Callable[[str], None] | None = None, **settings) -> int:
    """Learn whenever `every` new rows arrived (module docstring); one log line per cycle, until Ctrl-C or
    `max_cycles`. Starts from OUT/current once there is one. Returns the number of versions written."""
    log = log or (lambda line: console.print(line, highlight=False))
    out = Path(out).expanduser().resolve()
    check_classifier(model_dir)
    made = cycles = 0
    try:
        while True:
            cycles += 1
            stamp = time.strftime("%H:%M:%S")
            start = out / CURRENT if (out / CURRENT).exists() else model_dir
            try:
                new, last = pending(start, feedback, out)
                if new < every:
                    log(f"{stamp} watch: {new} new feedback rows after id {last} (learning at {every})")
                else:
                    result = learn(start, feedback, out, **settings)
                    made += 1
                    reloaded = f"; {reload_server(server, out / CURRENT, token)}" if result.promoted and server else ""
                    log(f"{stamp} watch: {result.message}{reloaded}")
            except SlimtuneError as e:
                log(f"{stamp} watch: error: {e}")
            if max_cycles is not None and cycles >= max_cycles:
                break
            sleep(poll_seconds)
    except KeyboardInterrupt:
        log("watch: stopped")
    return made


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt inside the block (main thread), so a terminated learn cleans up as
    Ctrl-C does."""
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
