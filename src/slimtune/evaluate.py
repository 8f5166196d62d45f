"""Evaluation: classification metrics (scikit-learn), confusion matrix, size and CPU speed.

Speed is measured the way a deployment sees it: batch-1 latency on single real examples
(median of many runs after warm-up), and batch-32 throughput over real batches in dataset order
(not length-sorted), with the thread count and CPU recorded next to the numbers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from torch import nn

from slimtune.batching import EncodedDataset, batch_indices, collate, logits_of, model_inputs
from slimtune.distributed import device_of, eval_rows, gather_rows, to_device
from slimtune.io import atomic_write_text


@torch.inference_mode()
def predict_logits(model: nn.Module, ds: EncodedDataset, batch_size: int = 64, pad_id: int = 0) -> np.ndarray:
    """Logits for every example, in the dataset's order (batches are length-sorted for speed), computed on
    the model's device. Under torchrun each rank computes its shard and every rank gets all the rows."""
    was_training = model.training
    model.eval()
    device = device_of(model)
    shard = eval_rows(len(ds), pad=True)

    def forward(batch):
        return logits_of(model(**to_device(model_inputs(batch), device))).float().cpu().numpy()

    try:
        if shard is None:
            return batched_logits(forward, ds, batch_size, pad_id)
        return gather_rows(batched_logits(forward, ds.subset(shard), batch_size, pad_id), len(ds))
    finally:
        model.train(was_training)


def batched_logits(forward: Callable[[dict], np.ndarray], ds: EncodedDataset, batch_size: int = 64,
                   pad_id: int = 0) -> np.ndarray:
    """`forward(collated batch) -> logits` over length-sorted batches, returned in the dataset's order
    (any runtime: torch above, ONNX Runtime in slimtune.export)."""
    out: np.ndarray | None = None
    for idx in batch_indices(ds.lengths, batch_size, shuffle=False, bucket=True):
        logits = forward(collate(ds, idx, pad_id, with_labels=False))
        if out is None:
            out = np.zeros((len(ds), logits.shape[-1]), dtype=np.float32)
        out[idx] = logits
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def classification_metrics(y_true, y_pred, id2label: dict[int, str]) -> dict:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, precision_recall_fscore_support

    labels = sorted(id2label)
    names = [id2label[i] for i in labels]
    out: dict = {"accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("macro", "micro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out |= {f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)}
    report = classification_report(y_true, y_pred, labels=labels, target_names=names, output_dict=True,
                                   zero_division=0)
    out["per_class"] = {name: {k: float(v) for k, v in report[name].items()} for name in names}
    cm = confusion_matrix(y_true, y_pred, labels=labels)
    out["confusion_matrix"] = {"labels": names, "matrix": cm.tolist()}
    return out


def save_confusion_matrix(cm: dict, out_dir: Path) -> None:
    """confusion_matrix.json and an annotated confusion_matrix.png (rows: true, columns: predicted)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    atomic_write_text(out_dir / "confusion_matrix.json", json.dumps(cm, indent=1))
    matrix, names = np.array(cm["matrix"]), cm["labels"]
    size = max(3.5, 0.6 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(names)), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix")
    top = matrix.max() if matrix.size else 0
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fig.canvas.draw()
    if any("missing from font" in str(w.message) for w in caught):
        # e.g. Chinese label names without a CJK font: numbered ticks beat rows of empty boxes
        ax.set_xticks(range(len(names)), labels=[str(i) for i in range(len(names))], rotation=0, ha="center")
        ax.set_yticks(range(len(names)), labels=[str(i) for i in range(len(names))])
        ax.set_title("Confusion matrix (class ids as in config.json)")
    fig.tight_layout()
    tmp = out_dir / ".confusion_matrix.tmp.png"
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out_dir / "confusion_matrix.png")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(all, trainable); `parameters()` already yields tied/shared parameters once. The integer codes of
    quantized layers are buffers, not parameters, but they are the layer's weights: they count."""
    params = list(model.parameters())
    codes = sum(b.numel() for name, b in model.named_buffers() if name.endswith("qweight"))
    return sum(p.numel() for p in params) + codes, sum(p.numel() for p in params if p.requires_grad)


