"""The storage codec: canonical Huffman and ANS round trips and rates, pack -> unpack of a quantized model
directory (byte-identical), corrupt/truncated/unquantized inputs, the CLI's exit codes, and a real quantized
model giving identical logits after the round trip."""

import json
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from slimtune.cli import main
from slimtune.errors import SlimtuneError
from slimtune.pack import (
    CODECS,
    decode_codes,
    encode_codes,
    entropy_bits,
    huffman_code_lengths,
    pack_model,
    read_packed,
    unpack_model,
)


def laplace_codes(n, scale, seed, dtype=np.int8):
    """Codes shaped like quantized weights: peaked at 0, long tails, clipped to the dtype's range."""
    info = np.iinfo(dtype)
    x = np.random.default_rng(seed).laplace(0, scale, n)
    return np.clip(np.round(x), info.min + 1, info.max).astype(dtype)


def roundtrip(codes, codec):
    params, stream = encode_codes(codes, codec)
    json.dumps(params)  # the parameters go into the JSON header
    decoded = decode_codes(params, stream, codes.size, codes.dtype, codec)
    assert decoded.dtype == codes.dtype and np.array_equal(decoded, codes.ravel())
    return 8 * len(stream)


def entropy_of(codes):
    return entropy_bits(np.unique(codes, return_counts=True)[1])


# ------------------------------------------------------------------------------------------ codecs
@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("scale,seed", [(0.7, 0), (4.0, 1), (30.0, 2)])
def test_round_trip_of_skewed_int8_codes_costs_at_least_the_entropy(codec, scale, seed):
    codes = laplace_codes(50_001, scale, seed)  # not a multiple of the Huffman block: a short last block
    bits, h = roundtrip(codes, codec), entropy_of(codes)
    assert bits >= h
    assert bits <= h + codes.size + 64 * 8  # Huffman: < 1 bit/symbol above H, + block offsets / ANS flush


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("case", ["empty", "one symbol", "min only", "max only", "two symbols", "all 256", "one each"])
def test_degenerate_alphabets(codec, case):
    rng = np.random.default_rng(3)
    codes = {"empty": np.zeros(0, np.int8), "one symbol": np.full(5000, 7, np.int8),
             "min only": np.full(3, -128, np.int8), "max only": np.full(4097, 127, np.int8),
             "two symbols": rng.choice(np.array([-1, 1], np.int8), 10_000, p=[0.9, 0.1]),
             "all 256": rng.permutation(np.repeat(np.arange(-128, 128, dtype=np.int8), 40)),
             "one each": np.arange(-128, 128, dtype=np.int8)}[case]
    bits = roundtrip(codes, codec)
    if case in ("empty", "one symbol", "min only", "max only"):
        assert bits == 0  # a constant tensor is described by its histogram alone
    if case == "all 256" and codec == "huffman":
        assert bits == 8 * codes.size + 32 * -(-codes.size // 2048)  # uniform: exactly 8 bits + block offsets


def test_huffman_lengths_are_limited_and_complete():
    counts = np.array([1, 1] + [2 ** i for i in range(1, 24)])  # unlimited Huffman would need 24-bit codes
    lengths = huffman_code_lengths(counts, 16)
    assert lengths.max() == 16 and np.sum(2.0 ** -lengths) == 1.0  # Kraft equality: a complete prefix code
    assert all(np.diff(lengths[np.argsort(-counts, kind="stable")]) >= 0)  # more frequent, never longer
    codes = np.repeat(np.arange(20, dtype=np.int8), counts[:20])  # the same skew in a 1M-symbol tensor
    assert roundtrip(np.random.default_rng(0).permutation(codes), "huffman") >= entropy_of(codes)


@pytest.mark.parametrize("codec", CODECS)
def test_int16_codes_round_trip(codec):
    codes = laplace_codes(30_000, 2000.0, 4, np.int16)  # ~15k distinct symbols
    assert roundtrip(codes, codec) >= entropy_of(codes)


def test_ans_is_within_two_percent_of_the_entropy_on_a_large_tensor():
    codes = laplace_codes(2_000_000, 6.0, 5).reshape(2000, 1000)
    bits, h = roundtrip(codes, "ans"), entropy_of(codes)
    assert h <= bits <= 1.02 * h
    assert roundtrip(codes, "huffman") <= 1.05 * h


# ------------------------------------------------------------------------------------------ model directories
def fake_quantized_dir(path, quantized=True):
    """config.json (+ slimtune_quantization), model.safetensors with int8 codes / zero points and float32
    scales / biases / LayerNorm, a tokenizer, a model card and a file in a subdirectory."""
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    tensors = {"x.qweight": laplace_codes(64 * 48, 9.0, 6).reshape(64, 48), "x.scale": rng.random((64, 1), np.float32),
               "x.bias": rng.standard_normal(64).astype(np.float32),
               "y.qweight": laplace_codes(32 * 64, 2.0, 7).reshape(32, 64),
               "y.zero_point": rng.integers(-8, 8, (32, 4)).astype(np.int8), "y.scale": rng.random((32, 4), np.float32),
               "ln.weight": np.ones(48, np.float32), "y.act_zero_point": np.array(3, np.int32),
               "emb.qweight": np.zeros((10, 48), np.int8)}  # an all-zero (single-symbol) tensor
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {"model_type": "bert", "hidden_size": 48}
    if quantized:
        config["slimtune_quantization"] = {"method": "int8", "layers": {"x": {"kind": "linear", "bits": 8}}}
    (path / "config.json").write_text(json.dumps(config))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"vocab": {"[PAD]": 0, "héllo": 1}}}))
    (path / "README.md").write_text("---\nbase_model: minilm\n---\n# a model card\n")
    (path / "extra").mkdir()
    (path / "extra" / "notes.bin").write_bytes(bytes(range(256)) * 3)
    return path


