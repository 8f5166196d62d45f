"""Teaches transformers' Auto classes slimtune's head-pruned BERT, without importing torch or transformers.

`import slimtune` imports this module only, so code paths that must stay torch-free (the ONNX server,
the feedback store) can import slimtune modules.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable

from slimtune.config import PRUNED_MODEL_TYPE

# ------------------------------------------------------------------ Auto classes for pruned models
# After `import slimtune`, AutoConfig / AutoModelForSequenceClassification must load head-pruned BERTs
# (model_type "slimtune_pruned_bert", see slimtune.prune.structured). Importing transformers here would
# add 1-3 s to every `import slimtune`, so the model type is registered right after transformers imports
# its AutoConfig module, and the model class when such a config is first built.
_AUTO_CONFIG = "transformers.models.auto.configuration_auto"


def _register_pruned_model_type(configuration_auto) -> None:
    """Map the model type to a stub whose from_dict builds the real PrunedBertConfig.

    This runs while transformers may still be importing other modules, so it imports nothing:
    the real config class (whose __post_init__ registers the model class) loads on first use.
    """
    try:
        class PrunedBertConfigStub(configuration_auto.PreTrainedConfig):
            model_type = PRUNED_MODEL_TYPE

            @classmethod
            def from_dict(cls, config_dict, **kwargs):
                from slimtune.prune.structured import PrunedBertConfig  # lazy: see above

                return PrunedBertConfig.from_dict(config_dict, **kwargs)

        configuration_auto.CONFIG_MAPPING.register(PRUNED_MODEL_TYPE, PrunedBertConfigStub, exist_ok=True)
    except Exception as e:  # a transformers change must not break transformers' own import
        warnings.warn(f"slimtune: pruned models will not load through transformers' Auto classes ({e})",
                      stacklevel=2)


class _AfterImport(importlib.abc.MetaPathFinder):
    """Runs `hook(module)` right after module `name` has been executed (wraps its loader's exec_module)."""

    def __init__(self, name: str, hook: Callable):
        self.name, self.hook = name, hook

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return None
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            self.hook(module)

        spec.loader.exec_module = exec_module
        return spec


if _AUTO_CONFIG in sys.modules:
    _register_pruned_model_type(sys.modules[_AUTO_CONFIG])
else:
    sys.meta_path.insert(0, _AfterImport(_AUTO_CONFIG, _register_pruned_model_type))
