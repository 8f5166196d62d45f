"""`slimtune search RECIPE --max-size-mb S --max-latency-ms L --max-drop D`: the most accurate model under a
budget, found among compression pipelines built from the existing stages, each measured for real.

How it stays honest: the train file is split once (seeded, stratified) into the rows that train and a
*selection split* (`--select-fraction`). The recipe's fine-tuning runs on the former (the base model,
OUT/base); every candidate is a recipe that starts from it and is scored on the selection split, with
its latency measured on the artifact it would ship and its size on disk. The chosen candidate is then
run once more with the recipe's own eval split (OUT/best_run: the same training, since checkpoints are
chosen on a split of the train rows) and that is the number reported; the selection figures are shown
as such. A search that chose on the reported split would overfit it.

A candidate is a recipe: the student (the base model or a layer selection of it, distilled from
`--teacher` when one is given, else from the base model; or a word-level BiLSTM with its measured-best
defaults), structured pruning of heads and FFN neurons (with recovery), low-rank factors (truncated SVD,
with recovery), and int8 (dynamic or static, shipped as an ONNX Runtime graph). A float candidate is
timed in torch and in ONNX Runtime and ships on whichever runtime is faster for it. Optuna's multi-
objective TPE sampler (selection metric up, latency down, size down; the budget as constraints) proposes
candidates; its study lives in OUT/study.db and every finished candidate's run directory is kept, so an
interrupted search resumes where it stopped, and a candidate proposed twice is measured once and counts
once toward `--trials`. A candidate whose training curve shows it can no longer meet `--max-drop` is
stopped at that evaluation (`search_pruning.py`) and counts as tried, so the number of full trainings
stays small.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from slimtune.config import AugmentConfig, DataConfig
from slimtune.data import label_map_of, split_rows
from slimtune.errors import SlimtuneError
from slimtune.export import export_onnx, measure_onnx_speed
from slimtune.io import atomic_write_text, check_output_path
from slimtune.models import load_model, load_tokenizer, preprocessing_of, read_config, resolve_model_path
from slimtune.recipe import Recipe, load_recipe, recipe_to_yaml
from slimtune.report_page import write_report
from slimtune.runner import run
from slimtune.search_pruning import CandidateStopped, HopelessPruner
from slimtune.stages.base import console
from slimtune.studies import local_storage, open_storage, open_study
from slimtune.tasks import task_of_model
from slimtune.vocabulary import kept_token_ids

SPEED = {"latency_runs": 30, "throughput_batches": 4}
QUANT = ("none", "dynamic_int8", "static_int8")
FRACTIONS = (0.0, 0.25, 0.5)
ENERGIES = (0.0, 0.9)  # low-rank factors keeping 90% of each layer's squared singular values, or none
VOCABS = (False, True)  # the vocabulary trimmed to the train split's tokens (stage: vocabulary), or kept whole
TRANSFERS = (0, 10)  # teacher-labelled spans per train sentence added to a distillation's transfer set
STUDENTS = ("transformer", "bilstm")  # bilstm: a word-level student with its measured-best defaults


@dataclass(frozen=True)
class Candidate:
    layers: int  # student depth; the base model's own depth means no distillation
    heads: float
    ffn: float
    quant: str
    lowrank: float = 0.0  # energy kept by truncated SVD of the encoder's Linears (0: none)
    student: str = "transformer"
    vocab: bool = False  # the vocabulary trimmed to the train split's tokens
    transfer: int = 0  # random word spans (n-gram sampling) of each train sentence, labelled by the teacher

    @classmethod
    def word(cls) -> Candidate:
        return cls(layers=0, heads=0.0, ffn=0.0, quant="none", student="bilstm")

    @classmethod
    def of(cls, params: dict) -> Candidate:
        """The candidate an Optuna trial's parameters describe."""
        if params.get("student") == "bilstm":
            return cls.word()
        return cls(params["layers"], params["heads"], params["ffn"], params["quant"], params.get("lowrank", 0.0),
                   vocab=bool(params.get("vocab", False)), transfer=int(params.get("transfer", 0)))

    @property
    def key(self) -> str:
        fields = asdict(self)
        for name in ("vocab", "transfer"):  # keys of candidates from before these dimensions stay as they were
            if not fields[name]:
                del fields[name]
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:10]

    def label(self, base_layers: int) -> str:
        if self.student == "bilstm":
            return "word BiLSTM (distilled, int8 table and LSTM)"
        parts = [f"{self.layers} layers" if self.layers != base_layers else "all layers"]
        parts += [f"heads -{self.heads:.0%}"] if self.heads else []
        parts += [f"ffn -{self.ffn:.0%}"] if self.ffn else []
        parts += [f"low-rank {self.lowrank:.0%} energy"] if self.lowrank else []
        parts += [f"{self.transfer} teacher-labelled spans per sentence"] if self.transfer else []
        parts += ["vocabulary trimmed"] if self.vocab else []
        return ", ".join(parts + [self.quant if self.quant != "none" else "fp32"])


