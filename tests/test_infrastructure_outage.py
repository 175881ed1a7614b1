"""Infrastructure is not data (issue 19, item 3): a ledger outage pauses the stage, no
valid event is dead-lettered for it, no offset moves past an undecided event, and an
outage longer than ``infrastructure_timeout_s`` stops the stage non-zero without
committing. Real PostgreSQL (its own server: these tests stop it), the real embedded
broker, a user's tabular skops model (not the demo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from pgserver import PostgresServer
from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import load_config
from riskpipe.ledger import open_ledger
from riskpipe.ledger.postgres import PostgresLedger
from riskpipe.ledger.sqlite import SqliteLedger
from riskpipe.stream.broker import EmbeddedBroker
from streamkit import consume_all, policy_with, produce, run_cli, stop, tabular_event, wait_for
from usermodels import cheap_pipeline, tabular_model

pytestmark = pytest.mark.broker

TOPICS = ["inferences", "decisions", "review", "audit", "dlq"]


@pytest.fixture
def pg():
    with PostgresServer() as server:
        yield server


@pytest.fixture
def broker():
    with EmbeddedBroker() as b:
        b.create_topics(TOPICS, partitions=1)
        yield b


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    d = tmp_path_factory.mktemp("wine")
    um = tabular_model(d)
    return d, um, np.load(um.data)["X"]


def wine_events(X, prefix: str, n: int, start: int = 0) -> list[dict]:
    return [tabular_event(f"{prefix}-{i}", X[i % len(X)]) for i in range(start, start + n)]


class OutageLedger(PostgresLedger):
    """The real PostgreSQL ledger; on the ``at``-th id look-up and on the ``at``-th decision
    write the server is stopped (immediate mode: every connection dropped) and started
    again ``down_s`` later on another thread, so the outage falls inside a batch."""

    server: PostgresServer
    at = 3
    down_s = 1.0

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = {"get": 0, "append": 0}
        self.outages: list[str] = []

    def _maybe_fail(self, where: str) -> None:
        self.calls[where] += 1
        if self.calls[where] == self.at:
            self.server.halt()
            self.outages.append(where)
            threading.Timer(self.down_s, self.server.resume).start()

    def get_all_many(self, entry_ids, kind="decision"):  # the stage's id look-up (one per batch)
        self._maybe_fail("get")
        return super().get_all_many(entry_ids, kind)

    def append_entries(self, entries, inputs=()):
        entries = list(entries)
        if any(k == "decision" for k, _, _ in entries):
            self._maybe_fail("append")
        return super().append_entries(entries, inputs)


def committed_offset(bootstrap: str, group: str, topic: str = "inferences") -> int | None:
    from kafka import KafkaConsumer, TopicPartition

    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, 0))
    finally:
        c.close()


def assert_published_match_ledger(bootstrap: str, dsn: str, valid_ids: set[str]) -> dict[str, list]:
    """Every valid id decided exactly once in the ledger, the ledger verifies, every
    audit record published equals its ledger row, and no DLQ record is internal_error."""
    with open_ledger(dsn) as led:
        decided = [e.entry_id for e in led.records(kind="decision")]
        rows = {e.entry_id: e.record for e in led.records(kind="decision")}
        dlq_rows = [e.record for e in led.records(kind="dlq")]
        assert led.verify().ok
    assert len(decided) == len(set(decided)) and set(decided) == valid_ids
    assert all(r["reason"] != "internal_error" for r in dlq_rows), dlq_rows
    out = consume_all(bootstrap, ["audit", "dlq"], timeout=4)
    for m in out["audit"]:
        rec = json.loads(m.value)
        assert rec == rows[rec["id"]]
    assert {json.loads(m.value)["id"] for m in out["audit"]} == valid_ids
    reasons = [dict(m.headers)["__riskpipe.errors.reason"].decode() for m in out["dlq"]]
    assert "internal_error" not in reasons
    return out


def stage_config(tmp_path, broker, dsn: str, um, group: str):
    """A stage config for the wine model on ``broker`` and the ledger ``dsn``: a cheap decide-mode
    policy, small batches, a 3 s infrastructure timeout."""
    policy = policy_with(tmp_path, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                              "max_samples": 200})
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(f"bootstrap_servers: {broker.bootstrap}\nledger: {dsn}\ngroup_id: {group}\n"
                   f"models: {{wine: {{spec: {um.spec}, reference: {um.data}}}}}\npolicy: {policy}\n"
                   "session_timeout_ms: 2000\nheartbeat_interval_ms: 600\nbatch: {max_events: 8, max_wait_ms: 20}\n"
                   "infrastructure_timeout_s: 3\n")
    return cfg


def assert_exited_4_then_resumes(rc: int, err: str, says: str, broker, dsn: str, cfg, group: str, events,
                                 restore) -> None:
    """The stage stopped on a ledger outage of 8 decided events: exit 4 in one line saying
    ``says``, nothing committed past them, nothing dead-lettered; once ``restore()`` makes the
    ledger writable, a stage decides every one of ``events`` (20) once."""
    assert rc == 4, err[-3000:]
    assert "riskpipe: error: ledger unavailable for" in err and "infrastructure_timeout_s 3" in err, err[-3000:]
    assert says in err and "Traceback" not in err, err[-3000:]
    assert committed_offset(broker.bootstrap, group) == 8  # nothing past the undecided events
    assert consume_all(broker.bootstrap, ["dlq"], timeout=2)["dlq"] == []
    restore()
    with open_ledger(dsn) as led:
        assert led.count("decision") == 8 and led.count("dlq") == 0
    p = run_cli(["run", "--config", str(cfg), "--idle-exit", "2"])
    _, err = p.communicate(timeout=180)
    assert p.returncode == 0, err[-3000:]
    assert committed_offset(broker.bootstrap, group) == 20
    assert_published_match_ledger(broker.bootstrap, dsn, {e["id"] for e in events})


def run_until_idle(stage, led) -> None:
    """Run ``stage`` on a thread until it has been idle a second (at most 180 s), stop it and
    close ``led``; it must have ended on its own, raising nothing."""
    errors = []

    def run():
        try:
            stage.run(idle_exit_s=1.0)
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout=180)
    alive = t.is_alive()
    stage.stop()
    led.close()
    assert not alive and not errors, errors


def test_classifier_tells_infrastructure_from_data():
    import sqlite3

    import psycopg
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    from riskpipe.ledger import LedgerError, LedgerUnavailable
    from riskpipe.stream.infra import infrastructure_component
    from riskpipe.stream.io import SinkError

    infra = [
        (psycopg.OperationalError("server closed the connection unexpectedly"), "ledger"),
        (psycopg.InterfaceError("the connection is closed"), "ledger"),
        (psycopg.errors.AdminShutdown("terminating connection due to administrator command"), "ledger"),
        (LedgerUnavailable("ledger postgresql://u:***@h/db: cannot connect"), "ledger"),
        (sqlite3.OperationalError("database is locked"), "ledger"),
        (sqlite3.OperationalError("disk I/O error"), "ledger"),
        (KafkaConnectionError("no brokers"), "broker"),
        (KafkaTimeoutError("timed out"), "broker"),
        (SinkError("send not acknowledged"), "broker"),
        (ConnectionResetError("reset"), "broker"),
    ]
    for exc, component in infra:
        assert infrastructure_component(exc) == component, exc
    wrapped = RuntimeError("while appending")
    wrapped.__cause__ = psycopg.OperationalError("connection lost")
    assert infrastructure_component(wrapped) == "ledger"
    data = [LedgerError("record: canonical JSON refuses NaN"), ValueError("bad"), ArithmeticError("model"),
            sqlite3.OperationalError("no such table: entries"), psycopg.errors.UniqueViolation("dup"),
            psycopg.DataError("invalid input"), FileNotFoundError("policy.yaml"), KeyError("x")]
    for exc in data:
        assert infrastructure_component(exc) is None, exc


def test_an_infrastructure_error_is_named_once_on_one_redacted_line():
    """kafka-python's errors begin their message with their type's name, and the stage named
    the type before it: 'KafkaTimeoutError: KafkaTimeoutError: Failed to update metadata' in
    every outage line and in the exit message. Now the type once, the message on one line
    and redacted."""
    from kafka.errors import KafkaTimeoutError

    from riskpipe.stream.infra import InfrastructureUnavailable, describe

    timeout = KafkaTimeoutError("Failed to update metadata after 60.0 secs.")
    assert describe(timeout) == "KafkaTimeoutError: Failed to update metadata after 60.0 secs."
    assert describe(KafkaTimeoutError()) == "KafkaTimeoutError"
    assert describe(OSError("connect to\npostgresql://u:s3cret@h/db failed")) == \
        "OSError: connect to postgresql://u:***@h/db failed"
    message = str(InfrastructureUnavailable("broker", 301.0, 300.0, timeout))
    assert message.count("KafkaTimeoutError") == 1 and "Failed to update metadata" in message, message


def test_real_server_errors_that_end_the_session_or_refuse_writes_are_infrastructure(pg_url, tmp_path):
    """Errors raised by the real PostgreSQL and SQLite, not made by hand: the server's FATAL
    25P03 (idle-in-transaction timeout: it closes the connection) and 25006 (a read-only
    transaction, as on a standby after a failover) are psycopg InternalError, and a SQLite
    file that became read-only says "attempt to write a readonly database"; each is the
    ledger being unavailable, never the event's fault. A unique violation stays data."""
    import sqlite3

    import psycopg

    from riskpipe.stream.infra import infrastructure_component

    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("CREATE TABLE t (x int PRIMARY KEY)")
        c.execute("INSERT INTO t VALUES (1)")
        with pytest.raises(psycopg.errors.UniqueViolation) as dup:
            c.execute("INSERT INTO t VALUES (1)")
    assert infrastructure_component(dup.value) is None

    with psycopg.connect(pg_url) as c:
        c.execute("SET idle_in_transaction_session_timeout = '100ms'")
        c.commit()
        c.execute("SELECT 1")  # a transaction is open; the client stalls inside it
        time.sleep(0.6)
        with pytest.raises(psycopg.Error) as idle:
            c.execute("INSERT INTO t VALUES (2)")
        assert c.broken or c.closed
    assert idle.value.sqlstate == "25P03" and not isinstance(idle.value, psycopg.OperationalError), idle.value
    assert infrastructure_component(idle.value) == "ledger"
    wrapped = RuntimeError("while appending")
    wrapped.__cause__ = idle.value
    assert infrastructure_component(wrapped) == "ledger"

    with psycopg.connect(pg_url, autocommit=True) as c:
        c.execute("SET default_transaction_read_only = on")
        with pytest.raises(psycopg.Error) as ro:
            c.execute("INSERT INTO t VALUES (3)")
    assert ro.value.sqlstate == "25006" and isinstance(ro.value, psycopg.InternalError), ro.value
    assert infrastructure_component(ro.value) == "ledger"

    path = tmp_path / "ro.db"
    sqlite3.connect(path).executescript("CREATE TABLE t (x int); INSERT INTO t VALUES (1);")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with pytest.raises(sqlite3.OperationalError) as lite:
            db.execute("INSERT INTO t VALUES (2)")
    finally:
        db.close()
    assert "readonly" in str(lite.value)
    assert infrastructure_component(lite.value) == "ledger"


