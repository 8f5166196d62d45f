"""Find the parts of a transformer classifier by structure, not by architecture name.

Freezing, head-only training and cascaded unfreezing need to know which parameters are the
embeddings, which belong to encoder layer i, and which form the task head. Matching on structure
(the ModuleList of `num_hidden_layers` blocks, the parent of the input embeddings) keeps this
working for BERT, MPNet, RoBERTa, DistilBERT and friends without a table of names.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from slimtune.errors import SlimtuneError


@dataclass(frozen=True)
class Anatomy:
    embeddings: str  # module-name prefix of the embeddings block, e.g. "bert.embeddings"
    layers: str  # prefix of the encoder ModuleList, e.g. "bert.encoder.layer"
    num_layers: int

    def part_of(self, param_name: str) -> str | int:
        """'embeddings', an encoder layer index, or 'head' (pooler, classifier...)."""
        if param_name.startswith(self.embeddings + "."):
            return "embeddings"
        if param_name.startswith(self.layers + "."):
            return int(param_name[len(self.layers) + 1:].split(".", 1)[0])
        return "head"


def anatomy(model: nn.Module) -> Anatomy:
    names = {id(m): n for n, m in model.named_modules()}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    emb_name = names.get(id(emb)) if emb is not None else None
    if not emb_name:
        raise SlimtuneError(f"{type(model).__name__}: cannot find its input embeddings")
    emb_block = emb_name.rsplit(".", 1)[0] if "." in emb_name else emb_name
    expected = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0 and n.rsplit(".", 1)[-1] in ("layer", "layers")]
    if expected is not None:
        lists = [(n, m) for n, m in lists if len(m) == expected] or lists
    if not lists:
        raise SlimtuneError(f"{type(model).__name__}: cannot find its encoder layers")
    layers_name, layers = lists[0]
    return Anatomy(embeddings=emb_block, layers=layers_name, num_layers=len(layers))