@dataclass
class Budget:
    max_size_mb: float
    max_latency_ms: float
    max_drop: float  # points of the primary metric below the base model (on the selection split)


def candidate_stages(c: Candidate, base: str, teacher: str | None, base_layers: int, epochs: float,
                     batch_size: int) -> list[dict]:
    """The stages that turn the base model (directory `base`) into candidate `c` (then an evaluate stage).
    A transformer student is always the base model or a layer selection of it, taught by `teacher` when
    one is given (else by the base model): a `--teacher` supervises, it is never what gets shipped."""
    teacher = teacher or base
    if c.student == "bilstm":  # the word student's own defaults adapt its training to the data size
        return [{"stage": "distill", "teacher": teacher, "student": {"arch": "bilstm"}}, {"stage": "evaluate", **SPEED}]
    stages: list[dict] = []
    if c.layers < base_layers or teacher != base:  # full depth from its own base: nothing to distil
        # the run starts from the base model: `current` names it without its path, so that the chosen
        # pipeline written to best_recipe.yaml runs as is on other data
        student = {"from": "current", "layers": c.layers} if c.layers < base_layers else {"from": "current"}
        distill = {"stage": "distill", "teacher": teacher, "student": student, "epochs": epochs,
                   "batch_size": batch_size, "lr": 1e-4}
        if c.transfer:  # n-gram sampling (Tang et al. 2019) stands in for a phrase-level train set such as
            # GLUE's 67k SST-2 phrases; 11x the rows, so a gentler lr (the 5e-5 it was measured with)
            # (the keys candidates have always written, so earlier searches' recipes read the same)
            distill |= {"lr": 5e-5, "transfer_augment": AugmentConfig.spans(c.transfer).model_dump(
                include={"copies", "p_span", "p_synonym", "p_insert", "p_swap", "p_delete", "seed"})}
        stages.append(distill)
    if c.heads or c.ffn:
        stages.append({"stage": "prune", "method": "structured", "heads": c.heads, "ffn": c.ffn,
                       "recover": {"epochs": max(epochs / 2, 0.5), "lr": 5e-5, "batch_size": batch_size}})
    if c.lowrank:
        stages.append({"stage": "lowrank", "energy": c.lowrank,
                       "recover": {"epochs": max(epochs / 2, 0.5), "lr": 5e-5, "batch_size": batch_size}})
    if c.vocab:
        stages.append({"stage": "vocabulary"})
    if c.quant != "none":
        stages.append({"stage": "quantize", "method": c.quant, "calibration_batches": 8,
                       "calibration_batch_size": 16})
    return [*stages, {"stage": "evaluate", **SPEED}]


_PROPOSALS_PER_TRIAL = 5  # the sampler repeats itself near the end of a small space


