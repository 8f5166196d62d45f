"""The one place for filesystem outputs: atomic writes, and "cannot create / cannot write" as one line.

Every output slimtune writes (run directories, exports, packed files, unpacked models, the assembled
teacher) appears in one rename: `atomic_dir` / `atomic_write_bytes` build it under a temp name beside
its final place and remove that temp entry on any failure, so a crash or a full disk never leaves a
half-written output.

`check_output_path` runs before any work starts and turns every "this cannot be created" case (a
parent that is a file, a read-only or permission-denied parent, a file where a directory is needed)
into one `SlimtuneError` naming the path. `output_errors` does the same for filesystem errors raised
while writing (ENOSPC, EACCES, EROFS, ...), which no early check can rule out.

Imports nothing from slimtune but `slimtune.errors`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from slimtune.errors import SlimtuneError

UMASK = os.umask(0)
os.umask(UMASK)

# errno values that say "the filesystem refuses this write", not "the program is wrong": these become
# one-line user errors; any other OSError (ENOENT of a file the code expected, EBADF...) keeps its traceback.
WRITE_ERRNOS = frozenset(getattr(errno, name) for name in (
    "ENOSPC", "EDQUOT", "EACCES", "EPERM", "EROFS", "ENOTDIR", "EISDIR", "EFBIG", "EIO", "ENAMETOOLONG",
    "EMLINK", "ETXTBSY", "EEXIST", "ENOTEMPTY") if hasattr(errno, name))


def _publish_mode(path: Path) -> None:
    """mkstemp/mkdtemp create 0600/0700 entries; outputs get the usual umask-based modes."""
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~UMASK)


# --------------------------------------------------------------------------------- error conversion
def _reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextmanager
def output_errors(path: str | Path) -> Iterator[None]:
    """Turn a filesystem refusal raised inside the block (disk full, permission denied, read-only
    filesystem, a file where a directory should be...) into `SlimtuneError("PATH: cannot write (...)")`.

    Cleaning up is the job of the writers inside (atomic_dir removes its temp dir on any exception)."""
    try:
        yield
    except OSError as e:
        if e.errno not in WRITE_ERRNOS:
            raise
        raise SlimtuneError(f"{path}: cannot write ({_reason(e)})") from None


# ------------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success it replaces `final` in one rename.

    On any exception the temp dir is removed (and `final`, if it existed, is left as it was)."""
    final = Path(final)
    with output_errors(final):
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            yield tmp
            _publish_mode(tmp)
            if final.exists():
                old = final.with_name(f".{final.name}.old-{os.getpid()}")
                os.replace(final, old)
                try:
                    os.replace(tmp, final)
                except BaseException:
                    os.replace(old, final)  # put the previous output back
                    raise
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Path, content: bytes) -> None:
    """Write `content` to a temp file beside `path`, then rename it over `path`."""
    path = Path(path)
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(content)
            _publish_mode(Path(tmp))
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


# ------------------------------------------------------------------------------- before any work
def check_output_path(path: str | Path, *, kind: str = "directory") -> Path:
    """Refuse, before any work starts, an output `path` (a directory or a file) that cannot be created.

    Checks: no parent component is a file; a directory output is not an existing file and a file output
    not an existing directory; the directory that will receive it (and an existing output directory
    itself) accepts new entries. The last is probed for real: missing parents are created, a temp file
    is created and removed in them, then the parents created here are removed again, so nothing is left
    behind (root bypasses permission bits, and a read-only mount only shows on a write).
    Returns the absolute path. Existence / --overwrite policy is the caller's business.
    """
    if kind not in ("directory", "file"):
        raise ValueError(f"kind must be 'directory' or 'file', not {kind!r}")
    path = Path(path).expanduser().absolute()
    if path.exists() or path.is_symlink():
        if kind == "directory" and not path.is_dir():
            raise SlimtuneError(f"{path}: output path exists and is not a directory")
        if kind == "file" and path.is_dir():
            raise SlimtuneError(f"{path}: output path is a directory (a file is written there)")
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SlimtuneError(f"{path}: cannot be created ({ancestor} is a file, not a directory)")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SlimtuneError(f"{path}: cannot be created (permission denied on {ancestor})")
    targets = [path.parent] + ([path] if kind == "directory" and path.is_dir() else [])
    created: list[Path] = []
    try:
        missing = []
        p = path.parent
        while not p.exists():
            missing.append(p)
            p = p.parent
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
        for target in targets:
            fd, probe = tempfile.mkstemp(prefix=".slimtune-probe-", dir=target)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        where = e.filename or path.parent
        raise SlimtuneError(f"{path}: cannot be created ({_reason(e)}: {where})") from None
    finally:
        for p in reversed(created):
            try:
                p.rmdir()
            except OSError:
                pass
    return path
