"""SmolLM2-135M-Instruct decoding on CPU, side by side: torch fp32 (HF generate) vs ONNX Runtime fp32 vs
ONNX Runtime MatMulNBits int4 / int8 graphs of the same export.

    python bench/onnx_decoder.py [--work runs/onnx_decoder] [--threads 2] [--rounds 3] [--variants a,b,...]
                                 [--exports smollm2:int8,runs/lm_bench/int4-g32-fzero-rtn/model:int4,...]

Protocol, the same for every row: batch 1, the first 128 tokens of WikiText-2 test as the prompt, greedy
decoding, `--threads` threads (torch.set_num_threads / ORT intra-op). Each round generates 33 tokens and
clocks every step inside that one call (torch: a logits processor; ORT: OnnxDecoder's logits hook): prefill
tokens/s = 128 / time to the first token's logits, decode tokens/s = 32 / time from the first to the 33rd.
Rounds interleave the rows, so a machine that gets busier mid-run slows every row alike; the table shows
the median round. On cores shared with other work ORT's spinning intra-op threads halved its decode speed
here (`--no-ort-spinning` lets them sleep); torch varies even more there: measure on a quiet machine.

The ONNX graph is `slimtune export smollm2` (greedy parity with torch checked there); the int4 / int8
graphs are ONNX Runtime's MatMulNBitsQuantizer on it (RTN, every MatMul with a constant weight, the LM
head included unless the row says `headfp32`; the embedding Gather stays fp32). Quality beside speed:
`greedy = torch` counts the prompts (the bench prompt and export's 3 parity prompts, 32 tokens each, no
EOS stop) whose greedy tokens equal torch fp32's (`onnx_decoder.torch_greedy`, the reference row); `ppl` is the
perplexity of `--ppl-tokens` WikiText-2 test tokens in 512-token windows (a few windows: for ranking
the rows, not for a published perplexity).
Needs onnx-ir (ORT's quantizer imports it): pip install -e '.[bench]' (make setup does).

`--exports MODEL:BITS,...` adds slimtune's own `export --quantize int8|int4` of each model directory (or alias):
a model quantized by a run keeps its own codes (GPTQ, a float zero point, its int8 head), a float one is rounded
to nearest in blocks of 32; each export checks itself on WikiText-2 *valid* (export.json: its perplexity rise).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
WIKI = HERE.parents[1] / "shared" / "data" / "wikitext2" / "wiki.test.raw"
PROMPT_TOKENS, NEW_TOKENS = 128, 32

# name -> MatMulNBitsQuantizer settings. accuracy_level 4: int8 activations x int4/int8 weights (VNNI / AVX2
# integer kernels); 0 (unset): weights dequantized to fp32 for an fp32 GEMM
VARIANTS: dict[str, dict] = {
    "int4-b32-asym": {"bits": 4, "block_size": 32, "is_symmetric": False, "accuracy_level": 4},
    "int4-b32-sym": {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4},
    "int4-b64-asym": {"bits": 4, "block_size": 64, "is_symmetric": False, "accuracy_level": 4},
    "int4-b64-sym": {"bits": 4, "block_size": 64, "is_symmetric": True, "accuracy_level": 4},
    "int4-b128-asym": {"bits": 4, "block_size": 128, "is_symmetric": False, "accuracy_level": 4},
    "int4-b128-sym": {"bits": 4, "block_size": 128, "is_symmetric": True, "accuracy_level": 4},
    "int4-b32-asym-acc0": {"bits": 4, "block_size": 32, "is_symmetric": False, "accuracy_level": 0},
    # the LM head (a 576 x 49,152 MatMul, ~20% of the weights) left fp32, the usual int4 recipe
    "int4-b32-sym-headfp32": {"bits": 4, "block_size": 32, "is_symmetric": True, "accuracy_level": 4,
                              "nodes_to_exclude": ["/model/lm_head/MatMul"]},
    "int4-b128-asym-headfp32": {"bits": 4, "block_size": 128, "is_symmetric": False, "accuracy_level": 4,
                                "nodes_to_exclude": ["/model/lm_head/MatMul"]},
    "int8-b32-sym": {"bits": 8, "block_size": 32, "is_symmetric": True, "accuracy_level": 4},
    "int8-b128-sym": {"bits": 8, "block_size": 128, "is_symmetric": True, "accuracy_level": 4},
    "int8-b32-asym": {"bits": 8, "block_size": 32, "is_symmetric": False, "accuracy_level": 4},
}
# Not a row: the embedding Gather as int4 (op_types_to_quantize=("MatMul", "Gather")) makes the quantizer lift
# the graph to opset 21 for its int4 type, and ONNX Runtime 1.31 then refuses the graph (INVALID_GRAPH).


def quantize_nbits(src: Path, dest: Path, settings: dict) -> None:
    """ORT's MatMulNBitsQuantizer (RTN) on `src`, written to `dest` (a temp name first: no half graphs)."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # one INFO line per node otherwise
    quantizer = MatMulNBitsQuantizer(onnx.load(str(src)), **settings)
    quantizer.process()
    tmp = dest.with_suffix(".tmp")
    quantizer.model.save_model_to_file(str(tmp), use_external_data_format=False)
    os.replace(tmp, dest)


