"""Commands that use a model directory (or an exported one): eval, predict, generate, export, pack, unpack."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from slimtune.cli.app import app, print_final
from slimtune.errors import SlimtuneError

PANEL = "Use a model"


@app.command("eval", rich_help_panel=PANEL)
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
    print_final({"final": metrics}, title=str(data))
    for warning in task.warnings(metrics):
        typer.echo(f"warning: {warning}", err=True)
    sys.stdout.write(json.dumps(metrics) + "\n")


@app.command("predict", rich_help_panel=PANEL)
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


@app.command("generate", rich_help_panel=PANEL)
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


@app.command("export", rich_help_panel=PANEL)
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


@app.command("pack", rich_help_panel=PANEL)
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


@app.command("unpack", rich_help_panel=PANEL)
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
