"""`slimtune search` on a tiny random BERT: candidates measured on a selection split carved from train, the
chosen one reported on the eval split, the study resumed from its directory, bad budgets refused up front."""

import hashlib
import json
from pathlib import Path

import pytest
import yaml
from helpers import slimtune as slimtune_cli

from slimtune.errors import SlimtuneError
from slimtune.recipe import load_recipe, parse_recipe
from slimtune.search import Budget, Candidate, candidate_stages, pareto_front, search


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory, tiny_model_dir, sst2_small):
    path = tmp_path_factory.mktemp("search") / "recipe.yaml"
    path.write_text(yaml.safe_dump({
        "model": str(tiny_model_dir),
        "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
        "stages": [{"stage": "finetune", "method": "full", "epochs": 1, "lr": 1e-3, "batch_size": 16}]}))
    return path


@pytest.fixture(scope="module")
def searched(recipe_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("searched") / "out"
    return out, search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1000, max_drop=50), trials=4,
                       epochs=0.5, seed=0)


def test_search_chooses_on_the_selection_split_and_reports_on_eval(searched, sst2_small):
    out, summary = searched
    train = [json.loads(line) for line in (out / "search_train.jsonl").read_text().splitlines()]
    select = [json.loads(line) for line in (out / "search_select.jsonl").read_text().splitlines()]
    assert len(train) + len(select) == 300 and len(select) == 45  # 15% of the train rows, none trained on
    assert not {r["text"] for r in train} & {r["text"] for r in select}
    assert summary["met"] and summary["candidates"] + len(summary["stopped_early"]) == 4  # distinct ones
    assert summary["chosen_on"].startswith("selection split")
    best, reported = summary["best"], summary["reported"]
    assert best["feasible"] and best["metric"] == max(r["metric"] for r in summary["all"] if r["feasible"])
    assert reported["split"] == str(sst2_small[1])  # the eval file: the reported number
    best_run = json.loads((out / "best_run" / "metrics.json").read_text())
    assert best_run["data"]["eval_file"] == str(sst2_small[1]) and best_run["data"]["train_file"].endswith(
        "search_train.jsonl")
    assert (out / "best" / ("model.onnx" if best["artifact"] == "onnx/model.onnx" else "config.json")).is_file()
    assert (out / "report.html").is_file() and "[selection split]" in (out / "best_run" / "report.md").read_text()
    reproduce = load_recipe(out / "best_recipe.yaml")  # a plain recipe: the fine-tuning, then the candidate
    assert [s.stage for s in reproduce.stages][:1] == ["finetune"] and reproduce.stages[-1].stage == "evaluate"
    # its students come from the run's own fine-tuned model, not from this search's directory
    assert all(s.student.from_ == "current" for s in reproduce.stages if s.stage == "distill" and s.student.arch is None)
    assert all(r in summary["all"] for r in summary["pareto"])


def test_every_candidate_names_the_runtime_it_ships_on(searched):
    _, summary = searched
    for r in summary["all"]:
        if r["candidate"]["quant"] != "none":
            assert r["runtime"] == "onnxruntime CPU (int8 graph)" and r["artifact"] == "onnx/model.onnx"
        elif r["candidate"]["student"] == "bilstm":  # a word student: torch, its table stored in int8
            assert r["runtime"] == "torch fp32 (int8 word table, int8 LSTM kernels)" and r["artifact"] == "model"
        else:  # a float model ships on whichever of torch and ONNX Runtime is faster for it
            assert r["runtime"] in ("torch fp32", "onnxruntime CPU (fp32 graph)")
            assert ("onnx_latency_ms" in r) != ("torch_latency_ms" in r)


def test_a_resumed_search_measures_nothing_twice(searched, recipe_file, monkeypatch):
    out, summary = searched
    import slimtune.search as module

    def no_training(*a, **k):
        raise AssertionError("a finished candidate was trained again")

    monkeypatch.setattr(module, "run", no_training)
    again = search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1000, max_drop=50), trials=4,
                   epochs=0.5, seed=0)
    assert again["best"] == summary["best"] and again["candidates"] == summary["candidates"]