def search(recipe_path: str | Path, out: str | Path, budget: Budget, *, trials: int = 12,
           teacher: str | None = None, select_fraction: float = 0.15, epochs: float = 2.0, seed: int = 0,
           overrides: list[str] | None = None, first: list[dict] | None = None) -> dict:
    """Run the search into `out`; returns OUT/search.json's content. `first`: candidates (Optuna trial
    parameters, e.g. `{"student": "bilstm"}`) measured before the sampler proposes its own."""
    import optuna

    recipe = load_recipe(recipe_path, overrides)
    _check_budget(budget)
    if recipe.task != "text-classification":
        raise SlimtuneError(f"{recipe_path}: search explores classifier pipelines (distillation, structured "
                            f"pruning, int8 through ONNX Runtime); task {recipe.task} has no search space yet")
    out = check_output_path(Path(out).expanduser().resolve(), kind="directory")
    out.mkdir(parents=True, exist_ok=True)
    base_model = resolve_model_path(recipe.model)
    base_layers, floor_mb = _depth_and_floor(base_model)
    if budget.max_size_mb < floor_mb:
        raise SlimtuneError(f"--max-size-mb {budget.max_size_mb:g}: no candidate can be that small: the word-"
                            "embedding table alone, trimmed to its specials and single characters, is "
                            f"{floor_mb:.2f} MB in int8")
    if teacher is not None:  # absolute: the candidates' and best_recipe.yaml's paths must not depend on the cwd
        teacher = str(Path(resolve_model_path(teacher)).resolve())
        _check_teacher(Path(teacher), recipe.data)
    data = _selection_files(recipe.data, out, select_fraction, seed)

    base = _run_cached(_with(recipe, data), out / "base")
    base_dir = str(out / "base" / "model")
    primary = task_of_model(read_config(Path(base_dir))).primary
    reference = base["final"][primary.name]
    depths = sorted({base_layers, max(1, math.ceil(base_layers / 2)), max(1, math.ceil(base_layers / 3))})
    batch = next((s.batch_size for s in recipe.stages if isinstance(getattr(s, "batch_size", None), int)), 32)
    measured: dict[str, dict] = {}
    stopped: dict[str, dict] = {}  # candidates stopped early (their run directories are removed)
    pruner = HopelessPruner.for_budget(reference, budget.max_drop, primary.name, primary.higher_is_better)

    def measure(c: Candidate) -> dict:
        stages = candidate_stages(c, base_dir, teacher, base_layers, epochs, batch)
        trial_dir = out / "trials" / c.key
        marker = out / "trials" / f"{c.key}.stopped.json"
        if marker.is_file():  # stopped by an earlier (interrupted) search: not trained again
            stopped[c.key] = json.loads(marker.read_text(encoding="utf-8"))
            raise optuna.TrialPruned(stopped[c.key]["reason"])
        try:
            m = _run_cached(_with(recipe, data, stages, model=base_dir), trial_dir, on_eval=pruner.watch(c.key))
        except CandidateStopped as e:
            stopped[c.key] = {"candidate": asdict(c), "label": c.label(base_layers), "reason": str(e), **e.record}
            atomic_write_text(marker, json.dumps(stopped[c.key]))
            raise optuna.TrialPruned(str(e)) from None
        finally:
            pruner.forget(c.key)
        result = _deployed(m, trial_dir, data["eval"], primary.name)
        pruner.finish(c.key, result["metric"], trial_dir)
        drop = (reference - result["metric"]) * (100 if primary.higher_is_better and reference <= 1 else 1)
        result |= {"candidate": asdict(c), "label": c.label(base_layers), "dir": str(trial_dir),
                   "drop": drop if primary.higher_is_better else -drop, "stages": stages}
        result["feasible"] = _meets(result, budget)
        measured[c.key] = result
        return result

    def objective(trial: optuna.Trial) -> tuple[float, float, float]:
        if trial.suggest_categorical("student", STUDENTS) == "bilstm":
            c = Candidate.word()
        else:
            c = Candidate(trial.suggest_categorical("layers", depths), trial.suggest_categorical("heads", FRACTIONS),
                          trial.suggest_categorical("ffn", FRACTIONS), trial.suggest_categorical("quant", QUANT),
                          trial.suggest_categorical("lowrank", ENERGIES),
                          vocab=trial.suggest_categorical("vocab", VOCABS),
                          transfer=trial.suggest_categorical("transfer", TRANSFERS))
        trial.set_user_attr("key", c.key)
        progress.running(c.label(base_layers))
        r = measure(c)
        # the budget as constraints (feasible at <= 0): the sampler learns where the budget is met
        trial.set_constraint("size", r["size_mb"] - budget.max_size_mb)
        trial.set_constraint("latency", r["latency_ms"] - budget.max_latency_ms)
        trial.set_constraint("drop", r["drop"] - budget.max_drop)
        sign = 1 if primary.higher_is_better else -1
        return sign * r["metric"], r["latency_ms"], r["size_mb"]

    study = open_study(open_storage(local_storage(out)), "search", directions=["maximize", "minimize", "minimize"],
                       seed=seed)
    for t in study.trials:  # resumed: the finished candidates' results, read back from their run directories
        if t.state == optuna.trial.TrialState.COMPLETE and "key" in t.user_attrs:
            measure(Candidate.of(t.params))
        marker = out / "trials" / f"{t.user_attrs.get('key')}.stopped.json"
        if t.state == optuna.trial.TrialState.PRUNED and marker.is_file():
            stopped[t.user_attrs["key"]] = json.loads(marker.read_text(encoding="utf-8"))
    progress = _Progress(measured, stopped, budget, primary.name)
    ended = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)

    def tried(s) -> int:  # distinct candidates, stopped and failed ones included: a repeat proposal is free
        return len({t.user_attrs["key"] for t in s.trials if t.state in ended and "key" in t.user_attrs})

    def after_trial(s, t) -> None:
        progress.update(t)
        if tried(s) >= trials:
            s.stop()

    if tried(study) < trials:
        for params in first or []:
            study.enqueue_trial(params, skip_if_exists=True)
        with progress.live():  # a cap on proposals: the space may hold fewer candidates than --trials
            study.optimize(objective, n_trials=_PROPOSALS_PER_TRIAL * (trials - tried(study)) + len(first or []),
                           catch=(SlimtuneError,), callbacks=[after_trial])
    return _finish(recipe, data, out, budget, measured, stopped, primary, reference, base_layers)


