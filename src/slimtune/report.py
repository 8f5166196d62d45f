"""Human-readable outputs: the model card (README.md with YAML metadata) and the markdown pieces the run
report (report_page.py) shares with it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from slimtune.models import HUB_NAMES

LABELS = {"accuracy": "Accuracy", "f1_macro": "F1 (macro)", "precision_macro": "Precision (macro)",
          "recall_macro": "Recall (macro)", "params": "Parameters", "trainable_params": "Trainable parameters",
          "size_mb": "Size on disk (MB)", "latency_ms_b1": "Latency, batch 1 (median ms)",
          "throughput_eps": "Throughput, batch 32 (examples/s)"}


def fmt(value) -> str:
    if isinstance(value, float):
        if 0 < abs(value) < 1e-3:
            return f"{value:.1e}"  # learning rates
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "—" if value is None else str(value)


def _methods(metrics: dict) -> list[str]:
    return [m.get("method", m["stage"]) for m in metrics["stages"] if m["stage"] != "evaluate"]


def distill_lines(metrics: dict) -> list[str]:
    """One line per distill stage: which teachers taught which student, and how."""
    lines = []
    for s in metrics["stages"]:
        if s["stage"] != "distill":
            continue
        teachers = ", ".join(f"`{t['model']}` ({_dev_metric(t)}, {t['params'] / 1e6:.1f}M params"
                             f"{', weight ' + fmt(t['weight']) if len(s['teachers']) > 1 else ''})"
                             for t in s["teachers"])
        inter = s.get("intermediate")
        lines.append(f"Distilled from {teachers} into {s['student_source']}: T = {fmt(s['temperature'])}, "
                     f"alpha = {fmt(s['alpha'])}, {s['transfer_rows']:,} transfer examples "
                     f"({s['augmented_transfer_rows']:,} augmented)"
                     + (f", intermediate {inter['loss']} ({inter['granularity']}) on layers {inter['mapping']}"
                        if inter else "") + ".")
    return lines


def _dev_metric(teacher: dict) -> str:
    key = next((k for k in teacher if k.startswith("dev_")), None)
    return f"dev {key[4:].replace('_', ' ')} {fmt(teacher[key])}" if key else "no dev metric"


def model_card(recipe: Any, metrics: dict, data, task: Any, plain_hf: bool = True) -> str:
    """README.md of the model directory. `recipe`: slimtune.recipe.Recipe; `task`: the run's Task."""
    final = metrics["final"]
    eval_name = Path(str(data.info.get("eval_file") or data.info.get("train_file"))).name
    # `base_model` must resolve on a hub: the hub name of an alias, never the alias or a local path
    hub_name = HUB_NAMES.get(recipe.model)
    meta = {
        **({"base_model": hub_name} if hub_name else {}),
        "library_name": "transformers",
        "pipeline_tag": task.name,
        "tags": ["slimtune", *_methods(metrics)],
        "slimtune": {"base_model": recipe.model, "method": _methods(metrics),
                     "stages": [s.stage for s in recipe.stages],
                     "data": {"train": str(recipe.data.train),
                              "eval": str(recipe.data.eval) if recipe.data.eval else "stratified split"}},
        "model-index": [{
            "name": "slimtune-model",
            "results": [{
                "task": {"type": task.name},
                "dataset": {"name": eval_name, "type": "local"},
                "metrics": [{"type": k, "value": final[k]} for k in
                            task.final_keys if final.get(k) is not None],
            }],
        }],
    }
    labels = ", ".join(f"{i} = {name}" for i, name in data.labels.items())
    lines = [
        "---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", "",
        f"# {task.name} model made with slimtune", "",
        f"Base model: `{hub_name or recipe.model}`" + (f" (slimtune alias `{recipe.model}`)" if hub_name else "")
        + f". Stages: {' → '.join(s.stage for s in recipe.stages)}."
        + (f" Labels: {labels}." if labels else ""),
        *(["", *distill_lines(metrics)] if distill_lines(metrics) else []),
        *(["", "Load it with `transformers` (or `slimtune.load_model`):", "",
           "```python", "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
           "model = AutoModelForSequenceClassification.from_pretrained(PATH)",
           "tokenizer = AutoTokenizer.from_pretrained(PATH)", "```"] if plain_hf else
          ["", "Load it with slimtune (a slimtune architecture, not a transformers one):", "",
           "```python", "import slimtune", "model = slimtune.load_model(PATH)",
           "from slimtune.models import load_tokenizer", "tokenizer = load_tokenizer(PATH)", "```"]),
        *warnings_section(metrics), "", "## Evaluation", "", metrics_table(final),
    ]
    return "\n".join(lines) + "\n"


def warnings_section(metrics: dict) -> list[str]:
    """The run's warnings (the task's verdict on its final metrics) as markdown lines; none: nothing."""
    if not metrics.get("warnings"):
        return []
    return ["", "## Warnings", "", *[f"- **{w}**" for w in metrics["warnings"]]]


def metrics_table(final: dict) -> str:
    rows = ["| metric | value |", "| --- | --- |"]
    rows += [f"| {label} | {fmt(final.get(key))} |" for key, label in LABELS.items()]
    if final.get("threads"):
        rows.append(f"| Threads (speed) | {final['threads']} |")
    if final.get("cpu"):
        rows.append(f"| CPU | {final['cpu']} |")
    return "\n".join(rows)


def stages_table(metrics: dict, task: Any) -> list[str]:
    """One markdown row per stage (and per phase of a phased stage): how it trained and what it chose."""
    out = ["| # | stage | method | lr | batch | steps | epochs | trainable % | train ex/s | best (selection) |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, s in enumerate(metrics["stages"]):
        if s["stage"] == "evaluate":
            primary = task.primary.name
            out.append(f"| {i} | evaluate | | | | | | | | {primary} {fmt(s.get(primary))} (eval split) |")
            continue
        method = s.get("method", s.get("student", ""))
        out.append(f"| {i} | {s['stage']} | {method} | {fmt(s.get('lr'))} | {s.get('batch_size')} "
                   f"| {s.get('steps', '')} | {s.get('epochs_run', '')} | {fmt(s.get('trainable_pct'))} "
                   f"| {fmt(s.get('examples_per_s'))} | {fmt(s.get('best_metric'))} |")
        for p in s.get("phases", []):
            out.append(f"|  | phase {p['phase']} | {', '.join(p['trainable'])} | {fmt(p.get('lr'))} | | "
                       f"{p['steps']} | {p['epochs_run']} | | {fmt(p.get('examples_per_s'))} "
                       f"| {fmt(p.get('best_metric'))} |")
    return out
