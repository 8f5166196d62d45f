"""What the benchmark scripts share: the SST-2 files and the side-by-side speed measurement."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "sst2"
BUNDLED = HERE.parent / "src" / "slimtune" / "demo_data"


def data_file(split: str) -> str:
    """SST-2 from ../shared when present, else the copy bundled for the demo."""
    shared = SHARED / f"{split}.jsonl"
    return str(shared if shared.is_file() else BUNDLED / f"{split}.jsonl")


def add_common_args(ap) -> None:
    """The options every side-by-side bench takes."""
    import os

    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--rounds", type=int, default=3, help="interleaved speed rounds (the median is reported)")
    ap.add_argument("--train-only", action="store_true", help="train missing runs, measure nothing")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)


def run_missing(start: str, runs_dir: Path, runs: dict[str, list[dict]], max_length: int = 64,
                data: dict[str, dict] | None = None) -> None:
    """`slimtune.run` each recipe (its stages + a final accuracy-only evaluate) from model `start` on
    SST-2 into RUNS_DIR/NAME, unless that run already finished (metrics.json exists). `data[NAME]`
    adds fields to that run's data section (e.g. an augmented transfer set)."""
    import slimtune

    for name, stages in runs.items():
        out = runs_dir / name
        if (out / "metrics.json").is_file():
            continue
        recipe = {"model": start, "data": {"train": data_file("train"), "eval": data_file("dev"),
                                           "max_length": max_length, **(data or {}).get(name, {})},
                  "stages": [*stages, {"stage": "evaluate", "speed": False}]}
        print(f"{name} -> {out}", flush=True)
        slimtune.run(recipe, out, overwrite=True, progress=False)


def run_once(recipe: dict, out: Path) -> Path:
    """`slimtune.run` a recipe into OUT unless that run already finished (OUT/metrics.json exists)."""
    import slimtune

    if not (out / "metrics.json").is_file():
        print(f"-> {out}", flush=True)
        slimtune.run(recipe, out, overwrite=True, progress=False)
    return out


def export_onnx_cached(model_dir: Path, out: Path, quantize: str | None = None, optimize: bool = True) -> Path:
    """`slimtune export` of a model dir (reused when OUT/export.json exists); returns OUT."""
    from slimtune.export import export_onnx

    if not (out / "export.json").is_file():
        export_onnx(model_dir, out, quantize=quantize, data=Path(data_file("dev")), optimize=optimize,
                    overwrite=True)
    return out


@dataclass
class InMemory:
    """A torch model that has no directory of its own (e.g. torch.ao dynamic int8, which cannot be
    saved with save_pretrained): measured in place, with the tokenizer/config of `source`."""

    model: object
    source: Path
    size_mb: float


def _load(path, threads: int):
    """(runner, model-or-None, tokenizer, config) for a model dir (torch) or an export dir (ONNX Runtime)."""
    from slimtune.models import load_model, load_tokenizer, read_config

    if isinstance(path, InMemory):
        return path.model, path.model, load_tokenizer(path.source), read_config(path.source)
    tok, config = load_tokenizer(path), read_config(path)
    if (path / "model.onnx").is_file():
        from slimtune.export import OnnxClassifier

        return OnnxClassifier(path / "model.onnx", threads), None, tok, config
    model = load_model(path)
    return model, model, tok, config


def measure(models: dict[str, Path | InMemory], threads: int, rounds: int,
            eval_file: Path | None = None) -> dict[str, dict]:
    """Accuracy on `eval_file` (default SST-2 dev), params, size on disk, and median batch-1 latency /
    batch-32 throughput over `rounds` rounds interleaved across the models (so drifts of the machine hit
    every model alike).
    A directory holding `model.onnx` (a `slimtune export`) runs in ONNX Runtime, any other in torch."""
    from slimtune.data import load_eval_data
    from slimtune.evaluate import (
        classification_metrics,
        count_parameters,
        dir_size_mb,
        measure_speed,
        predict_logits,
        time_forward,
    )
    from slimtune.models import preprocessing_of

    loaded, rows = {}, {}
    for name, entry in models.items():
        runner, model, tok, config = _load(entry, threads)
        path = entry.source if isinstance(entry, InMemory) else Path(entry)
        label2id = {str(k): int(v) for k, v in config["label2id"].items()}
        pre = preprocessing_of(path).model_copy(update={"text_field": "text", "label_field": "label"})
        ds = load_eval_data(Path(eval_file or data_file("dev")), tok, label2id, pre)
        pad = int(tok.pad_token_id or 0)
        logits = predict_logits(model, ds, pad_id=pad) if model is not None else runner.predict_logits(ds, pad)
        id2label = {int(k): str(v) for k, v in config["id2label"].items()}
        acc = classification_metrics(ds.labels, logits.argmax(-1).tolist(), id2label)["accuracy"]
        loaded[name] = (runner, model, ds, pad)
        size = (entry.size_mb if isinstance(entry, InMemory) else
                (path / "model.onnx").stat().st_size / 1e6 if model is None else dir_size_mb(path))
        rows[name] = {"accuracy": acc, "params": count_parameters(model)[0] if model is not None else None,
                      "size_mb": size, "runtime": "torch" if model is not None else "onnxruntime",
                      "lat": [], "eps": []}
    for _ in range(rounds):
        for name, (runner, model, ds, pad) in loaded.items():
            if model is not None:
                speed = measure_speed(model, ds, pad_id=pad, threads=threads, latency_runs=60, throughput_batches=12)
            else:
                speed = time_forward(runner, ds, pad, latency_runs=60, throughput_batches=12)
            rows[name]["lat"].append(speed["latency_ms_b1"])
            rows[name]["eps"].append(speed["throughput_eps"])
    for row in rows.values():
        row["latency_ms_b1"] = statistics.median(row.pop("lat"))
        row["throughput_eps"] = statistics.median(row.pop("eps"))
    return rows


def machine_line(threads: int, rounds: int, what: str) -> str:
    """The line heading every side-by-side table: the CPU and its flags, torch, threads, data, protocol."""
    import torch

    from slimtune.evaluate import cpu_description

    return (f"CPU: {cpu_description()}; torch {torch.__version__}, {threads} threads; {what}; "
            f"speed: median of {rounds} interleaved rounds")


def report(lines: list[str], checks: list[str], rows: dict, out_md: Path | None, out_json: Path | None) -> None:
    """Print the table and the target checks; also write them (markdown) and the raw rows (JSON)."""
    import json

    table = "\n".join(lines + [""] + [f"- {c}" for c in checks])
    print(table)
    if out_md:
        out_md.write_text(table + "\n")
    if out_json:
        out_json.write_text(json.dumps(rows, indent=1))
