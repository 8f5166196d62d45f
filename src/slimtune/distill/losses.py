"""Distillation losses, injected into the one training loop.

soft targets   KL(teacher_T || student_T) * T^2 (Hinton et al. 2015; the T^2 keeps gradient size
               independent of T), mixed with hard-label cross-entropy: alpha * soft + (1 - alpha) * hard
hidden states  MSE between mapped student and teacher layers through a learned projection when the
               widths differ (TinyBERT), per token when both share a tokenizer, else on mean-pooled states
attention      KL between the teachers' and the student's attention distributions (TinyBERT), per
               head, when head counts match

Under the loop's bf16 autocast the logits and attention maps come out in bf16 and CPU autocast leaves
(log-)softmax in bf16: the losses take them to fp32 first (a no-op in fp32), so the soft targets and the
KL keep fp32's precision (a student close to its teacher has a KL of ~1e-3, below bf16's rounding of
its log-probabilities).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.batching import logits_of, model_inputs
from slimtune.errors import SlimtuneError


def soft_target_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    return F.kl_div(log_p, soft_targets, reduction="batchmean") * temperature**2


def logit_mse_loss(student_logits: torch.Tensor, soft_targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """Tang et al. 2019: MSE between student and teacher logits. Only the teacher's T-softened
    distribution is cached; T·log p recovers its logits up to a per-example constant, so both sides
    are centred (a softmax is blind to that constant anyway)."""
    teacher = temperature * torch.log(soft_targets.clamp_min(1e-12))
    center = lambda z: z - z.mean(-1, keepdim=True)  # noqa: E731
    return F.mse_loss(center(student_logits.float()), center(teacher))


def mixed_distill_loss(logits: torch.Tensor, soft_targets: torch.Tensor, labels: torch.Tensor, temperature: float,
                       alpha: float) -> torch.Tensor:
    """alpha * soft-target KL + (1 - alpha) * hard-label cross-entropy."""
    return alpha * soft_target_loss(logits, soft_targets, temperature) + (1 - alpha) * F.cross_entropy(logits, labels)


def online_distill_loss(teacher: nn.Module, temperature: float, alpha: float, hidden_weight: float = 0.0):
    """loss_fn(model, batch) for `train`: soft targets of a frozen `teacher` run on the same batch (the
    model a prune / low-rank / QAT stage started from), mixed with the labels by `alpha`; with
    `hidden_weight`, plus that times the token-level MSE of every hidden state (embeddings and each
    layer's output) against the teacher's, which must have the same layer count and width."""
    extra = {"output_hidden_states": True} if hidden_weight else {}

    def loss_fn(m, batch):
        inputs = model_inputs(batch)
        out = m(**inputs, **extra)
        with torch.no_grad():
            teacher_out = teacher(**inputs, **extra)
            target = torch.softmax(logits_of(teacher_out).float() / temperature, dim=-1)
        loss = mixed_distill_loss(logits_of(out), target, batch["labels"], temperature, alpha)
        if hidden_weight:
            loss = loss + hidden_weight * hidden_state_mse(out.hidden_states, teacher_out.hidden_states,
                                                           inputs["attention_mask"])
        return loss

    return loss_fn


def hidden_state_mse(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...],
                     mask: torch.Tensor) -> torch.Tensor:
    """Mean over layers of the per-element squared error of real (unpadded) tokens' hidden states."""
    if len(student) != len(teacher) or student[-1].shape[-1] != teacher[-1].shape[-1]:
        raise SlimtuneError(f"hidden-state loss: the model has {len(student) - 1} layers of width "
                            f"{student[-1].shape[-1]}, the frozen copy {len(teacher) - 1} of width "
                            f"{teacher[-1].shape[-1]}; it needs the same (not after dropping layers)")
    m = mask.unsqueeze(-1).to(student[0].dtype)
    per_layer = [((s - t) ** 2 * m).sum() / (m.sum() * s.shape[-1]).clamp(min=1)
                 for s, t in zip(student, teacher, strict=True)]
    return torch.stack(per_layer).mean()


def cached_distill_loss(temperature: float, alpha: float):
    """loss_fn(model, batch) for `train` when the batch carries precomputed `soft_targets` [B, C]
    (a teacher labelled the train set once; see `teacher_soft_targets`)."""

    def loss_fn(m, batch):
        logits = logits_of(m(**model_inputs(batch)))
        return mixed_distill_loss(logits, batch["soft_targets"], batch["labels"], temperature, alpha)

    return loss_fn


def layer_mapping(rule, n_student: int, n_teacher: int) -> list[tuple[int, int]]:
    """(student, teacher) hidden-state indices; 0 is the embedding output, i the output of layer i."""
    if rule == "uniform":  # student layer s learns from teacher layer s * Lt / Ls (TinyBERT's g(m))
        return [(s, round(s * n_teacher / n_student)) for s in range(1, n_student + 1)]
    if rule == "last":
        return [(n_student, n_teacher)]
    pairs = [(int(s), int(t)) for s, t in rule]
    for s, t in pairs:
        if not 0 <= s <= n_student:
            raise SlimtuneError(f"intermediate.mapping: student layer {s} out of range (0-{n_student}; 0 = embeddings)")
        if not 0 <= t <= n_teacher:
            raise SlimtuneError(f"intermediate.mapping: teacher layer {t} out of range (0-{n_teacher}; 0 = embeddings)")
    return pairs


class DistillModel(nn.Module):
    """The student plus the projections the hidden-state loss learns; only the student is kept."""

    def __init__(self, student: nn.Module, mapping: list[tuple[int, int]], student_widths: list[int],
                 teacher_width: int):
        """`student_widths[s]`: width of the student's hidden state s (0 = embeddings)."""
        super().__init__()
        self.student = student
        # Identity when widths match: a projection would let the student's states drift from the teacher's.
        self.projections = nn.ModuleDict({
            f"{s}_{t}": nn.Linear(student_widths[s], teacher_width) if student_widths[s] != teacher_width
            else nn.Identity() for s, t in mapping})

    @property
    def config(self):
        """The student's: what the loop reads of the model it trains (its width, for the precision)."""
        return getattr(self.student, "config", None)

    def forward(self, **inputs):
        return self.student(**inputs)


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


def _attention_kl(teacher_att: torch.Tensor, student_att: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """KL over keys for every real query position, averaged over heads and positions."""
    eps = 1e-8
    teacher_att, student_att = teacher_att.float(), student_att.float()
    kl = (teacher_att * ((teacher_att + eps).log() - (student_att + eps).log())).sum(-1)  # [B, H, L]
    q = mask.unsqueeze(1).to(kl.dtype)
    return (kl * q).sum() / (q.sum() * kl.shape[1]).clamp(min=1)


def make_distill_loss(*, temperature: float, alpha: float, mapping: list[tuple[int, int]] | None = None,
                      granularity: str = "pooled", use_mse: bool = False, use_attention: bool = False,
                      weight: float = 1.0, online_teacher: nn.Module | None = None, soft_loss: str = "kl"):
    """loss_fn(model: DistillModel, batch) for `train`. The batch carries `soft_targets` [B, C],
    `labelled` [B] (hard loss only on examples with a trusted label) and, for pooled matching,
    `pooled{t}` [B, Ht] teacher states; token-level matching runs `online_teacher` on the batch."""
    mapping = mapping or []
    need_hidden = bool(mapping) and use_mse
    soft_fn = logit_mse_loss if soft_loss == "mse" else soft_target_loss

    def loss_fn(model: DistillModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = model_inputs(batch)
        out = model.student(**inputs, **({"output_hidden_states": True} if need_hidden else {}),
                            **({"output_attentions": True} if use_attention else {}))
        logits = out.logits
        loss = alpha * soft_fn(logits, batch["soft_targets"], temperature) if alpha > 0 else 0.0
        labelled = batch["labelled"]
        if alpha < 1 and bool(labelled.any()):
            loss = loss + (1 - alpha) * F.cross_entropy(logits[labelled], batch["labels"][labelled])
        if not mapping:
            return loss
        mask = inputs["attention_mask"]
        teacher_out = None
        if granularity == "token":
            with torch.no_grad():
                teacher_out = online_teacher(**inputs, output_hidden_states=use_mse, output_attentions=use_attention)
        for s, t in mapping:
            if use_mse:
                proj = model.projections[f"{s}_{t}"]
                if granularity == "pooled":
                    loss = loss + weight * F.mse_loss(proj(_pooled(out.hidden_states[s], mask)), batch[f"pooled{t}"])
                else:
                    diff = (proj(out.hidden_states[s]) - teacher_out.hidden_states[t]) ** 2
                    m = mask.unsqueeze(-1).to(diff.dtype)
                    loss = loss + weight * (diff * m).sum() / (m.sum() * diff.shape[-1]).clamp(min=1)
            if use_attention and s > 0 and t > 0:  # attentions[i - 1] belongs to layer i's output
                loss = loss + weight * _attention_kl(teacher_out.attentions[t - 1], out.attentions[s - 1], mask)
        return loss

    return loss_fn
