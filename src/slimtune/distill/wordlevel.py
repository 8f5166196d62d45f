"""Building a word-level student from a teacher: its vocabulary from the task texts (plus the teacher's
whole words and the language's frequent words), embeddings initialised from the teacher's input
embeddings or contextual vectors (Model2Vec-style). The models themselves are in `slimtune.wordmodels`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from slimtune.distill.wordvectors import (
    cached_word_vectors,
    contextual_word_vectors,
    principal_components,
    teacher_whole_words,
)
from slimtune.errors import SlimtuneError
from slimtune.wordmodels import SPECIALS, WORD_ARCHS, WordTokenizer, word_config


# ------------------------------------------------------------------------------- teacher init, build
@torch.no_grad()
def init_embeddings_from_teacher(model: nn.Module, word_tokenizer: WordTokenizer, teacher_model: nn.Module,
                                 teacher_tokenizer) -> int:
    """Each word's row = mean of the teacher's input embeddings of its sub-tokens; returns words set.

    The specials keep their own init ([PAD] stays zero).
    """
    source = teacher_model.get_input_embeddings().weight.detach()
    target = model.get_input_embeddings().weight
    if source.shape[1] != target.shape[1]:
        raise SlimtuneError(f"word student embed_dim {target.shape[1]} != teacher embedding size {source.shape[1]}: "
                            f"build the student with embed_dim={source.shape[1]} to initialise it from the teacher")
    words = word_tokenizer.words[len(SPECIALS):]
    if not words:
        return 0
    pieces = teacher_tokenizer(words, add_special_tokens=False)["input_ids"]
    done = 0
    for row, ids in enumerate(pieces, start=len(SPECIALS)):
        ids = [i for i in ids if i < source.shape[0]]
        if ids:
            target[row] = source[ids].mean(0).to(target.dtype)
            done += 1
    return done


def build_word_student(arch: str, texts: Iterable[str], id2label: dict[int, str],
                       label2id: dict[str, int] | None = None, *, hidden: int = 256, embed_dim: int = 300,
                       chinese: bool = False, lowercase: bool = True, max_vocab: int = 30000, min_freq: int = 1,
                       teacher: nn.Module | None = None, teacher_tokenizer=None,
                       init_from_teacher: str | None = "input", embedding_layer: int | None = None,
                       extend_vocab: bool = False, extra_words: Sequence[str] = (), pca_dims: int | None = None,
                       vector_cache: tuple[Path, str] | None = None, dropout: float = 0.2,
                       num_layers: int = 1,
                       kernel_sizes: Sequence[int] = (3, 4, 5)) -> tuple[nn.Module, WordTokenizer]:
    """Vocabulary from `texts` + a fresh word classifier (random init from the caller's torch seed).

    With a teacher and `init_from_teacher` ("input": the mean of each word's sub-token input embeddings;
    "contextual": `contextual_word_vectors`), embed_dim becomes the teacher's hidden size and the word
    embeddings start from the teacher; None leaves them random. `extend_vocab` (contextual only) also
    gives a vector to every whole word of the teacher's vocabulary, and `extra_words` (contextual only) to
    these words, so words the texts lack are not [UNK]; both come on top of `max_vocab`. `pca_dims`
    (contextual only) keeps that many principal components of the vectors (`principal_components`).
    `vector_cache` = (directory, teacher content hash): contextual vectors are computed once per teacher,
    layer and word list and read back from there (100k words take minutes on a CPU).
    """
    if init_from_teacher not in (None, "input", "contextual"):
        raise SlimtuneError(f"init_embeddings {init_from_teacher!r}: expected input, contextual or false")
    use_teacher = teacher is not None and init_from_teacher is not None
    if use_teacher and teacher_tokenizer is None:
        raise SlimtuneError("initialising word embeddings from the teacher needs the teacher's tokenizer")
    for key, asked in (("extend_vocab", extend_vocab), ("extra_words", bool(extra_words)),
                       ("pca_dims", pca_dims is not None)):
        if asked and not (use_teacher and init_from_teacher == "contextual"):
            raise SlimtuneError(f"{key} needs init_embeddings: contextual (it works on the teacher's word vectors)")
    tokenizer = WordTokenizer.build(texts, max_vocab=max_vocab, min_freq=min_freq, lowercase=lowercase,
                                    chinese=chinese,
                                    extra_words=[*(teacher_whole_words(teacher_tokenizer) if extend_vocab else ()),
                                                 *extra_words])
    vectors = None
    if use_teacher and init_from_teacher == "contextual" and len(tokenizer) > len(SPECIALS):
        words = tokenizer.words[len(SPECIALS):]
        if vector_cache is None:
            vectors = contextual_word_vectors(words, teacher, teacher_tokenizer, embedding_layer)
        else:
            vectors = cached_word_vectors(words, teacher, teacher_tokenizer, embedding_layer, *vector_cache)
        if pca_dims is not None:
            vectors = principal_components(vectors, pca_dims)
    if use_teacher:
        embed_dim = vectors.shape[1] if vectors is not None else teacher.get_input_embeddings().weight.shape[1]
    config = word_config(arch, tokenizer.vocab_size, id2label, label2id, embed_dim=embed_dim, hidden=hidden,
                         num_layers=num_layers, kernel_sizes=kernel_sizes, dropout=dropout)
    model = WORD_ARCHS[arch](config)
    if vectors is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[len(SPECIALS):] = vectors.to(model.embeddings.weight.dtype)
    elif use_teacher and init_from_teacher == "input":
        init_embeddings_from_teacher(model, tokenizer, teacher, teacher_tokenizer)
    return model, tokenizer
