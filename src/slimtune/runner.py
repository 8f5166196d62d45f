"""`slimtune.run(recipe)`: validate everything, run the stages in order, write the run directory.

The run directory is the contract later stages and tools rely on:
  OUT/model/        HF directory (config.json with the task, its outputs and the preprocessing record,
                    model.safetensors, tokenizer, README.md card)
  OUT/metrics.json  {"final": {...}, "stages": [...]} — written last: its presence means "finished"
  OUT/recipe.yaml   the recipe as it ran       OUT/report.md   a human-readable report
  OUT/tb/           TensorBoard scalars        OUT/checkpoints/  atomic checkpoints (for --resume; removed
                                                                 when the run finishes, unless kept)
Inputs (recipe, model, data, output path) are all validated before OUT is touched, so bad input never
leaves a partial output behind; each output file or directory appears in one rename.

The runner knows no task and no stage by name: it asks the recipe's Task and the stage registry.

Under torchrun every process runs `run`: rank 0 decides about OUT and every rank follows its verdict, all
ranks prepare and run the stages together (slimtune.distributed shares the training and the evaluation),
and rank 0 alone writes OUT.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.tensorboard import SummaryWriter

from slimtune import distributed
from slimtune.adapt.lora import is_peft
from slimtune.batching import calibration_batches
from slimtune.checkpoint import CheckpointStore, read_checkpoint
from slimtune.config import ReportConfig
from slimtune.errors import RunStopped, SlimtuneError
from slimtune.evaluate import dir_size_mb, machine_description
from slimtune.export import export_onnx, int8_activations, measure_onnx_speed
from slimtune.io import atomic_dir, atomic_write_text, check_output_path, output_errors
from slimtune.models import PREPROCESSING_KEY, load_tokenizer, resolve_model_path, save_hf_model
from slimtune.pack import packed_size_mb
from slimtune.recipe import Recipe, apply_overrides, load_recipe, parse_recipe, recipe_to_yaml
from slimtune.report import model_card
from slimtune.report_page import write_report
from slimtune.stages import Run, Stage, build_stage
from slimtune.stages.base import Progress, console
from slimtune.stages.evaluate import measure
from slimtune.tasks import get_task
from slimtune.train import seed_everything

# metrics.json's `final`: the task's keys, then these (None when not measured)
MODEL_KEYS = ("params", "trainable_params", "size_mb", "packed_mb")
EXTRA_KEYS = ("precision_micro", "recall_micro", "f1_micro", "latency_ms_b1_p90", "threads", "cpu", "runtime",
              "split")
TASK_KEY = "slimtune_task"  # config.json: which task the model directory was trained for


def coerce_recipe(recipe: Recipe | dict | str | Path, overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return parse_recipe(apply_overrides(dict(recipe), overrides or []), base_dir=Path.cwd())
    return load_recipe(recipe, overrides)


def run(recipe: Recipe | dict | str | Path, out: str | Path, *, overwrite: bool = False, resume: bool = False,
        overrides: list[str] | None = None, progress: bool | None = None,
        keep_checkpoints: bool | None = None, on_eval: Callable[[str, dict], None] | None = None,
        device: str | None = None) -> dict:
    """Run a recipe into the run directory `out`; returns the metrics.json content.
    `keep_checkpoints` (default: the recipe's) keeps OUT/checkpoints/ once the run has finished.
    `on_eval(loop_tag, record)` sees every dev evaluation of every training loop; raising `RunStopped`
    from it stops the run and removes its output (nothing is left to resume).
    `device` (default: the recipe's `device`): auto (CUDA when available), cpu, cuda or cuda:N. Under torchrun
    every process calls `run` (see the module docstring)."""
    recipe = coerce_recipe(recipe, overrides)
    dev = distributed.init(device or recipe.device)
    if not distributed.is_main():
        console.quiet = True  # one voice: rank 0's
    out = Path(out).expanduser().resolve()
    keep = recipe.keep_checkpoints if keep_checkpoints is None else keep_checkpoints
    show_progress = True if progress is None else progress  # a bar at a terminal, plain lines in a log
    store = CheckpointStore(out / "checkpoints")
    # rank 0 looks at OUT and every rank follows its verdict (another rank looking after rank 0 created OUT
    # would find it not empty)
    non_empty, checkpoint, finished = distributed.on_main(lambda: _inspect_out(out, store, recipe, resume, overwrite))
    if finished is not None:
        return finished

    # ---- validate every input before OUT is touched
    state, stages = _prepare(recipe, show_progress, dev)
    state.on_eval = on_eval
    created = distributed.on_main(lambda: _create_out(out, store, recipe, non_empty and overwrite and not resume))
    try:
        with output_errors(out):
            return _execute(recipe, state, stages, out, store, checkpoint, keep)
    except RunStopped:
        if created and distributed.is_main():
            shutil.rmtree(out, ignore_errors=True)
        raise
    except BaseException:
        if not distributed.is_main():
            raise
        if created and store.latest() is None:  # nothing worth resuming: leave no partial output
            shutil.rmtree(out, ignore_errors=True)
        elif store.latest() is not None:
            console.print(f"run interrupted; continue it with --resume (checkpoints in {store.root})")
        raise


def _inspect_out(out: Path, store: CheckpointStore, recipe: Recipe, resume: bool,
                 overwrite: bool) -> tuple[bool, Path | None, dict | None]:
    """(OUT is not empty, the checkpoint to resume from, the metrics of a run already finished): the checks
    on OUT made before any work."""
    check_output_path(out, kind="directory")  # before any work: a path that cannot be created is one line
    non_empty = out.is_dir() and any(out.iterdir())
    if resume and (out / "metrics.json").is_file():
        console.print(f"{out}: run already finished; nothing to resume (metrics in {out / 'metrics.json'})")
        return non_empty, None, json.loads((out / "metrics.json").read_text(encoding="utf-8"))
    if non_empty and not (resume or overwrite):
        raise SlimtuneError(f"{out}: output directory exists and is not empty "
                            "(use --overwrite to replace it, or --resume to continue a run)")
    checkpoint = store.latest() if resume else None
    if resume:
        if checkpoint is None:
            console.print(f"{out}: no complete checkpoint found; starting from the beginning")
        else:
            _check_same_recipe(store.root, recipe)
            console.print(f"resuming from {checkpoint}")
    return non_empty, checkpoint, None


def _create_out(out: Path, store: CheckpointStore, recipe: Recipe, replace: bool) -> bool:
    """OUT and OUT/checkpoints/recipe.yaml (`replace`: an existing OUT removed first); whether OUT is new."""
    with output_errors(out):
        if replace:
            shutil.rmtree(out)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        store.root.mkdir(exist_ok=True)
        atomic_write_text(store.root / "recipe.yaml", recipe_to_yaml(recipe))
    return created


def _check_same_recipe(root: Path, recipe: Recipe) -> None:
    saved = root / "recipe.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != recipe_to_yaml(recipe):
        raise SlimtuneError(f"{saved}: the checkpoints were made with a different recipe; "
                            "resume with the same recipe and --set options, or use --overwrite")


def _prepare(recipe: Recipe, show_progress: bool, device: torch.device | None = None) -> tuple[Run, list[Stage]]:
    task = get_task(recipe.task)
    for i, cfg in enumerate(recipe.stages):
        method = getattr(cfg, "method", None)
        names = (cfg.stage, f"{cfg.stage}:{method}")
        if task.supported_stages is not None and not set(names) & set(task.supported_stages):
            what = f"stage '{cfg.stage}'" + (f" with method '{method}'" if method else "")
            raise SlimtuneError(f"stages.{i}: {what} is not available for task {task.name} yet "
                                f"(available: {', '.join(task.supported_stages)})")
    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(model_path)
    # The task's outputs first (cheap), so the head is built with the right size before data prep,
    # which needs the model's embeddings for synonym augmentation. A starting model already trained for
    # these outputs keeps its own (a classifier: its label order, and its head); else it gets a new head.
    outputs = task.output_space(recipe.data, model_path)
    note = task.start_note(model_path, outputs)
    if note:
        console.print(f"note: {note}", highlight=False)
    # A new head is initialised randomly at load: seed it (with the first stage's seed) so two runs of
    # one recipe, or a killed run and its resume, start from the same weights.
    seed_everything(next((s.seed for s in recipe.stages if hasattr(s, "seed")), 42))
    model = task.load_pretrained(model_path, outputs)
    emb = model.get_input_embeddings().weight.detach() if getattr(recipe.data, "augment", None) else None
    data = task.prepare_data(recipe.data, tokenizer, outputs, embedding_weight=emb, model_config=model.config)
    device = device or torch.device("cpu")
    model.to(device)  # every stage and evaluation runs where the model is (batches follow it)
    state = Run(task=task, model=model, tokenizer=tokenizer, data=data, preprocessing=task.preprocessing(recipe.data),
                base_model=recipe.model, show_progress=show_progress, device=device)
    stages = [build_stage(cfg) for cfg in recipe.stages]
    for i, stage in enumerate(stages):
        state.stage_index, state.stage_name = i, stage.name
        stage.validate(state)
    state.stage_index, state.stage_name = 0, ""
    return state, stages


def _execute(recipe: Recipe, run: Run, stages: list[Stage], out: Path, store: CheckpointStore,
             checkpoint: Path | None, keep_checkpoints: bool) -> dict:
    first = 0
    if checkpoint is not None:
        saved, _ = read_checkpoint(checkpoint)
        run.progress = Progress.from_dict(saved["runner"])
        first = run.progress.stage
    run.checkpoints, run.resume, run.out = store, checkpoint, out
    store.pinned = checkpoint
    run.tb = SummaryWriter(str(out / "tb")) if distributed.is_main() else None  # rank 0 logs
    report = recipe.report
    opens_measured = _measures(stages[0]) and getattr(stages[0].config, "speed", False)
    if checkpoint is None and report.start and not opens_measured:  # an opening evaluate stage is the start
        console.print("measuring the starting model (the report's reference)")
        run.progress.start = _measured(run, report)
    for i in range(first):  # finished before the resume: rebuild structure changes only
        run.stage_index, run.stage_name = i, stages[i].name  # rebuild reads what its stage recorded
        console.print(f"stage {i}: {stages[i].name} (finished; rebuilding its model structure)")
        stages[i].rebuild(run)
    try:
        for i in range(first, len(stages)):
            run.stage_index, run.stage_name = i, stages[i].name
            if i != first:
                run.progress.phases = []
            run.progress.stage = i
            console.print(f"[bold]stage {i}: {stages[i].name}[/bold]")
            record = stages[i].run(run)
            # each stage's output is a row of the report: measured here unless an evaluate stage does it next
            # (the last stage's output is the final model, measured below)
            if report.stages and not _measures(stages[i]) and i + 1 < len(stages) and not _measures(stages[i + 1]):
                record["output"] = _measured(run, report)
            run.progress.done.append(record)
            run.resume = None  # only the stage that was interrupted resumes from the checkpoint
    finally:
        if run.tb is not None:
            run.tb.close()
    # rank 0 writes OUT (its final measurement, if any, unsharded) and every rank returns its metrics
    # the recipe as it ran: each stage's config after `validate`, which fills in what the recipe left to the
    # stage (a word student's measured-best defaults), so that OUT/recipe.yaml reproduces this run and the
    # report and model card show what trained (the user's own recipe stays in OUT/checkpoints/, for resumes)
    ran = recipe.model_copy(update={"stages": [stage.config for stage in stages]})
    return distributed.on_main(lambda: _write_outputs(ran, run, out, store, run.progress.done, keep_checkpoints))


def _write_outputs(recipe: Recipe, run: Run, out: Path, store: CheckpointStore, stage_metrics: list[dict],
                   keep_checkpoints: bool) -> dict:
    task = run.task
    last = stage_metrics[-1]
    measured = all(k in last for k in (*task.final_keys, "params"))  # the recipe ended with a measurement
    final = dict(last) if measured else {"stage": "evaluate", **_measured(run, recipe.report)}
    trained = [m for m in stage_metrics if "trainable_pct" in m]  # stages that trained say how much
    final["trainable_params"] = trained[-1]["trainable_params"] if trained else final.get("params")
    with atomic_dir(out / "model") as tmp:
        save_model_dir(run, tmp)
        final["size_mb"] = dir_size_mb(tmp)
        final["packed_mb"] = packed_size_mb(tmp)  # `slimtune pack`'s file, for a quantized model
        keys = (*task.final_keys, *MODEL_KEYS, *task.speed_keys)
        metrics = {"final": {k: final.get(k) for k in keys} | {k: final[k] for k in EXTRA_KEYS if k in final},
                   "start": run.progress.start, "stages": stage_metrics, "data": run.data.info,
                   "base_model": recipe.model, "task": task.name, "warnings": task.warnings(final),
                   "machine": machine_description()}
        for warning in metrics["warnings"]:  # also in report.md and the model card
            console.print(f"[yellow]warning[/yellow]: {warning}", highlight=False)
        config = getattr(run.model, "config", None)
        plain_hf = not any(getattr(config, key, None) for key in
                           ("slimtune_format", "slimtune_quantization", "slimtune_lowrank"))
        atomic_write_text(tmp / "README.md", model_card(recipe, metrics, run.data, task, plain_hf=plain_hf))
    mode = int8_activations(run.model)
    if mode:  # int8 runs deploy through ONNX Runtime: write that artifact and check it against torch
        metrics["final"]["onnx"] = shipped = _export_int8(run, out, mode, recipe.report, final.get("threads"))
        if "throughput_eps" in shipped and metrics["final"].get("throughput_eps") is not None:
            _headline_the_artifact(metrics["final"], shipped)
    metrics["artifacts"] = task.write_artifacts(final, out)
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    write_report(out, metrics=metrics, recipe=recipe_to_yaml(recipe))  # report.md, report.html
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))  # last: marks the run finished
    store.pinned = None
    if keep_checkpoints:
        for old in store.complete()[:-1]:  # keep one checkpoint; the rest only served resumes
            shutil.rmtree(old, ignore_errors=True)
        store.clear_best()
    else:  # the model is written: the checkpoints (often several times its size) only served resumes
        shutil.rmtree(store.root, ignore_errors=True)
    return metrics


def _measures(stage: Stage) -> bool:
    """A stage that measures the model it is given and changes nothing (`stage: evaluate`)."""
    return getattr(stage, "measures", False)


def _measured(run: Run, report: ReportConfig) -> dict:
    return measure(run, speed=report.speed, latency_runs=report.latency_runs,
                   throughput_batches=report.throughput_batches, threads=report.threads)


def _headline_the_artifact(final: dict, shipped: dict) -> None:
    """A quantized model's speed is the deployed artifact's: torch only simulates its integer arithmetic
    (a float graph with rounding), so its figures move under `simulated`, labelled as such."""
    speed_keys = ("latency_ms_b1", "latency_ms_b1_p90", "throughput_eps", "runtime")
    final["simulated"] = {k: final[k] for k in speed_keys if k in final}
    final.update({k: shipped[k] for k in speed_keys if k in shipped})
    final["artifact"] = "onnx/model.onnx"
    final["artifact_size_mb"] = shipped.get("size_mb")


def _export_int8(run: Run, out: Path, mode: str, report_cfg: ReportConfig | None = None,
                 threads: int | None = None) -> dict:
    """OUT/onnx: the ONNX Runtime int8 model, its metric on the eval split next to the torch one.
    Static ranges are calibrated on the very train batches the quantize stage calibrated torch on (the
    model records which)."""
    spec = getattr(run.model.config, "slimtune_quantization", None) or {}
    cal = spec.get("calibration")
    batches = None
    if mode == "static" and cal:
        batches = calibration_batches(run.data.train, cal["batches"], cal["batch_size"], cal["seed"], run.pad_id)
    try:
        # kept even when it misses the export policy: the torch model is the run's result and the
        # artifact beside it says how far it is (the warning below, export.json, metrics.json)
        report = export_onnx(out / "model", out / "onnx", quantize=mode, sample=run.data.eval, model=run.model,
                             overwrite=True, calibration=batches, force=True)
    except SlimtuneError as e:  # the torch model is finished and saved: report, don't lose the run
        console.print(f"[yellow]warning[/yellow]: no ONNX int8 artifact: {e}")
        return {"error": str(e)}
    if report["forced"]:
        console.print(f"[yellow]warning[/yellow]: the ONNX Runtime int8 artifact misses the export policy: "
                      f"{report['parity_detail']}", highlight=False)
    console.print(f"ONNX Runtime int8 ({report['int8_format']}): {report['parity_detail']} -> "
                  f"{out / 'onnx' / 'model.onnx'}", highlight=False)
    shipped = {k: report[k] for k in ("int8_format", "onnx_accuracy", "torch_accuracy", "drop_pt", "drop_interval_pt",
                                      "parity", "size_mb", "fusion") if k in report}
    if report_cfg is not None and report_cfg.speed:  # the same protocol as the torch figures beside it
        shipped |= measure_onnx_speed(out / "onnx" / "model.onnx", run.data.eval, run.pad_id,
                                      latency_runs=report_cfg.latency_runs,
                                      throughput_batches=report_cfg.throughput_batches,
                                      threads=report_cfg.threads or threads)
    return shipped


def save_model_dir(run: Run, out_dir: Path) -> None:
    """The run's model as a directory every slimtune command (and transformers, where it can) loads back:
    weights, config (with the task and the preprocessing record), tokenizer."""
    model = run.model
    if is_peft(model):  # lora.save_adapter_only: adapter + head + config (labels) + tokenizer
        base = model.get_base_model()
        setattr(base.config, TASK_KEY, run.task.name)
        setattr(base.config, PREPROCESSING_KEY, run.preprocessing.model_dump(mode="json"))
        base.config.save_pretrained(out_dir)
        model.save_pretrained(out_dir)
        run.tokenizer.save_pretrained(out_dir)
        return
    setattr(model.config, TASK_KEY, run.task.name)
    save_hf_model(model, run.tokenizer, out_dir, run.preprocessing)