# ------------------------------------------------------------------------------------------- pieces
def _check_budget(budget: Budget) -> None:
    for flag, value in (("--max-size-mb", budget.max_size_mb), ("--max-latency-ms", budget.max_latency_ms)):
        if not value > 0:
            raise SlimtuneError(f"{flag} {value:g}: a budget must be a positive number")
    if budget.max_drop < 0:
        raise SlimtuneError(f"--max-drop {budget.max_drop:g}: the allowed drop must be 0 or more points")


def _depth_and_floor(model_dir: Path) -> tuple[int, float]:
    """The model's layer count, and the smallest size any candidate can have: its word-embedding table in
    int8, trimmed to what every trim keeps (the specials and the single characters)."""
    config = read_config(model_dir)
    layers = config.get("num_hidden_layers") or config.get("n_layers")
    if not layers:
        raise SlimtuneError(f"{model_dir}/config.json: no num_hidden_layers; search needs a transformer encoder")
    try:
        rows = len(kept_token_ids(load_tokenizer(model_dir), []))
    except SlimtuneError:  # a tokenizer that cannot be trimmed: every transformer student keeps all of it
        rows = config.get("vocab_size", 0)
    return int(layers), rows * config.get("hidden_size", 0) / 1e6


def _check_teacher(teacher: Path, data: DataConfig) -> None:
    _, id2label = label_map_of(data)
    theirs = read_config(teacher).get("id2label") or {}
    if sorted(map(str, theirs.values())) != sorted(map(str, id2label.values())):
        raise SlimtuneError(f"--teacher {teacher}: its labels {sorted(theirs.values())} are not the recipe's "
                            f"{sorted(id2label.values())}")


def _selection_files(cfg: DataConfig, out: Path, fraction: float, seed: int) -> dict:
    """OUT/search_train.jsonl and OUT/search_select.jsonl, written once (a resumed search reuses them)."""
    files = {"train": out / "search_train.jsonl", "eval": out / "search_select.jsonl"}
    if not all(f.is_file() for f in files.values()):
        kept, held = split_rows(cfg, fraction, seed)
        for name, rows in (("train", kept), ("eval", held)):
            atomic_write_text(files[name], "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n"
                                                   for r in rows))
    return {k: str(v) for k, v in files.items()}


def _with(recipe: Recipe, files: dict, stages: list[dict] | None = None, model: str | None = None) -> dict:
    """`recipe` as a dict on the search's files, with `stages` instead of its own, from `model`."""
    raw = yaml.safe_load(recipe_to_yaml(recipe))
    raw["data"] |= {"train": files["train"], "eval": files["eval"], "format": "jsonl", "train_limit": None,
                    "eval_limit": None}
    if stages is not None:
        raw["stages"] = stages
    raw["report"] = {**raw.get("report", {}), "start": False, "stages": False, **SPEED}
    if model is not None:
        raw["model"] = model
    return raw


def _run_cached(recipe: dict, out: Path, on_eval=None) -> dict:
    if (out / "metrics.json").is_file():
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    return run(recipe, out, overwrite=True, progress=False, on_eval=on_eval)


