"""What a served directory holds, behind one small interface.

A `Backend` classifies texts (`kind == "classify"`) or generates text (`kind == "generate"`). Exported
classifier ONNX directories (model.onnx + tokenizer.json + preprocessing.json, as `slimtune export` writes
them) run on onnxruntime + tokenizers + numpy, and this module imports no torch for them; an exported
decoder graph runs on onnxruntime inside `slimtune generate`'s Generator (torch samples the tokens); any
other directory (or alias) is a slimtune / HF model directory run with torch, imported only then.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from slimtune.config import names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.serve.version import model_version
from slimtune.textprep import preprocessor_from_record


class Backend(Protocol):
    kind: str  # "classify" | "generate"
    runtime: str  # what runs the model: "torch" or "onnxruntime"
    version: str
    path: Path
    labels: list[str]  # the model's id2label in id order (empty for a generator)
    paired: bool  # trained on text pairs: requests send "pairs"
    max_batch: int  # texts per model call when `--max-batch` is not given (what was measured best on it)

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]: ...

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None: ...

    def generate(self, prompt: str, sampling: dict, write: Callable[[str], None]) -> str: ...


def load_backend(model_dir: str | Path, threads: int | None = None) -> Backend:
    """The backend for MODEL_DIR: an exported ONNX directory on onnxruntime (a decoder's through the
    Generator), anything else on torch.
    A `current` symlink (what `slimtune learn` maintains) is resolved now, so a reload re-reads it."""
    path = Path(model_dir).expanduser()
    if path.is_dir() and (path / "model.onnx").is_file() and not _decoder_graph(path):
        return OnnxClassifier(path.resolve(), threads)
    # a decoder graph runs on ONNX Runtime too, inside `slimtune generate`'s Generator (its sampling is torch's)
    from slimtune.serve.torch_backend import load_torch_backend  # lazy: torch loads only for torch models

    return load_torch_backend(str(path.resolve()) if path.exists() else str(model_dir), threads)


def _decoder_graph(path: Path) -> bool:
    """An exported causal LM (its config names a *ForCausalLM); an unreadable config is the classifier
    backend's to report."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and names_causal_lm(config)


class OnnxClassifier:
    """An exported classifier: onnxruntime + tokenizers + numpy, the export's own preprocessing record."""

    kind, runtime = "classify", "onnxruntime"
    # batching lost on an int8 graph (bench/serve_load.py: 0.81x the requests/s of none at 16 clients, p99
    # 2.3 s at 64; splitting batches by length did not change it): one text per call unless asked
    max_batch = 1

    def __init__(self, path: Path, threads: int | None = None):
        import numpy as np
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.np, self.path, self.version = np, path, model_version(path)
        for name in ("tokenizer.json", "preprocessing.json", "config.json"):
            if not (path / name).is_file():
                raise SlimtuneError(f"{path}: an ONNX directory without {name} (write it with `slimtune export`)")
        try:
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            record = json.loads((path / "preprocessing.json").read_text(encoding="utf-8"))
            self.tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
        except (OSError, ValueError, Exception) as e:  # tokenizers raises its own Exception subclass
            raise SlimtuneError(f"{path}: cannot read the export's files ({' '.join(str(e).split())[:200]})") from None
        id2label = config.get("id2label") or {}
        if not id2label:
            raise SlimtuneError(f"{path}/config.json: no id2label; only exported classifiers are served from ONNX")
        self.labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        self.paired = bool(record.get("text_pair_field"))
        self.preprocess = preprocessor_from_record(record)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path / "model.onnx"), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for damaged graphs
            raise SlimtuneError(f"{path}/model.onnx: onnxruntime cannot load it ({' '.join(str(e).split())[:200]})"
                                ) from None
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.lock = threading.Lock()

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        np = self.np
        if pairs is not None:
            enc = self.tokenizer.encode_batch([(self.preprocess(a), self.preprocess(b))
                                              for a, b in zip(texts, pairs, strict=True)])
        else:
            enc = self.tokenizer.encode_batch([self.preprocess(t) for t in texts])
        arrays = {"input_ids": [e.ids for e in enc], "attention_mask": [e.attention_mask for e in enc],
                  "token_type_ids": [e.type_ids for e in enc]}
        feed = {name: np.asarray(arrays[name], dtype=np.int64) for name in self.inputs}
        with self.lock:
            logits = self.session.run(["logits"], feed)[0].astype(np.float64)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        return [{"label": self.labels[int(row.argmax())], "score": round(float(row.max()), 6),
                 "probabilities": {label: round(float(p), 6) for label, p in zip(self.labels, row, strict=True)}}
                for row in probs]

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        raise SlimtuneError("this server serves a classifier; /v1/classify answers it")

    def generate(self, prompt: str, sampling: dict, write: Callable[[str], None]) -> str:
        raise SlimtuneError("this server serves a classifier; /v1/classify answers it")