class StallingLedger(PostgresLedger):
    """The real PostgreSQL ledger whose writer stalls ``stall_s`` inside its transaction on
    its first ``stalls`` decision writes (a GC pause, a CPU-starved pod): with the
    database's idle_in_transaction_session_timeout shorter, the server ends the session."""

    stalls = 2
    stall_s = 0.6

    def _sequence(self, db, items):  # type: ignore[override]
        if self.stalls > 0 and any(it[0] == "decision" for it in items):
            self.stalls -= 1
            time.sleep(self.stall_s)
        return PostgresLedger._sequence(db, items)


def test_a_session_the_server_ends_mid_write_is_retried_not_dead_lettered(pg, broker, wine):
    """PostgreSQL ends the stage's session inside a ledger write (idle-in-transaction
    timeout, SQLSTATE 25P03, a psycopg InternalError): the stage pauses and retries; every
    event is decided exactly once and none is dead-lettered (it was internal_error, with
    its offset committed: a decision lost)."""
    import psycopg

    from riskpipe.app.compose import build_stage
    from riskpipe.app.config import load_config

    d, um, X = wine
    dsn = pg.create_database("idle")
    with open_ledger(dsn):
        pass
    with psycopg.connect(pg.url(), autocommit=True) as c:
        c.execute("ALTER DATABASE idle SET idle_in_transaction_session_timeout = '200ms'")
    events = wine_events(X, "i", 16)
    produce(broker.bootstrap, events)
    cfg = load_config(None, bootstrap_servers=broker.bootstrap, ledger=dsn, session_timeout_ms=2000,
                      heartbeat_interval_ms=600, batch={"max_events": 8, "max_wait_ms": 20}, group_id="g-idle",
                      infrastructure_timeout_s=60)
    led = StallingLedger(dsn)
    stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led)
    run_until_idle(stage, led)
    assert stage.stats.infrastructure_retries["ledger"] >= 1, stage.stats
    assert stage.stats.decided == 16 and not stage.stats.dlq, stage.stats
    assert committed_offset(broker.bootstrap, "g-idle") == 16
    out = assert_published_match_ledger(broker.bootstrap, dsn, {e["id"] for e in events})
    assert out["dlq"] == []


