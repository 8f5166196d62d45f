"""Adaptation methods end to end through `slimtune.run`, on a tiny random BERT."""

import json

import pytest
import torch
from safetensors.torch import load_file

import slimtune

TINY_STAGE = {"stage": "finetune", "epochs": 1, "lr": 1e-3, "batch_size": 16}
EVAL = {"stage": "evaluate", "speed": False}


def run_method(tmp_path, tiny_model_dir, sst2_small, name, **stage):
    recipe = {"model": str(tiny_model_dir), "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]),
                                                     "max_length": 48},
              "stages": [TINY_STAGE | stage, EVAL]}
    out = tmp_path / name
    metrics = slimtune.run(recipe, out, progress=False)
    return out, metrics


def changed(base_dir, out_dir):
    """Names of base-model tensors whose values changed in the trained model."""
    base = load_file(str(base_dir / "model.safetensors"))
    trained = load_file(str(out_dir / "model" / "model.safetensors"))
    return {k for k, v in base.items() if not torch.equal(v, trained["bert." + k.removeprefix("bert.")])}


def test_full_trains_everything(tmp_path, tiny_model_dir, sst2_small):
    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "full", method="full")
    assert m["final"]["trainable_params"] == m["final"]["params"]
    assert m["stages"][0]["trainable_pct"] == 100.0
    diff = changed(tiny_model_dir, out)
    assert any("embeddings" in k for k in diff) and any("layer.0." in k for k in diff)


def test_freeze_keeps_embeddings_and_lower_layers(tmp_path, tiny_model_dir, sst2_small):
    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "freeze", method="freeze", freeze_layers=1)
    diff = changed(tiny_model_dir, out)
    assert not any("embeddings" in k or "layer.0." in k for k in diff)
    assert any("layer.1." in k for k in diff)
    assert 0 < m["final"]["trainable_params"] < m["final"]["params"]


def test_head_only_trains_pooler_and_classifier(tmp_path, tiny_model_dir, sst2_small):
    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "head", method="head")
    diff = changed(tiny_model_dir, out)
    assert diff and all("pooler" in k for k in diff)
    assert m["final"]["trainable_params"] == 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier


def test_freeze_more_layers_than_the_model_has_is_an_error(tmp_path, tiny_model_dir, sst2_small):
    with pytest.raises(slimtune.SlimtuneError, match="freeze_layers: 5 is more than the model's 2"):
        run_method(tmp_path, tiny_model_dir, sst2_small, "f", method="freeze", freeze_layers=5)
    assert not (tmp_path / "f").exists()


def test_lora_merges_into_a_plain_model(tmp_path, tiny_model_dir, sst2_small):
    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "lora", method="lora",
                        lora={"r": 4, "alpha": 8, "target_modules": ["query", "value"]})
    keys = load_file(str(out / "model" / "model.safetensors")).keys()
    assert not any("lora" in k for k in keys)
    assert m["stages"][0]["trainable_pct"] < 20
    diff = changed(tiny_model_dir, out)
    assert any("query.weight" in k for k in diff) and not any("key.weight" in k for k in diff)


