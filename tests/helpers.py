"""Helpers shared by the integration tests: run the real CLI in a subprocess."""

import os
import subprocess
import sys
from pathlib import Path

# The recipe of issue 3, which must work as written.
ISSUE_RECIPE = """\
task: text-classification
model: minilm
data:
  train: data/train.jsonl
  eval: data/dev.jsonl
  text_field: text
  label_field: label
  max_length: 128
stages:
  - stage: finetune
    method: lora
    epochs: 1
    lr: 5.0e-4
    batch_size: 32
    lora: {r: 8, alpha: 16}
  - stage: evaluate
"""


OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def slimtune(*args, cwd: Path | None = None, input: str | None = None, timeout: int = 900):
    """`slimtune ARGS...` as a user types it; returns the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, "-m", "slimtune", *map(str, args)], cwd=cwd, env={**os.environ, **OFFLINE}, input=input,
                          capture_output=True, text=True, timeout=timeout)


def write_recipe(path: Path, model, train, eval_=None, stages=None, **data) -> Path:
    import yaml

    recipe = {"task": "text-classification", "model": str(model),
              "data": {"train": str(train), **({"eval": str(eval_)} if eval_ else {}), "max_length": 64, **data},
              "stages": stages or [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 1e-3, "batch_size": 16},
                                   {"stage": "evaluate", "latency_runs": 3, "throughput_batches": 1}]}
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
