"""The PostgreSQL ledger backend on a real server (tests/pgserver.py), next to SQLite:
one interface, one chain definition, concurrent writers, de-duplication across
replicas, triggers, tamper detection behind the triggers' back, migrations."""

from __future__ import annotations

import json
import multiprocessing as mp
import sqlite3
import subprocess
import sys

import psycopg
import pytest

from ledger_records import POLICY_V4, as_superuser, decision_record
from riskpipe.ledger import Ledger, LedgerError, canonical_json, entry_hash, open_ledger
from riskpipe.ledger import postgres as pg_backend
from riskpipe.ledger import sqlite as sqlite_backend


def records(n, start=0):
    return [decision_record(i) for i in range(start, start + n)]


def export(led):
    return [canonical_json(e.to_dict()) for e in led.records()]


def test_both_backends_store_the_same_chain(pg_url, tmp_path):
    with open_ledger(pg_url) as pg, open_ledger(str(tmp_path / "l.db")) as lite:
        assert (pg.backend, lite.backend) == ("postgresql", "sqlite")
        for led in (pg, lite):
            assert led.append_many(records(30)) == 30
            assert led.append(records(1, 5)[0]) is False  # same id: de-duplicated
            assert led.append({"id": "evt-00005", "ts": "2024-05-01T08:00:00Z", "verdict": "confirm"}, kind="verdict")
        assert export(pg) == export(lite)  # identical rows and hashes: an export verifies identically
        assert pg.verify() == lite.verify() and pg.verify().ok
        assert pg.head_and_count() == lite.head_and_count() == (pg.head(), 31)
        assert pg.get("evt-00007") == lite.get("evt-00007") == records(1, 7)[0]
        assert pg.count("verdict") == 1 and pg.entry("evt-00005", "verdict").seq == 31
        window = dict(since="2024-05-01T08:10:00Z", until="2024-05-01T08:20:00Z")
        assert ([e.entry_id for e in pg.records("decision", **window)]
                == [e.entry_id for e in lite.records("decision", **window)])
        assert len(list(pg.records("decision", **window))) == 10


@pytest.mark.parametrize("target, message", [
    ("postgresq://u@127.0.0.1/db", "unknown scheme 'postgresq'"),
    ("mysql://u:hunter2@127.0.0.1/db", "unknown scheme 'mysql'"),
    ("postgresql://u:hunter2@127.0.0.1:1/db", "cannot connect"),
])
def test_unusable_targets_fail_with_one_line(target, message, tmp_path):
    with pytest.raises(LedgerError, match=message) as e:
        open_ledger(target)
    assert "hunter2" not in str(e.value) and "\n" not in str(e.value)
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "verify", target], capture_output=True,
                       text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr and "hunter2" not in r.stderr
    assert list(tmp_path.iterdir()) == []  # no SQLite file under a directory named "mysql:"


def test_run_refuses_unknown_scheme_without_creating_a_directory(tmp_path):
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--source", "jsonl:/dev/null", "--sink",
                        f"jsonl:{tmp_path / 'out'}", "--ledger", "postgresq://u@127.0.0.1/db"],
                       capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2 and "unknown scheme 'postgresq'" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "postgresq:").exists()


def _append_worker(url, worker, n, batch, q):
    try:
        with open_ledger(url) as led:
            written = 0
            for start in range(0, n, batch):
                # every worker offers the same ids: like replicas re-delivering after a rebalance
                written += led.append_many([decision_record(i, worker=f"w{worker}")
                                            for i in range(start, start + batch)])
        q.put(written)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        q.put(repr(e))


def test_concurrent_writers_share_one_chain_and_deduplicate(pg_url):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_append_worker, args=(pg_url, w, 200, 20, q)) for w in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(isinstance(r, int) for r in results), results
    assert sum(results) == 200  # each id written once, by whichever replica got there first
    with open_ledger(pg_url) as led:
        res = led.verify()
        assert res.ok and res.count == 200
        assert {e.entry_id for e in led.records()} == {f"evt-{i:05d}" for i in range(200)}


