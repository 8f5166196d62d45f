"""`slimtune serve`, started for real on a free loopback port: answers equal `slimtune predict`'s, dynamic
batching, the bounded queue, auth and limits with their status codes, metrics, feedback, hot reload,
SIGTERM draining, server-sent generation, and an ONNX directory served without torch."""

import json
import shutil
import signal
import sqlite3
import threading
import time

import pytest
import requests
import torch
from helpers import slimtune
from serve_helpers import Server

from slimtune.config import Preprocessing
from slimtune.predict import Predictor

LABELS = {0: "negative", 1: "positive"}
TEXTS = ["a gripping , funny film", "dull and far too long", "<b>the best</b> thing this year",
         "i wanted to leave after ten minutes", "an honest , moving story", "flat characters , flat jokes"]
TOKEN = "s3cret-token-for-tests"


def save_classifier(tiny_model_dir, out, seed: int):
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    torch.manual_seed(seed)
    model = load_for_classification(tiny_model_dir, LABELS)
    tokenizer = load_tokenizer(tiny_model_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(40)  # a sharp head: random BERTs otherwise predict 50/50
        logits = model(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
        margin = logits[:, 1] - logits[:, 0]  # centred, so that both labels occur among TEXTS
        model.classifier.bias[1] -= margin.median() + 1e-3
    save_hf_model(model, tokenizer, out, Preprocessing(max_length=32))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("serve")
    return save_classifier(tiny_model_dir, root / "v1", 0), save_classifier(tiny_model_dir, root / "v2", 1)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    feedback = tmp_path_factory.mktemp("feedback") / "feedback.sqlite"
    with Server(models[0], "--feedback", feedback, "--max-batch", 8, "--max-wait-ms", 20,
                "--max-body-bytes", 4096, "--max-text-chars", 200, token=TOKEN) as s:
        s.feedback = feedback
        yield s


def test_classify_answers_what_predict_answers(server, models):
    answer = server.post("/v1/classify", {"texts": TEXTS})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    expected = Predictor(str(models[0]))(TEXTS)
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
    for ours, theirs in zip(body["predictions"], expected, strict=True):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-5)
        assert set(ours["probabilities"]) == set(LABELS.values())
    assert body["model_version"].startswith("v1@")
    assert server.get("/v1/status").json()["max_batch"] == 8
    assert len({p["label"] for p in expected}) == 2  # the check means something: both labels occur


def test_status_codes_of_bad_requests(server):
    assert server.get("/health", token=None).status_code == 200  # open
    for path in ("/v1/info", "/metrics", "/docs", "/openapi.json", "/v1/status"):
        assert server.get(path, token=None).status_code == 401, path
        assert server.get(path, token="wrong").status_code == 401, path
        assert server.get(path).status_code == 200, path
    denied = server.post("/v1/classify", {"texts": ["x"]}, token=None)
    assert denied.status_code == 401 and denied.headers["WWW-Authenticate"] == "Bearer"
    big = server.post("/v1/classify", {"texts": ["word " * 2000]})
    assert big.status_code == 413 and "4096" in big.json()["error"]
    long = server.post("/v1/classify", {"texts": ["fine", "x" * 201]})
    assert long.status_code == 422 and long.json()["error"].startswith("texts.1: 201 characters")
    missing = server.post("/v1/classify", {"txt": ["a"]})
    assert missing.status_code == 422 and "txt" in missing.json()["error"]
    wrong_type = server.post("/v1/classify", {"texts": "not a list"})
    assert wrong_type.status_code == 422 and wrong_type.json()["error"].startswith("texts")
    assert server.post("/v1/classify", {"texts": []}).status_code == 422
    assert server.post("/v1/classify", {"pairs": [["a", "b"]]}).json()["error"].startswith("pairs:")
    assert server.get("/v1/nothing").status_code == 404
    assert server.get("/v1/classify").status_code == 405
    assert server.post("/v1/generate", {"prompt": "hi"}).json()["error"].startswith("prompt: this server serves a "
                                                                                   "classifier")
    not_json = requests.post(server.url + "/v1/classify", data=b"{oops", headers=server.headers(), timeout=30)
    assert not_json.status_code == 422


def test_feedback_is_stored_and_validated(server):
    ok = server.post("/v1/feedback", {"text": "a fine film", "label": "positive", "predicted": "negative"})
    assert ok.status_code == 200 and ok.json()["stored"]
    bad = server.post("/v1/feedback", {"text": "a fine film", "label": "great"})
    assert bad.status_code == 422 and bad.json()["error"].startswith("label: 'great' is not one of")
    assert server.post("/v1/feedback", {"text": "x", "label": "positive", "predicted": "meh"}).status_code == 422
    with sqlite3.connect(server.feedback) as db:
        rows = db.execute("SELECT text, label, predicted, model_version FROM feedback").fetchall()
    assert ("a fine film", "positive", "negative") == rows[-1][:3] and rows[-1][3].startswith("v1@")
    status = server.get("/v1/status").json()
    assert status["feedback"]["disagreement"] == pytest.approx(1.0)
    assert 'slimtune_feedback_disagreement 1.0' in server.get("/metrics").text


def test_concurrent_requests_are_batched_and_metrics_count_them(server, models):
    expected = {t: p["label"] for t, p in zip(TEXTS, Predictor(str(models[0]))(TEXTS), strict=True)}
    before = _metric(server.get("/metrics").text, "slimtune_batch_size_count")
    results, errors = {}, []

    def one(text):
        try:
            r = server.post("/v1/classify", {"texts": [text]})
            results[text] = r.json()["predictions"][0]["label"]
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=one, args=(t,)) for t in TEXTS * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == expected  # each request got its own text's answer
    text = server.get("/metrics").text
    batches = _metric(text, "slimtune_batch_size_count") - before
    assert batches < len(threads)  # some requests shared a model call
    assert 'slimtune_requests_total{route="/v1/classify",status="200"}' in text
    assert "slimtune_queue_depth 0.0" in text
    assert "slimtune_prediction_confidence_bucket" in text and "slimtune_rolling_confidence" in text
    assert 'slimtune_request_seconds_bucket{le="0.005",route="/v1/classify"}' in text


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_a_full_queue_answers_429_and_a_gone_client_frees_its_place(models, tmp_path):
    with Server(models[0], "--max-queue", 2, "--max-batch", 64, "--max-wait-ms", 1500,
                "--feedback", tmp_path / "f.sqlite") as s:
        # a client that gives up while queued: its place is free again for the next one
        with pytest.raises(requests.Timeout):
            s.post("/v1/classify", {"texts": TEXTS[:2]}, timeout=0.3)
        time.sleep(0.3)
        answers = []

        def ask(texts):
            answers.append(s.post("/v1/classify", {"texts": texts}))

        first = threading.Thread(target=ask, args=(TEXTS[:2],))
        first.start()
        time.sleep(0.3)  # queued, waiting for its batch
        busy = s.post("/v1/classify", {"texts": TEXTS[2:3]})
        first.join()
        assert answers[0].status_code == 200  # the gone client's two texts no longer held the queue
        assert busy.status_code == 429 and busy.headers["Retry-After"] == "1"
        assert "queue" in busy.json()["error"]
        assert s.post("/v1/classify", {"texts": TEXTS[:3]}).json()["error"].startswith("texts: 3 in one request")


