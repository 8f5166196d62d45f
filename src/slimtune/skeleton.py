"""Building the model a slimtune directory's config.json describes, before any weight is read: the
structural changes slimtune makes are recorded in the config and redone here on a model built from it.

- `slimtune_format: pruned`: per-layer head / FFN counts (slimtune.prune.structured);
- `slimtune_lowrank`: Linears replaced by their low-rank factors (slimtune.lowrank);
- `slimtune_quantization`: quantized Linears / embeddings holding integer codes (slimtune.quantize.core);
- `slimtune_format: word-classifier`: a word-level BiLSTM / CNN (slimtune.wordmodels).
The model-directory gate builds these on the meta device to compare shapes; `slimtune.models` loads the
weights into them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from slimtune.config import names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.lowrank import apply_lowrank_skeleton_
from slimtune.prune.structured import shrink_to_config
from slimtune.quantize.core import apply_quantization_skeleton_
from slimtune.wordmodels import FORMAT as WORD_FORMAT
from slimtune.wordmodels import WORD_ARCHS

# config.json key -> fn(model, spec) that rebuilds a structural change on a model built from its config,
# before the weights load. Applied in this order (a quantized low-rank model quantizes the factors); a
# pruned model may carry both.
MODEL_OVERLAYS: dict[str, Callable[[nn.Module, dict], None]] = {
    "slimtune_lowrank": apply_lowrank_skeleton_, "slimtune_quantization": apply_quantization_skeleton_}
FORMATS = ("pruned", WORD_FORMAT)  # config.json["slimtune_format"] values


def has_overlays(config: dict) -> bool:
    return any(config.get(key) for key in MODEL_OVERLAYS)


def build_from_config(path: Path, config: dict) -> nn.Module:
    """The model a directory's config describes (pruned shapes included, each overlay the config records
    applied), weights not loaded. Under `torch.device("meta")` it costs no memory (the model gate
    compares its shapes with the weights file's header)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification  # lazy: slow

    if config.get("slimtune_format") == WORD_FORMAT:
        return build_word_classifier(path, config)
    # a decoder keeps its language-model head (the gate then checks lm_head, not a classifier it never had)
    auto = AutoModelForCausalLM if names_causal_lm(config) else AutoModelForSequenceClassification
    model = auto.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    if config.get("slimtune_format") == "pruned":
        shrink_to_config(model)
    for key, apply in MODEL_OVERLAYS.items():
        if config.get(key):
            apply(model, config[key])
    return model


def build_word_classifier(path: Path, config: dict) -> nn.Module:
    from transformers import PretrainedConfig  # lazy: slow to import

    arch = config.get("arch")
    if arch not in WORD_ARCHS:
        raise SlimtuneError(f"{Path(path) / 'config.json'}: unknown word classifier arch {arch!r} "
                            f"(known: {', '.join(WORD_ARCHS)})")
    return WORD_ARCHS[arch](PretrainedConfig.from_dict(config))