def test_triggers_refuse_update_delete_truncate(pg_url):
    with open_ledger(pg_url) as led:
        led.append_many(records(5))
    with psycopg.connect(pg_url, autocommit=True) as conn:
        for sql in ("UPDATE entries SET ts = NULL WHERE seq = 2", "DELETE FROM entries WHERE seq = 2",
                    "TRUNCATE entries"):
            with pytest.raises(psycopg.errors.RaiseException, match="append-only"):
                conn.execute(sql)
    with open_ledger(pg_url) as led:
        assert led.verify().ok and led.count() == 5


def rechain_sql(led, start):
    """Statements that recompute every hash from row ``start`` on, as a forger who knows the layout would."""
    rows = [(e.seq, e.kind, e.entry_id, canonical_json(e.record)) for e in led.records()]
    prev = rows[start - 2] and [e.hash for e in led.records()][start - 2] if start > 1 else "0" * 64
    out = []
    for seq, kind, eid, text in rows[start - 1:]:
        h = entry_hash(prev, kind, eid, text)
        out.append(f"UPDATE entries SET prev_hash = '{prev}', hash = '{h}' WHERE seq = {seq}")
        prev = h
    out.append(f"UPDATE chain_state SET count = {len(rows)}, head = '{prev}' WHERE id = 1")
    return out


@pytest.mark.parametrize("case, first_bad, reason", [
    ("edit", 4, "hash mismatch"),
    ("delete", 4, "row 4 is missing"),
    ("reorder", 4, "does not link"),
    ("truncate", 9, "truncated"),
    ("ts", 6, "ts column"),
])
def test_tampering_behind_the_triggers_is_detected_at_the_right_row(pg_url, case, first_bad, reason):
    with open_ledger(pg_url) as led:
        led.append_many(records(10))
        e4, e5 = led.entry("evt-00003"), led.entry("evt-00004")
    forged = canonical_json({**e4.record, "decision": "block"}).replace("'", "''")
    statements = {
        "edit": [f"UPDATE entries SET record = '{forged}' WHERE seq = 4"],
        "delete": ["DELETE FROM entries WHERE seq = 4", "UPDATE chain_state SET count = 9"],
        "reorder": ["UPDATE entries SET seq = -4 WHERE seq = 4", "UPDATE entries SET seq = 4 WHERE seq = 5",
                    "UPDATE entries SET seq = 5 WHERE seq = -4"],
        "truncate": ["DELETE FROM entries WHERE seq > 8"],
        "ts": ["UPDATE entries SET ts = '2020-01-01T00:00:00Z' WHERE seq = 6"],
    }[case]
    assert e4.seq == 4 and e5.seq == 5
    as_superuser(pg_url, statements)
    with open_ledger(pg_url) as led:
        res = led.verify()
    assert not res.ok and res.first_bad_seq == first_bad and reason in res.reason, res
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "verify", pg_url, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and json.loads(r.stdout)["first_bad_seq"] == first_bad


