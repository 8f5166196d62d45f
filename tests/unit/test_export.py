"""`slimtune export`: ONNX graphs that onnxruntime + tokenizers alone can run, with a parity check."""

import json
import re

import numpy as np
import pytest
import torch

from slimtune.errors import SlimtuneError
from slimtune.export import OnnxClassifier, export_onnx
from slimtune.models import load_model


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory, tiny_model_dir):
    """A tiny BERT classifier trained for a few steps on SST-2 rows (so int8 parity means something)."""
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    torch.manual_seed(0)
    model = load_for_classification(tiny_model_dir, {0: "negative", 1: "positive"})
    out = tmp_path_factory.mktemp("clf")
    save_hf_model(model, load_tokenizer(tiny_model_dir), out, {"max_length": 64, "text_field": "text",
                                                                "label_field": "label"})
    return out


def _tokenize(model_dir, texts):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))  # tokenizers alone, as exported: it pads
    enc = tok.encode_batch(texts)
    return {"input_ids": np.array([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
            "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64)}


def test_fp32_export_runs_with_onnxruntime_and_tokenizers_alone(classifier_dir, sst2_small, tmp_path):
    import onnxruntime as ort
    from transformers import AutoTokenizer

    report = export_onnx(classifier_dir, tmp_path / "onnx", data=sst2_small[1], sample_size=40)
    assert report["parity"] == "pass" and report["fp32_max_abs_diff"] <= 1e-4
    out = tmp_path / "onnx"
    assert {"model.onnx", "tokenizer.json", "config.json", "export.json", "preprocessing.json",
            "preprocess.py"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "preprocessing.json").read_text())["max_length"] == 64
    from slimtune.models import load_tokenizer

    assert load_tokenizer(out)("a film")["input_ids"][0] == 101  # an export dir is a tokenizer dir too
    texts = ["a gripping , funny film", "dull", "the plot goes nowhere and the actors seem bored to tears"]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    feed = {k: v for k, v in _tokenize(out, texts).items() if k in {i.name for i in session.get_inputs()}}
    got = session.run(["logits"], feed)[0]
    model = load_model(classifier_dir)
    enc = AutoTokenizer.from_pretrained(classifier_dir)(texts, padding=True, return_tensors="pt")
    with torch.inference_mode():
        want = model(**enc).logits.numpy()
    assert got.shape == (3, 2) and np.abs(got - want).max() <= 1e-4  # other batch size and length than traced


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_int8_export_is_smaller_and_agrees(classifier_dir, sst2_small, tmp_path, mode, caplog):
    caplog.set_level("INFO")
    report = export_onnx(classifier_dir, tmp_path / mode, quantize=mode, data=sst2_small[1], sample_size=64,
                         optimize=False)
    fp32 = export_onnx(classifier_dir, tmp_path / "fp32", optimize=False, sample_size=16)
    assert report["parity"] == "pass" and abs(report["onnx_accuracy"] - report["torch_accuracy"]) <= 0.005
    assert report["size_mb"] < fp32["size_mb"]
    saved = json.loads((tmp_path / mode / "export.json").read_text())
    assert saved["int8_format"].startswith(mode)
    # ONNX Runtime's hint pointing at an image-classification example does not apply here (export.py)
    assert not any("pre-processing" in r.getMessage() for r in caplog.records)


@pytest.fixture(scope="module")
def outlier_classifier_dir(tmp_path_factory, classifier_dir):
    """classifier_dir with BERT's outlier pattern in layer 0's FFN output: one output row 40x larger."""
    from slimtune.models import load_tokenizer, save_hf_model

    model = load_model(classifier_dir)
    with torch.no_grad():
        model.bert.encoder.layer[0].output.dense.weight[3] *= 40
    out = tmp_path_factory.mktemp("clf-outlier")
    save_hf_model(model, load_tokenizer(classifier_dir), out, {"max_length": 64, "text_field": "text",
                                                               "label_field": "label"})
    return out


@pytest.mark.parametrize("method, scales", [("dynamic_int8", "per_channel"), ("static_int8", "per_channel"),
                                            ("dynamic_int8", "per_tensor"), ("dynamic_int8", "auto"),
                                            ("static_int8", "auto")])
def test_int8_run_writes_an_onnx_model_that_computes_what_torch_computes(classifier_dir, outlier_classifier_dir,
                                                                         sst2_small, tmp_path, method, scales):
    """An int8 run's OUT/onnx gives the torch model's logits: same codes and scales (static: torch's
    calibrated activation scales), integer kernels emulated exactly in torch, float pooler/classifier
    in both, and residual paths that read float values in both. With weight_scales auto, per-channel,
    per-tensor and shared scales are mixed in one graph, and query/key/value run as one matmul."""
    from helpers import eval_split

    import slimtune
    from slimtune.evaluate import predict_logits

    if scales == "auto":
        classifier_dir = outlier_classifier_dir
    recipe = {"model": str(classifier_dir), "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]),
                                                     "max_length": 64},
              "stages": [{"stage": "quantize", "method": method, "calibration_batches": 4, "weight_scales": scales}]}
    metrics = slimtune.run(recipe, tmp_path / "run", progress=False)
    assert metrics["final"]["onnx"]["onnx_accuracy"] == metrics["final"]["onnx"]["torch_accuracy"]
    model, ds, _ = eval_split(tmp_path / "run" / "model", sst2_small[1])
    want = predict_logits(model, ds, pad_id=0)
    got = OnnxClassifier(tmp_path / "run" / "onnx" / "model.onnx").predict_logits(ds, 0)
    gap = np.abs(got - want).max(-1)
    # float noise in softmax / LayerNorm may move an activation code now and then (a tiny model here
    # has few), so the bound is on the typical sentence, not every one
    assert np.median(gap) <= 1e-6 and (gap <= 1e-4).mean() >= 0.95
    if scales == "per_tensor":  # ORT got one scale per weight matrix too
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(tmp_path / "run" / "onnx" / "model.onnx")).graph
        tables = {n.input[2] for n in graph.node if n.op_type == "GatherBlockQuantized"}  # a scale per table row
        weight_scales = [numpy_helper.to_array(i) for i in graph.initializer
                         if i.name.endswith("_scale") and i.name not in tables]
        assert len(tables) == 3 and weight_scales and all(w.size == 1 for w in weight_scales)
    if scales == "auto":
        import onnx
        from onnx import numpy_helper

        graph = onnx.load(str(tmp_path / "run" / "onnx" / "model.onnx")).graph
        chosen = metrics["stages"][0]["weight_scales"]
        assert chosen["bert.encoder.layer.0.output.dense"].startswith("per_channel")
        assert chosen["bert.encoder.layer.1.attention.self.key"].startswith(
            "per_tensor, shared with bert.encoder.layer.1.attention.self.query")
        assert sum(n.op_type == "Split" for n in graph.node) == 2  # one query/key/value matmul per layer
        tables = {n.input[2] for n in graph.node if n.op_type == "GatherBlockQuantized"}
        vectors = [i.name for i in graph.initializer if i.name.endswith("_scale") and i.name not in tables
                   and numpy_helper.to_array(i).size > 1]
        assert len(vectors) == 1  # the outlier layer's per-column scales; every other weight has one
    if method == "static_int8" and scales != "auto":  # both candidates were built from torch's scales
        fmt = metrics["final"]["onnx"]["int8_format"]
        assert re.search(r"integer ops \d+ ms, pass", fmt) and re.search(r"QDQ \d+ ms, pass", fmt)


