"""`slimtune export MODEL_DIR --format onnx [--quantize dynamic|static] --out DIR`.

OUT holds `model.onnx` (dynamic batch and sequence axes), the tokenizer files and config.json, so
onnxruntime + tokenizers alone can serve it, plus `export.json` saying what was done and measured.
What is traced, and under which names, is the model's task's (`Task.onnx_signature`): a classifier maps
the tokenizer's inputs to logits; a causal LM is a decoder with its KV cache in the graph
(slimtune.onnx_decoder), which its task checks itself (greedy generations identical to torch's,
`parity.greedy_verdict`; `--force` keeps a graph that misses it) instead of steps 2-4 below.

What the export does, in order, each step measured rather than assumed:
1. torch -> ONNX (TorchScript exporter, opset 17: the dynamo exporter's graphs lack the value_info
   ONNX Runtime's quantizer needs). Quantized slimtune models are exported dequantized: their weights
   already sit on the int8 grid, so ONNX Runtime's own per-channel quantization finds the same codes.
2. ONNX Runtime's transformer optimizer (attention / LayerNorm / GELU fusion) — kept only if it is
   faster on a sample here; it needs uniform heads, so per-layer head counts skip it.
3. Optional int8: `dynamic` (weights int8 per channel, activations quantized per call) or `static`
   (activation ranges calibrated on sample batches; QDQ and integer-operator graphs are both built and
   the faster one kept).
4. Parity on a sample: fp32 max |logit difference| vs torch <= 1e-4 (else a bug: refused); int8 is
   measured against torch on labelled rows and held to `--max-drop` (see slimtune.parity), `--force`
   keeps a graph that misses it. The measurement is stored in export.json either way.
5. The tokenizer is saved with padding and truncation on (batched onnxruntime use needs no set-up),
   with the preprocessing record (`preprocessing.json`: cleaning, lower-casing, segmentation,
   max_length, fields) and slimtune's cleaning code (`preprocess.py`, standard library only) beside it,
   so a server without slimtune treats text as training did (docs/deploy.md shows the ten lines).
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune import onnx_graph, textprep
from slimtune.batching import EncodedDataset, batch_indices, collate
from slimtune.errors import SlimtuneError
from slimtune.evaluate import cpu_description, predict_logits, time_forward
from slimtune.graph_model import OnnxClassifier
from slimtune.io import atomic_dir, atomic_write_text, check_output_path
from slimtune.models import (
    load_model,
    load_tokenizer,
    preprocessing_of,
    read_config,
    resolve_model_path,
)
from slimtune.onnx_int8 import quantization_scope, quantize_graph
from slimtune.onnx_nbits import perplexity_comparison, token_nlls_onnx, token_nlls_torch, write_nbits_graph
from slimtune.parity import (
    DEFAULT_MAX_DROP_PT,
    DEFAULT_MAX_RISE_PCT,
    ParitySample,
    greedy_verdict,
    miss_hint,
    parity_sample,
    perplexity_verdict,
    verdict,
)
from slimtune.quantize.core import dequantize_
from slimtune.tasks import task_of_model
from slimtune.tasks.base import OnnxSignature

FP32_TOLERANCE = 1e-4
LM_PARITY_WINDOWS = 8  # a decoder's int8/int4 check: 8 eval windows (4,096 tokens at 512 a window)


# ----------------------------------------------------------------------------------------- export
def export_onnx(model_dir: str | Path, out: str | Path, *, quantize: str | None = None, data: Path | None = None,
                optimize: bool = True, sample_size: int = 1000, calibration_batches: int = 8,
                threads: int | None = None, overwrite: bool = False, sample: EncodedDataset | None = None,
                model: nn.Module | None = None, calibration: list[dict] | None = None,
                max_drop: float | None = None, force: bool = False,
                finish: Callable[[Path, dict], None] | None = None, block_size: int = 32) -> dict:
    """Export a model directory to OUT (see the module docstring); returns the export report.

    `sample` (labelled, already encoded) replaces --data for the parity check and calibration; `model`
    is the in-memory model of `model_dir` when the caller has it (the runner), else it is loaded;
    `calibration` (collated batches) replaces the sample's first batches for static calibration.
    An int8 graph that loses more than `max_drop` points of the task's primary metric is refused with
    what to try, unless `force` (then kept, and `forced` is set in the report). So is a graph that misses
    its task's own check (`OnnxSignature.check`: a decoder's greedy generations). A decoder's `quantize`
    (int8 / int4: MatMulNBits weights, slimtune.onnx_nbits, new codes in blocks of `block_size`) is held to a
    perplexity rise of at most `max_drop` percent against torch instead (default DEFAULT_MAX_RISE_PCT).
    `finish(dir, report)` is called on the written directory before it replaces OUT (its failure leaves
    nothing): a caller's own files and layout (slimtune.bundle)."""
    if quantize not in (None, "dynamic", "static", "int8", "int4"):
        raise SlimtuneError(f"--quantize {quantize!r}: expected dynamic or static (a classifier), int8 or int4 "
                            "(a causal LM's weights)")
    path = resolve_model_path(model_dir)
    config = read_config(path)
    if config.get("slimtune_format") == "word-classifier":
        raise SlimtuneError(f"{path}: word-level BiLSTM/CNN classifiers are not exportable to ONNX (their packed "
                            "LSTM sequences have no ONNX equivalent); they run in torch")
    task = task_of_model(config)
    if quantize and quantize not in task.onnx_quantize:
        raise SlimtuneError(f"--quantize {quantize}: not available for a {task.name} model (its modes: "
                            f"{', '.join(task.onnx_quantize) or 'none: leave --quantize out'})")
    out = check_output_path(Path(out).expanduser().resolve(), kind="directory")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise SlimtuneError(f"{out}: output directory exists and is not empty (use --overwrite to replace it)")
    if quantize == "static" and data is None and sample is None:
        raise SlimtuneError("--quantize static needs --data FILE: its activation ranges are calibrated on your text")
    model = load_model(path) if model is None else model
    tokenizer = load_tokenizer(path)
    plain = plain_float_model(model)
    signature = task.onnx_signature(plain, tokenizer, path)  # refuses a config that disagrees with the weights
    if signature.check is not None:
        if data is not None and not quantize:
            raise SlimtuneError(f"--data {data}: a float {task.name} export reads no text (its graph is checked by "
                                "generating with it); leave --data out, or give it with --quantize")
        weights = None if not quantize else WeightQuantization(
            int(quantize[3:]), block_size, DEFAULT_MAX_RISE_PCT if max_drop is None else max_drop,
            parity_sample(path, model, tokenizer, data, LM_PARITY_WINDOWS), model)
        return _export_self_checked(path, out, plain, tokenizer, signature, threads, force, finish, weights)
    max_drop = DEFAULT_MAX_DROP_PT if max_drop is None else max_drop
    measured_on = (ParitySample(sample, True, f"{len(sample)} rows of the run's eval split") if sample is not None
                   else parity_sample(path, model, tokenizer, data, sample_size))
    sample = measured_on.rows
    pad = int(tokenizer.pad_token_id or 0)
    report: dict = {"source": str(path), "quantize": quantize, "sample_size": len(sample),
                    "labelled": measured_on.labelled, "parity_rows": measured_on.source}
    with tempfile.TemporaryDirectory() as work_dir, atomic_dir(out) as tmp:
        work = Path(work_dir)
        fp32 = work / "fp32.onnx"
        trace_to_onnx(signature, fp32)
        report["fp32_max_abs_diff"] = _max_abs_diff(plain, OnnxClassifier(fp32, threads), sample, pad)
        if report["fp32_max_abs_diff"] > FP32_TOLERANCE:
            raise SlimtuneError(f"{path}: ONNX fp32 parity failed: max |logit diff| "
                                f"{report['fp32_max_abs_diff']:.2e} > {FP32_TOLERANCE:g}")
        # int8 quantizes the unfused graph: ORT's fused attention ops stay float, which made a fused
        # dynamic-int8 MiniLM 0.66x as fast as the unfused one here
        graph, report["fusion"] = (_maybe_fuse(plain, fp32, work, sample, pad, threads) if optimize and not quantize
                                   else (fp32, "not applied before int8" if quantize else "off"))
        if optimize:
            graph, report["static_reshapes"] = _static_reshapes(plain, graph, work / "static.onnx", sample, pad)
        if quantize:
            scope = quantization_scope(model, plain, graph)
            batches = calibration or _sample_batches(sample, pad, calibration_batches)
            task, reference = task_of_model(model.config), predict_logits(model, sample, pad_id=pad)

            def parity(graph: Path) -> dict:
                measured = task.compare_outputs(reference, OnnxClassifier(graph, threads).predict_logits(sample, pad),
                                                sample, measured_on.labelled)
                return verdict(measured, measured_on, max_drop, task.primary.name)

            graph, report["int8_format"], checked = quantize_graph(
                graph, work, quantize, scope, batches, speed=lambda g: _speed(g, sample, pad, threads), parity=parity)
            report.update(checked, max_drop_pt=max_drop)
            if report["parity"] == "fail" and not force:
                raise SlimtuneError(f"{path}: the int8 graph misses the export policy: {report['parity_detail']}; "
                                    + miss_hint(quantize, report, measured_on, max_drop))
            report["forced"] = report["parity"] == "fail"
        else:
            report["parity"] = "pass"
        _write_beside_graph(graph, tmp, path, plain, tokenizer, signature, report, finish)
    return report


