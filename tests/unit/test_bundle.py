"""`slimtune export --format bundle`: an int8 classifier with a runtime that needs only onnxruntime, tokenizers and
numpy; the required check runs it in a fresh venv holding those three packages alone."""

import ast
import hashlib
import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from slimtune.bundle import runtime_requirements, write_bundle
from slimtune.errors import SlimtuneError

SRC = Path(__file__).resolve().parents[2] / "src" / "slimtune"
LABELS = {0: "negative", 1: "positive"}
PRE = {"max_length": 64, "text_field": "text", "label_field": "label"}
# what the runtime must do as training did: HTML and entities, invisible characters, full width, truncation at 64
CRAFTED = ["<p>A gripping,&nbsp;funny film.</p>", "Dull and\u200b far too long.", "ＦＵＬＬ width  text",
           "a long review " + "that keeps going and going " * 30, "ok", "<b>awful</b> &amp; boring"]


def _texts(sst2_dev: Path, n: int) -> list[str]:
    return [json.loads(line)["text"] for line in sst2_dev.read_text(encoding="utf-8").splitlines()[:n]]


@pytest.fixture(scope="module")
def clf_dir(tmp_path_factory, tiny_model_dir, sst2_small):
    """A tiny random BERT made to read its text, whose head reads the first principal direction of its pooled
    output on SST-2 texts (logit margin sd 4): its answers vary with the text and most are confident, so int8
    and torch labels can be compared on them. (As initialised, its [CLS] output hardly depends on the text, and
    trained in a few steps it answers one class everywhere.)"""
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    torch.manual_seed(0)
    model = load_for_classification(tiny_model_dir, LABELS).eval()
    tok = load_tokenizer(tiny_model_dir)
    enc = tok(_texts(sst2_small[0], 200), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        for layer in model.bert.encoder.layer:  # attention that moves the words into [CLS], and sharper
            layer.attention.self.value.weight *= 10
            layer.attention.output.dense.weight *= 10
            layer.attention.self.query.weight *= 10 ** 0.5
            layer.attention.self.key.weight *= 10 ** 0.5
        model.bert.pooler.dense.weight *= 10
        pooled = model.bert(**enc).pooler_output
        mean = pooled.mean(0)
        direction = torch.linalg.svd(pooled - mean, full_matrices=False).Vh[0]
        half = 2 / ((pooled - mean) @ direction).std()  # logit 1 - logit 0 = 4 * standardised projection
        model.classifier.weight.copy_(torch.stack([-direction, direction]) * half)
        model.classifier.bias.copy_(torch.stack([mean @ direction, -(mean @ direction)]) * half)
    out = tmp_path_factory.mktemp("bundle-clf")
    save_hf_model(model, tok, out, PRE)
    pairs = tmp_path_factory.mktemp("bundle-pair-clf")
    save_hf_model(model, tok, pairs, PRE | {"text_pair_field": "text2"})
    return out, pairs


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, clf_dir, sst2_small):
    """The classifier's bundle, int8 measured on 100 labelled rows (any drop passes: the policy is export's,
    tested in test_export.py), and the bundle of the pair model (unlabelled: random token pairs)."""
    out = tmp_path_factory.mktemp("bundles")
    report = write_bundle(clf_dir[0], out / "single", data=sst2_small[1], max_drop=100.0)
    pair_report = write_bundle(clf_dir[1], out / "pair", sample_size=64)
    return out / "single", report, out / "pair", pair_report


def _int8_predict(model_dir: Path, bundle_dir: Path, texts, pairs=None, preprocess=None) -> list[dict]:
    """`slimtune predict`'s own pipeline (Predictor: its cleaning, tokenizer, collation and predictions) with the
    bundle's int8 graph, run in this process by onnxruntime, in place of the torch model."""
    from slimtune.export import OnnxClassifier
    from slimtune.predict import Predictor

    predictor = Predictor(str(model_dir))
    graph = OnnxClassifier(bundle_dir / "model.onnx")
    predictor.model = lambda **inputs: SimpleNamespace(logits=torch.from_numpy(graph(inputs)))
    if preprocess is not None:
        predictor.preprocess = preprocess
    return predictor(texts, pairs)


def _same(got: list[dict], want: list[dict]) -> None:
    assert [g["label"] for g in got] == [w["label"] for w in want]
    for g, w in zip(got, want, strict=True):  # one graph on identical inputs: equal up to float printing
        assert list(g["probabilities"]) == list(w["probabilities"])
        assert max(abs(g["probabilities"][k] - w["probabilities"][k]) for k in g["probabilities"]) <= 2e-6
        assert abs(g["score"] - w["score"]) <= 2e-6