def test_a_read_only_postgresql_pauses_the_stage_and_exits_4_dead_lettering_nothing(pg, broker, wine, tmp_path):
    """PostgreSQL turns read-only mid-run (default_transaction_read_only, as a failover onto
    a standby leaves it; SQLSTATE 25006, a psycopg InternalError): the stage pauses and
    retries, past infrastructure_timeout_s exits 4 in one line with nothing dead-lettered
    and nothing committed past the decided events (it crashed with a traceback, exit 1);
    once the database is writable again a stage decides the waiting events."""
    import psycopg

    _d, um, X = wine
    dsn = pg.create_database("readonly")
    cfg = stage_config(tmp_path, broker, dsn, um, "g-ro")
    first, second = wine_events(X, "a", 8), wine_events(X, "b", 12, start=8)
    produce(broker.bootstrap, first)

    def read_only(on: bool) -> None:
        with psycopg.connect(pg.url(), autocommit=True) as c:
            c.execute("ALTER SYSTEM SET default_transaction_read_only = on" if on
                      else "ALTER SYSTEM RESET default_transaction_read_only")
            c.execute("SELECT pg_reload_conf()")

    p = run_cli(["run", "--config", str(cfg)])
    try:
        assert wait_for(lambda: committed_offset(broker.bootstrap, "g-ro") == 8, 120)
        read_only(True)
        time.sleep(0.5)
        produce(broker.bootstrap, second)
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            rc, err = stop(p)
            raise AssertionError(f"the stage did not stop: {err[-3000:]}") from None
        rc = p.returncode
    finally:
        if p.poll() is None:
            stop(p)
    assert_exited_4_then_resumes(rc, err, "read-only transaction", broker, dsn, cfg, "g-ro", first + second,
                                 lambda: read_only(False))