def test_weight_only_model_is_served_int8_and_int8_run_keeps_float_head(classifier_dir, sst2_small, tmp_path):
    """A weight-only model (mixed, ternary, ...) asked for --quantize dynamic gets all its quantized
    layers as integer matmuls (per-channel scales: query/key/value still fuse, their scales concatenate); an int8 run's float pooler/classifier stay float (ORT's dynamic quantizer
    renames each Gemm to <name>_MatMul first, which an exclusion by the Gemm's name alone missed)."""
    import onnx

    import slimtune

    def integer_matmuls(onnx_dir):
        graph = onnx.load(str(onnx_dir / "model.onnx")).graph
        return sorted(n.name for n in graph.node if n.op_type == "MatMulInteger")

    data = {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 64}
    for method in ("weight_only", "dynamic_int8"):
        slimtune.run({"model": str(classifier_dir), "data": data,
                      "stages": [{"stage": "quantize", "method": method}]}, tmp_path / method, progress=False)
    export_onnx(tmp_path / "weight_only" / "model", tmp_path / "wo-onnx", quantize="dynamic", data=sst2_small[1],
                sample_size=32)
    served = integer_matmuls(tmp_path / "wo-onnx")
    # 2 layers x 6 Linears, no head; query/key/value read one input and run as one matmul
    assert len(served) == 8 and all("encoder" in n for n in served)
    assert sum("shared_input" in n for n in served) == 2
    int8_run = integer_matmuls(tmp_path / "dynamic_int8" / "onnx")
    assert int8_run == served


