"""`slimtune.run(recipe)`: validate everything, run the stages in order, write the run directory.

The run directory is the contract later stages and tools rely on:
  OUT/model/        HF directory (config.json with id2label, model.safetensors, tokenizer, README.md card)
  OUT/metrics.json  {"final": {...}, "stages": [...]} — written last: its presence means "finished"
  OUT/recipe.yaml   the resolved recipe        OUT/report.md   a human-readable report
  OUT/tb/           TensorBoard scalars        OUT/checkpoints/  atomic checkpoints (for --resume)
Inputs (recipe, model, data) are all validated before OUT is touched, so bad input never leaves a
partial output behind; each output file or directory appears in one rename.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from torch import nn

from slimtune.batching import EncodedDataset
from slimtune.checkpoint import CheckpointStore, read_checkpoint
from slimtune.errors import SlimtuneError
from slimtune.models import (
    atomic_dir,
    atomic_write_text,
    lazy,
    load_for_classification,
    load_tokenizer,
    resolve_model_path,
    save_hf_model,
)
from slimtune.recipe import EvaluateStage, Recipe, load_recipe, parse_recipe, recipe_to_yaml
from slimtune.report import model_card, report_markdown
from slimtune.train import TrainContext, default_eval_fn, seed_everything

console = Console(stderr=True, soft_wrap=True)  # messages stay one line (greppable logs)
FINAL_KEYS = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "params", "trainable_params",
              "size_mb", "latency_ms_b1", "throughput_eps")


@dataclass
class RunState:
    """What every stage reads and writes: the model, the data and where the run lives."""

    model: nn.Module
    tokenizer: object
    data: object  # slimtune.data.TaskData
    base_model: str  # the recipe's model (alias or absolute path)
    stage_index: int = 0
    stage_name: str = ""
    checkpoints: CheckpointStore | None = None
    tb: object | None = None
    resume: Path | None = None
    runner_state: dict = field(default_factory=dict)
    progress: bool = True
    out: Path | None = None
    data_cfg: object = None  # slimtune.recipe.DataConfig (max_length etc., for stages that re-encode)

    @property
    def pad_id(self) -> int:
        pid = getattr(self.tokenizer, "pad_token_id", None)
        return 0 if pid is None else int(pid)

    def eval_accuracy(self, model: nn.Module) -> float:
        """Accuracy of `model` on the eval split (stages report it before and after their change)."""
        return default_eval_fn(self.data.eval, self.pad_id)(model)["accuracy"]

    def train_context(self, phase: int | None = None) -> TrainContext:
        tag = f"s{self.stage_index}-{self.stage_name}" + ("" if phase is None else f"-p{phase}")
        return TrainContext(checkpoints=self.checkpoints, tb=self.tb, tag=tag, resume=self.resume,
                            runner_state=self.runner_state, progress=self.progress, pad_id=self.pad_id)

    def resolve_auto(self, cfg, model: nn.Module, loss_fn, train_ds: EncodedDataset | None = None,
                     make_batch=None) -> tuple[float, int]:
        """`lr: auto` / `batch_size: auto`, computed once and kept in checkpoints for resumes."""
        from slimtune.autotune import find_batch_size, find_lr
        from slimtune.batching import collate

        saved = self.runner_state.setdefault("auto", {}).get(str(self.stage_index))
        if saved:
            return saved["lr"], saved["batch_size"]
        make_batch = make_batch or (lambda ds, idx: collate(ds, idx, self.pad_id))
        train_ds = train_ds or self.data.train
        bs, lr = cfg.batch_size, cfg.lr
        if bs == "auto":
            bs, speeds = find_batch_size(model, train_ds, loss_fn, make_batch, seed=cfg.seed)
            console.print(f"batch_size auto: {bs} (examples/s by batch size: "
                          f"{ {k: round(v, 1) for k, v in speeds.items()} })")
        if lr == "auto":
            lr, _ = find_lr(model, train_ds, loss_fn, make_batch, bs, cfg.weight_decay, seed=cfg.seed)
            console.print(f"lr auto (LR range test): {lr:.2e}")
        self.runner_state["auto"][str(self.stage_index)] = {"lr": float(lr), "batch_size": int(bs)}
        return float(lr), int(bs)


# ------------------------------------------------------------------------------------------ stages
def run_evaluate(run: RunState, cfg: EvaluateStage) -> dict:
    from slimtune.evaluate import evaluate_model

    metrics = evaluate_model(run.model, run.data.eval, run.data.id2label, pad_id=run.pad_id, speed=cfg.speed,
                             latency_runs=cfg.latency_runs, throughput_batches=cfg.throughput_batches,
                             threads=cfg.threads)
    return {"stage": "evaluate", "split": run.data.info.get("eval_source", "eval"), **metrics}


# stage name -> handler(run, cfg) -> metrics
STAGE_HANDLERS: dict[str, Callable[[RunState, object], dict]] = {
    "finetune": lazy("slimtune.adapt.finetune", "run_finetune"),
    "distill": lazy("slimtune.distill.stage", "run_distill"),
    "prune": lazy("slimtune.prune.stage", "run_prune"),
    "quantize": lazy("slimtune.quantize.stage", "run_quantize"),
    "lowrank": lazy("slimtune.lowrank", "run_lowrank"),
    "evaluate": run_evaluate}
# Input checks a stage can make from configs alone, run before OUT is touched (bad input leaves nothing).
STAGE_VALIDATORS: dict[str, Callable[[RunState, object], None]] = {
    "distill": lazy("slimtune.distill.stage", "validate_distill"),
    "prune": lazy("slimtune.prune.stage", "validate_prune"),
    "quantize": lazy("slimtune.quantize.stage", "validate_quantize"),
    "lowrank": lazy("slimtune.lowrank", "validate_lowrank")}
# Stages that change the model's structure (or tokenizer): on --resume past them, the runner rebuilds
# that structure (without training) so the checkpoint's weights fit.
STAGE_REBUILDERS: dict[str, Callable[[RunState, object], None]] = {
    "distill": lazy("slimtune.distill.stage", "rebuild_distill"),
    "prune": lazy("slimtune.prune.stage", "rebuild_prune"),
    "quantize": lazy("slimtune.quantize.stage", "rebuild_quantize"),
    "lowrank": lazy("slimtune.lowrank", "rebuild_lowrank")}


# ------------------------------------------------------------------------------------------- run
def coerce_recipe(recipe: Recipe | dict | str | Path, overrides: list[str] | None = None) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        from slimtune.recipe import apply_overrides

        return parse_recipe(apply_overrides(dict(recipe), overrides or []), base_dir=Path.cwd())
    return load_recipe(recipe, overrides)


def run(recipe: Recipe | dict | str | Path, out: str | Path, *, overwrite: bool = False, resume: bool = False,
        overrides: list[str] | None = None, progress: bool | None = None) -> dict:
    """Run a recipe into the run directory `out`; returns the metrics.json content."""
    recipe = coerce_recipe(recipe, overrides)
    out = Path(out).expanduser().resolve()
    progress = sys.stderr.isatty() if progress is None else progress
    store = CheckpointStore(out / "checkpoints")
    if out.exists() and not out.is_dir():
        raise SlimtuneError(f"{out}: output path exists and is not a directory")
    non_empty = out.is_dir() and any(out.iterdir())
    if resume and (out / "metrics.json").is_file():
        console.print(f"{out}: run already finished; nothing to resume (metrics in {out / 'metrics.json'})")
        return json.loads((out / "metrics.json").read_text(encoding="utf-8"))
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

    # ---- validate every input before OUT is touched
    run_state = _prepare(recipe, progress)
    if non_empty and overwrite and not resume:
        shutil.rmtree(out)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    store.root.mkdir(exist_ok=True)
    atomic_write_text(store.root / "recipe.yaml", recipe_to_yaml(recipe))
    try:
        return _execute(recipe, run_state, out, store, checkpoint)
    except BaseException:
        if created and store.latest() is None:  # nothing worth resuming: leave no partial output
            shutil.rmtree(out, ignore_errors=True)
        elif store.latest() is not None:
            console.print(f"run interrupted; continue it with --resume (checkpoints in {store.root})")
        raise


def _check_same_recipe(root: Path, recipe: Recipe) -> None:
    saved = root / "recipe.yaml"
    if saved.is_file() and saved.read_text(encoding="utf-8") != recipe_to_yaml(recipe):
        raise SlimtuneError(f"{saved}: the checkpoints were made with a different recipe; "
                            "resume with the same recipe and --set options, or use --overwrite")


def _prepare(recipe: Recipe, progress: bool) -> RunState:
    from slimtune.data import label_map_of, prepare_data

    model_path = resolve_model_path(recipe.model)
    tokenizer = load_tokenizer(model_path)
    # Labels first (cheap), so the classifier is built with the right size before data prep,
    # which needs the model's embeddings for synonym augmentation.
    _, id2label = label_map_of(recipe.data)
    # The new classification head is initialised randomly at load: seed it (with the first stage's
    # seed) so two runs of one recipe, or a killed run and its resume, start from the same weights.
    seed_everything(next((s.seed for s in recipe.stages if hasattr(s, "seed")), 42))
    model = load_for_classification(model_path, id2label)
    emb = model.get_input_embeddings().weight.detach() if recipe.data.augment else None
    data = prepare_data(recipe.data, tokenizer, embedding_weight=emb)
    run = RunState(model=model, tokenizer=tokenizer, data=data, base_model=recipe.model, progress=progress,
                   data_cfg=recipe.data)
    for cfg in recipe.stages:
        if cfg.stage in STAGE_VALIDATORS:
            STAGE_VALIDATORS[cfg.stage](run, cfg)
    return run


def _execute(recipe: Recipe, run: RunState, out: Path, store: CheckpointStore, checkpoint: Path | None) -> dict:
    from torch.utils.tensorboard import SummaryWriter

    first = 0
    stage_metrics: list[dict] = []
    if checkpoint is not None:
        state, _ = read_checkpoint(checkpoint)
        run.runner_state = state["runner"]
        first = run.runner_state["stage"]
        stage_metrics = list(run.runner_state["done"])
    run.checkpoints, run.resume, run.out = store, checkpoint, out
    store.pinned = checkpoint
    run.tb = SummaryWriter(str(out / "tb"))
    for i in range(first):  # finished before the resume: rebuild structure changes only
        cfg = recipe.stages[i]
        if cfg.stage in STAGE_REBUILDERS:
            run.stage_index, run.stage_name = i, cfg.stage  # rebuilders read what their stage recorded
            console.print(f"stage {i}: {cfg.stage} (finished; rebuilding its model structure)")
            STAGE_REBUILDERS[cfg.stage](run, cfg)
    try:
        for i in range(first, len(recipe.stages)):
            cfg = recipe.stages[i]
            run.stage_index, run.stage_name = i, cfg.stage
            run.runner_state.update({"stage": i, "done": stage_metrics})
            if i != first:
                run.runner_state.pop("phases", None)
            console.print(f"[bold]stage {i}: {cfg.stage}[/bold]")
            stage_metrics.append(STAGE_HANDLERS[cfg.stage](run, cfg))
            run.resume = None  # only the stage that was interrupted resumes from the checkpoint
    finally:
        run.tb.close()
    return _write_outputs(recipe, run, out, store, stage_metrics)


def _write_outputs(recipe: Recipe, run: RunState, out: Path, store: CheckpointStore,
                   stage_metrics: list[dict]) -> dict:
    from slimtune.evaluate import dir_size_mb, evaluate_model, save_confusion_matrix

    last = stage_metrics[-1]
    final = dict(last) if last["stage"] == "evaluate" else {
        "stage": "evaluate", **evaluate_model(run.model, run.data.eval, run.data.id2label, pad_id=run.pad_id)}
    trained = [m for m in stage_metrics if "trainable_params" in m and m["stage"] != "evaluate"]
    final["trainable_params"] = trained[-1]["trainable_params"] if trained else final.get("params")
    preprocessing = {k: getattr(recipe.data, k) for k in
                     ("clean", "lowercase", "segment_chinese", "max_length", "text_field", "text_pair_field",
                      "label_field")}
    with atomic_dir(out / "model") as tmp:
        save_model_dir(run.model, run.tokenizer, tmp, preprocessing)
        final["size_mb"] = dir_size_mb(tmp)
        metrics = {"final": {k: final.get(k) for k in FINAL_KEYS} | _extras(final),
                   "stages": stage_metrics, "data": run.data.info, "base_model": recipe.model}
        config = getattr(run.model, "config", None)
        plain_hf = not any(getattr(config, key, None) for key in
                           ("slimtune_format", "slimtune_quantization", "slimtune_lowrank"))
        atomic_write_text(tmp / "README.md", model_card(recipe, metrics, run.data, plain_hf=plain_hf))
    mode = int8_activations(run.model)
    if mode:  # int8 runs deploy through ONNX Runtime: write that artifact and check it against torch
        metrics["final"]["onnx"] = _export_int8(run, recipe, out, mode)
    save_confusion_matrix(final["confusion_matrix"], out)
    atomic_write_text(out / "recipe.yaml", recipe_to_yaml(recipe))
    atomic_write_text(out / "report.md", report_markdown(recipe, metrics))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))  # last: marks the run finished
    store.pinned = None
    for old in store.complete()[:-1]:  # keep one checkpoint; the rest only served resumes
        shutil.rmtree(old, ignore_errors=True)
    store.clear_best()
    return metrics


def int8_activations(model: nn.Module) -> str | None:
    """'dynamic' / 'static' when the model's quantized layers quantize their activations (int8 runs)."""
    spec = getattr(getattr(model, "config", None), "slimtune_quantization", None) or {}
    modes = {layer.get("activations") for layer in spec.get("layers", {}).values()} - {None}
    return "static" if "static" in modes else modes.pop() if modes else None


