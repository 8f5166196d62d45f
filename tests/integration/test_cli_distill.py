"""Distillation through the real CLI on the real MiniLM: teacher run -> distilled students -> eval/predict.

The MPNet teacher (~400 MB) is exercised by the `slow` tests at the bottom.
"""

import json

import pytest
from helpers import slimtune, write_recipe


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory, sst2_small):
    root = tmp_path_factory.mktemp("teacher")
    recipe = write_recipe(root / "teacher.yaml", "minilm", *sst2_small,
                          stages=[{"stage": "finetune", "epochs": 2, "lr": 2e-4, "batch_size": 16},
                                  {"stage": "evaluate", "speed": False}])
    proc = slimtune("run", recipe, "--out", root / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "out" / "model"


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))


def test_three_layer_student_and_bilstm_through_the_cli(tmp_path, teacher_run, sst2_small):
    teacher_acc = json.loads((teacher_run.parent / "metrics.json").read_text())["final"]["accuracy"]
    students = {"layers3": {"from": "minilm", "layers": [0, 2, 4]}, "bilstm": {"arch": "bilstm", "hidden": 64}}
    results = {}
    for name, student in students.items():
        stage = {"stage": "distill", "teacher": str(teacher_run), "student": student, "epochs": 3,
                 "lr": 2e-4 if name == "layers3" else 3e-3, "batch_size": 16,
                 "transfer_augment": {"copies": 1, "seed": 0}}
        recipe = write_recipe(tmp_path / f"{name}.yaml", "minilm", *sst2_small,
                              stages=[stage, {"stage": "evaluate", "latency_runs": 5, "throughput_batches": 2}])
        proc = slimtune("run", recipe, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[name] = json.loads((tmp_path / name / "metrics.json").read_text())
    assert results["layers3"]["final"]["params"] < 22_713_986
    # speed is the bench's business (bench/distill_sst2.py); here: both were measured, the BiLSTM is smaller
    assert results["bilstm"]["final"]["params"] < results["layers3"]["final"]["params"]
    assert all(r["final"]["latency_ms_b1"] > 0 for r in results.values())
    # A 3-layer MiniLM distilled from a 0.8-ish teacher on 300 sentences is clearly better than chance.
    assert teacher_acc > 0.7 and results["layers3"]["final"]["accuracy"] > 0.65

    bilstm = tmp_path / "bilstm" / "model"
    proc = slimtune("eval", bilstm, "--data", sst2_small[1], "--no-speed")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout)["accuracy"] == pytest.approx(results["bilstm"]["final"]["accuracy"])
    proc = slimtune("predict", bilstm, "a gorgeous , witty film .", "<b>dull</b>")
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [set(r["probabilities"]) for r in rows] == [{"0", "1"}] * 2


def test_distill_bad_input_is_one_line(tmp_path, teacher_run, sst2_small):
    stage = {"stage": "distill", "teacher": str(teacher_run), "student": {"from": "minilm", "layers": [0, 6]}}
    recipe = write_recipe(tmp_path / "r.yaml", "minilm", *sst2_small, stages=[stage])
    proc = slimtune("run", recipe, "--out", tmp_path / "out")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0] == "error: student.layers: index 6 out of range (the model has 6 encoder layers: 0-5)"
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------ real MPNet teacher
@pytest.mark.slow
def test_mpnet_teacher_to_layer_selection_and_minilm_students(tmp_path, sst2_small):
    """MPNet fine-tuned briefly, then (a) 3 of its layers with token-level hidden + attention losses and
    (b) MiniLM (other width, other tokenizer) through pooled hidden states."""
    proc = slimtune("assets", "teacher")
    assert proc.returncode == 0, proc.stderr[-2000:]
    teacher = write_recipe(tmp_path / "t.yaml", "mpnet", *sst2_small, train_limit=200,
                           stages=[{"stage": "finetune", "epochs": 1, "lr": 5e-5, "batch_size": 16},
                                   {"stage": "evaluate", "speed": False}])
    assert slimtune("run", teacher, "--out", tmp_path / "t").returncode == 0
    for name, student, inter in (("sel", {"layers": [0, 6, 11]}, {"loss": "mse+attention"}),
                                 ("mini", {"from": "minilm"}, {"loss": "mse"})):
        stage = {"stage": "distill", "teacher": str(tmp_path / "t" / "model"), "student": student,
                 "intermediate": inter, "max_steps": 5, "batch_size": 16}
        recipe = write_recipe(tmp_path / f"{name}.yaml", "minilm", *sst2_small, train_limit=100,
                              stages=[stage, {"stage": "evaluate", "speed": False}])
        proc = slimtune("run", recipe, "--out", tmp_path / name)
        assert proc.returncode == 0, proc.stderr[-2000:]
        m = json.loads((tmp_path / name / "metrics.json").read_text())
        assert m["stages"][0]["intermediate"]["granularity"] == ("token" if name == "sel" else "pooled")
