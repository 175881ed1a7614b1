"""The embedded backend: one SQLite file in WAL mode.

Concurrency: several processes may open one file; every write is a ``BEGIN
IMMEDIATE`` transaction (SQLite's file lock), so one writer at a time extends the chain
and readers see a consistent snapshot. Deletions and updates are refused by
triggers, which stops accidents, not an attacker with write access to the file.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from riskpipe.ledger import facts
from riskpipe.ledger.chain import GENESIS, LedgerError, LedgerUnavailable
from riskpipe.ledger.conn import Db, Row
from riskpipe.ledger.inputs import table_statements as input_tables
from riskpipe.ledger.migrations import Step, chain_tables, checkpoint_tables, entries_table, migrate, scope_sql
from riskpipe.ledger.store import Ledger
from riskpipe.ledger.tree import build_existing, tree_tables


def _text_at(path: str, column: str = "record") -> str:
    """A string field of the record in ``column`` ('' when absent or not a string)."""
    return f"CASE WHEN json_type({column}, '$.{path}') = 'text' THEN json_extract({column}, '$.{path}') ELSE '' END"


def _number_at(path: str) -> str:
    """A numeric field of the record (NULL when absent or not a number)."""
    return f"CASE WHEN json_type(record, '$.{path}') IN ('integer', 'real') THEN json_extract(record, '$.{path}') END"


def _append_only(*tables: str, if_not_exists: bool = False) -> list[str]:
    """Triggers that refuse UPDATE and DELETE on each of ``tables``."""
    guard = "IF NOT EXISTS " if if_not_exists else ""
    return [f"""CREATE TRIGGER {guard}{t}_no_{op} BEFORE {op.upper()} ON {t}
            BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END""" for t in tables for op in ("update", "delete")]


STEPS: list[Step] = [
    (1, [  # riskpipe 0.1
        *chain_tables("INTEGER"),
        f"INSERT OR IGNORE INTO chain_state (id, count, head) VALUES (1, 0, '{GENESIS}')",
        "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
        *_append_only("entries", if_not_exists=True),
    ]),
    (2, [  # signed checkpoints; entry ids looked up without the kind (the de-duplication query)
        *checkpoint_tables("id INTEGER PRIMARY KEY", "INTEGER"),
        *_append_only("checkpoints"),
        "DELETE FROM meta WHERE key = 'schema_version'",
    ]),
    (3, [  # the RFC 9162 Merkle tree over the rows, and C2SP signed notes (checkpoints)
        *tree_tables("INTEGER"),
        *_append_only("tree_nodes", "signed_notes"),
        build_existing,
    ]),
    (4, [  # decision identity: unique (kind, entry_id, scope); SQLite changes a constraint by rebuilding
        entries_table("INTEGER", scope=True, name="entries_v4"),
        "INSERT INTO entries_v4 (seq, kind, entry_id, ts, record, prev_hash, hash, scope) "
        f"SELECT seq, kind, entry_id, ts, record, prev_hash, hash, {scope_sql(_text_at)} FROM entries ORDER BY seq",
        "DROP TABLE entries",  # its indexes and triggers go with it; recreated below
        "ALTER TABLE entries_v4 RENAME TO entries",
        "CREATE INDEX entries_kind_ts ON entries (kind, ts)",
        "CREATE INDEX entries_entry_id ON entries (entry_id)",
        *_append_only("entries"),
    ]),
    (5, [  # inputs stored once, by digest (riskpipe.ledger.inputs)
        *input_tables("BLOB"),
        *_append_only("inputs"),
    ]),
    (6, [  # the facts the report and the review queue aggregate and filter in SQL (riskpipe.ledger.facts)
        *facts.table_statements("INTEGER", "REAL"),
        *_append_only("facts"),
        facts.build_existing,
    ]),
    (7, facts.v7_statements(  # p_lower, group codes and hourly counts: the report's cost stays flat
        "INTEGER", "REAL", _number_at, unlock=["DROP TRIGGER facts_no_update", "DROP TRIGGER facts_no_delete"],
        lock=_append_only("facts"))),
    (8, facts.v8_statements()),  # a filtered or scoped queue page reads its groups' ranges
]


class _Conn:
    """sqlite3 with the wrapper interface the store uses (``?`` placeholders natively)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, params: Row = ()) -> sqlite3.Cursor:
        return self.db.execute(sql, params)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        self.db.executemany(sql, rows)

    def close(self) -> None:
        self.db.close()


class _Busy(Exception):
    """Opening raced another process holding the file's lock."""


def _has_table(db: Db | sqlite3.Connection, name: str) -> bool:
    return db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