def dir_size_mb(path: Path) -> float:
    """Bytes of all files under `path`, in MB (10^6 bytes)."""
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 3)


def tensors_size_mb(model: nn.Module) -> float:
    """In-memory size of the state dict (the size a model directory would have, minus tokenizer); a tensor
    shared by two names (a language-model head tied to the embeddings) counts once, as it is saved once."""
    unique = {(t.untyped_storage().data_ptr(), t.storage_offset(), t.shape): t for t in model.state_dict().values()}
    return round(sum(t.numel() * t.element_size() for t in unique.values()) / 1e6, 3)


def torch_runtime(model: nn.Module) -> str:
    """What a torch speed figure of `model` measures: plain fp32, real packed weight kernels, or a float
    simulation of integer arithmetic (whose speed says nothing about the int8 artifact that ships)."""
    if isinstance(getattr(model, "runtime", None), str):  # an exported graph (slimtune.graph_model) names its own
        return model.runtime
    spec = getattr(getattr(model, "config", None), "slimtune_quantization", None) or {}
    layers = spec.get("layers") or {}
    if not layers:
        config = getattr(model, "config", None)  # a word student's vector table and LSTM kernels
        table, lstm = getattr(config, "table", "float32"), getattr(config, "lstm", "float32")
        parts = []
        if table != "float32":
            parts.append(f"{table} word table")
        if lstm == "int8":
            parts.append("int8 LSTM kernels")
        return f"torch fp32 ({', '.join(parts)})" if parts else "torch fp32"
    kernels = {getattr(m, "kernel", None) for m in model.modules()} - {None}
    if kernels and kernels <= {"int8_pack", "int4_pack"}:
        return f"torch ({'/'.join(sorted(k.split('_')[0] for k in kernels))} packed weight kernels)"
    if kernels & {"int8_pack", "int4_pack"}:
        return "torch (packed weight kernels on some layers, dequantized float elsewhere)"
    return f"torch (float simulation of {spec.get('method') or 'quantized'} layers)"


def machine_description() -> dict:
    """What every speed figure depends on: the CPU and its flags, cores, threads, library versions."""
    libraries = {}
    for name in ("slimtune", "torch", "transformers", "onnxruntime", "numpy", "peft"):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            continue
    return {"cpu": cpu_description(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "libraries": libraries}


def cpu_description() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")),
                "unknown")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    # the flags speed depends on: int8 dot products (VNNI), bf16 math (what the packed int4/int8
    # weight kernels multiply in) and AMX tiles where present
    simd = [f for f in ("amx_int8", "amx_bf16", "avx512_bf16", "avx512_vnni", "avx512f", "avx2") if f in flags]
    return f"{name} ({', '.join(simd) or 'no avx2'})"


@torch.inference_mode()
def measure_speed(model: nn.Module, ds: EncodedDataset, pad_id: int = 0, latency_runs: int = 50,
                  throughput_batches: int = 10, batch_size: int = 32, threads: int | None = None,
                  warmup: int = 5) -> dict:
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    device = device_of(model)

    def forward(inputs):
        out = model(**inputs)
        if device.type == "cuda":  # kernels run asynchronously: time them to their end
            torch.cuda.synchronize(device)
        return out

    try:
        speed = time_forward(forward, ds, pad_id, latency_runs, throughput_batches, batch_size, warmup,
                             prepare=lambda batch: to_device(model_inputs(batch), device))
        return speed | {"threads": torch.get_num_threads(), "cpu": cpu_description(), "runtime": torch_runtime(model)}
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)


