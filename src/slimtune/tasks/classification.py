"""`task: text-classification` — single texts or text pairs -> one label of a fixed set.

Loss: cross-entropy. Metrics: accuracy (primary, higher is better), macro/micro precision, recall and
F1, a per-class report and the confusion matrix. Predict returns the label, its probability and every
class probability. The ONNX graph maps the tokenizer's inputs to `logits`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from slimtune.batching import EncodedDataset, collate, cross_entropy_loss
from slimtune.config import DataConfig, Preprocessing, names_causal_lm
from slimtune.data import TaskData, label_map_of, load_eval_data, prepare_data
from slimtune.errors import SlimtuneError
from slimtune.evaluate import classification_metrics, measure_speed, predict_logits, save_confusion_matrix
from slimtune.modeldir import check_model_dir
from slimtune.models import load_for_classification, read_config
from slimtune.tasks.base import EvalFn, Metric, OnnxSignature

TINY_SPLIT_PT = 5.0  # warn when the eval accuracy's 95% interval is wider than ± this many points


class TextClassification:
    name: ClassVar[str] = "text-classification"
    primary: ClassVar[Metric] = Metric("accuracy", higher_is_better=True)
    final_keys: ClassVar[tuple[str, ...]] = ("accuracy", "f1_macro", "precision_macro", "recall_macro")
    speed_keys: ClassVar[tuple[str, ...]] = ("latency_ms_b1", "throughput_eps")
    loop_metrics: ClassVar[dict[str, bool]] = {"accuracy": True, "f1_macro": True, "loss": False}
    data_config: ClassVar[type] = DataConfig
    peft_task_type: ClassVar[str] = "SEQ_CLS"
    new_head: ClassVar[bool] = True
    supported_stages: ClassVar[tuple[str, ...] | None] = None
    onnx_quantize: ClassVar[tuple[str, ...]] = ("dynamic", "static")
    soft_targets: ClassVar[str] = "example"  # a few probabilities per text: cached once per teacher

    def output_space(self, data: DataConfig, start: Path | None = None) -> dict[int, str]:
        return label_map_of(data, keep=trained_labels(start) if start is not None else None)[1]

    def start_note(self, start: Path, outputs: dict[int, str]) -> str | None:
        trained = trained_labels(start)
        if trained is None or trained == outputs:
            return None
        return (f"{start} was fine-tuned for the labels {_listed(trained)}; this data has {_listed(outputs)}: "
                "a new classification head for them (the encoder is kept)")

    def preprocessing(self, data: DataConfig) -> Preprocessing:
        return Preprocessing.of(data)

    def load_pretrained(self, path: Path, outputs: dict[int, str]) -> nn.Module:
        model = load_for_classification(path, outputs)
        trained = trained_labels(path)
        if trained is not None and trained != outputs:  # same size but other labels: transformers keeps the head
            new_head_(model)
        return model

    def model_class(self) -> type:
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def prepare_data(self, data: DataConfig, tokenizer, outputs: dict[int, str],
                     embedding_weight: torch.Tensor | None = None, model_config: Any = None) -> TaskData:
        label2id = {name: i for i, name in outputs.items()}
        return prepare_data(data, tokenizer, embedding_weight=embedding_weight, label2id=label2id)

    def eval_dataset(self, path: Path, tokenizer, model_config: Any, pre: Preprocessing,
                     limit: int | None = None, stride: int | None = None) -> EncodedDataset:
        if stride is not None:
            raise SlimtuneError("--stride: a classifier scores whole rows (it applies to causal-lm models)")
        label2id = getattr(model_config, "label2id", None) or {}
        if not label2id:
            raise SlimtuneError("the model's config.json has no label2id: it is not a classifier")
        ds = load_eval_data(path, tokenizer, {str(k): int(v) for k, v in label2id.items()}, pre)
        return ds.subset(range(min(limit, len(ds)))) if limit else ds

    def collate(self, ds: EncodedDataset, indices: list[int], pad_id: int) -> dict[str, torch.Tensor]:
        return collate(ds, indices, pad_id)

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return cross_entropy_loss(model, batch)

    def loss_units(self, batch: dict[str, torch.Tensor]) -> int:
        return len(batch["input_ids"])  # a mean over rows

    def distill_rows(self, logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return logits, batch["labels"]  # one distribution per text

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

    def measure_speed(self, model: nn.Module, ds: EncodedDataset, pad_id: int, latency_runs: int = 50,
                      throughput_batches: int = 10, threads: int | None = None) -> dict:
        return measure_speed(model, ds, pad_id=pad_id, latency_runs=latency_runs,
                             throughput_batches=throughput_batches, threads=threads)

    def predictions(self, logits: torch.Tensor, outputs: dict[int, str]) -> list[dict]:
        probs = torch.softmax(logits.float(), dim=-1)
        results = []
        for row in probs:
            best = int(row.argmax())
            results.append({"label": outputs[best], "score": round(float(row[best]), 6),
                            "probabilities": {outputs[i]: round(float(p), 6) for i, p in enumerate(row)}})
        return results

    def onnx_signature(self, model: nn.Module, tokenizer, source: Path) -> OnnxSignature:
        """The tokenizer's inputs -> `logits`, dynamic batch and sequence; export checks the graph row by row."""
        check_consistent_config(model, source)
        names = ["input_ids", "attention_mask"] + (
            ["token_type_ids"] if "token_type_ids" in getattr(tokenizer, "model_input_names", ()) else [])
        example = tuple(torch.zeros(2, 8, dtype=torch.long) if n == "token_type_ids"
                        else torch.ones(2, 8, dtype=torch.long) for n in names)
        return OnnxSignature(_LogitsOnly(model), example, names, ["logits"],
                             {n: {0: "batch", 1: "sequence"} for n in names} | {"logits": {0: "batch"}})

    def compare_outputs(self, reference: np.ndarray, candidate: np.ndarray, ds: EncodedDataset,
                        labelled: bool) -> dict:
        ref, cand = reference.argmax(-1), candidate.argmax(-1)
        n = len(ref)
        out = {"rows": n, "agreement": float((ref == cand).mean()) if n else 1.0, "changed": int((ref != cand).sum())}
        if not labelled or not n:
            return out
        labels = np.asarray(ds.labels)
        right_ref, right_cand = ref == labels, cand == labels
        lost, gained = int((right_ref & ~right_cand).sum()), int((~right_ref & right_cand).sum())
        # the paired difference of two classifiers on the same rows: only the changed predictions vary it
        spread = math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
        return out | {"torch_accuracy": float(right_ref.mean()), "onnx_accuracy": float(right_cand.mean()),
                      "drop_pt": 100 * (lost - gained) / n, "drop_interval_pt": 100 * 1.96 * spread,
                      "lost": lost, "gained": gained}

    def warnings(self, final: dict) -> list[str]:
        cm = final.get("confusion_matrix") or {}
        matrix, names = np.asarray(cm.get("matrix") or [[0]]), cm.get("labels") or []
        n, accuracy = int(matrix.sum()), final.get("accuracy")
        if not n or accuracy is None:
            return []
        out = []
        predicted = matrix.sum(axis=0)
        if len(names) > 1 and (predicted > 0).sum() == 1:
            out.append(f"the model predicts '{names[int(predicted.argmax())]}' for all {n} eval rows: it has not "
                       "learned the task (more epochs, a higher lr, or full fine-tuning on small data)")
        true = matrix.sum(axis=1)
        majority = float(true.max() / n)
        if accuracy <= majority:
            out.append(f"accuracy {accuracy:.4f} does not beat the majority-class baseline {majority:.4f} "
                       f"(always '{names[int(true.argmax())]}')")
        # the binomial interval, its variance floored at p = 0.95's so a perfect score on 20 rows is not "exact"
        half = 100 * 1.96 * math.sqrt(max(accuracy * (1 - accuracy), 0.0475) / n)
        if half > TINY_SPLIT_PT:
            out.append(f"the eval split has only {n} rows: its accuracy is known to about ±{half:.0f} pt (95%), "
                       "so differences smaller than that are noise (give data.eval a larger file)")
        return out

    def write_artifacts(self, final: dict, out: Path) -> list[str]:
        if not final.get("confusion_matrix"):
            return []
        save_confusion_matrix(final["confusion_matrix"], out)
        return ["confusion_matrix.json", "confusion_matrix.png"]