def _export_int8(run: RunState, recipe: Recipe, out: Path, mode: str) -> dict:
    """OUT/onnx: the ONNX Runtime int8 model, its accuracy on the eval split next to the torch one.
    Static ranges are calibrated on the very batches the quantize stage calibrated torch on."""
    from slimtune.export import export_onnx
    from slimtune.quantize.stage import calibration_batches

    stage = next((s for s in reversed(recipe.stages) if getattr(s, "method", None) == "static_int8"), None)
    batches = calibration_batches(run, stage) if mode == "static" and stage is not None else None
    try:
        report = export_onnx(out / "model", out / "onnx", quantize=mode, sample=run.data.eval, model=run.model,
                             overwrite=True, calibration=batches)
    except SlimtuneError as e:  # the torch model is finished and saved: report, don't lose the run
        console.print(f"[yellow]warning[/yellow]: no ONNX int8 artifact: {e}")
        return {"error": str(e)}
    gap = 100 * abs(report["onnx_accuracy"] - report["torch_accuracy"])
    console.print(f"ONNX Runtime int8 ({report['int8_format']}): accuracy {report['onnx_accuracy']:.4f}, "
                  f"torch {report['torch_accuracy']:.4f} ({gap:.2f} pt apart) -> {out / 'onnx' / 'model.onnx'}")
    return {k: report[k] for k in ("int8_format", "onnx_accuracy", "torch_accuracy", "size_mb", "fusion")}


