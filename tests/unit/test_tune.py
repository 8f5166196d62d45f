"""`slimtune tune` on tiny random models: trials are real runs scored on the selection split, the study lives in
DIR/study.db and resumes, a lagging curve is pruned, --jobs shares the study between processes, and bad input is
refused in one line before DIR exists."""

import json
import sys

import optuna
import pytest
import yaml
from helpers import LM_TEXT, write_recipe

import slimtune.tune as tune_module
from slimtune.recipe import load_recipe, parse_recipe
from slimtune.tune import default_space, selection_metric, tune

SPACE = "stages.0.lr: {low: 1.0e-4, high: 3.0e-3, log: true}\nstages.0.batch_size: {choices: [16, 32]}\n"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models train fastest on one thread, and a busy machine's cores are not all ours."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model_dir, sst2_small):
    d = tmp_path_factory.mktemp("tune")
    recipe = write_recipe(d / "recipe.yaml", tiny_model_dir, *sst2_small, max_length=32, select_fraction=0.2,
                          stages=[{"stage": "finetune", "method": "full", "epochs": 2, "lr": 1e-3, "batch_size": 16}])
    raw = yaml.safe_load(recipe.read_text())
    recipe.write_text(yaml.safe_dump(raw | {"report": {"speed": False}}, sort_keys=False))
    (d / "space.yaml").write_text(SPACE)
    return recipe, d / "space.yaml"


@pytest.fixture(scope="module")
def tuned(files, tmp_path_factory):
    """One trial, then the same tune asked for three: only the two missing trials run."""
    recipe, space = files
    out = tmp_path_factory.mktemp("tuned") / "out"
    tune(recipe, out, trials=1, space=space)
    first_run = (out / "trials" / "0000" / "metrics.json").stat().st_mtime_ns
    runs = []
    with pytest.MonkeyPatch.context() as mp:
        real = tune_module.run
        mp.setattr(tune_module, "run", lambda *a, **k: runs.append(a[1]) or real(*a, **k))
        summary = tune(recipe, out, trials=3, space=space)
    return out, summary, runs, first_run


def test_a_three_trial_tune_writes_the_study_the_best_recipe_and_the_plot(tuned, files):
    out, summary, _, _ = tuned
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert sorted(p.name for p in (out / "trials").iterdir()) == ["0000", "0001", "0002"]
    assert study.trials[0].params == {"stages.0.lr": 1e-3, "stages.0.batch_size": 16}  # the recipe as written
    best = summary["best"]
    reproduce = load_recipe(out / "best_recipe.yaml")  # what `slimtune run` reads, as is
    assert reproduce.stages[0].lr == pytest.approx(best["params"]["stages.0.lr"])
    assert reproduce.stages[0].batch_size == best["params"]["stages.0.batch_size"]
    assert reproduce.data.train == load_recipe(files[0]).data.train
    png = (out / "trials.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (out / "tune.md").is_file() and json.loads((out / "tune.json").read_text())["best"] == best


def test_the_best_trial_is_chosen_on_the_selection_split_and_reported_on_eval(tuned, files):
    out, summary, _, _ = tuned
    assert summary["chosen_on"] == "selection split (held back from train (select_fraction))"
    assert summary["scored_on"] == f"eval split ({load_recipe(files[0]).data.eval})"
    best = summary["best"]
    assert best["selection"] == max(r["selection"] for r in summary["trials"])
    # the objective is the trial model's metric on the selection split, measured again here ...
    run_dir = out / "trials" / f"{best['number']:04d}"
    value, info = selection_metric(run_dir / "model", load_recipe(run_dir / "recipe.yaml"), tune_module.get_task(
        "text-classification"))
    assert value == pytest.approx(best["selection"]) and info["select_rows"] == 60
    # ... and the eval figures are the trial run's own, reported beside it
    assert best["eval"]["accuracy"] == json.loads((run_dir / "metrics.json").read_text())["final"]["accuracy"]


def test_a_resumed_tune_runs_only_the_missing_trials(tuned):
    out, _, runs, first_run = tuned
    assert [p.name for p in runs] == ["0001", "0002"]
    assert (out / "trials" / "0000" / "metrics.json").stat().st_mtime_ns == first_run  # not run again


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory, tiny_llama_dir):
    d = tmp_path_factory.mktemp("tune-lm")
    (d / "train.txt").write_text(LM_TEXT)
    (d / "recipe.yaml").write_text(yaml.safe_dump({
        "task": "causal-lm", "model": str(tiny_llama_dir), "report": {"speed": False},
        "data": {"train": str(d / "train.txt"), "block_size": 32, "select_fraction": 0.15, "eval_fraction": 0.15},
        "stages": [{"stage": "finetune", "method": "full", "epochs": 2, "lr": 5e-3, "batch_size": 8}]}))
    (d / "space.yaml").write_text("stages.0.lr: {low: 1.0e-8, high: 1.0e-2, log: true}\n")
    return d / "recipe.yaml", d / "space.yaml"


