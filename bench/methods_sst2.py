"""SST-2 dev accuracy of each adaptation method on the bundled MiniLM, with trainable-parameter %.

    python bench/methods_sst2.py [--methods full lora] [--train-limit N] [--out-md docs/methods.md]

Each method runs the real pipeline (`slimtune.run`) on the full SST-2 train split (6,920
sentences) and reports dev accuracy (872 sentences; the split is never used for anything but the
per-epoch model selection `keep_best` does, which every method gets alike).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from common import data_file

import slimtune

# Settings per method: the lr each method needs differs by orders of magnitude (a new head or LoRA
# factors start from zero/random and need a large lr; pretrained weights need a small one).
METHODS = {
    "full": {"method": "full", "epochs": 2, "lr": 5e-5},
    "freeze": {"method": "freeze", "freeze_layers": 3, "epochs": 2, "lr": 1e-4},
    "head": {"method": "head", "epochs": 2, "lr": 2e-3},
    "lora": {"method": "lora", "epochs": 2, "lr": 2e-3, "lora": {"r": 8, "alpha": 16}},
    "iterative": {"method": "iterative", "lr": 1e-4,
                  "iterative": {"group_size": 2, "max_epochs_per_phase": 1, "lr_decay": 0.5}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--train-limit", type=int, default=None)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()

    rows = []
    for name in args.methods:
        recipe = {"model": "minilm",
                  "data": {"train": data_file("train"), "eval": data_file("dev"), "max_length": 64,
                           "train_limit": args.train_limit},
                  "stages": [{"stage": "finetune", "batch_size": 32, "seed": 42, **METHODS[name]},
                             {"stage": "evaluate", "speed": False}]}
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            m = slimtune.run(recipe, Path(tmp) / name, progress=False)
            wall = time.perf_counter() - t0
        stage, final = m["stages"][0], m["final"]
        rows.append({"method": name, "accuracy": final["accuracy"], "f1_macro": final["f1_macro"],
                     "trainable_params": final["trainable_params"], "trainable_pct": stage["trainable_pct"],
                     "epochs": stage.get("epochs_run") or sum(p["epochs_run"] for p in stage.get("phases", [])),
                     "train_ex_s": stage.get("examples_per_s") or _mean_eps(stage), "wall_s": round(wall),
                     "settings": METHODS[name]})
        print(json.dumps(rows[-1]), flush=True)

    lines = ["| method | SST-2 dev accuracy | F1 macro | trainable params | trainable % | epochs "
             "| train ex/s | wall s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['accuracy']:.4f} | {r['f1_macro']:.4f} | {r['trainable_params']:,} "
                     f"| {r['trainable_pct']:.2f} | {r['epochs']} | {r['train_ex_s']:.1f} | {r['wall_s']} |")
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    if args.out_json:
        args.out_json.write_text(json.dumps(rows, indent=1))


def _mean_eps(stage: dict) -> float:
    phases = stage.get("phases", [])
    seen = sum(p["examples_seen"] for p in phases)
    secs = sum(p["train_seconds"] for p in phases)
    return seen / secs if secs else 0.0


if __name__ == "__main__":
    main()
