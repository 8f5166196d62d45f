"""Inference on raw texts, preprocessed exactly as the model's training data was."""

from __future__ import annotations

import torch

from slimtune.batching import collate, encode
from slimtune.data import make_preprocessor
from slimtune.models import load_model, load_tokenizer, preprocessing_of, resolve_model_path
from slimtune.train import logits_of, model_inputs


class Predictor:
    def __init__(self, model_dir: str):
        path = resolve_model_path(model_dir)
        self.model = load_model(path)
        self.tokenizer = load_tokenizer(path)
        pre = preprocessing_of(path)
        self.max_length = pre.get("max_length", 512)
        self.preprocess = make_preprocessor(pre.get("clean", True), pre.get("lowercase", False),
                                            pre.get("segment_chinese", False))
        self.id2label = {int(k): str(v) for k, v in self.model.config.id2label.items()}

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> list[dict]:
        if not texts:
            return []
        cleaned = [self.preprocess(t) for t in texts]
        ds = encode(self.tokenizer, cleaned, [0] * len(cleaned), max_length=self.max_length)
        batch = collate(ds, list(range(len(ds))), self.tokenizer.pad_token_id or 0, with_labels=False)
        probs = torch.softmax(logits_of(self.model(**model_inputs(batch))).float(), dim=-1)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": self.id2label[best],
                            "probabilities": {self.id2label[i]: round(float(p), 6) for i, p in enumerate(row)}})
        return results