def _deployed(m: dict, trial_dir: Path, select_file: str, primary: str) -> dict:
    """What the candidate ships and how it measures: an int8 run's ONNX Runtime graph; a float model on
    torch or ONNX Runtime, whichever is faster at batch 1 for it."""
    final = m["final"]
    if final.get("artifact"):
        return {"metric": final["onnx"].get("onnx_accuracy", final[primary]), "latency_ms": final["latency_ms_b1"],
                "size_mb": final["artifact_size_mb"], "runtime": final["runtime"], "artifact": final["artifact"]}
    torch_figures = {"metric": final[primary], "latency_ms": final["latency_ms_b1"], "size_mb": final["size_mb"],
                     "runtime": final.get("runtime", "torch fp32"), "artifact": "model"}
    if final.get("onnx"):  # an int8 run whose ONNX Runtime artifact failed: it ships on torch
        return torch_figures
    onnx_dir = trial_dir / "onnx_fp32"
    speed_file = trial_dir / "onnx_fp32_speed.json"
    if not speed_file.is_file():
        try:
            export_onnx(trial_dir / "model", onnx_dir, data=Path(select_file), overwrite=True)
        except SlimtuneError as e:  # not exportable: it ships on torch
            console.print(f"{trial_dir.name}: no ONNX Runtime fp32 artifact ({e})")
            return torch_figures
        model = load_model(trial_dir / "model")
        tokenizer = load_tokenizer(trial_dir / "model")
        task = task_of_model(model.config)
        ds = task.eval_dataset(Path(select_file), tokenizer, model.config, preprocessing_of(trial_dir / "model"))
        speed = measure_onnx_speed(onnx_dir / "model.onnx", ds, int(tokenizer.pad_token_id or 0),
                                   runtime="onnxruntime CPU (fp32 graph)", **SPEED)
        speed["size_mb"] = (onnx_dir / "model.onnx").stat().st_size / 1e6
        atomic_write_text(speed_file, json.dumps(speed))
    speed = json.loads(speed_file.read_text())
    if speed["latency_ms_b1"] < torch_figures["latency_ms"]:
        return torch_figures | {"latency_ms": speed["latency_ms_b1"], "size_mb": speed["size_mb"],
                                "runtime": speed["runtime"], "artifact": "onnx_fp32/model.onnx",
                                "torch_latency_ms": torch_figures["latency_ms"]}
    return torch_figures | {"onnx_latency_ms": speed["latency_ms_b1"]}


def _meets(r: dict, budget: Budget) -> bool:
    return r["size_mb"] <= budget.max_size_mb and r["latency_ms"] <= budget.max_latency_ms and \
        r["drop"] <= budget.max_drop


def pareto_front(results: list[dict]) -> list[dict]:
    """The candidates no other one beats on selection metric, latency and size at once."""
    def dominated(a, b):  # b dominates a
        return (b["metric"] >= a["metric"] and b["latency_ms"] <= a["latency_ms"] and b["size_mb"] <= a["size_mb"]
                and (b["metric"], -b["latency_ms"], -b["size_mb"]) != (a["metric"], -a["latency_ms"], -a["size_mb"]))
    return [a for a in results if not any(dominated(a, b) for b in results)]


