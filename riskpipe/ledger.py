"""Append-only, hash-chained ledger of decisions, review verdicts, policy changes and
dead letters (SQLite, WAL mode).

Chain
-----
Rows are numbered ``seq = 1, 2, 3, ...`` without gaps. Each row stores its canonical
record (``docs/records.md``: ``json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)``), the previous row's hash and its own hash::

    hash(row) = sha256( prev_hash       # 64 lowercase hex ASCII bytes; GENESIS for seq 1
                        + b"\\n" + kind     # UTF-8, e.g. b"decision"
                        + b"\\n" + entry_id # UTF-8, no control characters
                        + b"\\n" + record ) # canonical JSON, UTF-8
    GENESIS = "0" * 64

``kind`` and ``entry_id`` are inside the hash so that relabelling a row is caught too;
neither may contain a newline, so the layout is unambiguous. Anyone can recompute
the chain from an export (``riskpipe ledger export``) with nothing but sha256.

What ``verify`` detects
-----------------------
* an edited row (record, kind, id or ts column): its hash no longer matches;
* a deleted row: a gap in ``seq`` or a ``prev_hash`` that no longer links;
* an inserted or reordered row: its ``prev_hash`` does not link to the row before it
  (an insert whose hash the forger recomputed breaks the link of the row after it);
* a truncated tail: the ``chain_state`` table (count and head, updated in the same
  transaction as every append) disagrees with the rows.

Limits: the hash chain is not a signature. Someone who can write the file and knows
this layout can rewrite the tail and recompute every hash and ``chain_state``; only a
head published elsewhere catches that. Print it with ``riskpipe ledger head``, sign or
anchor it, and later run ``verify(expect_head=..., expect_count=...)``: the anchored
head must still be the hash of row ``expect_count`` (the ledger may have grown since).
Deletions and updates are also refused by SQLite triggers, which stops accidents, not
an attacker with file access.

Concurrency: several processes may open one ledger; every write is a ``BEGIN
IMMEDIATE`` transaction, so one writer at a time extends the chain and readers see a
consistent snapshot (WAL).
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

GENESIS = "0" * 64
SCHEMA_VERSION = 1
KINDS = ("decision", "verdict", "policy", "dlq")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq       INTEGER PRIMARY KEY,
    kind      TEXT NOT NULL,
    entry_id  TEXT NOT NULL,
    ts        TEXT,
    record    TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash      TEXT NOT NULL,
    UNIQUE (kind, entry_id)
);
CREATE INDEX IF NOT EXISTS entries_kind_ts ON entries (kind, ts);
CREATE TABLE IF NOT EXISTS chain_state (
    id    INTEGER PRIMARY KEY CHECK (id = 1),
    count INTEGER NOT NULL,
    head  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'ledger is append-only'); END;
"""


