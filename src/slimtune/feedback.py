"""The feedback store: corrected labels collected while a model serves, for `slimtune learn`.

One SQLite file in WAL mode. The server writes (`add`, from its worker threads: one connection guarded
by a lock), `slimtune learn` reads (`readonly=True`: it never changes the store, so an interrupted learn
leaves it as it was). WAL lets the reader run while the writer commits.

Ids come from AUTOINCREMENT, so they only grow and are never reused: "the rows after id N" is what a
model version records as consumed, and stays meaningful whatever happens to older rows. The `meta`
table holds the schema version and a random `store_id`, so a version knows which store its ids refer to
(a moved or copied file keeps it; a new store gets a new one).

Standard library only (and slimtune.errors): the server imports this on a path that never imports torch.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from slimtune.errors import SlimtuneError

SCHEMA_VERSION = "1"
COLUMNS = ("id", "text", "pair", "predicted", "label", "model_version", "created_at")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    text TEXT NOT NULL,
    pair TEXT,
    predicted TEXT,
    label TEXT NOT NULL,
    model_version TEXT,
    created_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class FeedbackRow:
    id: int
    text: str
    pair: str | None
    predicted: str | None
    label: str
    model_version: str | None
    created_at: float  # unix time


class FeedbackStore:
    """`FeedbackStore(path)` creates the file and its schema if needed; `readonly=True` only opens an
    existing store (and can never write it). A file that is not a feedback store is one `SlimtuneError`
    naming it. Usable as a context manager."""

    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path).expanduser()
        self.readonly = readonly
        self._lock = threading.Lock()
        if readonly and not self.path.is_file():
            raise SlimtuneError(f"{self.path}: no such feedback store")
        if not readonly and self.path.exists() and not self.path.is_file():
            raise SlimtuneError(f"{self.path}: is not a file (a feedback store is one SQLite file)")
        try:
            if readonly:
                uri = f"{self.path.resolve().as_uri()}?mode=ro"
                self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None,
                                             timeout=30)
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None,
                                             timeout=30)
        except (sqlite3.Error, OSError) as e:
            raise SlimtuneError(f"{self.path}: cannot open the feedback store ({e})") from None
        try:
            self._open()
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise SlimtuneError(f"{self.path}: not a slimtune feedback store ({' '.join(str(e).split())})") from None
        except SlimtuneError:
            self._conn.close()
            raise

    def _open(self) -> None:
        conn = self._conn
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not self.readonly:
            others = tables - {"feedback", "meta", "sqlite_sequence"}
            if others:  # someone else's database: change nothing in it
                raise SlimtuneError(f"{self.path}: a SQLite database with other tables ({', '.join(sorted(others))}), "
                                    "not a slimtune feedback store")
            # WAL: readers (slimtune learn) never block the server's writes. synchronous=FULL, not NORMAL:
            # in WAL mode NORMAL survives a killed process but may lose the last commits on a power cut or an
            # OS crash (the WAL is not fsynced at each commit); FULL fsyncs it at every commit, so a row
            # `add` returned is on disk whatever crashes next. One fsync per feedback row is cheap here.
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SlimtuneError(f"{self.path}: cannot switch the feedback store to WAL mode (journal mode "
                                    f"stays {mode})")
            conn.execute("PRAGMA synchronous=FULL")
            if "feedback" not in tables or "meta" not in tables:  # one transaction: all of the schema or none
                conn.executescript(f"BEGIN IMMEDIATE;{_SCHEMA}INSERT OR IGNORE INTO meta (key, value) VALUES "
                                   f"('schema_version', '{SCHEMA_VERSION}'), ('store_id', '{uuid.uuid4().hex}');"
                                   "COMMIT;")
                tables |= {"feedback", "meta"}
        if "feedback" not in tables:
            raise SlimtuneError(f"{self.path}: not a slimtune feedback store (no table 'feedback')")
        columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(feedback)"))
        if set(columns) != set(COLUMNS):
            raise SlimtuneError(f"{self.path}: not a slimtune feedback store (table 'feedback' has columns "
                                f"{', '.join(columns)}; expected {', '.join(COLUMNS)})")
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
        if meta.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise SlimtuneError(f"{self.path}: feedback store schema version {meta['schema_version']}; this "
                                f"slimtune reads version {SCHEMA_VERSION}")
        self.store_id: str | None = meta.get("store_id")

    # ---------------------------------------------------------------------------------------- writes
    def add(self, text: str, label: str, predicted: str | None = None, model_version: str | None = None,
            pair: str | None = None) -> int:
        """Store one corrected example; committed (and synced to disk) before it returns the row's id."""
        if self.readonly:
            raise SlimtuneError(f"{self.path}: the feedback store was opened read-only")
        if not isinstance(text, str) or not text:
            raise SlimtuneError("feedback: text must be a non-empty string")
        if not isinstance(label, str) or not label.strip():
            raise SlimtuneError("feedback: label must be a non-empty string")
        for name, value in (("predicted", predicted), ("model_version", model_version), ("pair", pair)):
            if value is not None and not isinstance(value, str):
                raise SlimtuneError(f"feedback: {name} must be a string or null")
        with self._lock:
            # autocommit connection: the INSERT is its own transaction, committed when execute returns
            cur = self._conn.execute(
                "INSERT INTO feedback (text, pair, predicted, label, model_version, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)", (text, pair, predicted, label, model_version, time.time()))
            return int(cur.lastrowid)

    # ----------------------------------------------------------------------------------------- reads
    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def count(self, after_id: int = 0) -> int:
        return int(self._query("SELECT COUNT(*) FROM feedback WHERE id > ?", (after_id,))[0][0])

    def rows(self, after_id: int = 0, limit: int | None = None) -> list[FeedbackRow]:
        """The rows with an id above `after_id`, oldest first (at most `limit`)."""
        found = self._query(f"SELECT {', '.join(COLUMNS)} FROM feedback WHERE id > ? ORDER BY id LIMIT ?",
                            (after_id, -1 if limit is None else limit))
        return [FeedbackRow(*row) for row in found]

    def last_id(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(id), 0) FROM feedback")[0][0])

    def disagreement(self, last: int = 500) -> tuple[int, float | None]:
        """Among the last `last` rows that carry a prediction: (how many, share whose prediction was not
        the label); (0, None) when there are none."""
        n, wrong = self._query("SELECT COUNT(*), SUM(predicted != label) FROM (SELECT predicted, label FROM feedback "
                               "WHERE predicted IS NOT NULL ORDER BY id DESC LIMIT ?)", (last,))[0]
        return (int(n), float(wrong) / n) if n else (0, None)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> FeedbackStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
