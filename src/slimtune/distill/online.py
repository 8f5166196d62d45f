"""Distillation with the teachers run online, frozen, on every training batch.

For outputs too large to cache: a language model's next-token distribution covers its whole vocabulary
at every position (SmolLM2: 49,152 probabilities x every train token, hundreds of GB for a few million
tokens), so the teachers run on the student's own batch instead of labelling the transfer set once.

The loss (Hinton et al. 2015) works on the rows the run's task picks from the logits (`distill_rows`:
one per scored next-token position for a language model, the positions its cross-entropy scores):

    alpha * KL(teacher_T || student_T) * T^2  +  (1 - alpha) * cross-entropy on the true next tokens

both averaged over the rows. Several teachers give the weighted average of their T-softened
distributions. Teachers and student must share the vocabulary: the distributions are compared index by
index, so a token's id has to mean the same token on both sides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.batching import logits_of, model_inputs
from slimtune.distill.losses import soft_target_loss
from slimtune.distill.teachers import Teacher
from slimtune.errors import SlimtuneError
from slimtune.models import load_tokenizer, resolve_model_path

RowsFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor]]
IGNORE = -100  # a row without a hard target (cross_entropy's default ignore_index)


def vocabulary_problem(tokenizer, config, other_tokenizer, other_config) -> str | None:
    """Why two models' outputs cannot be compared token by token (None: they can): another vocabulary
    (the same tokens under the same ids), or another output width (a padded embedding matrix)."""
    vocab, other = tokenizer.get_vocab(), other_tokenizer.get_vocab()
    if vocab != other:
        only = sorted(set(vocab) ^ set(other))
        if only:
            detail = f"{len(vocab):,} vs {len(other):,} tokens, e.g. {only[0]!r} in one only"
        else:
            moved = next(t for t in vocab if vocab[t] != other[t])
            detail = f"token {moved!r} has id {vocab[moved]} vs {other[moved]}"
        return f"the vocabularies differ ({detail})"
    width, other_width = getattr(config, "vocab_size", None), getattr(other_config, "vocab_size", None)
    if width != other_width:
        return f"the output widths differ (vocab_size {width} vs {other_width})"
    return None


def check_shared_vocabulary(student_tokenizer, student_config, teachers: Sequence[tuple[str, object, object]],
                            data_tokenizer=None) -> None:
    """Every teacher ((name, tokenizer, config)) must share the student's vocabulary, and the student the
    one the run's data was encoded with (`data_tokenizer`); one line naming the pair otherwise."""
    for name, tokenizer, config in teachers:
        problem = vocabulary_problem(tokenizer, config, student_tokenizer, student_config)
        if problem:
            raise SlimtuneError(f"teacher '{name}': {problem} between it and the student; distilling a "
                                "language model needs one tokenizer for teacher and student")
    if data_tokenizer is not None and data_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise SlimtuneError("student: its vocabulary differs from the run's model's, which encoded the data; "
                            "choose a student with the same tokenizer")


def load_online_teachers(specs, load: Callable[[Path], nn.Module]) -> list[Teacher]:
    """The teachers (TeacherSpec) loaded with the run's task's `load`, frozen and in eval mode."""
    teachers = []
    for spec in specs:
        path = resolve_model_path(spec.path)
        model = load(path)
        model.requires_grad_(False)
        teachers.append(Teacher(spec.path, path, model.eval(), load_tokenizer(path), spec.weight))
    return teachers


@torch.no_grad()  # no_grad, not inference_mode: kl_div keeps its target for the backward pass
def teacher_distribution(teachers: Sequence[Teacher], inputs: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                         rows: RowsFn, temperature: float) -> torch.Tensor:
    """[N, V]: the weighted average of the teachers' T-softened distributions on the batch's rows."""
    total = sum(t.weight for t in teachers)
    out = None
    for t in teachers:
        logits, _ = rows(logits_of(t.model(**inputs)), batch)
        probs = torch.softmax(logits.float() / temperature, dim=-1) * (t.weight / total)
        out = probs if out is None else out.add_(probs)
    return out


def row_distill_loss(teachers: Sequence[Teacher], rows: RowsFn, temperature: float, alpha: float):
    """loss_fn(model, batch) for `train`: the module docstring's mix on the rows `rows(logits, batch)`
    picks. With alpha 0 the teachers are not run at all (plain training on the hard targets)."""

    def loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch)
        logits = logits_of(model(**inputs))
        student, targets = rows(logits, batch)
        if student.shape[0] == 0:  # nothing scored in this batch: a zero that keeps the graph
            return logits.sum() * 0.0
        student = student.float()
        loss = student.new_zeros(())
        if alpha > 0:
            soft = teacher_distribution(teachers, inputs, batch, rows, temperature)
            loss = loss + alpha * soft_target_loss(student, soft, temperature)
        if alpha < 1 and bool((targets != IGNORE).any()):
            loss = loss + (1 - alpha) * F.cross_entropy(student, targets, ignore_index=IGNORE)
        return loss

    return loss_fn