@dataclass
class WeightQuantization:
    """A decoder export's MatMulNBits request: bits for layers without codes, their block, the allowed
    perplexity rise (percent) and the text it is measured on; `model` holds the codes of a quantized model."""

    bits: int
    block_size: int
    max_rise_pct: float
    measured_on: ParitySample
    model: nn.Module


def _export_self_checked(path: Path, out: Path, plain: nn.Module, tokenizer, signature: OnnxSignature,
                         threads: int | None, force: bool, finish: Callable[[Path, dict], None] | None,
                         weights: WeightQuantization | None = None) -> dict:
    """A graph its task checks itself (a decoder: greedy generations against torch's): traced, checked,
    written with its files, or refused with the check's one-line detail unless `force`. With `weights`,
    the checked float graph's MatMuls then become MatMulNBits, held to the perplexity rise."""
    report: dict = {"source": str(path), "quantize": None if weights is None else f"int{weights.bits}",
                    "inputs": signature.input_names, "outputs": signature.output_names}
    with tempfile.TemporaryDirectory() as work_dir, atomic_dir(out) as tmp:
        graph = Path(work_dir) / "fp32.onnx"
        trace_to_onnx(signature, graph)
        report.update(greedy_verdict(signature.check(graph, threads)))
        report["fp32_max_abs_diff"] = report.get("max_abs_logit_diff")
        report["fusion"] = "not applied (the graph is checked as exported)"
        if report["parity"] == "fail" and not force:
            raise SlimtuneError(f"{path}: the ONNX graph misses the export policy: {report['parity_detail']} "
                                "(--force keeps it anyway)")
        if weights is not None:
            graph = _weight_only_graph(path, graph, Path(work_dir) / "nbits.onnx", plain, signature, weights,
                                       threads, report)
            if report["parity"] == "fail" and not force:
                raise SlimtuneError(f"{path}: the int{weights.bits} graph misses the export policy: "
                                    f"{report['parity_detail']}; try quantizing in a run first (`stage: quantize, "
                                    "method: weight_only`, algorithm gptq; its codes are exported as they are), "
                                    "--quantize int8, or --max-drop PCT / --force to keep this graph anyway")
        report["forced"] = report["parity"] == "fail"
        _write_beside_graph(graph, tmp, path, plain, tokenizer, signature, report, finish)
    return report


