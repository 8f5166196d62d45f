"""The real CLI on the real bundled MiniLM with a few hundred SST-2 examples."""

import json
import shutil

import pytest
import yaml
from helpers import ISSUE_RECIPE, slimtune


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sst2_small):
    """The issue's recipe, as written, run by the CLI from the recipe's directory's parent."""
    root = tmp_path_factory.mktemp("project")
    (root / "data").mkdir()
    shutil.copy(sst2_small[0], root / "data" / "train.jsonl")
    shutil.copy(sst2_small[1], root / "data" / "dev.jsonl")
    (root / "recipe.yaml").write_text(ISSUE_RECIPE)
    out = root / "runs" / "lora"
    proc = slimtune("run", root / "recipe.yaml", "--out", out, "--set", "stages.1.latency_runs=5", cwd=root.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, out, proc


def test_run_directory_contract(lora_run):
    _, out, proc = lora_run
    for name in ("model/config.json", "model/model.safetensors", "model/tokenizer.json", "model/README.md",
                 "metrics.json", "recipe.yaml", "report.md", "confusion_matrix.json", "confusion_matrix.png"):
        assert (out / name).is_file(), name
    assert any((out / "tb").iterdir())
    assert not (out / "checkpoints").exists()  # a finished run keeps none unless asked (--keep-checkpoints)
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    for key in ("accuracy", "f1_macro", "precision_macro", "recall_macro", "params", "trainable_params",
                "size_mb", "latency_ms_b1", "throughput_eps"):
        assert isinstance(final[key], int | float), key
    assert final["params"] == 22_713_986
    assert 0 < final["trainable_params"] < 0.05 * final["params"]  # LoRA + head
    assert final["size_mb"] > 80 and final["latency_ms_b1"] > 0 and final["throughput_eps"] > 0
    assert [s["stage"] for s in metrics["stages"]] == ["finetune", "evaluate"]
    assert metrics["stages"][0]["method"] == "lora"
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
    card = (out / "model" / "README.md").read_text()
    assert card.startswith("---\n") and "lora" in card
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"  # resolvable; the alias apart
    assert meta["slimtune"]["base_model"] == "minilm"
    assert "accuracy" in (out / "report.md").read_text().lower()
    assert "lora" in (out / "recipe.yaml").read_text()
    assert (out / "confusion_matrix.png").read_bytes()[:4] == b"\x89PNG"


def test_lora_model_is_merged_and_loads_with_transformers_alone(lora_run):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import slimtune

    _, out, _ = lora_run
    assert not (out / "model" / "adapter_config.json").exists()
    plain = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    assert not any("lora" in name for name, _ in plain.named_parameters())
    ours = slimtune.load_model(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    batch = tok(["a gorgeous , witty , seductive movie .", "dull and lifeless ."], padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(plain(**batch).logits, ours(**batch).logits, atol=1e-6)


def test_eval_prints_one_json_object_matching_the_run(lora_run, sst2_small):
    _, out, _ = lora_run
    proc = slimtune("eval", out / "model", "--data", sst2_small[1], "--no-speed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    result = json.loads(lines[0])
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert result["accuracy"] == pytest.approx(final["accuracy"])
    assert result["f1_macro"] == pytest.approx(final["f1_macro"])


def test_predict_args_and_stdin(lora_run, tmp_path):
    import torch
    from helpers import eval_split

    from slimtune.evaluate import predict_logits

    _, out, _ = lora_run
    texts = ["a masterpiece .", "<b>awful</b> &amp; boring"]
    proc = slimtune("predict", out / "model", *texts)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert set(row["probabilities"]) == {"0", "1"}
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
        assert " " not in proc.stdout.splitlines()[0].split('"probabilities"')[0]  # compact
    # exactly what `slimtune eval`'s path computes for the same texts (cleaning, max_length included)...
    data = tmp_path / "same.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": "0"}) + "\n" for t in texts))
    model, ds, _ = eval_split(out / "model", data)
    probs = torch.softmax(torch.from_numpy(predict_logits(model, ds)), -1)
    assert [row["label"] for row in rows] == [str(int(i)) for i in probs.argmax(-1)]
    ours = torch.tensor([[row["probabilities"]["0"], row["probabilities"]["1"]] for row in rows])
    assert torch.allclose(ours, probs, atol=1e-5)
    piped = slimtune("predict", out / "model", "-", input="a masterpiece .\n<b>awful</b> &amp; boring\n")
    assert piped.returncode == 0
    assert piped.stdout == proc.stdout


def test_resume_on_a_finished_run_says_so(lora_run):
    root, out, _ = lora_run
    proc = slimtune("run", root / "recipe.yaml", "--out", out, "--resume")
    assert proc.returncode == 0
    assert "already finished" in proc.stderr


def test_full_finetune_really_learns(tmp_path, sst2_small):
    """300 SST-2 sentences are enough for MiniLM to beat chance clearly."""
    from helpers import write_recipe

    recipe = write_recipe(tmp_path / "r.yaml", "minilm", *sst2_small,
                          stages=[{"stage": "finetune", "method": "full", "epochs": 5, "lr": 2e-4, "batch_size": 16},
                                  {"stage": "evaluate", "speed": False}])
    proc = slimtune("run", recipe, "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["final"]["accuracy"] > 0.7
    # a model that learnt: predict gives the right sentiment of clear sentences (args and stdin alike)
    clear = {"a gorgeous , witty , seductive movie .": "1", "an utterly delightful , moving film .": "1",
             "dull , lifeless and painfully boring .": "0", "<b>awful</b> &amp; a waste of time": "0"}
    proc = slimtune("predict", tmp_path / "out" / "model", *clear)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["label"] for r in rows] == list(clear.values()), rows
    assert all(r["score"] > 0.6 for r in rows), rows
    piped = slimtune("predict", tmp_path / "out" / "model", "-", input="".join(t + "\n" for t in clear))
    assert piped.returncode == 0 and piped.stdout == proc.stdout
