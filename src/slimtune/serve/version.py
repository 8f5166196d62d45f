"""The version a served model answers with."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path


def model_version(path: Path) -> str:
    """`version.json`'s version (what `slimtune learn` writes), else the directory's name and a short hash
    of its files' names, sizes and modification times: a rewritten model gets a new version."""
    record = path / "version.json"
    if record.is_file():
        try:
            version = json.loads(record.read_text(encoding="utf-8")).get("version")
        except (OSError, ValueError, AttributeError):
            version = None
        if isinstance(version, str) and version:
            return version
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return f"{path.name}@{digest.hexdigest()[:8]}"
