"""The shared backend: one PostgreSQL database (psycopg 3) for every stage process,
replica, ingest worker, review console and report.

Concurrency — one chain, appends serialised
--------------------------------------------
Every append transaction first takes a transaction-level advisory lock
(``pg_advisory_xact_lock``), then reads the head, skips (kind, entry id) pairs already
stored — by any writer, so de-duplication holds across replicas — and inserts its rows
with consecutive ``seq``. The lock is released at commit or rollback, including when a
writer's process is killed (its connection ends). The alternative, one chain per
writer with a combined verification, would let writers proceed in parallel but make
"the ledger" a set of chains whose union a verifier must reassemble and whose
de-duplication still needs a shared index; one chain keeps the export, the checkpoint
and ``verify`` exactly as on SQLite.

The cost, measured by ``bench/bench_ledger.py`` (bench/results/ledger.json; a shared,
noisy 2-core machine; PostgreSQL 15 with fsync=on next to SQLite synchronous=FULL, ~2.0 KB
decision records): with batches of 256 (the stage's default) 1 / 2 / 4 writer processes
appended 2112 / 2288 / 2980 rows/s on PostgreSQL (SQLite 3475 / 2405 / 3174); with
batches of 16, 425 / 609 / 544 rows/s (SQLite 1281 / 1855 / 1355). Writers wait for
the lock rather than add throughput: size the database for the total decision rate.
``verify`` took 31.6 s per 100,000 rows on PostgreSQL (SQLite 22.0 s), bound by
re-hashing and re-parsing every record in Python.

Tamper evidence: UPDATE, DELETE and TRUNCATE on ``entries`` and ``checkpoints`` are
refused by triggers; a superuser can disable them, which ``verify`` then detects
(and a signed checkpoint detects even when the chain was recomputed).
"""

from __future__ import annotations

from contextlib import contextmanager

from riskpipe.ledger.chain import GENESIS, LedgerError, LedgerUnavailable
from riskpipe.ledger.inputs import table_statements as input_tables
from riskpipe.ledger.migrations import Step, chain_tables, checkpoint_tables, migrate, scope_sql
from riskpipe.ledger import redact
from riskpipe.ledger import facts
from riskpipe.ledger.store import Ledger
from riskpipe.ledger.tree import build_existing, tree_tables


def _text_at(path: str) -> str:
    p = "{" + path.replace(".", ",") + "}"
    return f"CASE WHEN jsonb_typeof(record::jsonb #> '{p}') = 'string' THEN record::jsonb #>> '{p}' ELSE '' END"


def _number_at(path: str) -> str:
    """A numeric field of the record (NULL when absent or not a number)."""
    p = "{" + path.replace(".", ",") + "}"
    return (f"CASE WHEN jsonb_typeof(record::jsonb #> '{p}') = 'number' "
            f"THEN (record::jsonb #>> '{p}')::double precision END")


APPEND_LOCK = 0x7269736B  # "risk": the advisory lock key every appender takes
_REFUSE = """CREATE OR REPLACE FUNCTION riskpipe_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'ledger is append-only (% on %)', TG_OP, TG_TABLE_NAME; END $$"""

