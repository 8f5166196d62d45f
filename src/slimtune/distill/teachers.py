"""Teachers: load and check them, compute their outputs once, cache them on disk, combine them.

Running a 109M-parameter teacher every epoch would cost more than training the student, so each
teacher labels the transfer set once: logits (and, for pooled intermediate losses, mean-pooled
hidden states of the mapped layers) go into one safetensors file keyed by a hash of the teachers'
weights and the exact encoded data. A file written for other data or teachers is refused, never
silently reused. Under torchrun one process per machine runs the teachers and writes the file while the
others wait, then every rank reads it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from slimtune.assets import slimtune_home
from slimtune.batching import EncodedDataset, batch_indices, collate, encode, model_inputs
from slimtune.config import TeacherSpec
from slimtune.distributed import device_of, once_per_node, to_device
from slimtune.errors import SlimtuneError
from slimtune.models import load_model, load_tokenizer, read_config, resolve_model_path

CACHE_VERSION = "1"  # bump when what is cached changes


@dataclass
class Teacher:
    name: str  # as written in the recipe
    path: Path
    model: nn.Module
    tokenizer: object
    weight: float

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id or 0)

    @property
    def num_layers(self) -> int:
        return int(getattr(self.model.config, "num_hidden_layers", 0) or 0)

    @property
    def hidden_size(self) -> int:
        return int(getattr(self.model.config, "hidden_size", 0) or 0)


def check_teacher(spec, id2label: dict[int, str]) -> Path:
    """A teacher must be a classifier over exactly the data's labels (same ids, same names)."""
    path = resolve_model_path(spec.path)
    theirs = {int(k): str(v) for k, v in (read_config(path).get("id2label") or {}).items()}
    if theirs != id2label:
        raise SlimtuneError(f"teacher '{spec.path}': its labels {theirs} differ from the data's {id2label} "
                            "(fine-tune the teacher on this task's labels first)")
    return path


def load_teachers(specs, id2label: dict[int, str], device: torch.device | None = None) -> list[Teacher]:
    teachers = []
    for spec in specs:
        path = check_teacher(spec, id2label)
        model = load_model(path)
        model.requires_grad_(False)
        if device is not None:
            model.to(device)
        teachers.append(Teacher(spec.path, path, model.eval(), load_tokenizer(path), spec.weight))
    return teachers


def content_hash(path: Path) -> str:
    """Hash of a model directory's config and weights (content, so a retrained teacher is new)."""
    h = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name != "README.md":
            h.update(f.name.encode())
            with f.open("rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()


def _data_hash(ds: EncodedDataset) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([ds.input_ids, ds.token_type_ids]).encode())
    return h.hexdigest()


@torch.inference_mode()
def teacher_outputs(teacher: Teacher, ds: EncodedDataset, pooled_layers: list[int], batch_size: int = 64
                    ) -> dict[str, torch.Tensor]:
    """logits [N, C] and pooled{layer} [N, H] (mean over real tokens) for every example, in order."""
    out: dict[str, torch.Tensor] = {}
    device = device_of(teacher.model)
    for idx in batch_indices(ds.lengths, batch_size, shuffle=False, bucket=True):
        batch = to_device(collate(ds, idx, teacher.pad_id, with_labels=False), device)
        res = teacher.model(**model_inputs(batch), output_hidden_states=bool(pooled_layers))
        rows = torch.tensor(idx)
        values = {"logits": res.logits.float()}
        mask = batch["attention_mask"].unsqueeze(-1).float()
        for layer in pooled_layers:
            values[f"pooled{layer}"] = (res.hidden_states[layer] * mask).sum(1) / mask.sum(1).clamp(min=1)
        for key, v in values.items():
            if key not in out:
                out[key] = torch.zeros((len(ds), v.shape[-1]), dtype=torch.float32)
            out[key][rows] = v.float().cpu()
    return out


