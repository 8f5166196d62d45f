"""Atomic training checkpoints: each one is complete or absent.

A checkpoint is a directory `OUT/checkpoints/ckpt-NNNNNN/` holding
  model.safetensors   the full state dict of the module being trained
  trainer.pt          optimizer + scheduler state and the torch RNG state (loaded weights_only=True)
  state.json          loop counters, history, and what the runner needs to skip finished stages
It is written under a temporary name and renamed into place, so a kill at any moment leaves
either the previous checkpoints or the new one, never a torn one.

Under torchrun only rank 0 writes (every rank holds the same weights); the kept best is read by rank 0 and
broadcast, and a stage-start snapshot is written before the other ranks go on (a barrier).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from slimtune.distributed import barrier, broadcast_module_, is_main, on_main

CKPT_PATTERN = re.compile(r"^ckpt-(\d{6})$")
KEEP_LAST = 2  # the newest is enough to resume; one more guards against a bad disk write


def state_dict_for_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """A safetensors-safe state dict: contiguous clones, shared storages de-duplicated by name."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue  # a tied weight (e.g. decoder = embeddings): safetensors refuses shared storage
        seen.add(key)
        out[name] = t.detach().to("cpu", copy=True).contiguous()  # a copy, on the CPU whatever the device
    return out


def load_weights(model: nn.Module, path: Path) -> None:
    state = load_file(str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Missing keys may only be tied duplicates we skipped on save (they share storage with a loaded key).
    if unexpected or any(not _is_tied(model, k) for k in missing):
        raise RuntimeError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")


def _is_tied(model: nn.Module, key: str) -> bool:
    sd = model.state_dict()
    ptr = sd[key].data_ptr()
    return any(k != key and v.data_ptr() == ptr for k, v in sd.items())


class CheckpointStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.pinned: Path | None = None  # the checkpoint a resume started from: read again by later phases

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name)
                 and (p / "state.json").is_file()]
        return sorted(found)

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, model: nn.Module, trainer_state: dict, state: dict) -> Path | None:
        """A new complete checkpoint (rank 0 only: other ranks write nothing and get None)."""
        if not is_main():
            return None
        self.root.mkdir(parents=True, exist_ok=True)
        latest = self.latest()
        seq = int(CKPT_PATTERN.match(latest.name).group(1)) + 1 if latest else 1
        final = self.root / f"ckpt-{seq:06d}"
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=self.root))
        try:
            save_file(state_dict_for_save(model), str(tmp / "model.safetensors"))
            torch.save(trainer_state, tmp / "trainer.pt")
            # state.json last: its presence marks the checkpoint complete even before the rename
            (tmp / "state.json").write_text(json.dumps(state, indent=1, default=_json_of), encoding="utf-8")
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for old in self.complete()[:-KEEP_LAST]:
            if old != self.pinned:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def save_best(self, model: nn.Module, info: dict) -> None:
        """Best-so-far weights for `keep_best`, kept across a resume (written by rank 0)."""
        if not is_main():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".best.tmp-", suffix=".safetensors", dir=self.root)
        os.close(fd)
        save_file(state_dict_for_save(model), tmp)
        os.replace(tmp, self.root / "best.safetensors")
        (self.root / "best.json").write_text(json.dumps(info), encoding="utf-8")

    def load_best(self, model: nn.Module) -> dict | None:
        """The kept best weights into `model` (None: none kept). Under torchrun rank 0 reads them and sends
        them to the other ranks, which need not see its filesystem."""
        info = on_main(lambda: self._read_best(model))
        broadcast_module_(model)
        return info

    def _read_best(self, model: nn.Module) -> dict | None:
        path = self.root / "best.safetensors"
        if not path.is_file():
            return None
        load_weights(model, path)
        info = self.root / "best.json"
        return json.loads(info.read_text(encoding="utf-8")) if info.is_file() else {}

    def clear_best(self) -> None:
        if not is_main():
            return
        for name in ("best.safetensors", "best.json"):
            (self.root / name).unlink(missing_ok=True)


def stage_start_snapshot(run, model: nn.Module) -> None:
    """Keep the weights a stage starts from in OUT/checkpoints/, so a killed stage that cannot resume
    mid-way (its structure changes as it runs) restarts from them; on resume, load them back."""
    if run.checkpoints is None:
        return
    path = run.checkpoints.root / f"stage-start-s{run.stage_index}.safetensors"
    if run.resume is not None and path.is_file():
        load_weights(model, path)
        return
    if is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(state_dict_for_save(model), str(tmp))
        tmp.replace(path)
    barrier()  # complete before any rank goes on (and may be killed and resumed)


def _json_of(value):
    """Typed records in a checkpoint's state (the runner's progress): their dict form."""
    if hasattr(value, "to_dict"):
        return value.to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """(state.json, trainer.pt) of a complete checkpoint; trainer.pt is loaded weights-only."""
    state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    trainer = torch.load(path / "trainer.pt", map_location="cpu", weights_only=True)
    return state, trainer
