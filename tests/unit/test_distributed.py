"""Data-parallel training (slimtune.distributed): 2 gloo processes train as 1 does, step by step; sharded
evaluation counts every row once; a dead rank fails the job fast; checkpoints resume on another world size;
devices and `--nproc` checks. Processes: `slimtune run --nproc 2` (torchrun's agent) and, for the
collectives, `torch.multiprocessing.spawn` of tests/dist_workers.py."""

import json
import socket
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import slimtune, sst2_file

import slimtune as slimtune_api
from slimtune import distributed
from slimtune.errors import SlimtuneError

GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")]
TOL = 1e-5


# ------------------------------------------------------------------ no processes
def test_a_global_batch_is_split_in_contiguous_parts():
    world = distributed.World
    assert distributed.rank_rows(list(range(16)), world(0, 2)) == list(range(8))
    assert distributed.rank_rows(list(range(16)), world(1, 2)) == list(range(8, 16))
    assert distributed.rank_rows([7, 3, 5], world(0, 2)) == [7, 3]  # an odd last batch: 2 and 1
    assert distributed.rank_rows([7, 3, 5], world(1, 2)) == [5]
    assert distributed.rank_rows([9], world(1, 2)) == []  # nothing for rank 1: its gradient counts as zero
    assert distributed.rank_rows([4, 2], world(0, 1)) == [4, 2]


def test_devices_and_precision_on_this_machine():
    assert distributed.resolve_device("cpu") == torch.device("cpu")
    cpu = torch.device("cpu")
    assert distributed.precision_for(cpu, "auto", 32) is None  # a narrow model trains in fp32 on a CPU
    assert distributed.precision_for(cpu, "bf16") == "bf16"
    assert distributed.precision_for(cpu, "fp32") is None
    assert distributed.grad_scaler(torch.device("cpu"), None) is None
    batch = {"input_ids": torch.ones(2, 3, dtype=torch.long), "n": 3}
    moved = distributed.to_device(batch, torch.device("cpu"))
    assert moved["input_ids"] is batch["input_ids"] and moved["n"] == 3  # no copy where the tensors already are
    with pytest.raises(SlimtuneError, match="device tpu: expected auto, cpu, cuda or cuda:N"):
        distributed.resolve_device("tpu")
    if not torch.cuda.is_available():
        assert distributed.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(SlimtuneError, match="device cuda: no CUDA device on this machine"):
            distributed.resolve_device("cuda")


def test_the_recipe_names_its_device():
    from slimtune.recipe import parse_recipe

    base = {"model": "x/y", "data": {"train": "a.jsonl"}, "stages": [{"stage": "evaluate"}]}
    assert parse_recipe(base).device == "auto"
    assert parse_recipe({**base, "device": "cuda:1"}).device == "cuda:1"
    with pytest.raises(SlimtuneError, match="device"):
        parse_recipe({**base, "device": "gpu"})


def test_nproc_beyond_this_machine_is_refused_before_anything_starts(tmp_path):
    cores = distributed.cpu_cores()
    with pytest.raises(SlimtuneError, match=rf"--nproc {cores + 1}: this machine has {cores} CPU cores"):
        distributed.check_nproc(cores + 1, "cpu")
    with pytest.raises(SlimtuneError, match="--nproc 0: expected 1 or more processes"):
        distributed.check_nproc(0, "auto")
    distributed.check_nproc(cores, "cpu")
    t0 = time.monotonic()
    proc = slimtune("run", tmp_path / "missing.yaml", "--out", tmp_path / "out", "--nproc", cores + 1, "--device", "cpu")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: --nproc {cores + 1}: this machine has {cores} CPU cores; "
                                                "at most one process per core"]
    assert not (tmp_path / "out").exists() and time.monotonic() - t0 < 60


# ------------------------------------------------------------------ collectives (spawned processes)
def _spawn(fn, tmp: Path, size: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fn, args=(size, port, str(tmp)), nprocs=size, join=True)
    return [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(size)]


def test_sharded_evaluation_counts_every_row_once_and_collectives_agree(tmp_path):
    import dist_workers

    for rank, rec in enumerate(_spawn(dist_workers.collectives, tmp_path)):
        # 7 classifier rows and 5 LM windows on 2 ranks: padded shards gathered without the repeats, sums unpadded
        assert rec["logits_rows"] == 7 and rec["logits_max_diff"] < 1e-6
        assert rec["windows"] == 5 and rec["tokens"][0] == rec["tokens"][1] > 0
        assert rec["nll"][0] == pytest.approx(rec["nll"][1], abs=1e-6)
        assert rec["grads"] == [[2.0] * 3, [1.5] * 3, True]  # a missing gradient counts as zero; none stays None
        assert rec["mean_loss"] == 0.5
        assert rec["on_main_error"] == ("ValueError: broken on rank 0" if rank == 0 else
                                        "SlimtuneError: rank 0 failed: ValueError: broken on rank 0")
        assert rec["on_main_value"] == "from rank 0"
        assert rec["once_files"] == ["once-0"]  # one process per machine computed (the teacher cache's rule)


