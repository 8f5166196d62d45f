"""The single gate for model directories: `check_model_dir(path)` before anything hands them to transformers.

transformers 5 is lenient where slimtune must not be: a directory without tokenizer files loads a
5-token BertTokenizer (every word becomes [UNK]), a truncated model.safetensors fails deep inside
safe_open, a pickle-only directory goes to torch.load, and weights of another width fail with a
multi-line shape report. Every place that reads a model directory (`slimtune.models`, hence eval,
predict, export, pack, runs, teachers and students, the assembled teacher asset) goes through this
gate first; each failure is one `SlimtuneError` line naming the file at fault.

What it checks, without reading any tensor data:
- config.json: present, UTF-8, a JSON object; labels (id2label / label2id) well-formed.
- weights: model.safetensors, or model.safetensors.index.json + every shard it names, or
  adapter_config.json + adapter_model.safetensors (adapter-only LoRA saves); a directory whose only
  weights are pickles (pytorch_model.bin, *.pt, *.pth, *.ckpt, *.pkl) is refused before anything opens
  them, with the way to convert it.
- each safetensors file: the 8-byte header length and the JSON header parse, every dtype is known,
  every tensor's byte span matches its shape and dtype, the spans tile the data section, and the data
  section is exactly as long as the header says (truncation, appended or missing bytes).
- shapes: the model is built from its config on the `meta` device (slimtune's pruned / low-rank /
  quantized / word-level formats included) and every tensor of the file that the model has (a base
  encoder's `embeddings.x` counts for `bert.embeddings.x`) must have the model's shape; the encoder's
  parameters must all be present (slimtune's own formats: exactly the model's tensors).
- tokenizer: tokenizer.json, vocab.txt, a sentencepiece *.model, vocab.json + merges.txt, or
  slimtune's word_vocab.json; JSON files parse; no token id reaches past the embedding table.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from slimtune.errors import SlimtuneError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WORD_VOCAB = "word_vocab.json"
WORD_FORMAT = "word-classifier"
# Files that hold pickles: opening them can run arbitrary code, so slimtune never does.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
JSON_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# bits per element of every dtype safetensors (0.8) reads; F4 and F6 are packed, and a tensor of them must end on
# a byte boundary (safetensors refuses it otherwise)
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
                          "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16,
                          "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "I64": 64, "U64": 64, "F64": 64}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit
CONVERT_HINT = ("convert it once where you trust its origin: load it with transformers and "
                "`model.save_pretrained(DIR, safe_serialization=True)`")


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    file: Path


@dataclass(frozen=True)
class ModelDirInfo:
    """What the gate found in a model directory that passed it."""

    path: Path
    config: dict
    kind: str  # "hf" | "slimtune" (pruned / low-rank / quantized) | "word-classifier" | "adapter"
    weights: tuple[Path, ...]  # the safetensors files
    tensors: dict[str, TensorInfo] = field(repr=False)
    tokenizer_files: tuple[str, ...]  # empty: no tokenizer (see tokenizer_error)
    missing: tuple[str, ...] = ()  # model tensors the weights lack (a base encoder's new classification head)
    tokenizer_error: str | None = None  # why there is no tokenizer: raised unless the caller needs none

    @property
    def has_head(self) -> bool:
        """False for a base encoder (its classification head would be initialised at random)."""
        return not self.missing


_CACHE: dict[tuple, ModelDirInfo] = {}


def quiet_transformers() -> None:
    """transformers logs below errors and without progress bars (loading a base encoder into a
    classifier prints a LOAD REPORT about the new head, every load and save draws bars)."""
    from transformers.utils import logging as hf_logging  # lazy: transformers costs seconds to import

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


class _NoTokenizer(SlimtuneError):
    """No tokenizer files at all: an error for everything that encodes text, not for loading weights alone."""


def check_model_dir(path: str | Path, *, tokenizer: bool = True, buildable: bool = True) -> ModelDirInfo:
    """Check a model directory (see the module docstring); a `SlimtuneError` naming the file otherwise.

    `tokenizer=False` accepts a directory without tokenizer files (loading or packing the weights alone);
    tokenizer files that are there are checked either way. `buildable=False` is for readers that never
    build the model (`slimtune pack` stores the files byte for byte): every file check still runs and the
    tensors the file shares with the model its config describes must have the model's shapes, but a
    config slimtune cannot build a model from, or weights that do not cover it, are let through.
    The result is cached while the directory's files keep their size and mtime."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SlimtuneError(f"{path}: model directory not found")
    if not path.is_dir():
        raise SlimtuneError(f"{path}: not a model directory (a file)")
    try:
        key = (str(path.resolve()), buildable) + tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns)
                                                    for e in os.scandir(path)))
    except OSError as e:
        raise SlimtuneError(f"{path}: cannot read the model directory ({e.strerror or e})") from None
    if key not in _CACHE:
        if len(_CACHE) > 8:  # a few directories per command (model, teachers, students)
            _CACHE.clear()
        _CACHE[key] = _check(path, buildable)
    info = _CACHE[key]
    if tokenizer and info.tokenizer_error:
        raise SlimtuneError(info.tokenizer_error)
    return info


