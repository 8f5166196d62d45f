"""`slimtune export MODEL_DIR --format bundle --out DIR`: an int8 classifier that runs without slimtune or torch.

A bundle is what `export --quantize dynamic|static` writes (the same graph, parity policy, `--data`, `--max-drop`
and `--force`, all export_onnx's), laid out for embedding: one directory with

    model.onnx          the int8 ONNX graph
    tokenizer.json      pads to the batch's longest text, truncates at the training max_length
    labels.json         {"0": label, "1": label, ...}: the model's outputs in id order
    preprocessing.json  how training treated text; preprocess.py: slimtune's cleaning code (standard library)
    slimtune_bundle.py  the runtime (slimtune.bundle_runtime): onnxruntime, tokenizers and numpy only
    requirements.txt    the runtime's pins: the onnxruntime, tokenizers and numpy that measured the graph
    bundle.json         what is in it: each file's sha256, export's parity figures, versions, requirements
    README.md           how to run it

The bundle is written by export_onnx's own atomic write (its `finish` hook lays the directory out before the
rename), so a refusal or a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib.metadata import version
from pathlib import Path

from slimtune import bundle_runtime
from slimtune.errors import SlimtuneError
from slimtune.export import PREPROCESSING_FILE, export_onnx
from slimtune.io import atomic_write_text
from slimtune.models import read_config, resolve_model_path
from slimtune.tasks import task_of_model
from slimtune.tasks.classification import TextClassification

RUNTIME_FILE = "slimtune_bundle.py"
RUNTIME_PACKAGES = ("onnxruntime", "tokenizers", "numpy")
KEPT_FROM_EXPORT = ("model.onnx", "tokenizer.json", PREPROCESSING_FILE, "preprocess.py")


def runtime_requirements(preprocessing: dict | None = None) -> list[str]:
    """The runtime's pip pins: the versions installed here, which built and measured the graph (jieba too when
    the record segments Chinese: preprocess.py imports it then)."""
    names = RUNTIME_PACKAGES + (("jieba",) if (preprocessing or {}).get("segment_chinese") else ())
    return [f"{name}=={version(name)}" for name in names]


def write_bundle(model_dir: str | Path, out: str | Path, *, quantize: str | None = None, data: Path | None = None,
                 max_drop: float | None = None, force: bool = False, optimize: bool = True,
                 threads: int | None = None, overwrite: bool = False, sample_size: int = 1000) -> dict:
    """Write the bundle of a classifier directory to OUT; returns export's report with `bundle` (the manifest).

    `quantize`: dynamic (the default) or static (calibrated on `data`); a bundle is int8 by definition."""
    quantize = quantize or "dynamic"
    if quantize not in ("dynamic", "static"):
        raise SlimtuneError(f"--quantize {quantize!r}: a bundle is int8 by definition (dynamic, the default, or "
                            "static with --data); --format onnx writes an fp32 graph")
    path = resolve_model_path(model_dir)
    task = task_of_model(read_config(path))
    if not isinstance(task, TextClassification):
        raise SlimtuneError(f"{path}: a {task.name} model: bundles hold classifiers; use --format onnx for a "
                            "decoder")
    manifest: dict = {}

    def lay_out(tmp: Path, report: dict) -> None:
        manifest.update(_lay_out(tmp, report))

    report = export_onnx(path, out, quantize=quantize, data=data, optimize=optimize, sample_size=sample_size,
                         threads=threads, overwrite=overwrite, max_drop=max_drop, force=force, finish=lay_out)
    return report | {"bundle": manifest}


def _lay_out(tmp: Path, report: dict) -> dict:
    """Turn export's directory into the bundle: keep the graph, tokenizer and cleaning; add the rest."""
    config = json.loads((tmp / "config.json").read_text(encoding="utf-8"))
    if not (tmp / "tokenizer.json").is_file():
        raise SlimtuneError(f"{report['source']}: no fast tokenizer (tokenizer.json), which the bundle runtime "
                            "needs; save the model with a fast tokenizer")
    for entry in tmp.iterdir():  # config.json, export.json, the slow tokenizer files: bundle.json says it all
        if entry.name not in KEPT_FROM_EXPORT:
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    id2label = {int(k): str(v) for k, v in (config.get("id2label") or {}).items()}
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise SlimtuneError(f"{report['source']}: config.json's id2label {config.get('id2label')!r} does not name "
                            "outputs 0..N-1")
    labels = [id2label[i] for i in range(len(id2label))]
    atomic_write_text(tmp / "labels.json", json.dumps({str(i): label for i, label in enumerate(labels)},
                                                      indent=2, ensure_ascii=False))
    shutil.copyfile(bundle_runtime.__file__, tmp / RUNTIME_FILE)
    preprocessing = json.loads((tmp / PREPROCESSING_FILE).read_text(encoding="utf-8"))
    requirements = runtime_requirements(preprocessing)
    atomic_write_text(tmp / "requirements.txt", "\n".join(requirements) + "\n")
    atomic_write_text(tmp / "README.md", _readme(report, labels, preprocessing, requirements))
    manifest = {
        "format": "slimtune-bundle/1",
        "slimtune_version": version("slimtune"),
        "task": TextClassification.name,
        "source": report["source"],
        "labels": labels,
        "paired": preprocessing.get("text_pair_field") is not None,
        "runtime": RUNTIME_FILE,
        "requirements": requirements,
        "export": {k: v for k, v in report.items() if k != "source"},  # the int8 format and its parity figures
        "files": {p.name: {"sha256": _sha256(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())},
    }
    atomic_write_text(tmp / "bundle.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return manifest


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _readme(report: dict, labels: list[str], preprocessing: dict, requirements: list[str]) -> str:
    pair = preprocessing.get("text_pair_field") is not None
    example = '"first text<TAB>second text"' if pair else '"A gripping, funny film."'
    return f"""# slimtune bundle: {Path(report['source']).name}

A text classifier (labels: {', '.join(labels)}) as an int8 ONNX graph, with its tokenizer and the text
cleaning it was trained with. It needs Python 3.10+ and {', '.join(requirements)}: no torch, no slimtune.

```sh
python -m venv .venv && .venv/bin/pip install -r requirements.txt
# one JSON object per text: {{"label": ..., "score": ..., "probabilities": {{label: probability, ...}}}}
.venv/bin/python slimtune_bundle.py . {example}
# '-' reads one text per line from stdin{' (a TAB separates the two texts of a pair)' if pair else ''}
.venv/bin/python slimtune_bundle.py . - < texts.txt
```

In Python, with this directory on `sys.path`:

```python
from slimtune_bundle import Bundle

bundle = Bundle("path/to/this/bundle")
bundle.classify(["A gripping, funny film."]{', pairs=["its second text"]' if pair else ''})
```

The answers are `slimtune predict`'s for the same texts, computed by this int8 graph
({report.get('int8_format', 'int8')}). Measured against the torch model ({report.get('parity', '')}):
{report.get('parity_detail', '')}.

`bundle.json` lists every file with its sha256, these figures and the versions.
"""
