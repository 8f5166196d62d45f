"""slimtune: pretrained model + task data -> small, fast, accurate model, offline on a CPU.

    import slimtune
    metrics = slimtune.run("recipe.yaml", out="runs/x")      # or a dict / Recipe object
    model = slimtune.load_model("runs/x/model")               # the torch module
"""

from slimtune import autoclasses as _autoclasses  # noqa: F401 - Auto classes learn the pruned BERT (torch-free)
from slimtune.errors import SlimtuneError

__all__ = ["Recipe", "SlimtuneError", "load_model", "load_recipe", "parse_recipe", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    """The public names, imported on first use: `import slimtune` (and every `slimtune` command, which
    imports this package first) does not pay seconds for torch, transformers and peft up front."""
    if name == "load_model":
        from slimtune.models import load_model

        return load_model
    if name in ("Recipe", "load_recipe", "parse_recipe"):
        from slimtune import recipe

        return getattr(recipe, name)
    if name == "run":
        from slimtune.runner import run

        return run
    raise AttributeError(f"module 'slimtune' has no attribute {name!r}")