def _check(path: Path, buildable: bool = True) -> ModelDirInfo:
    if not (path / CONFIG_FILE).is_file():
        _refuse_pickles(path, "no config.json")
        raise SlimtuneError(f"{path}: not a model directory (no config.json)")
    config = read_json_object(path / CONFIG_FILE)
    _check_labels(path / CONFIG_FILE, config)
    fmt = config.get("slimtune_format")
    overlays = [k for k in ("slimtune_lowrank", "slimtune_quantization") if config.get(k)]
    if fmt == WORD_FORMAT:
        kind = "word-classifier"
    elif (path / ADAPTER_CONFIG).exists():
        kind = "adapter"
    elif fmt or overlays:
        if fmt not in (None, "pruned"):
            raise SlimtuneError(f"{path / CONFIG_FILE}: unknown slimtune_format '{fmt}' (known: pruned, {WORD_FORMAT})")
        kind = "slimtune"
    else:
        kind = "hf"
    if kind != "word-classifier" and not isinstance(config.get("model_type"), str):
        raise SlimtuneError(f"{path / CONFIG_FILE}: no model_type (not a transformers config)")
    weights = _weight_files(path, kind)
    tensors: dict[str, TensorInfo] = {}
    for file in weights:
        for name, (dtype, shape) in read_safetensors_header(file).items():
            tensors[name] = TensorInfo(dtype, shape, file)
    if kind == "hf" and (path / INDEX_FILE).is_file() and not (path / WEIGHTS_FILE).is_file():
        _check_index_covered(path / INDEX_FILE, tensors)
    tokenizer_files, tokenizer_error = (), None
    try:
        tokenizer_files = _check_tokenizer(path, config, kind)
    except _NoTokenizer as e:
        tokenizer_error = str(e)
    missing = _check_shapes(path, config, kind, tensors, buildable)
    return ModelDirInfo(path, config, kind, tuple(weights), tensors, tokenizer_files, tuple(missing), tokenizer_error)


# ------------------------------------------------------------------------------------------ files
def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300] or type(e).__name__


def _read_bytes(file: Path) -> bytes:
    try:
        return file.read_bytes()
    except OSError as e:
        raise SlimtuneError(f"{file}: cannot read ({e.strerror or e})") from None


def read_json_object(file: Path) -> dict:
    """A file that must hold one JSON object (config, tokenizer and adapter files)."""
    raw = _read_bytes(file)
    if not raw.strip():
        raise SlimtuneError(f"{file}: empty (a JSON object was expected)")
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise SlimtuneError(f"{file}: not UTF-8 text (byte {e.start}): damaged or not a JSON file") from None
    except (ValueError, RecursionError) as e:
        raise SlimtuneError(f"{file}: invalid JSON ({_one_line(e)})") from None
    if not isinstance(data, dict):
        raise SlimtuneError(f"{file}: a JSON object was expected, not {type(data).__name__}")
    return data


def _check_labels(file: Path, config: dict) -> None:
    id2label, label2id = config.get("id2label"), config.get("label2id")
    if id2label is not None:
        if not isinstance(id2label, dict) or not id2label:
            raise SlimtuneError(f"{file}: id2label must be a non-empty mapping of class ids to names")
        for k in id2label:
            try:
                int(k)
            except (TypeError, ValueError):
                raise SlimtuneError(f"{file}: id2label key {k!r} is not a class id (an integer)") from None
    if label2id is not None:
        if not isinstance(label2id, dict):
            raise SlimtuneError(f"{file}: label2id must be a mapping of names to class ids")
        for name, v in label2id.items():
            if not isinstance(v, int) and not (isinstance(v, str) and v.lstrip("-").isdigit()):
                raise SlimtuneError(f"{file}: label2id[{name!r}] is {v!r}, not a class id (an integer)")