def _weight_only_graph(path: Path, fp32: Path, dest: Path, plain: nn.Module, signature: OnnxSignature,
                       weights: WeightQuantization, threads: int | None, report: dict) -> Path:
    """The MatMulNBits graph of `fp32`, measured: its perplexity against torch's on real text (the verdict),
    and its greedy generations against torch's (reported: quantized weights may pick other tokens)."""
    report["nbits"] = write_nbits_graph(fp32, dest, weights.model, plain, weights.bits, weights.block_size)
    greedy = signature.check(dest, threads)
    report["int_greedy"] = {k: greedy[k] for k in ("prompts", "prompts_differing", "first_difference")}
    sample = weights.measured_on
    if sample.labelled:
        rows = sample.rows.subset(range(min(LM_PARITY_WINDOWS, len(sample.rows))))
        measured = perplexity_comparison(token_nlls_torch(plain, rows), token_nlls_onnx(dest, rows, threads))
        report.update(perplexity_verdict(measured, sample, weights.max_rise_pct))
    else:
        report.update(parity="unchecked", parity_detail=(
            f"greedy generations differ from torch's on {greedy['prompts_differing']} of {greedy['prompts']} "
            f"prompts; perplexity not measured (pass --data FILE with text, or export RUN/model of a slimtune run)"))
    report["max_drop_pct"] = weights.max_rise_pct
    return dest