def test_a_lagging_curve_is_pruned_and_an_interrupted_trial_runs_again(lm_files, tmp_path):
    recipe, space = lm_files
    out = tmp_path / "out"
    # perplexity, lower is better: trial 1 barely moves from the random model's (~ the vocabulary size) and is
    # worse than the median of the trials before it at its first evaluation
    median = optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    summary = tune(recipe, out, trials=2, space=space, pruner=median,
                   first=[{"stages.0.lr": 5e-3}, {"stages.0.lr": 1e-8}])
    done, pruned = summary["trials"]
    assert done["state"] == "complete" and pruned["state"] == "pruned"
    assert pruned["pruned_at"]["point"] == "finetune#1" and pruned["pruned_at"]["value"] > done["selection"]
    assert not (out / "trials" / "0001").exists() and summary["best"]["number"] == 0
    assert summary["direction"] == "lower is better"

    # a process killed in the middle of a trial leaves it running in the study: the next tune runs it again
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
    study.ask({"stages.0.lr": optuna.distributions.FloatDistribution(1e-8, 1e-2, log=True)})
    (out / "trials" / "0002").mkdir()  # its partial run
    summary = tune(recipe, out, trials=3, space=space, pruner=median)
    states = [r["state"] for r in summary["trials"]]
    assert states[:3] == ["complete", "pruned", "interrupted"] and len(states) == 4
    assert summary["trials"][3]["params"] == summary["trials"][2]["params"]  # the same point, run again
    assert summary["trials"][2]["error"] is None


def test_jobs_share_one_study_between_processes(files, tmp_path):
    recipe, space = files
    summary = tune(recipe, tmp_path / "out", trials=2, space=space, jobs=2)
    study = optuna.load_study(study_name="tune", storage=f"sqlite:///{tmp_path / 'out' / 'study.db'}")
    assert len(study.trials) == 2 and all(t.state.name == "COMPLETE" for t in study.trials)
    assert summary["counts"]["complete"] == 2 and (tmp_path / "out" / "best_recipe.yaml").is_file()


def _cli(monkeypatch, capsys, *args):
    from slimtune.cli import main

    monkeypatch.setattr(sys, "argv", ["slimtune", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("space, trials, message", [
    ("stages.0.lerning_rate: {low: 1.0e-5, high: 1.0e-4}", 3,
     "space.yaml: stages.0.lerning_rate: unknown key (did you mean 'lr'?)"),
    ("stages.0.lora.rr: {choices: [4, 8]}", 3, "space.yaml: stages.0.lora.rr: unknown key (did you mean 'r'?)"),
    ("stages.3.lr: {low: 1.0e-5, high: 1.0e-4}", 3, "space.yaml: stages.3.lr: no such entry '3' in the recipe"),
    ("stages.0.lr: {low: 1.0e-3, high: 1.0e-4, log: true}", 3, "space.yaml: stages.0.lr: empty range (low 0.001 "
     ">= high 0.0001)"),
    ("stages.0.batch_size: {choices: []}", 3, "space.yaml: stages.0.batch_size: empty choices"),
    ("stages.0.batch_size: {low: 8.0, high: 32.0}", 3, "space.yaml: stages.0.batch_size.int: Input should be a "
     "valid integer, got a number with a fractional part (the space's value 16.88)"),  # a float range, an int field
    ("stages.0.lr: {lo: 1.0e-5, high: 1.0e-4}", 3, "space.yaml: stages.0.lr: unknown key 'lo' in a distribution "
     "(did you mean 'low'?)"),
    ("stages.0.lr: {low: 1.0e-5, high: [", 3, "space.yaml:1: invalid YAML"),
    ("- stages.0.lr\n- stages.0.epochs\n", 3, "space.yaml: a search space must be a mapping of recipe keys to "
     "distributions"),
    (SPACE, 0, "--trials 0: a tune needs at least 1 trial"),
    (SPACE, -2, "--trials -2: a tune needs at least 1 trial"),
])
def test_bad_input_is_one_line_and_leaves_nothing(files, tmp_path, monkeypatch, capsys, space, trials, message):
    (tmp_path / "space.yaml").write_text(space)
    monkeypatch.chdir(tmp_path)
    code, err = _cli(monkeypatch, capsys, "tune", files[0], "--trials", trials, "--space", "space.yaml",
                     "--out", tmp_path / "out")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {message}"), err
    assert not (tmp_path / "out").exists()


def test_the_default_space_follows_from_the_stage_configs():
    recipe = parse_recipe({"model": "m", "data": {"train": "t.jsonl"}, "stages": [
        {"stage": "finetune", "method": "lora", "lr": 3e-4, "batch_size": 16, "epochs": 3},
        {"stage": "distill", "teacher": "teacher-dir", "student": {"layers": 2}},
        {"stage": "prune", "method": "magnitude", "sparsity": 0.5},
        {"stage": "prune", "method": "structured", "ffn": 0.3},
        {"stage": "evaluate"}]})
    space = default_space(recipe)
    loop = ["lr", "batch_size", "epochs", "weight_decay", "warmup_ratio"]
    assert sorted(space) == sorted([*(f"stages.0.{k}" for k in [*loop, "lora.r", "lora.alpha"]),
                                    *(f"stages.1.{k}" for k in [*loop, "temperature", "alpha"]),
                                    "stages.2.sparsity", "stages.3.ffn"])  # heads: 0 in the recipe, not pruned
    assert space["stages.0.lr"] == {"low": 1e-4, "high": 9e-4, "log": True, "step": None, "int": False}
    assert space["stages.0.batch_size"] == {"choices": [8, 16, 32]}
    assert space["stages.0.epochs"] == {"low": 1, "high": 3, "log": False, "step": None, "int": True}
    assert space["stages.0.lora.r"] == {"choices": [4, 8, 16]}
    assert space["stages.1.alpha"]["high"] <= 1 and space["stages.0.lora.alpha"] == {"choices": [8.0, 16.0, 32.0]}
    assert space["stages.2.sparsity"]["low"] == 0.3 and space["stages.2.sparsity"]["high"] == 0.7
    full = parse_recipe({"model": "m", "data": {"train": "t.jsonl"}, "stages": [{"stage": "finetune", "lr": "auto"}]})
    assert "stages.0.lora.r" not in default_space(full)  # LoRA's keys only when the method is lora
    assert default_space(full)["stages.0.lr"]["low"] == 1e-5  # lr: auto -> 1e-5 .. 1e-4
