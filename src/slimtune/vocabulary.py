"""Vocabulary trimming (TextPruner's vocabulary pruning): keep the input-embedding rows of the tokens a
task's text uses, drop the rest, and rewrite the tokenizer to the kept tokens.

A small encoder's word-embedding table is much of its size (MiniLM-L6: 30,522 x 384 = 11.7M of 22.7M
parameters; 11.7 MB of a 23.9 MB int8 ONNX file), while one task's training text uses a fraction of it
(SST-2: about 12k tokens). What is kept:
- every special token;
- every single character, alone and as a continuation piece (`##x`): WordPiece matches the longest known
  piece first, so with every character kept any word that tokenized without [UNK] still does, in pieces;
- the tokens of the training text (at least `min_count` times) and of any extra words (a frequency list).
Text made only of kept tokens tokenizes exactly as before, ids renumbered; other words split into
smaller pieces. Only WordPiece tokenizers (BERT, MiniLM, MPNet, ...) are trimmed: a BPE tokenizer's merges
and a Unigram's scores would need a rebuilt model, and no library trims them offline.

The tokenizer's files are rewritten by hand (tokenizer.json's vocabulary, added tokens, post-processor and
padding ids; tokenizer_config.json's added-token ids): `tokenizers` has no vocabulary-subset API.
"""

from __future__ import annotations

import json
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import SlimtuneError

# config.json keys holding token ids: renumbered with the vocabulary
ID_KEYS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id", "unk_token_id",
           "mask_token_id", "decoder_start_token_id")


def wordpiece_spec(tokenizer, stage: str = "vocabulary") -> dict:
    """tokenizer.json of `tokenizer` as a dict; a clear error for a tokenizer that cannot be trimmed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SlimtuneError(f"{stage}: the model's tokenizer ({type(tokenizer).__name__}) is not a fast "
                            "sub-word tokenizer; only WordPiece vocabularies can be trimmed")
    spec = json.loads(backend.to_str())
    kind = (spec.get("model") or {}).get("type")
    if kind != "WordPiece":
        raise SlimtuneError(f"{stage}: the model's tokenizer is {kind}, not WordPiece; only WordPiece "
                            "vocabularies (BERT, MiniLM, MPNet, ...) can be trimmed")
    return spec


def kept_token_ids(tokenizer, encoded: Iterable[Sequence[int]], *, min_count: int = 1,
                   words: Sequence[str] = ()) -> list[int]:
    """The sorted ids to keep: specials, every single character (alone and as `##x`), the tokens of
    `encoded` used at least `min_count` times, and every piece of `words`."""
    spec = wordpiece_spec(tokenizer)
    vocab: dict[str, int] = spec["model"]["vocab"]
    prefix = spec["model"].get("continuing_subword_prefix") or ""
    keep = {t["id"] for t in spec.get("added_tokens") or []} | set(tokenizer.all_special_ids)
    keep |= {i for tok, i in vocab.items()
             if len(tok) == 1 or (prefix and tok.startswith(prefix) and len(tok) == len(prefix) + 1)}
    counts = Counter(chain.from_iterable(encoded))
    keep |= {int(i) for i, n in counts.items() if n >= min_count}
    if words:
        keep |= set(chain.from_iterable(tokenizer(list(words), add_special_tokens=False)["input_ids"]))
    return sorted(keep)


def trimmed_tokenizer(tokenizer, kept: Sequence[int]):
    """A tokenizer of the same class holding only the `kept` tokens, renumbered in their old order."""
    from transformers import AutoTokenizer

    spec = wordpiece_spec(tokenizer)
    new_id = {old: new for new, old in enumerate(kept)}
    vocab: dict[str, int] = spec["model"]["vocab"]
    spec["model"]["vocab"] = {tok: new_id[i] for tok, i in sorted(vocab.items(), key=lambda kv: kv[1])
                              if i in new_id}
    unk = spec["model"].get("unk_token")
    if unk is not None and unk not in spec["model"]["vocab"]:
        raise SlimtuneError(f"vocabulary: the unknown token {unk!r} would be dropped")
    for added in spec.get("added_tokens") or []:
        added["id"] = _renumber(added["id"], new_id, added.get("content"))
    _renumber_processor(spec.get("post_processor"), new_id)
    # padding and truncation are runtime state (transformers sets both at every call): left out, so that the
    # file does not depend on what the tokenizer last did
    spec["padding"] = spec["truncation"] = None
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        Path(tmp, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config_path = Path(tmp, "tokenizer_config.json")
        if config_path.is_file():
            config = json.loads(config_path.read_text(encoding="utf-8"))
            decoder = config.get("added_tokens_decoder")
            if isinstance(decoder, dict):
                config["added_tokens_decoder"] = {str(_renumber(int(i), new_id, t.get("content"))): t
                                                  for i, t in decoder.items()}
            config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        vocab_txt = Path(tmp, "vocab.txt")  # a slow tokenizer's file, where the class still writes one
        if vocab_txt.is_file():
            vocab_txt.write_text("".join(f"{t}\n" for t in spec["model"]["vocab"]), encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def check_same_tokens(old_tokenizer, new_tokenizer, kept: Sequence[int], texts: Sequence[str]) -> None:
    """The trimmed tokenizer must give `texts` (made of kept tokens) the old ids, renumbered: a mismatch is
    a bug in the rewrite, never the user's input."""
    new_id = {old: new for new, old in enumerate(kept)}
    before = old_tokenizer(list(texts))["input_ids"]
    after = new_tokenizer(list(texts))["input_ids"]
    for text, a, b in zip(texts, before, after, strict=True):
        if all(i in new_id for i in a) and [new_id[i] for i in a] != list(b):
            raise AssertionError(f"trimmed tokenizer changed the tokens of {text!r}: {a} -> {b}")