class SqliteLedger(Ledger):
    """The ledger in one SQLite file (created if absent unless ``create=False``)."""

    backend = "sqlite"
    record_bytes = "CAST(record AS BLOB)"
    tree_nodes_check = ("SELECT group_concat(hash, ''), count(*), sum(CASE WHEN typeof(last) = 'integer' "
                        "AND typeof(level) = 'integer' AND typeof(hash) = 'text' AND length(hash) = 64 "
                        "AND level BETWEEN 0 AND 62 THEN CASE WHEN (last + 1) % (1 << level) = 0 THEN 0 ELSE 1 END "
                        "ELSE 1 END) FROM (SELECT last, level, hash FROM tree_nodes WHERE last >= ? AND last < ? "
                        "ORDER BY last, level)")
    number_at = staticmethod(_number_at)
    text_at = staticmethod(_text_at)
    _db: _Conn | None

    def __init__(self, path: str | Path, *, timeout: float = 30.0, synchronous: str = "FULL",
                 create: bool = True) -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise LedgerError(f"synchronous: must be OFF, NORMAL, FULL or EXTRA; got {synchronous!r}")
        path = str(path)
        self.path = Path(path[len("sqlite:///"):] if path.startswith("sqlite:///") else path)
        if not create and not self.path.is_file():
            raise LedgerError(f"ledger {self.path}: " + ("not a file" if self.path.exists() else "file not found"))
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._init_lock()
        self._db = None
        self.timeout, self.synchronous = timeout, synchronous
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._open(create)
                return
            except _Busy:
                # two processes opening a new ledger at once: the switch to WAL mode does not
                # wait on SQLite's busy handler, so the loser retries until ``timeout``
                if time.monotonic() >= deadline:
                    # another writer holds the file: the same open may succeed later (infrastructure)
                    raise LedgerUnavailable(f"{self.path}: not a usable ledger (database is locked)") from None
                time.sleep(0.05)

    def _open(self, create: bool) -> None:
        try:
            self._db = self._connect()
            raw = self._db.db
            if not create and not _has_table(raw, "entries"):  # never turn a stray file into an empty ledger
                self.close()
                raise LedgerError(f"ledger {self.path}: holds no ledger tables (an empty file, another SQLite "
                                  f"database, or a copy of a WAL-mode ledger made without its -wal file)")
            if not _has_table(raw, "entries"):  # never add ledger tables to another application's database
                others = [r[0] for r in raw.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")]
                if others:
                    self.close()
                    raise LedgerError(f"ledger {self.path}: another SQLite database (tables "
                                      f"{', '.join(others[:5])}{', ...' if len(others) > 5 else ''}), not a ledger; "
                                      "give a new file or an existing ledger")
            mode = raw.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{self.path}: could not switch to WAL mode (got {mode})")
            raw.execute(f"PRAGMA synchronous = {self.synchronous}")
            with self._write() as db:
                self.schema_version = migrate(db, STEPS, _has_table, str(self.path))
        except sqlite3.DatabaseError as exc:
            self.close()
            if isinstance(exc, sqlite3.OperationalError) and "database is locked" in str(exc):
                raise _Busy from None
            raise LedgerError(f"{self.path}: not a usable ledger ({exc})") from None

    def _connect(self) -> _Conn:
        raw = sqlite3.connect(str(self.path), timeout=self.timeout, isolation_level=None, check_same_thread=False)
        raw.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
        if self._db is not None:  # a second connection (``Ledger.another_connection``); WAL is the file's mode
            raw.execute(f"PRAGMA synchronous = {self.synchronous}")
        return _Conn(raw)

    @contextmanager
    def _txn(self, begin: str) -> Iterator[Db]:
        with self._conn() as db:
            db.execute(begin)
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _write(self) -> AbstractContextManager[Db]:
        return self._txn("BEGIN IMMEDIATE")

    def _read(self) -> AbstractContextManager[Db]:
        return self._txn("BEGIN")

    def ping(self) -> None:
        """Raise unless the ledger answers a read inside a write transaction: ``BEGIN
        IMMEDIATE`` takes the file's write lock, which a read-only file, a disk remounted
        read-only or ``query_only`` refuses (SQLITE_READONLY) while reads still answer, so a
        read alone ended the stage's outage at each quiet poll and its
        ``infrastructure_timeout_s`` clock restarted for ever. Nothing is written."""
        with self._write() as db:
            db.execute("SELECT count FROM chain_state WHERE id = 1").fetchone()

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"SqliteLedger({str(self.path)!r})"
