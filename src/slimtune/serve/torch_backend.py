"""Model directories run with torch: the classifier through `slimtune predict`'s Predictor, the causal LM
through `slimtune generate`'s Generator, so the server's answers are the CLI's. An exported decoder graph
goes through the same Generator, which runs it on ONNX Runtime."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch

from slimtune.config import names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.generate import Generator, Sampling
from slimtune.graph_model import GraphModel, runnable_path
from slimtune.models import read_config
from slimtune.predict import Predictor
from slimtune.serve.version import model_version


def load_torch_backend(model_dir: str, threads: int | None = None):
    if threads:
        torch.set_num_threads(threads)
    path = runnable_path(model_dir)  # a model directory, or an exported decoder graph
    if names_causal_lm(read_config(path)):
        return TorchGenerator(path, threads)
    return TorchClassifier(path)


class TorchClassifier:
    kind, runtime, max_batch = "classify", "torch", 32  # 1.41x the requests/s of no batching at 16 clients

    def __init__(self, path: Path):
        self.predictor = Predictor(str(path))
        self.path, self.version = Path(path), model_version(Path(path))
        outputs = self.predictor.outputs
        if not outputs:
            raise SlimtuneError(f"{path}: the model's config has no id2label; the server cannot name its labels")
        self.labels = [outputs[i] for i in sorted(outputs)]
        self.paired = self.predictor.preprocessing.text_pair_field is not None

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        return self.predictor(texts, pairs)

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        raise SlimtuneError("this server serves a classifier; /v1/classify answers it")

    def generate(self, prompt: str, sampling: dict, write: Callable[[str], None]) -> str:
        raise SlimtuneError("this server serves a classifier; /v1/classify answers it")


class _Writer:
    """The file-like `Generator` streams into: every piece goes to `write`, which raises to stop generation."""

    def __init__(self, write: Callable[[str], None]):
        self.write = write

    def flush(self) -> None:
        pass


class TorchGenerator:
    kind, runtime, labels, paired, max_batch = "generate", "torch", [], False, 1

    def __init__(self, path: Path, threads: int | None = None):
        self.generator = Generator(path, threads=threads)
        if isinstance(self.generator.model, GraphModel):
            self.runtime = "onnxruntime"
        self.path, self.version = Path(path), model_version(Path(path))
        self.lock = threading.Lock()  # one generation at a time: the model's KV cache and torch's threads

    def classify(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        raise SlimtuneError("this server serves a causal language model; /v1/generate answers it")

    def check_prompt(self, prompt: str, max_new_tokens: int) -> None:
        self.generator.encode(prompt, max_new_tokens)

    def generate(self, prompt: str, sampling: dict, write: Callable[[str], None]) -> str:
        with self.lock:
            return self.generator(prompt, Sampling(**sampling), out=_Writer(write))
