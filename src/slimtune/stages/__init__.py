"""The stage registry: `stage:` in a recipe -> the class that runs it (see `slimtune.stages.base.Stage`).

Adding a stage: a module in this package with a class that satisfies `Stage` (its typed `Config` has a
`stage: Literal["name"]` field), and a line below. Stages never import each other.
"""

from __future__ import annotations

from slimtune.stages.base import Run, Stage
from slimtune.stages.distill import Distill
from slimtune.stages.evaluate import Evaluate
from slimtune.stages.finetune import Finetune
from slimtune.stages.lowrank import Lowrank
from slimtune.stages.prune import Prune
from slimtune.stages.quantize import Quantize
from slimtune.stages.vocabulary import Vocabulary

STAGES: dict[str, type] = {cls.name: cls for cls in (Finetune, Distill, Prune, Quantize, Lowrank, Vocabulary, Evaluate)}


def build_stage(config) -> Stage:
    """The stage object of one validated stage config."""
    return STAGES[config.stage](config)


__all__ = ["STAGES", "Run", "Stage", "build_stage"]
