"""Property-based bad input: whatever a recipe, a data file or a model file holds, the only exception is
SlimtuneError, and its message is one line.

Arbitrary dicts and YAML documents go into `parse_recipe` / `load_recipe` (with `--set` overrides), arbitrary
bytes and arbitrary rows go into the data readers (`read_rows`, `label_map_of`, `load_eval_data`), arbitrary
bytes and JSON into the files of a model directory (`check_model_dir`). A crash of any other type (KeyError,
ValueError, RecursionError...) would reach the user as a traceback.
"""

import atexit
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from slimtune.errors import SlimtuneError

# SLIMTUNE_PROPERTY_SCALE=20 runs 20x the examples (a longer hunt for crashes than the default suite's)
SCALE = float(os.environ.get("SLIMTUNE_PROPERTY_SCALE", "1"))
SETTINGS = settings(max_examples=int(300 * SCALE), deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
TMP = Path(tempfile.mkdtemp(prefix="slimtune-properties-"))  # one dir: hypothesis re-runs the body many times
atexit.register(shutil.rmtree, TMP, ignore_errors=True)



def _schema_words(schema: dict) -> tuple[list[str], list[str]]:
    """Every key and every named value of a config schema, so generated documents get past the first checks
    and into the stage configs' own validation."""
    keys, values = set(), set()

    def walk(node):
        if isinstance(node, dict):
            keys.update(node.get("properties", {}) if isinstance(node.get("properties"), dict) else ())
            values.update(v for v in node.get("enum", []) if isinstance(v, str))
            if isinstance(node.get("const"), str):
                values.add(node["const"])
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(schema)
    return sorted(keys), sorted(values)


def _stage_strategy(name: str, config) -> st.SearchStrategy:
    from pydantic import TypeAdapter

    keys, values = _schema_words(TypeAdapter(config).json_schema())
    keys = [k for k in keys if k not in ("stage", "method")] or ["epochs"]
    method = {"method": st.sampled_from(values) | st.text(max_size=5)} if values else {}
    return st.fixed_dictionaries({"stage": st.just(name)}, optional=method).flatmap(
        lambda d: st.dictionaries(st.sampled_from(keys) | KEYS, VALUES, max_size=4).map(lambda extra: {**extra, **d}))


from slimtune.config import DataConfig  # noqa: E402
from slimtune.recipe import Recipe  # noqa: E402
from slimtune.stages import STAGES  # noqa: E402

SCHEMA_KEYS, SCHEMA_VALUES = _schema_words(Recipe.model_json_schema())
DATA_KEYS = sorted(DataConfig.model_fields)
ODD = ["train.jsonl", "~no-such-user-xyz/model", "a\x00b/c", "../x", "./x.csv", "2001-13-45", "1e999", "minilm"]
KEYS = st.sampled_from(SCHEMA_KEYS) | st.text(max_size=8) | st.integers(-3, 3)
LEAVES = (st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=20)
          | st.sampled_from(SCHEMA_VALUES + ODD) | st.sampled_from([0, 1, 2, 3, -1, 0.5, 0.99, 1e-3, 8, 64, 128]))
VALUES = st.recursive(LEAVES, lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(KEYS, children, max_size=5), max_leaves=25)
STAGE = st.one_of([_stage_strategy(name, stage.Config) for name, stage in STAGES.items()]
                  + [st.dictionaries(KEYS, VALUES, max_size=4)])
RECIPES = st.fixed_dictionaries(
    {"data": st.fixed_dictionaries({"train": st.sampled_from(ODD) | st.text(max_size=10)}).flatmap(
        lambda d: st.dictionaries(st.sampled_from(DATA_KEYS) | KEYS, VALUES, max_size=3).map(
            lambda extra: {**extra, **d})),
     "stages": st.lists(STAGE, min_size=1, max_size=3)},
    optional={"model": st.sampled_from(ODD) | VALUES}).flatmap(
    lambda d: st.sampled_from([{}, {}, {}, {"task": "text-classification"}, {"keep_checkpoints": True}]).map(
        lambda extra: {**d, **extra}) | VALUES.map(lambda v: {**d, "task": v}))


PRUNED = "slimtune_pruned_bert"
CONFIG_KEYS = ["hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "vocab_size",
               "max_position_embeddings", "type_vocab_size", "id2label", "label2id", "num_labels",
               "slimtune_format", "slimtune_quantization", "slimtune_lowrank", "heads_per_layer", "arch",
               "hidden_act", "architectures", "pad_token_id", "layer_norm_eps", "hidden_dropout_prob"]


def _safetensors(header: dict) -> bytes:
    """A file whose header parses but whose entries, offsets and data length are whatever was drawn."""
    raw = json.dumps(header).encode()
    end = max([max(e["data_offsets"]) for e in header.values()] + [0])
    return len(raw).to_bytes(8, "little") + raw + bytes(max(end, 0) % 97)


