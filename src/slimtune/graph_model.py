"""An exported ONNX directory (`slimtune export`) behind the interface the tasks' evaluation uses.

`slimtune search` ships its int8 classifiers as ONNX graphs, and on some CPUs an int4 decoder is only
fast as its MatMulNBits export (docs/benchmarks.md): what ships is what a user wants to score, time and
generate with. `GraphModel` is an `nn.Module` whose forward runs the graph on ONNX Runtime and returns
torch logits, so that perplexity, classification metrics, the speed protocols and `predict` run on it
unchanged: the task code never learns which runtime answered.

A classifier graph maps the tokenizer's inputs to `logits`. A decoder graph (slimtune.onnx_decoder) also
takes and returns its KV cache: `past_key_values` is then the pair (the graph's presents, cached length),
which the next call feeds back, as transformers' cache objects are fed back to a torch model. The
decoder is always sent an all-ones attention mask: batches are right-padded, so under causal attention
no real token sees a pad, and pad positions are never scored.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from slimtune.batching import EncodedDataset
from slimtune.config import names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.evaluate import batched_logits
from slimtune.models import load_model, resolve_model_path
from slimtune.onnx_decoder import OnnxDecoder, open_session

GRAPH_FILE = "model.onnx"


def is_graph_dir(path: str | Path) -> bool:
    """An exported directory: a graph and no torch weights beside it."""
    path = Path(path).expanduser()
    return (path / GRAPH_FILE).is_file() and not (path / "model.safetensors").exists()


def onnx_feed(batch: dict[str, torch.Tensor], names: list[str]) -> dict[str, np.ndarray]:
    """The graph inputs `names` as int64 arrays; single-text tasks carry no token types: segment 0
    everywhere, as the tokenizer would give."""
    ids = batch["input_ids"]
    return {name: (batch[name] if name in batch else torch.zeros_like(ids)).numpy().astype(np.int64)
            for name in names}


class OnnxClassifier:
    """An exported model run by ONNX Runtime: feeds what the graph declares, returns logits."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.session = open_session(path, threads)
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, batch: dict[str, torch.Tensor]) -> np.ndarray:
        return self.session.run(["logits"], onnx_feed(batch, self.inputs))[0]

    def predict_logits(self, ds: EncodedDataset, pad_id: int, batch_size: int = 64) -> np.ndarray:
        return batched_logits(self, ds, batch_size, pad_id)


def _read_config(path: Path):
    from transformers import AutoConfig

    for name in ("config.json", "tokenizer.json"):
        if not (path / name).is_file():
            raise SlimtuneError(f"{path}: an ONNX directory without {name} (write it with `slimtune export`)")
    try:
        raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        return raw, AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise SlimtuneError(f"{path}/config.json: not a readable model config ({' '.join(str(e).split())[:200]})"
                            ) from None


class GraphModel(nn.Module):
    """An exported graph run by ONNX Runtime, with the `config` of the model it was exported from."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        path = Path(path).expanduser()
        if not is_graph_dir(path):
            raise SlimtuneError(f"{path}: not an exported ONNX directory (no {GRAPH_FILE})")
        raw, self.config = _read_config(path)
        self.path, self.decoder = path, names_causal_lm(raw)
        try:
            self.graph = (OnnxDecoder if self.decoder else OnnxClassifier)(path / GRAPH_FILE, threads)
        except SlimtuneError:
            raise
        except Exception as e:  # onnxruntime raises its own exception types for damaged graphs
            raise SlimtuneError(f"{path / GRAPH_FILE}: onnxruntime cannot load it "
                                f"({' '.join(str(e).split())[:200]})") from None
        if not self.decoder and "logits" not in {o.name for o in self.graph.session.get_outputs()}:
            raise SlimtuneError(f"{path / GRAPH_FILE}: the graph has no `logits` output")
        # `slimtune export` writes what the quantizer did; the speed figures name it
        try:  # a missing or hand-edited report only loses the label
            report = json.loads((path / "export.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            report = {}
        quantized = report.get("quantize") if isinstance(report, dict) else None
        quantized = quantized if isinstance(quantized, str) else None
        kind = {"static": "int8 (static)", "dynamic": "int8 (dynamic)"}.get(quantized, quantized or "fp32")
        self.runtime = f"onnxruntime {kind} graph"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, past_key_values=None, use_cache: bool = False,
                **_):
        if not self.decoder:
            batch = {"input_ids": input_ids, "attention_mask": attention_mask if attention_mask is not None
                     else torch.ones_like(input_ids)}
            if token_type_ids is not None:
                batch["token_type_ids"] = token_type_ids
            return SimpleNamespace(logits=torch.from_numpy(self.graph(batch)))
        past, length = past_key_values if past_key_values is not None else (self.graph.empty_past(len(input_ids)), 0)
        logits, presents = self.graph.step(input_ids.numpy(), past, length)
        cache = (presents, length + input_ids.shape[1]) if use_cache else None
        return SimpleNamespace(logits=torch.from_numpy(logits), past_key_values=cache)


def runnable_path(name_or_path: str | Path) -> Path:
    """An exported directory as it is; anything else (an alias, a model directory) through the model gate."""
    return Path(name_or_path).expanduser() if is_graph_dir(name_or_path) else resolve_model_path(name_or_path)


def load_runnable(path: str | Path, threads: int | None = None) -> nn.Module:
    """What a directory holds, ready to run: an exported graph on ONNX Runtime, else the torch model."""
    return GraphModel(path, threads) if is_graph_dir(path) else load_model(runnable_path(path))


__all__ = ["GraphModel", "OnnxClassifier", "is_graph_dir", "load_runnable", "onnx_feed", "runnable_path"]
