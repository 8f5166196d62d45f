"""Static word vectors read from a teacher for word-level students, and the word lists they cover.

Model2Vec's idea (Tulkens & van Dongen 2024): run each word alone through a transformer and keep its
hidden state as a fixed vector; a fine-tuned teacher's vectors also carry the task. The vocabulary can
reach past the training texts (the teacher's whole words, a language's most frequent words), so a
word student meets fewer [UNK]s on new text.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.distributed import once_per_node
from slimtune.errors import SlimtuneError


@torch.no_grad()
def contextual_word_vectors(words: Sequence[str], teacher_model: nn.Module, teacher_tokenizer, layer: int | None = None,
                            batch_size: int = 256) -> torch.Tensor:
    """[len(words), H]: each word run alone through the teacher, its hidden state at `layer` (0 = the
    embedding output; default the middle layer) averaged over the word's own sub-tokens (specials left
    out). Model2Vec's idea (Tulkens & van Dongen 2024): a transformer's output for a single word is a
    better static vector than its input embedding; a fine-tuned teacher's also carries the task. On
    SST-2 the middle layer of the fine-tuned MPNet gave the best bag-of-vectors classifier here."""
    n_layers = int(getattr(teacher_model.config, "num_hidden_layers", 0) or 0)
    layer = n_layers // 2 if layer is None else layer
    if not 0 <= layer <= n_layers:
        raise SlimtuneError(f"embedding_layer {layer}: the teacher has hidden states 0-{n_layers}")
    teacher_model.eval()
    out = None
    for start in range(0, len(words), batch_size):
        chunk = list(words[start:start + batch_size])
        enc = teacher_tokenizer(chunk, return_tensors="pt", padding=True, return_special_tokens_mask=True)
        keep = (enc["attention_mask"].bool() & ~enc.pop("special_tokens_mask").bool()).unsqueeze(-1).float()
        inputs = {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = teacher_model(**inputs, output_hidden_states=True).hidden_states[layer]
        vectors = (hidden * keep).sum(1) / keep.sum(1).clamp(min=1)
        out = vectors.new_zeros(len(words), vectors.shape[1]) if out is None else out
        out[start:start + len(chunk)] = vectors
    return out


def teacher_whole_words(teacher_tokenizer) -> list[str]:
    """Words the teacher's tokenizer holds as one token when they stand alone (letters only, 2+ chars):
    WordPiece and BPE vocabularies alike, without knowing their continuation markers."""
    candidates = sorted({teacher_tokenizer.convert_tokens_to_string([t]).strip()
                         for t in teacher_tokenizer.get_vocab()})
    candidates = [w for w in candidates if len(w) > 1 and w.isalpha()]
    pieces = teacher_tokenizer(candidates, add_special_tokens=False)["input_ids"] if candidates else []
    return [w for w, ids in zip(candidates, pieces, strict=True) if len(ids) == 1]


def cached_word_vectors(words: Sequence[str], teacher: nn.Module, teacher_tokenizer, layer: int | None,
                        cache_dir: Path, teacher_hash: str) -> torch.Tensor:
    """`contextual_word_vectors`, computed once per teacher content hash, layer and word list and kept
    in `cache_dir` (100k words take minutes on a CPU)."""
    key = hashlib.sha256(json.dumps([teacher_hash, layer, list(words)]).encode()).hexdigest()
    path = Path(cache_dir) / f"{key[:32]}.safetensors"

    def compute() -> None:  # under torchrun one process per machine computes; the others read its file
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if f.get_slice("vectors").get_shape()[0] == len(words):
                    return
        vectors = contextual_word_vectors(words, teacher, teacher_tokenizer, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file({"vectors": vectors.contiguous()}, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    once_per_node(compute)
    return load_file(str(path))["vectors"]


def principal_components(vectors: torch.Tensor, dims: int) -> torch.Tensor:
    """[n, dims]: the centred vectors on their `dims` leading principal axes (Model2Vec reduces its static
    vectors this way: a smaller table, a cheaper first layer, and the low-variance directions, mostly
    noise for a small student, are gone)."""
    if not 0 < dims <= min(vectors.shape):
        raise SlimtuneError(f"pca_dims {dims}: expected 1-{min(vectors.shape)} (the vectors are "
                            f"{vectors.shape[0]} x {vectors.shape[1]})")
    centred = vectors.double() - vectors.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:dims].T).to(vectors.dtype)
