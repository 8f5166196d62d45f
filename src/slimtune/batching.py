"""Encoded datasets, dynamic padding and length-bucketed batching.

Why bucketing: on a CPU the cost of a transformer step is roughly proportional to the padded
batch length. Random batches of SST-2 pad every sentence to the longest of 32 random ones; batches
drawn from length-sorted pools pad to their neighbours' length, which roughly halves the tokens a
step processes. The batch *order* is still shuffled, so the optimiser sees a random mix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from slimtune.distributed import to_device


@dataclass
class EncodedDataset:
    """Token ids of a labelled split, unpadded (padding happens per batch in `collate`)."""

    input_ids: list[list[int]]
    labels: list[int]
    token_type_ids: list[list[int]] | None = None
    texts: list[str] = field(default_factory=list)  # the cleaned texts, for reports and augmentation
    pairs: list[str] | None = None  # the cleaned second texts of pair tasks (re-encoding for a new tokenizer)
    token_labels: list[list[int]] | None = None  # per-token targets (causal LM: -100 where nothing is scored)

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(x) for x in self.input_ids), dtype=np.int64, count=len(self.input_ids))

    def subset(self, indices) -> EncodedDataset:
        idx = [int(i) for i in indices]
        return EncodedDataset(
            input_ids=[self.input_ids[i] for i in idx],
            labels=[self.labels[i] for i in idx],
            token_type_ids=None if self.token_type_ids is None else [self.token_type_ids[i] for i in idx],
            texts=[self.texts[i] for i in idx] if self.texts else [],
            pairs=None if self.pairs is None else [self.pairs[i] for i in idx],
            token_labels=None if self.token_labels is None else [self.token_labels[i] for i in idx],
        )


def encode(tokenizer, texts: list[str], labels: list[int], pairs: list[str] | None = None,
           max_length: int = 128) -> EncodedDataset:
    """Tokenize with the model's (fast) tokenizer, truncating to `max_length`, without padding."""
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length, padding=False)
    tti = enc.get("token_type_ids")
    # Single-text inputs have all-zero token types: drop them to save memory and a tensor per step.
    if tti is not None and pairs is None:
        tti = None
    return EncodedDataset(input_ids=list(enc["input_ids"]), labels=list(labels), token_type_ids=tti,
                          texts=list(texts), pairs=None if pairs is None else list(pairs))


def pad_id_of(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else 0 (masked out either way)."""
    pid = getattr(tokenizer, "pad_token_id", None)
    return 0 if pid is None else int(pid)


def calibration_batches(ds: EncodedDataset, n_batches: int, batch_size: int, seed: int, pad_id: int,
                        collate_fn: Callable | None = None, device: torch.device | None = None) -> list[dict]:
    """The first `n_batches` batches of a seeded shuffle of `ds`: what pruning importance, activation
    ranges, GPTQ/AWQ statistics and static int8 export all calibrate on (the same rows for the same seed).
    `collate_fn(ds, indices, pad_id)`: the task's collation (default: one label per row); `device`: where the
    statistics are computed (the model's device; None: the CPU)."""
    order = batch_indices(ds.lengths, batch_size, shuffle=True, seed=seed)
    batches = [(collate_fn or collate)(ds, idx, pad_id) for idx in order[:n_batches]]
    return batches if device is None else [to_device(b, device) for b in batches]


def batch_indices(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0,
                  bucket: bool = True, pool_batches: int = 50) -> list[list[int]]:
    """Split example indices into batches.

    shuffle=False (evaluation): sorted by length when `bucket`, so padding is minimal.
    shuffle=True (training): shuffle, cut into pools of `pool_batches` batches, sort each pool by
    length, cut into batches and shuffle the batches. Deterministic for a given `seed`, which is
    what makes resuming mid-epoch exact.
    """
    n = len(lengths)
    if not shuffle:
        order = np.argsort(lengths, kind="stable") if bucket else np.arange(n)
        return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    if not bucket:
        return [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    pool = batch_size * pool_batches
    batches: list[list[int]] = []
    for start in range(0, n, pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size].tolist() for i in range(0, len(chunk), batch_size))
    perm = rng.permutation(len(batches))
    return [batches[i] for i in perm]


def collate(ds: EncodedDataset, indices: list[int], pad_id: int = 0,
            with_labels: bool = True) -> dict[str, torch.Tensor]:
    """Pad one batch to its own longest sequence (dynamic padding)."""
    seqs = [ds.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if ds.token_type_ids is not None:
        tti = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, i in enumerate(indices):
            t = ds.token_type_ids[i]
            tti[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        batch["token_type_ids"] = tti
    if with_labels:
        batch["labels"] = torch.tensor([ds.labels[i] for i in indices], dtype=torch.long)
    return batch


def model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the model's forward takes: everything but labels and loss-only extras."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def logits_of(out) -> torch.Tensor:
    """The logits of any model output (a tensor, a tuple whose first item they are, or a ModelOutput)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, tuple | list):
        return out[0]
    return out.logits


def cross_entropy_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The classifier's loss on a batch's labels (a task's loss, and the default of the loop and of
    gradient importance when no task is given)."""
    return torch.nn.functional.cross_entropy(logits_of(model(**model_inputs(batch))), batch["labels"])