STEPS: list[Step] = [
    (1, [
        *chain_tables("BIGINT"),
        f"INSERT INTO chain_state (id, count, head) VALUES (1, 0, '{GENESIS}')",
        _REFUSE,
        "CREATE TRIGGER entries_no_change BEFORE UPDATE OR DELETE ON entries FOR EACH ROW EXECUTE FUNCTION riskpipe_append_only()",
        "CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries FOR EACH STATEMENT EXECUTE FUNCTION riskpipe_append_only()",
    ]),
    (2, [
        *checkpoint_tables("id BIGSERIAL PRIMARY KEY", "BIGINT"),
        "CREATE TRIGGER checkpoints_no_change BEFORE UPDATE OR DELETE ON checkpoints FOR EACH ROW EXECUTE FUNCTION riskpipe_append_only()",
        "CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON checkpoints FOR EACH STATEMENT EXECUTE FUNCTION riskpipe_append_only()",
    ]),
    (3, [  # the RFC 9162 Merkle tree over the rows, and C2SP signed notes (checkpoints)
        *tree_tables("BIGINT"),
        *(stmt for t in ("tree_nodes", "signed_notes") for stmt in (
            f"CREATE TRIGGER {t}_no_change BEFORE UPDATE OR DELETE ON {t} FOR EACH ROW EXECUTE FUNCTION riskpipe_append_only()",
            f"CREATE TRIGGER {t}_no_truncate BEFORE TRUNCATE ON {t} FOR EACH STATEMENT EXECUTE FUNCTION riskpipe_append_only()")),
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
        "CREATE TRIGGER inputs_no_change BEFORE UPDATE OR DELETE ON inputs FOR EACH ROW EXECUTE FUNCTION riskpipe_append_only()",
        "CREATE TRIGGER inputs_no_truncate BEFORE TRUNCATE ON inputs FOR EACH STATEMENT EXECUTE FUNCTION riskpipe_append_only()",
    ]),
    (6, [  # the facts the report and the review queue aggregate and filter in SQL (riskpipe.ledger.facts)
        *facts.table_statements("BIGINT", "DOUBLE PRECISION"),
        "CREATE TRIGGER facts_no_change BEFORE UPDATE OR DELETE ON facts FOR EACH ROW EXECUTE FUNCTION riskpipe_append_only()",
        "CREATE TRIGGER facts_no_truncate BEFORE TRUNCATE ON facts FOR EACH STATEMENT EXECUTE FUNCTION riskpipe_append_only()",
        facts.build_existing,
    ]),
]


class _Conn:
    """psycopg with the store's interface: ``?`` placeholders become ``%s``."""

    def __init__(self, conn) -> None:
        self.conn = conn

    @staticmethod
    def _sql(sql: str, params) -> str:
        # without parameters psycopg sends the text as is (a literal % stays single)
        return sql.replace("%", "%%").replace("?", "%s") if params else sql

    def execute(self, sql: str, params: tuple = ()):
        return self.conn.execute(self._sql(sql, params), params or None)

    def executemany(self, sql: str, rows) -> None:
        with self.conn.cursor() as cur:
            cur.executemany(self._sql(sql, True), rows)

    def close(self) -> None:
        self.conn.close()


def _has_table(db, name: str) -> bool:
    return db.execute("SELECT to_regclass(?) IS NOT NULL", (name,)).fetchone()[0]


class PostgresLedger(Ledger):
    """The ledger in a PostgreSQL database named by a ``postgresql://`` DSN."""

    backend = "postgresql"
    number_at = staticmethod(_number_at)

    def __init__(self, dsn: str, *, timeout: float = 30.0, create: bool = True) -> None:
        import psycopg

        self.dsn = str(dsn)
        self.path = None  # no file: readers that need one (the review queue's fast path) check this
        self._init_lock()
        self._db = None
        self.timeout = timeout
        self.reconnects = 0
        self._db = self._connect()
        try:
            if not create and not _has_table(self._db, "entries"):
                raise LedgerError(f"ledger {redact(self.dsn)}: the database holds no ledger (no entries table)")
            with self._write() as db:
                self.schema_version = migrate(db, STEPS, _has_table, redact(self.dsn))
        except psycopg.Error as e:
            self.close()
            raise LedgerError(f"ledger {redact(self.dsn)}: not a usable ledger ({str(e).strip().splitlines()[0]})") from None
        except LedgerError:
            self.close()
            raise

    def _connect(self) -> _Conn:
        import psycopg

        try:
            conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=max(1, int(self.timeout)))
            conn.execute(f"SET lock_timeout = {int(self.timeout * 1000)}")
        except psycopg.Error as e:
            raise LedgerUnavailable(f"ledger {redact(self.dsn)}: cannot connect ({str(e).strip().splitlines()[0]})") from None
        return _Conn(conn)

    @contextmanager
    def _conn(self):
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
    def _write(self):
        with self._conn() as db, db.conn.transaction():
            db.execute("SELECT pg_advisory_xact_lock(?)", (APPEND_LOCK,))
            yield db

    @contextmanager
    def _read(self):
        with self._conn() as db, db.conn.transaction():
            db.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            yield db

    def _rows(self, db, sql: str, params: tuple = (), name: str = "riskpipe_verify"):
        cur = db.conn.cursor(name=name)  # server-side: rows stream, memory stays flat
        cur.itersize = 5000
        cur.execute(db._sql(sql, params), params or None)
        return cur

    def __str__(self) -> str:
        return redact(self.dsn)

    def __repr__(self) -> str:
        return f"PostgresLedger({redact(self.dsn)!r})"
