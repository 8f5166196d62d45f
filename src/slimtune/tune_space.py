"""`slimtune tune`'s search space: a space file read and checked against the recipe's schema, the default
space built from the recipe's stage configs, a recipe with a trial's values applied, and the record of a tune
(`TuneJob`) that its processes and its report share."""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from slimtune.errors import SlimtuneError
from slimtune.recipe import Recipe, parse_recipe, read_yaml, recipe_to_yaml, set_key

DIST_KEYS = ("low", "high", "log", "step", "choices")
SPACE_EXAMPLE = "e.g. `stages.0.lr: {low: 1.0e-5, high: 1.0e-4, log: true}`"


# ------------------------------------------------------------------------------------------ the space
def load_space(path: str | Path, recipe: Recipe) -> dict[str, dict]:
    """The search space file `path`, each distribution checked (`parse_distribution`) and each key and value
    checked against `recipe`'s schema (`check_space`)."""
    path = Path(path)
    raw = read_yaml(path, "search space")
    if not isinstance(raw, dict) or not raw:
        got = "an empty mapping" if isinstance(raw, dict) else f"a {type(raw).__name__}"
        raise SlimtuneError(f"{path}: a search space must be a mapping of recipe keys to distributions "
                            f"({SPACE_EXAMPLE}), got {got}")
    space = {}
    for key, spec in raw.items():
        if not isinstance(key, str) or not key:
            raise SlimtuneError(f"{path}: {key!r}: a key must be a dotted recipe key such as stages.0.lr")
        space[key] = parse_distribution(spec, f"{path}: {key}")
    check_space(space, recipe, str(path))
    return space


def parse_distribution(spec: Any, where: str) -> dict:
    """One distribution of a space, normalised: `{"choices": [...]}`, or `{"low", "high", "log", "step",
    "int"}` (an int range when low, high and step are all written as integers)."""
    if not isinstance(spec, dict):
        raise SlimtuneError(f"{where}: expected a distribution ({{low, high}}, {{low, high, log: true}}, "
                            f"{{low, high, step}} or {{choices: [...]}}), got {spec!r}")
    for k in spec:
        if k not in DIST_KEYS:
            close = difflib.get_close_matches(str(k), DIST_KEYS, n=1, cutoff=0.5)
            hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(DIST_KEYS)}"
            raise SlimtuneError(f"{where}: unknown key '{k}' in a distribution ({hint})")
    if "choices" in spec:
        choices = spec["choices"]
        if set(spec) != {"choices"}:
            others = ", ".join(k for k in spec if k != "choices")
            raise SlimtuneError(f"{where}: choices cannot be combined with {others}")
        if not isinstance(choices, list) or not choices:
            raise SlimtuneError(f"{where}: empty choices (give a list of at least one value)")
        for c in choices:
            if not (c is None or isinstance(c, bool | int | float | str)):
                raise SlimtuneError(f"{where}: choices must be numbers, strings, booleans or null (got {c!r})")
        if len({json.dumps(c) for c in choices}) < len(choices):
            raise SlimtuneError(f"{where}: a choice is listed twice")
        return {"choices": list(choices)}
    for k in ("low", "high"):
        if k not in spec:
            raise SlimtuneError(f"{where}: missing '{k}' (a range needs low and high; or give choices)")
    low, high, step = (_number(spec.get(k), k, where) for k in ("low", "high", "step"))
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise SlimtuneError(f"{where}: log must be true or false (got {log!r})")
    if not low < high:
        raise SlimtuneError(f"{where}: empty range (low {low:g} >= high {high:g})")
    if log and step is not None:
        raise SlimtuneError(f"{where}: a log range takes no step")
    if log and low <= 0:
        raise SlimtuneError(f"{where}: a log range needs low > 0 (got {low:g})")
    if step is not None:
        if step <= 0:
            raise SlimtuneError(f"{where}: step must be > 0 (got {step:g})")
        if not math.isclose((high - low) / step, round((high - low) / step), abs_tol=1e-9):
            raise SlimtuneError(f"{where}: high - low ({high - low:g}) is not a multiple of step {step:g}")
    is_int = all(isinstance(spec.get(k), int) for k in ("low", "high")) and isinstance(spec.get("step", 1), int)
    return {"low": low, "high": high, "log": log, "step": step, "int": is_int}


