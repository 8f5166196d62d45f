from pathlib import Path

import pytest
from helpers import ISSUE_RECIPE

from slimtune.errors import SlimtuneError
from slimtune.recipe import apply_overrides, load_recipe, parse_recipe, recipe_to_yaml
from slimtune.stages.finetune import FinetuneConfig

BASE = {"model": "minilm", "data": {"train": "d/train.jsonl"}, "stages": [{"stage": "evaluate"}]}


def error_of(raw) -> str:
    with pytest.raises(SlimtuneError) as e:
        parse_recipe(raw, source="r.yaml")
    return str(e.value)


def test_issue_recipe_parses_with_paths_relative_to_the_file(tmp_path):
    (tmp_path / "recipe.yaml").write_text(ISSUE_RECIPE)
    r = load_recipe(tmp_path / "recipe.yaml")
    assert r.data.train == tmp_path / "data" / "train.jsonl"
    assert r.data.eval == tmp_path / "data" / "dev.jsonl"
    ft = r.stages[0]
    assert isinstance(ft, FinetuneConfig) and ft.method == "lora" and ft.lora.r == 8 and ft.lora.alpha == 16
    assert r.stages[1].stage == "evaluate"
    # the resolved recipe round-trips
    again = parse_recipe(__import__("yaml").safe_load(recipe_to_yaml(r)))
    assert again == r


@pytest.mark.parametrize("raw, expected", [
    ({**BASE, "data": {"train": "x", "tex_field": "a"}}, "data.tex_field: unknown key (did you mean 'text_field'?)"),
    ({**BASE, "stages": [{"stage": "finetune", "learning_rate": 1}]},
     "stages.0.learning_rate: unknown key (did you mean 'lr'?)"),
    ({**BASE, "stages": [{"stage": "finetune", "lora": {"rr": 3}}]}, "stages.0.lora.rr: unknown key (did you mean 'r'?)"),
    ({**BASE, "stages": [{"stage": "finetun"}]}, "stages.0.stage: unknown stage 'finetun' (did you mean 'finetune'?)"),
    ({**BASE, "stages": [{"stage": "finetune", "method": "lorra"}]}, "stages.0.method: invalid value 'lorra'"),
    ({**BASE, "modle": "x"}, "modle: unknown key (did you mean 'model'?)"),
    ({**BASE, "stages": [{"stage": "finetune", "lr": -1}]}, "stages.0.lr"),
    ({**BASE, "stages": []}, "stages"),
    ({**BASE, "stages": [{"stage": "prune", "method": "activation", "n_m": [4, 4]}]}, "0 < N < M"),
    ({**BASE, "stages": [{"stage": "prune", "method": "activation", "n_m": [3, 2]}]}, "n_m [3, 2]"),
])
def test_errors_name_the_field_and_suggest(raw, expected):
    msg = error_of(raw)
    assert msg.startswith("r.yaml: ")
    assert expected in msg
    assert "\n" not in msg


def test_overrides_are_yaml_typed_and_reject_unknown_paths():
    raw = apply_overrides({**BASE, "stages": [{"stage": "finetune"}]},
                          ["data.max_length=64", "stages.0.lr=1e-3", "stages.0.method=head"])
    r = parse_recipe(raw)
    assert r.data.max_length == 64 and r.stages[0].lr == 1e-3 and r.stages[0].method == "head"
    with pytest.raises(SlimtuneError, match="--set stages.5.lr"):
        apply_overrides({**BASE}, ["stages.5.lr=1"])
    with pytest.raises(SlimtuneError, match="expected KEY=VALUE"):
        apply_overrides({**BASE}, ["data.max_length"])


def test_a_bad_set_value_names_the_set_not_the_file(tmp_path):
    import yaml

    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({**BASE, "stages": [{"stage": "finetune", "method": "full"}]}))
    with pytest.raises(SlimtuneError) as e:
        load_recipe(recipe, ["stages.0.epochs=two"])
    assert str(e.value).startswith("--set stages.0.epochs=two: stages.0.epochs: ")
    with pytest.raises(SlimtuneError, match=r"^--set stages.0.method=lorra: stages.0.method: invalid value 'lorra' "
                                            r"\(did you mean 'lora'\?\)"):
        load_recipe(recipe, ["stages.0.method=lorra"])
    recipe.write_text(yaml.safe_dump({**BASE, "stages": [{"stage": "finetune", "epochs": "two"}]}))
    with pytest.raises(SlimtuneError, match=r"r.yaml: stages.0.epochs"):  # the file's own mistake
        load_recipe(recipe, ["data.max_length=64"])


