"""Metrics, confusion matrix and speed measurement on a tiny random BERT."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from slimtune.batching import EncodedDataset
from slimtune.evaluate import (
    classification_metrics,
    count_parameters,
    measure_speed,
    predict_logits,
    save_confusion_matrix,
)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, num_labels=3)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="module")
def ds():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(1, 100, (int(n),), generator=g).tolist() for n in torch.randint(2, 30, (50,), generator=g)]
    return EncodedDataset(ids, [i % 3 for i in range(50)])


def test_batched_padded_logits_match_unbatched_forward_in_original_order(model, ds):
    logits = predict_logits(model, ds, batch_size=8)
    with torch.no_grad():
        single = np.stack([model(input_ids=torch.tensor([x])).logits[0].numpy() for x in ds.input_ids])
    np.testing.assert_allclose(logits, single, atol=1e-5)


def test_metrics_by_hand_including_a_class_never_predicted():
    y_true, y_pred = [0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 0, 1]
    m = classification_metrics(y_true, y_pred, {0: "a", 1: "b", 2: "c"})
    assert m["accuracy"] == pytest.approx(3 / 6)
    # precision a=1/2, b=2/4, c=0; recall a=1/2, b=1, c=0
    assert m["precision_macro"] == pytest.approx((0.5 + 0.5 + 0) / 3)
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 0) / 3)
    assert m["f1_macro"] == pytest.approx((0.5 + 2 / 3 + 0) / 3)
    assert m["f1_micro"] == pytest.approx(0.5)
    assert m["confusion_matrix"] == {"labels": ["a", "b", "c"], "matrix": [[1, 1, 0], [0, 2, 0], [1, 1, 0]]}
    assert m["per_class"]["c"]["support"] == 2
    json.dumps(m)  # plain JSON types


def test_confusion_matrix_files(tmp_path):
    cm = {"labels": ["neg", "pos"], "matrix": [[5, 1], [2, 7]]}
    save_confusion_matrix(cm, tmp_path)
    assert json.loads((tmp_path / "confusion_matrix.json").read_text()) == cm
    assert (tmp_path / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_parameters_with_a_frozen_part(model):
    total, trainable = count_parameters(model)
    assert total == trainable == sum(p.numel() for p in model.parameters())
    for p in model.bert.embeddings.parameters():
        p.requires_grad_(False)
    frozen = sum(p.numel() for p in model.bert.embeddings.parameters())
    assert count_parameters(model) == (total, total - frozen)
    for p in model.parameters():
        p.requires_grad_(True)


def test_speed_is_positive_and_thread_count_restored(model, ds):
    before = torch.get_num_threads()
    s = measure_speed(model, ds, latency_runs=3, throughput_batches=2, batch_size=4, threads=1, warmup=1)
    assert s["latency_ms_b1"] > 0 and s["throughput_eps"] > 0 and s["threads"] == 1
    assert torch.get_num_threads() == before
    assert s["cpu"]


def test_evaluate_stage_keys(model, ds):
    from helpers import make_run

    from slimtune.stages.evaluate import measure

    run = make_run(model, SimpleNamespace(train=ds, eval=ds))
    run.data.labels = {0: "a", 1: "b", 2: "c"}
    m = measure(run, speed=True, latency_runs=2, throughput_batches=1)
    for k in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "params", "trainable_params", "size_mb",
              "latency_ms_b1", "throughput_eps", "threads"):
        assert k in m
    assert m["size_mb"] == pytest.approx(sum(p.numel() * 4 for p in model.state_dict().values()) / 1e6, abs=1e-3)