def dir_contents(path):
    return {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return fake_quantized_dir(tmp_path_factory.mktemp("pack") / "model")


@pytest.mark.parametrize("codec", CODECS)
def test_pack_then_unpack_gives_the_directory_back_byte_for_byte(model_dir, tmp_path, codec):
    report = pack_model(model_dir, tmp_path / "m.slim", codec=codec, compare=True)
    assert report["packed_bytes"] == (tmp_path / "m.slim").stat().st_size == report["codecs"][codec]["packed_bytes"]
    header, _ = read_packed(tmp_path / "m.slim")
    by_name = {t["name"]: t for t in header["tensors"]}
    assert {by_name[n]["codec"] for n in ("x.qweight", "y.qweight", "y.zero_point", "emb.qweight")} == {codec}
    assert by_name["x.scale"]["codec"] in ("raw", "zstd") and by_name["y.act_zero_point"]["codec"] in ("raw", "zstd")
    assert by_name["y.qweight"]["shape"] == [32, 64] and by_name["y.qweight"]["dtype"] == "I8"
    assert json.loads(header["safetensors_header"])["__metadata__"] == {"format": "pt"}
    assert unpack_model(tmp_path / "m.slim", tmp_path / "out") == tmp_path / "out"
    assert dir_contents(tmp_path / "out") == dir_contents(model_dir)


def test_report_sizes_and_rates(model_dir, tmp_path):
    report = pack_model(model_dir, tmp_path / "m.slim", compare=True)
    assert report["codec"] == "ans" and set(report["codecs"]) == set(CODECS)
    assert report["quantized_weights"] == 64 * 48 + 32 * 64 + 10 * 48
    for codec in CODECS:
        assert report["codecs"][codec]["bits_per_weight"] >= report["entropy_bits_per_weight"] > 1
    assert report["safetensors_bytes"] == (model_dir / "model.safetensors").stat().st_size
    assert 0 < report["zstd19_bytes"] < report["safetensors_bytes"] and 0 < report["gzip9_bytes"]
    assert report["codecs"]["ans"]["weight_stream_bytes"] < 0.7 * report["quantized_weights"]  # int8 in < 5.6 bits
    assert report["codecs"]["ans"]["tensor_stream_bytes"] < report["zstd19_bytes"]  # the same tensors, coded better
    assert report["safetensors_tensor_bytes"] < report["safetensors_bytes"]
    assert "gzip9_bytes" not in pack_model(model_dir, tmp_path / "n.slim")  # baselines only when comparing


@pytest.mark.parametrize("damage", ["flip header", "flip stream", "flip checksum", "truncate", "truncate preamble",
                                    "append", "not packed"])
def test_a_damaged_packed_file_is_refused_before_anything_is_written(model_dir, tmp_path, damage):
    pack_model(model_dir, tmp_path / "m.slim")
    blob = bytearray((tmp_path / "m.slim").read_bytes())
    at = {"flip header": 100, "flip stream": len(blob) - 200, "flip checksum": len(blob) - 1}.get(damage)
    if at is not None:
        blob[at] ^= 0x10
    blob = {"truncate": blob[:-1000], "truncate preamble": blob[:20], "append": blob + b"\0",
            "not packed": b"PK\x03\x04" + bytes(100)}.get(damage, blob)
    (tmp_path / "m.slim").write_bytes(bytes(blob))
    expected = {"truncate": "truncated", "append": "truncated or corrupt", "not packed": "not a slimtune packed",
                "truncate preamble": "not a slimtune packed"}.get(damage, "corrupt")
    with pytest.raises(SlimtuneError, match=expected) as e:
        unpack_model(tmp_path / "m.slim", tmp_path / "out")
    assert str(tmp_path / "m.slim") in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "m.slim"]


