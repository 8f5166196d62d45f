"""`slimtune learn` on a tiny random BERT run: versions written and promoted with their before/after figures,
a forgetful version refused, nothing to learn, an interrupted learn that changes nothing, unknown labels
skipped, the watch loop announcing a promotion to a server; and transfer: a fine-tuned classifier started
on other labels gets a new head, on its own labels keeps its head and their order."""

import json
import os
import shutil
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch
from typer.testing import CliRunner

import slimtune
import slimtune.learn as learn_module
from slimtune.cli import app
from slimtune.errors import SlimtuneError
from slimtune.feedback import FeedbackStore
from slimtune.learn import NothingToLearn, learn, watch

FAST = {"epochs": 1, "batch_size": 16, "progress": False}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir, sst2_small):
    """A finished run on 300 SST-2 rows (labels named negative / positive), eval file of 100 rows."""
    out = tmp_path_factory.mktemp("learn-run") / "run"
    slimtune.run({"model": str(tiny_model_dir),
                  "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32,
                           "label_names": {0: "negative", 1: "positive"}},
                  "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 1e-3, "batch_size": 32}],
                  "report": {"start": False, "stages": False, "speed": False}}, out, progress=False)
    return out


def _texts(sst2_small, n, offset=0):
    lines = sst2_small[1].read_text().splitlines()[offset:offset + n]
    return [json.loads(line) for line in lines]


def _store(path, rows):
    with FeedbackStore(path) as store:
        for text, label in rows:
            store.add(text, label, predicted="negative")
    return path


def _feedback(tmp_path, sst2_small, n=12, offset=0, name="fb.db"):
    names = {0: "negative", 1: "positive"}
    return _store(tmp_path / name, [(r["text"], names[r["label"]]) for r in _texts(sst2_small, n, offset)])


def _one_version(run, out):
    """OUT with v0001 (a copy of the run's model, as a learn would have written it) promoted."""
    shutil.copytree(run / "model", out / "v0001")
    (out / "v0001" / "version.json").write_text(json.dumps({"version": "v0001", "origin_run": str(run)}))
    os.symlink("v0001", out / "current")
    return out


def test_a_version_is_written_and_promoted_with_its_figures(tiny_run, sst2_small, tmp_path):
    db = _feedback(tmp_path, sst2_small)
    out = tmp_path / "versions"
    result = learn(tiny_run / "model", db, out, max_forget=100, **FAST)
    assert result.promoted and result.version == "v0001" and result.path == out / "v0001"
    assert os.readlink(out / "current") == "v0001"
    record = json.loads((out / "v0001" / "version.json").read_text())
    assert record["parent"] == {"path": str((tiny_run / "model").resolve()), "version": None}
    assert record["origin_run"] == str(tiny_run.resolve())
    assert record["feedback"] | {"store": None} == {
        "store": None, "store_id": record["feedback"]["store_id"], "first_id": 1, "last_id": 12, "new_rows": 12,
        "used": 12, "skipped_unknown_label": 0, "unknown_labels": {}}
    assert record["replay"]["rows"] == 48 and record["replay"]["available"] == 300  # 4 per feedback row
    assert "training rows of the run" in record["replay"]["source"]
    assert record["eval"]["rows"] == 100 and "eval split of the run" in record["eval"]["source"]
    for when in ("before", "after"):
        assert set(record[when]) == {"old_eval", "feedback"}
        assert record[when]["old_eval"]["rows"] == 100 and record[when]["feedback"]["rows"] == 12
        assert 0 <= record[when]["old_eval"]["accuracy"] <= 1 and 0 <= record[when]["feedback"]["f1_macro"] <= 1
    assert record["forget_pt"] == pytest.approx(
        100 * (record["before"]["old_eval"]["accuracy"] - record["after"]["old_eval"]["accuracy"]))
    assert record["promoted"] is True
    report = json.loads((out / "v0001" / "learn_report.json").read_text())
    assert report["before"] == record["before"] and report["after"] == record["after"]
    md = (out / "v0001" / "learn_report.md").read_text()
    assert "| before (model) |" in md and "| after (v0001) |" in md and "old eval accuracy" in md
    model = slimtune.load_model(out / "current")  # a complete model directory, labels in the model's order
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert not [p.name for p in out.iterdir() if p.name.startswith(".") and p.name != ".learn.lock"]

    # learning again from the promoted version: only the rows it has not learned, nothing when there are none
    with pytest.raises(NothingToLearn, match="0 new feedback rows after id 12"):
        learn(out / "current", db, out, **FAST)
    _store(db, [(r["text"], "positive") for r in _texts(sst2_small, 5, offset=40)])
    second = learn(out / "current", db, out, max_forget=100, **FAST)
    record = second.record
    assert second.version == "v0002" and os.readlink(out / "current") == "v0002"
    assert record["parent"]["version"] == "v0001" and record["origin_run"] == str(tiny_run.resolve())
    assert (record["feedback"]["first_id"], record["feedback"]["last_id"], record["feedback"]["used"]) == (13, 17, 5)
    assert record["before"]["old_eval"] == json.loads((out / "v0001" / "version.json").read_text())[
        "after"]["old_eval"]  # the parent's figures