def test_cli_head_export_verify_on_postgresql(pg_url, tmp_path):
    with open_ledger(pg_url) as led:
        led.append_many(records(12))
        head = led.head()
    cli = [sys.executable, "-m", "riskpipe.cli", "ledger"]
    r = subprocess.run([*cli, "head", pg_url], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == head
    r = subprocess.run([*cli, "export", pg_url, "--out", str(tmp_path / "x.jsonl")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()]
    prev = "0" * 64
    for row in lines:  # anyone can re-verify the export with sha256 alone
        assert row["prev_hash"] == prev
        prev = entry_hash(prev, row["kind"], row["entry_id"], canonical_json(row["record"]))
        assert prev == row["hash"]
    assert prev == head and len(lines) == 12
    r = subprocess.run([*cli, "verify", pg_url, "--expect-head", head, "--expect-count", "12"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and "ok: 12 rows" in r.stdout


# -- migrations ------------------------------------------------------------------------------------------

V1_SQLITE = sqlite_backend.STEPS[0][1] + ["CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
                                           "INSERT INTO meta (key, value) VALUES ('schema_version', '1')"]


def _v1_rows(n):
    prev, rows = "0" * 64, []
    for i, rec in enumerate(records(n), 1):
        text = canonical_json(rec)
        h = entry_hash(prev, "decision", rec["id"], text)
        rows.append((i, "decision", rec["id"], rec["ts"], text, prev, h))
        prev = h
    return rows, prev


def assert_identity_after_migration(led):
    """Schema 3 keys decisions by (event id, model, policy sha256): the migrated rows got
    their scope, so the same decision is still a duplicate and another policy's is new."""
    assert led.append(decision_record(2)) is False
    other = decision_record(2, policy=POLICY_V4)
    assert led.append(other) is True and led.verify().ok
    assert led.get_all("evt-00002") == [decision_record(2), other]
    assert led.get("evt-00002") == other  # the latest
    assert led.append(other) is False


def test_sqlite_ledger_from_schema_1_is_migrated(tmp_path):
    """A ledger as riskpipe 0.1 wrote it (no schema_version table, version in meta)."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(str(path), isolation_level=None)
    for stmt in V1_SQLITE:
        db.execute(stmt)
    rows, head = _v1_rows(6)
    db.executemany("INSERT INTO entries VALUES (?,?,?,?,?,?,?)", rows)
    db.execute("UPDATE chain_state SET count = 6, head = ? WHERE id = 1", (head,))
    db.close()
    with Ledger(path) as led:
        latest = sqlite_backend.STEPS[-1][0]
        assert led.schema_version == latest and led.verify().ok and led.count() == 6 and led.tree_head()[0] == 6
        assert led.get_input("0" * 64) is None
        assert led.append(decision_record(99)) and led.verify().ok
        assert led.legacy_checkpoints() == [] and led.notes() == []
        assert_identity_after_migration(led)
    db = sqlite3.connect(str(path))
    assert [v for v, in db.execute("SELECT version FROM schema_version ORDER BY version")] == list(range(1, latest + 1))
    assert db.execute("SELECT COUNT(*) FROM facts").fetchone()[0] == \
        db.execute("SELECT COUNT(*) FROM entries WHERE kind IN ('decision', 'dlq')").fetchone()[0] >= 7  \
        # built for the old rows too
    db.close()


def test_postgresql_ledger_from_schema_1_is_migrated(pg_url):
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)")
        for stmt in pg_backend.STEPS[0][1]:
            conn.execute(stmt)
        conn.execute("INSERT INTO schema_version VALUES (1, 'x')")
        rows, head = _v1_rows(6)
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO entries VALUES (%s,%s,%s,%s,%s,%s,%s)", rows)
        conn.execute("UPDATE chain_state SET count = 6, head = %s WHERE id = 1", (head,))
    with open_ledger(pg_url) as led:
        assert led.schema_version == pg_backend.STEPS[-1][0] and led.verify().ok
        assert led.legacy_checkpoints() == [] and led.notes() == [] and led.tree_head()[0] == 6
        assert_identity_after_migration(led)
        assert led.get_input("0" * 64) is None
        assert led.append(decision_record(99)) and led.verify().count == 8
    with psycopg.connect(pg_url) as conn:
        assert [v for v, in conn.execute("SELECT version FROM schema_version ORDER BY version")] == \
            [v for v, _ in pg_backend.STEPS]


def test_a_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.db"
    Ledger(path).close()
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("INSERT INTO schema_version VALUES (9, 'future')")
    db.close()
    with pytest.raises(LedgerError, match="schema version 9 is newer than this riskpipe supports"):
        Ledger(path)


def test_policy_diff_reads_a_postgresql_ledger(pg_url):
    from pathlib import Path

    from click.testing import CliRunner

    from riskpipe.cli.policy_cmd import policy

    root = Path(__file__).resolve().parents[1]
    data = root / "tests" / "data" / "policies" / "records.jsonl"
    with open_ledger(pg_url) as led:
        for line in data.read_text().splitlines():
            rec = json.loads(line)
            led.append(rec, kind="decision", entry_id=rec["id"])
    args = ["diff", str(root / "policies/default.yaml"), str(root / "policies/strict.yaml"), "--json", "--ledger"]
    from_pg = CliRunner().invoke(policy, [*args, pg_url])
    from_file = CliRunner().invoke(policy, [*args, str(data)])
    assert from_pg.exit_code == 0, from_pg.output
    assert json.loads(from_pg.output) == json.loads(from_file.output) and json.loads(from_pg.output)["records"] == 5
    bad = CliRunner().invoke(policy, [*args, "mysql://x@h/db"])
    assert bad.exit_code == 2 and "unknown scheme 'mysql'" in bad.output


def test_a_dropped_connection_is_reopened(pg_url):
    with open_ledger(pg_url) as led:
        led.append_many(records(3))
        with psycopg.connect(pg_url, autocommit=True) as admin:  # as a server restart or failover would
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        with pytest.raises(psycopg.OperationalError):
            led.append(records(1, 3)[0])  # the transaction in flight when the server went away fails
        assert led.append(records(1, 3)[0]) is True  # the next one reconnects
        assert led.reconnects == 1 and led.verify().ok and led.count() == 4


def test_an_id_another_writer_inserts_while_the_lease_holder_appends_is_written_once(pg_url, monkeypatch):
    """The lease holder inserts its sequenced rows with one COPY; when another writer
    inserted one of the ids after the holder looked them up, the COPY fails on the
    identity constraint, the savepoint (chain, tree, facts) rolls back, and the rows go
    in unsequenced with ON CONFLICT DO NOTHING: each id once, the chain intact."""
    with open_ledger(pg_url) as led:
        assert led.append_many(records(1)) == 1
        # as if the look-up ran before another writer's row (evt-00000) committed
        monkeypatch.setattr(pg_backend.PostgresLedger, "_existing", staticmethod(lambda db, keys: set()))
        assert led.append_many(records(3)) == 2
        monkeypatch.undo()
        assert led.pending() == 0 and led.count() == 3
        assert [e.entry_id for e in led.records()] == ["evt-00000", "evt-00001", "evt-00002"]
        res = led.verify()
        assert res.ok and res.count == 3
        assert led.get("evt-00002") == records(1, 2)[0]


def test_the_connection_gives_up_on_a_server_that_stops_answering(pg_url):
    """TCP keepalives and tcp_user_timeout on the real connection's socket, sized from the
    ledger's dead_after_s (the stage passes half its infrastructure_timeout_s, at most 30 s):
    a server host gone or partitioned away fails the connection (OperationalError, a ledger
    outage) instead of a read waiting for ever. A DSN's own keepalive setting is kept."""
    import socket

    def sockopts(led):
        with led._conn() as db:
            s = socket.socket(fileno=db.conn.fileno())
            try:
                return (s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                        s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT))
            finally:
                s.detach()  # the socket is libpq's

    with open_ledger(pg_url, dead_after_s=9) as led:
        assert sockopts(led) == (1, 3, 9000)
        assert led.answer_within_s is None  # tools that run long statements wait as libpq does
    sep = "&" if "?" in pg_url else "?"
    with open_ledger(f"{pg_url}{sep}keepalives_idle=7", dead_after_s=9) as led:
        assert sockopts(led) == (1, 7, 9000)

    from riskpipe.app.compose import open_ledger as stage_ledger
    from riskpipe.app.config import load_config

    led = stage_ledger(load_config(None, ledger=pg_url, infrastructure_timeout_s=10))
    try:
        assert led.dead_after_s == 5 and sockopts(led)[2] == 5000
        # each answer within the lock timeout plus the network's time, derived by the ledger
        assert led.answer_within_s == led.timeout + 5 == 35
        with led._conn() as db:
            assert db.conn.answer_within_s == 35
    finally:
        led.close()