def test_fsdp2_trains_a_tiny_model_on_cpu_with_gloo(tmp_path):
    """What docs/distributed.md says about FSDP on CPU: torch's FSDP2 shards and trains with gloo, and half
    batches on 2 ranks give the whole batch's steps."""
    import dist_workers

    records = _spawn(dist_workers.fsdp, tmp_path)
    if "skip" in records[0]:
        pytest.skip(records[0]["skip"])
    for rec in records:
        assert rec["sharded"]
        assert rec["losses"] == pytest.approx(rec["ref_losses"], abs=TOL)
        assert rec["losses"][-1] < rec["losses"][0]
        assert rec["max_weight_diff"] < TOL


# ------------------------------------------------------------------ whole runs: 2 processes against 1
@pytest.fixture(scope="module")
def setup(tmp_path_factory, minilm_path):
    """A tiny BERT without dropout (hidden 32, 2 layers), 96 train rows (11 held back to select on, 85 to train
    on: the last batch of 16 is 5, split 3 and 2) and 41 eval rows: nothing divides by 2."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    d = tmp_path_factory.mktemp("dist")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(minilm_path)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=128, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, classifier_dropout=0.0)
    BertModel(cfg).save_pretrained(d / "tiny")
    tok.save_pretrained(d / "tiny")
    lines = sst2_file("train").read_text(encoding="utf-8").splitlines()
    (d / "train.jsonl").write_text("\n".join(lines[:96]) + "\n")
    (d / "dev.jsonl").write_text("\n".join(lines[200:241]) + "\n")
    return d


def _recipe(setup: Path, name: str, stage: dict, **extra) -> Path:
    recipe = {"task": "text-classification", "model": str(setup / "tiny"),
              "data": {"train": str(setup / "train.jsonl"), "eval": str(setup / "dev.jsonl"), "max_length": 32,
                       "select_fraction": 0.11},
              "stages": [stage], "report": {"speed": False}, **extra}
    path = setup / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


# fp32: 1 and N processes do the same arithmetic, to 1e-5. Under bf16 autocast (the default on a CPU with
# bf16) each rank's half batch is rounded on its own, and the curves differ by bf16's rounding (~1e-3).
FINETUNE = {"stage": "finetune", "method": "full", "epochs": 2, "lr": 2e-3, "batch_size": 16, "eval_every": 3,
            "checkpoint_every": 1, "precision": "fp32"}


@pytest.fixture(scope="module")
def one_process(setup) -> Path:
    out = setup / "one"
    slimtune_api.run(_recipe(setup, "finetune", FINETUNE), out, progress=False)
    return out


def _tb_losses(out: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((out / "tb").glob("events.out.tfevents.*"))
    assert len(events) == 1, events  # rank 0 alone logs
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    return [e.value for e in acc.Scalars(f"{tag}/loss")]


def _weights_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def _same_run(one: Path, two: Path, tag: str) -> tuple[dict, dict]:
    """Per-step losses (the global batch's mean), every dev evaluation and the final weights agree."""
    losses_1, losses_2 = _tb_losses(one, tag), _tb_losses(two, tag)
    assert len(losses_1) == len(losses_2) > 0
    assert losses_2 == pytest.approx(losses_1, abs=TOL)
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    h1, h2 = m1["stages"][0]["history"], m2["stages"][0]["history"]
    assert [r["step"] for r in h1] == [r["step"] for r in h2]
    for r1, r2 in zip(h1, h2, strict=True):
        assert {k: v for k, v in r2.items() if isinstance(v, float)} == pytest.approx(
            {k: v for k, v in r1.items() if isinstance(v, float)}, rel=TOL, abs=TOL)  # rel: perplexity
    assert m2["stages"][0]["examples_seen"] == m1["stages"][0]["examples_seen"]
    assert _weights_diff(one, two) < TOL
    return m1, m2


def test_two_gloo_processes_fine_tune_as_one_does(setup, one_process, tmp_path):
    out = tmp_path / "two"
    proc = slimtune("run", _recipe(setup, "finetune", FINETUNE), "--out", out, "--nproc", "2", "--device", "cpu",
                    timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m1, m2 = _same_run(one_process, out, "s0-finetune")
    assert m1["data"]["select_rows"] % 2 == 1 and m1["data"]["eval_rows"] % 2 == 1 and m1["data"]["train_rows"] % 2
    assert m2["start"]["accuracy"] == pytest.approx(m1["start"]["accuracy"], abs=TOL)  # the sharded eval split
    assert m2["final"]["accuracy"] == pytest.approx(m1["final"]["accuracy"], abs=TOL)
    assert proc.stderr.count("stage 0: finetune") == 1  # rank 0 speaks for the job
    assert not (out / "checkpoints").exists()


def test_a_dead_rank_fails_the_job_fast_and_its_checkpoint_resumes_on_one_process(setup, one_process, tmp_path,
                                                                                  monkeypatch):
    out = tmp_path / "killed"
    recipe = _recipe(setup, "finetune", FINETUNE)
    monkeypatch.setenv(distributed.TEST_EXIT_ENV, "1:5")  # rank 1 dies after step 5
    t0 = time.monotonic()
    proc = slimtune("run", recipe, "--out", out, "--nproc", "2", "--device", "cpu", timeout=300)
    monkeypatch.delenv(distributed.TEST_EXIT_ENV)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: rank 1 (pid ") and "exited with code 1" in last, last
    assert elapsed < 120  # torchrun's agent stopped rank 0 at once: nothing waited for a timeout
    state = json.loads((max((out / "checkpoints").glob("ckpt-*")) / "state.json").read_text())
    assert state["loop"]["step"] in (4, 5) and state["loop"]["batch_pos"] > 0  # the global step and data position

    slimtune_api.run(recipe, out, resume=True, progress=False)  # one process takes over
    assert _weights_diff(one_process, out) < TOL


@pytest.mark.slow  # the default suite keeps the fine-tuning and the dead-rank runs on 2 processes
def test_distillation_on_two_processes_shares_one_teacher_cache(setup, one_process, tmp_path):
    stage = {"stage": "distill", "teacher": str(one_process / "model"), "epochs": 1, "lr": 2e-3, "batch_size": 16,
             "alpha": 0.5, "temperature": 2.0, "precision": "fp32"}
    two = tmp_path / "two"
    proc = slimtune("run", _recipe(setup, "distill2", stage | {"cache": str(tmp_path / "cache2.safetensors")}),
                    "--out", two, "--nproc", "2", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("teacher outputs: running") == 1 and (tmp_path / "cache2.safetensors").is_file()
    one = tmp_path / "one"
    slimtune_api.run(_recipe(setup, "distill1", stage | {"cache": str(tmp_path / "cache1.safetensors")}), one,
                     progress=False)
    _same_run(one, two, "s0-distill")


@pytest.mark.slow  # the default suite keeps the fine-tuning and the dead-rank runs on 2 processes
def test_causal_lm_fine_tuning_on_two_processes(tiny_llama_dir, text_files, tmp_path):
    recipe = {"task": "causal-lm", "model": str(tiny_llama_dir),
              "data": {"train": str(text_files / "train.txt"), "eval": str(text_files / "eval.txt"),
                       "block_size": 32},
              "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "batch_size": 8, "lr": 3e-3,
                          "eval_every": 4, "precision": "fp32"}],
              "report": {"speed": False}}
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    proc = slimtune("run", path, "--out", tmp_path / "two", "--nproc", "2", "--device", "cpu", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    slimtune_api.run(path, tmp_path / "one", progress=False)
    m1, m2 = _same_run(tmp_path / "one", tmp_path / "two", "s0-finetune")
    assert m2["final"]["eval_tokens"] == m1["final"]["eval_tokens"]
    assert m2["final"]["perplexity"] == pytest.approx(m1["final"]["perplexity"], rel=1e-4)


# ------------------------------------------------------------------ CUDA (skipped on this machine)
@GPU[0]
@GPU[1]
def test_a_run_trains_and_measures_on_cuda(setup, tmp_path):
    metrics = slimtune_api.run(_recipe(setup, "cuda", FINETUNE | {"epochs": 1}), tmp_path / "cuda", progress=False,
                               device="cuda")
    assert metrics["final"]["accuracy"] is not None


@GPU[0]
@GPU[1]
def test_cuda_precision_is_bf16_where_supported_else_fp16_with_a_scaler():
    dev = torch.device("cuda")
    precision = distributed.precision_for(dev)
    assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    assert (distributed.grad_scaler(dev, precision) is not None) == (precision == "fp16")