def trained_labels(path: Path) -> dict[int, str] | None:
    """The labels (id -> name) a model directory's classification head was trained for; None for a base
    encoder (it has no head: it gets a new one anyway) and for a directory that is no classifier."""
    config = read_config(path)
    id2label = config.get("id2label")
    if not id2label or names_causal_lm(config) or not check_model_dir(path, tokenizer=False).has_head:
        return None
    return {int(k): str(v) for k, v in id2label.items()}


def new_head_(model: nn.Module) -> None:
    """Re-initialise a classifier's head (every module beside its encoder, `model.base_model`) as
    transformers initialises a new one: normal(0, initializer_range) weights, zero biases."""
    base = getattr(model, "base_model", model)
    if base is model:
        raise SlimtuneError(f"{type(model).__name__}: no separate encoder, so no head to replace")
    std = getattr(model.config, "initializer_range", 0.02)
    for child in model.children():
        if child is base:
            continue
        for module in child.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()


def _listed(labels: dict[int, str]) -> str:
    names = [labels[i] for i in sorted(labels)]
    return ", ".join(names[:8]) + (f" ... ({len(names)})" if len(names) > 8 else "")


class _LogitsOnly(nn.Module):
    """What export traces: positional inputs in forward()'s order (a tokenizer dict's order would feed
    token_type_ids in as the mask), logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def check_consistent_config(model: nn.Module, path: Path) -> None:
    """A config that disagrees with the weights would export a graph that lies about its model."""
    cfg = getattr(model, "config", None)
    layers = getattr(getattr(getattr(model, "base_model", None), "encoder", None), "layer", None)
    if cfg is None or layers is None:
        raise SlimtuneError(f"{path}: not a transformer encoder classifier (no config / encoder layers)")
    if cfg.num_hidden_layers != len(layers):
        raise SlimtuneError(f"{path}/config.json: num_hidden_layers is {cfg.num_hidden_layers} but the model has "
                            f"{len(layers)} layers")
    n_labels = len(cfg.id2label)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    if head.out_features != n_labels:
        raise SlimtuneError(f"{path}/config.json: id2label has {n_labels} labels but the classifier outputs "
                            f"{head.out_features}")