class StoppedBackendLedger(PostgresLedger):
    """The real PostgreSQL ledger; before the ``at``-th id look-up, the server process that
    serves this connection is stopped (SIGSTOP): a hung backend on a live host, whose
    kernel still acknowledges TCP and answers keepalives, so no TCP setting sees it."""

    at = 2

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.calls = 0
        self.stopped: list[int] = []

    def get_all_many(self, entry_ids, kind="decision"):
        self.calls += 1
        if self.calls == self.at:
            with self._conn() as db:
                pid = db.execute("SELECT pg_backend_pid()").fetchone()[0]
            os.kill(pid, signal.SIGSTOP)
            self.stopped.append(pid)
        return super().get_all_many(entry_ids, kind)


def test_a_postgresql_backend_that_stops_answering_is_abandoned_and_every_event_decided_once(pg, broker, wine):
    """The backend of the stage's look-up connection is stopped mid-run (SIGSTOP). libpq
    waited for its answer for ever, and the stage with it, past infrastructure_timeout_s.
    Now each answer is awaited at most answer_within_s: the connection is closed, the
    stage pauses as for any ledger outage, reconnects, and decides every event once,
    dead-lettering none."""
    from riskpipe.app.compose import build_stage
    from riskpipe.metrics import StageMetrics

    d, um, X = wine
    dsn = pg.create_database("stopped")
    events = wine_events(X, "h", 32)
    produce(broker.bootstrap, events)
    cfg = load_config(None, bootstrap_servers=broker.bootstrap, ledger=dsn, session_timeout_ms=2000,
                      heartbeat_interval_ms=600, batch={"max_events": 8, "max_wait_ms": 20}, group_id="g-stopped",
                      infrastructure_timeout_s=60)
    led = StoppedBackendLedger(dsn, timeout=2, dead_after_s=2, bound_answers=True)
    metrics = StageMetrics()
    stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led, metrics=metrics)
    try:
        t0 = time.monotonic()
        run_until_idle(stage, led)
        took = time.monotonic() - t0
    finally:
        for pid in led.stopped:  # the server's process: let it see its closed socket and end
            os.kill(pid, signal.SIGCONT)
    assert len(led.stopped) == 1 and took < 120
    assert stage.stats.infrastructure_retries["ledger"] >= 1
    assert stage.stats.decided == 32 and sum(stage.stats.dlq.values()) == 0, stage.stats
    assert committed_offset(broker.bootstrap, "g-stopped") == 32
    assert_published_match_ledger(broker.bootstrap, dsn, {e["id"] for e in events})
    assert metrics.infrastructure_retries.labels("ledger")._value.get() >= 1


