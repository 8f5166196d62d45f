"""Does EDA augmentation help in the low-data regime? An honest A/B on SST-2 with MiniLM.

For each seed, three runs on the same stratified sample of `--train-limit` training rows:

  baseline     no augmentation, E epochs
  augmented    `--copies` EDA copies per example, the same E epochs. Each epoch therefore sees
               (1 + copies)x more examples, i.e. (1 + copies)x more optimizer steps and compute.
  baseline-Nx  no augmentation, (1 + copies) * E epochs: the same number of steps as `augmented`,
               so a gain of `augmented` over it cannot be explained by extra training alone.

Every run keeps its final weights (keep_best off): picking the best epoch on the dev set we report
would flatter the runs that evaluate more often. Prints a markdown table with mean ± std.

    .venv/bin/python bench/augment_lowdata.py --seeds 0 1 2 --out-md bench/results/augment_lowdata.md
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

SST2 = Path("/work/shared/data/sst2")
COLUMNS = ("baseline", "augmented", "baseline-Nx")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=Path, default=SST2 / "train.jsonl", help="training JSONL")
    parser.add_argument("--dev", type=Path, default=SST2 / "dev.jsonl", help="evaluation JSONL")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--train-limit", type=int, default=200, help="training rows per run (stratified)")
    parser.add_argument("--epochs", type=float, default=5, help="epochs of the baseline and augmented runs")
    parser.add_argument("--copies", type=int, default=4, help="augmented copies per training example")
    parser.add_argument("--no-long-baseline", action="store_true", help="skip the compute-matched baseline")
    parser.add_argument("--runs-dir", type=Path, default=None, help="keep run directories here (default: temp)")
    parser.add_argument("--out-md", type=Path, default=None, help="also write the markdown table here")
    return parser.parse_args(argv)


def make_recipe(args: argparse.Namespace, seed: int, augment: bool, epochs: float) -> dict:
    return {
        "task": "text-classification",
        "model": "minilm",
        "data": {"train": str(args.train), "eval": str(args.dev), "train_limit": args.train_limit,
                 "split_seed": seed, "max_length": 64,
                 "augment": {"copies": args.copies, "seed": seed} if augment else None},
        "stages": [{"stage": "finetune", "method": "full", "epochs": epochs, "lr": 5e-5, "batch_size": 16,
                    "seed": seed, "keep_best": False},
                   {"stage": "evaluate", "speed": False}],
    }


def run_seed(args: argparse.Namespace, seed: int, runs_dir: Path) -> dict[str, float]:
    import slimtune

    variants = {"baseline": (False, args.epochs), "augmented": (True, args.epochs)}
    if not args.no_long_baseline:
        variants["baseline-Nx"] = (False, args.epochs * (1 + args.copies))
    accuracy = {}
    for name, (augment, epochs) in variants.items():
        metrics = slimtune.run(make_recipe(args, seed, augment, epochs), out=runs_dir / f"seed{seed}-{name}",
                               overwrite=True)
        accuracy[name] = metrics["final"]["accuracy"]
        print(f"seed {seed} {name}: accuracy {accuracy[name]:.4f}", flush=True)
    return accuracy


def _mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ± {std:.4f}"


def markdown_table(results: dict[int, dict[str, float]], args: argparse.Namespace) -> str:
    long = f"no aug, {args.epochs * (1 + args.copies):g} ep"
    headers = ["seed", f"no aug, {args.epochs:g} ep", f"aug x{args.copies}, {args.epochs:g} ep", "Δ aug − no aug"]
    if not args.no_long_baseline:
        headers += [long, f"Δ aug − ({long})"]
    rows = {seed: _row_values(acc) for seed, acc in results.items()}
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += [f"| {seed} | " + " | ".join(f"{v:+.4f}" if "Δ" in h else f"{v:.4f}"
                                         for h, v in zip(headers[1:], values, strict=True)) + " |"
              for seed, values in rows.items()]
    columns = list(zip(*rows.values(), strict=True))
    lines.append("| mean ± std | " + " | ".join(_mean_std(list(c)) for c in columns) + " |")
    return "\n".join(lines)


def _row_values(acc: dict[str, float]) -> list[float]:
    values = [acc["baseline"], acc["augmented"], acc["augmented"] - acc["baseline"]]
    if "baseline-Nx" in acc:
        values += [acc["baseline-Nx"], acc["augmented"] - acc["baseline-Nx"]]
    return values


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="augment-lowdata-") as tmp:
        runs_dir = args.runs_dir or Path(tmp)
        results = {seed: run_seed(args, seed, runs_dir) for seed in args.seeds}
    table = markdown_table(results, args)
    print(f"\nSST-2, MiniLM, {args.train_limit} training rows, dev = {args.dev}\n\n{table}")
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
