"""SmolLM2-135M-Instruct (the `smollm2` asset): WikiText-2 test perplexity of pruned models, side by side.

    python bench/lm_smollm2.py [--rows dense,magnitude-50,...] [--eval-tokens 40000] [--runs runs/lm_bench]

Every row is one `slimtune run` of the causal-lm task: calibration on WikiText-2 *valid* (never the
evaluated text), perplexity on the first `--eval-tokens` tokens of WikiText-2 *test* in 512-token
windows. Rows already run (RUNS/NAME/metrics.json) are read back, not re-run. The table prints the
ratio to dense and the CPU next to it.

Rows still to come with issue 16: weight-only int8/int4 (RTN, GPTQ) with a packed decode kernel,
LoRA recovery, and the llama-cpp-python peer on the same GGUF.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
WIKI = HERE.parents[1] / "shared" / "data" / "wikitext2"
CALIBRATION = {"calibration": {"samples": 64}}

ROWS: dict[str, list[dict]] = {
    "dense": [],
    "magnitude-50": [{"stage": "prune", "method": "magnitude", "sparsity": 0.5}],
    "wanda-50": [{"stage": "prune", "method": "activation", "sparsity": 0.5, **CALIBRATION}],
    "sparsegpt-50": [{"stage": "prune", "method": "sparsegpt", "sparsity": 0.5, **CALIBRATION}],
    "wanda-2:4": [{"stage": "prune", "method": "activation", "n_m": [2, 4], **CALIBRATION}],
    "sparsegpt-2:4": [{"stage": "prune", "method": "sparsegpt", "n_m": [2, 4], **CALIBRATION}],
}


def run_row(name: str, stages: list[dict], runs: Path, eval_tokens: int) -> dict:
    import slimtune

    out = runs / name
    if not (out / "metrics.json").is_file():
        recipe = {"task": "causal-lm", "model": "smollm2",
                  "data": {"train": str(WIKI / "wiki.valid.raw"), "eval": str(WIKI / "wiki.test.raw"),
                           "block_size": 512, "eval_tokens": eval_tokens},
                  "stages": [*stages, {"stage": "evaluate", "speed": False}]}
        slimtune.run(recipe, out, overwrite=True)
    return json.loads((out / "metrics.json").read_text())


def main() -> None:
    from slimtune.evaluate import cpu_description

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--eval-tokens", type=int, default=40000)
    ap.add_argument("--runs", type=Path, default=Path("runs/lm_bench"))
    args = ap.parse_args()
    results = {name: run_row(name, ROWS[name], args.runs, args.eval_tokens) for name in args.rows.split(",")}
    dense = results.get("dense") or run_row("dense", [], args.runs, args.eval_tokens)
    base = dense["final"]["perplexity"]
    print(f"CPU: {cpu_description()}; WikiText-2 test, first {args.eval_tokens} tokens, 512-token windows")
    print("| row | perplexity | x dense | sparsity | prune seconds |")
    print("| --- | --- | --- | --- | --- |")
    for name, m in results.items():
        ppl = m["final"]["perplexity"]
        prune = next((s for s in m["stages"] if s["stage"] == "prune"), {})
        seconds = prune.get("seconds")
        print(f"| {name} | {ppl:.2f} | {ppl / base:.2f}x | {prune.get('final_sparsity', 0) or 0:.3f} | "
              f"{'' if seconds is None else f'{seconds:.0f}'} |")


if __name__ == "__main__":
    main()