class ReadOnlyLaterLedger(SqliteLedger):
    """A SQLite ledger whose writes fail as a read-only file's do (``PRAGMA query_only``:
    SQLITE_READONLY) once ``read_only`` is set, while reads still answer: a disk remounted
    read-only, or a file whose write permission went away under a stage that is not root.
    The flag is the class's, so that the stage writer's own connection (a copy) sees it."""

    read_only = False

    def _txn(self, begin):
        with self._conn() as db:
            db.execute(f"PRAGMA query_only = {'ON' if self.read_only else 'OFF'}")
        return super()._txn(begin)


def test_a_read_only_sqlite_ledger_pauses_the_stage_then_stops_it_dead_lettering_nothing(broker, wine, tmp_path):
    """A SQLite ledger that turns read-only mid-run: the stage pauses, retries, and past
    infrastructure_timeout_s stops with InfrastructureUnavailable naming the ledger, nothing
    dead-lettered and nothing committed past the decided events. Its outage probe read the
    ledger only, so each quiet poll ended the outage and restarted its clock: the stage
    retried for ever (as PostgreSQL's did, before its probe asked for writes)."""
    from riskpipe.app.compose import build_stage
    from riskpipe.app.config import load_config
    from riskpipe.stream.infra import InfrastructureUnavailable

    d, um, X = wine
    path = tmp_path / "ro.sqlite"
    cfg = load_config(None, bootstrap_servers=broker.bootstrap, ledger=str(path), session_timeout_ms=2000,
                      heartbeat_interval_ms=600, batch={"max_events": 8, "max_wait_ms": 20}, group_id="g-sqlite-ro",
                      infrastructure_timeout_s=3)
    first, second = wine_events(X, "a", 8), wine_events(X, "b", 12, start=8)
    produce(broker.bootstrap, first)
    led = ReadOnlyLaterLedger(path)
    stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led)
    errors: list[BaseException] = []

    def run():
        try:
            stage.run()
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    try:
        assert wait_for(lambda: committed_offset(broker.bootstrap, "g-sqlite-ro") == 8, 120)
        ReadOnlyLaterLedger.read_only = True
        produce(broker.bootstrap, second)
        t.join(timeout=60)
        stopped = not t.is_alive()
    finally:
        stage.stop()
        t.join(timeout=30)
        ReadOnlyLaterLedger.read_only = False
    assert stopped, "the stage retried a read-only ledger for ever"
    assert len(errors) == 1 and isinstance(errors[0], InfrastructureUnavailable), errors
    assert str(errors[0]).startswith("ledger unavailable for") and "readonly" in str(errors[0]), errors[0]
    assert committed_offset(broker.bootstrap, "g-sqlite-ro") == 8
    assert consume_all(broker.bootstrap, ["dlq"], timeout=2)["dlq"] == []
    assert led.count("decision") == 8 and led.count("dlq") == 0 and led.verify().ok
    led.close()