def _pickles(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES
                  and p.name != "training_args.bin")


def _refuse_pickles(path: Path, what: str) -> None:
    found = _pickles(path)
    if found:
        raise SlimtuneError(f"{path}: {what}, only pickle weights ({', '.join(found[:3])}), which slimtune never "
                            f"opens (unpickling can run code); {CONVERT_HINT}")


def _weight_files(path: Path, kind: str) -> list[Path]:
    if kind == "adapter":
        adapter = read_json_object(path / ADAPTER_CONFIG)
        if not isinstance(adapter.get("base_model_name_or_path"), str) or not adapter["base_model_name_or_path"]:
            raise SlimtuneError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path (the model the adapter is for)")
        if not (path / ADAPTER_WEIGHTS).exists():
            _refuse_pickles(path, f"no {ADAPTER_WEIGHTS}")
            raise SlimtuneError(f"{path}: no {ADAPTER_WEIGHTS} (the adapter's weights)")
        return [path / ADAPTER_WEIGHTS]
    if (path / WEIGHTS_FILE).exists():
        return [path / WEIGHTS_FILE]
    if kind == "hf" and (path / INDEX_FILE).exists():
        index = read_json_object(path / INDEX_FILE)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise SlimtuneError(f"{path / INDEX_FILE}: no weight_map (tensor name -> shard file)")
        shards = []
        for name in sorted(set(weight_map.values())):
            shard = path / name
            if Path(name).is_absolute() or ".." in Path(name).parts or not name.endswith(".safetensors"):
                raise SlimtuneError(f"{path / INDEX_FILE}: shard '{name}' is not a .safetensors file of this directory")
            if not shard.exists():
                raise SlimtuneError(f"{shard}: missing (a shard named in {INDEX_FILE})")
            shards.append(shard)
        return shards
    _refuse_pickles(path, f"no {WEIGHTS_FILE}")
    raise SlimtuneError(f"{path}: no {WEIGHTS_FILE} (the model's weights)")


def _check_index_covered(index_file: Path, tensors: dict[str, TensorInfo]) -> None:
    weight_map = read_json_object(index_file)["weight_map"]
    for name, shard in weight_map.items():
        info = tensors.get(name)
        if info is None or info.file.name != shard:
            raise SlimtuneError(f"{index_file.parent / shard}: has no tensor '{name}' (its index says it does)")


