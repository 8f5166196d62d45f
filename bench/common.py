"""What the benchmark scripts share: the SST-2 files and the side-by-side speed measurement."""

from __future__ import annotations

import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = HERE.parents[1] / "shared" / "data" / "sst2"
BUNDLED = HERE.parent / "src" / "slimtune" / "demo_data"


def data_file(split: str) -> str:
    """SST-2 from ../shared when present, else the copy bundled for the demo."""
    shared = SHARED / f"{split}.jsonl"
    return str(shared if shared.is_file() else BUNDLED / f"{split}.jsonl")


def measure(models: dict[str, Path], threads: int, rounds: int) -> dict[str, dict]:
    """Dev accuracy, params, size on disk, and median batch-1 latency / batch-32 throughput over
    `rounds` rounds interleaved across the models (so drifts of the machine hit every model alike)."""
    from slimtune.evaluate import classification_metrics, count_parameters, dir_size_mb, measure_speed, predict_logits
    from slimtune.models import load_model, load_tokenizer
    from slimtune.runner import eval_dataset_for

    loaded, rows = {}, {}
    for name, path in models.items():
        model, tok = load_model(path), load_tokenizer(path)
        label2id = {str(k): int(v) for k, v in model.config.label2id.items()}
        ds = eval_dataset_for(path, Path(data_file("dev")), tok, label2id, "text", "label")
        pad = int(tok.pad_token_id or 0)
        pred = predict_logits(model, ds, pad_id=pad).argmax(-1)
        id2label = {int(k): str(v) for k, v in model.config.id2label.items()}
        acc = classification_metrics(ds.labels, pred.tolist(), id2label)["accuracy"]
        loaded[name] = (model, ds, pad)
        rows[name] = {"accuracy": acc, "params": count_parameters(model)[0], "size_mb": dir_size_mb(path),
                      "lat": [], "eps": []}
    for _ in range(rounds):
        for name, (model, ds, pad) in loaded.items():
            speed = measure_speed(model, ds, pad_id=pad, threads=threads, latency_runs=60, throughput_batches=12)
            rows[name]["lat"].append(speed["latency_ms_b1"])
            rows[name]["eps"].append(speed["throughput_eps"])
    for row in rows.values():
        row["latency_ms_b1"] = statistics.median(row.pop("lat"))
        row["throughput_eps"] = statistics.median(row.pop("eps"))
    return rows


def report(lines: list[str], checks: list[str], rows: dict, out_md: Path | None, out_json: Path | None) -> None:
    """Print the table and the target checks; also write them (markdown) and the raw rows (JSON)."""
    import json

    table = "\n".join(lines + [""] + [f"- {c}" for c in checks])
    print(table)
    if out_md:
        out_md.write_text(table + "\n")
    if out_json:
        out_json.write_text(json.dumps(rows, indent=1))
