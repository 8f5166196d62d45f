"""The task registry: `task:` in a recipe -> the class that knows that task's data, loss, metrics and I/O.

Adding a task: a module in this package with a class that satisfies `slimtune.tasks.base.Task`, and a
line below.
"""

from __future__ import annotations

from slimtune.config import names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.tasks.base import Metric, Task, TaskData
from slimtune.tasks.causal_lm import CausalLM
from slimtune.tasks.classification import TextClassification

TASKS: dict[str, type] = {TextClassification.name: TextClassification, CausalLM.name: CausalLM}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SlimtuneError(f"task '{name}': unknown (known: {', '.join(TASKS)})")
    return TASKS[name]()


def task_of_model(config) -> Task:
    """The task a saved model directory was trained for (`slimtune_task` in its config); without the key,
    a decoder with a language-model head (a plain SmolLM2 directory) is a causal LM, anything else a
    classifier (slimtune wrote classifiers before the key existed)."""
    as_dict = config if isinstance(config, dict) else config.to_dict()
    name = as_dict.get("slimtune_task") or (CausalLM.name if names_causal_lm(as_dict) else TextClassification.name)
    return get_task(name)


__all__ = ["TASKS", "Metric", "Task", "TaskData", "get_task", "task_of_model"]
