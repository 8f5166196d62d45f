"""The pipeline `slimtune search` chose on SST-2, run unchanged on TREC (6 question types): does the choice
carry over to another task, or was it fitted to SST-2?

    python bench/trec_chosen.py [--search runs/search | --candidate JSON] [--runs runs/trec] [--teacher-epochs N]
                                [--also LABEL=RUN_DIR] [--dataset trec|sst2] [--out-md F]

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

`--candidate JSON` builds the chosen pipeline as the search builds a candidate (e.g. with `"vocab": true`, its
vocabulary trimmed), with no search directory; `--dataset sst2` then runs the three models on SST-2 itself;
`--also LABEL=RUN_DIR` measures another run's shipped model in the same table.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import yaml
from common import HERE, add_common_args, machine_line, measure, report, run_once

TREC = HERE.parents[1] / "shared" / "data" / "trec"
SST2 = HERE.parents[1] / "shared" / "data" / "sst2"
# --dataset: (train file, reported file, what the table says); sst2 runs the chosen pipeline on its own data
DATASETS = {"trec": (TREC / "train.jsonl", TREC / "test.jsonl", "TREC test (500)"),
            "sst2": (SST2 / "train.jsonl", SST2 / "dev.jsonl", "SST-2 dev (872)")}
TEACHER_RECIPE = HERE / "recipes" / "teacher_mpnet_sst2.yaml"
SEARCH_RECIPE = HERE / "recipes" / "search_minilm_sst2.yaml"


def dataset_data(data: dict, dataset: str = "trec") -> dict:
    """A recipe's data section with the dataset's files (TREC's by default) in place of SST-2's (every other
    field kept)."""
    train, reported, _ = DATASETS[dataset]
    return {**data, "train": str(train), "eval": str(reported)}


def chosen_recipe(search: Path, teacher: Path) -> dict:
    """SEARCH/best_recipe.yaml with TREC's data, the TREC teacher, and students from the run's own model."""
    recipe = yaml.safe_load((search / "best_recipe.yaml").read_text())
    recipe["data"] = dataset_data(recipe["data"])
    base = str((search / "base" / "model").resolve())
    for stage in recipe["stages"]:
        if stage["stage"] != "distill":
            continue
        stage["teacher"] = str(teacher)
        student = stage.get("student") or {}
        if student.get("from") and str(Path(student["from"]).resolve()) == base:
            student["from"] = "current"
    return recipe


def candidate_recipe(params: dict, teacher: Path, epochs: float = 2.0, dataset: str = "trec") -> dict:
    """What SEARCH/best_recipe.yaml holds when the search chose the candidate `params` (Optuna's parameters):
    the search recipe's fine-tune, then the candidate's stages as `slimtune search` builds them (its default
    --epochs 2), with TREC's data. For candidates no search directory holds, e.g. the chosen one with its
    vocabulary trimmed."""
    from slimtune.models import read_config, resolve_model_path
    from slimtune.search import Candidate, candidate_stages

    recipe = yaml.safe_load(SEARCH_RECIPE.read_text())
    recipe["data"] = dataset_data(recipe["data"], dataset)
    finetune = next(s for s in recipe["stages"] if s["stage"] == "finetune")
    depth = read_config(resolve_model_path(recipe["model"]))["num_hidden_layers"]
    stages = candidate_stages(Candidate.of(params), "base", str(teacher), depth, epochs, finetune.get("batch_size", 32))
    recipe["stages"] = [finetune, *stages[:-1], {"stage": "evaluate"}]
    return recipe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--search", type=Path, default=Path("runs/search"), help="the SST-2 search (bench/search_sst2.py)")
    ap.add_argument("--runs", type=Path, default=Path("runs/trec"))
    ap.add_argument("--teacher-epochs", type=float, help="the teacher's epochs (default: its SST-2 recipe's)")
    ap.add_argument("--candidate", type=json.loads, help="the chosen pipeline built from the search recipe and this "
                    "candidate instead of SEARCH/best_recipe.yaml, e.g. "
                    '\'{"layers": 6, "heads": 0, "ffn": 0, "quant": "static_int8", "vocab": true}\'')
    ap.add_argument("--also", action="append", default=[], metavar="LABEL=RUN_DIR",
                    help="also measure another run's shipped model side by side (e.g. a chosen pipeline of an "
                         "earlier --runs directory)")
    ap.add_argument("--epochs", type=float, default=2.0, help="with --candidate: the search's --epochs (its "
                    "distillation and recovery epochs)")
    ap.add_argument("--dataset", choices=sorted(DATASETS), default="trec",
                    help="sst2: the same three models on SST-2 itself (with --candidate: no search directory needed)")
    add_common_args(ap)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    teacher_recipe = yaml.safe_load(TEACHER_RECIPE.read_text())
    teacher_recipe["data"] = dataset_data(teacher_recipe["data"], args.dataset)
    if args.teacher_epochs:
        teacher_recipe["stages"][0]["epochs"] = args.teacher_epochs
    teacher = run_once(teacher_recipe, args.runs / "teacher") / "model"
    if args.candidate:
        chosen = candidate_recipe(args.candidate, teacher, epochs=args.epochs, dataset=args.dataset)
    elif args.dataset == "trec":
        chosen = chosen_recipe(args.search, teacher)
    else:
        ap.error("--dataset sst2 needs --candidate (the search's own best_recipe.yaml already runs on SST-2)")
    minilm_recipe = copy.deepcopy(chosen)
    minilm_recipe["stages"] = [chosen["stages"][0], {"stage": "evaluate", "speed": False}]
    minilm = run_once(minilm_recipe, args.runs / "minilm") / "model"
    chosen_run = run_once(chosen, args.runs / "chosen")
    (args.runs / "chosen_recipe.yaml").write_text(yaml.safe_dump(chosen, sort_keys=False))
    if args.train_only:
        return
    def shipped(run: Path) -> Path:
        return run / ("onnx" if (run / "onnx" / "model.onnx").is_file() else "model")

    models = {"teacher: MPNet fp32 (torch)": teacher, "MiniLM fine-tuned fp32 (torch)": minilm,
              "chosen pipeline (as shipped)": shipped(chosen_run)}
    for also in args.also:
        label, _, run = also.partition("=")
        models[label] = shipped(Path(run))
    _, reported, what = DATASETS[args.dataset]
    rows = measure(models, args.threads, args.rounds, eval_file=reported)
    for name, path in models.items():  # macro F1 from each run's own evaluation (same rows, same model)
        final = json.loads((path.parent / "metrics.json").read_text())["final"]
        rows[name]["f1_macro_run"] = final.get("f1_macro")
    t = rows["teacher: MPNet fp32 (torch)"]
    lines = [machine_line(args.threads, args.rounds, f"{what}, max_length 64"), "",
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
