"""Versioned schema: ordered migration steps, applied once each, recorded in ``schema_version``.

Each backend lists its steps as ``(version, [statements])``. Opening a ledger brings
its schema up to the newest version inside the backend's write transaction (so two
processes opening a fresh ledger at once do not both migrate it). Ledgers written
before ``schema_version`` existed (riskpipe 0.1, schema 1: version in ``meta``) are
recognised by their ``entries`` table and upgraded from there.
"""

from __future__ import annotations

from collections.abc import Callable

from riskpipe.ledger.chain import LedgerError
from riskpipe.ledger.conn import Db
from riskpipe.timestamps import iso_seconds

# (version, [SQL text, or a callable(db) for work SQL cannot express])
Step = tuple[int, list[str | Callable[[Db], None]]]
HasTable = Callable[[Db, str], bool]  # has_table(db, name): the backend's test for a table

def entries_table(int_type: str, *, scope: bool = False, name: str = "entries") -> str:
    """The ``entries`` table (the hash-chained rows): schema 1's, or with ``scope`` schema
    4's, unique by (kind, entry_id, scope) (decision identity), which SQLite builds as a new
    table under another ``name`` and renames."""
    scope_column = "\n            scope     TEXT NOT NULL DEFAULT ''," if scope else ""
    return f"""CREATE TABLE IF NOT EXISTS {name} (
            seq       {int_type} PRIMARY KEY,
            kind      TEXT NOT NULL,
            entry_id  TEXT NOT NULL,
            ts        TEXT,
            record    TEXT NOT NULL,
            prev_hash TEXT NOT NULL,
            hash      TEXT NOT NULL,{scope_column}
            UNIQUE (kind, entry_id{", scope" if scope else ""}))"""


def chain_tables(int_type: str) -> list[str]:
    """Schema 1's tables, the same on every backend but for the integer type
    (SQLite: INTEGER, so ``seq`` is the rowid; PostgreSQL: BIGINT)."""
    return [
        entries_table(int_type),
        "CREATE INDEX IF NOT EXISTS entries_kind_ts ON entries (kind, ts)",
        f"""CREATE TABLE IF NOT EXISTS chain_state (
            id    INTEGER PRIMARY KEY CHECK (id = 1),
            count {int_type} NOT NULL,
            head  TEXT NOT NULL)""",
    ]


def checkpoint_tables(id_column: str, int_type: str) -> list[str]:
    """Schema 2's signed-checkpoint table and the entry-id index."""
    return [
        f"""CREATE TABLE checkpoints (
            {id_column},
            count      {int_type} NOT NULL,
            head       TEXT NOT NULL,
            ts         TEXT NOT NULL,
            key_id     TEXT NOT NULL,
            public_key TEXT NOT NULL,
            signature  TEXT NOT NULL)""",
        "CREATE INDEX IF NOT EXISTS entries_entry_id ON entries (entry_id)",
    ]


def scope_sql(text_at: Callable[[str], str]) -> str:
    """Schema 3's ``scope`` of an existing row, in SQL, as ``chain.decision_scope`` computes
    it: ``text_at("policy.sha256")`` is the backend's expression for a string field of
    ``record`` ('' when it is absent or not a string)."""
    parts = " || '/' || ".join(text_at(p) for p in ("policy.sha256", "model.sha256", "model.name"))
    return f"CASE WHEN kind = 'decision' THEN {parts} ELSE '' END"


VERSION_TABLE = "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"


def latest(steps: list[Step]) -> int:
    return steps[-1][0]


def current_version(db: Db, has_table: HasTable) -> int:
    """The schema version of an open database (0: empty)."""
    row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
    if row and row[0] is not None:
        return int(row[0])
    if not has_table(db, "entries"):
        return 0
    if has_table(db, "meta"):  # riskpipe 0.1 kept the version in meta
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row:
            return int(row[0])
    return 1


def migrate(db: Db, steps: list[Step], has_table: HasTable, where: str) -> int:
    """Apply the steps newer than the database's version; returns the final version."""
    versions = [v for v, _ in steps]
    if versions != sorted(set(versions)) or versions[0] != 1:
        raise AssertionError("migration steps must be numbered 1, 2, ... in order")
    db.execute(VERSION_TABLE)
    have = current_version(db, has_table)
    if have > latest(steps):
        raise LedgerError(f"{where}: ledger schema version {have} is newer than this riskpipe supports "
                          f"({latest(steps)}): upgrade riskpipe")
    now = iso_seconds()
    if have and not db.execute("SELECT 1 FROM schema_version WHERE version = ?", (have,)).fetchone():
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (have, "before-versioning"))
    for version, statements in steps:
        if version <= have:
            continue
        for stmt in statements:
            stmt(db) if callable(stmt) else db.execute(stmt)
        db.execute("INSERT INTO schema_version (version, applied_at) VALUES (?, ?)", (version, now))
    return latest(steps)