def test_an_impossible_budget_lists_the_closest_candidates(searched, recipe_file):
    out, _ = searched
    summary = search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1e-6, max_drop=0), trials=4,
                     epochs=0.5, seed=0)  # the same study: no new training, a budget nothing meets
    assert not summary["met"] and 1 <= len(summary["closest"]) <= 3


@pytest.mark.parametrize("args, message", [
    (["--max-size-mb", "0"], "--max-size-mb 0: a budget must be a positive number"),
    (["--max-latency-ms", "-1"], "--max-latency-ms -1: a budget must be a positive number"),
    (["--max-size-mb", "0.05"], "--max-size-mb 0.05: no candidate can be that small: the word-embedding table "
                                "alone, trimmed to its specials and single characters, is 0.06 MB in int8"),
])
def test_bad_budgets_are_refused_before_any_training(recipe_file, tmp_path, args, message):
    base = {"--max-size-mb": "50", "--max-latency-ms": "100", "--max-drop": "1"}
    base |= dict(zip(args[::2], args[1::2], strict=True))
    proc = slimtune_cli("search", recipe_file, *[x for kv in base.items() for x in kv], "--out", tmp_path / "s")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1] == f"error: {message}", proc.stderr
    assert not (tmp_path / "s" / "base").exists()


def test_a_teacher_with_other_labels_is_refused(recipe_file, tmp_path, tiny_model_dir):
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_model_dir, teacher)
    config = json.loads((teacher / "config.json").read_text())
    (teacher / "config.json").write_text(json.dumps(config | {"id2label": {"0": "spam", "1": "ham"},
                                                              "label2id": {"spam": 0, "ham": 1}}))
    with pytest.raises(SlimtuneError, match=r"--teacher .*teacher: its labels \['ham', 'spam'\] are not the "
                                            r"recipe's \['0', '1'\]"):
        search(recipe_file, tmp_path / "s", Budget(50, 100, 1), teacher=str(teacher))