def test_postgresql_stopped_inside_batches_decides_every_event_once(pg, broker, wine, tmp_path):
    """PostgreSQL stops for about a second during one batch's id look-ups and again during
    another batch's ledger write: every valid event is decided exactly once, none is
    dead-lettered as internal_error, the malformed ones are dead-lettered with their
    reason, offsets reach the end only once everything is decided, and --idle-exit
    does not count the outages as idle."""
    from riskpipe.app.compose import build_stage
    from riskpipe.app.config import load_config
    from riskpipe.metrics import StageMetrics

    d, um, X = wine
    dsn = pg.create_database("outage")
    events = wine_events(X, "w", 48)
    junk = [(b'{"id": "junk-1", "model": "wine"}', []), (b"not json", [])]
    produce(broker.bootstrap, events[:24] + junk + events[24:])
    cfg = load_config(None, bootstrap_servers=broker.bootstrap, ledger=dsn, session_timeout_ms=2000,
                      heartbeat_interval_ms=600, batch={"max_events": 8, "max_wait_ms": 20}, group_id="g-outage",
                      infrastructure_timeout_s=60)
    OutageLedger.server = pg
    led = OutageLedger(dsn)
    metrics = StageMetrics()
    stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led, metrics=metrics)
    run_until_idle(stage, led)
    assert led.outages == ["get", "append"]
    assert stage.stats.infrastructure_retries["ledger"] >= 2
    assert stage.stats.decided == 48 and sum(stage.stats.dlq.values()) == 2, stage.stats
    assert "internal_error" not in stage.stats.dlq
    assert committed_offset(broker.bootstrap, "g-outage") == 50
    out = assert_published_match_ledger(broker.bootstrap, dsn, {e["id"] for e in events})
    assert len(out["dlq"]) >= 2
    retries = metrics.infrastructure_retries.labels("ledger")._value.get()
    assert retries >= 2 and metrics.infrastructure_outage._value.get() == 0


def test_an_outage_longer_than_the_timeout_exits_without_committing(pg, broker, wine, tmp_path):
    """PostgreSQL stays down past infrastructure_timeout_s: the stage exits 4 with one line,
    commits nothing past the last decided event and dead-letters nothing; a stage started
    once PostgreSQL is back decides the waiting events."""
    _d, um, X = wine
    dsn = pg.create_database("timeout")
    cfg = stage_config(tmp_path, broker, dsn, um, "g-timeout")
    first, second = wine_events(X, "a", 8), wine_events(X, "b", 12, start=8)
    produce(broker.bootstrap, first)
    p = run_cli(["run", "--config", str(cfg)])
    try:
        assert wait_for(lambda: committed_offset(broker.bootstrap, "g-timeout") == 8, 120)
        pg.halt()
        produce(broker.bootstrap, second)
        _, err = p.communicate(timeout=120)
        rc = p.returncode
    finally:
        if p.poll() is None:
            stop(p)
    assert_exited_4_then_resumes(rc, err, "stopped without committing", broker, dsn, cfg, "g-timeout",
                                 first + second, pg.resume)


