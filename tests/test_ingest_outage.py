"""`riskpipe ledger ingest` over an unavailable ledger: it waits (the stage's backoff),
never a traceback, every message once; past its timeout one line and exit 4."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from kafka import KafkaProducer

from ledger_records import decision_record
from riskpipe.ledger import open_ledger
from riskpipe.stream.broker import EmbeddedBroker

pytestmark = pytest.mark.broker


def _produce(bootstrap: str, records: list[dict]) -> None:
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for rec in records:
        p.send("audit", key=rec["id"].encode(), value=json.dumps(rec).encode())
    p.flush()
    p.close()


def _count(url: str) -> int:
    try:
        with open_ledger(url) as led:
            return led.count("decision")
    except Exception:  # noqa: BLE001 - not made yet
        return 0


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.2)
    return False


def test_ingest_waits_for_a_postgresql_ledger_that_goes_away_and_ingests_every_message_once():
    from pgserver import PostgresServer

    records = [decision_record(i) for i in range(60)]
    with PostgresServer() as pg, EmbeddedBroker() as broker:
        url = pg.create_database("ingest_outage")
        broker.create_topics(["audit"], partitions=2)
        _produce(broker.bootstrap, records[:30])
        proc = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "ledger", "ingest", "--bootstrap-servers",
                                 broker.bootstrap, "--topic", "audit", "--ledger", url, "--until-idle", "8"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert _wait(lambda: _count(url) >= 30, 60)
            pg.halt()  # mid-run: the next write fails (before: a psycopg traceback, exit 1)
            _produce(broker.bootstrap, records[30:])
            time.sleep(5)
            assert proc.poll() is None
            pg.resume()
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.communicate()
        assert proc.returncode == 0, err
        assert "Traceback" not in err and "ledger unavailable" in err, err
        with open_ledger(url) as led:
            assert led.verify().ok
            assert sorted(e.entry_id for e in led.records("decision")) == sorted(r["id"] for r in records)
        assert "ingested 60 messages" in out


def test_ingest_past_its_timeout_exits_4_in_one_line(tmp_path, capsys):
    from pgserver import PostgresServer
    from riskpipe.cli.ledger_impl import ingest_topics
    from riskpipe.kafka_clients import KafkaSettings

    with PostgresServer() as pg, EmbeddedBroker() as broker:
        url = pg.create_database("ingest_timeout")
        broker.create_topics(["audit"], partitions=1)
        _produce(broker.bootstrap, [decision_record(i) for i in range(3)])
        pg.halt()
        with pytest.raises(SystemExit) as exc:
            ingest_topics(KafkaSettings(bootstrap_servers=broker.bootstrap), {"audit": "decision"}, url, "g",
                          until_idle=3, ledger_timeout_s=1.0)
        assert exc.value.code == 4
        err = capsys.readouterr().err
        assert "riskpipe: error: ledger ingest: ledger unavailable for" in err and "Traceback" not in err


def test_a_sqlite_ledger_another_writer_holds_at_open_is_unavailable_not_broken(tmp_path):
    """The open's own wait for the lock runs out: infrastructure (ingest and the stage wait
    for it), not a broken file (before: a LedgerError, a traceback from ``ledger ingest``)."""
    import sqlite3

    from riskpipe.ledger.chain import LedgerUnavailable
    from riskpipe.ledger.sqlite import SqliteLedger
    from riskpipe.stream.infra import infrastructure_component

    path = tmp_path / "l.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("BEGIN EXCLUSIVE")  # a new, empty file: the open has to switch it to WAL and make the tables
    try:
        with pytest.raises(LedgerUnavailable, match="database is locked") as exc:
            SqliteLedger(str(path), timeout=0.5)
        assert infrastructure_component(exc.value) == "ledger"
    finally:
        db.execute("ROLLBACK")
        db.close()
