"""Typed recipe: YAML (or Python objects) -> validated pydantic models.

A recipe is an ordered list of typed stages (the llm-compressor habit). Every model forbids
unknown keys, and `load_recipe` turns pydantic's errors into one line that names the field and
suggests the closest valid key, e.g. `recipe.yaml: stages.0.lerning_rate: unknown key (did you mean 'lr'?)`.
"""

from __future__ import annotations

import difflib
import functools
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, create_model

from slimtune.config import DataConfig, ReportConfig, Strict, tagged_union
from slimtune.errors import SlimtuneError
from slimtune.stages import STAGES
from slimtune.tasks import TASKS


def _stage_config(name: str) -> Any:
    return STAGES[name].Config


# One config type per stage (itself a union on `method` where the stage has per-method configs), tagged
# by `stage:`; built from the registry, so a new stage needs no line here.
StageConfig = tagged_union({name: _stage_config(name) for name in STAGES}, "stage")


class Recipe(Strict):
    task: Literal[tuple(TASKS)] = "text-classification"  # type: ignore[valid-type]
    model: str = "minilm"
    data: DataConfig  # the task's own data section: `recipe_class(task)` narrows it for other tasks
    stages: list[StageConfig] = Field(min_length=1)  # type: ignore[valid-type]
    keep_checkpoints: bool = Field(False, description="keep OUT/checkpoints/ once the run has finished "
                                                      "(by default they are removed: they only serve --resume)")
    report: ReportConfig = Field(default_factory=ReportConfig)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
                        description="where models train and are measured: auto (CUDA when available, else the "
                                    "CPU), cpu, cuda or cuda:N (`slimtune run --device` overrides it)")


@functools.cache
def recipe_class(task: str) -> type[Recipe]:
    """The recipe schema of `task`: Recipe with the task's data section (each task owns its data keys,
    so a classification key in a causal-LM recipe is an unknown key, not silently ignored)."""
    data_config = getattr(TASKS.get(task), "data_config", DataConfig)
    if data_config is DataConfig:
        return Recipe
    return create_model("Recipe", __base__=Recipe, data=(data_config, ...))


# ------------------------------------------------------------------------------------ load / dump
def _model_for_path(loc: tuple, root: type[BaseModel] = Recipe) -> type[BaseModel] | None:
    """The pydantic model that owns the location `loc` (for 'did you mean' suggestions)."""
    model: Any = root
    stage: Any = None
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if model is root and part == "stages":
            model = None
            continue
        if model is None and stage is None and part in STAGES:  # the stage union's tag in the location
            stage = STAGES[part]
            model = None if getattr(stage, "methods", None) else stage.Config
            continue
        if model is None and stage is not None and part in getattr(stage, "methods", {}):  # the method's tag
            model = stage.methods[part]
            continue
        field = getattr(model, "model_fields", {}).get(part) if model else None
        raw = field.annotation if field else None
        for candidate in getattr(raw, "__args__", (raw,)):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                model = candidate
                break
        else:
            return None
    return model


# common spellings from other tools, so their users get a useful suggestion
SYNONYMS = {"learning_rate": "lr", "lerning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
            "bs": "batch_size", "per_device_train_batch_size": "batch_size", "lora_r": "r", "rank": "r",
            "lora_alpha": "alpha", "lora_dropout": "dropout", "max_len": "max_length",
            "max_seq_length": "max_length", "gradient_accumulation_steps": "grad_accum",
            "max_grad_norm": "grad_clip", "lr_scheduler_type": "schedule", "dev": "eval",
            "validation": "eval", "test": "eval", "text_column": "text_field",
            "label_column": "label_field"}


def _user_path(loc: tuple) -> list:
    """The error location as the user wrote it: without the stage and method tags pydantic inserts after
    `stages.N` (a field that shares a method's name, like quantize's `mixed`, is kept)."""
    out, i = [], 0
    while i < len(loc):
        out.append(loc[i])
        if len(out) == 2 and out[0] == "stages" and isinstance(loc[i], int):
            stage = STAGES.get(loc[i + 1]) if i + 1 < len(loc) else None
            if stage is not None:
                i += 1
                if getattr(stage, "methods", None) and i + 1 < len(loc) and loc[i + 1] in stage.methods:
                    i += 1
        i += 1
    return out


def _other_methods(loc: tuple, key: str) -> list[str]:
    """For a key unknown to one method of a stage: the stage's methods that do take it."""
    stage = STAGES.get(loc[2]) if len(loc) > 3 and loc[0] == "stages" else None
    methods = getattr(stage, "methods", None) or {}
    return [name for name, cls in methods.items() if key in cls.model_fields] if len(loc) == 5 else []