def read_safetensors_header(file: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} of a safetensors file, after checking that its header parses and
    that the tensor data it describes is exactly what the file holds (no truncation, nothing extra).
    Reads the header only."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            head = f.read(8)
            if size < 8:
                raise SlimtuneError(f"{file}: " + ("empty (0 bytes)" if size == 0 else f"truncated ({size} bytes)")
                                    + ": not a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise SlimtuneError(f"{file}: truncated or not a safetensors file (its first 8 bytes announce a "
                                    f"{n}-byte header; the file has {size} bytes)")
            raw = f.read(n)
    except OSError as e:
        raise SlimtuneError(f"{file}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise SlimtuneError(f"{file}: damaged safetensors header ({_one_line(e)})") from None
    if not isinstance(header, dict):
        raise SlimtuneError(f"{file}: damaged safetensors header (not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise SlimtuneError(f"{file}: damaged safetensors header (__metadata__ must map names to strings)")
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError(f"shape {shape!r}")
            if not all(isinstance(x, int) for x in (start, end)) or not 0 <= start <= end:
                raise ValueError(f"data_offsets {[start, end]!r}")
        except (KeyError, TypeError, ValueError) as e:
            raise SlimtuneError(f"{file}: damaged safetensors header (tensor '{name}': {_one_line(e)})") from None
        if dtype not in SAFETENSORS_DTYPE_BITS:
            raise SlimtuneError(f"{file}: tensor '{name}' has unknown dtype {dtype!r}")
        bits = math.prod(shape) * SAFETENSORS_DTYPE_BITS[dtype]
        need = bits // 8
        if bits % 8:
            raise SlimtuneError(f"{file}: damaged safetensors header (tensor '{name}': {dtype} {shape} does not end "
                                "on a byte boundary)")
        if end - start != need:
            raise SlimtuneError(f"{file}: damaged safetensors header (tensor '{name}': {dtype} {shape} needs "
                                f"{need} bytes, its offsets span {end - start})")
        out[name] = (dtype, tuple(shape))
        spans.append((start, end))
    spans.sort()
    position = 0
    for start, end in spans:
        if start != position:
            raise SlimtuneError(f"{file}: damaged safetensors header (tensor data overlaps or leaves gaps "
                                f"at byte {min(start, position)})")
        position = end
    have = size - 8 - n
    if position != have:
        what = "truncated" if position > have else "damaged (bytes after the last tensor)"
        raise SlimtuneError(f"{file}: {what}: its header describes {position} bytes of tensor data, the file "
                            f"holds {have}")
    return out


# -------------------------------------------------------------------------------------- tokenizer
def check_tokenizer_dir(path: str | Path) -> tuple[str, ...]:
    """The tokenizer part of the gate, for a directory that holds a tokenizer alone (no config.json)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise SlimtuneError(f"{path}: tokenizer directory not found")
    return _check_tokenizer(path, {}, "word-classifier" if (path / WORD_VOCAB).exists() else "hf")


def _check_tokenizer(path: Path, config: dict, kind: str) -> tuple[str, ...]:
    for name in JSON_SIDE_FILES:
        if (path / name).exists():
            read_json_object(path / name)
    vocab_size = config.get("vocab_size")
    vocab_size = vocab_size if isinstance(vocab_size, int) and not isinstance(vocab_size, bool) else None
    if kind == "word-classifier":
        if not (path / WORD_VOCAB).exists():
            raise _NoTokenizer(f"{path}: no {WORD_VOCAB} (the word classifier's vocabulary)")
        data = read_json_object(path / WORD_VOCAB)
        words = data.get("words")
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words) or len(words) < 3:
            raise SlimtuneError(f"{path / WORD_VOCAB}: 'words' must be the list of vocabulary words")
        _fits(path / WORD_VOCAB, len(words) - 1, vocab_size)
        return (WORD_VOCAB,)
    if (path / "tokenizer.json").exists():
        tok = read_json_object(path / "tokenizer.json")
        model = tok.get("model")
        if not isinstance(model, dict) or not isinstance(model.get("vocab"), (dict, list)) or not model["vocab"]:
            raise SlimtuneError(f"{path / 'tokenizer.json'}: no tokenizer model vocabulary (damaged?)")
        vocab = model["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else [len(vocab) - 1]
        ids += [t.get("id") for t in tok.get("added_tokens") or [] if isinstance(t, dict)]
        ids = [i for i in ids if isinstance(i, int)]
        _fits(path / "tokenizer.json", max(ids, default=0), vocab_size)
        return ("tokenizer.json",)
    if (path / "vocab.txt").exists():
        text = _text(path / "vocab.txt")
        _fits(path / "vocab.txt", len(text.splitlines()) - 1, vocab_size)
        return ("vocab.txt",)
    models = sorted(p.name for p in path.glob("*.model") if p.is_file())
    if models:
        for name in models:
            if not _read_bytes(path / name):
                raise SlimtuneError(f"{path / name}: empty (a sentencepiece model was expected)")
        return tuple(models)
    if (path / "vocab.json").exists() and (path / "merges.txt").exists():
        read_json_object(path / "vocab.json")
        _text(path / "merges.txt")
        return ("vocab.json", "merges.txt")
    raise _NoTokenizer(f"{path}: no tokenizer files (tokenizer.json, vocab.txt, a sentencepiece *.model or "
                        "vocab.json + merges.txt); save the tokenizer next to the model (tokenizer.save_pretrained)")


def _text(file: Path) -> str:
    raw = _read_bytes(file)
    if not raw.strip():
        raise SlimtuneError(f"{file}: empty")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SlimtuneError(f"{file}: not UTF-8 text (byte {e.start}): damaged") from None


def _fits(file: Path, max_id: int, vocab_size: int | None) -> None:
    if vocab_size is not None and max_id >= vocab_size:
        raise SlimtuneError(f"{file}: token id {max_id} does not fit the model's vocab_size {vocab_size} "
                            "(config.json): the tokenizer does not belong to this model")


# ---------------------------------------------------------------------------------------- shapes
def _skeleton(path: Path, config: dict, kind: str):
    """The model config.json describes, built on the meta device (no memory, no weights read)."""
    import torch  # lazy, as the skeleton: the gate's cheap checks (most bad input) need no torch

    from slimtune.skeleton import build_from_config, build_word_classifier

    config_file = path / CONFIG_FILE
    try:
        with torch.device("meta"):
            if kind == "word-classifier":
                return build_word_classifier(path, config)
            quiet_transformers()
            if kind == "adapter":  # the base model with the head the adapter was trained with
                return build_from_config(path, {})
            return build_from_config(path, config)
    except SlimtuneError:
        raise
    except ImportError as e:
        if (e.name or "").startswith("slimtune"):  # our own code is broken: keep the traceback
            raise
        raise SlimtuneError(f"{config_file}: the model it describes needs a package that is not installed "
                            f"({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - any config transformers / slimtune cannot build is a bad config.json
        raise SlimtuneError(f"{config_file}: does not describe a model that can be built "
                            f"({type(e).__name__}: {_one_line(e)})") from None


def _check_shapes(path: Path, config: dict, kind: str, tensors: dict[str, TensorInfo], buildable: bool = True
                  ) -> list[str]:
    """Every tensor of the weights that the model has must have the model's shape; returns the model's
    parameters the weights lack (the new head of a base encoder)."""
    try:
        model = _skeleton(path, config, kind)
    except SlimtuneError:
        if buildable:
            raise
        return []
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    # codes of 4 bits or fewer are saved two a byte; a directory written before that holds one a byte
    unpacked = {name + ".qweight": tuple(m.qweight.shape) for name, m in model.named_modules()
                if getattr(m, "qweight", None) is not None}
    params = [name for name, _ in model.named_parameters()]  # tied parameters once
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: set[str] = set()
    unexpected = []
    for name, info in tensors.items():
        target = _model_key(name, kind, prefix, expected)
        if target is None:
            unexpected.append(name)
            continue
        found.add(target)
        if expected[target] != info.shape and not (info.dtype == "I8" and unpacked.get(target) == info.shape):
            raise SlimtuneError(f"{info.file}: weights do not match the structure its config records (tensor "
                                f"'{name}' has shape {list(info.shape)}, {CONFIG_FILE} makes it "
                                f"{list(expected[target])})")
    weights = ", ".join(sorted({t.file.name for t in tensors.values()})) or WEIGHTS_FILE
    if kind == "adapter" or not buildable:
        return []
    missing = [name for name in params if name not in found]
    if kind in ("slimtune", "word-classifier"):  # slimtune's own formats load strictly: all or nothing
        missing = [name for name in expected if name not in found]
        if missing or unexpected:
            what = f"no tensor '{missing[0]}'" if missing else f"tensor '{unexpected[0]}' is not in that model"
            raise SlimtuneError(f"{path / weights}: weights do not match the structure its config records ({what}; "
                                f"{len(missing)} missing, {len(unexpected)} unexpected tensors)")
        return []
    if not found:
        raise SlimtuneError(f"{path / weights}: holds no tensor of the {config.get('model_type')} model "
                            f"{CONFIG_FILE} describes")
    encoder = [name for name in missing if name.startswith(f"{prefix}.")] if prefix else []
    if encoder:
        raise SlimtuneError(f"{path / weights}: lacks '{encoder[0]}' ({len(encoder)} of the encoder's tensors "
                            f"missing): incomplete weights")
    return missing


def _model_key(name: str, kind: str, prefix: str, expected: dict) -> str | None:
    if kind == "adapter" and name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    for candidate in (name, f"{prefix}.{name}" if prefix else None):
        if candidate is None:
            continue
        for key in (candidate, _renamed(candidate)):
            if key in expected:
                return key
    return None


def _renamed(name: str) -> str:
    """Old LayerNorm names transformers still renames on load."""
    if name.endswith(".gamma"):
        return name[:-len("gamma")] + "weight"
    if name.endswith(".beta"):
        return name[:-len("beta")] + "bias"
    return name
