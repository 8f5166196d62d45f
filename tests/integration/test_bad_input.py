"""Every bad input: one clear line naming file/field/line, exit code 2, and no output left behind."""

import pytest
from helpers import slimtune, write_recipe

GOOD = '{"text": "fine film", "label": 1}\n{"text": "bad film", "label": 0}\n' * 4


def run_expecting_error(tmp_path, recipe, *extra):
    out = tmp_path / "out"
    proc = slimtune("run", recipe, "--out", out, *extra)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0], out


@pytest.fixture
def files(tmp_path):
    (tmp_path / "train.jsonl").write_text(GOOD)
    (tmp_path / "dev.jsonl").write_text(GOOD)
    return tmp_path


CASES = {
    "missing data file": (lambda d: {"train": d / "nope.jsonl"}, [r"nope.jsonl: data file not found"]),
    "empty file": (lambda d: {"train": _write(d / "empty.jsonl", "")}, ["empty.jsonl", "empty"]),
    "malformed jsonl": (lambda d: {"train": _write(d / "bad.jsonl", "".join(GOOD.splitlines(True)[:2]) + '{"text": "x", "label": 1\n' + GOOD)},
                        ["bad.jsonl:3:", "malformed JSON"]),
    "missing text field": (lambda d: {"train": d / "train.jsonl", "text_field": "sentence"},
                           ["train.jsonl:1", "'sentence'"]),
    "missing label field": (lambda d: {"train": d / "train.jsonl", "label_field": "y"}, ["train.jsonl:1", "'y'"]),
    "label unseen in train": (lambda d: {"train": d / "train.jsonl",
                                         "eval": _write(d / "dev2.jsonl", GOOD + '{"text": "meh", "label": 7}\n')},
                              ["dev2.jsonl:9", "'7'", "training data"]),
    "non-utf8 bytes": (lambda d: {"train": _write(d / "latin1.jsonl", GOOD.encode() + '{"text": "caf\xe9", "label": 1}\n'
                                                  .encode("latin-1"))}, ["latin1.jsonl:9", "UTF-8"]),
}


def _write(path, content):
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return path


@pytest.mark.parametrize("case", list(CASES))
def test_bad_data(tmp_path, files, tiny_model_dir, case):
    make, expected = CASES[case]
    data = make(files)
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data.pop("train"), data.pop("eval", None), **data)
    message, out = run_expecting_error(tmp_path, recipe)
    for fragment in expected:
        assert fragment in message, message
    assert not out.exists()


@pytest.mark.parametrize("stage, expected", [
    ({"stage": "finetune", "epochz": 1}, "stages.0.epochz: unknown key (did you mean 'epochs'?)"),
    ({"stage": "distil"}, "stages.0.stage: unknown stage 'distil'"),
    ({"stage": "finetune", "method": "lorra"}, "stages.0.method: invalid value 'lorra'"),
])
def test_bad_recipe(tmp_path, files, tiny_model_dir, stage, expected):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, files / "train.jsonl", stages=[stage])
    message, out = run_expecting_error(tmp_path, recipe)
    assert "r.yaml" in message and expected in message
    assert not out.exists()


def test_model_path_missing_or_not_a_model(tmp_path, files):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "no-such-model", files / "train.jsonl")
    message, _ = run_expecting_error(tmp_path, recipe)
    assert "no-such-model" in message and "not found" in message and "never downloads" in message
    (tmp_path / "empty-dir").mkdir()
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "empty-dir", files / "train.jsonl")
    message, out = run_expecting_error(tmp_path, recipe)
    assert "not a model directory" in message
    assert not out.exists()


def test_existing_output_dir_is_refused_and_left_alone(tmp_path, files, tiny_model_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, files / "train.jsonl")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    message, out = run_expecting_error(tmp_path, recipe)
    assert str(out) in message and "--overwrite" in message
    assert (out / "keep.txt").read_text() == "mine" and len(list(out.iterdir())) == 1


def test_eval_and_predict_errors(tmp_path, files):
    proc = slimtune("eval", tmp_path / "nothing", "--data", files / "dev.jsonl")
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: ") and "nothing" in proc.stderr
    proc = slimtune("predict", tmp_path / "nothing", "hello")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
