"""Exponential moving average of a model's trainable weights (Polyak averaging), for the one loop.

Late in training, SGD's weights keep moving around a good region instead of settling in it; their
running average sits nearer its centre and usually generalises better than the last iterate (Polyak &
Juditsky 1992; the EMA that timm and diffusion training keep). With `ema_decay` set, `train` keeps
such an average from `start` on, and every evaluation, the kept best state and the final model use the
averaged weights. torch's `swa_utils.AveragedModel` keeps a deep copy of the whole module; this keeps
only the trainable tensors, so a pruning mask (a buffer) or a frozen embedding table is never copied or
averaged, and the average can be swapped into the model being trained for an evaluation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class WeightEMA:
    """shadow <- decay * shadow + (1 - decay) * weight after each optimizer step, per trainable tensor."""

    def __init__(self, model: nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"ema decay {decay}: expected 0 < decay < 1")
        self.decay = decay
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self.shadow = {name: p.detach().clone() for name, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        for name, p in self.params.items():
            self.shadow[name].lerp_(p.detach(), 1 - self.decay)

    @torch.no_grad()
    def _copy_into_model(self, values: dict[str, torch.Tensor]) -> None:
        for name, p in self.params.items():
            p.copy_(values[name])

    @contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model for the duration (an evaluation, a best-state save)."""
        trained = {name: p.detach().clone() for name, p in self.params.items()}
        self._copy_into_model(self.shadow)
        try:
            yield
        finally:
            self._copy_into_model(trained)

    def copy_to_model(self) -> None:
        """Make the average the model's weights for good (the end of training)."""
        self._copy_into_model(self.shadow)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if set(state) != set(self.shadow):
            raise ValueError("ema state does not match the model's trainable tensors")
        for name, value in state.items():
            self.shadow[name].copy_(value)
