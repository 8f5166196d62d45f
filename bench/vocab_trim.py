"""Vocabulary trimming (`stage: vocabulary`) on the int8 MiniLM that `slimtune search` ships: what it saves on
disk, what it costs in accuracy, on SST-2 and on TREC.

    python bench/vocab_trim.py [--runs runs/vocab] [--datasets sst2 trec] [--teacher-mb 438.7]

Per dataset, one MiniLM fine-tune (the search recipe's first stage: full, 3 epochs, lr 5e-5, max_length 64)
on its train file, then from that model, each on the same train file:
  int8               static int8 (the search's settings), shipped as the ONNX Runtime int8 graph
  trim + int8        vocabulary trimmed to the train split's tokens, then the same static int8
  trim+Nk + int8     the same, also keeping the pieces of the N most frequent English words (wordfreq; N = 5k,
                     10k = the stage's default, 20k, 30k)
Each run carves its own 10% selection rows from train; the trim keeps only the train split's tokens, so the
eval file (SST-2 dev, TREC test) holds words the trimmed model has to split into other pieces: the
accuracy column says what that costs. Everything is measured side by side in one process.

The size ratio is against the MPNet teacher's directory (`--teacher-mb`, default 438.7 MB: the fine-tuned
all-mpnet-base-v2 of bench/recipes/teacher_mpnet_sst2.yaml, measured by compare_peers.py and trec_chosen.py;
its size does not depend on the data it was trained on), the bar issue 17 sets at 20x.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import HERE, add_common_args, machine_line, measure, report, run_once

DATA = HERE.parents[1] / "shared" / "data"
FILES = {"sst2": (DATA / "sst2" / "train.jsonl", DATA / "sst2" / "dev.jsonl", "SST-2 dev (872)"),
         "trec": (DATA / "trec" / "train.jsonl", DATA / "trec" / "test.jsonl", "TREC test (500)")}
FINETUNE = {"stage": "finetune", "method": "full", "epochs": 3, "lr": 5e-5, "batch_size": 32, "seed": 42}
INT8 = {"stage": "quantize", "method": "static_int8", "calibration_batches": 8, "calibration_batch_size": 16}
BRANCHES = {"int8": [INT8], "trim + int8": [{"stage": "vocabulary", "extra_words": 0}, INT8],
            **{f"trim+{n // 1000}k + int8": [{"stage": "vocabulary", "extra_words": n}, INT8]
               for n in (5000, 10000, 20000, 30000)}}


def slug(name: str) -> str:
    return name.replace(" + ", "_").replace("+", "_").replace(" ", "_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/vocab"))
    ap.add_argument("--datasets", nargs="+", choices=sorted(FILES), default=["sst2", "trec"])
    ap.add_argument("--teacher-mb", type=float, default=438.7, help="the teacher's size on disk (MB)")
    add_common_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    lines, checks, all_rows = [], [], {}
    for ds in args.datasets:
        train, evaluate, what = FILES[ds]
        data = {"train": str(train), "eval": str(evaluate), "max_length": 64}
        evaluated = {"stage": "evaluate", "speed": False}
        minilm = run_once({"model": "minilm", "data": data, "stages": [FINETUNE, evaluated]},
                          args.runs / ds / "minilm") / "model"
        runs = {name: run_once({"model": str(minilm.resolve()), "data": data, "stages": [*stages, evaluated]},
                               args.runs / ds / slug(name))
                for name, stages in BRANCHES.items()}
        if args.train_only:
            continue
        models = {"MiniLM fine-tuned fp32 (torch)": minilm, **{name: run / "onnx" for name, run in runs.items()}}
        rows = measure(models, args.threads, args.rounds, eval_file=evaluate)
        for name, run in runs.items():
            stage = next((s for s in json.loads((run / "metrics.json").read_text())["stages"]
                          if s["stage"] == "vocabulary"), None)
            rows[name]["vocab"] = stage["vocab_after"] if stage else 30522
            rows[name]["eval_texts_resplit"] = stage["eval_texts_resplit"] if stage else 0.0
        rows["MiniLM fine-tuned fp32 (torch)"] |= {"vocab": 30522, "eval_texts_resplit": 0.0}
        all_rows[ds] = rows
        lines += [f"### {ds}", "", machine_line(args.threads, args.rounds, f"{what}, max_length 64"), "",
                  "| model | vocabulary | eval texts re-split | accuracy | size MB | ms b=1 | ex/s b=32 | runtime "
                  "| x smaller than the teacher |", "| --- " * 9 + "|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['vocab']:,} | {r['eval_texts_resplit']:.1%} | {r['accuracy']:.4f} | "
                         f"{r['size_mb']:.1f} | {r['latency_ms_b1']:.2f} | {r['throughput_eps']:.0f} | "
                         f"{r['runtime']} | "
                         f"{args.teacher_mb / r['size_mb']:.1f}x |")
        lines.append("")
        base, trimmed = rows["int8"], rows["trim + int8"]
        checks.append(f"{ds}: trimming takes the int8 graph from {base['size_mb']:.1f} to {trimmed['size_mb']:.1f} MB "
                      f"({args.teacher_mb / trimmed['size_mb']:.1f}x smaller than the {args.teacher_mb:g} MB teacher; "
                      f"bar 20x) at {100 * (trimmed['accuracy'] - base['accuracy']):+.1f} pt accuracy")
    if not args.train_only:
        report(lines, checks, all_rows, args.out_md, args.out_json)


if __name__ == "__main__":
    main()
