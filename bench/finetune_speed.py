"""Fine-tuning speed: slimtune vs the Hugging Face `Trainer`, side by side in one run.

    python bench/finetune_speed.py [--seeds 0 1] [--train-limit N] [--epochs 1] [--profile] [--out-md F]

Same model (bundled MiniLM), data (SST-2 train, 6,920 sentences, all of them for every contender),
epochs, batch size (32), max_length (64), learning rate and schedule (AdamW 5e-5, weight decay 0.01,
6% linear warm-up then linear decay, grad clip 1.0), thread count, on the CPU. Contenders:

  trainer                `Trainer` + `DataCollatorWithPadding`: the documented recipe (random batches,
                         each padded to its longest sentence), fp32
  trainer-grouped        the same with `train_sampling_strategy="group_by_length"` (Trainer's own
                         length grouping, which its docs do not use by default)
  trainer-bf16           the documented recipe with `bf16=True, use_cpu=True` (accelerate's bf16
                         autocast on the CPU)
  trainer-grouped-bf16   both: the Trainer at its best on this CPU
  slimtune               `slimtune.run` with a finetune stage as shipped: length-bucketed batches,
                         dynamic padding, fused AdamW, `precision: auto` (bf16 autocast of forward + loss on
                         a CPU with avx512_bf16 / AMX, as MiniLM is wide enough to gain; else fp32)
  slimtune-fp32          the same with `precision: fp32`

Throughput is training examples per second of the training loop (Trainer's
`train_samples_per_second`; slimtune's loop timer, which excludes its dev evaluation), the median over
seeds. End-to-end wall time (tokenizing, training, saving/evaluating) is shown too. All models are
evaluated on SST-2 dev by the same code (`slimtune.evaluate.predict_logits`, fp32). The target:
slimtune >= 1.5x the examples/s of the fastest Trainer contender run, at equal accuracy (within 0.5 pt,
mean over seeds).

`--profile` adds where slimtune's loop spends a step (data: collation and copy to the device; forward
and loss; backward; optimizer: clip + AdamW + schedule), in fp32 and under bf16 autocast: the loop
keeps these perf_counter laps in every run (`seconds_by_phase` of its stage record), so profiling
does not change what is measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import data_file, machine_line

LR, WEIGHT_DECAY, WARMUP, BATCH, MAX_LEN, CLIP = 5e-5, 0.01, 0.06, 32, 64, 1.0
# name -> (group_by_length, bf16) for the Trainer; precision for slimtune
TRAINERS = {"trainer": (False, False), "trainer-grouped": (True, False), "trainer-bf16": (False, True),
            "trainer-grouped-bf16": (True, True)}
SLIMTUNES = {"slimtune": "auto", "slimtune-fp32": "fp32"}
CONTENDERS = (*TRAINERS, *SLIMTUNES)
PHASES = ("data", "forward", "backward", "optimizer", "other")  # one process: no all_reduce


def read_jsonl(path: Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[:limit] if limit else rows
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def dev_accuracy(model, tokenizer, dev: tuple[list[str], list[int]]) -> float:
    from slimtune.batching import encode
    from slimtune.evaluate import predict_logits

    ds = encode(tokenizer, dev[0], dev[1], max_length=MAX_LEN)
    pred = predict_logits(model, ds, pad_id=tokenizer.pad_token_id or 0).argmax(-1)
    return float((pred == torch.tensor(dev[1]).numpy()).mean())


def run_trainer(model_dir: Path, train, dev, seed: int, epochs: float, grouped: bool, bf16: bool) -> dict:
    from datasets import Dataset
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    t0 = time.perf_counter()
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    ds = Dataset.from_dict({"text": train[0], "label": train[1]})
    ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=MAX_LEN), batched=True,
                remove_columns=["text"])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=BATCH, num_train_epochs=epochs, learning_rate=LR,
            weight_decay=WEIGHT_DECAY, warmup_steps=WARMUP, lr_scheduler_type="linear", max_grad_norm=CLIP,
            seed=seed, use_cpu=True, bf16=bf16, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
            train_sampling_strategy="group_by_length" if grouped else "random")
        trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        result = trainer.train()
    acc = dev_accuracy(model, tokenizer, dev)
    return {"train_eps": result.metrics["train_samples_per_second"], "train_s": result.metrics["train_runtime"],
            "wall_s": time.perf_counter() - t0, "accuracy": acc}


def run_slimtune(train_path: Path, dev_path: Path, seed: int, epochs: float, precision: str) -> dict:
    import slimtune

    # select_fraction 0: every train sentence is trained on, as by the Trainer (with keep_best off nothing is
    # chosen on the eval split; its one evaluation at the epoch's end is outside the loop's timer)
    recipe = {"model": "minilm",
              "data": {"train": str(train_path), "eval": str(dev_path), "max_length": MAX_LEN, "select_fraction": 0,
                       "split_seed": seed},
              "stages": [{"stage": "finetune", "method": "full", "epochs": epochs, "lr": LR, "batch_size": BATCH,
                          "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP, "schedule": "linear",
                          "grad_clip": CLIP, "seed": seed, "keep_best": False, "precision": precision},
                         {"stage": "evaluate", "speed": False}],
              "report": {"start": False, "stages": False, "speed": False}}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = slimtune.run(recipe, Path(tmp) / "run", progress=False)
    stage = metrics["stages"][0]
    steps = max(stage["steps"], 1)
    return {"train_eps": stage["examples_per_s"], "train_s": stage["train_seconds"],
            "wall_s": time.perf_counter() - t0, "accuracy": metrics["final"]["accuracy"],
            "precision": stage["train_precision"],
            **{f"ms_per_step_{k}": 1000 * stage["seconds_by_phase"][k] / steps for k in PHASES}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training rows (quick check)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--profile", action="store_true",
                    help="where slimtune's loop spends a step, fp32 vs auto (adds slimtune and slimtune-fp32)")
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    if args.profile:
        args.contenders += [c for c in SLIMTUNES if c not in args.contenders]

    from slimtune.evaluate import cpu_description
    from slimtune.models import resolve_model_path

    model_dir = resolve_model_path("minilm")
    train_path, dev_path = Path(data_file("train")), Path(data_file("dev"))
    train, dev = read_jsonl(train_path, args.train_limit), read_jsonl(dev_path)
    if args.train_limit:  # give every contender the very same first N rows
        tmp_train = Path(tempfile.mkdtemp()) / "train.jsonl"
        tmp_train.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(*train, strict=True)))
        train_path = tmp_train

    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for seed in args.seeds:
        # Interleave contenders per seed, so slow drifts of the machine hit all of them alike.
        for name in args.contenders:
            if name in SLIMTUNES:
                r = run_slimtune(train_path, dev_path, seed, args.epochs, SLIMTUNES[name])
            else:
                grouped, bf16 = TRAINERS[name]
                r = run_trainer(model_dir, train, dev, seed, args.epochs, grouped=grouped, bf16=bf16)
            results[name].append(r)
            print(json.dumps({"contender": name, "seed": seed,
                              **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}}), flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[name])

    def eps(name: str) -> float:  # the median over seeds, as machine_line says
        return statistics.median(r["train_eps"] for r in results[name])

    base = "trainer" if "trainer" in results else args.contenders[0]
    trainers = [c for c in args.contenders if c in TRAINERS]
    best = max(trainers, key=eps) if trainers else None
    lines = [machine_line(torch.get_num_threads(), len(args.seeds),
                          f"{len(train[0])} train sentences, {args.epochs:g} epoch(s), batch {BATCH}, "
                          f"max_length {MAX_LEN}, seeds {args.seeds}"), "",
             f"| contender | precision | train ex/s | vs {base} | vs best Trainer | train s | wall s | dev accuracy "
             f"| Δacc vs {base} (pt) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.contenders:
        accs = [r["accuracy"] for r in results[name]]
        acc_txt = f"{statistics.mean(accs):.4f}" + (f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else "")
        precision = results[name][0].get("precision") or ("bf16 autocast" if TRAINERS[name][1] else "fp32")
        vs_best = f"{eps(name) / eps(best):.2f}x" if best else ""
        lines.append(f"| {name} | {precision} | {eps(name):.1f} | {eps(name) / eps(base):.2f}x | {vs_best} "
                     f"| {mean(name, 'train_s'):.0f} | {mean(name, 'wall_s'):.0f} | {acc_txt} "
                     f"| {100 * (mean(name, 'accuracy') - mean(base, 'accuracy')):+.2f} |")
    if "slimtune" in results and best:
        ratio = eps("slimtune") / eps(best)
        delta = 100 * (mean("slimtune", "accuracy") - mean(best, "accuracy"))
        ok = ratio >= 1.5 and abs(delta) <= 0.5
        lines += ["", f"target: slimtune >= 1.5x the best Trainer ({best}) ex/s at |Δacc| <= 0.5 pt -> "
                      f"{ratio:.2f}x, {delta:+.2f} pt: {'PASS' if ok else 'FAIL'}"]
    if args.profile:
        before, after = "slimtune-fp32", "slimtune"
        lines += ["", "slimtune's loop, ms per optimizer step (mean over the run's steps and seeds):", "",
                  f"| phase | {before} | {after} ({results[after][0]['precision']}) | speed-up |",
                  "| --- | --- | --- | --- |"]
        for phase in (*PHASES, "total"):
            ms = [sum(mean(c, f"ms_per_step_{k}") for k in PHASES) if phase == "total"
                  else mean(c, f"ms_per_step_{phase}") for c in (before, after)]
            speedup = f"{ms[0] / ms[1]:.2f}x" if ms[1] else ""
            lines.append(f"| {phase} | {ms[0]:.1f} | {ms[1]:.1f} | {speedup} |")
        lines.append("(data: collation + copy to the device; forward: the model and the loss; optimizer: clip, "
                     "AdamW, schedule; other: hooks and bookkeeping)")
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    if args.out_json:
        args.out_json.write_text(json.dumps({"cpu": cpu_description(),
                                             "args": vars(args) | {"out_md": None, "out_json": None},
                                             "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
