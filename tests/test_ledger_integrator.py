"""PostgreSQL appends without a lock shared by the writers: rows are inserted
unsequenced and one integrator at a time (a session advisory lock as its lease)
sequences them into the chain and the Merkle tree in batches. Concurrent writers with
overlapping ids, and the integrator killed with SIGKILL in the middle of a batch:
nothing lost, nothing sequenced twice, verify and receipts unchanged."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time

import psycopg

from ledger_records import decision_record
from riskpipe.ledger import canonical_json, open_ledger
from riskpipe.ledger.chain import decision_scope

# A child that takes the lease and stops inside its first batch, after the rows got their
# seqs, chain and tree in the open transaction and before the commit.
_STUCK_INTEGRATOR = r"""
import pathlib, sys, time
from riskpipe.ledger import postgres
orig = postgres.PostgresLedger._sequence
def stuck(db, items):
    rows = orig(db, items)
    pathlib.Path(sys.argv[2]).write_text(str(len(rows)))
    time.sleep(600)
    return rows
postgres.PostgresLedger._sequence = staticmethod(stuck)
with postgres.PostgresLedger(sys.argv[1]) as led:
    led.integrate()
"""


def _writer(url, worker, n, batch, q):
    sys.path.insert(0, os.path.dirname(__file__))
    from ledger_records import decision_record

    with open_ledger(url) as led:
        written = 0
        for start in range(0, n, batch):  # ids overlap between workers: 0..n+worker*50
            ids = range(worker * 50 + start, worker * 50 + min(start + batch, n))
            written += led.append_many([decision_record(i, worker=f"w{worker}") for i in ids])
    q.put(written)


def pending_and_sequenced(url):
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT COUNT(*) FILTER (WHERE seq IS NULL), COUNT(seq), COUNT(DISTINCT seq), "
                            "COALESCE(MAX(seq), 0) FROM entries").fetchone()


def test_integrator_killed_mid_batch_loses_nothing_and_sequences_nothing_twice(pg_url, tmp_path):
    with open_ledger(pg_url) as led:
        led.append_many([decision_record(i) for i in range(10)])  # 10 rows, sequenced
        size0, root0 = led.tree_head()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # 30 rows written, not yet sequenced
        for i in range(100, 130):
            rec = decision_record(i)
            conn.execute("INSERT INTO entries (kind, entry_id, ts, record, scope) VALUES ('decision', %s, %s, %s, %s)",
                         (rec["id"], rec["ts"], canonical_json(rec), decision_scope("decision", rec)))
    marker = tmp_path / "in-batch"
    child = subprocess.Popen([sys.executable, "-c", _STUCK_INTEGRATOR, pg_url, str(marker)],
                             env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        deadline = time.monotonic() + 60
        while not marker.exists():
            assert time.monotonic() < deadline and child.poll() is None, "the integrator never reached its batch"
            time.sleep(0.05)
        assert marker.read_text() == "30"
        with open_ledger(pg_url) as led:
            # the lease is held: writers still append at once (they do not wait), nothing of theirs is sequenced
            t = time.monotonic()
            assert led.append(decision_record(500)) is True
            assert time.monotonic() - t < 5 and led.integrate() == 0 and led.pending() == 31
        os.kill(child.pid, signal.SIGKILL)  # mid-batch: the transaction never commits
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    assert pending_and_sequenced(pg_url)[:2] == (31, 10)  # nothing lost, nothing half-sequenced
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(pg_url, w, 120, 16, q)) for w in range(4)]
    for p in procs:
        p.start()
    written = sum(q.get(timeout=300) for _ in procs)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with open_ledger(pg_url) as led:
        led.integrate()  # whoever holds the lease last leaves nothing behind; this is a no-op check
        pending, sequenced, distinct, top = pending_and_sequenced(pg_url)
        assert pending == 0 and sequenced == distinct == top == led.count()
        ids = [e.entry_id for e in led.records(kind="decision")]
        assert len(ids) == len(set(ids)) == 271  # evt 0..269 (the writers, overlapping; 0..9, 100..129 before) and 500
        assert written == 270 - 40  # ids 0..9 and 100..129 were in the ledger before the writers
        res = led.verify()
        assert res.ok and res.count == led.count() and led.tree_head()[0] == res.count
        # the tree grew from the old one: the old root is still provable
        from riskpipe.ledger import merkle

        merkle.verify_consistency(size0, res.count, bytes.fromhex(root0), bytes.fromhex(res.root),
                                  led.consistency_proof(size0, res.count))


def test_rows_of_an_older_riskpipe_and_updates_are_refused(pg_url):
    """The sequencing update is the only change the trigger allows, once per row."""
    import pytest

    with open_ledger(pg_url) as led:
        led.append_many([decision_record(i) for i in range(3)])
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in ("UPDATE entries SET seq = 9 WHERE seq = 1", "UPDATE entries SET hash = 'x' WHERE seq = 2",
                    "UPDATE entries SET record = '{}' WHERE seq = 3", "DELETE FROM entries WHERE seq = 1"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)
        conn.execute("INSERT INTO entries (kind, entry_id, ts, record) VALUES ('decision', 'x1', NULL, "
                     "'{\"id\":\"x1\"}')")
        with pytest.raises(psycopg.errors.RaiseException, match="append-only"):  # sequencing must not edit the row
            conn.execute("UPDATE entries SET seq = 4, prev_hash = 'a', hash = 'b', record = '{}' WHERE entry_id = 'x1'")
    with open_ledger(pg_url) as led:
        assert led.integrate() == 1 and led.verify().ok and led.verify().count == 4