def _describe(err: dict, root: type[BaseModel] = Recipe) -> str:
    loc = _user_path(tuple(err["loc"]))
    where = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        owner = _model_for_path(tuple(err["loc"]), root)
        names = [f.alias or n for n, f in getattr(owner, "model_fields", {}).items()]  # 'from', not 'from_'
        key = str(err["loc"][-1])
        elsewhere = _other_methods(tuple(err["loc"]), key)
        if elsewhere:
            return f"{where}: not a key of method {err['loc'][3]} (it applies to {', '.join(elsewhere)})"
        close = [SYNONYMS[key]] if SYNONYMS.get(key) in names else []
        close = close or difflib.get_close_matches(key, names, n=1, cutoff=0.5)
        hint = f" (did you mean '{close[0]}'?)" if close else f" (valid keys: {', '.join(names)})"
        return f"{where}: unknown key{hint}"
    if err["type"] == "union_tag_invalid":
        ctx = err.get("ctx", {})
        tag = str(ctx.get("tag", ""))
        in_stage = err["loc"] and err["loc"][-1] in STAGES  # the method union inside a stage
        options = list(getattr(STAGES[err["loc"][-1]], "methods", {})) if in_stage else list(STAGES)
        close = difflib.get_close_matches(tag, options, n=1, cutoff=0.5)
        if in_stage:
            hint = f"did you mean '{close[0]}'?" if close else f"expected {', '.join(options)}"
            return f"{where}.method: invalid value '{tag}' ({hint})"
        hint = f"did you mean '{close[0]}'?" if close else f"valid stages: {', '.join(options)}"
        return f"{where}.stage: unknown stage '{tag}' ({hint})"
    if err["type"] == "union_tag_not_found":
        return f"{where}: missing key 'stage' (one of: {', '.join(STAGES)})"
    if err["type"] == "literal_error":
        value = err.get("input")
        options = err.get("ctx", {}).get("expected", "")
        close = difflib.get_close_matches(str(value), re.findall(r"'([^']*)'", options), n=1, cutoff=0.5)
        hint = f"did you mean '{close[0]}'?" if close else f"expected {options}"
        return f"{where}: invalid value {value!r} ({hint})"
    if len(loc) == 2 and loc[0] == "stages" and len(err["loc"]) > 2:  # a rule across a stage's keys
        where = f"{where} ({err['loc'][2]})"
    return f"{where}: {err['msg'].removeprefix('Value error, ')}"


def parse_recipe(raw: dict, source: str = "recipe", base_dir: Path | None = None,
                 overrides: list[str] = ()) -> Recipe:
    """Validate a dict into a Recipe; data paths are made absolute relative to `base_dir`. An error in
    a key that one of `overrides` (`--set KEY=VALUE`) set names that `--set`, not the file."""
    if not isinstance(raw, dict):
        raise SlimtuneError(f"{source}: a recipe must be a mapping of keys, got {type(raw).__name__}")
    schema = recipe_class(raw["task"]) if isinstance(raw.get("task"), str) else Recipe
    try:
        recipe = schema.model_validate(raw)
    except ValidationError as e:
        # unknown keys first: a typo usually also causes the "field required" that follows it
        errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
        described = _describe(errors[0], schema)
        culprit = next((item for item in reversed(overrides)
                        if described.startswith(tuple(item.split("=", 1)[0] + end for end in ":. "))), None)
        raise SlimtuneError(f"{f'--set {culprit}' if culprit else source}: {described}") from None
    for i, stage in enumerate(recipe.stages):  # keys the recipe's task cannot use (a stage config's own rule)
        problem = stage.problem_for(TASKS[recipe.task]) if hasattr(stage, "problem_for") else None
        if problem:
            raise SlimtuneError(f"{source}: stages.{i}.{problem}")
    if base_dir is not None:
        try:
            _make_paths_absolute(recipe, base_dir)
        except SlimtuneError as e:
            raise SlimtuneError(f"{source}: {e}") from None
    return recipe


def _make_paths_absolute(recipe: Recipe, base_dir: Path) -> None:
    recipe.data.train = _absolute(recipe.data.train, base_dir)
    if recipe.data.eval is not None:
        recipe.data.eval = _absolute(recipe.data.eval, base_dir)
    if _looks_like_path(recipe.model):
        recipe.model = str(_absolute(Path(recipe.model), base_dir))
    for stage in recipe.stages:
        _absolute_stage_paths(stage, base_dir)


def _absolute_stage_paths(node: Any, base: Path) -> None:
    """Paths inside stage configs (teachers, students, word lists, caches: every field marked with a
    `ref` in its schema), made absolute relative to the recipe file, as the data paths are."""
    if not isinstance(node, BaseModel):
        return
    for name, info in type(node).model_fields.items():
        value = getattr(node, name)
        ref = (info.json_schema_extra or {}).get("ref") if isinstance(info.json_schema_extra, dict) else None
        if ref is not None:
            value = _absolute_ref(value, ref, base)
            object.__setattr__(node, name, value)  # no re-validation: the value's type is unchanged
        for item in value if isinstance(value, list) else [value]:
            _absolute_stage_paths(item, base)