def test_recipe_file_errors(tmp_path):
    with pytest.raises(SlimtuneError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [\n  - {stage: x\n")
    with pytest.raises(SlimtuneError, match=r"bad.yaml:\d+: invalid YAML"):
        load_recipe(bad)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(SlimtuneError, match="empty"):
        load_recipe(empty)


def test_model_path_relative_to_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("model: ./models/m\ndata: {train: t.jsonl}\nstages: [{stage: evaluate}]\n")
    assert load_recipe(tmp_path / "r.yaml").model == str(tmp_path / "models" / "m")
    assert Path(load_recipe(tmp_path / "r.yaml").data.train).is_absolute()


def test_word_student_extra_words_file_is_relative_to_the_recipe_and_a_count_stays_a_count(tmp_path):
    stage = "{stage: distill, teacher: ./t, student: {arch: bilstm, init_embeddings: contextual, extra_words: %s}}"
    (tmp_path / "r.yaml").write_text(f"model: minilm\ndata: {{train: t.jsonl}}\nstages: [{stage % 'w/words.txt'}]\n")
    assert load_recipe(tmp_path / "r.yaml").stages[0].student.extra_words == tmp_path / "w" / "words.txt"
    (tmp_path / "r.yaml").write_text(f"model: minilm\ndata: {{train: t.jsonl}}\nstages: [{stage % '50000'}]\n")
    assert load_recipe(tmp_path / "r.yaml").stages[0].student.extra_words == 50000


# ------------------------------------------------------------------ the resolved recipe re-runs as it ran
RECOVER = {"epochs": 1, "lr": 5e-4, "grad_clip": None}
EVERY_METHOD = [
    {"stage": "finetune"},
    {"stage": "finetune", "method": "full", "grad_clip": None, "lr": "auto", "batch_size": "auto"},
    {"stage": "finetune", "method": "freeze", "freeze_layers": 2},
    {"stage": "finetune", "method": "head", "early_stopping": {"patience": 1}},
    {"stage": "finetune", "method": "lora", "lora": {"r": 4, "target_modules": ["query"]}},
    {"stage": "finetune", "method": "iterative", "iterative": {"group_size": 1}},
    {"stage": "distill", "teacher": "./teacher", "student": {"from": "minilm", "layers": [0, 2]},
     "intermediate": {"mapping": [[1, 2], [2, 4]]}, "cache": "cache/t.safetensors"},
    {"stage": "distill", "teacher": ["./t1", {"path": "./t2", "weight": 2.0}], "combine": "best",
     "student": {"arch": "bilstm", "init_embeddings": "contextual", "extra_words": 100},
     "transfer_augment": {"copies": 1}},
    {"stage": "prune", "sparsity": 0.5},
    {"stage": "prune", "method": "magnitude", "sparsity": 0.5, "schedule": "gradual", "recover": RECOVER},
    {"stage": "prune", "method": "magnitude", "threshold": 0.01, "scope": "global"},
    {"stage": "prune", "method": "magnitude", "sparsity": 0.6, "recover": RECOVER | {"distill_from_unpruned": True},
     "iterative": {"rounds": 2, "max_drop": 0.02, "rewind": True}},
    {"stage": "prune", "method": "activation", "sparsity": 0.5},
    {"stage": "prune", "method": "activation", "n_m": [2, 4], "recover": {"teacher": "./teacher"}},
    {"stage": "prune", "method": "structured", "heads": 0.25, "ffn": 0.5, "iterative": {"rounds": 2}},
    {"stage": "quantize"},
    {"stage": "quantize", "method": "dynamic_int8", "weight_scales": "per_tensor"},
    {"stage": "quantize", "method": "static_int8", "symmetric": False},
    *({"stage": "quantize", "method": "weight_only", "algorithm": a, "bits": 4, "group_size": 32}
      for a in ("rtn", "gptq", "awq")),
    {"stage": "quantize", "method": "weight_only"},
    {"stage": "quantize", "method": "fixed_point", "int_bits": 2, "frac_bits": 5},
    {"stage": "quantize", "method": "mixed", "mixed": {"bits": [8, 4, 2], "budget_bits": 4}},
    {"stage": "quantize", "method": "qat"},
    {"stage": "quantize", "method": "qat", "bits": 4, "group_size": 32, "train": {"max_steps": 3, "grad_clip": None}},
    {"stage": "quantize", "method": "binary"},
    {"stage": "quantize", "method": "ternary", "train": {"distill_from_full": False}},
    {"stage": "lowrank", "rank": 8},
    {"stage": "lowrank", "energy": 0.9, "recover": RECOVER | {"teacher": "minilm"}},
    {"stage": "evaluate"},
    {"stage": "evaluate", "speed": False, "threads": 2},
]


def _id(stage: dict) -> str:
    return "-".join(str(stage[k]) for k in ("stage", "method", "algorithm") if k in stage) + f"-{len(stage)}"


@pytest.mark.parametrize("stage", EVERY_METHOD, ids=[_id(s) for s in EVERY_METHOD])
def test_every_method_round_trips_through_the_resolved_recipe(tmp_path, stage):
    """OUT/recipe.yaml parses to exactly the config that ran (defaults written out, nulls kept)."""
    import yaml

    raw = {"model": "minilm", "data": {"train": "data/train.jsonl", "eval": "data/dev.jsonl"}, "stages": [stage]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    first = load_recipe(tmp_path / "r.yaml")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "recipe.yaml").write_text(recipe_to_yaml(first))
    again = load_recipe(tmp_path / "out" / "recipe.yaml")  # elsewhere: every path in it is absolute
    assert again.model_dump() == first.model_dump()
    assert yaml.safe_load(recipe_to_yaml(again)) == yaml.safe_load(recipe_to_yaml(first))  # and stays so
    cfg = again.stages[0]
    if getattr(cfg, "method", None) in ("binary", "ternary"):
        assert cfg.train.lr == 5e-4
    if getattr(cfg, "method", None) == "qat":
        assert cfg.train.lr == 1e-4
    for loop in (cfg, getattr(cfg, "recover", None), getattr(cfg, "train", None)):
        if loop is not None and "grad_clip" in type(loop).model_fields:  # an explicit null survives
            assert loop.grad_clip == (None if "grad_clip: null" in yaml.safe_dump(stage) else 1.0)


def test_the_run_directory_recipe_reruns_to_the_same_model(tmp_path, tiny_model_dir, sst2_small):
    """OUT/recipe.yaml run again gives the same metrics and the same lr in every stage (QAT's own lr default
    included: not the loop's 5e-5)."""
    import slimtune

    recipe = {"model": str(tiny_model_dir),
              "data": {"train": str(sst2_small[0]), "eval": str(sst2_small[1]), "max_length": 32},
              "stages": [{"stage": "finetune", "epochs": 1, "max_steps": 6, "lr": 1e-3, "batch_size": 16},
                         {"stage": "quantize", "method": "binary", "train": {"max_steps": 3}},
                         {"stage": "evaluate", "speed": False}]}
    first = slimtune.run(recipe, tmp_path / "a", progress=False)
    again = slimtune.run(tmp_path / "a" / "recipe.yaml", tmp_path / "b", progress=False)
    keys = ("accuracy", "f1_macro", "params")
    assert {k: again["final"][k] for k in keys} == {k: first["final"][k] for k in keys}
    lrs = [[s.get("lr"), (s.get("train") or {}).get("lr")] for s in first["stages"]]
    assert lrs == [[s.get("lr"), (s.get("train") or {}).get("lr")] for s in again["stages"]]
    assert first["stages"][0]["lr"] == 1e-3 and first["stages"][1]["train"]["lr"] == 5e-4
    assert load_recipe(tmp_path / "b" / "recipe.yaml").stages[1].train.lr == 5e-4


def test_every_model_and_file_path_in_stages_is_relative_to_the_recipe_not_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "project").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "project" / "r.yaml").write_text("""\
model: minilm
data: {train: data/train.jsonl}
stages:
  - {stage: prune, sparsity: 0.5, recover: {teacher: ./teacher}}
  - {stage: lowrank, rank: 4, recover: {teacher: ../shared/teacher}}
  - {stage: lowrank, rank: 4, recover: {teacher: minilm}}
  - {stage: distill, teacher: ./teacher, student: {from: ./students/small}, cache: cache/t.safetensors}
  - {stage: distill, teacher: [./t1, {path: ./t2, weight: 2}, mpnet], student: {from: minilm, layers: [0, 1]}}
""")
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = load_recipe("../project/r.yaml")
    here = tmp_path / "project"
    prune, lowrank, alias, distill, many = r.stages
    assert prune.recover.teacher == str(here / "teacher")
    assert lowrank.recover.teacher == str(tmp_path / "shared" / "teacher")
    assert alias.recover.teacher == "minilm"  # an alias stays an alias
    assert distill.teacher == str(here / "teacher")
    assert distill.student.from_ == str(here / "students" / "small")
    assert distill.cache == here / "cache" / "t.safetensors"
    assert [t.path for t in many.teachers()] == [str(here / "t1"), str(here / "t2"), "mpnet"]
    assert many.student.from_ == "minilm"
    assert r.data.train == here / "data" / "train.jsonl"
