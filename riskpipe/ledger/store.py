"""The ledger's one interface, written once over a small SQL surface each backend provides.

:class:`Ledger` holds everything that is the same on SQLite and PostgreSQL: validating
and chaining appends, the RFC 9162 Merkle tree over the rows (:mod:`riskpipe.ledger.tree`)
and its proofs, de-duplication by (kind, entry id, scope) -- the scope is empty but for
decisions, which are identified by (event id, model, policy sha256), see
:func:`~riskpipe.ledger.chain.decision_scope` --, reading, verifying, and the
tables of signed checkpoints. A backend supplies a connection wrapper with
``execute(sql, params)`` (SQL written with ``?`` placeholders), a write transaction that
serialises appends across processes, a read transaction that sees one snapshot, and
its migration steps (:mod:`riskpipe.ledger.migrations`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any

from riskpipe.ledger import facts, merkle, tree
from riskpipe.ledger.anchors import Checkpoint, LegacyCheckpoint
from riskpipe.ledger.chain import (
    GENESIS,
    HEX64,
    ChainWalk,
    Entry,
    LedgerError,
    VerifyResult,
    parse_ts,
    prepare_entries,
    row_to_entry,
    time_window,
)
from riskpipe.ledger.conn import Cursor, Db, Row
from riskpipe.ledger.inputs import StoredInput
from riskpipe.ledger.targets import backend_name
from riskpipe.timestamps import iso_seconds

Record = dict[str, Any]
# an item to sequence: (kind, entry_id, ts, canonical record text, scope, record or None to parse the text)
Pending = tuple[str, str, str | None, str, str, Record | None]

_COLUMNS = "seq, kind, entry_id, ts, record, prev_hash, hash"
_VERIFY_BATCH = 5000  # rows per fetch while verify walks the chain
_ID_CHUNK = 500  # entry ids per de-duplication query (SQLite allows 32766 variables)


class Ledger:
    """Append-only hash-chained ledger. ``Ledger(target)`` opens the backend ``target``
    names (like ``pathlib.Path``): a file path or ``sqlite:///PATH`` for SQLite,
    ``postgresql://...`` for PostgreSQL; see :func:`riskpipe.ledger.open_ledger`.
    Use as a context manager."""

    backend = "abstract"
    # the SQL that reads ``entries.record`` as its UTF-8 bytes (verify hashes and parses bytes)
    record_bytes = "record"
    # the SQL for (hashes joined in (last, level) order, count, count of malformed keys) of the tree
    # nodes with ``?`` <= last < ``?`` (tree.TreeCheck.add_leaves); None: row by row
    tree_nodes_check: str | None = None
    schema_version: int
    _db: Db | None
    _lock: threading.RLock

    @staticmethod
    def number_at(path: str) -> str:
        """The backend's SQL expression for a numeric field of ``entries.record``
        ("certificate.p_lower"), NULL when absent or not a number; set by each backend."""
        raise NotImplementedError

    @staticmethod
    def text_at(path: str, column: str = "record") -> str:
        """The backend's SQL expression for a string field ("reviewer") of the record in
        ``column`` (``r.record`` in a join), '' when absent or not a string; set by each backend."""
        raise NotImplementedError

    def __new__(cls, target: Any = None, **options: Any) -> Ledger:
        if cls is Ledger:
            cls = backend_for(target)
        return super().__new__(cls)

    def __init__(self, target: Any = None, **options: Any) -> None:  # pragma: no cover - backends override
        raise NotImplementedError

    # -- backend hooks -------------------------------------------------------------------
    def _connect(self) -> Db:
        """A new connection to the backend."""
        raise NotImplementedError

    def _write(self) -> AbstractContextManager[Db]:
        """A transaction that holds the ledger's append lock; yields the connection wrapper."""
        raise NotImplementedError

    def _read(self) -> AbstractContextManager[Db]:
        """A read-only transaction on one consistent snapshot; yields the connection wrapper."""
        raise NotImplementedError

    def _rows(self, db: Db, sql: str, params: Row = (), name: str = "") -> Cursor:
        """Iterate a large result without loading it whole (inside ``_read``); ``name``
        tells concurrent cursors apart where the backend needs it."""
        return db.execute(sql, params)

    def _init_lock(self) -> None:
        self._lock = threading.RLock()

    def another_connection(self) -> Ledger:
        """The same ledger (same class, same settings) on a connection of its own, for a
        second thread: the stage's ledger writer appends on it while the stage looks ids
        up on this one. Closed on its own."""

        other = copy.copy(self)
        other._init_lock()
        other._db = other._connect()
        return other

    @contextmanager
    def _conn(self) -> Iterator[Db]:
        """The connection wrapper for a single autocommitted statement."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"{self}: ledger is closed")
            yield self._db

    # -- writing --------------------------------------------------------------------------
    def append(self, record: Record, kind: str = "decision", entry_id: str | None = None) -> bool:
        """Append one record; False (and nothing written) if (kind, entry_id, scope) is already there."""
        return self.append_entries([(kind, record, entry_id)]) == 1

    def append_many(self, records: Iterable[Record], kind: str = "decision") -> int:
        """Append a batch of one kind in one transaction; returns how many were new."""
        return self.append_entries((kind, r, None) for r in records)

    def append_entries(self, entries: Iterable[tuple[str, Record, str | None]],
                       inputs: Iterable[StoredInput] = ()) -> int:
        """Append ``(kind, record, entry_id or None)`` items in one transaction.

        Every item is validated before anything is written; items already in the
        ledger (same kind, entry id and scope, whichever process or replica wrote them),
        or repeated in the batch, are skipped. Returns how many rows were written.
        ``inputs`` (:class:`riskpipe.ledger.inputs.StoredInput`) are the tensors the
        records reference, stored in the same transaction, once per digest.
        """

        entries = list(entries)
        prepared = prepare_entries(entries)
        if not prepared:
            return 0
        with self._write() as db:
            self._store_inputs(db, inputs, iso_seconds())
            seen = self._existing(db, {(k, e, sc) for k, e, _, _, sc in prepared})
            new: list[Pending] = []
            for (kind, eid, ts, text, scope), (_, record, _) in zip(prepared, entries):
                if (kind, eid, scope) not in seen:
                    seen.add((kind, eid, scope))
                    new.append((kind, eid, ts, text, scope, record))
            rows = self._sequence(db, new)
            if rows:
                db.executemany(f"INSERT INTO entries ({_COLUMNS}, scope) VALUES (?,?,?,?,?,?,?,?)", rows)
        return len(rows)

    @staticmethod
    def _store_inputs(db: Db, inputs: Iterable[StoredInput], now: str) -> None:
        stored = {s.sha256: s.row(now) for s in inputs}
        if stored:
            db.executemany("INSERT INTO inputs (sha256, datatype, shape, data, ts) VALUES (?,?,?,?,?) "
                           "ON CONFLICT (sha256) DO NOTHING", list(stored.values()))

    @staticmethod
    def _sequence(db: Db, items: list[Pending]) -> list[Row]:
        """Give ``(kind, entry_id, ts, record_text, scope, record)`` items the next seqs:
        chain hashes, Merkle leaves, ``chain_state``, ``tree_state`` and their ``facts``
        rows (inside the append lock; ``record``: the dict, or None to parse the text).
        Returns the rows ``(seq, kind, entry_id, ts, record, prev_hash, hash, scope)``."""

        if not items:
            return []
        count = db.execute("SELECT count FROM chain_state WHERE id = 1").fetchone()[0]
        last = db.execute("SELECT seq, hash FROM entries WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = last if last else (0, GENESIS)
        rows: list[Row] = []
        leaves: list[bytes] = []
        new: list[tuple[int, str, str, Record]] = []
        for kind, eid, ts, text, scope, record in items:
            seq += 1
            leaf = tree.leaf_bytes(kind, eid, text)  # kind \n id \n record: encoded once for both hashes
            # one sha256 call per hash: cheaper than update() on a ~2 KB leaf (a lock per hash object)
            h = hashlib.sha256(f"{prev}\n".encode("ascii") + leaf).hexdigest()  # = entry_hash(prev, kind, eid, text)
            rows.append((seq, kind, eid, ts, text, prev, h, scope))
            leaves.append(merkle.leaf_hash(leaf))
            new.append((seq, kind, eid, json.loads(text) if record is None else record))
            prev = h
        db.execute("UPDATE chain_state SET count = ?, head = ? WHERE id = 1", (count + len(rows), prev))
        tree.append_leaves(db, leaves, seq - len(rows))
        facts.insert(db, new)
        return rows

    def integrate(self) -> int:
        """Sequence rows written but not yet in the chain and tree; returns how many.
        Here appends are sequenced in their own transaction, so there are none; the
        PostgreSQL backend overrides this (writers there do not wait for each other)."""
        return 0

    def pending(self) -> int:
        """Rows written but not yet sequenced into the chain and tree."""
        return 0

    def _existing(self, db: Db, keys: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
        found: set[tuple[str, str, str]] = set()
        for match, params in self._id_filters(sorted({e for _, e, _ in keys})):
            for key in db.execute(f"SELECT kind, entry_id, scope FROM entries WHERE entry_id {match}", params):
                if tuple(key) in keys:
                    found.add(tuple(key))
        return found

    def _id_filters(self, ids: list[str]) -> Iterator[tuple[str, Row]]:
        """``(SQL after "entry_id", parameters)`` matching ``ids``, chunk by chunk (SQLite
        allows 32766 variables); the PostgreSQL backend passes one array instead."""
        for i in range(0, len(ids), _ID_CHUNK):
            chunk = ids[i:i + _ID_CHUNK]
            yield f"IN ({','.join('?' * len(chunk))})", tuple(chunk)

    # -- reading --------------------------------------------------------------------------
    def ping(self) -> None:
        """Raise unless the ledger answers a read now (the stage probes it during an outage;
        on PostgreSQL a dropped connection is re-opened first)."""
        with self._conn() as db:
            db.execute("SELECT count FROM chain_state WHERE id = 1").fetchone()

    def get(self, entry_id: str, kind: str = "decision") -> Record | None:
        """The record of (kind, entry_id); of several decisions of one event id (other
        models or policies), the latest."""
        entry = self.entry(entry_id, kind)
        return entry.record if entry else None

    def get_input(self, sha256: str) -> StoredInput | None:
        """The stored tensor with input digest ``sha256`` (:class:`riskpipe.ledger.inputs.StoredInput`) or None."""

        with self._conn() as db:
            row = db.execute("SELECT sha256, datatype, shape, data FROM inputs WHERE sha256 = ?", (sha256,)).fetchone()
        return StoredInput(row[0], row[1], tuple(json.loads(row[2])), bytes(row[3])) if row else None

    def entry(self, entry_id: str, kind: str = "decision") -> Entry | None:
        with self._conn() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE kind = ? AND entry_id = ? "
                             "ORDER BY seq DESC LIMIT 1", (kind, entry_id)).fetchone()
        return row_to_entry(row) if row else None

    def entries_with_prefix(self, prefix: str, kind: str) -> list[Entry]:
        """Every entry of ``kind`` whose entry id starts with ``prefix`` (an index range scan),
        in chain order. Uncapped: a cap in chain order hid an event's later decisions behind
        other ids sharing the prefix (``evt-1`` behind ``evt-1000`` .. ``evt-1999``)."""
        with self._conn() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE kind = ? AND entry_id >= ? AND entry_id < ? "
                              "ORDER BY seq", (kind, prefix, prefix + "\U0010ffff")).fetchall()
        return [row_to_entry(r) for r in rows]

    def entries(self, entry_id: str, kind: str = "decision") -> list[Entry]:
        """Every entry of (kind, entry_id) in chain order, with its ``seq`` (``get_all``'s records)."""
        with self._conn() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE kind = ? AND entry_id = ? ORDER BY seq",
                              (kind, entry_id)).fetchall()
        return [row_to_entry(r) for r in rows]

    def get_all(self, entry_id: str, kind: str = "decision") -> list[Record]:
        """Every record of (kind, entry_id) in chain order: one per scope (for decisions,
        one per model and policy that decided the event)."""
        with self._conn() as db:
            rows = db.execute("SELECT record FROM entries WHERE kind = ? AND entry_id = ? ORDER BY seq",
                              (kind, entry_id)).fetchall()
        return [json.loads(r[0]) for r in rows]

    def get_all_many(self, entry_ids: Iterable[str], kind: str = "decision") -> dict[str, list[Record]]:
        """``get_all`` for many ids in a few queries (the stage's per-batch id look-up):
        id -> its records in chain order; ids with none are absent."""
        ids = sorted(set(entry_ids))
        out: dict[str, list[Record]] = {}
        with self._conn() as db:
            for match, params in self._id_filters(ids):
                for eid, rec in db.execute(f"SELECT entry_id, record FROM entries WHERE kind = ? AND entry_id {match} "
                                           "ORDER BY seq", (kind, *params)).fetchall():
                    out.setdefault(eid, []).append(json.loads(rec))
        return out

    def records(self, kind: str | None = None, since: Any = None, until: Any = None) -> Iterator[Entry]:
        """Entries in chain order; ``since`` inclusive, ``until`` exclusive, compared on ``ts``.

        With a time bound, entries without ``ts`` are skipped.
        """
        lo, hi = time_window(since, until)
        where, args = ("kind = ? AND seq > ?", (kind,)) if kind is not None else ("seq > ?", ())
        sql = f"SELECT {_COLUMNS} FROM entries WHERE {where} ORDER BY seq LIMIT 1000"
        last_seq = 0
        while True:  # pages of 1000 rows: no lock or cursor is held while the caller iterates
            with self._conn() as db:
                rows = db.execute(sql, (*args, last_seq)).fetchall()
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
                yield row_to_entry(row)

    def count(self, kind: str | None = None) -> int:
        with self._conn() as db:
            if kind is None:
                return int(db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])
            return int(db.execute("SELECT COUNT(*) FROM entries WHERE kind = ?", (kind,)).fetchone()[0])

    def head(self) -> str:
        """Hash of the last row (GENESIS for an empty ledger): sign or anchor this."""
        return self.head_and_count()[0]

    def head_and_count(self) -> tuple[str, int]:
        """(head, row count) read together, as a checkpoint signs them."""
        with self._read() as db:
            row = db.execute("SELECT seq, hash FROM entries WHERE seq IS NOT NULL ORDER BY seq DESC LIMIT 1").fetchone()
        return (row[1], row[0]) if row else (GENESIS, 0)

    def hash_at(self, seq: int) -> str | None:
        with self._conn() as db:
            row = db.execute("SELECT hash FROM entries WHERE seq = ?", (seq,)).fetchone()
        return row[0] if row else None

    @contextmanager
    def snapshot(self) -> Iterator[Snapshot]:
        """``query(sql, params) -> rows`` on one consistent read snapshot: the report and the
        review queue run their SQL (``?`` placeholders, the ``facts`` table) through it;
        ``query.stream(sql, params)`` reads a large result in lists of rows, not whole."""
        with self._read() as db:
            yield Snapshot(self, db)

    # -- the Merkle tree (riskpipe.ledger.tree) ---------------------------------------------
    def tree_head(self) -> tuple[int, str]:
        """(tree size, root hex) as of the last append: what a checkpoint signs."""
        with self._read() as db:
            size, root, _ = tree.read_state(db)
        return size, root

    def leaf_at(self, index: int) -> tuple[bytes, Entry] | None:
        """(leaf bytes, entry) of 0-based leaf ``index`` (row ``seq = index + 1``)."""
        with self._conn() as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM entries WHERE seq = ?", (index + 1,)).fetchone()
        if row is None:
            return None
        return tree.leaf_bytes(row[1], row[2], row[4]), row_to_entry(row)

    def tree_root(self, size: int) -> bytes:
        """MTH of the first ``size`` leaves, from stored nodes (log2(size) lookups)."""
        with self._read() as db:
            return self._subtree(db, size)(0, size) if size else merkle.EMPTY_ROOT

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """RFC 9162 audit path of leaf ``index`` in the tree of ``size`` leaves."""
        with self._read() as db:
            return merkle.inclusion_proof(index, size, self._subtree(db, size))

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 consistency proof from the tree of ``old_size`` to that of ``new_size``."""
        with self._read() as db:
            return merkle.consistency_proof(old_size, new_size, self._subtree(db, new_size))

    @staticmethod
    def _subtree(db: Db, size: int) -> merkle.Subtree:
        have = tree.read_state(db)[0]
        if size > have:
            raise LedgerError(f"tree size {size}: the ledger's tree has only {have} leaves")
        return tree.subtree_reader(db, size)

    # -- signed checkpoints (riskpipe.ledger.checkpoint) ------------------------------------
    def log_id(self) -> str:
        """The random id made with the ledger's tree (the default checkpoint origin's tail)."""
        with self._conn() as db:
            return str(db.execute("SELECT log_id FROM tree_state WHERE id = 1").fetchone()[0])

    def add_note(self, tree_size: int, root: str, note: str) -> None:
        """Store a signed checkpoint note (C2SP) for the tree of ``tree_size`` with ``root`` (hex)."""
        with self._write() as db:
            db.execute("INSERT INTO signed_notes (tree_size, root, note) VALUES (?,?,?)", (tree_size, root, note))

    def notes(self) -> list[str]:
        """The stored signed checkpoint notes, oldest first."""
        with self._conn() as db:
            return [r[0] for r in db.execute("SELECT note FROM signed_notes ORDER BY id").fetchall()]

    def latest_note(self, min_size: int = 0) -> str | None:
        """The newest stored note for a tree of at least ``min_size`` leaves."""
        with self._conn() as db:
            row = db.execute("SELECT note FROM signed_notes WHERE tree_size >= ? ORDER BY tree_size DESC, id DESC "
                             "LIMIT 1",
                             (min_size,)).fetchone()
        return row[0] if row else None

    def notes_largest_first(self, batch: int = 200) -> Iterator[str]:
        """The stored notes, largest tree first (newest first among equal sizes): one query,
        fetched ``batch`` at a time (the caller usually stops at the first; paging with
        OFFSET sorted the table again for every page)."""
        with self._read() as db:
            rows = self._rows(db, "SELECT note FROM signed_notes ORDER BY tree_size DESC, id DESC", (), "notes")
            while batch_rows := rows.fetchmany(batch):
                yield from (r[0] for r in batch_rows)

    def legacy_checkpoints(self) -> list[LegacyCheckpoint]:
        """Checkpoints signed by riskpipe before the Merkle tree (JSON over head and count)."""
        with self._conn() as db:
            rows = db.execute("SELECT count, head, ts, key_id, public_key, signature FROM checkpoints "
                              "ORDER BY id").fetchall()
        return [LegacyCheckpoint(*r) for r in rows]

    # -- verification ---------------------------------------------------------------------
    def verify(self, expect_head: str | None = None, expect_count: int | None = None,
               checkpoints: Sequence[Checkpoint | LegacyCheckpoint] | None = None) -> VerifyResult:
        """Recompute the whole chain; the first row that does not check out is named.

        ``checkpoints``: verified :class:`~riskpipe.ledger.anchors.Checkpoint` s (see
        ``checkpoint.verify_ledger``); each one's row must still carry its signed head.
        """
        if expect_head is not None and not HEX64.fullmatch(expect_head):
            raise LedgerError(f"expect_head: must be 64 lowercase hex characters; got {expect_head!r}")
        if expect_count is not None and (not isinstance(expect_count, int) or expect_count < 0):
            raise LedgerError(f"expect_count: must be a non-negative integer; got {expect_count!r}")
        anchors = {cp.count: cp.head for cp in checkpoints or () if isinstance(cp, LegacyCheckpoint)}
        signed_roots = {cp.tree_size: cp.root.hex() for cp in checkpoints or () if isinstance(cp, Checkpoint)}
        with self._read() as db:
            state = db.execute("SELECT count, head FROM chain_state WHERE id = 1").fetchone()
            tstate = db.execute("SELECT size, root FROM tree_state WHERE id = 1").fetchone()
            check = tree.TreeCheck(db, signed_roots, self.tree_nodes_check)
            walk = ChainWalk(expect_head, anchors)
            rows = self._rows(db, f"SELECT seq, kind, entry_id, ts, {self.record_bytes}, prev_hash, hash, scope "
                                  "FROM entries WHERE seq IS NOT NULL ORDER BY seq")
            while not walk.stopped and (batch := rows.fetchmany(_VERIFY_BATCH)):
                first = walk.n + 1
                check.add_leaves(first, walk.feed(batch))  # the tree is rebuilt from the rows the chain walk reads
            n, prev, bad, anchored_seq, bad_anchor = walk.n, walk.prev, walk.bad, walk.anchored_seq, walk.bad_anchor
            tree_bad = check.finish(n, tstate) if bad is None and bad_anchor is None else None
        if bad_anchor is not None:  # a signed head no longer matches: rows up to it were rewritten
            return VerifyResult(False, n, prev, *bad_anchor)
        if bad is not None:
            return VerifyResult(False, n, prev, *bad)
        if anchors and max(anchors) > n:
            last = max(anchors)
            return VerifyResult(False, n, prev, n + 1, f"truncated: a signed checkpoint covers {last} rows, found {n}")
        if state is None:
            return VerifyResult(False, n, prev, n + 1, "chain_state row is missing (tampered)")
        s_count, s_head = state
        if s_count > n:
            return VerifyResult(False, n, prev, n + 1, f"truncated: chain state says {s_count} rows, found {n}")
        if s_count < n:
            return VerifyResult(False, n, prev, s_count + 1,
                                f"rows after {s_count} were added outside the ledger (chain state says {s_count} rows)")
        if s_head != prev:
            return VerifyResult(False, n, prev, max(n, 1),
                                f"chain state head {s_head[:12]}… differs from chain head {prev[:12]}…")
        if tree_bad is not None:
            return VerifyResult(False, n, prev, *tree_bad)
        if expect_count is not None and n < expect_count:
            return VerifyResult(False, n, prev, n + 1, f"truncated: expected at least {expect_count} rows, found {n}")
        if expect_head is not None:
            if anchored_seq is None:
                if expect_count is not None and expect_count <= n:
                    return VerifyResult(False, n, prev, max(expect_count, 1),
                                        f"row {expect_count} is not the anchored head {expect_head[:12]}…: rewritten")
                return VerifyResult(False, n, prev, n + 1,
                                    f"anchored head {expect_head[:12]}… is not in the chain: truncated or rewritten")
            if expect_count is not None and anchored_seq != expect_count:
                return VerifyResult(False, n, prev, min(anchored_seq, expect_count) + 1,
                                    f"anchored head is row {anchored_seq}, expected row {expect_count}")
        return VerifyResult(True, n, prev, root=check.root())

    # -- lifecycle ------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def backend_for(target: Any) -> type[Ledger]:
    """The Ledger class for ``target``; LedgerError (one line) for an unknown scheme.

    PostgreSQL takes a URL (``postgresql://USER:PASSWORD@HOST/DB``) or a libpq keyword
    DSN (``host=HOST dbname=DB user=USER password=...``); a keyword string with an
    unknown keyword is refused rather than taken for a file name. Either way the
    password is registered for redaction (riskpipe.redaction). The backends are the
    subclasses of ``Ledger`` (riskpipe.ledger.sqlite, riskpipe.ledger.postgres, both
    imported by the package), so this module imports neither."""
    name = backend_name(target)
    for cls in Ledger.__subclasses__():
        if cls.backend == name:
            return cls
    raise LedgerError(f"ledger: the {name} backend is not loaded (import riskpipe.ledger)")


class Snapshot:
    """The query function :meth:`Ledger.snapshot` yields."""

    def __init__(self, ledger: Ledger, db: Db) -> None:
        self._ledger, self._db = ledger, db
        self._streams = 0

    def __call__(self, sql: str, params: Iterable[Any] = ()) -> list[Row]:
        return list(self._db.execute(sql, tuple(params)).fetchall())

    def stream(self, sql: str, params: Iterable[Any] = (), size: int = 20_000) -> Iterator[list[Row]]:
        """The rows in lists of at most ``size`` (fetched by the driver, not row by row)."""
        self._streams += 1
        rows = self._ledger._rows(self._db, sql, tuple(params), name=f"riskpipe_snapshot_{self._streams}")
        try:
            while chunk := rows.fetchmany(size):
                yield list(chunk)
        finally:
            rows.close()
