"""slimtune: pretrained model + task data -> small, fast, accurate model, offline on a CPU.

    import slimtune
    metrics = slimtune.run("recipe.yaml", out="runs/x")      # or a dict / Recipe object
    model = slimtune.load_model("runs/x/model")               # the torch module
"""

from slimtune.errors import SlimtuneError
from slimtune.models import load_model
from slimtune.recipe import Recipe, load_recipe, parse_recipe
from slimtune.runner import run

__all__ = ["Recipe", "SlimtuneError", "load_model", "load_recipe", "parse_recipe", "run"]
__version__ = "0.1.0"
