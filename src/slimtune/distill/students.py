"""Students: the run's model, another local model, a layer selection of a model, or a word-level net.

A student brings its own tokenizer; with per-example targets (a classifier) the distill stage
re-encodes the texts with it, so a student never has to share the teacher's vocabulary (only the
logits, and pooled hidden states, are matched). Per-token targets (a causal LM) compare distributions
over the vocabulary index by index: there teacher and student share one (`distill.online`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from slimtune.adapt.layers import anatomy
from slimtune.assets import slimtune_home
from slimtune.config import StudentSpec
from slimtune.distill.teachers import content_hash
from slimtune.distill.wordlevel import build_word_student
from slimtune.errors import SlimtuneError
from slimtune.models import load_for_classification, load_tokenizer, resolve_model_path
from slimtune.wordlists import extra_word_list, is_chinese


@dataclass
class Student:
    model: nn.Module
    tokenizer: object
    kind: str  # "current" | "model" | "layers" | "bilstm" | "cnn"
    source: str  # where it came from, for the report


# `student: {from: current}`: the run's own model (with `layers`, a selection of it). A recipe that reproduces a
# search's choice says so instead of naming the search's base directory, so that it runs on other data.
CURRENT = "current"


def select_layers(model: nn.Module, layers: list[int] | int) -> nn.Module:
    """A copy of `model` keeping only encoder (or decoder) layers `layers` (in that order; a count: see
    `layer_indices`), same width.

    This is the DistilBERT initialisation (every other layer of the teacher). The copy stays a plain
    HF model: `num_hidden_layers` and per-layer config lists are updated, so it saves and loads with
    transformers alone.
    """
    an = anatomy(model)
    layers = layer_indices(layers, an.num_layers)
    student = copy.deepcopy(model)
    parent_name, attr = an.layers.rsplit(".", 1)
    parent = student.get_submodule(parent_name)
    old = getattr(parent, attr)
    setattr(parent, attr, nn.ModuleList([old[i] for i in layers]))
    student.config.num_hidden_layers = len(layers)
    for key, value in list(vars(student.config).items()):  # e.g. layer_types: a decoder's KV cache is built from it
        if "layer" in key and isinstance(value, list | tuple) and len(value) == an.num_layers:
            setattr(student.config, key, type(value)(value[i] for i in layers))
    for new_index, layer in enumerate(getattr(parent, attr)):  # layer_idx is used by caches/masks in HF 5
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    return student


def layer_indices(layers: list[int] | int, num_layers: int) -> list[int]:
    """The layers a `student.layers` keeps: a list as given (checked), or for a count N, N evenly spaced
    layers with the first and the last kept (30 -> 20 drops about every third layer)."""
    if isinstance(layers, list):
        check_layers(layers, num_layers)
        return layers
    if not 1 <= layers <= num_layers:
        raise SlimtuneError(f"student.layers: {layers} layers asked, the model has {num_layers}")
    if layers == 1:
        return [0]
    return [round(i * (num_layers - 1) / (layers - 1)) for i in range(layers)]


def check_layers(layers: list[int], num_layers: int) -> None:
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise SlimtuneError(f"student.layers: index {bad[0]} out of range (the model has {num_layers} "
                            f"encoder layers: 0-{num_layers - 1})")
    if len(set(layers)) != len(layers) or not layers:
        raise SlimtuneError(f"student.layers: {layers} must be a non-empty list of distinct layer indices")


def student_blueprint(spec: StudentSpec, *, current_config, current_tokenizer, teacher_path, teacher_tokenizer):
    """(kind, config, tokenizer) of the student a spec asks for, from configs only: cheap enough to check
    every stage's input before a run starts. `config` is None for word-level students."""
    from transformers import AutoConfig

    if spec.arch is not None:
        if spec.layers is not None:
            raise SlimtuneError(f"student: 'layers' and 'arch: {spec.arch}' cannot be combined")
        return spec.arch, None, None
    if spec.from_ == CURRENT:
        config, tokenizer = current_config, current_tokenizer
        if spec.layers is None:
            return "current", config, tokenizer
    elif spec.from_:
        path = resolve_model_path(spec.from_)
        config, tokenizer = AutoConfig.from_pretrained(path, local_files_only=True), load_tokenizer(path)
    elif spec.layers is not None:
        config, tokenizer = AutoConfig.from_pretrained(teacher_path, local_files_only=True), teacher_tokenizer
    else:
        return "current", current_config, current_tokenizer
    if spec.layers is None:
        return "model", config, tokenizer
    kept = layer_indices(spec.layers, int(getattr(config, "num_hidden_layers", 0) or 0))
    config = copy.deepcopy(config)
    config.num_hidden_layers = len(kept)
    return "layers", config, tokenizer