def trim_embeddings_(model: nn.Module, kept: Sequence[int]) -> None:
    """Keep the input-embedding rows `kept` (and the output-embedding rows, where the model has a
    language-model head), renumber the config's token ids and set its vocab_size."""
    emb = model.get_input_embeddings()
    if type(emb) is not nn.Embedding:
        raise SlimtuneError(f"vocabulary: the input embedding is a {type(emb).__name__}, not a plain "
                            "nn.Embedding; trim the vocabulary before quantizing")
    new_id = {old: new for new, old in enumerate(kept)}
    index = torch.tensor(list(kept), dtype=torch.long, device=emb.weight.device)
    pad = None if emb.padding_idx is None else new_id.get(emb.padding_idx)
    table = nn.Embedding(len(kept), emb.embedding_dim, padding_idx=pad, device=emb.weight.device,
                         dtype=emb.weight.dtype)
    with torch.no_grad():
        table.weight.copy_(emb.weight[index])
    table.weight.requires_grad_(emb.weight.requires_grad)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    model.set_input_embeddings(table)
    if isinstance(head, nn.Linear) and head.out_features == emb.num_embeddings:
        rows = nn.Linear(head.in_features, len(kept), bias=head.bias is not None, device=head.weight.device,
                         dtype=head.weight.dtype)
        with torch.no_grad():
            rows.weight.copy_(head.weight[index])
            if head.bias is not None:
                rows.bias.copy_(head.bias[index])
        model.set_output_embeddings(rows)
    config = model.config
    for key in ID_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int):
            setattr(config, key, new_id.get(value))
    config.vocab_size = len(kept)


def _renumber(old: int, new_id: dict[int, int], what) -> int:
    if old not in new_id:
        raise SlimtuneError(f"vocabulary: the special token {what!r} (id {old}) would be dropped")
    return new_id[old]


def _renumber_processor(processor: dict | None, new_id: dict[int, int]) -> None:
    """Token ids inside a post-processor: TemplateProcessing's special_tokens, Bert/RobertaProcessing's
    (token, id) pairs, and those of a Sequence's processors."""
    if not processor:
        return
    for inner in processor.get("processors") or []:
        _renumber_processor(inner, new_id)
    for special in (processor.get("special_tokens") or {}).values():
        special["ids"] = [_renumber(i, new_id, special.get("id")) for i in special.get("ids", [])]
    for key in ("sep", "cls"):
        pair = processor.get(key)
        if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int):
            pair[1] = _renumber(pair[1], new_id, pair[0])
