"""predict (Python and CLI) treats text exactly as `slimtune eval` does: the saved preprocessing record's
max_length and pair field, or the one default (128) for a directory without the record."""

import json
import shutil

import pytest
import torch
from helpers import eval_split, slimtune

import slimtune as st
from slimtune.batching import encode
from slimtune.evaluate import predict_logits
from slimtune.predict import Predictor

LONG = ("the film opens with a long , slow and oddly beautiful shot of a river at dawn , and for the next two hours "
        "it never quite decides whether it wants to be a thriller , a romance or a quiet meditation on grief ; "
        "the actors do what they can with a script that keeps changing its mind , and the ending , when it "
        "finally arrives , feels both earned and strangely empty . ")
LABELS = {0: "neg", 1: "pos"}


def probabilities(predicted: list[dict], id2label) -> torch.Tensor:
    return torch.tensor([[p["probabilities"][id2label[i]] for i in range(len(id2label))] for p in predicted])


def softmax_of(model, ds) -> torch.Tensor:
    return torch.softmax(torch.from_numpy(predict_logits(model, ds)), -1)


@pytest.fixture(scope="module")
def short_model_dir(tmp_path_factory, tiny_model_dir):
    """A tiny classifier saved with the preprocessing record max_length 16 (a sharp head, so truncation shows)."""
    from slimtune.config import Preprocessing
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    torch.manual_seed(0)
    model = load_for_classification(tiny_model_dir, LABELS)
    with torch.no_grad():
        model.classifier.weight.mul_(50)
    out = tmp_path_factory.mktemp("short") / "model"
    save_hf_model(model, load_tokenizer(tiny_model_dir), out, Preprocessing(max_length=16))
    return out


def test_predict_uses_the_saved_max_length_like_eval(tmp_path, short_model_dir):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": LONG, "label": "pos"}) + "\n")
    model, ds, _ = eval_split(short_model_dir, data)
    assert len(ds.input_ids[0]) == 16
    predictor = Predictor(str(short_model_dir))
    assert predictor.preprocessing.max_length == 16
    ours = probabilities(predictor([LONG]), model.config.id2label)
    assert torch.allclose(ours, softmax_of(model, ds), atol=2e-6)
    # ... and not what a longer window gives (the old fallback was 512; this text has < 128 tokens)
    whole = encode(predictor.tokenizer, ds.texts, ds.labels, max_length=512)
    assert 40 < len(whole.input_ids[0]) < 128  # LONG * 2 is past 128
    assert not torch.allclose(ours, softmax_of(model, whole), atol=2e-5)  # a random BERT: small, but 50x 2e-6


def test_a_directory_without_the_record_uses_the_one_default_in_both(tmp_path, short_model_dir):
    bare = tmp_path / "bare"
    shutil.copytree(short_model_dir, bare)
    config = json.loads((bare / "config.json").read_text())
    del config["slimtune_preprocessing"]
    (bare / "config.json").write_text(json.dumps(config))
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"text": LONG * 2, "label": "neg"}) + "\n")
    model, ds, _ = eval_split(bare, data)
    predictor = Predictor(str(bare))
    assert predictor.preprocessing.max_length == 128 and len(ds.input_ids[0]) == 128
    ours = probabilities(predictor([LONG * 2]), model.config.id2label)
    assert torch.allclose(ours, softmax_of(model, ds), atol=2e-6)


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, tiny_model_dir, sst2_small):
    """A tiny text-pair classifier whose label is said by the second text alone (so the pair decides)."""
    root = tmp_path_factory.mktemp("pairs")
    texts = [" ".join(json.loads(line)["text"].split()[:8]) for line in sst2_small[0].read_text().splitlines()]
    verdicts = [("a great film .", "yes"), ("an awful film .", "no"), ("truly great .", "yes"), ("awful .", "no")]

    def rows(start, n):
        return [{"premise": texts[(start + i) % len(texts)], "hypothesis": verdicts[i % 4][0],
                 "label": verdicts[i % 4][1]} for i in range(n)]

    for name, data in (("train", rows(0, 240)), ("dev", rows(240, 24))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(root / "train.jsonl"), "eval": str(root / "dev.jsonl"), "text_field": "premise",
                       "text_pair_field": "hypothesis", "max_length": 32, "select_fraction": 0},
              "stages": [{"stage": "finetune", "epochs": 3, "lr": 3e-3, "batch_size": 16, "keep_best": False},
                         {"stage": "evaluate", "speed": False}]}
    metrics = st.run(recipe, root / "out", progress=False)
    assert metrics["final"]["accuracy"] == 1.0  # learnt: every prediction below is determined by the pair
    return root / "out" / "model", root / "dev.jsonl"


def test_pair_model_predicts_from_both_texts_like_eval(pair_run):
    model_dir, dev = pair_run
    rows = [json.loads(line) for line in dev.read_text().splitlines()]
    first, second = [r["premise"] for r in rows], [r["hypothesis"] for r in rows]
    model, ds, _ = eval_split(model_dir, dev)
    assert ds.pairs is not None
    want = softmax_of(model, ds)
    predictor = Predictor(str(model_dir))
    assert predictor.preprocessing.text_pair_field == "hypothesis"
    ours = probabilities(predictor(first, second), model.config.id2label)
    assert torch.allclose(ours, want, atol=2e-6)
    predicted = predictor(first, second)
    assert [p["label"] for p in predicted] == [r["label"] for r in rows] and min(p["score"] for p in predicted) > 0.55
    assert not torch.allclose(probabilities(predictor(first), model.config.id2label), want, atol=0.1)

    # the CLI: "first<TAB>second" per line on stdin
    proc = slimtune("predict", model_dir, "-", input="".join(f"{a}\t{b}\n" for a, b in zip(first, second,
                                                                                          strict=True)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    cli = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in cli] == [model.config.id2label[int(i)] for i in want.argmax(-1)]
    assert [r["label"] for r in cli] == [r["label"] for r in rows]
    assert torch.allclose(probabilities(cli, model.config.id2label), want, atol=2e-6)
