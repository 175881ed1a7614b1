"""The shared backend: one PostgreSQL database (psycopg 3) for every stage process,
replica, ingest worker, review console and report.

Concurrency — writers do not wait for each other (schema 4)
-----------------------------------------------------------
One chain and one Merkle tree, sequenced the way Tessera does it: writers insert rows
*unsequenced* (``seq``, ``prev_hash``, ``hash`` NULL) with ``ON CONFLICT DO NOTHING`` on
the unique (kind, entry id) index — de-duplication across every process and replica —
and commit without taking any lock shared by the writers, so their transactions and
fsyncs overlap (group commit). Whoever can take the integrator lease, the append
advisory lock taken *without waiting* (``pg_try_advisory_xact_lock``), sequences the
pending rows into the chain and tree in the same transaction (a writer holding it
inserts its own rows already sequenced). The lease ends at commit or rollback or with
the holder's connection, so a holder killed mid-batch leaves its batch pending for the
next one: nothing lost, nothing sequenced twice. A writer that finds the lease taken
tries again after its commit, and every holder looks for pending rows after releasing
it, so no committed row is left unsequenced while any writer is active
(``riskpipe ledger checkpoint`` and ``receipt`` sequence what is pending first). The
only UPDATE the trigger allows is that one-time sequencing of an unsequenced row.
Readers see sequenced rows (``records``, ``verify``, ``export``); ``get`` and ``count``
see every stored row.

Measured by ``bench/bench_ledger_writers.py`` (bench/results/ledger_writers.json; a
shared 2-core machine under load ~11, PostgreSQL fsync=on, ~2.0 KB records, 6,144 rows
a run, side by side with the previous scheme of one blocking lock per append): batches
of 16, 1 / 2 / 4 writers appended 550 / 1298 / 819 rows/s (previous scheme: 713 / 994 /
758); batches of 256, 1594 / 1561 / 858 (previous: 1381 / 2382 / 1662). The target of
4 writers at 2x one writer was NOT reached on this machine (1.49x with batches of 16,
0.54x with 256; runs vary by +-40% with the machine's load): with two busy cores the CPU,
not the lock, is the limit, so the figures need re-measuring on a machine with spare
cores. ``verify`` took ~28 s per 100,000 rows (chain and tree, bound by re-parsing every
record in Python); an inclusion proof at 6,144 rows is 13 hashes (416 bytes), ~7 ms.

Tamper evidence: UPDATE, DELETE and TRUNCATE on ``entries`` and ``checkpoints`` are
refused by triggers; a superuser can disable them, which ``verify`` then detects
(and a signed checkpoint detects even when the chain was recomputed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, cast

import psycopg

from riskpipe.ledger import facts
from riskpipe.ledger.chain import GENESIS, LedgerError, LedgerUnavailable, prepare_entries
from riskpipe.ledger.conn import Cursor, Db, Row
from riskpipe.ledger.inputs import StoredInput
from riskpipe.ledger.inputs import table_statements as input_tables
from riskpipe.ledger.migrations import (
    Step,
    chain_tables,
    checkpoint_tables,
    current_version,
    latest,
    migrate,
    scope_sql,
)
from riskpipe.ledger.store import _COLUMNS, Ledger, Pending, Record
from riskpipe.ledger.tree import build_existing, tree_tables
from riskpipe.redaction import redact
from riskpipe.timestamps import iso_seconds


def _text_at(path: str, column: str = "record") -> str:
    """A string field of the record in ``column`` ('' when absent or not a string)."""
    p = "{" + path.replace(".", ",") + "}"
    return (f"CASE WHEN jsonb_typeof({column}::jsonb #> '{p}') = 'string' THEN {column}::jsonb #>> '{p}' "
            "ELSE '' END")


def _number_at(path: str) -> str:
    """A numeric field of the record (NULL when absent or not a number)."""
    p = "{" + path.replace(".", ",") + "}"
    return (f"CASE WHEN jsonb_typeof(record::jsonb #> '{p}') = 'number' "
            f"THEN (record::jsonb #>> '{p}')::double precision END")


APPEND_LOCK = 0x7269736B  # "risk": the advisory lock key every appender takes
_INTEGRATE_BATCH = 5000
_REFUSE = """CREATE OR REPLACE FUNCTION riskpipe_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"""

STEPS: list[Step] = [
    (1, [
        *chain_tables("BIGINT"),
        f"INSERT INTO chain_state (id, count, head) VALUES (1, 0, '{GENESIS}')",
        _REFUSE,
        "CREATE TRIGGER entries_no_change BEFORE UPDATE OR DELETE ON entries FOR EACH ROW EXECUTE FUNCTION "
        "riskpipe_append_only()",
        "CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries FOR EACH STATEMENT EXECUTE FUNCTION "
        "riskpipe_append_only()",
    ]),
    (2, [
        *checkpoint_tables("id BIGSERIAL PRIMARY KEY", "BIGINT"),
        "CREATE TRIGGER checkpoints_no_change BEFORE UPDATE OR DELETE ON checkpoints FOR EACH ROW EXECUTE FUNCTION "
        "riskpipe_append_only()",
        "CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints FOR EACH STATEMENT EXECUTE FUNCTION "
        "riskpipe_append_only()",
    ]),
    (3, [  # the RFC 9162 Merkle tree over the rows, and C2SP signed notes (checkpoints)
        *tree_tables("BIGINT"),
        *(stmt for t in ("tree_nodes", "signed_notes") for stmt in (
            f"CREATE TRIGGER {t}_no_change BEFORE UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION "
            "riskpipe_append_only()",
            f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION "
            "riskpipe_append_only()")),
        build_existing,
    ]),
    (4, [  # decision identity: unique (kind, entry_id, scope); existing rows get their scope once
        "ALTER TABLE entries ADD COLUMN scope TEXT NOT NULL DEFAULT ''",
        "ALTER TABLE entries DISABLE TRIGGER entries_no_change",
        f"UPDATE entries SET scope = {scope_sql(_text_at)} WHERE kind = 'decision'",
        "ALTER TABLE entries ENABLE TRIGGER entries_no_change",
        "ALTER TABLE entries DROP CONSTRAINT entries_kind_entry_id_key",
        "ALTER TABLE entries ADD CONSTRAINT entries_identity_key UNIQUE (kind, entry_id, scope)",
    ]),
    (5, [  # inputs stored once, by digest (riskpipe.ledger.inputs)
        *input_tables("BYTEA"),
        "CREATE TRIGGER inputs_no_change BEFORE UPDATE OR DELETE ON inputs FOR EACH ROW EXECUTE FUNCTION "
        "riskpipe_append_only()",
        "CREATE TRIGGER inputs_no_truncate BEFORE TRUNCATE ON inputs FOR EACH STATEMENT EXECUTE FUNCTION "
        "riskpipe_append_only()",
    ]),
    (6, [  # the facts the report and the review queue aggregate and filter in SQL (riskpipe.ledger.facts)
        *facts.table_statements("BIGINT", "DOUBLE PRECISION"),
        "CREATE TRIGGER facts_no_change BEFORE UPDATE OR DELETE ON facts FOR EACH ROW EXECUTE FUNCTION "
        "riskpipe_append_only()",
        "CREATE TRIGGER facts_no_truncate BEFORE TRUNCATE ON facts FOR EACH STATEMENT EXECUTE FUNCTION "
        "riskpipe_append_only()",
        facts.build_existing,
    ]),
    (7, [  # writers insert unsequenced rows; one integrator at a time gives them seq, chain and tree
        "ALTER TABLE entries DROP CONSTRAINT entries_pkey",
        "ALTER TABLE entries ALTER COLUMN seq DROP NOT NULL, ALTER COLUMN prev_hash DROP NOT NULL, "
        "ALTER COLUMN hash DROP NOT NULL",
        "ALTER TABLE entries ADD COLUMN pid BIGSERIAL NOT NULL",
        "CREATE UNIQUE INDEX entries_seq ON entries (seq)",
        "CREATE UNIQUE INDEX entries_pid ON entries (pid)",
        "CREATE INDEX entries_unsequenced ON entries (pid) WHERE seq IS NULL",
        """CREATE OR REPLACE FUNCTION riskpipe_sequence_only() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          IF TG_OP = 'UPDATE' AND OLD.seq IS NULL AND OLD.hash IS NULL AND NEW.seq IS NOT NULL
             AND NEW.hash IS NOT NULL AND NEW.prev_hash IS NOT NULL AND NEW.pid = OLD.pid
             AND NEW.kind = OLD.kind AND NEW.entry_id = OLD.entry_id AND NEW.record = OLD.record
             AND NEW.scope = OLD.scope
             AND NEW.ts IS NOT DISTINCT FROM OLD.ts THEN
            RETURN NEW;  -- sequencing a row once is the only change allowed
          END IF;
          RAISE EXCEPTION 'ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME;
        END $$""",
        "DROP TRIGGER entries_no_change ON entries",
        "CREATE TRIGGER entries_no_change BEFORE UPDATE OR DELETE ON entries FOR EACH ROW "
        "EXECUTE FUNCTION riskpipe_sequence_only()",
    ]),
    (8, facts.v7_statements(  # p_lower, group codes and hourly counts: the report's cost stays flat
        "BIGINT", "DOUBLE PRECISION", _number_at, unlock=["ALTER TABLE facts DISABLE TRIGGER facts_no_change"],
        lock=["ALTER TABLE facts ENABLE TRIGGER facts_no_change"])),
    (9, facts.v8_statements()),  # a filtered or scoped queue page reads its groups' ranges
]


# "INSERT INTO t (columns) VALUES (?,...,?)": a plain one-row insert (no ON CONFLICT)
_PLAIN_INSERT = re.compile(r"INSERT INTO (\w+) \(([\w, ]+)\) VALUES \((?:\?,\s*)*\?\)")


_IDENTITY = "entries_identity_key"  # the unique (kind, entry_id, scope) constraint (schema 4)


def _insert(db: _Conn, sql: str, rows: list[Row]) -> int:
    """Pipelined inserts (psycopg sums ``rowcount`` over them): rows actually written."""
    with db.conn.cursor() as cur:
        cur.executemany(sql, rows)
        return cur.rowcount


class _AnsweringConnection(psycopg.Connection[Any]):
    """A psycopg connection that waits at most ``answer_within_s`` for each answer of the
    server (one statement, commit, fetch or COPY block), then closes itself and raises
    ``LedgerUnavailable`` (an infrastructure fault: the stage pauses and reconnects).

    Why: a server process that stops answering on a live host (SIGSTOP, a hung backend or
    storage) is not seen by TCP, whose kernel still acknowledges and answers keepalives,
    so libpq waited for ever and the stage with it, past ``infrastructure_timeout_s``.
    The connection is closed because a query may still be running on it. None (the
    default) waits as libpq does: tools that run long statements leave it off."""

    answer_within_s: float | None = None

    def wait(self, gen: Any, interval: Any = None, timeout: float | None = None) -> Any:
        limit = timeout if timeout is not None else self.answer_within_s
        kw = {} if interval is None else {"interval": interval}
        try:
            return super().wait(gen, timeout=limit, **kw)
        except psycopg.errors._WaitTimeout:
            if timeout is not None:  # the caller's own limit (e.g. notifies), not ours
                raise
            self.close()
            raise LedgerUnavailable(f"the server gave no answer within {limit:g} s (answer_within_s); "
                                    "the connection was closed") from None


class _Conn:
    """psycopg with the store's interface: ``?`` placeholders become ``%s``."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self._copy_types: dict[tuple[str, str], list[str]] = {}

    @staticmethod
    def _sql(sql: str, params: object) -> str:
        # without parameters psycopg sends the text as is (a literal % stays single)
        return sql.replace("%", "%%").replace("?", "%s") if params else sql

    def execute(self, sql: str, params: Row = ()) -> Cursor:
        return self.conn.execute(self._sql(sql, params), params or None)

    def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        """``sql`` once per row. A plain ``INSERT ... VALUES (?,...)`` (no ``ON CONFLICT``)
        is sent as one binary ``COPY`` instead: psycopg's pipelined ``executemany`` spends
        ~15 us of Python per row under the GIL, time the stage's certification waits for
        while the ledger writer thread appends beside it; ``COPY`` formats rows in C, and
        in the binary format (the columns' types read once from the catalog) without
        escaping text or printing numbers: a facts row took 6-7 us as text, ~2.5 us so.
        The stored values are the same (a double travels as its 8 bytes, not as text)."""
        m = _PLAIN_INSERT.fullmatch(sql)
        with self.conn.cursor() as cur:
            if m is None:
                cur.executemany(self._sql(sql, True), rows)
                return
            table, columns = m.groups()
            types = self._column_types(table, columns)
            with cur.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
                copy.set_types(types)
                for row in rows:
                    copy.write_row(row)

    def _column_types(self, table: str, columns: str) -> list[str]:
        """The SQL types of ``columns`` ("a, b") of ``table``, as a binary COPY sends them."""
        key = (table, columns)
        if key not in self._copy_types:
            types = dict(self.conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute WHERE attrelid = %s::regclass "
                "AND attnum > 0 AND NOT attisdropped", (table,)).fetchall())
            self._copy_types[key] = [types[c.strip()] for c in columns.split(",")]
        return self._copy_types[key]

    def close(self) -> None:
        self.conn.close()