def cached_teacher_outputs(teachers: list[Teacher], texts: list[str], pairs: list[str] | None, max_length: int,
                           pooled_layers: list[int], cache: Path | None, log=print) -> list[dict[str, torch.Tensor]]:
    """Outputs of every teacher on the transfer texts, from the cache file when it matches."""
    from safetensors.torch import load_file, save_file

    encoded = [encode(t.tokenizer, texts, [0] * len(texts), pairs, max_length) for t in teachers]
    h = hashlib.sha256(f"v{CACHE_VERSION} layers={pooled_layers}".encode())
    for t, ds in zip(teachers, encoded, strict=True):
        h.update(content_hash(t.path).encode())
        h.update(_data_hash(ds).encode())
    key = h.hexdigest()
    path = cache or slimtune_home() / "teacher-cache" / f"{key[:32]}.safetensors"

    def check_or_compute() -> None:  # one process per machine; the others wait for the file it leaves
        if path.is_file():
            meta = _metadata(path)
            if meta.get("key") != key:
                raise SlimtuneError(f"{path}: teacher cache was written for different data or teachers "
                                    f"({meta.get('rows', '?')} rows of {meta.get('teachers', '?')}); "
                                    "delete it or choose another cache file")
            log(f"teacher outputs: cached ({path})")
            return
        outputs = []
        for t, ds in zip(teachers, encoded, strict=True):
            log(f"teacher outputs: running {t.name} on {len(ds)} examples (once; cached in {path})")
            outputs.append(teacher_outputs(t, ds, pooled_layers))
        flat = {f"t{i}.{k}": v.contiguous() for i, out in enumerate(outputs) for k, v in out.items()}
        meta = {"key": key, "rows": str(len(texts)), "teachers": ", ".join(t.name for t in teachers)}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            save_file(flat, str(tmp), metadata=meta)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    once_per_node(check_or_compute)
    flat = load_file(path)
    return [{k.split(".", 1)[1]: v for k, v in flat.items() if k.startswith(f"t{i}.")}
            for i in range(len(teachers))]


def teacher_soft_targets(teacher: str, ds: EncodedDataset, id2label: dict[int, str], max_length: int,
                         temperature: float, log=print, device: torch.device | None = None) -> torch.Tensor:
    """[N, C] softened distribution of one fine-tuned `teacher` (dir or alias) on every text of `ds`, in
    order; the teacher runs once per data (on `device`) and is cached like the distill stage's (recovery
    training)."""
    teachers = load_teachers([TeacherSpec(path=teacher)], id2label, device)
    out = cached_teacher_outputs(teachers, list(ds.texts), ds.pairs, max_length, [], None, log=log)
    return torch.softmax(out[0]["logits"] / temperature, dim=-1)


def _metadata(path: Path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise SlimtuneError(f"{path}: not a readable teacher cache ({str(e).splitlines()[0]})") from None


def combine_teachers(logits: list[torch.Tensor], weights: list[float], temperature: float, how: str,
                     labels: torch.Tensor, labelled: torch.Tensor) -> torch.Tensor:
    """Soft targets [N, C] at `temperature`.

    weighted: the weighted average of the teachers' distributions.
    best:     per example, the distribution of the teacher that is correct and most confident on
              the true label; examples no teacher gets right (or without a trusted label, such as
              augmented copies) fall back to the weighted average.
    """
    probs = torch.stack([torch.softmax(lg / temperature, dim=-1) for lg in logits])  # [T, N, C]
    w = torch.tensor(weights, dtype=probs.dtype).view(-1, 1, 1)
    average = (probs * w).sum(0) / w.sum()
    if how == "weighted" or len(logits) == 1:
        return average
    plain = torch.stack([torch.softmax(lg, dim=-1) for lg in logits])  # confidence at T=1
    rows = torch.arange(labels.numel())
    on_true = plain[:, rows, labels]  # [T, N]
    correct = plain.argmax(-1) == labels.unsqueeze(0)
    score = torch.where(correct, on_true, torch.full_like(on_true, -1.0))
    best = score.argmax(0)  # [N]
    picked = probs[best, rows]
    use = (score.max(0).values >= 0) & labelled
    return torch.where(use.unsqueeze(-1), picked, average)
