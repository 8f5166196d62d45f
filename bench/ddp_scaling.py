"""Data-parallel scaling on one machine: MiniLM fine-tuning on 1 and 2 processes of 1 thread each.

    python bench/ddp_scaling.py [--steps 40] [--precisions fp32 bf16] [--rounds 1] [--out-md F] [--out-json F]

Runs `slimtune run` (a finetune stage, `max_steps` optimizer steps of the global batch, SST-2 train
subset) in separate processes, `OMP_NUM_THREADS=1` each:

  1 process x 1 thread     the reference
  2 processes x 1 thread   `--nproc 2` (torchrun's launcher, gloo): each rank computes half of every batch
  1 process x 2 threads    what this 2-core machine does without --nproc (for context)

and reports, per precision (the loop's `precision:` key):
- examples/s of the training loop (rank 0's loop timer, which includes waiting for the other rank);
- the time per step in `distributed.average_gradients_` (the loop's `all_reduce` phase, from
  `seconds_by_phase` in metrics.json): the gradient exchange plus any wait for the slower rank;
- the equivalence check: every step's loss (TensorBoard's `s0-finetune/loss`, the global batch's mean)
  of 2 processes against 1. Dropout is switched off in a copy of MiniLM for all runs: with dropout each
  rank draws its own masks and the curves agree only in distribution.

Separately, 2 gloo processes time `average_gradients_` alone on MiniLM's full gradient (22.7M
parameters, 91 MB in fp32), so the pure exchange cost is known without the wait.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from common import data_file, machine_line

BATCH, MAX_LEN, LR = 32, 64, 5e-5
CONFIGS = ((1, 1), (2, 1), (1, 2))  # (processes, threads each)
TOLERANCE = {"fp32": 1e-4, "bf16": 2e-2}  # max |loss difference| per step; bf16: its rounding of each half batch


def dropout_free_minilm(tmp: Path) -> Path:
    from slimtune.models import resolve_model_path

    src, out = Path(resolve_model_path("minilm")), tmp / "minilm-no-dropout"
    shutil.copytree(src, out)
    config = json.loads((out / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    (out / "config.json").write_text(json.dumps(config, indent=1))
    return out


def write_recipe(tmp: Path, model: Path, steps: int, precision: str) -> Path:
    rows = [line for line in Path(data_file("train")).read_text(encoding="utf-8").splitlines() if line.strip()]
    train = tmp / "train.jsonl"
    train.write_text("\n".join(rows[: steps * BATCH]) + "\n")  # one epoch of exactly `steps` batches
    recipe = {"model": str(model),
              "data": {"train": str(train), "eval": data_file("dev"), "max_length": MAX_LEN, "select_fraction": 0,
                       "eval_limit": 64},
              "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "max_steps": steps, "lr": LR,
                          "batch_size": BATCH, "keep_best": False, "seed": 0, "precision": precision}],
              "report": {"start": False, "stages": False, "speed": False}}
    path = tmp / f"recipe-{precision}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def run_slimtune(recipe: Path, out: Path, nproc: int, threads: int) -> dict:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "slimtune", "run", str(recipe), "--out", str(out), "--device", "cpu", "--overwrite"]
    if nproc > 1:
        cmd += ["--nproc", str(nproc)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    stage = json.loads((out / "metrics.json").read_text())["stages"][0]
    steps = max(stage["steps"], 1)
    return {"eps": stage["examples_per_s"], "steps": stage["steps"], "precision": stage["train_precision"],
            "ms_per_step": 1000 * stage["train_seconds"] / steps,
            "allreduce_ms_per_step": 1000 * stage["seconds_by_phase"]["all_reduce"] / steps,
            "losses": tb_losses(out, "s0-finetune")}


def tb_losses(out: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(next((out / "tb").glob("events.out.tfevents.*"))))
    acc.Reload()
    return [e.value for e in acc.Scalars(f"{tag}/loss")]


# ------------------------------------------------------------------ the exchange alone
def _allreduce_worker(rank: int, size: int, port: int, model_dir: str, reps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from transformers import AutoModelForSequenceClassification

    from slimtune import distributed

    distributed.init("cpu")
    params = list(AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).parameters())
    times = []
    for _ in range(reps + 1):  # the first is a warm-up
        for p in params:
            p.grad = torch.randn_like(p)
        distributed.barrier()  # both ranks start together: no wait is timed
        t0 = time.perf_counter()
        distributed.average_gradients_(params, 0.0)
        times.append(time.perf_counter() - t0)
    if rank == 0:
        n = sum(p.numel() for p in params)
        Path(out).write_text(json.dumps({"params": n, "mb": 4 * n / 1e6, "ms": 1000 * statistics.median(times[1:])}))
    distributed.barrier()


def measure_allreduce(model_dir: Path, tmp: Path, reps: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp / "allreduce.json"
    torch.multiprocessing.spawn(_allreduce_worker, args=(2, port, str(model_dir), reps, str(out)), nprocs=2)
    return json.loads(out.read_text())


# ------------------------------------------------------------------ the report
def beyond_two_cores(ar: dict, compute_ms: float) -> list[str]:
    """What to expect with more processes/machines, from the measured compute and exchange."""
    mb = ar["mb"]
    lines = ["", "**Beyond 2 cores** (estimates from the figures above, not measurements). Every optimizer step "
             f"exchanges the whole gradient: {ar['params'] / 1e6:.1f}M parameters x 4 B = {mb:.0f} MB. A ring "
             f"all-reduce sends and receives 2(N-1)/N x {mb:.0f} MB per rank; here 2 local processes took "
             f"{ar['ms']:.0f} ms for it ({mb / ar['ms']:.2f} GB/s through loopback). One process of one "
             f"thread computes a batch-{BATCH} step in {compute_ms:.0f} ms; N such processes, each on its own "
             "core or machine, compute 1/N of it and then exchange:", "",
             "| ranks N | link | exchange per rank | exchange time | compute per step | step | speed-up vs 1 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for n in (2, 4, 8, 16):
        for link, gbps in (("10 Gbit/s", 1.25), ("1 Gbit/s", 0.125)):
            volume = 2 * (n - 1) / n * mb
            exchange = volume / gbps  # MB / (GB/s) = ms
            compute = compute_ms / n
            lines.append(f"| {n} | {link} | {volume:.0f} MB | {exchange:.0f} ms | {compute:.0f} ms "
                         f"| {compute + exchange:.0f} ms | {compute_ms / (compute + exchange):.2f}x |")
    lines += ["", "Compute shrinks as 1/N and the exchange does not (it tends to 2 x the gradient), so the "
              "speed-up flattens at compute / exchange. Ways to move that limit: a larger global batch or "
              "`grad_accum` (one exchange per optimizer step, not per micro-batch), LoRA or partial training "
              "(only the trainable parameters are exchanged), a faster link; bf16 autocast makes the compute "
              "smaller but not the exchange (the gradients stay fp32), so it lowers the limit."]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps of batch 32 per run")
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"])
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds (the median ex/s is reported)")
    ap.add_argument("--allreduce-reps", type=int, default=10)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tmp = Path(tempfile.mkdtemp(prefix="ddp-scaling-"))
    model = dropout_free_minilm(tmp)
    runs: dict[tuple[str, int, int], list[dict]] = {}
    for rnd in range(args.rounds):
        for precision in args.precisions:
            recipe = write_recipe(tmp, model, args.steps, precision)
            for nproc, threads in CONFIGS:
                r = run_slimtune(recipe, tmp / f"{precision}-{nproc}x{threads}-{rnd}", nproc, threads)
                runs.setdefault((precision, nproc, threads), []).append(r)
                print(json.dumps({"precision": precision, "processes": nproc, "threads": threads, "round": rnd,
                                  **{k: v for k, v in r.items() if k != "losses"}}), flush=True)
    ar = measure_allreduce(model, tmp, args.allreduce_reps)
    print(json.dumps({"allreduce": ar}), flush=True)

    lines = [machine_line(1, args.rounds, f"threads per process as in the table; MiniLM full fine-tuning, dropout "
                                          f"off, {args.steps} steps of batch {BATCH}, SST-2 train subset, "
                                          f"max_length {MAX_LEN}, gloo"), "",
             "| precision | processes x threads | train ex/s | vs 1x1 | ms/step | all-reduce ms/step (loop) "
             "| max abs Δloss vs 1 process | equal? |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    checks = []
    for precision in args.precisions:
        ref = runs[(precision, 1, 1)]
        ref_eps = statistics.median(r["eps"] for r in ref)
        for nproc, threads in CONFIGS:
            rs = runs[(precision, nproc, threads)]
            eps = statistics.median(r["eps"] for r in rs)
            diff = max(abs(a - b) for a, b in zip(rs[0]["losses"], ref[0]["losses"], strict=True))
            tol = TOLERANCE["fp32" if rs[0]["precision"].startswith("fp32") else "bf16"]
            equal = "" if (nproc, threads) == (1, 1) else ("yes" if diff <= tol else "NO") + f" (tol {tol:g})"
            if nproc > 1:
                checks.append(f"{precision}: 2 processes vs 1, {len(rs[0]['losses'])} steps: max |Δloss| "
                              f"{diff:.2e} -> {'PASS' if diff <= tol else 'FAIL'}")
            lines.append(f"| {rs[0]['precision']} | {nproc} x {threads} | {eps:.1f} | {eps / ref_eps:.2f}x "
                         f"| {statistics.median(r['ms_per_step'] for r in rs):.0f} "
                         f"| {statistics.median(r['allreduce_ms_per_step'] for r in rs):.0f} "
                         f"| {'' if (nproc, threads) == (1, 1) else f'{diff:.2e}'} | {equal} |")
    lines += ["", f"The exchange alone (2 gloo processes, `average_gradients_` on MiniLM's gradient, "
                  f"{ar['params'] / 1e6:.1f}M parameters = {ar['mb']:.0f} MB, median of {args.allreduce_reps}): "
                  f"{ar['ms']:.0f} ms per step.", ""] + [f"- {c}" for c in checks]
    compute_ms = statistics.median(r["ms_per_step"] for r in runs[(args.precisions[0], 1, 1)])
    lines += beyond_two_cores(ar, compute_ms)
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    if args.out_json:
        args.out_json.write_text(json.dumps({"runs": {"/".join(map(str, k)): v for k, v in runs.items()},
                                             "allreduce": ar}, indent=1))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