def test_hot_reload_switches_atomically_and_sighup_rereads_the_link(models, tmp_path):
    link = tmp_path / "current"
    link.symlink_to(models[0])
    expected = [Predictor(str(m))(TEXTS) for m in models]
    assert expected[0] != expected[1]
    with Server(link, "--max-wait-ms", 800, "--feedback", tmp_path / "f.sqlite", token=TOKEN) as s:
        in_flight = []
        t = threading.Thread(target=lambda: in_flight.append(s.post("/v1/classify", {"texts": TEXTS})))
        t.start()
        time.sleep(0.2)  # queued on v1, waiting for its batch
        switched = s.post("/admin/reload", {"model_dir": str(models[1])})
        t.join()
        assert switched.status_code == 200, switched.text
        assert switched.json()["previous"].startswith("v1@") and switched.json()["model_version"].startswith("v2@")
        old = in_flight[0].json()
        assert old["model_version"].startswith("v1@")  # the request in flight finished on the old version
        assert [p["label"] for p in old["predictions"]] == [p["label"] for p in expected[0]]
        new = s.post("/v1/classify", {"texts": TEXTS}).json()
        assert new["model_version"].startswith("v2@")
        assert [p["probabilities"]["positive"] for p in new["predictions"]] == pytest.approx(
            [p["probabilities"]["positive"] for p in expected[1]], abs=1e-5)
        # a bad directory is refused and the server keeps serving what it served
        refused = s.post("/admin/reload", {"model_dir": str(tmp_path / "nothing")})
        assert refused.status_code == 422 and "nothing" in refused.json()["error"]
        assert s.post("/admin/reload", {}, token=None).status_code == 401
        # SIGHUP: the path it was started with, re-read (a `current` link moved by `slimtune learn`)
        link.unlink()
        link.symlink_to(models[0])
        s.signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while not s.get("/health").json()["model_version"].startswith("v1@") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert s.get("/health").json()["model_version"].startswith("v1@")
        assert 'slimtune_reloads_total{result="switched"} 2.0' in s.get("/metrics").text