def only_slimtune_errors(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except SlimtuneError as e:
        assert "\n" not in str(e), repr(str(e))


# ------------------------------------------------------------------------------------------ recipes
@SETTINGS
@given(raw=VALUES | RECIPES)
def test_parse_recipe_of_any_dict_raises_only_slimtune_errors(raw):
    from slimtune.recipe import parse_recipe

    only_slimtune_errors(parse_recipe, raw, base_dir=TMP)


@SETTINGS
@given(doc=st.one_of(st.text(max_size=200), RECIPES.map(lambda r: yaml.safe_dump(r, allow_unicode=True)),
                     st.binary(max_size=200).map(lambda b: b.decode("latin-1"))),
       overrides=st.lists(st.sampled_from(["data.max_length=64", "stages.0.epochs=2", "stages.9.lr=1", "x",
                                           "data=3", "stages.0=[", "a.b.c=1", "=1", "stages.-1.lr=2"])
                          | st.text(max_size=15), max_size=3))
@example(doc="data: {train: t.jsonl}\nstages: [{stage: finetune}]\nseed: 2001-13-45\n", overrides=[])
@example(doc="[" * 2000, overrides=[])
@example(doc="data: {train: t.jsonl}\nstages: [{stage: finetune}]\n", overrides=["stages.0.epochs.x=1"])
def test_load_recipe_of_any_text_raises_only_slimtune_errors(doc, overrides):
    from slimtune.recipe import load_recipe

    path = TMP / "recipe.yaml"
    path.write_text(doc, encoding="utf-8", errors="surrogatepass")
    only_slimtune_errors(load_recipe, path, overrides)


@settings(max_examples=int(60 * SCALE), deadline=None, database=None)
@given(content=st.binary(max_size=300))
def test_load_recipe_of_any_bytes_raises_only_slimtune_errors(content):
    from slimtune.recipe import load_recipe

    path = TMP / "bytes.yaml"
    path.write_bytes(content)
    only_slimtune_errors(load_recipe, path)


# --------------------------------------------------------------------------------------------- data
TEXTS = st.text(max_size=30)
CELLS = st.one_of(TEXTS, st.sampled_from(["0", "1", "pos", "neg", "1.5", "", " ", '"', "\r", "\n", "\x00", ",", "\t"]))
JSON_ROWS = st.lists(st.dictionaries(st.sampled_from(["text", "label", "pair"]) | st.text(max_size=5), VALUES,
                                     max_size=4), max_size=6)


def jsonl(rows) -> bytes:
    return "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode("utf-8", "surrogatepass")


def delimited(rows, sep: str) -> bytes:
    return "\n".join(sep.join(cells) for cells in rows).encode("utf-8", "surrogatepass")


FILES = st.one_of(
    st.tuples(st.sampled_from(["csv", "tsv", "jsonl"]), st.binary(max_size=300)),
    st.tuples(st.just("jsonl"), JSON_ROWS.map(jsonl)),
    st.tuples(st.just("jsonl"), st.lists(VALUES, max_size=4).map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("csv"), st.lists(st.lists(CELLS, min_size=1, max_size=3), max_size=6).map(
        lambda rows: delimited([["text", "label"]] + rows, ","))),
    st.tuples(st.just("tsv"), st.lists(st.lists(CELLS, min_size=1, max_size=3), max_size=6).map(
        lambda rows: delimited([["text", "label"]] + rows, "\t"))))


def data_file(fmt: str, content: bytes) -> Path:
    path = TMP / f"data.{fmt}"
    path.write_bytes(content)
    return path


@SETTINGS
@given(file=FILES)
@example(file=("jsonl", b'{"text": "a", "label": 1}\n{"text": "b", "label": 1e999}'))
@example(file=("jsonl", b'{"text": "a", "label": NaN}'))
@example(file=("jsonl", b"[" * 5000))
@example(file=("csv", b'text,label\n"a,1\n'))
@example(file=("csv", b"\xef\xbb\xbf\xff\xfe"))
def test_reading_any_data_file_raises_only_slimtune_errors(file):
    from slimtune.config import DataConfig
    from slimtune.data import label_map_of, read_rows

    fmt, content = file
    path = data_file(fmt, content)
    only_slimtune_errors(read_rows, path)
    only_slimtune_errors(read_rows, path, fmt)
    only_slimtune_errors(label_map_of, DataConfig(train=path, format=fmt))
    only_slimtune_errors(label_map_of, DataConfig(train=path, format=fmt, text_pair_field="pair",
                                                  label_names={0: "neg", 1: "pos"}))


@settings(max_examples=int(200 * SCALE), deadline=None, database=None)
@given(file=FILES, clean=st.booleans(), lowercase=st.booleans())
def test_evaluating_on_any_data_file_raises_only_slimtune_errors(file, clean, lowercase):
    from slimtune.config import Preprocessing
    from slimtune.data import load_eval_data
    from slimtune.distill.wordlevel import WordTokenizer

    tokenizer = WordTokenizer.build(["a good film", "a bad film"])
    path = data_file(*file)
    pre = Preprocessing(max_length=16, clean=clean, lowercase=lowercase)
    only_slimtune_errors(load_eval_data, path, tokenizer, {"0": 0, "1": 1, "pos": 2}, pre)


# ------------------------------------------------------------------------------------ model files
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_model_dir):
    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model

    path = tmp_path_factory.mktemp("model") / "clf"
    save_hf_model(load_for_classification(tiny_model_dir, {0: "0", 1: "1"}), load_tokenizer(tiny_model_dir), path)
    return path


