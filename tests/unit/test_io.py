"""slimtune.io: atomic outputs, output paths refused before any work, filesystem refusals as one line."""

import errno
import os

import pytest

from slimtune.errors import SlimtuneError
from slimtune.io import atomic_dir, atomic_write_bytes, check_output_path, output_errors


def test_a_path_under_a_file_is_refused_naming_both(tmp_path):
    (tmp_path / "f").write_text("x")
    for kind in ("directory", "file"):
        with pytest.raises(SlimtuneError) as e:
            check_output_path(tmp_path / "f" / "a" / "b", kind=kind)
        assert str(tmp_path / "f" / "a" / "b") in str(e.value) and f"{tmp_path / 'f'} is a file" in str(e.value)


def test_existing_entries_of_the_wrong_kind_are_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    (tmp_path / "d").mkdir()
    with pytest.raises(SlimtuneError, match="exists and is not a directory"):
        check_output_path(tmp_path / "f", kind="directory")
    with pytest.raises(SlimtuneError, match="is a directory"):
        check_output_path(tmp_path / "d", kind="file")
    assert check_output_path(tmp_path / "d") == tmp_path / "d"  # an existing directory: the caller's policy
    assert check_output_path(tmp_path / "f", kind="file") == tmp_path / "f"


def test_missing_parents_are_probed_and_removed_again(tmp_path):
    assert check_output_path(tmp_path / "a" / "b" / "out") == tmp_path / "a" / "b" / "out"
    assert list(tmp_path.iterdir()) == []  # nothing created by the check is left


@pytest.mark.skipif(os.geteuid() == 0, reason="root bypasses permission bits")
def test_a_read_only_parent_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        with pytest.raises(SlimtuneError, match="permission denied"):
            check_output_path(ro / "out")
    finally:
        ro.chmod(0o700)


def test_a_refused_probe_is_one_line(tmp_path, monkeypatch):
    """What a read-only mount or a full disk does to the probe (root passes os.access everywhere)."""
    import tempfile

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(SlimtuneError) as e:
        check_output_path(tmp_path / "new" / "out")
    assert "Read-only file system" in str(e.value) and str(tmp_path / "new" / "out") in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_output_errors_turn_filesystem_refusals_into_one_line_and_keep_real_bugs():
    with pytest.raises(SlimtuneError, match=r"^out: cannot write \(No space left on device\)$"):
        with output_errors("out"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(FileNotFoundError):  # not a refusal of the filesystem: the traceback stays
        with output_errors("out"):
            raise FileNotFoundError(errno.ENOENT, "no such file", "x")


def test_a_full_disk_inside_atomic_dir_leaves_nothing_and_keeps_the_previous_output(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    with pytest.raises(SlimtuneError, match="cannot write"):
        with atomic_dir(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x" * 10)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "old.txt").read_text() == "previous"


def test_a_failed_rename_restores_the_previous_output(tmp_path, monkeypatch):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("previous")
    real = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SlimtuneError, match="cannot write"):
        with atomic_dir(final) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (final / "old.txt").read_text() == "previous"


def test_atomic_write_bytes_leaves_no_temp_file_on_failure(tmp_path, monkeypatch):
    real = os.fdopen

    class Full:
        def __init__(self, fd, mode):
            self.f = real(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(SlimtuneError, match=r"p.bin: cannot write \(No space left on device\)"):
        atomic_write_bytes(tmp_path / "p.bin", b"data")
    assert list(tmp_path.iterdir()) == []