def _has_table(db: Db, name: str) -> bool:
    return bool(db.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0])


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database named by a ``postgresql://`` DSN."""

    backend = "postgresql"
    record_bytes = "convert_to(record, 'UTF8')"
    tree_nodes_check = ("SELECT string_agg(hash, '' ORDER BY last, level), count(*), sum(CASE WHEN length(hash) = 64 "
                        "AND level BETWEEN 0 AND 62 THEN CASE WHEN (last + 1) % (1::bigint << level) = 0 THEN 0 "
                        "ELSE 1 END ELSE 1 END) FROM tree_nodes WHERE last >= ? AND last < ?")
    number_at = staticmethod(_number_at)
    text_at = staticmethod(_text_at)
    _db: _Conn | None

    def __init__(self, dsn: str, *, timeout: float = 30.0, create: bool = True,
                 dead_after_s: float | None = None, bound_answers: bool = False) -> None:
        """``timeout``: connect and lock timeout; ``dead_after_s``: a silent network fails the
        connection after about this long (default ``timeout``). ``bound_answers``: each answer
        of the server is awaited at most ``timeout + dead_after_s`` (a statement may wait its
        lock timeout, then needs the network's time), the stage's setting; tools that run
        long statements (``ledger verify``, ``report``) leave it off."""
        self.dsn = str(dsn)
        self.answer_within_s: float | None = None  # not while opening: a migration may take long
        self.path: None = None  # no file: readers that need one (the review queue's fast path) check this
        self._init_lock()
        self._db = None
        self.timeout = timeout
        self.dead_after_s = timeout if dead_after_s is None else dead_after_s
        self.reconnects = 0
        self._db = self._connect()
        try:
            if not create and not _has_table(self._db, "entries"):
                raise LedgerError(f"ledger {redact(self.dsn)}: the database holds no ledger (no entries table)")
            with self._conn() as db:  # current already: no lock (an integrator's batch holds the append lock)
                have = current_version(db, _has_table) if _has_table(db, "schema_version") else 0
            if have == latest(STEPS):
                self.schema_version = have
            else:
                with self._write() as db:
                    self.schema_version = migrate(db, STEPS, _has_table, redact(self.dsn))
            if bound_answers:
                limit = self.timeout + self.dead_after_s
                self.answer_within_s = cast(_AnsweringConnection, self._db.conn).answer_within_s = limit
        except psycopg.Error as e:
            self.close()
            raise LedgerError(f"ledger {redact(self.dsn)}: not a usable ledger "
                              f"({str(e).strip().splitlines()[0]})") from None
        except LedgerError:
            self.close()
            raise

    def _connect(self) -> _Conn:
        try:
            conn = _AnsweringConnection.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)),
                                                **self._keepalives())
            conn.answer_within_s = self.answer_within_s
            conn.execute(f"SET lock_timeout = {int(self.timeout * 1000)}")
        except psycopg.Error as e:
            raise LedgerUnavailable(f"ledger {redact(self.dsn)}: cannot connect "
                                    f"({str(e).strip().splitlines()[0]})") from None
        return _Conn(conn)

    def _keepalives(self) -> dict[str, Any]:
        """libpq TCP settings so that a server that stopped answering (a host gone, a network
        partition) fails the connection within about ``dead_after_s`` (an OperationalError:
        the stage's ledger outage) instead of a read waiting for ever: keepalive probes
        from a third of it, and tcp_user_timeout for data sent and never acknowledged.
        Keywords the DSN sets itself are kept. (A server process that is stopped while its
        host's kernel still acknowledges, e.g. SIGSTOP, is not seen by TCP at all:
        ``answer_within_s`` covers that, :class:`_AnsweringConnection`.)"""
        d = self.dead_after_s
        ours = {"keepalives": 1, "keepalives_idle": max(1, int(d / 3)), "keepalives_interval": max(1, int(d / 6)),
                "keepalives_count": 3, "tcp_user_timeout": max(1000, int(d * 1000))}
        try:
            given = psycopg.conninfo.conninfo_to_dict(self.dsn)
        except psycopg.Error:
            given = {}
        return {k: v for k, v in ours.items() if k not in given}

    @contextmanager
    def _conn(self) -> Iterator[_Conn]:
        """The connection, re-opened first if the server dropped it (a restart, a failover):
        the transaction that was running when it went fails; the next one reconnects."""
        with self._lock:
            if self._db is None:
                raise LedgerError(f"{self}: ledger is closed")
            if self._db.conn.broken or self._db.conn.closed:
                self._db = self._connect()
                self.reconnects += 1
            yield self._db

    @contextmanager
    def _write(self) -> Iterator[_Conn]:
        with self._conn() as db, db.conn.transaction():
            db.execute("SELECT pg_advisory_xact_lock(?)", (APPEND_LOCK,))
            yield db

    @contextmanager
    def _read(self) -> Iterator[_Conn]:
        with self._conn() as db, db.conn.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db

    # -- appends: unsequenced inserts; whoever holds the lease sequences them ----------------
    def append_entries(self, entries: Iterable[tuple[str, Record, str | None]],
                       inputs: Iterable[StoredInput] = ()) -> int:
        """Append without waiting for any lock: a writer that can take the integrator
        lease (the append lock, ``pg_try_advisory_xact_lock``) sequences the rows others
        left pending and inserts its own sequenced; a writer that cannot inserts its rows
        unsequenced and commits at once — writers' transactions and commits (fsync)
        overlap — and the lease holder sequences them (:meth:`integrate`).
        De-duplication is the unique (kind, entry id) index; returns how many rows were new."""

        entries = list(entries)
        prepared: list[Pending] = []
        seen: set[tuple[str, str, str]] = set()
        for (kind, eid, ts, text, scope), (_, record, _) in zip(prepare_entries(entries), entries):
            if (kind, eid, scope) not in seen:
                seen.add((kind, eid, scope))
                prepared.append((kind, eid, ts, text, scope, record))
        if not prepared:
            return 0
        with self._conn() as db:
            with db.conn.transaction():
                self._store_inputs(db, inputs, iso_seconds())
                written = self._append_leased(db, prepared) if self._take_lease(db) else None
                if written is None:
                    written = self._insert_unsequenced(db, prepared)
            if self._pending_exists(db):
                self.integrate()
        return written

    def _append_leased(self, db: _Conn, prepared: list[Pending]) -> int | None:
        """Holding the lease: sequence the rows other writers left pending, then insert
        ours already sequenced (one write per row, as with a plain lock). None if a
        concurrent writer inserted one of our ids meanwhile: everything of this step is
        rolled back and the caller inserts ours unsequenced instead."""
        self._integrate_batch(db, _INTEGRATE_BATCH)
        seen = self._existing(db, {(k, e, sc) for k, e, _, _, sc, _ in prepared})
        new = [p for p in prepared if (p[0], p[1], p[4]) not in seen]
        try:
            with db.conn.transaction():  # a savepoint
                rows = self._sequence(db, new)
                if rows:  # one COPY (formatted in C, not ~15 us of Python per row); a raced id makes it fail
                    db.executemany(f"INSERT INTO entries ({_COLUMNS}, scope) VALUES (?,?,?,?,?,?,?,?)", rows)
        except psycopg.errors.UniqueViolation as exc:
            if exc.diag.constraint_name != _IDENTITY:
                raise
            return None
        return len(rows)

    @staticmethod
    def _insert_unsequenced(db: _Conn, prepared: list[Pending]) -> int:
        return _insert(db, "INSERT INTO entries (kind, entry_id, ts, record, scope) VALUES (%s,%s,%s,%s,%s) "
                           "ON CONFLICT (kind, entry_id, scope) DO NOTHING", [p[:5] for p in prepared])

    def integrate(self, batch: int = _INTEGRATE_BATCH) -> int:
        """Sequence pending rows into the chain and tree in batches while this process
        can take the lease; returns how many it sequenced.

        The lease is the append lock, taken per batch transaction without waiting
        (``pg_try_advisory_xact_lock``): one integrator at a time, released at commit,
        rollback or when the holder's connection ends (a killed process included). A
        holder killed mid-batch leaves its batch pending for the next one: nothing lost,
        nothing sequenced twice. Every writer that finds the lease taken commits its rows
        first and then tries again, and every holder looks for pending rows after it
        released the lease, so no committed row is left behind.
        """
        total = 0
        with self._conn() as db:
            while True:
                with db.conn.transaction():
                    if not self._take_lease(db):
                        return total
                    total += self._integrate_batch(db, batch)
                if not self._pending_exists(db):
                    return total

    @staticmethod
    def _take_lease(db: Db) -> bool:
        return bool(db.execute("SELECT pg_try_advisory_xact_lock(?)", (APPEND_LOCK,)).fetchone()[0])

    @staticmethod
    def _pending_exists(db: Db) -> bool:
        return bool(db.execute("SELECT EXISTS (SELECT 1 FROM entries WHERE seq IS NULL)").fetchone()[0])

    def _integrate_batch(self, db: Db, limit: int) -> int:
        """Inside a transaction holding the lease: sequence up to ``limit`` pending rows."""
        pending = db.execute("SELECT pid, kind, entry_id, ts, record, scope FROM entries WHERE seq IS NULL "
                             "ORDER BY pid LIMIT ?", (limit,)).fetchall()
        if not pending:
            return 0
        rows = self._sequence(db, [(k, e, t, r, sc, None) for _, k, e, t, r, sc in pending])
        db.executemany("UPDATE entries SET seq = ?, prev_hash = ?, hash = ? WHERE pid = ?",  # pipelined, by index
                       [(r[0], r[5], r[6], p[0]) for p, r in zip(pending, rows)])
        return len(pending)

    def ping(self) -> None:
        """Raise unless the ledger answers a read and would take a write now: a server that
        turned read-only (a failover onto a standby, ``default_transaction_read_only``)
        answers reads, so a read alone ended the stage's outage at each quiet poll and its
        ``infrastructure_timeout_s`` clock restarted for ever."""
        with self._conn() as db:
            db.execute("SELECT count FROM chain_state WHERE id = 1").fetchone()
            read_only = db.execute("SELECT current_setting('transaction_read_only')").fetchone()[0]
        if read_only == "on":
            raise LedgerUnavailable(f"ledger {redact(self.dsn)}: the server takes no writes (read-only transaction: "
                                    "a standby, or default_transaction_read_only)")

    def pending(self) -> int:
        """Rows written but not yet sequenced into the chain and tree."""
        with self._conn() as db:
            return int(db.execute("SELECT COUNT(*) FROM entries WHERE seq IS NULL").fetchone()[0])

    def _id_filters(self, ids: list[str]) -> Iterator[tuple[str, Row]]:
        """One ``text[]`` parameter for every id: psycopg formats a query of 256 ``%s``
        parameters in Python (~2 us each, under the GIL), an array in C."""
        if ids:
            yield "= ANY(?)", (ids,)

    def _rows(self, db: Db, sql: str, params: Row = (), name: str = "riskpipe_verify") -> Cursor:
        pg = cast(_Conn, db)  # the connection this backend's ``_read`` yields
        cur = pg.conn.cursor(name=name)  # server-side: rows stream, memory stays flat
        cur.itersize = 5000
        cur.execute(pg._sql(sql, params), params or None)
        return cur

    def __str__(self) -> str:
        return redact(self.dsn)

    def __repr__(self) -> str:
        return f"PostgresLedger({redact(self.dsn)!r})"
