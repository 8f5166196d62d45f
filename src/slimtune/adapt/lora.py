"""LoRA through PEFT: wrap, train with the common loop, merge back into a plain HF model.

The merged model loads with `transformers` alone (no PEFT needed at inference); with
`save_adapter_only` the run keeps the PEFT wrapper and saves just the adapter + head, which
`slimtune.load_model` merges on load.
"""

from __future__ import annotations

from torch import nn

from slimtune.adapt.layers import anatomy
from slimtune.config import LoraConfig
from slimtune.errors import SlimtuneError


def head_modules(model: nn.Module) -> list[str]:
    """Top-level names of the task head (e.g. 'classifier', 'pooler'): trained fully next to LoRA."""
    an = anatomy(model)
    names = set()
    for name, _ in model.named_parameters():
        if an.part_of(name) == "head":
            names.add(name.rsplit(".", 2)[0] if name.count(".") >= 2 else name.split(".")[0])
    return sorted(names)


# (query, value) projection names by architecture family, tried in this order
QUERY_VALUE_NAMES = (("query", "value"), ("q_proj", "v_proj"), ("q", "v"))


def default_targets(linear_names: set[str]) -> list[str]:
    for names in QUERY_VALUE_NAMES:
        if set(names) <= linear_names:
            return list(names)
    raise SlimtuneError("lora.target_modules: no query/value projections found in this model; name them "
                        f"(its linear layers: {', '.join(sorted(linear_names))})")


def apply_lora(model: nn.Module, cfg: LoraConfig, base_model: str, *, task_type: str = "SEQ_CLS",
               train_head: bool = True) -> nn.Module:
    """Wrap `model` in LoRA adapters. `task_type`: PEFT's (SEQ_CLS, CAUSAL_LM); `train_head`: a new,
    randomly initialised head (a classifier) trains fully beside the adapters; a pretrained one (a
    language model's, often tied to the embeddings) stays frozen."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = list(cfg.target_modules) if cfg.target_modules else default_targets(linear_names)
    missing = [t for t in targets if t not in linear_names]
    if missing:
        raise SlimtuneError(f"lora.target_modules: {missing} match no linear layer of this model "
                            f"(its linear layers: {', '.join(sorted(linear_names))})")
    peft_cfg = PeftLoraConfig(
        task_type=TaskType[task_type], r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=targets,
        # the new classifier (and BERT's pooler feeding it) must train fully, not through LoRA
        modules_to_save=head_modules(model) if train_head else None,
    )
    peft_model = get_peft_model(model, peft_cfg)
    # An alias or absolute path: the adapter-only save must find its base again offline.
    peft_model.peft_config["default"].base_model_name_or_path = base_model
    return peft_model


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold the low-rank updates into the base weights; returns the plain transformers model."""
    return model.merge_and_unload()


def is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)