def _extras(final: dict) -> dict:
    keys = ("precision_micro", "recall_micro", "f1_micro", "latency_ms_b1_p90", "threads", "cpu", "split")
    return {k: final[k] for k in keys if k in final}


def save_model_dir(model: nn.Module, tokenizer, out_dir: Path, preprocessing: dict) -> None:
    from slimtune.adapt.lora import is_peft

    if is_peft(model):  # lora.save_adapter_only: adapter + head + config (labels) + tokenizer
        base = model.get_base_model()
        base.config.slimtune_preprocessing = preprocessing
        base.config.save_pretrained(out_dir)
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
        return
    save_hf_model(model, tokenizer, out_dir, preprocessing)


def eval_dataset_for(model_dir: Path, data_file: Path, tokenizer, label2id: dict, text_field: str | None,
                     label_field: str | None) -> EncodedDataset:
    """The eval split of `slimtune eval`, preprocessed exactly as the model's training data was."""
    from slimtune.data import load_eval_data
    from slimtune.models import preprocessing_of

    pre = preprocessing_of(model_dir)
    return load_eval_data(data_file, tokenizer, label2id, text_field or pre.get("text_field", "text"),
                          label_field or pre.get("label_field", "label"),
                          text_pair_field=pre.get("text_pair_field"), max_length=pre.get("max_length", 128),
                          clean=pre.get("clean", True), lowercase=pre.get("lowercase", False),
                          segment_chinese=pre.get("segment_chinese", False))
