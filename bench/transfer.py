"""Transfer learning: does a TREC classifier learn faster from an SST-2-fine-tuned MiniLM than from the base one?

What it measures: transfer of the *encoder* across tasks, at equal optimizer steps. There is no second
sentiment set on disk (../shared/data/README.md), so the target is a different task: TREC coarse question
type (6 classes, ../shared/data/trec, `label_name`: ABBR, DESC, ENTY, HUM, LOC, NUM) with few training rows.
The SST-2 model was trained for other labels, so the runner gives it a new head (it says so in a note) and
only its encoder carries over; the base MiniLM gets a new head too. A gain says SST-2 fine-tuning left the
encoder more useful for a small classification task; a loss says it specialised it away (negative transfer).

For each training size (default 100 / 300 / 1000 TREC train rows, a stratified sample per seed), each step
budget (default 50 / 100 / 200 optimizer steps) and each seed, two runs differ only in `model:`: the base
MiniLM and the SST-2 one. Same recipe otherwise: full fine-tune, lr, batch, warmup and linear decay over the
budget, seed; `keep_best` off, so nothing is chosen on the reported split. Each run's train file holds its
sample repeated until one epoch covers the budget (epochs: 1, max_steps: budget), so a budget is one
schedule with one evaluation and no per-epoch checkpoints, in both arms alike. Reported: accuracy and macro
F1 on TREC test (500 rows), mean ± std over seeds, and the difference SST-2 minus base.

    .venv/bin/python bench/transfer.py                     # fine-tunes the SST-2 source first (1 epoch, ~220 steps)
    .venv/bin/python bench/transfer.py --source RUN/model --seeds 0 1 2 --out-md bench/results/transfer.md
    .venv/bin/python bench/transfer.py --smoke             # tiny settings: checks that it runs (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "data"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=None, help="an SST-2-fine-tuned MiniLM (default: fine-tune one "
                    "into RUNS_DIR/sst2-source, reused when it finished)")
    ap.add_argument("--base", default="minilm", help="the base model (alias or directory)")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 300, 1000], help="TREC training rows")
    ap.add_argument("--steps", type=int, nargs="+", default=[50, 100, 200], help="optimizer step budgets")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--eval-limit", type=int, default=None, help="score only N TREC test rows (stratified)")
    ap.add_argument("--source-max-steps", type=int, default=None, help="cap the SST-2 fine-tune (default: 1 epoch)")
    ap.add_argument("--runs-dir", type=Path, default=None, help="keep run directories here (default: a temp dir)")
    ap.add_argument("--out-md", type=Path, default=None, help="also write the markdown table here")
    ap.add_argument("--out-json", type=Path, default=None, help="also write every run's figures here")
    ap.add_argument("--smoke", action="store_true", help="tiny settings (40 rows, 3 steps, 100 eval rows)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.sizes, args.steps, args.seeds, args.max_length = [40], [3], [0], 32
        args.eval_limit, args.source_max_steps = args.eval_limit or 100, args.source_max_steps or 3
    return args


QUIET = {"report": {"start": False, "stages": False, "speed": False}}


def sst2_source(args: argparse.Namespace, runs_dir: Path) -> str:
    """The SST-2 MiniLM: --source, else `model: minilm` fine-tuned 1 epoch on SST-2 train (reused if finished)."""
    if args.source is not None:
        return str(args.source)
    import slimtune

    out = runs_dir / "sst2-source"
    if not (out / "metrics.json").is_file():
        sst2 = DATA / "sst2"
        print(f"fine-tuning the SST-2 source -> {out}", flush=True)
        slimtune.run({"model": args.base,
                      "data": {"train": str(sst2 / "train.jsonl"), "eval": str(sst2 / "dev.jsonl"),
                               "label_names": {0: "negative", 1: "positive"}, "max_length": 64},
                      "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 5e-5, "batch_size": 32,
                                  **({"max_steps": args.source_max_steps} if args.source_max_steps else {})}], **QUIET},
                     out, overwrite=True, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    print(f"SST-2 source: dev accuracy {metrics['final']['accuracy']:.4f} ({out / 'model'})", flush=True)
    return str(out / "model")


def trec_rows(split: str) -> list[dict]:
    return [json.loads(line) for line in (DATA / "trec" / f"{split}.jsonl").read_text().splitlines() if line.strip()]


def write_train(rows: list[dict], size: int, steps: int, batch_size: int, seed: int, path: Path) -> Path:
    """A stratified sample of `size` rows, repeated (each copy reshuffled) until one epoch has `steps` batches."""
    from slimtune.data import stratified_sample

    sample = [rows[i] for i in stratified_sample([r["label_name"] for r in rows], size, seed)]
    rng, out = random.Random(seed), []
    for _ in range(math.ceil(steps * batch_size / len(sample))):
        copy = list(sample)
        rng.shuffle(copy)
        out += copy
    path.write_text("".join(json.dumps({"text": r["text"], "label": r["label_name"]}) + "\n" for r in out))
    return path


def one_run(model: str, train: Path, test: Path, steps: int, args: argparse.Namespace, seed: int, out: Path) -> dict:
    import slimtune

    metrics = slimtune.run({"model": model,
                            "data": {"train": str(train), "eval": str(test), "max_length": args.max_length,
                                     "select_fraction": 0},
                            "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "max_steps": steps,
                                        "lr": args.lr, "batch_size": args.batch_size, "seed": seed,
                                        "keep_best": False, "bucket_by_length": False}], **QUIET},
                           out, overwrite=True, progress=False)
    return {"accuracy": metrics["final"]["accuracy"], "f1_macro": metrics["final"]["f1_macro"]}


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="transfer-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        runs_dir.mkdir(parents=True, exist_ok=True)
        starts = {"base": args.base, "sst2": sst2_source(args, runs_dir)}
        test_rows = trec_rows("test")
        if args.eval_limit:
            from slimtune.data import stratified_sample

            test_rows = [test_rows[i] for i in stratified_sample([r["label_name"] for r in test_rows],
                                                                 args.eval_limit, 0)]
        test = runs_dir / "trec-test.jsonl"
        test.write_text("".join(json.dumps({"text": r["text"], "label": r["label_name"]}) + "\n" for r in test_rows))
        train_rows, results = trec_rows("train"), []
        for size in args.sizes:
            for steps in args.steps:
                for seed in args.seeds:
                    train = write_train(train_rows, size, steps, args.batch_size, seed,
                                        runs_dir / f"trec-{size}-{steps}-{seed}.jsonl")
                    row = {"rows": size, "steps": steps, "seed": seed}
                    for name, model in starts.items():
                        row[name] = one_run(model, train, test, steps, args, seed,
                                            runs_dir / f"{name}-{size}-{steps}-s{seed}")
                    print(json.dumps(row), flush=True)
                    results.append(row)
    table = markdown(results, args, len(test_rows))
    print(table)
    if args.out_md:
        args.out_md.write_text(table)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=2))
    return results


def _stat(values: list[float], sign: str = "") -> str:
    mean = 100 * statistics.mean(values)
    return f"{mean:{sign}.1f}" + (f" ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else "")


def markdown(results: list[dict], args: argparse.Namespace, test_rows: int) -> str:
    lines = [f"TREC coarse (6 classes), {test_rows} test rows; accuracy / macro F1 in %, mean ± std over "
             f"{len(args.seeds)} seed(s); lr {args.lr:g}, batch {args.batch_size}, full fine-tune", "",
             "| train rows | steps | base MiniLM acc | SST-2 MiniLM acc | Δ acc (pt) | base F1 | SST-2 F1 "
             "| Δ F1 (pt) |",
             "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for size in args.sizes:
        for steps in args.steps:
            group = [r for r in results if r["rows"] == size and r["steps"] == steps]
            cells = []
            for key in ("accuracy", "f1_macro"):
                base, sst2 = [r["base"][key] for r in group], [r["sst2"][key] for r in group]
                cells += [_stat(base), _stat(sst2), _stat([s - b for s, b in zip(sst2, base, strict=True)], "+")]
            lines.append(f"| {size} | {steps} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