def test_sigterm_drains_requests_in_flight(models, tmp_path):
    s = Server(models[0], "--max-wait-ms", 1500, "--feedback", tmp_path / "f.sqlite")
    answers = []
    t = threading.Thread(target=lambda: answers.append(s.post("/v1/classify", {"texts": TEXTS[:1]})))
    t.start()
    time.sleep(0.4)  # the request waits in the batcher
    s.signal(signal.SIGTERM)
    t.join()
    assert answers[0].status_code == 200 and answers[0].json()["predictions"][0]["label"] in LABELS.values()
    assert s.proc.wait(60) == 0


def test_bodies_and_tokens_never_reach_the_log(server):
    secret = "my-private-sentence-xyzzy"
    server.post("/v1/classify", {"texts": [secret]})
    server.post("/v1/feedback", {"text": secret, "label": "positive"})
    server.post("/v1/classify", {"texts": [secret]}, token="a-wrong-token-qwerty")
    log = server.log()
    assert "POST /v1/classify" in log  # the access log is on ...
    assert secret not in log and TOKEN not in log and "qwerty" not in log  # ... with no body or token in it


def test_a_bad_model_directory_is_one_line_before_any_port(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    proc = slimtune("serve", tmp_path, "--port", "1")
    assert proc.returncode != 0 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "config.json" in proc.stderr and "Traceback" not in proc.stderr


def test_an_onnx_directory_is_served_without_torch(models, tmp_path):
    export = tmp_path / "onnx"
    proc = slimtune("export", models[0], "--format", "onnx", "--out", export)
    assert proc.returncode == 0, proc.stderr
    poison = tmp_path / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('the ONNX server imported torch')\n")
    with Server(export, "--feedback", tmp_path / "f.sqlite", env={"PYTHONPATH": str(poison.parent)}) as s:
        answer = s.post("/v1/classify", {"texts": TEXTS})
        assert answer.status_code == 200, s.log()[-2000:]
        body = answer.json()
        assert s.get("/v1/info").json()["runtime"] == "onnxruntime"
        assert s.get("/v1/status").json()["max_batch"] == 1  # batching was measured slower on an ONNX graph
        assert s.post("/v1/feedback", {"text": "ok", "label": "negative"}).status_code == 200
    expected = Predictor(str(models[0]))(TEXTS)
    assert [p["label"] for p in body["predictions"]] == [p["label"] for p in expected]
    for ours, theirs in zip(body["predictions"], expected, strict=True):
        assert ours["probabilities"] == pytest.approx(theirs["probabilities"], abs=1e-4)


def test_generation_streams_server_sent_events(tiny_llama_dir, tmp_path):
    from slimtune.generate import Generator, Sampling

    with Server(tiny_llama_dir, "--feedback", tmp_path / "f.sqlite") as s:
        assert s.get("/v1/info").json()["kind"] == "generate"
        response = s.post("/v1/generate", {"prompt": "the river", "max_new_tokens": 12, "temperature": 0},
                          stream=True)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = [block for block in response.text.split("\n\n") if block]
        kinds = [block.split("\n")[0] for block in events]
        assert kinds[-1] == "event: done" and kinds.count("event: token") >= 2
        tokens = "".join(json.loads(b.split("data: ", 1)[1])["text"] for b in events if b.startswith("event: token"))
        done = json.loads(events[-1].split("data: ", 1)[1])
        plain = s.post("/v1/generate", {"prompt": "the river", "max_new_tokens": 12, "temperature": 0,
                                        "stream": False}).json()
        too_long = s.post("/v1/generate", {"prompt": "word " * 400, "max_new_tokens": 8})
        assert too_long.status_code == 422 and too_long.json()["error"].startswith("prompt: the prompt has")
        assert s.post("/v1/classify", {"texts": ["x"]}).status_code == 422
        assert s.post("/v1/feedback", {"text": "x", "label": "y"}).status_code == 422
    expected = Generator(tiny_llama_dir)("the river", Sampling(max_new_tokens=12, temperature=0),
                                         out=open("/dev/null", "w"))  # noqa: SIM115
    assert done["text"] == expected == plain["text"]
    assert tokens.strip() == expected.strip()


def test_an_exported_decoder_graph_is_served_on_onnxruntime(tiny_llama_dir, tmp_path):
    from slimtune.generate import Generator, Sampling

    exported = slimtune("export", tiny_llama_dir, "--out", tmp_path / "onnx", "--threads", "1")
    assert exported.returncode == 0, exported.stderr[-2000:]
    with Server(tmp_path / "onnx", "--feedback", tmp_path / "f.sqlite") as s:  # not the default ./feedback.sqlite
        info = s.get("/v1/info").json()
        assert info["kind"] == "generate" and info["runtime"] == "onnxruntime"
        got = s.post("/v1/generate", {"prompt": "the river", "max_new_tokens": 12, "temperature": 0,
                                      "stream": False}).json()["text"]
        assert s.post("/v1/generate", {"prompt": "word " * 400, "max_new_tokens": 8}).status_code == 422
    expected = Generator(tiny_llama_dir)("the river", Sampling(max_new_tokens=12, temperature=0),
                                         out=open("/dev/null", "w"))  # noqa: SIM115
    assert got == expected and expected.strip()  # the torch model's greedy text


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test "
                    "installs it: apt-get install chromium)")