def test_an_unreachable_broker_is_retried_then_stops_the_stage(wine, tmp_path):
    """No broker answers: the stage retries with backoff (counted per component), an
    ``idle_exit_s`` shorter than the outage does not end it as "idle", and past
    infrastructure_timeout_s it raises InfrastructureUnavailable naming the broker."""
    from pgserver import free_port
    from riskpipe.app.compose import build_stage
    from riskpipe.app.config import load_config
    from riskpipe.metrics import StageMetrics
    from riskpipe.stream.infra import InfrastructureUnavailable

    d, um, _ = wine
    cfg = load_config(None, bootstrap_servers=f"127.0.0.1:{free_port()}", ledger=str(tmp_path / "l.sqlite"),
                      infrastructure_timeout_s=3)
    metrics = StageMetrics()
    with open_ledger(cfg.ledger) as led:
        stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led, metrics=metrics)
        with pytest.raises(InfrastructureUnavailable, match=r"^broker unavailable for \d+\.\d s "
                                                            r"\(infrastructure_timeout_s 3\)"):
            stage.run(idle_exit_s=0.5)
        assert led.count("decision") == 0
    assert stage.stats.infrastructure_retries["broker"] >= 2
    assert metrics.infrastructure_retries.labels("broker")._value.get() >= 2
    assert metrics.infrastructure_outage._value.get() == 1


def test_an_idle_stage_reports_a_dead_broker_on_broker_up_and_its_return(broker, wine, tmp_path, caplog):
    """The broker dies while the stage has nothing to read: kafka-python's poll raises
    nothing then, so riskpipe_broker_up stayed 1 and the broker alert could not fire for an
    idle stage. The gauge now follows the consumer's coordinator every turn: 0 within a few
    heartbeats of the broker's death, 1 again once a broker answers; each change is logged
    once, and the stage keeps running through it."""
    import logging

    from riskpipe.app.compose import build_stage
    from riskpipe.app.config import load_config
    from riskpipe.metrics import StageMetrics

    d, um, X = wine
    cfg = load_config(None, bootstrap_servers=broker.bootstrap, ledger=str(tmp_path / "l.sqlite"),
                      session_timeout_ms=2000, heartbeat_interval_ms=600, group_id="g-idle-broker",
                      batch={"max_events": 8, "max_wait_ms": 20})
    produce(broker.bootstrap, wine_events(X, "a", 4))
    metrics = StageMetrics()
    up = metrics.broker_up._value.get
    with open_ledger(cfg.ledger) as led:
        stage = build_stage(cfg, pipeline=cheap_pipeline(d, "wine", um), ledger=led, metrics=metrics)
        t = threading.Thread(target=stage.run, daemon=True)
        caplog.set_level(logging.WARNING, logger="riskpipe.stream")
        t.start()
        try:
            assert wait_for(lambda: stage.stats.decided == 4, 120) and up() == 1
            broker.stop()
            assert wait_for(lambda: up() == 0, 30), "riskpipe_broker_up stayed 1 with the broker gone"
            assert t.is_alive()
            broker.start()
            broker.create_topics(TOPICS, partitions=1)
            assert wait_for(lambda: up() == 1, 60), "riskpipe_broker_up stayed 0 with the broker back"
            assert t.is_alive()
        finally:
            stage.stop()
            t.join(timeout=60)
    assert not t.is_alive()
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("broker ")]
    assert said[:2] == ["broker unreachable: the consumer lost its group coordinator (riskpipe_broker_up 0)",
                        "broker reachable again"], said


