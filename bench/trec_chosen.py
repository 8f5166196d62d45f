"""The pipeline `slimtune search` chose on SST-2, run unchanged on TREC (6 question types): does the choice
carry over to another task, or was it fitted to SST-2?

    python bench/trec_chosen.py [--search runs/search] [--runs runs/trec] [--teacher-epochs N] [--out-md F]

Only the data changes. The three models are made by the same recipes as on SST-2, with TREC's files:
  teacher   bench/recipes/teacher_mpnet_sst2.yaml (MPNet, 1 epoch, lr 3e-5; `--teacher-epochs N` trains it
            longer: one SST-2 epoch is 6,920 rows, TREC's 5,452 shorter ones leave MPNet undertrained)
  chosen    SEARCH/best_recipe.yaml, the chosen pipeline from the start (MiniLM fine-tuned, then what the
            search chose: distilled from the teacher, static int8, shipped as the int8 ONNX graph)
  MiniLM    the chosen recipe's first stage alone (MiniLM fine-tuned), the model it starts from
TREC train (5,452 questions) trains; each recipe carves its own checkpoint-selection rows from it; TREC test
(500) is only reported on. A best_recipe.yaml written before its students were named `from: current`
names the SST-2 search's base directory: that student is the run's own model, and is read so here.
Then every model is measured side by side in one process (accuracy and macro F1 on TREC test, size,
batch-1 latency, batch-32 throughput on what ships), with the ratios against the teacher that issue 17
sets for SST-2.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import yaml
from common import HERE, add_common_args, machine_line, measure, report

TREC = HERE.parents[1] / "shared" / "data" / "trec"
TEACHER_RECIPE = HERE / "recipes" / "teacher_mpnet_sst2.yaml"


def trec_data(data: dict) -> dict:
    """A recipe's data section with TREC's files in place of SST-2's (every other field kept)."""
    return {**data, "train": str(TREC / "train.jsonl"), "eval": str(TREC / "test.jsonl")}


def chosen_recipe(search: Path, teacher: Path) -> dict:
    """SEARCH/best_recipe.yaml with TREC's data, the TREC teacher, and students from the run's own model."""
    recipe = yaml.safe_load((search / "best_recipe.yaml").read_text())
    recipe["data"] = trec_data(recipe["data"])
    base = str((search / "base" / "model").resolve())
    for stage in recipe["stages"]:
        if stage["stage"] != "distill":
            continue
        stage["teacher"] = str(teacher)
        student = stage.get("student") or {}
        if student.get("from") and str(Path(student["from"]).resolve()) == base:
            student["from"] = "current"
    return recipe


def run_once(recipe: dict, out: Path) -> Path:
    import slimtune

    if not (out / "metrics.json").is_file():
        print(f"-> {out}", flush=True)
        slimtune.run(recipe, out, overwrite=True, progress=False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", type=Path, default=Path("runs/search"), help="the SST-2 search (bench/search_sst2.py)")
    ap.add_argument("--runs", type=Path, default=Path("runs/trec"))
    ap.add_argument("--teacher-epochs", type=float, help="the teacher's epochs (default: its SST-2 recipe's)")
    add_common_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    teacher_recipe = yaml.safe_load(TEACHER_RECIPE.read_text())
    teacher_recipe["data"] = trec_data(teacher_recipe["data"])
    if args.teacher_epochs:
        teacher_recipe["stages"][0]["epochs"] = args.teacher_epochs
    teacher = run_once(teacher_recipe, args.runs / "teacher") / "model"
    chosen = chosen_recipe(args.search, teacher)
    minilm_recipe = copy.deepcopy(chosen)
    minilm_recipe["stages"] = [chosen["stages"][0], {"stage": "evaluate", "speed": False}]
    minilm = run_once(minilm_recipe, args.runs / "minilm") / "model"
    chosen_run = run_once(chosen, args.runs / "chosen")
    (args.runs / "chosen_recipe.yaml").write_text(yaml.safe_dump(chosen, sort_keys=False))
    if args.train_only:
        return
    ships = chosen_run / ("onnx" if (chosen_run / "onnx" / "model.onnx").is_file() else "model")
    models = {"teacher: MPNet fp32 (torch)": teacher, "MiniLM fine-tuned fp32 (torch)": minilm,
              "chosen pipeline (as shipped)": ships}
    rows = measure(models, args.threads, args.rounds, eval_file=TREC / "test.jsonl")
    for name, path in models.items():  # macro F1 from each run's own evaluation (same rows, same model)
        final = json.loads((path.parent / "metrics.json").read_text())["final"]
        rows[name]["f1_macro_run"] = final.get("f1_macro")
    t = rows["teacher: MPNet fp32 (torch)"]
    lines = [machine_line(args.threads, args.rounds, "TREC test (500), max_length 64"), "",
             "| model | accuracy | % of teacher | macro F1 (run) | size MB | ms b=1 | ex/s b=32 | runtime "
             "| vs teacher: b=1 / b=32 / size |", "| --- " * 9 + "|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['accuracy']:.4f} | {100 * r['accuracy'] / t['accuracy']:.1f}% | "
                     f"{r['f1_macro_run']:.4f} | {r['size_mb']:.1f} | {r['latency_ms_b1']:.2f} | "
                     f"{r['throughput_eps']:.0f} | {r['runtime']} | {t['latency_ms_b1'] / r['latency_ms_b1']:.1f}x / "
                     f"{r['throughput_eps'] / t['throughput_eps']:.1f}x / {t['size_mb'] / r['size_mb']:.1f}x |")
    c = rows["chosen pipeline (as shipped)"]
    checks = [f"chosen pipeline at {100 * c['accuracy'] / t['accuracy']:.1f}% of the teacher's accuracy "
              f"(issue 17's bar on SST-2: 99%), {c['throughput_eps'] / t['throughput_eps']:.1f}x its batch-32 "
              f"throughput (15x), {t['latency_ms_b1'] / c['latency_ms_b1']:.1f}x its batch-1 latency (8x), "
              f"{t['size_mb'] / c['size_mb']:.1f}x smaller (20x)"]
    report(lines, checks, rows, args.out_md, args.out_json)


if __name__ == "__main__":
    main()