def test_lora_adapter_only_save_loads_with_slimtune(tmp_path, tiny_model_dir, sst2_small):
    from transformers import AutoTokenizer

    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "adapter", method="lora",
                        lora={"r": 4, "save_adapter_only": True})
    files = {p.name for p in (out / "model").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "config.json"} <= files
    assert "model.safetensors" not in files
    model = slimtune.load_model(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    from slimtune.batching import encode
    from slimtune.evaluate import predict_logits

    dev = [json.loads(line) for line in sst2_small[1].read_text().splitlines()]
    ds = encode(tok, [r["text"] for r in dev], [r["label"] for r in dev], max_length=48)
    acc = float((predict_logits(model, ds).argmax(-1) == torch.tensor(ds.labels).numpy()).mean())
    assert acc == pytest.approx(m["final"]["accuracy"])


def test_lora_unknown_target_module_is_a_clear_error(tmp_path, tiny_model_dir, sst2_small):
    with pytest.raises(slimtune.SlimtuneError, match=r"lora.target_modules: \['q_proj'\] match no linear layer"):
        run_method(tmp_path, tiny_model_dir, sst2_small, "x", method="lora", lora={"target_modules": ["q_proj"]})


def test_iterative_unfreezes_top_down_in_phases(tmp_path, tiny_model_dir, sst2_small):
    out, m = run_method(tmp_path, tiny_model_dir, sst2_small, "iter", method="iterative",
                        iterative={"group_size": 1, "max_epochs_per_phase": 2, "patience": 0})
    phases = m["stages"][0]["phases"]
    assert [p["trainable"] for p in phases] == [["head"], ["head", "layers 1-1"], ["head", "layers 0-1"]]
    assert [p["trainable_params"] for p in phases] == sorted(p["trainable_params"] for p in phases)
    assert all(1 <= len(p["history"]) <= 2 for p in phases)
    assert not any("embeddings" in k for k in changed(tiny_model_dir, out))


def spy_on_auto(monkeypatch, lr=None, batch_size=None):
    """Record what `lr: auto` / `batch_size: auto` probe (trainable parameters, PEFT or not, the loss); return
    the given fixed values, or (None) the real search's."""
    import slimtune.stages.base as base
    from slimtune.adapt.lora import is_peft

    calls = []
    real = {"find_lr": base.find_lr, "find_batch_size": base.find_batch_size}

    def spy(name, fixed):
        def probe(model, ds, loss_fn, *args, **kw):
            record = {"fn": name, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "peft": is_peft(model), "loss_fn": loss_fn}
            calls.append(record)
            record["result"] = real[name](model, ds, loss_fn, *args, **kw) if fixed is None else fixed
            return record["result"]
        return probe

    monkeypatch.setattr(base, "find_lr", spy("find_lr", None if lr is None else (lr, [])))
    monkeypatch.setattr(base, "find_batch_size",
                        spy("find_batch_size", None if batch_size is None else (batch_size, {batch_size: 1.0})))
    return calls


@pytest.mark.parametrize("method, stage", [
    ("lora", {"lora": {"r": 4, "alpha": 8}}),
    ("head", {}),
])
def test_auto_values_are_tuned_on_the_parameters_that_train(tmp_path, tiny_model_dir, sst2_small, monkeypatch,
                                                            method, stage):
    """lr / batch_size auto probe the model as it will train: adapters applied, frozen parts frozen."""
    calls = spy_on_auto(monkeypatch, lr=2e-3, batch_size=16)
    _, m = run_method(tmp_path, tiny_model_dir, sst2_small, method, method=method, lr="auto", batch_size="auto",
                      max_steps=2, **stage)
    s = m["stages"][0]
    assert [c["fn"] for c in calls] == ["find_batch_size", "find_lr"]
    assert s["lr"] == 2e-3 and s["batch_size"] == 16
    assert s["trainable_params"] < m["final"]["params"] // 10  # LoRA / head only: a small share
    for c in calls:
        assert c["trainable"] == s["trainable_params"]
        assert c["peft"] == (method == "lora")
    if method == "head":
        assert s["trainable_params"] == 32 * 32 + 32 + 32 * 2 + 2  # pooler + classifier


def test_auto_lr_and_batch_size(tmp_path, tiny_model_dir, sst2_small, monkeypatch):
    """The real searches, on the head-only parameter set: the stage uses exactly what they returned (not
    a clipped stand-in), and they measured the parameters that train."""
    calls = spy_on_auto(monkeypatch)
    _, m = run_method(tmp_path, tiny_model_dir, sst2_small, "auto", method="head", lr="auto", batch_size="auto",
                      max_steps=2)
    stage = m["stages"][0]
    (bs_call, lr_call) = calls
    assert stage["batch_size"] == bs_call["result"][0] and stage["batch_size"] in (8, 16, 32, 64, 128)
    assert set(bs_call["result"][1]) <= {8, 16, 32, 64, 128} and stage["batch_size"] in bs_call["result"][1]
    lr, curve = lr_call["result"]
    assert stage["lr"] == lr and 1e-6 <= lr <= 1e-2
    assert len(curve) >= 10 and all(a[0] < b[0] for a, b in zip(curve, curve[1:], strict=False))
    assert bs_call["trainable"] == lr_call["trainable"] == stage["trainable_params"] == 32 * 32 + 32 + 32 * 2 + 2


def test_chinese_text_is_segmented_with_jieba_for_training_and_prediction(tmp_path, tiny_model_dir):
    """No Chinese set ships with the project: a handful of sentences written for this test."""
    from helpers import CHINESE_REVIEWS, eval_split, write_chinese_csv

    from slimtune.evaluate import predict_logits
    from slimtune.predict import Predictor

    train = write_chinese_csv(tmp_path / "zh.csv")
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(train), "text_field": "句子", "label_field": "标签", "segment_chinese": True,
                       "eval_fraction": 0.2},
              "stages": [TINY_STAGE, EVAL]}
    # long enough for the six sentences to be learnt: each prediction below is determined
    stage = TINY_STAGE | {"epochs": 15, "lr": 5e-3, "batch_size": 8, "keep_best": False}
    metrics = slimtune.run(recipe | {"stages": [stage, EVAL]}, tmp_path / "zh", progress=False)
    assert metrics["data"]["eval_source"] == "split" and metrics["data"]["eval_rows"] == 6
    config = json.loads((tmp_path / "zh" / "model" / "config.json").read_text())
    assert sorted(config["label2id"]) == ["好评", "差评"]
    assert config["slimtune_preprocessing"]["segment_chinese"] is True
    predictor = Predictor(str(tmp_path / "zh" / "model"))
    assert predictor.preprocess("我很喜欢这个故事") == "我 很 喜欢 这个 故事"
    texts = [t for t, _ in CHINESE_REVIEWS]
    predicted = predictor(texts)
    assert [p["label"] for p in predicted] == [label for _, label in CHINESE_REVIEWS]
    assert all(p["score"] > 0.8 for p in predicted), predicted
    # and exactly what the eval path (segmentation included) computes for the same texts
    model, ds, _ = eval_split(tmp_path / "zh" / "model", write_chinese_csv(tmp_path / "same.csv", copies=1))
    probs = torch.softmax(torch.from_numpy(predict_logits(model, ds)), -1)
    ours = torch.tensor([[p["probabilities"][model.config.id2label[i]] for i in range(2)] for p in predicted])
    assert torch.allclose(ours, probs, atol=2e-6)