@torch.inference_mode()
def measure_generation_speed(model: nn.Module, prompt: list[int], new_tokens: int = 32, runs: int = 3,
                             threads: int | None = None) -> dict:
    """A causal LM's batch-1 speed: prefill tokens/s (the whole `prompt` in one forward) and decode
    tokens/s (one token per forward with the KV cache, greedy), each the median of `runs` after a warm-up."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    was_training = model.training
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long, device=device_of(model))
    try:
        prefill, decode = [], []
        for run in range(runs + 1):  # the first run warms up
            t0 = time.perf_counter()
            out = model(input_ids=ids, use_cache=True)
            t1 = time.perf_counter()
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            for _ in range(new_tokens):
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t2 = time.perf_counter()
            if run:
                prefill.append(len(prompt) / (t1 - t0))
                decode.append(new_tokens / (t2 - t1))
        return {"prefill_tokens_per_s": round(statistics.median(prefill), 1),
                "decode_tokens_per_s": round(statistics.median(decode), 2), "prompt_tokens": len(prompt),
                "threads": torch.get_num_threads(), "cpu": cpu_description(), "runtime": torch_runtime(model)}
    finally:
        torch.set_num_threads(previous)
        model.train(was_training)


def time_forward(forward: Callable, ds: EncodedDataset, pad_id: int = 0, latency_runs: int = 50,
                 throughput_batches: int = 10, batch_size: int = 32, warmup: int = 5,
                 prepare: Callable[[dict], object] = lambda batch: batch) -> dict:
    """The speed protocol of every runtime: median batch-1 latency over `latency_runs` single examples
    and batch-32 throughput over `throughput_batches` batches in dataset order, after warm-up.
    `prepare` turns a collated batch into `forward`'s input outside the timed region."""
    n = len(ds)
    singles = [prepare(collate(ds, [i % n], pad_id, with_labels=False)) for i in range(latency_runs)]
    for batch in singles[:warmup]:
        forward(batch)
    times = []
    for batch in singles:
        t0 = time.perf_counter()
        forward(batch)
        times.append((time.perf_counter() - t0) * 1000)
    batches = [prepare(collate(ds, [(b * batch_size + k) % n for k in range(batch_size)], pad_id,
                               with_labels=False)) for b in range(throughput_batches)]
    for batch in batches[: max(1, warmup // 3)]:
        forward(batch)
    t0 = time.perf_counter()
    for batch in batches:
        forward(batch)
    elapsed = time.perf_counter() - t0
    return {"latency_ms_b1": round(statistics.median(times), 3),
            "latency_ms_b1_p90": round(float(np.percentile(times, 90)), 3),
            "throughput_eps": round(throughput_batches * batch_size / elapsed, 2)}


# two-line headers on purpose: every column of the final table fits an 80-column terminal whole
HEADERS = {"accuracy": "accuracy", "f1_macro": "F1\nmacro", "perplexity": "perplex-\nity",
           "prefill_tokens_per_s": "prefill\ntok/s", "decode_tokens_per_s": "decode\ntok/s",
           "params": "params\n(M)",
           "trainable_params": "trained\n(M)", "size_mb": "size\nMB", "latency_ms_b1": "ms\nb=1",
           "throughput_eps": "ex/s\nb=32"}


def format_metrics_table(rows: dict[str, dict], keys: list[str]):
    """A compact rich table, one row per named result: numbers are never cut (the names column wraps
    instead), so it reads whole in an 80-column terminal."""
    from rich.table import Table

    table = Table()
    table.add_column("model", ratio=1, overflow="fold")
    for k in keys:
        header = HEADERS.get(k, k.replace("_", "\n", 1))
        table.add_column(header, justify="right", no_wrap=True,
                         min_width=max(len(line) for line in header.splitlines()))
    for name, row in rows.items():
        table.add_row(name, *[_cell(k, row.get(k)) for k in keys])
    return table


def _cell(key: str, value) -> str:
    if value is None:
        return "—"
    if key in ("params", "trainable_params"):
        return f"{value / 1e6:.2f}"
    if key == "accuracy" or key.startswith(("f1", "precision", "recall")):
        return f"{value:.4f}"
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)
