"""Every command on every damaged model directory, through the real CLI: one `error:` line naming the file,
exit code 2, no traceback, no output left behind. Also output paths that cannot be created or written.

The matrix: each file of a saved model directory (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) x each damage (truncated, random bytes, empty, deleted, invalid JSON, wrong shapes)
x each command (eval, predict, export, pack, run with the directory as `model:`, run with it as a distill
teacher), plus a pickle-only directory. Each CLI call costs seconds (importing torch and transformers), so
the default suite runs one damage per file against every command, and the pickle-only directory in process
(with unpickling made to fail) plus one CLI command; `-m slow` runs the rest of the matrix.
"""

import errno
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import slimtune, write_recipe

LABELS = {0: "0", 1: "1"}  # what SST-2's integer labels become: a teacher must classify exactly these
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
JSON_FILES = {"config.json", "tokenizer.json", "tokenizer_config.json"}
DAMAGES = ("truncated", "random bytes", "empty", "deleted", "invalid json", "wrong shapes")
COMMANDS = ("eval", "predict", "export", "pack", "run", "teacher")
# One damage per file for the default suite; the rest of the matrix is marked slow.
DEFAULT_DAMAGE = {"config.json": "invalid json", "model.safetensors": "truncated", "tokenizer.json": "truncated",
                  "tokenizer_config.json": "random bytes"}
# Damages that leave a directory that still works correctly: the commands may succeed on them.
HARMLESS = {("tokenizer_config.json", "deleted")}  # the tokenizer is complete in tokenizer.json
# Commands that do not need a tokenizer: a directory without one is still packed (byte for byte).
NO_TOKENIZER_NEEDED = {("tokenizer.json", "deleted", "pack")}


def applies(file: str, damage: str) -> bool:
    return (damage != "invalid json" or file in JSON_FILES) and (damage != "wrong shapes" or file == "model.safetensors")


# --------------------------------------------------------------------------------- the model dirs
@pytest.fixture(scope="session")
def good_dirs(tmp_path_factory, tiny_model_dir):
    """A tiny BERT classifier saved as slimtune saves models (labels, tokenizer, preprocessing record), and
    a quantized copy of it (for `pack`)."""
    import torch

    from slimtune.models import load_for_classification, load_tokenizer, save_hf_model
    from slimtune.quantize.core import layer_spec, quantize_

    root = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tiny_model_dir)
    pre = {"max_length": 64, "text_field": "text", "label_field": "label"}
    model = load_for_classification(tiny_model_dir, LABELS)
    save_hf_model(model, tokenizer, root / "clf", pre)
    quantize_(model, {f"bert.encoder.layer.{i}.attention.self.query": layer_spec(bits=8) for i in range(2)})
    save_hf_model(model, tokenizer, root / "quantized", pre)
    assert {p.name for p in (root / "clf").iterdir()} == set(FILES)
    return root / "clf", root / "quantized"


