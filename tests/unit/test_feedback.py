"""The feedback store: rows round-trip, WAL with a full sync, many writer threads, committed rows survive a
killed writer, a file that is not a store is one line, and it imports without torch."""

import os
import sqlite3
import subprocess
import sys
import textwrap
import threading

import pytest

from slimtune.errors import SlimtuneError
from slimtune.feedback import FeedbackRow, FeedbackStore


def test_rows_round_trip(tmp_path):
    db = tmp_path / "sub" / "fb.db"
    with FeedbackStore(db) as store:
        assert (store.count(), store.last_id(), store.rows(), store.disagreement()) == (0, 0, [], (0, None))
        first = store.add("a fine film", "positive", predicted="negative", model_version="v0001")
        second = store.add("dull", "negative", predicted="negative", pair="second text")
        third = store.add("no prediction", "positive")
        assert (first, second, third) == (1, 2, 3)
    with FeedbackStore(db, readonly=True) as store:
        rows = store.rows()
        assert [r.id for r in rows] == [1, 2, 3] and isinstance(rows[0], FeedbackRow)
        assert (rows[0].text, rows[0].label, rows[0].predicted, rows[0].model_version, rows[0].pair) == (
            "a fine film", "positive", "negative", "v0001", None)
        assert rows[1].pair == "second text" and rows[2].predicted is None
        assert isinstance(rows[0].created_at, float) and rows[0].created_at <= rows[2].created_at
        assert store.count(after_id=1) == 2 and [r.id for r in store.rows(after_id=1, limit=1)] == [2]
        assert store.last_id() == 3
        assert store.disagreement() == (2, 0.5)  # the row without a prediction does not count
        assert store.disagreement(last=1) == (1, 0.0)  # the last row with a prediction agreed
        assert store.store_id and len(store.store_id) == 32
        with pytest.raises(SlimtuneError, match="read-only"):
            store.add("x", "positive")
    with pytest.raises(SlimtuneError, match="label must be a non-empty string"):
        FeedbackStore(db).add("text", "  ")


def test_ids_are_never_reused(tmp_path):
    db = tmp_path / "fb.db"
    with FeedbackStore(db) as store:
        store.add("a", "x")
        store.add("b", "x")
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM feedback WHERE id = 2")
    with FeedbackStore(db) as store:
        assert store.add("c", "x") == 3  # AUTOINCREMENT: "after id N" keeps its meaning


def test_wal_and_full_sync(tmp_path):
    db = tmp_path / "fb.db"
    store = FeedbackStore(db)
    store.add("a", "x")
    assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # stored in the file
    conn.close()
    reader = FeedbackStore(db, readonly=True)  # a reader while the writer holds the file open
    store.add("b", "x")
    assert reader.count() == 2
    reader.close()
    store.close()


def test_concurrent_adds_from_threads(tmp_path):
    store = FeedbackStore(tmp_path / "fb.db")
    ids: list[int] = []
    lock = threading.Lock()

    def worker(n: int):
        for i in range(40):
            row = store.add(f"text {n}-{i}", "positive" if i % 2 else "negative", predicted="positive")
            with lock:
                ids.append(row)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(ids) == list(range(1, 321)) and store.count() == 320
    assert {r.text for r in store.rows()} == {f"text {n}-{i}" for n in range(8) for i in range(40)}
    store.close()


def test_committed_rows_survive_a_killed_writer(tmp_path):
    db = tmp_path / "fb.db"
    script = textwrap.dedent(f"""
        import os, signal
        from slimtune.feedback import FeedbackStore
        store = FeedbackStore({str(db)!r})
        for i in range(25):
            store.add(f"row {{i}}", "positive")
        print("added", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)  # no close, no checkpoint: the rows are only in the WAL
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == -9 and "added" in result.stdout, result.stderr
    assert (tmp_path / "fb.db-wal").is_file()
    with FeedbackStore(db, readonly=True) as store:
        assert store.count() == 25 and store.rows()[-1].text == "row 24"
    with FeedbackStore(db) as store:  # and the writer carries on after it
        assert store.add("after the crash", "negative") == 26


def test_a_file_that_is_not_a_store_is_one_line_naming_it(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database\n" * 200)
    for readonly in (False, True):
        with pytest.raises(SlimtuneError) as e:
            FeedbackStore(junk, readonly=readonly)
        assert str(junk) in str(e.value) and "not a slimtune feedback store" in str(e.value)
        assert "\n" not in str(e.value)
    assert junk.read_bytes() == b"this is not a database\n" * 200  # left as it was

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE users (name TEXT)")
    with pytest.raises(SlimtuneError, match=r"other.db: a SQLite database with other tables \(users\)"):
        FeedbackStore(other)
    wrong = tmp_path / "wrong.db"
    with sqlite3.connect(wrong) as conn:
        conn.execute("CREATE TABLE feedback (id INTEGER PRIMARY KEY, text TEXT)")
    with pytest.raises(SlimtuneError, match="wrong.db: not a slimtune feedback store .table 'feedback' has columns"):
        FeedbackStore(wrong, readonly=True)
    with pytest.raises(SlimtuneError, match="missing.db: no such feedback store"):
        FeedbackStore(tmp_path / "missing.db", readonly=True)
    assert not (tmp_path / "missing.db").exists()
    with pytest.raises(SlimtuneError, match="is not a file"):
        FeedbackStore(tmp_path)


def test_imports_without_torch():
    code = "import sys, slimtune.feedback; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ}, timeout=60).returncode == 0
