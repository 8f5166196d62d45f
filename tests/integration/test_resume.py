"""`--resume` after a real SIGKILL ends with the same metrics as an uninterrupted run."""

import json
import os
import signal
import subprocess
import sys
import time

from helpers import OFFLINE, slimtune, write_recipe

STAGES = [{"stage": "finetune", "method": "full", "epochs": 3, "lr": 1e-3, "batch_size": 8, "checkpoint_every": 3},
          {"stage": "finetune", "method": "iterative", "lr": 1e-3, "batch_size": 8, "checkpoint_every": 4,
           "iterative": {"group_size": 1, "max_epochs_per_phase": 2}},
          {"stage": "evaluate", "latency_runs": 2, "throughput_batches": 1}]
QUALITY = ("accuracy", "f1_macro", "precision_macro", "recall_macro", "params", "trainable_params")


def _metrics(out):
    return json.loads((out / "metrics.json").read_text())


def _states(out):
    """state.json of the checkpoints present now (the run prunes old ones while we look)."""
    found = []
    for path in (out / "checkpoints").glob("ckpt-*/state.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    return found


def test_killed_run_resumes_to_identical_metrics(tmp_path, tiny_model_dir, sst2_small):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small, stages=STAGES)
    ref = slimtune("run", recipe, "--out", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-2000:]

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "slimtune", "run", str(recipe), "--out", str(out)], env={**os.environ, **OFFLINE},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill inside the second stage, once a few of its checkpoints exist
    while time.time() < deadline and proc.poll() is None:
        if any(s["tag"].startswith("s1-") and s["loop"]["step"] >= 4 for s in _states(out)):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "metrics.json").exists() and not (out / "model").exists()

    resumed = slimtune("run", recipe, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stderr
    a, b = _metrics(tmp_path / "ref"), _metrics(out)
    assert {k: a["final"][k] for k in QUALITY} == {k: b["final"][k] for k in QUALITY}
    assert [s.get("history") for s in a["stages"]] == [s.get("history") for s in b["stages"]]
    phases = lambda m: [(p["phase"], p["steps"], p["best_metric"]) for p in m["stages"][1]["phases"]]  # noqa: E731
    assert phases(a) == phases(b)


def test_resume_without_a_checkpoint_starts_over(tmp_path, tiny_model_dir, sst2_small):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small,
                          stages=[{"stage": "finetune", "epochs": 1, "batch_size": 32}, {"stage": "evaluate", "speed": False}])
    proc = slimtune("run", recipe, "--out", tmp_path / "fresh", "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "no complete checkpoint" in proc.stderr and "starting from the beginning" in proc.stderr
    assert (tmp_path / "fresh" / "metrics.json").is_file()
    again = slimtune("run", recipe, "--out", tmp_path / "fresh", "--resume")
    assert again.returncode == 0 and "already finished" in again.stderr


SHORT = [{"stage": "finetune", "epochs": 1, "max_steps": 4, "lr": 1e-3, "batch_size": 16},
         {"stage": "evaluate", "speed": False}]


def _checkpoints(out):
    return sorted(p.name for p in (out / "checkpoints").glob("ckpt-*"))


def test_a_finished_run_removes_its_checkpoints_unless_kept(tmp_path, tiny_model_dir, sst2_small, capsys):
    import yaml

    import slimtune

    recipe = yaml.safe_load(write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small, stages=SHORT).read_text())
    plain = slimtune.run(recipe, tmp_path / "plain", progress=False)
    assert (tmp_path / "plain" / "metrics.json").is_file() and not (tmp_path / "plain" / "checkpoints").exists()
    kept = slimtune.run(recipe, tmp_path / "kept", progress=False, keep_checkpoints=True)
    assert len(_checkpoints(tmp_path / "kept")) == 1
    by_key = slimtune.run(recipe | {"keep_checkpoints": True}, tmp_path / "key", progress=False)
    assert len(_checkpoints(tmp_path / "key")) == 1
    assert plain["final"] == kept["final"] == by_key["final"]
    # the recipe's key is overridden by the argument
    slimtune.run(recipe | {"keep_checkpoints": True}, tmp_path / "off", progress=False, keep_checkpoints=False)
    assert not (tmp_path / "off" / "checkpoints").exists()

    capsys.readouterr()
    for name in ("plain", "kept"):  # without and with checkpoints: nothing to resume, the metrics are returned
        again = slimtune.run(recipe, tmp_path / name, resume=True, progress=False)
        assert again == json.loads((tmp_path / name / "metrics.json").read_text())
        assert "already finished" in capsys.readouterr().err
    assert len(_checkpoints(tmp_path / "kept")) == 1


def test_keep_checkpoints_flag_of_the_cli(tmp_path, tiny_model_dir, sst2_small):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small, stages=SHORT)
    proc = slimtune("run", recipe, "--out", tmp_path / "kept", "--keep-checkpoints")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(_checkpoints(tmp_path / "kept")) == 1
    again = slimtune("run", recipe, "--out", tmp_path / "kept", "--resume")
    assert again.returncode == 0 and "already finished" in again.stderr
    assert len(_checkpoints(tmp_path / "kept")) == 1