def test_the_playground_page_in_headless_chromium(server, models, tmp_path):
    from browser import Browser
    from matplotlib.image import imread

    text = TEXTS[0]
    expected = Predictor(str(models[0]))([text])[0]
    browser = Browser()
    try:
        browser.dialog_answer = TOKEN
        browser.goto(server.url + "/")
        version = browser.wait_for("document.getElementById('model').textContent.includes('v1@') && "
                                   "document.getElementById('model').textContent")
        assert "classification" in version and "torch" in version
        assert len(browser.dialogs) == 1 and "token" in browser.dialogs[0]  # asked once, answered
        browser.evaluate(f"document.getElementById('text').value = {json.dumps(text)}; "
                         "document.getElementById('go').click()")
        rows = browser.wait_for("Array.from(document.querySelectorAll('.bar-row')).map(r => [r.dataset.label, "
                                "r.classList.contains('top'), r.querySelector('.value').textContent])")
        assert {r[0] for r in rows} == set(LABELS.values())
        top = [r for r in rows if r[1]]
        assert len(top) == 1 and top[0][0] == expected["label"]
        assert top[0][2] == f"{100 * expected['score']:.1f}%"
        browser.screenshot(tmp_path / "playground.png")
        shutil.copy(tmp_path / "playground.png", server.feedback.parent / "playground.png")  # for a person to see
        # feedback from the page lands in the store; a reload of the page does not ask again
        other = next(label for label in LABELS.values() if label != expected["label"])
        browser.evaluate(f"document.getElementById('correct').value = {json.dumps(other)}; "
                         "document.getElementById('send-feedback').click()")
        assert "stored" in browser.wait_for("document.getElementById('feedback-status').textContent")
        browser.goto(server.url + "/")
        browser.wait_for("document.getElementById('model').textContent.includes('v1@')")
        assert len(browser.dialogs) == 1
        assert browser.evaluate("document.getElementById('error').textContent") == ""
    finally:
        browser.close()
    with sqlite3.connect(server.feedback) as db:
        assert db.execute("SELECT text, label, predicted FROM feedback ORDER BY id DESC LIMIT 1").fetchone() == (
            text, other, expected["label"])
    pixels = imread(tmp_path / "playground.png")[..., :3]
    assert pixels.shape[1] == 1100 and pixels.shape[0] > 500
    blue_or_green = (pixels[..., 2] > 0.6) & (pixels[..., 0] < 0.3) | (pixels[..., 1] > 0.4) & (pixels[..., 0] < 0.2)
    assert blue_or_green.mean() > 0.001  # the probability bars were drawn, not only text


def test_status_command_prints_the_drift_signals(server):
    proc = slimtune("status", server.url, "--token", TOKEN)
    assert proc.returncode == 0, proc.stderr
    assert "rolling confidence" in proc.stdout and "feedback disagreement" in proc.stdout and "v1@" in proc.stdout
    denied = slimtune("status", server.url, "--token", "wrong")
    assert denied.returncode == 2 and "HTTP 401" in denied.stderr and denied.stderr.count("\n") == 1


def test_feedback_then_learn_then_the_server_serves_the_new_version(models, sst2_small, tmp_path):
    train, dev = sst2_small
    db, versions = tmp_path / "feedback.sqlite", tmp_path / "versions"
    with Server(models[0], "--feedback", db, token=TOKEN) as s:
        for text in TEXTS:
            assert s.post("/v1/feedback", {"text": text, "label": "positive"}).status_code == 200
        proc = slimtune("learn", models[0], "--feedback", db, "--out", versions, "--replay", train, "--eval", dev,
                        "--epochs", 1, "--max-forget", 100, "--server", s.url, "--token", TOKEN)
        assert proc.returncode == 0, proc.stderr[-2000:]
        version = json.loads((versions / "current" / "version.json").read_text())["version"]
        assert s.get("/health").json()["model_version"] == version
        assert s.post("/v1/classify", {"texts": TEXTS[:1]}).json()["model_version"] == version

