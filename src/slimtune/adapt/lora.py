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


def apply_lora(model: nn.Module, cfg: LoraConfig, base_model: str) -> nn.Module:
    from peft import LoraConfig as PeftLoraConfig
    from peft import TaskType, get_peft_model

    linear_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [t for t in cfg.target_modules if t not in linear_names]
    if missing:
        raise SlimtuneError(f"lora.target_modules: {missing} match no linear layer of this model "
                            f"(its linear layers: {', '.join(sorted(linear_names))})")
    peft_cfg = PeftLoraConfig(
        task_type=TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        # the new classifier (and BERT's pooler feeding it) must train fully, not through LoRA
        modules_to_save=head_modules(model),
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