def _write_beside_graph(graph: Path, tmp: Path, path: Path, plain: nn.Module, tokenizer, signature: OnnxSignature,
                        report: dict, finish: Callable[[Path, dict], None] | None = None) -> None:
    """model.onnx with the tokenizer, preprocessing record and cleaning code, config and export.json; then
    the caller's `finish`."""
    shutil.copyfile(graph, tmp / "model.onnx")
    pre = preprocessing_of(path)
    if signature.pad_tokenizer:
        save_tokenizer_for_runtime(tokenizer, tmp, int(tokenizer.pad_token_id or 0), pre.max_length)
    else:
        tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / PREPROCESSING_FILE, json.dumps(pre.model_dump(mode="json"), indent=2))
    shutil.copyfile(textprep.__file__, tmp / "preprocess.py")  # the same cleaning, standard library only
    plain.config.save_pretrained(tmp)  # an HF config (labels, sizes): tooling that reads it needs no slimtune
    if getattr(plain, "generation_config", None) is not None:  # a generative model's EOS / pad ids
        plain.generation_config.save_pretrained(tmp)
    report["size_mb"] = round((tmp / "model.onnx").stat().st_size / 1e6, 3)
    atomic_write_text(tmp / "export.json", json.dumps(report, indent=2))
    if finish is not None:
        finish(tmp, report)


PREPROCESSING_FILE = "preprocessing.json"


def save_tokenizer_for_runtime(tokenizer, out: Path, pad_id: int, max_length: int) -> None:
    """The tokenizer files with padding (to the batch's longest text) and truncation at the training
    max_length switched on in tokenizer.json, so `tokenizers.Tokenizer.from_file(...).encode_batch(texts)`
    gives the batch onnxruntime needs, cut where training cut."""
    tokenizer.save_pretrained(out)
    fast = out / "tokenizer.json"
    if not fast.is_file():
        return
    from tokenizers import Tokenizer

    runtime = Tokenizer.from_file(str(fast))
    runtime.enable_padding(pad_id=pad_id, pad_token=tokenizer.convert_ids_to_tokens(pad_id) or "[PAD]")
    runtime.enable_truncation(max_length=max_length)
    atomic_write_text(fast, runtime.to_str(pretty=True))


def int8_activations(model: nn.Module) -> str | None:
    """'dynamic' / 'static' when the model's quantized layers quantize their activations: such a model
    deploys as an ONNX Runtime int8 graph."""
    spec = getattr(getattr(model, "config", None), "slimtune_quantization", None) or {}
    modes = {layer.get("activations") for layer in spec.get("layers", {}).values()} - {None}
    return "static" if "static" in modes else modes.pop() if modes else None


def plain_float_model(model: nn.Module) -> nn.Module:
    """A deep copy with quantized modules replaced by float ones holding the dequantized weights."""
    plain = copy.deepcopy(model).eval()
    if getattr(plain.config, "slimtune_quantization", None):
        dequantize_(plain)
    if hasattr(plain, "set_attn_implementation"):
        plain.set_attn_implementation("eager")  # sdpa's masking paths do not trace to dynamic shapes
    return plain


def trace_to_onnx(signature: OnnxSignature, dest: Path) -> None:
    """The TorchScript exporter (`dynamo=False`, opset 17) on the task's signature."""
    import warnings

    with warnings.catch_warnings(), torch.inference_mode():
        # TracerWarnings about python bools in masking and cache code: they freeze branches that the same
        # inputs always take (no padding beyond the mask, a cache present); the parity checks run the graph
        warnings.simplefilter("ignore")
        torch.onnx.export(signature.module, signature.example, str(dest), input_names=signature.input_names,
                          output_names=signature.output_names, dynamic_axes=signature.dynamic_axes,
                          opset_version=17, dynamo=False, do_constant_folding=True)