def _absolute_ref(value: Any, ref: str, base: Path) -> Any:
    if isinstance(value, list):
        return [_absolute_ref(v, ref, base) for v in value]
    if isinstance(value, Path):
        return _absolute(value, base)
    if isinstance(value, str) and (ref == "file" or _looks_like_path(value)):  # a model alias stays as it is
        return str(_absolute(Path(value), base))
    return value


def _looks_like_path(s: str) -> bool:
    return "/" in s or s.startswith(".")


def _absolute(p: Path, base: Path) -> Path:
    try:
        p = Path(p).expanduser()
        return p if p.is_absolute() else (base / p).resolve()
    except (RuntimeError, ValueError) as e:  # ~no-such-user/..., an embedded NUL byte
        raise SlimtuneError(f"path {str(p)!r}: {e}") from None


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """`--set data.max_length=64 stages.0.epochs=2`: dotted keys, YAML-typed values."""
    for item in overrides:
        if "=" not in item:
            raise SlimtuneError(f"--set {item!r}: expected KEY=VALUE, e.g. data.max_length=64")
        key, value = item.split("=", 1)
        try:
            node, last = _parent_of(raw, key)
        except SlimtuneError as e:
            raise SlimtuneError(f"--set {e}") from None
        try:
            parsed = yaml.safe_load(value)
        except (yaml.YAMLError, ValueError, RecursionError) as e:
            problem = " ".join(str(getattr(e, "problem", None) or e).split())
            raise SlimtuneError(f"--set {key}: invalid YAML value {value!r} ({problem})") from None
        try:
            _assign(node, last, key, parsed)
        except SlimtuneError as e:
            raise SlimtuneError(f"--set {e}") from None
    return raw


def set_key(raw: dict, key: str, value: Any) -> None:
    """Set the dotted key `key` of the raw (unparsed) recipe `raw` to `value`: the keys of `--set` and of a
    `slimtune tune` search space (`stages.0.lr`, `stages.0.lora.r`). Missing mappings are created, so
    parsing the recipe afterwards names a key that matches no field (with "did you mean")."""
    node, last = _parent_of(raw, key)
    _assign(node, last, key, value)


def _parent_of(raw: dict, key: str) -> tuple[Any, Any]:
    """The mapping or list that holds dotted `key`'s last part, and that part (an index for a list)."""
    node: Any = raw
    parts = key.split(".")
    for part in parts[:-1]:
        idx: Any = int(part) if part.isdigit() else part
        try:
            if isinstance(node, dict) and idx not in node:
                node[idx] = {}
            node = node[idx]
        except (IndexError, KeyError, TypeError):
            raise SlimtuneError(f"{key}: no such entry '{part}' in the recipe") from None
    return node, int(parts[-1]) if parts[-1].isdigit() else parts[-1]


def _assign(node: Any, last: Any, key: str, value: Any) -> None:
    try:
        node[last] = value
    except (IndexError, TypeError):
        raise SlimtuneError(f"{key}: no such entry '{last}' in the recipe") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    raw = read_yaml(path, "recipe")
    raw = apply_overrides(raw, overrides or []) if isinstance(raw, dict) else raw
    return parse_recipe(raw, source=str(path), base_dir=path.resolve().parent, overrides=overrides or [])


def read_yaml(path: Path, what: str) -> Any:
    """The content of the YAML file `path` (a recipe, a search space...), not None; every problem reading or
    parsing it is one line naming the file (and the line)."""
    if not path.is_file():
        raise SlimtuneError(f"{path}: {what} file not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SlimtuneError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())  # one line: no "in <unicode string>"
        raise SlimtuneError(f"{path}{line}: invalid YAML ({problem})") from None
    except (ValueError, RecursionError) as e:  # a date like 2001-13-45, or nesting deeper than Python's stack
        reason = "nested too deeply" if isinstance(e, RecursionError) else " ".join(str(e).split())
        raise SlimtuneError(f"{path}: invalid YAML ({reason})") from None
    if raw is None:
        raise SlimtuneError(f"{path}: {what} file is empty")
    return raw


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe: every key with its value, so that parsing it again gives the same config."""
    return yaml.safe_dump(_resolved(recipe), sort_keys=False, allow_unicode=True)


def _resolved(node: Any) -> Any:
    """JSON-able values of a config tree. A None is left out only where None is the default and the recipe
    did not set it, so a key the user set to null (grad_clip: null, transfer_augment: null: a default turned
    off) stays null when parsed again."""
    if isinstance(node, BaseModel):
        out = {}
        for name, info in type(node).model_fields.items():
            value = getattr(node, name)
            if value is None and info.default is None and name not in node.model_fields_set:
                continue
            out[info.alias or name] = _resolved(value)
        return out
    if isinstance(node, list | tuple):
        return [_resolved(v) for v in node]
    if isinstance(node, dict):
        return {k: _resolved(v) for k, v in node.items()}
    return str(node) if isinstance(node, Path) else node
