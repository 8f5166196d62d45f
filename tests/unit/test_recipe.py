from pathlib import Path

import pytest
from helpers import ISSUE_RECIPE

from slimtune.errors import SlimtuneError
from slimtune.recipe import FinetuneStage, apply_overrides, load_recipe, parse_recipe, recipe_to_yaml

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
    assert isinstance(ft, FinetuneStage) and ft.method == "lora" and ft.lora.r == 8 and ft.lora.alpha == 16
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