class _NullSink:
    def send(self, *args, **kwargs):
        pass

    def flush(self, timeout=30.0):
        pass

    def close(self):
        pass


def _stalled_source(committed: dict, opens: list, unreadable_at=("inferences", 0, 7)):
    """kafka-python at a record it cannot decode: partition 0 raises once per consumer (each
    re-open fetches the record again), then gives nothing; partition 1 has live traffic."""
    import json as _json

    from riskpipe.stream.events import make_event
    from riskpipe.stream.io import UnreadableRecord
    from riskpipe.stream.ports import Message, SourceBase

    rng = np.random.default_rng(0)

    class StalledSource(SourceBase):
        def __init__(self, on_revoke=None):
            opens.append(1)
            self.raised, self.polls, self.next1 = False, 0, committed.get(1, 0)

        def poll(self, max_records, timeout_ms):
            time.sleep(0.02)
            self.polls += 1
            if not self.raised and self.polls > 2:
                self.raised = True
                raise UnreadableRecord("inferences-0 offset 7: the Kafka client cannot decode this record",
                                       unreadable_at)
            ev = make_event(f"p1-{self.next1}", "digits", rng.random((1, 8, 8), dtype=np.float32))
            m = Message(_json.dumps(ev).encode(), "inferences", 1, self.next1)
            self.next1 += 1
            return [m]

        def commit(self, messages):
            for m in messages:
                committed[m.partition] = m.offset + 1

        def close(self):
            pass

    return StalledSource


def test_a_partition_stalled_at_an_unreadable_record_stops_the_stage_though_others_flow():
    """Batches of the other partitions committed, and each commit ended the outage: a new
    one, with a new clock, began at every error, and the stage never exited (the review
    helper's model of kafka-python, infrastructure_timeout_s 2: still running after 20 s,
    56 re-opens). Only a committed message of the stalled partition past its record ends
    such an outage now."""
    from riskpipe.stream.infra import InfrastructureUnavailable
    from riskpipe.stream.stage import Stage

    cfg = load_config(None, infrastructure_timeout_s=2, batch={"max_events": 8, "max_wait_ms": 10})
    committed, opens = {}, []
    stage = Stage(cfg, build_pipeline(cfg), _stalled_source(committed, opens), lambda: _NullSink())
    t0 = time.monotonic()
    with pytest.raises(InfrastructureUnavailable, match="inferences-0 offset 7"):
        stage.run()
    assert time.monotonic() - t0 < 15 and committed.get(1, 0) > 0  # partition 1 was decided meanwhile


def test_a_guard_tripping_on_what_came_before_an_unreadable_record_still_stops_the_stage():
    """Deciding what was read before the unreadable record swallowed every exception, a
    tripped DLQ guard too: the stage went on into the broker outage instead of stopping."""
    from riskpipe.stream.guard import GuardTripped
    from riskpipe.stream.io import UnreadableRecord
    from riskpipe.stream.ports import Message, SourceBase
    from riskpipe.stream.stage import Stage

    cfg = load_config(None, infrastructure_timeout_s=2, batch={"max_events": 100, "max_wait_ms": 5000},
                      guard={"max_consecutive_invalid": 3})

    class Source(SourceBase):
        def __init__(self, on_revoke=None):
            self.polls = 0

        def poll(self, max_records, timeout_ms):
            self.polls += 1
            if self.polls == 1:  # all invalid: a misconfigured producer
                return [Message(b"{broken", "inferences", 0, i) for i in range(5)]
            raise UnreadableRecord("inferences-0 offset 5: cannot decode", ("inferences", 0, 5))

        def commit(self, messages):
            pass

        def close(self):
            pass

    with pytest.raises(GuardTripped):
        Stage(cfg, build_pipeline(cfg), Source, lambda: _NullSink()).run()