def test_candidate_stages_and_the_pareto_front():
    stages = candidate_stages(Candidate(layers=3, heads=0.25, ffn=0.0, quant="static_int8"), "B", None, 6, 2.0, 32)
    assert [s["stage"] for s in stages] == ["distill", "prune", "quantize", "evaluate"]
    # the student is named relative to the run (which starts from B), so the chosen recipe runs on other data
    assert stages[0]["student"] == {"from": "current", "layers": 3} and stages[0]["teacher"] == "B"
    assert stages[1]["heads"] == 0.25 and stages[1]["recover"]
    assert [s["stage"] for s in candidate_stages(Candidate(6, 0, 0, "none"), "B", None, 6, 2.0, 32)] == ["evaluate"]
    # a --teacher teaches a layer selection of the base model, never of itself; at full depth the base learns
    taught = candidate_stages(Candidate(6, 0, 0, "none"), "B", "T", 6, 2.0, 32)
    assert taught[0]["teacher"] == "T" and taught[0]["student"] == {"from": "current"}
    assert candidate_stages(Candidate(2, 0, 0, "none"), "B", "T", 6, 2.0, 32)[0]["student"] == {"from": "current",
                                                                                              "layers": 2}
    lowrank = candidate_stages(Candidate(6, 0, 0.5, "dynamic_int8", lowrank=0.9), "B", None, 6, 2.0, 32)
    assert [s["stage"] for s in lowrank] == ["prune", "lowrank", "quantize", "evaluate"]
    assert lowrank[1]["energy"] == 0.9 and lowrank[1]["recover"]["epochs"] == 1.0
    word = candidate_stages(Candidate.word(), "B", "T", 6, 2.0, 32)
    assert word[0] == {"stage": "distill", "teacher": "T", "student": {"arch": "bilstm"}}  # its own defaults
    assert Candidate.of({"student": "bilstm", "layers": 3}) == Candidate.word()
    assert Candidate.of({"layers": 3, "heads": 0.0, "ffn": 0.25, "quant": "none"}).lowrank == 0.0  # older studies
    # the vocabulary trim comes last before int8 (its table is then quantized); older keys stay as they were
    trimmed = Candidate(3, 0.0, 0.0, "static_int8", vocab=True)
    assert [s["stage"] for s in candidate_stages(trimmed, "B", None, 6, 2.0, 32)] == [
        "distill", "vocabulary", "quantize", "evaluate"]
    assert trimmed.label(6) == "3 layers, vocabulary trimmed, static_int8"
    assert Candidate.of({"layers": 3, "heads": 0.0, "ffn": 0.0, "quant": "static_int8", "vocab": True}) == trimmed
    old = {"layers": 3, "heads": 0.0, "ffn": 0.0, "quant": "static_int8", "lowrank": 0.0, "student": "transformer"}
    assert Candidate(**old).key == hashlib.sha1(json.dumps(old, sort_keys=True).encode()).hexdigest()[:10]
    assert trimmed.key != Candidate(**old).key
    # a phrase-level transfer set: the distillation's train sentences plus teacher-labelled random spans
    spans = Candidate(6, 0.0, 0.0, "static_int8", vocab=True, transfer=10)
    distill = candidate_stages(spans, "B", "T", 6, 2.0, 32)[0]
    assert distill["transfer_augment"]["copies"] == 10 and distill["transfer_augment"]["p_span"] == 1.0
    assert not any(distill["transfer_augment"][p] for p in ("p_synonym", "p_insert", "p_swap", "p_delete"))
    assert distill["lr"] == 5e-5 and "transfer_augment" not in candidate_stages(trimmed, "B", "T", 6, 2.0, 32)[0]
    assert spans.label(6) == "all layers, 10 teacher-labelled spans per sentence, vocabulary trimmed, static_int8"
    assert Candidate.of({"layers": 6, "heads": 0.0, "ffn": 0.0, "quant": "static_int8", "vocab": True,
                         "transfer": 10}) == spans
    assert Candidate(**{**old, "vocab": True}).key == trimmed.key and spans.key != trimmed.key
    stages = candidate_stages(spans, "B", "T", 6, 2.0, 32)  # what the search writes is a recipe the schema takes
    assert parse_recipe({"task": "text-classification", "model": "B", "data": {"train": "t.jsonl"},
                         "stages": stages}).stages[0].transfer_augment.copies == 10
    rows = [{"metric": 0.9, "latency_ms": 2, "size_mb": 10}, {"metric": 0.8, "latency_ms": 1, "size_mb": 5},
            {"metric": 0.8, "latency_ms": 3, "size_mb": 20}]
    assert pareto_front(rows) == rows[:2]


def test_the_pruner_stops_only_what_no_finished_candidate_could_rescue(tmp_path):
    from slimtune.search_pruning import CandidateStopped, HopelessPruner

    pruner = HopelessPruner.for_budget(0.90, max_drop_pt=5, metric="accuracy", higher_is_better=True)
    assert pruner.floor == pytest.approx(0.85) and pruner.margin == pytest.approx(0.005)
    early = pruner.watch("a")
    early("s0-distill", {"accuracy": 0.10})  # nobody has finished: nothing to compare with, never stopped
    for key, (at_1, final) in {"a": (0.70, 0.86), "b": (0.80, 0.88)}.items():
        if key == "b":
            pruner.watch(key)("s0-distill", {"accuracy": at_1})
        else:
            pruner.running["a"] = {"distill#1": at_1}
        (tmp_path / key).mkdir()
        pruner.finish(key, final, tmp_path / key)
    assert pruner.best_gain("distill#1") == (pytest.approx(0.16), 2)
    pruner.watch("c")("s1-distill", {"accuracy": 0.69})  # 0.69 + 0.16 + margin reaches 0.85: it goes on
    with pytest.raises(CandidateStopped, match=r"stopped at distill#1: 0\.6800") as stop:
        pruner.watch("d")("s1-distill", {"accuracy": 0.68, "loss": 1.0})
    assert stop.value.record["finished_compared"] == 2 and stop.value.record["floor"] == pytest.approx(0.85)
    pruner.watch("e")("s1-prune-p0", {"accuracy": 0.1})  # a point no finished candidate passed: goes on
    # a resumed search reads the finished curves back from the candidates' run directories
    again = HopelessPruner.for_budget(0.90, 5, "accuracy", True)
    for key in ("a", "b"):
        again.finish(key, {"a": 0.86, "b": 0.88}[key], tmp_path / key)
    assert again.best_gain("distill#1") == (pytest.approx(0.16), 2)
    lower = HopelessPruner.for_budget(20.0, max_drop_pt=2, metric="perplexity", higher_is_better=False)
    assert lower.floor == 22.0 and lower.margin == 0.5