def build_student(spec: StudentSpec, *, current: nn.Module, current_tokenizer, teacher_model: nn.Module,
                  teacher_tokenizer, id2label: dict[int, str], texts: list[str], teacher_path: Path | None = None,
                  load: Callable[[Path], nn.Module] | None = None) -> Student:
    """The student a `student:` spec asks for (see StudentSpec). `teacher_path`: word vectors read from
    the teacher are cached on disk under its content hash. `load(path)`: how a `from` model loads (the
    run's task's loader; default a classifier over `id2label`)."""
    if spec.arch is not None:
        return _word_student(spec, teacher_model, teacher_tokenizer, id2label, texts, teacher_path)
    load = load or (lambda path: load_for_classification(path, id2label))
    if spec.layers is not None:
        if spec.from_ == CURRENT:
            base, tokenizer, source = current, current_tokenizer, "the run's model"
        elif spec.from_:
            source_path = resolve_model_path(spec.from_)
            base, tokenizer, source = load(source_path), load_tokenizer(source_path), spec.from_
        else:
            base, tokenizer, source = teacher_model, teacher_tokenizer, "teacher"
        kept = layer_indices(spec.layers, anatomy(base).num_layers)
        return Student(select_layers(base, kept), tokenizer, "layers", f"{source} layers {kept}")
    if spec.from_ and spec.from_ != CURRENT:
        path = resolve_model_path(spec.from_)
        return Student(load(path), load_tokenizer(path), "model", spec.from_)
    return Student(current, current_tokenizer, "current", "the run's model")


def _word_student(spec: StudentSpec, teacher_model, teacher_tokenizer, id2label, texts, teacher_path) -> Student:
    label2id = {name: i for i, name in id2label.items()}
    # Chinese has no spaces between words: the vocabulary is built from jieba words (segmenting text that
    # data.segment_chinese already segmented is harmless: it only splits at the spaces it finds).
    chinese = is_chinese(texts)
    model, tokenizer = build_word_student(
        spec.arch, texts, id2label, label2id, hidden=spec.hidden, embed_dim=spec.embed_dim, chinese=chinese,
        max_vocab=spec.max_vocab, dropout=spec.dropout, teacher=teacher_model, teacher_tokenizer=teacher_tokenizer,
        init_from_teacher={True: "input", False: None}.get(spec.init_embeddings, spec.init_embeddings),
        embedding_layer=spec.embedding_layer, extend_vocab=spec.extend_vocab,
        extra_words=extra_word_list(spec.extra_words, chinese), pca_dims=spec.pca_dims,
        # the teacher's weights are hashed only when its contextual vectors are read
        vector_cache=(slimtune_home() / "word-vectors", content_hash(teacher_path))
        if teacher_path and spec.init_embeddings == "contextual" else None)
    return Student(model, tokenizer, spec.arch, f"{spec.arch} (vocabulary of {len(tokenizer)} words)")


def encoder_shape(cfg) -> tuple[int, int, int] | None:
    """(layers, hidden size, attention heads) of a transformer config, None for models without layers."""
    layers = getattr(cfg, "num_hidden_layers", None)
    if not layers or getattr(cfg, "slimtune_format", None) == "word-classifier":
        return None
    return int(layers), int(cfg.hidden_size), int(cfg.num_attention_heads)