def test_a_version_that_forgets_is_kept_but_not_promoted(tiny_run, sst2_small, tmp_path, monkeypatch):
    db = _feedback(tmp_path, sst2_small)
    out = _one_version(tiny_run, tmp_path / "versions")
    real = learn_module.measure
    calls = []

    def measure(model, sets, outputs, pad_id):  # the new model (second call) loses 5 points on the old eval set
        figures = real(model, sets, outputs, pad_id)
        calls.append(figures)
        if len(calls) == 2:
            figures["old_eval"]["accuracy"] = calls[0]["old_eval"]["accuracy"] - 0.05
        return figures

    monkeypatch.setattr(learn_module, "measure", measure)
    result = CliRunner().invoke(app, ["learn", str(out / "current"), "--feedback", str(db), "--out", str(out),
                                      "--epochs", "1", "--max-forget", "1.0"])
    assert result.exit_code == 3, result.output
    assert "v0002: NOT promoted: it lost 5.00 pt" in result.output and "unchanged (v0001)" in result.output
    assert os.readlink(out / "current") == "v0001"
    record = json.loads((out / "v0002" / "version.json").read_text())
    assert record["promoted"] is False and record["forget_pt"] == pytest.approx(5.0)
    assert (out / "v0002" / "model.safetensors").is_file()  # kept for inspection
    assert json.loads(result.stdout.strip().splitlines()[-1])["promoted"] is False


def test_an_empty_store_makes_no_version(tiny_run, tmp_path):
    db = tmp_path / "fb.db"
    FeedbackStore(db).close()
    out = tmp_path / "versions"
    result = CliRunner().invoke(app, ["learn", str(tiny_run / "model"), "--feedback", str(db), "--out", str(out)])
    assert result.exit_code == 1 and "nothing to learn" in result.output and "0 new feedback rows" in result.output
    assert not list(out.glob("v*")) and not (out / "current").exists()
    with pytest.raises(NothingToLearn, match="--min-new is 5"):
        _store(db, [("a", "positive")] * 3)
        learn(tiny_run / "model", db, out, min_new=5, **FAST)


@pytest.mark.parametrize("where", ["training", "writing"])
def test_an_interrupted_learn_changes_nothing(tiny_run, sst2_small, tmp_path, monkeypatch, where):
    db = _feedback(tmp_path, sst2_small)
    before = (db.read_bytes(), FeedbackStore(db, readonly=True).rows())
    out = _one_version(tiny_run, tmp_path / "versions")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(learn_module, "run_recipe" if where == "training" else "report_markdown", interrupt)
    with pytest.raises(KeyboardInterrupt):
        learn(out / "current", db, out, max_forget=100, **FAST)
    assert sorted(p.name for p in out.iterdir()) == [".learn.lock", "current", "v0001"]  # no half version, no temp
    assert os.readlink(out / "current") == "v0001"
    with FeedbackStore(db, readonly=True) as store:
        assert store.rows() == before[1]


def test_sigterm_interrupts_as_ctrl_c_does():
    import signal
    import time

    with pytest.raises(KeyboardInterrupt), learn_module.sigterm_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_unknown_labels_are_skipped_and_all_unknown_is_an_error(tiny_run, sst2_small, tmp_path):
    rows = [(r["text"], ["negative", "positive"][r["label"]]) for r in _texts(sst2_small, 6)]
    db = _store(tmp_path / "fb.db", rows + [("meh film", "neutral"), ("so so", "neutral"), ("ok", "1")])
    result = learn(tiny_run / "model", db, tmp_path / "versions", max_forget=100, replay_ratio=1, **FAST)
    fb = result.record["feedback"]
    assert (fb["new_rows"], fb["used"], fb["skipped_unknown_label"], fb["unknown_labels"]) == (9, 7, 2, {"neutral": 2})
    assert result.record["replay"]["rows"] == 7  # "1" is the id of "positive": kept
    db2 = _store(tmp_path / "fb2.db", [("meh", "neutral"), ("fine", "great")])
    with pytest.raises(SlimtuneError, match="none of the 2 new feedback rows has a label of the model"):
        learn(tiny_run / "model", db2, tmp_path / "versions2", **FAST)


def test_plain_model_dirs_need_replay_and_eval_data_and_a_causal_lm_is_refused(tiny_run, sst2_small, tmp_path,
                                                                               tiny_llama_dir):
    plain = shutil.copytree(tiny_run / "model", tmp_path / "plain")  # not RUN/model: no data to fall back on
    db = _feedback(tmp_path, sst2_small, n=4)
    with pytest.raises(SlimtuneError, match="no old eval set to judge forgetting on.*--eval DATA"):
        learn(plain, db, tmp_path / "v", **FAST)
    with pytest.raises(SlimtuneError, match="no training data to replay.*--replay DATA"):
        learn(plain, db, tmp_path / "v", eval_data=sst2_small[1], **FAST)
    result = learn(plain, db, tmp_path / "v", eval_data=sst2_small[1], replay=sst2_small[0], max_forget=100, **FAST)
    assert result.record["parent"]["path"] == str(plain.resolve()) and result.record["replay"]["rows"] == 16
    assert result.record["eval"]["source"] == str(sst2_small[1]) and result.record["origin_run"] is None
    with pytest.raises(SlimtuneError, match="a causal language model; feedback learning is for classifiers"):
        learn(tiny_llama_dir, db, tmp_path / "v2", **FAST)


