"""The task registry: `task:` in a recipe -> the class that knows that task's data, loss, metrics and I/O.

Adding a task: a module in this package with a class that satisfies `slimtune.tasks.base.Task`, and a
line below.
"""

from __future__ import annotations

from slimtune.errors import SlimtuneError
from slimtune.tasks.base import Metric, Task, TaskData
from slimtune.tasks.classification import TextClassification

TASKS: dict[str, type] = {TextClassification.name: TextClassification}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise SlimtuneError(f"task '{name}': unknown (known: {', '.join(TASKS)})")
    return TASKS[name]()


def task_of_model(config) -> Task:
    """The task a saved model directory was trained for (`slimtune_task` in its config; classifiers
    written before the key existed are text classifiers)."""
    return get_task(getattr(config, "slimtune_task", None) or
                    (config.get("slimtune_task") if isinstance(config, dict) else None) or TextClassification.name)


__all__ = ["TASKS", "Metric", "Task", "TaskData", "get_task", "task_of_model"]
