"""Which modules a quantize method touches: the layer-stack Linears (with group sizes checked), the
embedding tables and the pooler; shared by post-training quantization and QAT."""

from __future__ import annotations

from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.modules import select_linears
from slimtune.quantize.core import layer_spec

# 8 bits with ONE scale and zero point for the whole table, as ONNX Runtime quantizes an embedding
# Gather (uint8, asymmetric, per tensor): the torch simulation then matches the deployed graph, and
# most entries, small next to the table's extremes, use few distinct codes, which the packer stores
# in fewer bits than with a scale per row.
EMBEDDING_SPEC = layer_spec(kind="embedding", bits=8, scheme="asymmetric", per_tensor=True)



def quantize_targets(model: nn.Module, targets: list[str] | None, ignore: list[str] | None,
                     group_size: int | None = None) -> dict[str, nn.Linear]:
    """The Linears to quantize (default: every Linear of the layer stack), with `group_size` checked
    against each one's input width."""
    try:
        chosen = select_linears(model, targets, ignore, purpose="quantize")
    except SlimtuneError as e:
        raise SlimtuneError(f"quantize: {e}") from None
    if group_size is not None:
        for name, linear in chosen.items():
            if linear.in_features % group_size:
                raise SlimtuneError(f"quantize: group_size {group_size} does not divide the "
                                    f"{linear.in_features} input features of {name}")
    return chosen


def _named_module(model: nn.Module, getter: str, kind: type, error: str) -> str:
    """The name of the module `model.<getter>()` returns, which must be a `kind`; else `error`."""
    module = getattr(model, getter)() if hasattr(model, getter) else None
    name = next((n for n, m in model.named_modules() if m is module), None) if module is not None else None
    if not isinstance(module, kind) or not name:
        raise SlimtuneError(f"quantize: {type(model).__name__} has no {error}")
    return name


def word_embedding_name(model: nn.Module) -> str:
    return _named_module(model, "get_input_embeddings", nn.Embedding,
                         "nn.Embedding word embedding (set embeddings: false)")


def embedding_names(model: nn.Module) -> list[str]:
    """Every embedding table next to the word embedding (positions, token types too): ONNX Runtime
    quantizes each of their Gathers, so the torch simulation does the same."""
    word = word_embedding_name(model)
    parent = word.rsplit(".", 1)[0] + "." if "." in word else ""
    return [word] + [n for n, m in model.named_modules()
                     if isinstance(m, nn.Embedding) and n != word and n.startswith(parent)]


def output_head_name(model: nn.Module) -> str:
    """The output head's module name (a causal LM's `lm_head`)."""
    return _named_module(model, "get_output_embeddings", nn.Linear,
                         "nn.Linear output head (an LM's lm_head); set head: false")


def untie_embeddings_(model: nn.Module) -> bool:
    """A head that shares the input embedding's table gets its own copy (and the config says so), so
    either can be quantized, or left float, and each saves and loads as itself. True if it was tied."""
    get_in, get_out = (getattr(model, "get_input_embeddings", None), getattr(model, "get_output_embeddings", None))
    inp, out = (get_in() if get_in else None), (get_out() if get_out else None)
    if inp is None or out is None or getattr(out, "weight", None) is not getattr(inp, "weight", None):
        return False
    out.weight = nn.Parameter(inp.weight.detach().clone(), requires_grad=inp.weight.requires_grad)
    model.config.tie_word_embeddings = False
    return True
