"""The ledger's facts table (what the report and the review queue aggregate in SQL): one
row per decision and dead letter, as facts_of computes it from the record, written with
the row, built for ledgers written before it existed, and refused edits like entries."""

import sqlite3

import pytest
from ledger_records import build_ledger

from riskpipe.ledger import open_ledger
from riskpipe.ledger import sqlite as sqlite_backend
from riskpipe.ledger.facts import NAMES, build_existing, facts_of
from riskpipe.report.data import gather


FACTS_VERSION = next(v for v, steps in sqlite_backend.STEPS if build_existing in steps)


def _facts(path):
    with open_ledger(path) as led, led.snapshot() as q:
        return q(f"SELECT {', '.join(NAMES)} FROM facts ORDER BY seq")


def _expected(path):
    with open_ledger(path) as led:
        return [f for f in (facts_of(e.seq, e.kind, e.entry_id, e.record) for e in led.records()) if f is not None]


def test_facts_match_the_records_and_older_ledgers_get_them_on_open(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=40, seed=5)
    want = _expected(path)
    assert _facts(path) == want and {f[1] for f in want} == {"decision", "dlq"}
    with sqlite3.connect(path) as db:  # the ledger as schema 2 left it: no facts table
        db.execute("DROP TABLE facts")
        db.execute("DELETE FROM schema_version WHERE version = ?", (FACTS_VERSION,))
    assert _facts(path) == want  # opening migrates and builds the table from the rows


def test_facts_rows_are_append_only(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=5, seed=1)
    with sqlite3.connect(path) as db:
        for sql in ("UPDATE facts SET decision = 'allow'", "DELETE FROM facts"):
            with pytest.raises(sqlite3.DatabaseError, match="append-only"):
                db.execute(sql)


def test_report_names_a_facts_table_that_does_not_match_the_ledger(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=10, seed=2)
    assert gather(str(path))["integrity"]["facts_ok"] is True
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER facts_no_delete")
        db.execute("DELETE FROM facts WHERE seq = (SELECT MIN(seq) FROM facts WHERE kind = 'decision')")
    integrity = gather(str(path))["integrity"]
    assert integrity["facts_ok"] is False and integrity["ok"] is False
    assert "decision: 9 facts rows for 10 ledger rows" in integrity["reason"]


def test_report_without_the_chain_walk_says_so(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=10, seed=4)
    d = gather(str(path), verify=False)
    assert d["integrity"]["ok"] is None and d["integrity"]["verified"] is False and d["integrity"]["count"] > 10
    assert "not verified in this report" in d["integrity"]["reason"]
    assert {c["status"] for c in d["controls"] if "integrity" in c["sections"]} == {"ledger not verified in this report"}
    assert d["volumes"]["in_period"]["decision"] == 10 and gather(str(path))["integrity"]["ok"] is True