def torch_to_onnx(model: nn.Module, dest: Path, with_token_types: bool) -> None:
    """A classifier's graph from a model alone (the benchmarks and tests call this)."""
    from types import SimpleNamespace

    inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_token_types else [])
    source = Path(getattr(model.config, "name_or_path", "") or "model")
    trace_to_onnx(task_of_model(model.config).onnx_signature(model, SimpleNamespace(model_input_names=inputs),
                                                              source), dest)


def _max_abs_diff(model: nn.Module, clf: OnnxClassifier, ds: EncodedDataset, pad: int) -> float:
    return float(np.abs(predict_logits(model, ds, pad_id=pad) - clf.predict_logits(ds, pad)).max())


def measure_onnx_speed(graph: Path, ds: EncodedDataset, pad: int, latency_runs: int = 50,
                       throughput_batches: int = 10, threads: int | None = None,
                       runtime: str = "onnxruntime CPU (int8 graph)") -> dict:
    """An exported classifier's speed in ONNX Runtime, by the protocol of torch's `measure_speed`."""
    clf = OnnxClassifier(graph, threads)
    speed = time_forward(clf, ds, pad, latency_runs, throughput_batches)
    # ORT's default pool is one thread per physical core, torch's default too
    return speed | {"threads": threads or torch.get_num_threads(), "cpu": cpu_description(),
                    "runtime": runtime}


def _speed(path: Path, ds: EncodedDataset, pad: int, threads: int | None) -> float:
    """Sample cost (ms) of a graph: batch-32 time plus 32 x batch-1 latency, so neither regime is ignored."""
    s = time_forward(OnnxClassifier(path, threads), ds, pad, latency_runs=20, throughput_batches=4)
    return 32 * 1000 / s["throughput_eps"] + 32 * s["latency_ms_b1"]


def _attention_shape(model: nn.Module) -> tuple[int, int] | None:
    """(heads, attention width) when every layer has the same heads; None otherwise."""
    heads = {m.num_attention_heads for m in model.modules() if hasattr(m, "num_attention_heads")
             and hasattr(m, "attention_head_size")}
    if len(heads) != 1:
        return None
    layer = next(m for m in model.modules() if hasattr(m, "attention_head_size"))
    return heads.pop(), layer.num_attention_heads * layer.attention_head_size


def _maybe_fuse(model: nn.Module, fp32: Path, work: Path, ds: EncodedDataset, pad: int,
                threads: int | None) -> tuple[Path, str]:
    shape = _attention_shape(model)
    if shape is None:
        return fp32, "skipped (heads differ between layers)"
    if model.config.model_type not in ("bert", "slimtune_pruned_bert", "mpnet", "roberta", "distilbert"):
        return fp32, f"skipped (no fusion rules for {model.config.model_type})"
    from onnxruntime.transformers.optimizer import optimize_model

    fused = work / "fused.onnx"
    optimize_model(str(fp32), model_type="bert", num_heads=shape[0], hidden_size=shape[1]).save_model_to_file(
        str(fused))
    if _max_abs_diff(model, OnnxClassifier(fused), ds, pad) > FP32_TOLERANCE:
        return fp32, "rejected (fused graph outside the parity tolerance)"
    plain_ms, fused_ms = _speed(fp32, ds, pad, threads), _speed(fused, ds, pad, threads)
    if fused_ms < plain_ms:
        return fused, f"kept ({plain_ms / fused_ms:.2f}x faster on the sample)"
    return fp32, f"dropped (fused {fused_ms:.0f} ms vs {plain_ms:.0f} ms unfused on the sample)"


def _static_reshapes(model: nn.Module, graph: Path, dest: Path, ds: EncodedDataset, pad: int) -> tuple[Path, int]:
    """`graph` with constant reshape targets (see slimtune.onnx_graph), kept if its logits still match."""
    g = onnx_graph.load(graph)
    n = onnx_graph.static_reshapes_(g)
    if not n:
        return graph, 0
    onnx_graph.save(g, dest)
    if _max_abs_diff(model, OnnxClassifier(dest), ds, pad) > FP32_TOLERANCE:
        return graph, 0
    return dest, n


def _sample_batches(ds: EncodedDataset, pad: int, n_batches: int) -> list[dict]:
    order = batch_indices(ds.lengths, 16, shuffle=True, seed=0)[:n_batches]
    if not order:
        raise SlimtuneError("--quantize static: the calibration sample is empty")
    return [collate(ds, idx, pad, with_labels=False) for idx in order]