def test_head_pruned_model_exports(classifier_dir, tmp_path):
    from slimtune.prune import structured as st

    model = load_model(classifier_dir)
    st.prune_heads_(model, {0: [0]})  # keep 1 of 2 heads in layer 0
    st.prune_ffn_(model, {0: torch.arange(40), 1: torch.arange(64)})
    st.structured_config_update(model)
    from slimtune.models import load_tokenizer, save_hf_model

    save_hf_model(model, load_tokenizer(classifier_dir), tmp_path / "pruned")
    report = export_onnx(tmp_path / "pruned", tmp_path / "onnx", sample_size=32)
    assert report["parity"] == "pass"
    assert "skipped" in report["fusion"]  # 1 head in layer 0, 2 in layer 1: no uniform attention fusion
    clf = OnnxClassifier(tmp_path / "onnx" / "model.onnx")
    batch = {"input_ids": torch.tensor([[101, 2204, 102]]), "attention_mask": torch.ones(1, 3, dtype=torch.long)}
    assert clf(batch).shape == (1, 2)


def test_bad_input_leaves_nothing(classifier_dir, tmp_path):
    with pytest.raises(SlimtuneError, match="static needs --data"):
        export_onnx(classifier_dir, tmp_path / "a", quantize="static")
    with pytest.raises(SlimtuneError, match=r"^--quantize int4: not available for a text-classification model "
                                            r"\(its modes: dynamic, static\)$"):
        export_onnx(classifier_dir, tmp_path / "b", quantize="int4")
    with pytest.raises(SlimtuneError, match="expected dynamic or static .*int8 or int4"):
        export_onnx(classifier_dir, tmp_path / "b", quantize="int3")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SlimtuneError, match="not empty"):
        export_onnx(classifier_dir, tmp_path / "full")
    cfg = json.loads((classifier_dir / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in classifier_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "config.json").write_text(json.dumps(cfg | {"id2label": {"0": "a", "1": "b", "2": "c"},
                                                          "label2id": {"a": 0, "b": 1, "c": 2}}))
    with pytest.raises(SlimtuneError):  # 3 labels in config, 2 outputs in the weights
        export_onnx(broken, tmp_path / "c")
    assert not any((tmp_path / n).exists() for n in ("a", "b", "c"))


def test_cli_export(classifier_dir, tmp_path):
    from helpers import slimtune

    res = slimtune("export", classifier_dir, "--out", tmp_path / "onnx", "--no-optimize")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["parity"] == "pass" and "parity pass" in res.stderr
    res = slimtune("export", classifier_dir, "--out", tmp_path / "x", "--format", "tflite")
    assert res.returncode == 2 and "only onnx" in res.stderr and not (tmp_path / "x").exists()


def test_eval_and_predict_run_an_exported_int8_graph(classifier_dir, sst2_small, tmp_path):
    """What ships is what gets scored: `slimtune eval/predict OUT` run the int8 graph on ONNX Runtime, with the
    accuracy the export measured for it and the speed figures named after it."""
    from helpers import slimtune

    out = tmp_path / "onnx"
    report = export_onnx(classifier_dir, out, quantize="dynamic", data=sst2_small[1], sample_size=100)
    scored = slimtune("eval", out, "--data", sst2_small[1], "--threads", "1")
    assert scored.returncode == 0, scored.stderr[-2000:]
    metrics = json.loads(scored.stdout.strip().splitlines()[-1])
    torch_metrics = json.loads(slimtune("eval", classifier_dir, "--data", sst2_small[1],
                                        "--no-speed").stdout.strip().splitlines()[-1])
    assert metrics["eval_examples"] == report["rows"] == 100  # the export scored the same 100 rows
    assert metrics["runtime"] == "onnxruntime int8 (dynamic) graph"
    assert metrics["accuracy"] == pytest.approx(report["onnx_accuracy"])
    assert torch_metrics["accuracy"] == pytest.approx(report["torch_accuracy"])
    assert metrics["size_mb"] < torch_metrics["size_mb"] and metrics["throughput_eps"] > 0
    texts = ["a gripping , funny film", "dull"]
    graph = [json.loads(line) for line in slimtune("predict", out, *texts).stdout.splitlines()]
    plain = [json.loads(line) for line in slimtune("predict", classifier_dir, *texts).stdout.splitlines()]
    assert [r["label"] for r in graph] == [r["label"] for r in plain] and len(graph) == 2
    assert all(abs(a["score"] - b["score"]) < 0.05 for a, b in zip(graph, plain, strict=True))


def test_static_reshapes_keep_dynamic_batch_and_sequence(classifier_dir, tmp_path):
    """The exported graph's reshape targets become constants (0 = keep this dimension) and the shape
    chains feeding them go; any batch size and sentence length still run, with the torch logits."""
    from slimtune import onnx_graph
    from slimtune.export import plain_float_model, torch_to_onnx

    model = plain_float_model(load_model(classifier_dir))
    torch_to_onnx(model, tmp_path / "plain.onnx", with_token_types=True)
    graph = onnx_graph.load(tmp_path / "plain.onnx")
    before = len(graph.graph.node)
    assert onnx_graph.static_reshapes_(graph) >= 8  # query/key/value/context views of each of the 2 layers
    onnx_graph.save(graph, tmp_path / "static.onnx")
    constants = {i.name for i in graph.graph.initializer}
    assert sum(n.op_type == "Reshape" and n.input[1] in constants for n in graph.graph.node) >= 8
    assert len(graph.graph.node) < before  # the Shape -> Gather -> Unsqueeze -> Concat chains are gone
    clf = OnnxClassifier(tmp_path / "static.onnx")
    model = plain_float_model(load_model(classifier_dir))  # a fresh copy: tracing may leave state behind
    for batch, length in ((1, 5), (3, 17)):
        ids = torch.randint(1000, 2000, (batch, length))
        mask = torch.ones_like(ids)
        mask[-1, length // 2:] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits.numpy()
        got = clf.session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(),
                                     "token_type_ids": np.zeros_like(ids.numpy())})[0]
        assert np.abs(got - want).max() < 1e-4
    assert onnx_graph.static_reshapes_(graph) == 0  # nothing left to rewrite