def _finish(recipe: Recipe, data: dict, out: Path, budget: Budget, measured: dict, stopped: dict, primary,
            reference: float, base_layers: int) -> dict:
    results = sorted(measured.values(), key=lambda r: (-r["metric"], r["latency_ms"]))
    feasible = [r for r in results if r["feasible"]]
    summary = {"budget": asdict(budget), "chosen_on": f"selection split ({data['eval']}: rows carved from "
               f"{recipe.data.train})", "reference_selection_metric": reference, "primary": primary.name,
               "candidates": len(results), "pareto": pareto_front(results), "all": results,
               "stopped_early": list(stopped.values())}
    if not feasible:
        # closest: the smallest total overshoot, each limit's excess relative to the limit
        def overshoot(r):
            return sum(max(0.0, r[k] / limit - 1) for k, limit in (("size_mb", budget.max_size_mb),
                                                                    ("latency_ms", budget.max_latency_ms))) + \
                max(0.0, r["drop"] - budget.max_drop) / max(budget.max_drop, 1.0)
        summary |= {"met": False, "closest": sorted(results, key=overshoot)[:3]}
        console.print(f"[red]no candidate meets the budget[/red] (size ≤ {budget.max_size_mb:g} MB, latency ≤ "
                      f"{budget.max_latency_ms:g} ms, drop ≤ {budget.max_drop:g} pt); closest: "
                      + "; ".join(f"{r['label']} ({r['size_mb']:.1f} MB, {r['latency_ms']:.2f} ms, drop "
                                  f"{r['drop']:.1f} pt)" for r in summary["closest"]), highlight=False)
        atomic_write_text(out / "search.json", json.dumps(summary, indent=2))
        return summary
    best = feasible[0]
    # the chosen pipeline, measured once on the recipe's own eval split: the reported number
    raw = _with(recipe, data, best["stages"], model=str(out / "base" / "model"))
    raw["data"]["eval"] = str(recipe.data.eval) if recipe.data.eval else raw["data"]["eval"]
    if recipe.data.eval is None:
        console.print("[yellow]warning[/yellow]: the recipe has no eval file: the reported figures are on the "
                      "selection split that chose them (give data.eval to report on unseen rows)")
    report_run = _run_cached(raw | {"report": {"start": True, "stages": True, **SPEED}}, out / "best_run")
    shutil.rmtree(out / "best", ignore_errors=True)
    shutil.copytree(out / "best_run" / ("onnx" if best["artifact"] == "onnx/model.onnx" else "model"), out / "best")
    base = str(out / "base" / "model")
    reproduce = yaml.safe_load(recipe_to_yaml(recipe))
    reproduce["stages"] += best["stages"][:-1] + [{"stage": "evaluate"}]
    atomic_write_text(out / "best_recipe.yaml", "# the chosen pipeline from the start: `slimtune run` it as is\n"
                      + (f"# (its distill stage's teacher is the search's fine-tuned base model: {base})\n"
                         if any(s.get("teacher") == base for s in best["stages"]) else "")
                      + yaml.safe_dump(reproduce, sort_keys=False, allow_unicode=True))
    summary |= {"met": True, "best": best, "reported": {**report_run["final"],
                                                        "split": report_run["data"].get("eval_file")}}
    atomic_write_text(out / "search.json", json.dumps(summary, indent=2, default=str))
    others = [r for r in results if r["dir"] != best["dir"]][:12]
    write_report(out / "best_run", compare=[r["dir"] for r in others],
                 compare_labels=[f"candidate: {r['label']} [selection split]" for r in others])
    shutil.copy(out / "best_run" / "report.html", out / "report.html")
    console.print(f"chosen: {best['label']} — selection {primary.name} {best['metric']:.4f}, "
                  f"{best['latency_ms']:.2f} ms ({best['runtime']}), {best['size_mb']:.1f} MB; on the eval split: "
                  f"{report_run['final'].get(primary.name)}; model in {out / 'best'}", highlight=False)
    return summary


class _Progress:
    """The live table of candidates: done, running, failed, and the best feasible so far."""

    def __init__(self, measured: dict, stopped: dict, budget: Budget, primary: str):
        self.measured, self.stopped, self.budget, self.primary, self.states = measured, stopped, budget, primary, {}
        self.current: str | None = None  # the candidate being trained

    def live(self):
        """A live table at a terminal; in a log, one line per finished candidate (`update`)."""
        import contextlib

        from rich.live import Live

        if not console.is_terminal:
            return contextlib.nullcontext()
        self._live = Live(self.table(), console=console, refresh_per_second=2, transient=False)
        return self._live

    def running(self, label: str) -> None:
        self.current = label
        if console.is_terminal:
            self._live.update(self.table())

    def update(self, trial) -> None:
        self.current = None
        self.states[trial.user_attrs.get("key", f"#{trial.number}")] = trial.state.name.lower()
        if console.is_terminal:
            self._live.update(self.table())
        else:
            key = trial.user_attrs.get("key")
            r, s = self.measured.get(key), self.stopped.get(key)
            console.print(f"candidate {trial.number}: {'stopped early' if s else trial.state.name.lower()}"
                          + (f" {r['label']}: {self.primary} {r['metric']:.4f}, {r['latency_ms']:.2f} ms, "
                             f"{r['size_mb']:.1f} MB{' (meets the budget)' if r['feasible'] else ''}" if r else "")
                          + (f" {s['label']}: {s['reason']}" if s else ""), highlight=False)

    def table(self):
        from rich.table import Table

        t = Table(title="search: candidates (selection split)")
        for col in ("candidate", "state", self.primary, "ms b=1", "MB", "runtime", "budget"):
            t.add_column(col)
        best = max((r for r in self.measured.values() if r["feasible"]), key=lambda r: r["metric"], default=None)
        for key, r in self.measured.items():
            mark = "best so far" if r is best else ("meets" if r["feasible"] else "misses")
            t.add_row(r["label"], self.states.get(key, "done"), f"{r['metric']:.4f}", f"{r['latency_ms']:.2f}",
                      f"{r['size_mb']:.1f}", r["runtime"], mark)
        for s in self.stopped.values():
            t.add_row(s["label"], f"stopped at {s['point']}", f"{s['metric']:.4f}", "", "", "", "cannot meet the drop")
        if self.current:
            t.add_row(self.current, "running", "", "", "", "", "")
        return t
