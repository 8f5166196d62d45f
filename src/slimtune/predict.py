"""Inference on raw texts, preprocessed exactly as the model's training data was: the saved preprocessing
record (max_length, fields, cleaning) and the model's task decide, as they do for `slimtune eval`."""

from __future__ import annotations

import torch

from slimtune.batching import encode, logits_of, model_inputs, pad_id_of
from slimtune.config import names_causal_lm
from slimtune.data import preprocessor_for
from slimtune.errors import SlimtuneError
from slimtune.graph_model import load_runnable, runnable_path
from slimtune.models import load_tokenizer, preprocessing_of, read_config
from slimtune.tasks import task_of_model


class Predictor:
    def __init__(self, model_dir: str):
        # an exported ONNX directory runs on ONNX Runtime (slimtune.graph_model), anything else on torch
        path = runnable_path(model_dir)
        if names_causal_lm(read_config(path)):
            raise SlimtuneError(f"{path}: a causal language model; `slimtune generate` writes its text")
        self.model = load_runnable(path)
        self.tokenizer = load_tokenizer(path)
        self.task = task_of_model(self.model.config)
        self.preprocessing = preprocessing_of(path)
        self.preprocess = preprocessor_for(self.preprocessing)
        self.outputs = {int(k): str(v) for k, v in (getattr(self.model.config, "id2label", None) or {}).items()}

    @torch.inference_mode()
    def __call__(self, texts: list[str], pairs: list[str] | None = None) -> list[dict]:
        """`texts` (and, for a model trained on text pairs, `pairs`: the second text of each)."""
        if not texts:
            return []
        cleaned = [self.preprocess(t) for t in texts]
        second = [self.preprocess(t) for t in pairs] if pairs is not None else None
        ds = encode(self.tokenizer, cleaned, [0] * len(cleaned), second, max_length=self.preprocessing.max_length)
        batch = self.task.collate(ds, list(range(len(ds))), pad_id_of(self.tokenizer))
        return self.task.predictions(logits_of(self.model(**model_inputs(batch))), self.outputs)
