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


def word_embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    name = next((n for n, m in model.named_modules() if m is emb), None) if emb is not None else None
    if not isinstance(emb, nn.Embedding) or not name:
        raise SlimtuneError(f"quantize: embeddings: {type(model).__name__} has no nn.Embedding word embedding "
                            f"(set embeddings: false)")
    return name


def embedding_names(model: nn.Module) -> list[str]:
    """Every embedding table next to the word embedding (positions, token types too): ONNX Runtime
    quantizes each of their Gathers, so the torch simulation does the same."""
    word = word_embedding_name(model)
    parent = word.rsplit(".", 1)[0] + "." if "." in word else ""
    return [word] + [n for n, m in model.named_modules()
                     if isinstance(m, nn.Embedding) and n != word and n.startswith(parent)]