def test_bad_inputs_and_existing_outputs(model_dir, tmp_path):
    plain = fake_quantized_dir(tmp_path / "plain", quantized=False)
    with pytest.raises(SlimtuneError, match="not quantized.*run a quantize stage first"):
        pack_model(plain, tmp_path / "p.slim")
    assert not (tmp_path / "p.slim").exists()
    with pytest.raises(SlimtuneError, match="codec 'lzw'"):
        pack_model(model_dir, tmp_path / "p.slim", codec="lzw")
    pack_model(model_dir, tmp_path / "m.slim")
    with pytest.raises(SlimtuneError, match="already exists.*--overwrite"):
        pack_model(model_dir, tmp_path / "m.slim")
    pack_model(model_dir, tmp_path / "m.slim", codec="huffman", overwrite=True)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("keep me")
    with pytest.raises(SlimtuneError, match="not empty.*--overwrite"):
        unpack_model(tmp_path / "m.slim", tmp_path / "out")
    assert dir_contents(tmp_path / "out") == {"old.txt": b"keep me"}
    unpack_model(tmp_path / "m.slim", tmp_path / "out", overwrite=True)
    assert dir_contents(tmp_path / "out") == dir_contents(model_dir)
    with pytest.raises(SlimtuneError, match="packed file not found"):
        unpack_model(tmp_path / "missing.slim", tmp_path / "out2")


def test_pack_verifies_the_round_trip_before_writing(model_dir, tmp_path, monkeypatch):
    import slimtune.pack as pack

    real = pack.huffman_decode
    monkeypatch.setattr(pack, "huffman_decode", lambda *a: real(*a) // 2)  # a decoder bug
    with pytest.raises(SlimtuneError, match="'x.qweight' decodes to different bytes"):
        pack_model(model_dir, tmp_path / "m.slim", codec="huffman")
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------------------ CLI
def run_cli(monkeypatch, capsys, *args):
    """`slimtune ARGS` in-process through the real entry point: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["slimtune", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_cli_pack_and_unpack_exit_codes(model_dir, tmp_path, monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, "pack", model_dir, tmp_path / "m.slim", "--codec", "huffman",
                             "--compare")
    assert code == 0, err
    report = json.loads(out)
    assert report["codec"] == "huffman" and "zstd -19" in err and "packed, ans" in err
    code, out, err = run_cli(monkeypatch, capsys, "unpack", tmp_path / "m.slim", tmp_path / "out")
    assert code == 0 and out.strip() == str(tmp_path / "out")
    assert dir_contents(tmp_path / "out") == dir_contents(model_dir)
    code, out, err = run_cli(monkeypatch, capsys, "unpack", tmp_path / "m.slim", tmp_path / "out")
    assert code == 2 and err.startswith("error: ") and "not empty" in err and err.count("\n") == 1
    (tmp_path / "cut.slim").write_bytes((tmp_path / "m.slim").read_bytes()[:-10])
    code, out, err = run_cli(monkeypatch, capsys, "unpack", tmp_path / "cut.slim", tmp_path / "out2")
    assert code == 2 and "truncated" in err and out == "" and not (tmp_path / "out2").exists()
    plain = fake_quantized_dir(tmp_path / "plain", quantized=False)
    code, out, err = run_cli(monkeypatch, capsys, "pack", plain, tmp_path / "p.slim")
    assert code == 2 and "not quantized" in err and not (tmp_path / "p.slim").exists()


# ------------------------------------------------------------------------------------------ a real quantized model
def test_a_quantized_bert_gives_identical_logits_after_pack_and_unpack(tmp_path):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from slimtune.models import load_model, save_hf_model
    from slimtune.quantize.core import layer_spec, quantize_

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=3,
                                                     max_position_embeddings=64)).eval()
    targets = {f"bert.encoder.layer.{i}.{m}": layer_spec(bits=8) for i in range(2)
               for m in ("attention.self.query", "attention.output.dense")}
    targets |= {f"bert.encoder.layer.{i}.intermediate.dense": layer_spec(bits=4, scheme="asymmetric", group_size=16)
                for i in range(2)}
    targets["bert.embeddings.word_embeddings"] = layer_spec(kind="embedding", bits=8)
    quantize_(model, targets)
    save_hf_model(model, None, tmp_path / "q")
    report = pack_model(tmp_path / "q", tmp_path / "q.slim")
    assert report["codecs"]["ans"]["bits_per_weight"] < 8
    codecs = {t["name"].rsplit(".", 1)[1]: t["codec"] for t in read_packed(tmp_path / "q.slim")[0]["tensors"]}
    assert codecs["qweight"] == codecs["zero_point"] == "ans" and codecs["scale"] in ("raw", "zstd")
    unpack_model(tmp_path / "q.slim", tmp_path / "back")
    assert dir_contents(tmp_path / "back") == dir_contents(tmp_path / "q")
    ids = torch.tensor([[1, 12, 5, 40, 33, 2], [1, 70, 81, 6, 2, 0]])
    with torch.no_grad():
        before = load_model(tmp_path / "q")(input_ids=ids, attention_mask=(ids != 0).long()).logits
        after = load_model(tmp_path / "back")(input_ids=ids, attention_mask=(ids != 0).long()).logits
    assert torch.equal(before, after)