def damage(path: Path, file: str, how: str) -> None:
    """Damage `file` of the model directory `path` in place."""
    target = path / file
    data = target.read_bytes()
    if how == "truncated":
        target.write_bytes(data[: len(data) // 2])
    elif how == "random bytes":
        target.write_bytes(os.urandom(len(data)))
    elif how == "empty":
        target.write_bytes(b"")
    elif how == "deleted":
        target.unlink()
    elif how == "invalid json":
        target.write_text('{"model_type": "bert", "hidden_size": 32,', encoding="utf-8")
    elif how == "wrong shapes":  # one tensor re-saved with another shape, the file otherwise intact
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(target))
        name = next(k for k in tensors if k.endswith("attention.self.query.weight") or k.endswith("query.qweight"))
        tensors[name] = tensors[name][:, : tensors[name].shape[1] // 2].contiguous()
        save_file(tensors, str(target), metadata={"format": "pt"})
    else:
        raise AssertionError(how)


def pickle_only(path: Path) -> None:
    """The directory as a pre-safetensors checkpoint: the weights only as a pickle (never opened)."""
    import torch

    (path / "model.safetensors").unlink()
    torch.save({"not": "loaded"}, path / "pytorch_model.bin")


# ------------------------------------------------------------------------------------- commands
def command_args(command: str, model: Path, quantized: Path, work: Path, data: tuple[Path, Path],
                 tiny_model_dir: Path) -> tuple[list, Path | None]:
    """(CLI arguments, the output the command would write)."""
    train, dev = data
    out = work / f"out-{command}"
    if command == "eval":
        return ["eval", model, "--data", dev, "--no-speed"], None
    if command == "predict":
        return ["predict", model, "a gripping film"], None
    if command == "export":
        return ["export", model, "--out", out], out
    if command == "pack":
        out = work / "packed.stpack"
        return ["pack", quantized, out], out
    if command == "run":
        recipe = write_recipe(work / "run.yaml", model, train, dev)
        return ["run", recipe, "--out", out], out
    if command == "teacher":
        recipe = write_recipe(work / "teacher.yaml", tiny_model_dir, train, dev,
                              stages=[{"stage": "distill", "teacher": str(model), "epochs": 1, "batch_size": 16}])
        return ["run", recipe, "--out", out], out
    raise AssertionError(command)


def assert_clean_failure(proc, out: Path | None, names: list[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert 1 <= len(lines) <= 3 and lines[-1].startswith("error: "), proc.stderr[-3000:]
    assert any(name in lines[-1] for name in names), lines[-1]
    if out is not None:
        assert not out.exists(), f"{out} left behind"
        assert not [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")], "temp entries left"
    return lines[-1]


def check_commands(tmp_path, good_dirs, sst2_small, tiny_model_dir, file, how):
    clf, quantized = (shutil.copytree(d, tmp_path / d.name) for d in good_dirs)
    for d in (clf, quantized):
        (pickle_only if how == "pickle only" else lambda p: damage(p, file, how))(d)
    runs = {command: command_args(command, clf, quantized, tmp_path, sst2_small, tiny_model_dir)
            for command in COMMANDS}
    with ThreadPoolExecutor(max_workers=2) as pool:  # each CLI process mostly imports torch: two at a time
        procs = dict(zip(runs, pool.map(lambda run: slimtune(*run[0], timeout=300), runs.values()), strict=True))
    for command, (_, out) in runs.items():
        proc = procs[command]
        if (file, how) in HARMLESS or (file, how, command) in NO_TOKENIZER_NEEDED:
            assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
            if proc.returncode != 0:
                assert_clean_failure(proc, out, [str(clf), str(quantized)])
            elif out is not None:
                (shutil.rmtree if out.is_dir() else Path.unlink)(out)
            continue
        target = quantized if command == "pack" else clf
        names = [str(target / file)] if how not in ("deleted", "pickle only") else [str(target)]
        message = assert_clean_failure(proc, out, names)
        if how == "pickle only":
            assert "pytorch_model.bin" in message and "save_pretrained" in message and "safe_serialization" in message


def matrix():
    for file in FILES:
        for how in DAMAGES:
            if applies(file, how):
                marks = () if DEFAULT_DAMAGE[file] == how else (pytest.mark.slow,)
                yield pytest.param(file, how, marks=marks, id=f"{file}-{how.replace(' ', '_')}")
    yield pytest.param("model.safetensors", "pickle only", id="pickle_only", marks=pytest.mark.slow)


@pytest.mark.parametrize("file, how", list(matrix()))
def test_every_command_refuses_a_damaged_model_dir(tmp_path, good_dirs, sst2_small, tiny_model_dir, file, how):
    check_commands(tmp_path, good_dirs, sst2_small, tiny_model_dir, file, how)


def test_a_pickle_only_dir_is_refused_before_anything_unpickles_it(tmp_path, good_dirs, monkeypatch):
    import pickle

    import torch

    from slimtune.errors import SlimtuneError
    from slimtune.models import load_for_classification, load_model, load_tokenizer, resolve_model_path

    legacy = shutil.copytree(good_dirs[0], tmp_path / "legacy")
    pickle_only(legacy)
    proc = slimtune("predict", legacy, "a gripping film")
    message = assert_clean_failure(proc, None, [str(legacy)])
    assert "pytorch_model.bin" in message and "save_pretrained(DIR, safe_serialization=True)" in message

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    for load in (resolve_model_path, load_model, load_tokenizer, lambda p: load_for_classification(p, LABELS)):
        with pytest.raises(SlimtuneError, match="only pickle weights"):
            load(legacy)
    (legacy / "config.json").unlink()  # not even a config: still named for what it is
    with pytest.raises(SlimtuneError, match="only pickle weights"):
        resolve_model_path(legacy)


def test_pack_of_a_plain_model_dir_is_one_line(tmp_path, good_dirs):
    proc = slimtune("pack", good_dirs[0], tmp_path / "p.stpack")
    message = assert_clean_failure(proc, tmp_path / "p.stpack", [str(good_dirs[0])])
    assert "not quantized" in message


# -------------------------------------------------------------------------- the gate, in process
def test_the_gate_reads_no_tensor_data_and_names_the_tensor_with_both_shapes(tmp_path, good_dirs):
    from slimtune.errors import SlimtuneError
    from slimtune.modeldir import check_model_dir

    info = check_model_dir(good_dirs[0])
    assert info.kind == "hf" and info.has_head and info.tokenizer_files == ("tokenizer.json",)
    assert check_model_dir(good_dirs[1]).kind == "slimtune"
    bad = shutil.copytree(good_dirs[0], tmp_path / "bad")
    damage(bad, "model.safetensors", "wrong shapes")
    with pytest.raises(SlimtuneError) as e:
        check_model_dir(bad)
    assert "bert.encoder.layer.0.attention.self.query.weight" in str(e.value) and "[32, 16]" in str(e.value) \
        and "[32, 32]" in str(e.value) and "\n" not in str(e.value)


def test_a_base_encoder_is_accepted_for_training_but_not_for_eval(tiny_model_dir):
    """A BertModel checkpoint (`embeddings.x`, not `bert.embeddings.x`) fits a classifier built from its config;
    evaluating it would give a random head's predictions."""
    from slimtune.errors import SlimtuneError
    from slimtune.modeldir import check_model_dir
    from slimtune.models import load_model

    info = check_model_dir(tiny_model_dir)
    assert info.kind == "hf" and not info.has_head and set(info.missing) == {"classifier.weight", "classifier.bias"}
    with pytest.raises(SlimtuneError, match="without a trained classification head"):
        load_model(tiny_model_dir)


def test_missing_tokenizer_files_are_an_error_not_a_five_token_tokenizer(tmp_path, good_dirs):
    from slimtune.errors import SlimtuneError
    from slimtune.models import load_model, load_tokenizer

    bare = shutil.copytree(good_dirs[0], tmp_path / "bare")
    (bare / "tokenizer.json").unlink()
    (bare / "tokenizer_config.json").unlink()
    with pytest.raises(SlimtuneError, match="no tokenizer files"):
        load_tokenizer(bare)
    load_model(bare)  # the weights alone do not need one


def test_a_sharded_checkpoint_is_checked_shard_by_shard(tmp_path, good_dirs):
    from safetensors.torch import load_file, save_file

    from slimtune.errors import SlimtuneError
    from slimtune.modeldir import check_model_dir

    sharded = shutil.copytree(good_dirs[0], tmp_path / "sharded")
    tensors = load_file(str(sharded / "model.safetensors"))
    (sharded / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), start=1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, str(sharded / shard), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, shard)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert len(check_model_dir(sharded).weights) == 2
    shard = sharded / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(SlimtuneError, match="model-00002-of-00002.safetensors: truncated"):
        check_model_dir(sharded)
    shard.unlink()
    with pytest.raises(SlimtuneError, match="model-00002-of-00002.safetensors: missing"):
        check_model_dir(sharded)


# --------------------------------------------------------------------------------- output paths
@pytest.mark.parametrize("where", ["under a file", "an existing file"])
def test_output_paths_that_cannot_be_created_are_one_line(tmp_path, good_dirs, sst2_small, tiny_model_dir, where):
    blocker = tmp_path / "file.txt"
    blocker.write_text("mine")
    out = blocker / "out" if where == "under a file" else blocker
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small)
    packed = out / "p.stpack" if where == "under a file" else tmp_path / "existing.stpack"
    if where == "an existing file":
        packed.write_text("mine")
    for args in (["run", recipe, "--out", out], ["export", good_dirs[0], "--out", out],
                 ["pack", good_dirs[1], packed]):
        proc = slimtune(*args)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert str(blocker) in lines[0] or str(packed) in lines[0], lines[0]
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["file.txt", "r.yaml"] + (["existing.stpack"] if where == "an existing file" else []))


def test_a_full_disk_while_writing_the_run_is_one_line_and_leaves_no_model(tmp_path, sst2_small, tiny_model_dir,
                                                                          monkeypatch):
    import slimtune
    import slimtune.io
    from slimtune.errors import SlimtuneError

    real_replace = os.replace

    def replace(src, dst):  # the disk fills up as the model directory is moved into place
        if Path(dst).name == "model":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(slimtune.io.os, "replace", replace)
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, *sst2_small, train_limit=64)
    with pytest.raises(SlimtuneError) as e:
        slimtune.run(recipe, out, progress=False)
    assert str(e.value) == f"{out / 'model'}: cannot write (No space left on device)"
    leftovers = [p.name for p in out.iterdir()] if out.exists() else []
    assert "model" not in leftovers and "metrics.json" not in leftovers
    assert not [name for name in leftovers if name.startswith(".model.")], leftovers
