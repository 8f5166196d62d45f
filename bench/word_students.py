"""Word-level students as small as they are fast: the BiLSTM's word-vector table stored smaller (int8 with
per-row scales, PCA dimensions, a shorter vocabulary), and the word student's defaults, against the
MPNet teacher, measured side by side in one run.

    python bench/word_students.py --teacher runs/teacher/model [--runs-dir bench/runs/words] [--out-md F]

Every row distils a BiLSTM (256 units per direction) from the fine-tuned MPNet teacher on SST-2 train
(6,920 sentences; the `-2k` rows on its first 2,000) and is scored on SST-2 dev (872):
  bench-fp32       the distillation bench's recipe, every field given: the teacher's layer-6 vector of each
                   word, fixed; train words + the teacher's whole words + the 100,000 most frequent English
                   words (99k words x 768, float32); logit MSE + the pooled middle layer; 8 epochs
  bench-fp16       the same, its table stored in float16
  bench-int8       the same, its table stored in int8 with one scale per row
  pca256-int8      the same, the vectors cut to their 256 principal components first
  defaults         `student: {arch: bilstm}` and nothing else: the measured-best recipe as filled in by
                   slimtune (distill/word_defaults.py), with its phrase-level transfer set (each train
                   sentence plus 10 random contiguous word spans of it, labelled by the teacher; 10 epochs;
                   its LSTM on torch's int8 kernels at inference)
  defaults-float-lstm  the same with a float LSTM (`lstm: float32`): the defaults before the int8 LSTM
  defaults-no-spans  the same without the transfer set (`transfer_augment: null`): the defaults before it
  spans-3-epochs   the transfer set, 3 epochs
  old-defaults     what that line trained before the defaults changed: input-embedding init, a trained
                   table, the texts' words, KL at alpha 0.5, lr 1e-4, 3 epochs
  defaults-2k, defaults-no-spans-2k, old-defaults-2k   the same on 2,000 rows (the small-data case)
  NAME@seedN       row NAME with the distill stage's seed N (the spread over seeds)
then measures every model and the teacher in this process with one thread count (accuracy, size on
disk, batch-1 latency, batch-32 throughput; the speed rounds interleaved, medians reported).
Target (issue 17): a word student <= 20 MB on disk at >= 95% of the teacher's accuracy and >= 20x its
batch-32 throughput.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from common import HERE, add_common_args, machine_line, measure, report, run_missing

from slimtune.config import AugmentConfig

MAX_LEN = 64
BENCH_STUDENT = {"arch": "bilstm", "hidden": 256, "init_embeddings": "contextual", "freeze_embeddings": True,
                 "extend_vocab": True, "extra_words": 100000, "pca_dims": None, "table": "float32"}
BENCH_STAGE = {"soft_loss": "mse", "alpha": 1.0, "intermediate": {"loss": "mse", "mapping": [[1, 6]]},
               "epochs": 8, "lr": 1e-3, "batch_size": 64}
OLD_STUDENT = {"arch": "bilstm", "hidden": 256, "init_embeddings": "input", "freeze_embeddings": False,
               "extend_vocab": False, "extra_words": None, "pca_dims": None, "table": "float32"}
SPANS = AugmentConfig.spans(10).model_dump()  # 10 word spans per sentence, the EDA operations off
OLD_STAGE = {"soft_loss": "kl", "alpha": 0.5, "intermediate": None, "epochs": 3, "lr": 1e-4, "batch_size": 32}


def rows(teacher: str) -> tuple[dict[str, list[dict]], dict[str, dict]]:
    distill = {"stage": "distill", "teacher": teacher, "temperature": 2.0, "seed": 42}
    runs = {
        "bench-fp32": distill | BENCH_STAGE | {"student": BENCH_STUDENT},
        "bench-fp16": distill | BENCH_STAGE | {"student": BENCH_STUDENT | {"table": "float16"}},
        "bench-int8": distill | BENCH_STAGE | {"student": BENCH_STUDENT | {"table": "int8"}},
        "pca256-int8": distill | BENCH_STAGE | {"student": BENCH_STUDENT | {"table": "int8", "pca_dims": 256}},
        "defaults": distill | {"student": {"arch": "bilstm"}},
        "defaults-float-lstm": distill | {"student": {"arch": "bilstm", "lstm": "float32"}},
        # the defaults before the phrase-level transfer set joined them
        "defaults-no-spans": distill | {"student": {"arch": "bilstm"}, "transfer_augment": None},
        "spans-3-epochs": distill | {"student": {"arch": "bilstm"}, "epochs": 3, "transfer_augment": SPANS},
        "old-defaults": distill | OLD_STAGE | {"student": OLD_STUDENT},
    }
    runs |= {"defaults-2k": runs["defaults"], "defaults-no-spans-2k": runs["defaults-no-spans"],
             "old-defaults-2k": runs["old-defaults"]}
    small = {n: {"train_limit": 2000} for n in runs if n.endswith("-2k")}
    return {name: [stage] for name, stage in runs.items()}, small


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the fine-tuned MPNet (bench/recipes/teacher_mpnet_sst2.yaml)")
    ap.add_argument("--runs-dir", type=Path, default=HERE / "runs" / "words")
    ap.add_argument("--rows", default=None, help="comma-separated subset of the rows")
    add_common_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    teacher = str(Path(args.teacher).resolve())
    runs, data = rows(teacher)
    if args.rows:
        wanted = args.rows.split(",")
        for name in wanted:
            # NAME@seedN: row NAME with the distill stage's seed N (initialisation and batch order; the selection
            # split and the transfer set stay, so the teacher's cached labels serve every seed)
            base, _, seed = name.partition("@seed")
            if seed and base in runs:
                runs[name] = [runs[base][0] | {"seed": int(seed)}]
                if base in data:
                    data[name] = data[base]
        runs = {n: runs[n] for n in wanted if n in runs}
    run_missing("minilm", args.runs_dir, runs, MAX_LEN, data)
    if args.train_only:
        return

    import json


    models = {"teacher (MPNet)": Path(teacher)} | {n: args.runs_dir / n / "model" for n in runs}
    measured = measure(models, args.threads, args.rounds)
    t = measured["teacher (MPNet)"]
    lines = [machine_line(args.threads, args.rounds, f"SST-2 dev (872), max_length {MAX_LEN}"), "",
             "| model | train rows | dev accuracy | % of teacher | vocabulary | table | LSTM | size MB | ms (b=1) "
             "| ex/s (b=32) | b=32 vs teacher |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    checks = []
    for name, r in measured.items():
        stage = {}
        if name in runs:
            metrics = json.loads((args.runs_dir / name / "metrics.json").read_text())
            stage = metrics["stages"][0]
            vocab = len(json.loads((args.runs_dir / name / "model" / "word_vocab.json").read_text())["words"])
            config = json.loads((args.runs_dir / name / "model" / "config.json").read_text())
            table = f"{vocab} x {config['embed_dim']} {config.get('table', 'float32')}"
            lstm = config.get("lstm", "float32")
        r["train_rows"] = stage.get("transfer_rows", 6920)
        lines.append(f"| {name} | {r['train_rows']} | {r['accuracy']:.4f} | {100 * r['accuracy'] / t['accuracy']:.1f} "
                     f"| {vocab if name in runs else ''} | {table if name in runs else ''} "
                     f"| {lstm if name in runs else ''} | {r['size_mb']:.1f} "
                     f"| {r['latency_ms_b1']:.2f} | {r['throughput_eps']:.0f} "
                     f"| {r['throughput_eps'] / t['throughput_eps']:.1f}x |")
        if name in runs and not name.startswith("old"):
            ok = r["size_mb"] <= 20 and r["accuracy"] >= 0.95 * t["accuracy"] and \
                r["throughput_eps"] >= 20 * t["throughput_eps"]
            checks.append(f"{name}: {r['size_mb']:.1f} MB <= 20, {100 * r['accuracy'] / t['accuracy']:.1f}% of "
                          f"teacher >= 95%, {r['throughput_eps'] / t['throughput_eps']:.1f}x b=32 >= 20x: "
                          f"{'PASS' if ok else 'FAIL'}")
    report(lines, checks, measured, args.out_md, args.out_json)


if __name__ == "__main__":
    main()