# ------------------------------------------------------------------------- the fresh venv (required)
NETWORK_ERRORS = ("NewConnectionError", "ConnectTimeoutError", "Temporary failure in name resolution",
                  "Network is unreachable", "Max retries exceeded", "ProxyError", "(from versions: none)")


@pytest.fixture(scope="session")
def runtime_python(tmp_path_factory) -> Path:
    """A venv made from the tests' base interpreter with `pip install` of the runtime's requirements alone (no
    torch, no slimtune); skipped, saying so, when pip cannot reach the package index."""
    venv = tmp_path_factory.mktemp("bundle-venv")
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
    python = venv / "bin" / "python"
    res = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                          "--retries", "2", *runtime_requirements()], capture_output=True, text=True, timeout=1200)
    if res.returncode != 0:
        if any(s in res.stderr for s in NETWORK_ERRORS):
            last = res.stderr.strip().splitlines()[-1]
            pytest.skip(f"pip cannot reach the package index, so the bundle's fresh venv was not built: {last}")
        pytest.fail(f"pip install {' '.join(runtime_requirements())} failed:\n{res.stderr[-3000:]}")
    return python


def _run_in_venv(python: Path, *args, cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return subprocess.run([str(python), *map(str, args)], cwd=cwd, env=env, input=stdin, capture_output=True,
                          text=True, timeout=300)


def test_the_bundle_runs_in_a_venv_with_only_its_requirements_and_answers_as_predict(
        bundle, clf_dir, runtime_python, sst2_small, tmp_path):
    from slimtune.predict import Predictor

    single, _, pair, _ = bundle
    for module in ("torch", "slimtune", "transformers"):
        res = _run_in_venv(runtime_python, "-c", f"import {module}", cwd=tmp_path)
        assert res.returncode != 0 and "ModuleNotFoundError" in res.stderr, f"{module} is in the bundle's venv"
    texts = CRAFTED + _texts(sst2_small[1], 20)
    res = _run_in_venv(runtime_python, single / "slimtune_bundle.py", single, *texts, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    _same(got, _int8_predict(clf_dir[0], single, texts))
    # against torch (fp32, not this graph): the same label wherever torch is sure, and it is sure of both labels
    torch_results = Predictor(str(clf_dir[0]))(texts)
    sure = [i for i, r in enumerate(torch_results) if r["score"] >= 0.9]
    assert len(sure) >= len(texts) // 2 and {torch_results[i]["label"] for i in sure} == set(LABELS.values())
    assert [got[i]["label"] for i in sure] == [torch_results[i]["label"] for i in sure]
    # the runtime's own directory is the default bundle; '-' reads stdin; a pair model's TAB splits each line
    firsts, seconds = texts[:12], texts[12:24]
    res = _run_in_venv(runtime_python, "slimtune_bundle.py", "-", cwd=pair,
                       stdin="".join(f"{a}\t{b}\n" for a, b in zip(firsts, seconds, strict=True)))
    assert res.returncode == 0, res.stderr
    _same([json.loads(line) for line in res.stdout.splitlines()], _int8_predict(clf_dir[1], pair, firsts, seconds))


# ------------------------------------------------------------------------------- in this process
def test_the_bundle_holds_what_its_manifest_says(bundle, clf_dir):
    import onnx
    from tokenizers import Tokenizer

    single, report, _, _ = bundle
    manifest = json.loads((single / "bundle.json").read_text())
    names = {"model.onnx", "tokenizer.json", "labels.json", "preprocessing.json", "preprocess.py",
             "slimtune_bundle.py", "requirements.txt", "README.md"}
    assert {p.name for p in single.iterdir()} == names | {"bundle.json"} and set(manifest["files"]) == names
    for name, entry in manifest["files"].items():
        data = (single / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    assert (single / "slimtune_bundle.py").read_bytes() == (SRC / "bundle_runtime.py").read_bytes()
    assert (single / "preprocess.py").read_bytes() == (SRC / "textprep.py").read_bytes()
    pins = ["onnxruntime==1.31.1", "tokenizers==0.23.3", f"numpy=={version('numpy')}"]
    assert manifest["requirements"] == runtime_requirements() == pins
    assert (single / "requirements.txt").read_text().split() == pins
    assert json.loads((single / "labels.json").read_text()) == {"0": "negative", "1": "positive"}
    assert manifest["labels"] == ["negative", "positive"] and manifest["slimtune_version"] == version("slimtune")
    # export's int8 figures, measured on the 100 labelled rows
    figures = manifest["export"]
    assert figures["quantize"] == "dynamic" and figures["int8_format"].startswith("dynamic")
    assert figures["labelled"] is True and figures["rows"] == 100 and figures["parity"] == "pass"
    assert {"torch_accuracy", "onnx_accuracy", "drop_pt", "drop_interval_pt", "agreement"} <= set(figures)
    assert report["bundle"] == manifest
    ops = {n.op_type for n in onnx.load(str(single / "model.onnx")).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}  # an int8 graph
    tok = Tokenizer.from_file(str(single / "tokenizer.json"))
    enc = tok.encode_batch(["short", "a much longer sentence " * 40])
    assert len(enc[0].ids) == len(enc[1].ids) == 64 and enc[0].attention_mask.count(1) == 3
    readme = (single / "README.md").read_text()
    assert "pip install -r requirements.txt" in readme and "slimtune_bundle.py" in readme


def test_the_runtime_cleans_batches_and_pairs_as_predict_does(bundle, clf_dir, sst2_small):
    """Bundle (imported here from slimtune.bundle_runtime, byte-identical to the bundle's copy) in batches of 8
    against predict's pipeline on the same batches; the cleaning matters: without it the answers differ."""
    from slimtune.bundle_runtime import Bundle

    single, _, pair, _ = bundle
    texts = CRAFTED + _texts(sst2_small[1], 10)
    got = Bundle(single).classify(texts, batch_size=8)
    _same(got, [r for i in range(0, len(texts), 8) for r in _int8_predict(clf_dir[0], single, texts[i:i + 8])])
    raw = _int8_predict(clf_dir[0], single, CRAFTED[:1], preprocess=lambda t: t)
    assert abs(raw[0]["score"] - got[0]["score"]) > 1e-4  # "<p>...&nbsp;..." uncleaned is another input
    firsts, seconds = texts[:6], texts[6:12]
    _same(Bundle(pair).classify(firsts, seconds), _int8_predict(clf_dir[1], pair, firsts, seconds))
    assert Bundle(single).classify([]) == []
    with pytest.raises(ValueError, match="2 texts but 1 pairs"):
        Bundle(pair).classify(["a", "b"], ["c"])


def test_the_runtime_imports_only_onnxruntime_tokenizers_numpy_and_the_standard_library():
    tree = ast.parse((SRC / "bundle_runtime.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported - set(sys.stdlib_module_names) == {"onnxruntime", "tokenizers", "numpy"}
    assert len((SRC / "bundle_runtime.py").read_text().splitlines()) < 120


def test_bad_input_is_one_line_and_leaves_nothing(clf_dir, tiny_llama_dir, tmp_path):
    cases = [
        (dict(model_dir=tiny_llama_dir), "bundles hold classifiers; use --format onnx"),
        (dict(model_dir=tmp_path / "nope"), "path not found"),
        (dict(quantize="none"), "a bundle is int8 by definition"),
        (dict(quantize="static"), "static needs --data"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        kwargs = {"model_dir": clf_dir[0], "out": tmp_path / f"new-{i}" / "bundle"} | kwargs
        with pytest.raises(SlimtuneError, match=message) as e:
            write_bundle(**kwargs)
        assert "\n" not in str(e.value) and not kwargs["out"].parent.exists()
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(SlimtuneError, match="is a file"):
        write_bundle(clf_dir[0], tmp_path / "a-file" / "bundle")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(SlimtuneError, match="not empty"):
        write_bundle(clf_dir[0], tmp_path / "full")
    assert [p.name for p in tmp_path.iterdir()] in (["a-file", "full"], ["full", "a-file"])
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]


def test_cli_bundle(clf_dir, tiny_llama_dir, sst2_small, tmp_path):
    from helpers import slimtune

    res = slimtune("export", clf_dir[0], "--format", "bundle", "--out", tmp_path / "b", "--data", sst2_small[1],
                   "--max-drop", "100", "--no-optimize")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["bundle"]["files"].keys() == json.loads(
        (tmp_path / "b" / "bundle.json").read_text())["files"].keys()
    assert f"exported bundle {tmp_path / 'b'}" in res.stderr and "parity pass" in res.stderr
    res = slimtune("export", tiny_llama_dir, "--format", "bundle", "--out", tmp_path / "lm")
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "bundles hold classifiers" in res.stderr
    assert not (tmp_path / "lm").exists()