class Clock(list):
    """Receives each step's logits (ORT) or is called as a logits processor (torch): records the time."""

    def append(self, _logits) -> None:
        super().append(time.perf_counter())

    def __call__(self, input_ids, scores):
        self.append(None)
        return scores


class TorchRows:
    """transformers' generate on the model as `slimtune generate` loads it (fp32, sdpa attention)."""

    def __init__(self, model):
        self.model = model

    def generate(self, prompt: list[int], n: int, clock: Clock | None = None) -> list[int]:
        """Plain argmax, no EOS: exactly n tokens (a blank generation config, as onnx_decoder.torch_greedy)."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        ids = torch.tensor([prompt])
        cfg = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=0)
        saved, self.model.generation_config = self.model.generation_config, GenerationConfig()
        try:
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=cfg,
                                          logits_processor=LogitsProcessorList([clock] if clock is not None else []))
        finally:
            self.model.generation_config = saved
        return out[0, len(prompt):].tolist()

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


class OrtRows:
    def __init__(self, decoder):
        self.decoder = decoder

    def generate(self, prompt: list[int], n: int, clock: Clock | None = None) -> list[int]:
        return self.decoder.generate(prompt, n, logits_out=clock)  # no EOS: exactly n tokens

    def logits(self, ids: list[int]) -> np.ndarray:
        logits, _ = self.decoder.step(np.asarray([ids]), self.decoder.empty_past(), 0)
        return logits[0]


def perplexity(rows, tokens: list[int], window: int = 512) -> float:
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, window):
        chunk = tokens[start:start + window]
        if len(chunk) < 2:
            break
        logits = rows.logits(chunk)[:-1].astype(np.float64)
        top = logits.max(-1, keepdims=True)
        logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(chunk) - 1), chunk[1:]].sum())
        count += len(chunk) - 1
    return math.exp(nll / count)


def timed(rows, prompt: list[int]) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of one call generating NEW_TOKENS + 1 tokens."""
    clock = Clock()
    t0 = time.perf_counter()
    out = rows.generate(prompt, NEW_TOKENS + 1, clock)
    assert len(out) == NEW_TOKENS + 1 and len(clock) == NEW_TOKENS + 1, (len(out), len(clock))
    return len(prompt) / (clock[0] - t0), NEW_TOKENS / (clock[-1] - clock[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("runs/onnx_decoder"), help="graphs are kept here and reused")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="MatMulNBits rows (names above), '' for none")
    ap.add_argument("--exports", default="", help="MODEL_DIR:int8|int4,... : slimtune export --quantize rows")
    ap.add_argument("--ppl-tokens", type=int, default=2048, help="WikiText-2 test tokens for the ppl column (0: skip)")
    ap.add_argument("--no-ort-spinning", action="store_true", help="ORT's idle intra-op threads sleep (shared cores)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from slimtune.evaluate import cpu_description
    from slimtune.export import export_onnx
    from slimtune.models import load_model, load_tokenizer, resolve_model_path
    from slimtune.onnx_decoder import OnnxDecoder, torch_greedy
    from slimtune.tasks.causal_lm import parity_prompts

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    path = resolve_model_path("smollm2")
    fp32 = args.work / "fp32" / "model.onnx"
    if not fp32.is_file():
        t0 = time.perf_counter()
        report = export_onnx("smollm2", fp32.parent, threads=args.threads, overwrite=True)
        print(f"exported {fp32} in {time.perf_counter() - t0:.0f} s: {report['parity_detail']}")
    graphs: dict[str, Path] = {"ORT fp32": fp32}
    failed: dict[str, str] = {}
    for name in [v for v in args.variants.split(",") if v]:
        dest = args.work / f"{name}.onnx"
        try:
            if not dest.is_file():
                t0 = time.perf_counter()
                quantize_nbits(fp32, dest, VARIANTS[name])
                print(f"quantized {name} in {time.perf_counter() - t0:.0f} s")
            graphs[f"ORT {name}"] = dest
        except Exception as e:  # noqa: BLE001  (a row ORT refuses is reported, the others still run)
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"

    for spec in [e for e in args.exports.split(",") if e]:
        source, bits = spec.rsplit(":", 1)
        label = f"slimtune {bits} of {Path(source).parent.name if '/' in source else source}"
        dest = args.work / "exports" / label.replace(" ", "-")
        if not (dest / "model.onnx").is_file():
            t0 = time.perf_counter()
            report = export_onnx(source, dest, quantize=bits, data=WIKI.with_name("wiki.valid.raw"),
                                 threads=args.threads, overwrite=True, force=True)
            print(f"exported {label} in {time.perf_counter() - t0:.0f} s: {len(report['nbits']['own_codes'])} layers "
                  f"with own codes, {len(report['nbits']['rounded'])} rounded; {report['parity_detail']}")
        graphs[label] = dest / "model.onnx"

    tokenizer, model = load_tokenizer(path), load_model(path)
    text = WIKI.read_text(encoding="utf-8")
    wiki = tokenizer(text[:200_000], add_special_tokens=False)["input_ids"]
    prompt = wiki[:PROMPT_TOKENS]
    rows: dict[str, object] = {"torch fp32 (HF generate)": TorchRows(model)}
    for name, graph in graphs.items():
        try:
            rows[name] = OrtRows(OnnxDecoder(graph, threads=args.threads, spinning=not args.no_ort_spinning))
        except Exception as e:  # noqa: BLE001
            failed[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"

    # quality first (also warms every session up): greedy tokens against torch's, and perplexity
    quality_prompts = [prompt, *parity_prompts(tokenizer)]
    reference = [torch_greedy(model, p, NEW_TOKENS) for p in quality_prompts]  # no EOS: 32 tokens each
    same, ppl = {}, {}
    for name, r in rows.items():
        hits = 0 if isinstance(r, TorchRows) else sum(
            r.generate(p, NEW_TOKENS) == ref for p, ref in zip(quality_prompts, reference, strict=True))
        same[name] = "reference" if isinstance(r, TorchRows) else f"{hits}/{len(quality_prompts)}"
        ppl[name] = perplexity(r, wiki[:args.ppl_tokens]) if args.ppl_tokens else None
    # speed: interleaved rounds, each row's median round
    speed: dict[str, list[tuple[float, float]]] = {n: [] for n in rows}
    for _ in range(args.rounds):
        for name, r in rows.items():
            speed[name].append(timed(r, prompt))
    load_after = os.getloadavg()

    def decode(name: str) -> float:
        return statistics.median(s[1] for s in speed[name])

    def prefill(name: str) -> float:
        return statistics.median(s[0] for s in speed[name])

    base = decode("torch fp32 (HF generate)")
    ort = decode("ORT fp32") if "ORT fp32" in rows else None
    print(f"\nCPU: {cpu_description()}; {args.threads} threads (ORT spinning "
          f"{'off' if args.no_ort_spinning else 'on'}); batch 1, {PROMPT_TOKENS}-token prompt, "
          f"{NEW_TOKENS} new greedy tokens; median of {args.rounds} rounds")
    print(f"load average (1/5/15 min) before: {load_before[0]:.2f}/{load_before[1]:.2f}/{load_before[2]:.2f}, "
          f"after: {load_after[0]:.2f}/{load_after[1]:.2f}/{load_after[2]:.2f} on {os.cpu_count()} cores")
    print(f"greedy = torch: of {len(quality_prompts)} prompts x {NEW_TOKENS} tokens; "
          + (f"ppl: WikiText-2 test, first {args.ppl_tokens} tokens, 512-token windows\n" if args.ppl_tokens
             else "ppl: not measured (--ppl-tokens 0)\n"))
    print("| runtime | decode tok/s | x torch | x ORT fp32 | prefill tok/s | graph MB | greedy = torch | ppl |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in rows:
        size = (f"{graphs[name].stat().st_size / 1e6:.0f}" if name in graphs
                else f"{sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6:.0f} (torch)")
        d = decode(name)
        print(f"| {name} | {d:.1f} | {d / base:.2f} | {f'{d / ort:.2f}' if ort else '-'} | "
              f"{prefill(name):.0f} | {size} | {same[name]} | "
              + (f"{ppl[name]:.2f} |" if ppl[name] is not None else "- |"))
    for name, why in failed.items():
        print(f"| {name} | not run: {why} | | | | | | |")


if __name__ == "__main__":
    main()