def test_the_exported_tokenizer_pads_and_truncates_at_the_training_length(classifier_dir, tmp_path):
    from tokenizers import Tokenizer

    export_onnx(classifier_dir, tmp_path / "onnx", optimize=False, sample_size=8)
    tok = Tokenizer.from_file(str(tmp_path / "onnx" / "tokenizer.json"))
    enc = tok.encode_batch(["short", "a much longer sentence " * 40])
    assert len(enc[0].ids) == len(enc[1].ids) == 64  # padded to the batch, cut at max_length 64
    assert enc[0].attention_mask.count(1) == 3


def test_the_deploy_doc_runs_as_written_without_torch_or_slimtune(classifier_dir, tmp_path):
    """docs/deploy.md's code block, run in a fresh interpreter against a real export: it must give
    slimtune predict's labels, with cleaning, and import neither torch nor slimtune."""
    import subprocess
    import sys
    from pathlib import Path

    from slimtune.predict import Predictor

    doc = (Path(__file__).resolve().parents[2] / "docs" / "deploy.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    export_onnx(classifier_dir, tmp_path / "onnx", optimize=False, sample_size=8)
    code = code.replace('"runs/my-run/onnx"', repr(str(tmp_path / "onnx")))
    texts = ["<p>A gripping,&nbsp;funny film.</p>", "Dull and\u200b far too long.", "ＦＵＬＬ width  text"]
    check = (f"\nprint(json.dumps([r['label'] for r in classify({texts!r})]))"
             "\nassert not any(m == 'torch' or m.startswith('slimtune') for m in sys.modules), 'imported'")
    res = subprocess.run([sys.executable, "-c", code + check], capture_output=True, text=True, cwd=tmp_path,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == [r["label"] for r in Predictor(classifier_dir)(texts)]


def test_comparison_counts_changes_and_the_noise_of_the_drop():
    from slimtune.batching import EncodedDataset
    from slimtune.tasks.classification import TextClassification

    labels = [0] * 100 + [1] * 100
    ds = EncodedDataset(input_ids=[[1]] * 200, labels=labels)
    ref = np.eye(2)[labels]  # torch right everywhere
    cand = ref.copy()
    cand[:7] = np.eye(2)[1]  # int8 turns 7 right answers wrong
    m = TextClassification().compare_outputs(ref, cand, ds, labelled=True)
    assert m["rows"] == 200 and m["changed"] == 7 and m["agreement"] == pytest.approx(0.965)
    assert m["torch_accuracy"] == 1.0 and m["onnx_accuracy"] == pytest.approx(0.965)
    assert m["drop_pt"] == pytest.approx(3.5) and m["lost"] == 7 and m["gained"] == 0
    # paired difference: sd = sqrt(7 - 49/200) / 200 -> 95% half-width 2.55 pt
    assert m["drop_interval_pt"] == pytest.approx(100 * 1.96 * np.sqrt(7 - 49 / 200) / 200)
    unlabelled = TextClassification().compare_outputs(ref, cand, ds, labelled=False)
    assert set(unlabelled) == {"rows", "agreement", "changed"}


@pytest.fixture
def int8_loses_3_points(monkeypatch):
    """The int8 graph's measured comparison, replaced by one that lost 3 points on 200 rows (a real
    graph's drop depends on the CPU's kernels; the policy is what is tested here)."""
    from slimtune.tasks.classification import TextClassification

    def lost_three(self, reference, candidate, ds, labelled):
        return {"rows": 200, "agreement": 0.97, "changed": 6, "torch_accuracy": 0.85, "onnx_accuracy": 0.82,
                "drop_pt": 3.0, "drop_interval_pt": 2.4, "lost": 6, "gained": 0}

    monkeypatch.setattr(TextClassification, "compare_outputs", lost_three)


def test_an_int8_graph_past_max_drop_is_refused_with_what_to_try(classifier_dir, sst2_small, tmp_path,
                                                                 int8_loses_3_points):
    with pytest.raises(SlimtuneError) as e:
        export_onnx(classifier_dir, tmp_path / "int8", quantize="dynamic", data=sst2_small[1], optimize=False)
    msg = str(e.value)
    assert "misses the export policy" in msg and "+3.00 pt, max 0.5 pt" in msg and "±2.40 pt" in msg
    assert "--quantize static" in msg and "weight_scales: per_channel" in msg and "--force" in msg
    assert "\n" not in msg and not (tmp_path / "int8").exists()
    ok = export_onnx(classifier_dir, tmp_path / "int8", quantize="dynamic", data=sst2_small[1], optimize=False,
                     max_drop=4)
    assert ok["parity"] == "pass" and not ok["forced"] and ok["max_drop_pt"] == 4


def test_force_keeps_the_graph_and_says_so(classifier_dir, sst2_small, tmp_path, int8_loses_3_points):
    report = export_onnx(classifier_dir, tmp_path / "int8", quantize="dynamic", data=sst2_small[1],
                         optimize=False, force=True)
    saved = json.loads((tmp_path / "int8" / "export.json").read_text())
    assert report["parity"] == saved["parity"] == "fail" and saved["forced"] is True
    assert saved["drop_pt"] == 3.0 and saved["drop_interval_pt"] == 2.4 and saved["rows"] == 200
    assert (tmp_path / "int8" / "model.onnx").is_file()


def test_without_labelled_rows_agreement_is_a_warning_not_a_verdict(classifier_dir, tmp_path):
    report = export_onnx(classifier_dir, tmp_path / "int8", quantize="dynamic", optimize=False, sample_size=32)
    assert report["parity"] == "unchecked" and report["labelled"] is False
    assert "not a check" in report["parity_detail"] and "random tokens" in report["parity_rows"]
    assert (tmp_path / "int8" / "model.onnx").is_file()


def test_a_run_model_is_measured_on_the_rows_its_run_held_back(tiny_model_dir, sst2_small, tmp_path):
    from helpers import write_recipe

    from slimtune.runner import run

    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, sst2_small[0], eval_fraction=0.2,
                          stages=[{"stage": "finetune", "method": "full", "epochs": 1, "lr": 1e-3}])
    metrics = run(recipe, tmp_path / "run", progress=False)
    report = export_onnx(tmp_path / "run" / "model", tmp_path / "int8", quantize="dynamic", optimize=False)
    assert report["labelled"] is True and report["parity"] in ("pass", "fail")
    assert report["rows"] == metrics["data"]["eval_rows"] and "did not train on" in report["parity_rows"]
    assert "held out of" in report["parity_rows"] and report["torch_accuracy"] == pytest.approx(
        metrics["final"]["accuracy"])