SMALL = st.integers(-2, 70)  # sizes stay small: the model is built (on the meta device) from the config
CONFIG_VALUES = st.one_of(SMALL, st.none(), st.booleans(), st.text(max_size=6), st.floats(-2, 70),
                          st.lists(SMALL, max_size=3), st.dictionaries(st.text(max_size=3) | st.sampled_from(["0", "1"]),
                                                                       st.text(max_size=3) | SMALL, max_size=3))
CONFIGS = st.fixed_dictionaries({"model_type": st.sampled_from(["bert", "mpnet", "roberta", "x", PRUNED])},
                                optional={k: CONFIG_VALUES for k in CONFIG_KEYS}).map(json.dumps)
MODEL_FILES = st.one_of(
    st.tuples(st.sampled_from(["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]),
              st.binary(max_size=400)),
    st.tuples(st.just("config.json"), CONFIGS.map(str.encode)),
    st.tuples(st.sampled_from(["config.json", "tokenizer.json", "tokenizer_config.json"]),
              VALUES.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("model.safetensors"), st.tuples(st.integers(0, 2 ** 64 - 1), VALUES, st.binary(max_size=64)).map(
        lambda t: t[0].to_bytes(8, "little") + json.dumps(t[1]).encode() + t[2])),
    st.tuples(st.just("model.safetensors"), st.dictionaries(st.text(max_size=40), st.fixed_dictionaries(
        {"dtype": st.sampled_from(["F32", "I8", "BF16", "X"]), "shape": st.lists(SMALL, max_size=3),
         "data_offsets": st.lists(SMALL, min_size=2, max_size=2)}), max_size=3).map(_safetensors)))


@settings(max_examples=int(200 * SCALE), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(file=MODEL_FILES)
def test_any_model_file_content_raises_only_slimtune_errors_at_the_gate(model_dir, file):
    from slimtune.modeldir import check_model_dir

    name, content = file
    damaged = TMP / "model"
    shutil.rmtree(damaged, ignore_errors=True)
    shutil.copytree(model_dir, damaged)
    (damaged / name).write_bytes(content)
    only_slimtune_errors(check_model_dir, damaged)



@st.composite
def safetensors_files(draw) -> bytes:
    """Mostly well-formed files (tensors laid out one after the other), then one random change or none."""
    dtypes = {"F32": 4, "F16": 2, "BF16": 2, "I8": 1, "U8": 1, "I64": 8, "BOOL": 1, "F64": 8}
    names = draw(st.lists(st.text(min_size=1, max_size=8), max_size=4, unique=True))
    header, offset = {}, 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(dtypes)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = dtypes[dtype] * math.prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=3), st.text(max_size=3) | SMALL, max_size=2))
    change = draw(st.sampled_from(["none", "none", "truncate", "append", "shape", "offsets", "dtype"]))
    if names and change in ("shape", "offsets", "dtype"):
        entry = header[draw(st.sampled_from(names))]
        if change == "shape":
            entry["shape"] = draw(st.lists(st.integers(0, 4), max_size=3))
        elif change == "offsets":
            entry["data_offsets"] = [draw(SMALL), draw(SMALL)]
        else:
            entry["dtype"] = draw(st.sampled_from(sorted(dtypes) + ["F4", "Q8"]))
    raw = json.dumps(header).encode()
    raw += b" " * draw(st.integers(0, 7))  # safetensors pads headers to 8 bytes with spaces
    data = bytes(draw(st.integers(0, 64)) if change == "append" else 0) + bytes(offset)
    if change == "truncate":
        data = data[: draw(st.integers(0, max(len(data) - 1, 0)))] if data else b""
    return len(raw).to_bytes(8, "little") + raw + data


@settings(max_examples=int(150 * SCALE), deadline=None, database=None)
@given(content=safetensors_files() | MODEL_FILES.filter(lambda f: f[0] == "model.safetensors").map(lambda f: f[1]))
@example(content=b"")
# safetensors 0.8's packed 4-bit floats: an empty F4 tensor is a valid file (found by this test), three are not
@example(content=b'<\x00\x00\x00\x00\x00\x00\x00{"0": {"dtype": "F4", "shape": [0], "data_offsets": [0, 0]}}')
@example(content=b'<\x00\x00\x00\x00\x00\x00\x00{"0": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}\x00\x00')
def test_the_gate_accepts_a_safetensors_file_exactly_when_safetensors_opens_it(content):
    """What safe_open checks, the gate checks first (with a message naming the file), and no more."""
    from safetensors import safe_open

    from slimtune.modeldir import read_safetensors_header

    path = TMP / "t.safetensors"
    path.write_bytes(content)
    try:
        header = read_safetensors_header(path)
    except SlimtuneError:
        header = None
    try:
        with safe_open(str(path), framework="np") as f:
            opened = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    except Exception:  # noqa: BLE001 - whatever safetensors raises for a file it refuses
        opened = None
    assert opened == (None if header is None else {name: shape for name, (_, shape) in header.items()})