class LedgerError(ValueError):
    """A record or argument the ledger cannot accept (message names field and reason)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    entry_id: str
    ts: str | None
    record: dict
    prev_hash: str
    hash: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head: str
    first_bad_seq: int | None = None
    reason: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def canonical_json(record: Any) -> str:
    """The canonical JSON text of ``record`` (docs/records.md)."""
    try:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"record: not canonical JSON ({exc})") from None


def entry_hash(prev_hash: str, kind: str, entry_id: str, canonical_record: str) -> str:
    """sha256 over the byte layout documented in the module docstring."""
    h = hashlib.sha256()
    h.update(prev_hash.encode("ascii"))
    for part in (kind, entry_id, canonical_record):
        h.update(b"\n")
        h.update(part.encode("utf-8"))
    return h.hexdigest()


def parse_ts(value: Any, field: str = "ts") -> datetime:
    """RFC 3339 / ISO 8601 text or datetime -> aware UTC datetime (naive means UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise LedgerError(f"{field}: not an RFC 3339 time: {value!r}") from None
    else:
        raise LedgerError(f"{field}: expected an RFC 3339 time, got {type(value).__name__}")
    return dt.replace(tzinfo=timezone.utc) if dt.tzinfo is None else dt.astimezone(timezone.utc)


def _check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise LedgerError(f"kind: must be a short lowercase name such as {', '.join(KINDS)}; got {kind!r}")
    return kind


def _check_entry_id(entry_id: Any) -> str:
    if not isinstance(entry_id, str) or not entry_id or len(entry_id) > 512 or _CONTROL_RE.search(entry_id):
        raise LedgerError(
            f"id: must be a non-empty string of at most 512 characters without control characters; got {entry_id!r}"
        )
    return entry_id


def check_chain(rows: Iterable[tuple], expect_head: str | None = None):
    """Walk ``(seq, kind, entry_id, ts, record_text, prev_hash, hash)`` rows in order.

    Returns ``(n_good, head, bad, anchored_seq)``: the number of rows that check out,
    the hash of the last good row, ``(first_bad_seq, reason)`` or None, and the seq
    whose hash equals ``expect_head`` (None if not seen).
    """
    prev, n, anchored_seq = GENESIS, 0, None
    for seq, kind, eid, ts, text, prev_hash, stored in rows:
        expected_seq = n + 1
        if seq != expected_seq:
            return n, prev, (expected_seq, f"row {expected_seq} is missing (next row is seq {seq}): deleted"), anchored_seq
        problem = None
        if prev_hash != prev:
            problem = f"row {seq} does not link to row {seq - 1} (prev_hash mismatch): deleted, inserted or reordered"
        else:
            try:
                record = json.loads(text)
            except (TypeError, ValueError):
                record, problem = None, f"row {seq}: stored record is not JSON (edited)"
            if problem is None and canonical_json(record) != text:
                problem = f"row {seq}: stored record is not canonical JSON (edited)"
            elif problem is None and entry_hash(prev, kind, eid, text) != stored:
                problem = f"row {seq}: hash mismatch (record, kind or id edited)"
            elif problem is None and ts != (record.get("ts") if isinstance(record, dict) else None):
                problem = f"row {seq}: ts column {ts!r} differs from the record's ts (edited)"
        if problem:
            return n, prev, (seq, problem), anchored_seq
        n, prev = seq, stored
        if expect_head is not None and stored == expect_head:
            anchored_seq = seq
    return n, prev, None, anchored_seq


def _row_to_entry(row: tuple) -> Entry:
    seq, kind, entry_id, ts, record, prev_hash, hash_ = row
    return Entry(seq, kind, entry_id, ts, json.loads(record), prev_hash, hash_)


class Ledger:
    """Append-only hash-chained ledger in one SQLite file. Use as a context manager."""

    def __init__(self, path: str | Path, *, timeout: float = 30.0, synchronous: str = "FULL") -> None:
        if synchronous not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise LedgerError(f"synchronous: must be OFF, NORMAL, FULL or EXTRA; got {synchronous!r}")
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None, check_same_thread=False)
            self._db.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise LedgerError(f"{self.path}: could not switch to WAL mode (got {mode})")
            self._db.execute(f"PRAGMA synchronous = {synchronous}")
            with self._write():
                for stmt in filter(str.strip, _SCHEMA.split(";\n")):
                    self._db.execute(stmt)
                self._db.execute("INSERT OR IGNORE INTO chain_state (id, count, head) VALUES (1, 0, ?)", (GENESIS,))
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"{self.path}: not a usable ledger ({exc})") from None

    # -- transactions -------------------------------------------------------------------
    class _Txn:
        def __init__(self, ledger: "Ledger", begin: str) -> None:
            self.ledger, self.begin = ledger, begin

        def __enter__(self):
            self.ledger._lock.acquire()
            try:
                self.ledger._db.execute(self.begin)
            except BaseException:
                self.ledger._lock.release()
                raise
            return self.ledger._db

        def __exit__(self, exc_type, exc, tb):
            try:
                self.ledger._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.ledger._lock.release()
            return False

    def _write(self) -> "Ledger._Txn":
        return Ledger._Txn(self, "BEGIN IMMEDIATE")

    def _read(self) -> "Ledger._Txn":
        return Ledger._Txn(self, "BEGIN")

    # -- writing --------------------------------------------------------------------------
    def append(self, record: dict, kind: str = "decision", entry_id: str | None = None) -> bool:
        """Append one record; False (and nothing written) if (kind, entry_id) is already there."""
        return self.append_entries([(kind, record, entry_id)]) == 1

    def append_many(self, records: Iterable[dict], kind: str = "decision") -> int:
        """Append a batch of one kind in one transaction; returns how many were new."""
        return self.append_entries((kind, r, None) for r in records)

    def append_entries(self, entries: Iterable[tuple[str, dict, str | None]]) -> int:
        """Append ``(kind, record, entry_id or None)`` items in one transaction.

        Every item is validated before anything is written; items already in the
        ledger (same kind and entry id), or repeated in the batch, are skipped.
        Returns how many rows were written.
        """
        prepared = []
        for i, (kind, record, eid) in enumerate(entries):
            _check_kind(kind)
            if not isinstance(record, dict):
                raise LedgerError(f"record[{i}]: must be a JSON object, got {type(record).__name__}")
            eid = _check_entry_id(record.get("id") if eid is None else eid)
            ts = record.get("ts")
            if ts is not None:
                if not isinstance(ts, str):
                    raise LedgerError(f"record[{i}].ts: must be an RFC 3339 string, got {type(ts).__name__}")
                parse_ts(ts, f"record[{i}].ts")
            prepared.append((kind, eid, ts, canonical_json(record)))
        if not prepared:
            return 0
        written = 0
        with self._write() as db:
            count, _ = db.execute("SELECT count, head FROM chain_state WHERE id = 1").fetchone()
            last = db.execute("SELECT seq, hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = last if last else (0, GENESIS)
            seen: set[tuple[str, str]] = set()
            for kind, eid, ts, text in prepared:
                if (kind, eid) in seen or db.execute(
                    "SELECT 1 FROM entries WHERE kind = ? AND entry_id = ?", (kind, eid)
                ).fetchone():
                    continue
                seen.add((kind, eid))
                seq += 1
                h = entry_hash(prev, kind, eid, text)
                db.execute(
                    "INSERT INTO entries (seq, kind, entry_id, ts, record, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                    (seq, kind, eid, ts, text, prev, h),
                )
                prev = h
                written += 1
            if written:
                db.execute("UPDATE chain_state SET count = ?, head = ? WHERE id = 1", (count + written, prev))
        return written

    # -- reading --------------------------------------------------------------------------
    def get(self, entry_id: str, kind: str = "decision") -> dict | None:
        with self._lock:
            row = self._db.execute(
                "SELECT record FROM entries WHERE kind = ? AND entry_id = ?", (kind, entry_id)
            ).fetchone()
        return json.loads(row[0]) if row else None

    def entry(self, entry_id: str, kind: str = "decision") -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT seq, kind, entry_id, ts, record, prev_hash, hash FROM entries WHERE kind = ? AND entry_id = ?",
                (kind, entry_id),
            ).fetchone()
        return _row_to_entry(row) if row else None

    def records(self, kind: str | None = None, since: Any = None, until: Any = None) -> Iterator[Entry]:
        """Entries in chain order; ``since`` inclusive, ``until`` exclusive, compared on ``ts``.

        With a time bound, entries without ``ts`` are skipped.
        """
        lo = parse_ts(since, "since") if since is not None else None
        hi = parse_ts(until, "until") if until is not None else None
        where, args = ("kind = ? AND seq > ?", [kind]) if kind is not None else ("seq > ?", [])
        sql = f"SELECT seq, kind, entry_id, ts, record, prev_hash, hash FROM entries WHERE {where} ORDER BY seq LIMIT 1000"
        last_seq = 0
        while True:  # pages of 1000 rows: no lock or cursor is held while the caller iterates
            with self._lock:
                rows = self._db.execute(sql, (*args, last_seq)).fetchall()
            if not rows:
                return
            for row in rows:
                last_seq = row[0]
                if lo is not None or hi is not None:
                    if row[3] is None:
                        continue
                    t = parse_ts(row[3])
                    if (lo is not None and t < lo) or (hi is not None and t >= hi):
                        continue
                yield _row_to_entry(row)

    def count(self, kind: str | None = None) -> int:
        with self._lock:
            if kind is None:
                return self._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0]
            return self._db.execute("SELECT COUNT(*) FROM entries WHERE kind = ?", (kind,)).fetchone()[0]

    def head(self) -> str:
        """Hash of the last row (GENESIS for an empty ledger): sign or anchor this."""
        with self._lock:
            row = self._db.execute("SELECT hash FROM entries ORDER BY seq DESC LIMIT 1").fetchone()
        return row[0] if row else GENESIS

    # -- verification ---------------------------------------------------------------------
    def verify(self, expect_head: str | None = None, expect_count: int | None = None) -> VerifyResult:
        """Recompute the whole chain; the first row that does not check out is named."""
        if expect_head is not None and not re.fullmatch(r"[0-9a-f]{64}", expect_head):
            raise LedgerError(f"expect_head: must be 64 lowercase hex characters; got {expect_head!r}")
        if expect_count is not None and (not isinstance(expect_count, int) or expect_count < 0):
            raise LedgerError(f"expect_count: must be a non-negative integer; got {expect_count!r}")
        with self._read() as db:
            state = db.execute("SELECT count, head FROM chain_state WHERE id = 1").fetchone()
            rows = db.execute("SELECT seq, kind, entry_id, ts, record, prev_hash, hash FROM entries ORDER BY seq")
            n, prev, bad, anchored_seq = check_chain(rows, expect_head)
        if bad is not None:
            return VerifyResult(False, n, prev, *bad)
        if state is None:
            return VerifyResult(False, n, prev, n + 1, "chain_state row is missing (tampered)")
        s_count, s_head = state
        if s_count > n:
            return VerifyResult(False, n, prev, n + 1, f"truncated: checkpoint says {s_count} rows, found {n}")
        if s_count < n:
            return VerifyResult(False, n, prev, s_count + 1, f"rows after {s_count} were added outside the ledger (checkpoint says {s_count} rows)")
        if s_head != prev:
            return VerifyResult(False, n, prev, max(n, 1), f"checkpoint head {s_head[:12]}… differs from chain head {prev[:12]}…")
        if expect_count is not None and n < expect_count:
            return VerifyResult(False, n, prev, n + 1, f"truncated: expected at least {expect_count} rows, found {n}")
        if expect_head is not None:
            if anchored_seq is None:
                if expect_count is not None and expect_count <= n:
                    return VerifyResult(False, n, prev, max(expect_count, 1), f"row {expect_count} is not the anchored head {expect_head[:12]}…: rewritten")
                return VerifyResult(False, n, prev, n + 1, f"anchored head {expect_head[:12]}… is not in the chain: truncated or rewritten")
            if expect_count is not None and anchored_seq != expect_count:
                return VerifyResult(False, n, prev, min(anchored_seq, expect_count) + 1, f"anchored head is row {anchored_seq}, expected row {expect_count}")
        return VerifyResult(True, n, prev)

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None  # type: ignore[assignment]

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Ledger({str(self.path)!r})"


# -- record constructors for the non-decision kinds ------------------------------------------
def policy_record(name: str, version: str, sha256: str, ts: str, event: str = "loaded", **extra: Any) -> tuple[dict, str]:
    """A ``policy`` entry and its entry id; one entry per distinct (name, version, sha256)."""
    rec = {"id": f"{name}@{version}#{sha256}", "ts": ts, "event": event, "name": name, "version": str(version),
           "sha256": sha256, **extra}
    return rec, rec["id"]


def dlq_record(reason: str, value: bytes, ts: str, *, topic: str | None = None, partition: int | None = None,
               offset: int | None = None, file: str | None = None, line: int | None = None,
               message: str | None = None) -> tuple[dict, str]:
    """A ``dlq`` entry and its entry id: reason, source and the payload's sha256 — never the payload."""
    if topic is not None:
        source: dict = {"topic": topic, "partition": partition, "offset": offset}
        eid = f"{topic}:{partition}:{offset}"
    else:
        source = {"file": file, "line": line}
        eid = f"{file}:{line}"
    rec = {"id": eid, "ts": ts, "reason": reason, "message": message, "source": source,
           "digest": {"sha256": hashlib.sha256(value).hexdigest(), "size": len(value)}}
    return rec, eid