def _number(value: Any, name: str, where: str) -> Any:
    """A range bound as written (an int stays an int); a string such as `1e-5` (YAML 1.1 reads it as text)
    is read as a float."""
    if value is None and name == "step":
        return None
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return float(value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise SlimtuneError(f"{where}: {name} must be a number (got {value!r})")
    return value


def check_space(space: dict[str, dict], recipe: Recipe, source: str) -> None:
    """Every key of `space` names a field of `recipe` and every value it can take is valid there: the recipe
    is parsed with the key set to each choice, or to low, high and a value between them (a float range on an
    integer field is refused here, not in trial 7). A key matching no field is the recipe's own error, with
    "did you mean"."""
    raw = raw_recipe(recipe)
    for key, dist in space.items():
        for value in _probes(dist):
            probe = copy.deepcopy(raw)
            try:
                set_key(probe, key, value)
            except SlimtuneError as e:
                raise SlimtuneError(f"{source}: {e}") from None
            try:
                parsed = parse_recipe(probe, source=source)
            except SlimtuneError as e:
                message = str(e)
                raise SlimtuneError(message if "unknown key" in message or "unknown stage" in message
                                    else f"{message} (the space's value {value!r})") from None
            check_selection(parsed, f"{source}: {key}")


def _probes(dist: dict) -> list:
    if "choices" in dist:
        return dist["choices"]
    low, high = dist["low"], dist["high"]
    if dist["int"]:
        return [low, high]
    inside = math.exp(math.log(low) + 0.37 * (math.log(high) - math.log(low))) if dist["log"] else \
        low + 0.37 * (high - low)
    return [low, high, inside if dist["step"] is None else low + dist["step"]]


def check_selection(recipe: Recipe, source: str) -> None:
    if getattr(recipe.data, "select_fraction", None) == 0:
        raise SlimtuneError(f"{source}: data.select_fraction 0 would choose on the eval split; tune chooses on "
                            "the selection split (a share of the train data): give it a share > 0")


# A field name of a stage config (or of the sub-config its method selects, like finetune's `lora`) -> its
# range in the default space, from the recipe's value and the field's own bounds (None: not tuned).
def _lr(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if not isinstance(value, int | float) or isinstance(value, bool):  # lr: auto
        return {"low": 1e-5, "high": 1e-4, "log": True}
    return {"low": float(f"{value / 3:.2g}"), "high": float(f"{value * 3:.2g}"), "log": True}


def _batch_size(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if not isinstance(value, int) or isinstance(value, bool):  # batch_size: auto
        return {"choices": [16, 32]}
    return {"choices": sorted({max(1, value // 2), value, value * 2})}


def _epochs(value: Any, lo: float | None, hi: float | None) -> dict | None:
    if value >= 1:
        low = max(1, math.floor(value / 2))
        return {"low": low, "high": max(low + 1, math.ceil(value))}
    return {"low": value / 2, "high": min(1.0, value * 2)}


def _fixed(low: float, high: float) -> Callable[..., dict]:
    return lambda value, lo, hi: {"low": low, "high": high}


def _weight_or_scale(value: Any, lo: float | None, hi: float | None) -> dict | None:
    """A weight in [0, 1] (distillation's alpha), or a scale (LoRA's alpha) around its value."""
    if hi is not None and hi <= 1:
        return {"low": 0.1, "high": 0.9}
    return {"choices": sorted({value / 2, value, value * 2})}


def _rank(value: Any, lo: float | None, hi: float | None) -> dict | None:
    return {"choices": sorted({max(1, value // 2), value, value * 2})}


def _temperature(value: Any, lo: float | None, hi: float | None) -> dict | None:
    return {"low": 1.0, "high": max(4.0, 2.0 * value)}


def _share(value: Any, lo: float | None, hi: float | None) -> dict | None:
    """A share removed or kept (pruning ratios, sparsity, low-rank energy): 0.2 either side; not tuned when
    the recipe leaves it unset or at 0 (that part is not compressed)."""
    if not value:
        return None
    low, high = round(max(0.05, value - 0.2), 2), round(min(0.95, value + 0.2, hi if hi is not None else 1), 2)
    return {"low": low, "high": high} if low < high else None


RULES: dict[str, Callable[[Any, float | None, float | None], dict | None]] = {
    "lr": _lr, "batch_size": _batch_size, "epochs": _epochs, "warmup_ratio": _fixed(0.0, 0.2),
    "weight_decay": _fixed(0.0, 0.1), "r": _rank, "alpha": _weight_or_scale, "temperature": _temperature,
    "sparsity": _share, "heads": _share, "ffn": _share, "energy": _share,
}


def default_space(recipe: Recipe) -> dict[str, dict]:
    """The space that follows from the recipe's stages: every field of a stage config (and of the sub-config
    its `method` selects, e.g. `lora` when method is lora) that `RULES` knows, ranged around its value."""
    space: dict[str, dict] = {}
    for i, cfg in enumerate(recipe.stages):
        for key, name, value, bounds in _fields(cfg, f"stages.{i}"):
            rule = RULES.get(name)
            dist = rule(value, *bounds) if rule is not None and value is not None else None
            if dist is not None:
                space[key] = parse_distribution(dist, f"default space: {key}")
    return space


def _fields(cfg: BaseModel, prefix: str) -> Iterator[tuple[str, str, Any, tuple[float | None, float | None]]]:
    method = getattr(cfg, "method", None)
    for name, info in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            if name == method:  # the method's own sub-config (finetune's lora: only when method is lora)
                yield from _fields(value, f"{prefix}.{name}")
            continue
        yield f"{prefix}.{info.alias or name}", name, value, _bounds(info)


def _bounds(info: Any) -> tuple[float | None, float | None]:
    """A field's lower and upper bounds from its schema (`Field(ge=0, le=1)`), None where it has none."""
    lo = hi = None
    for m in info.metadata:
        lo = next((v for v in (getattr(m, "ge", None), getattr(m, "gt", None)) if v is not None), lo)
        hi = next((v for v in (getattr(m, "le", None), getattr(m, "lt", None)) if v is not None), hi)
    return lo, hi


def with_params(raw: dict, params: dict) -> dict:
    out = copy.deepcopy(raw)
    for key, value in params.items():
        set_key(out, key, value)
    return out


def raw_recipe(recipe: Recipe) -> dict:
    return yaml.safe_load(recipe_to_yaml(recipe))


@dataclass
class TuneJob:
    """What every process of a tune (and its report) needs (picklable: `--jobs` starts processes with spawn)."""

    raw: dict  # the recipe, resolved
    space: dict[str, dict]
    out: str
    storage: str
    local: bool  # the study is DIR/study.db (else a shared --storage)
    trials: int  # the study's total
    seed: int
    pruner: Any  # a name of tune.PRUNERS, or an Optuna pruner
    generation: int  # trials in the study when this tune started (a resumed sampler draws new points)