def test_watch_learns_after_every_rows_and_asks_the_server_to_reload(tiny_run, sst2_small, tmp_path):
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            seen.append((self.path, self.headers["Authorization"], json.loads(body)))
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        db = _feedback(tmp_path, sst2_small, n=6)
        out = tmp_path / "versions"
        lines, sleeps = [], []
        made = watch(tiny_run / "model", db, out, every=5, poll_seconds=7, server=f"http://127.0.0.1:{server.server_port}",
                     token="s3cret", max_cycles=2, sleep=sleeps.append, log=lines.append, max_forget=100, **FAST)
    finally:
        server.shutdown()
    assert made == 1 and sleeps == [7] and len(lines) == 2
    assert "v0001: promoted" in lines[0] and "reloaded: now serving" in lines[0]
    assert "0 new feedback rows after id 6 (learning at 5)" in lines[1]  # the second cycle starts from current
    assert seen == [("/admin/reload", "Bearer s3cret", {"model_dir": str((out / "v0001").resolve())})]
    # a server that is gone: said in the cycle's line, never raised (the version is promoted either way)
    assert "reload of http://127.0.0.1:9 failed" in learn_module.reload_server("http://127.0.0.1:9", out, timeout=5)


# ------------------------------------------------------------------------------------------ transfer
@pytest.fixture(scope="module")
def labelled_classifier(tmp_path_factory, tiny_model_dir):
    """A tiny classifier whose labels are not in alphabetical order (positive = 0)."""
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    torch.manual_seed(1)
    model = load_for_classification(tiny_model_dir, {0: "positive", 1: "negative"})
    out = tmp_path_factory.mktemp("labelled")
    save_hf_model(model, load_tokenizer(tiny_model_dir), out, {"max_length": 32})
    return out


def test_a_classifier_keeps_its_head_and_label_order_for_its_own_labels(labelled_classifier, tmp_path):
    from slimtune.config import DataConfig
    from slimtune.tasks.classification import TextClassification

    task = TextClassification()
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n"
                            for t, label in [("good", "positive"), ("bad", "negative")] * 3))
    outputs = task.output_space(DataConfig(train=data), labelled_classifier)
    assert outputs == {0: "positive", 1: "negative"} and task.start_note(labelled_classifier, outputs) is None
    only_one = tmp_path / "one.jsonl"  # a single label is enough when the model knows it
    only_one.write_text(json.dumps({"text": "good", "label": "positive"}) + "\n")
    assert task.output_space(DataConfig(train=only_one), labelled_classifier) == outputs
    ints = tmp_path / "ints.jsonl"  # integer labels are the model's ids (as eval reads them): a compression
    ints.write_text('{"text": "good", "label": 0}\n{"text": "bad", "label": 1}\n')  # recipe keeps the head
    assert task.output_space(DataConfig(train=ints), labelled_classifier) == outputs
    source = slimtune.load_model(labelled_classifier)
    kept = task.load_pretrained(labelled_classifier, outputs)
    assert torch.equal(kept.classifier.weight, source.classifier.weight)


def test_transfer_to_other_labels_builds_a_new_head_and_keeps_the_encoder(labelled_classifier, tmp_path, capsys):
    from slimtune.models import load_model

    data = tmp_path / "trec.jsonl"  # two labels again, but other ones: the head's rows would mean nothing
    data.write_text("".join(json.dumps({"text": t, "label": label}) + "\n"
                            for t, label in [("who wrote it ?", "HUM"), ("where is it ?", "LOC")] * 10))
    source = load_model(labelled_classifier)
    out = tmp_path / "run"
    slimtune.run({"model": str(labelled_classifier), "data": {"train": str(data), "eval": str(data), "max_length": 32,
                                                              "select_fraction": 0},
                  "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "max_steps": 1, "lr": 1e-12,
                              "keep_best": False}],
                  "report": {"start": False, "stages": False, "speed": False}}, out, progress=False)
    err = " ".join(capsys.readouterr().err.split())
    assert "was fine-tuned for the labels positive, negative; this data has HUM, LOC: a new classification head" in err
    moved = load_model(out / "model")
    assert moved.config.id2label == {0: "HUM", 1: "LOC"}
    assert not torch.allclose(moved.classifier.weight, source.classifier.weight, atol=1e-3)  # re-initialised
    assert abs(float(moved.classifier.weight.detach().std()) - 0.02) < 0.01  # as transformers initialises a new head
    emb = "bert.embeddings.word_embeddings.weight"  # lr 1e-12 for one step: the encoder is the source's
    assert torch.allclose(moved.state_dict()[emb], source.state_dict()[emb])