def test_candidates_that_cannot_meet_the_drop_are_stopped_and_not_trained_again(recipe_file, tmp_path,
                                                                                 monkeypatch):
    import slimtune.search as module
    from slimtune.search_pruning import HopelessPruner

    # a floor no candidate can reach (accuracy 2.0) and no finished candidate needed to compare with:
    # every candidate that trains is stopped at its first evaluation
    monkeypatch.setattr(module.HopelessPruner, "for_budget",
                        classmethod(lambda cls, *a, **k: HopelessPruner(floor=2.0, metric="accuracy",
                                                                        min_finished=0)))
    out = tmp_path / "out"
    summary = search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1000, max_drop=50), trials=4,
                     epochs=0.5, seed=0)
    stopped = summary["stopped_early"]
    assert stopped and summary["candidates"] + len(stopped) == 4  # stopped ones count as tried
    for s in stopped:
        c = s["candidate"]
        assert (c["layers"] < 2 or c["heads"] or c["ffn"] or c["lowrank"]) and s["point"].endswith("#1")
        key = module.Candidate(**c).key
        assert not (out / "trials" / key).exists() and (out / "trials" / f"{key}.stopped.json").is_file()
    assert all(r["candidate"]["layers"] == 2 and not (r["candidate"]["heads"] or r["candidate"]["ffn"]
                                                      or r["candidate"]["lowrank"]) for r in summary["all"])  # only pipelines without a training loop finished

    def no_training(*a, **k):
        raise AssertionError("a stopped candidate was trained again")

    monkeypatch.setattr(module, "run", no_training)
    again = search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1000, max_drop=50), trials=4,
                   epochs=0.5, seed=0)
    assert len(again["stopped_early"]) == len(stopped)


@pytest.mark.slow  # ~2 min idle: a word student with its default 40 epochs, measured twice
def test_a_word_student_and_a_low_rank_candidate_are_measured_for_real(searched, recipe_file, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(searched[0] / "base", out / "base")  # the fine-tuned base model and its split, reused
    for name in ("search_train.jsonl", "search_select.jsonl"):
        shutil.copy(searched[0] / name, out / name)
    one = {"student": "transformer", "heads": 0.0, "ffn": 0.0, "quant": "none", "vocab": False}
    summary = search(recipe_file, out, Budget(max_size_mb=50, max_latency_ms=1000, max_drop=50), trials=3,
                     epochs=0.5, seed=0, first=[{"student": "bilstm"},
                                                {**one, "layers": 2, "lowrank": 0.9, "transfer": 0},
                                                {**one, "layers": 1, "lowrank": 0.0, "transfer": 10}])
    by_label = {r["label"]: r for r in summary["all"]}
    word = by_label["word BiLSTM (distilled, int8 table and LSTM)"]
    assert word["runtime"] == "torch fp32 (int8 word table, int8 LSTM kernels)" and word["artifact"] == "model"  # no ONNX for it
    run = json.loads((out / "trials" / Candidate.word().key / "metrics.json").read_text())
    assert run["stages"][0]["word_student_defaults"]["student"]["table"] == "int8"
    lowrank = by_label["all layers, low-rank 90% energy, fp32"]
    run = json.loads((tmp_path / "out" / "trials" / Candidate(2, 0.0, 0.0, "none", 0.9).key / "metrics.json").read_text())
    assert [s["stage"] for s in run["stages"]] == ["lowrank", "evaluate"] and lowrank["metric"] == run["final"]["accuracy"]
    # the 1-layer student distilled on the train rows plus 10 teacher-labelled spans of each
    spans = by_label["1 layers, 10 teacher-labelled spans per sentence, fp32"]
    distill = json.loads((Path(spans["dir"]) / "metrics.json").read_text())["stages"][0]
    assert distill["stage"] == "distill" and distill["augmented_transfer_rows"] == 10 * (
        distill["transfer_rows"] - distill["augmented_transfer_rows"]) > 0
