"""`task: text-classification` — single texts or text pairs -> one label of a fixed set.

Loss: cross-entropy. Metrics: accuracy (primary, higher is better), macro/micro precision, recall and
F1, a per-class report and the confusion matrix. Predict returns the label, its probability and every
class probability. The ONNX graph maps the tokenizer's inputs to `logits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.batching import EncodedDataset, collate, cross_entropy_loss
from slimtune.config import DataConfig, Preprocessing
from slimtune.data import TaskData, label_map_of, load_eval_data, prepare_data
from slimtune.errors import SlimtuneError
from slimtune.evaluate import classification_metrics, predict_logits, save_confusion_matrix
from slimtune.models import load_for_classification
from slimtune.tasks.base import EvalFn, Metric


class TextClassification:
    name: ClassVar[str] = "text-classification"
    primary: ClassVar[Metric] = Metric("accuracy", higher_is_better=True)
    final_keys: ClassVar[tuple[str, ...]] = ("accuracy", "f1_macro", "precision_macro", "recall_macro")
    loop_metrics: ClassVar[dict[str, bool]] = {"accuracy": True, "f1_macro": True, "loss": False}

    def output_space(self, data: DataConfig) -> dict[int, str]:
        return label_map_of(data)[1]

    def load_pretrained(self, path: Path, outputs: dict[int, str]) -> nn.Module:
        return load_for_classification(path, outputs)

    def model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def prepare_data(self, data: DataConfig, tokenizer, outputs: dict[int, str],
                     embedding_weight: torch.Tensor | None = None) -> TaskData:
        label2id = {name: i for i, name in outputs.items()}
        return prepare_data(data, tokenizer, embedding_weight=embedding_weight, label2id=label2id)

    def eval_dataset(self, path: Path, tokenizer, model_config: Any, pre: Preprocessing) -> EncodedDataset:
        label2id = getattr(model_config, "label2id", None) or {}
        if not label2id:
            raise SlimtuneError("the model's config.json has no label2id: it is not a classifier")
        return load_eval_data(path, tokenizer, {str(k): int(v) for k, v in label2id.items()}, pre)

    def collate(self, ds: EncodedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(ds, indices, pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy_loss(model, batch)

    def eval_fn(self, ds: EncodedDataset, pad_id: int) -> EvalFn:
        labels = torch.tensor(ds.labels)
        names = {i: str(i) for i in range(int(labels.max()) + 1)} if len(labels) else {}

        def evaluate(model: nn.Module) -> dict:
            logits = torch.from_numpy(predict_logits(model, ds, pad_id=pad_id))
            m = classification_metrics(ds.labels, logits.argmax(-1).tolist(), names)
            return {"loss": F.cross_entropy(logits, labels).item(), "accuracy": m["accuracy"],
                    "f1_macro": m["f1_macro"]}

        return evaluate

    def evaluate(self, model: nn.Module, ds: EncodedDataset, outputs: dict[int, str], pad_id: int) -> dict:
        logits = predict_logits(model, ds, pad_id=pad_id)
        return classification_metrics(ds.labels, logits.argmax(-1).tolist(), outputs) | {"eval_examples": len(ds)}

    def predictions(self, logits: torch.Tensor, outputs: dict[int, str]) -> list[dict]:
        probs = torch.softmax(logits.float(), dim=-1)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": outputs[best], "score": round(float(row[best]), 6),
                            "probabilities": {outputs[i]: round(float(p), 6) for i, p in enumerate(row)}})
        return results

    def onnx_outputs(self) -> list[str]:
        return ["logits"]

    def write_artifacts(self, final: dict, out: Path) -> list[str]:
        if not final.get("confusion_matrix"):
            return []
        save_confusion_matrix(final["confusion_matrix"], out)
        return ["confusion_matrix.json", "confusion_matrix.png"]

