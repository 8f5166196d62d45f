"""Fine-tuning speed: slimtune vs the Hugging Face `Trainer`, side by side in one run.

    python bench/finetune_speed.py [--seeds 0 1] [--train-limit N] [--epochs 1] [--out-md F]

Same model (bundled MiniLM), data (SST-2 train, 6,920 sentences), epochs, batch size (32),
max_length (64), learning rate and schedule (AdamW 5e-5, weight decay 0.01, 6% linear warm-up then
linear decay, grad clip 1.0), thread count, on the CPU. Contenders:

  trainer           `Trainer` + `DataCollatorWithPadding`: the documented recipe (random batches,
                    each padded to its longest sentence)
  trainer-grouped   the same with `train_sampling_strategy="group_by_length"` (Trainer's own
                    length grouping, which its docs do not use by default): shown for honesty
  slimtune          `slimtune.run` with a finetune stage (length-bucketed batches, dynamic padding)

Throughput is training examples per second of the training loop (Trainer's
`train_samples_per_second`; slimtune's loop timer, which excludes its per-epoch dev evaluation).
End-to-end wall time (tokenizing, training, saving/evaluating) is shown too. All models are
evaluated on SST-2 dev by the same code (`slimtune.evaluate.predict_logits`). The target: slimtune
>= 1.5x the examples/s of `trainer` at equal accuracy (within 0.5 pt, mean over seeds).
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
from common import data_file

LR, WEIGHT_DECAY, WARMUP, BATCH, MAX_LEN, CLIP = 5e-5, 0.01, 0.06, 32, 64, 1.0
CONTENDERS = ("trainer", "trainer-grouped", "slimtune")


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


def run_trainer(model_dir: Path, train, dev, seed: int, epochs: float, grouped: bool) -> dict:
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
            seed=seed, use_cpu=True, report_to=[], save_strategy="no", eval_strategy="no",
            logging_strategy="no", disable_tqdm=True,
            train_sampling_strategy="group_by_length" if grouped else "random")
        trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                          data_collator=DataCollatorWithPadding(tokenizer))
        result = trainer.train()
    acc = dev_accuracy(model, tokenizer, dev)
    return {"train_eps": result.metrics["train_samples_per_second"], "train_s": result.metrics["train_runtime"],
            "wall_s": time.perf_counter() - t0, "accuracy": acc}


def run_slimtune(train_path: Path, dev_path: Path, seed: int, epochs: float, limit: int | None) -> dict:
    import slimtune

    recipe = {"model": "minilm",
              "data": {"train": str(train_path), "eval": str(dev_path), "max_length": MAX_LEN, "train_limit": limit,
                       "split_seed": seed},
              "stages": [{"stage": "finetune", "method": "full", "epochs": epochs, "lr": LR, "batch_size": BATCH,
                          "weight_decay": WEIGHT_DECAY, "warmup_ratio": WARMUP, "schedule": "linear",
                          "grad_clip": CLIP, "seed": seed, "keep_best": False},
                         {"stage": "evaluate", "speed": False}]}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        metrics = slimtune.run(recipe, Path(tmp) / "run", progress=False)
    stage = metrics["stages"][0]
    return {"train_eps": stage["examples_per_s"], "train_s": stage["train_seconds"],
            "wall_s": time.perf_counter() - t0, "accuracy": metrics["final"]["accuracy"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=float, default=1)
    ap.add_argument("--train-limit", type=int, default=None, help="first N training rows (quick check)")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    ap.add_argument("--out-md", type=Path, default=None)
    ap.add_argument("--out-json", type=Path, default=None)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)

    from slimtune.evaluate import cpu_description
    from slimtune.models import resolve_model_path

    model_dir = resolve_model_path("minilm")
    train_path, dev_path = Path(data_file("train")), Path(data_file("dev"))
    train, dev = read_jsonl(train_path, args.train_limit), read_jsonl(dev_path)
    if args.train_limit:  # slimtune samples train_limit rows stratified; give both the very same rows
        tmp_train = Path(tempfile.mkdtemp()) / "train.jsonl"
        tmp_train.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(*train, strict=True)))
        train_path = tmp_train

    results: dict[str, list[dict]] = {c: [] for c in args.contenders}
    for seed in args.seeds:
        # Interleave contenders per seed, so slow drifts of the machine hit all of them alike.
        for name in args.contenders:
            if name == "slimtune":
                r = run_slimtune(train_path, dev_path, seed, args.epochs, None)
            else:
                r = run_trainer(model_dir, train, dev, seed, args.epochs, grouped=name == "trainer-grouped")
            results[name].append(r)
            print(json.dumps({"contender": name, "seed": seed, **{k: round(v, 4) for k, v in r.items()}}), flush=True)

    def mean(name: str, key: str) -> float:
        return statistics.mean(r[key] for r in results[name])

    base = "trainer" if "trainer" in results else args.contenders[0]
    cpu = cpu_description()
    lines = [f"CPU: {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"{len(train[0])} train sentences, {args.epochs:g} epoch(s), batch {BATCH}, max_length {MAX_LEN}, "
             f"seeds {args.seeds}", "",
             "| contender | train ex/s | speed-up vs trainer | train s | wall s | dev accuracy | Δacc (pt) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in args.contenders:
        accs = [r["accuracy"] for r in results[name]]
        acc_txt = f"{statistics.mean(accs):.4f}" + (f" ± {statistics.stdev(accs):.4f}" if len(accs) > 1 else "")
        speedup = mean(name, "train_eps") / mean(base, "train_eps")
        lines.append(f"| {name} | {mean(name, 'train_eps'):.1f} | {speedup:.2f}x "
                     f"| {mean(name, 'train_s'):.0f} | {mean(name, 'wall_s'):.0f} | {acc_txt} "
                     f"| {100 * (mean(name, 'accuracy') - mean(base, 'accuracy')):+.2f} |")
    if "slimtune" in results and "trainer" in results:
        ratio = mean("slimtune", "train_eps") / mean("trainer", "train_eps")
        delta = 100 * (mean("slimtune", "accuracy") - mean("trainer", "accuracy"))
        ok = ratio >= 1.5 and abs(delta) <= 0.5
        lines += ["", f"target: slimtune >= 1.5x trainer ex/s at |Δacc| <= 0.5 pt -> {ratio:.2f}x, "
                      f"{delta:+.2f} pt: {'PASS' if ok else 'FAIL'}"]
    table = "\n".join(lines)
    print(table)
    if args.out_md:
        args.out_md.write_text(table + "\n")
    if args.out_json:
        args.out_json.write_text(json.dumps({"cpu": cpu, "args": vars(args) | {"out_md": None, "out_json": None},
                                             "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
