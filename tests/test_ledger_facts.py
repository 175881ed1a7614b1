"""The ledger's facts table (what the report and the review queue aggregate in SQL): one
row per decision and dead letter, as facts_of computes it from the record, written with
the row, built for ledgers written before it existed, and refused edits like entries."""

import sqlite3

import pytest

from ledger_records import as_superuser, build_ledger, decision_record
from riskpipe.ledger import open_ledger
from riskpipe.ledger import sqlite as sqlite_backend
from riskpipe.ledger.facts import GROUP_COLUMNS, NAMES, build_existing, build_groups, facts_of, hour_of
from riskpipe.ledger.migrations import migrate
from riskpipe.report.data import gather

FACTS_VERSION = next(v for v, steps in sqlite_backend.STEPS if build_existing in steps)
GROUPS_VERSION = next(v for v, steps in sqlite_backend.STEPS if build_groups in steps)
GID = NAMES.index("gid")


def _state(path):
    """The facts rows (their gid as the group's values), and the hourly counts per group
    values and hour: what the ledger's facts tables hold, whatever the gid numbering."""
    with open_ledger(path) as led, led.snapshot() as q:
        groups = {r[0]: tuple(r[1:]) for r in q(f"SELECT gid, {', '.join(GROUP_COLUMNS)} FROM fact_groups")}
        assert len(set(groups.values())) == len(groups)  # one gid per group
        facts = [(*f[:GID], groups[f[GID]],
                  *f[GID + 1:]) for f in q(f"SELECT {', '.join(NAMES)} FROM facts ORDER BY seq")]
        counts = {(groups[gid], h): rest for gid, h, *rest in q("SELECT gid, h, n, first_seq, t0, t1 FROM fact_counts")}
    return facts, counts


def _expected(path):
    """The same, computed record by record (facts_of) and counted here."""
    with open_ledger(path) as led:
        rows = [f for f in (facts_of(e.seq, e.kind, e.entry_id, e.record) for e in led.records()) if f is not None]
    at = [NAMES.index(c) for c in GROUP_COLUMNS]
    facts = [(*f[:GID], tuple(f[i] for i in at), *f[GID + 1:]) for f in rows]
    counts: dict = {}
    for f in facts:
        t, seq = f[NAMES.index("t")], f[0]
        n, first, t0, t1 = counts.get((f[GID], hour_of(t)), (0, seq, t, t))
        counts[(f[GID], hour_of(t))] = (n + 1, min(first, seq), t if t0 is None else min(t0, t),
                                        t if t1 is None else max(t1, t))
    return facts, {k: list(v) for k, v in counts.items()}


def test_facts_match_the_records_and_older_ledgers_get_them_on_open(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=40, seed=5)
    with open_ledger(path) as led:  # a decision without a time, and one with an integer p_lower
        led.append_many([{**decision_record(900), "ts": None}])
        rec = decision_record(901)
        rec["certificate"]["p_lower"] = 1
        led.append(rec)
    want = _expected(path)
    facts, counts = _state(path)
    assert facts == want[0] and counts == want[1] and {f[1] for f in facts} == {"decision", "dlq"}
    assert {f[NAMES.index("p_lower")] for f in facts if f[2] in ("evt-00901", "evt-00000")} == {1.0, 0.93}
    assert any(h == hour_of(None) for _, h in counts)
    with sqlite3.connect(path) as db:  # the ledger as schema 5 left it: no facts tables
        for table in ("facts", "fact_groups", "fact_counts"):
            db.execute(f"DROP TABLE {table}")
        db.execute("DELETE FROM schema_version WHERE version >= ?", (FACTS_VERSION,))
    assert _state(path) == want  # opening migrates and builds the tables from the rows


def test_a_schema_6_ledger_gets_p_lower_group_codes_and_counts_on_open(tmp_path):
    """Schema 7 on a ledger written by schema 6 (its facts table as schema 6's step made
    it): p_lower read from the records in SQL, gids and hourly counts from the facts
    columns, the new indexes; the result equals what appends write."""
    path = tmp_path / "l.db"
    build_ledger(path, n=40, seed=6)
    want = _expected(path)
    db = sqlite3.connect(path, isolation_level=None)
    for table in ("facts", "fact_groups", "fact_counts"):
        db.execute(f"DROP TABLE {table}")
    db.execute("DELETE FROM schema_version WHERE version >= ?", (FACTS_VERSION,))
    db.execute("BEGIN IMMEDIATE")
    assert migrate(db, sqlite_backend.STEPS[:FACTS_VERSION], sqlite_backend._has_table, "test") == FACTS_VERSION
    db.execute("COMMIT")
    v6_columns = [r[1] for r in db.execute("PRAGMA table_info(facts)")]
    assert "gid" not in v6_columns and "p_lower" not in v6_columns
    db.close()
    with open_ledger(path) as led:
        assert led.schema_version == sqlite_backend.STEPS[-1][0] > GROUPS_VERSION
        with led.snapshot() as q:
            indexes = {r[0] for r in q("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'facts'")}
    assert {"facts_window", "facts_queue", "facts_gid", "facts_queue_group", "facts_queue_deadline"} <= indexes
    assert not {"facts_kind_t", "facts_radius", "facts_queue_gid"} & indexes
    assert _state(path) == want
    with open_ledger(path) as led:  # and appends go on from there
        led.append(decision_record(500))
    assert _state(path) == _expected(path)
    with sqlite3.connect(path) as db, pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE facts SET gid = 0")


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


@pytest.mark.parametrize("edit, says", [
    # one group row: every review of that group counted as an allow (the probe's finding)
    (["UPDATE fact_groups SET decision = 'allow' WHERE decision = 'review'"], "gkey is not the hash"),
    (["UPDATE facts SET radius_threat = 9.5 WHERE seq = (SELECT MIN(seq) FROM facts WHERE kind = 'decision')"],
     "facts row differs from its record (radius_threat)"),
    # a row moved from one group's count to another's: the totals still add up
    ([f"UPDATE fact_counts SET n = n {sign} 1 WHERE gid = {gid} "
      f"AND h = (SELECT MIN(h) FROM fact_counts WHERE gid = {gid})"
      for sign, gid in (("+", "(SELECT MAX(gid) FROM fact_groups WHERE kind = 'decision')"),
                        ("-", "(SELECT MIN(gid) FROM fact_groups WHERE kind = 'decision')"))], "fact_counts: hour"),
])
@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_report_recomputes_the_derived_tables_from_the_records_when_it_verifies(tmp_path, request, backend, edit,
                                                                                says):
    """The chain proves the records, not the facts tables the report counts from. An owner's
    edit of fact_groups, facts or fact_counts used to leave the report's figures wrong while
    its integrity section said ok; when the report verifies, they are recomputed."""
    target = str(tmp_path / "l.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    build_ledger(target, n=40, seed=5)
    before = gather(target)["integrity"]
    assert before["ok"] is True and before["facts_ok"] is True and before["facts_rechecked"] is True
    as_superuser(target, edit, tables=("facts",))  # fact_groups and fact_counts have no triggers
    with open_ledger(target) as led:
        assert led.verify().ok  # the chain and tree cannot see it
    integrity = gather(target)["integrity"]
    assert integrity["ok"] is False and integrity["facts_ok"] is False and says in integrity["reason"], integrity
    unverified = gather(target, verify=False)["integrity"]
    assert unverified["ok"] is None and unverified["facts_rechecked"] is False  # says it did not look


def test_report_without_the_chain_walk_says_so(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=10, seed=4)
    d = gather(str(path), verify=False)
    assert d["integrity"]["ok"] is None and d["integrity"]["verified"] is False and d["integrity"]["count"] > 10
    assert "not verified in this report" in d["integrity"]["reason"]
    statuses = {c["status"] for c in d["controls"] if "integrity" in c["sections"]}
    assert statuses == {"ledger not verified in this report"}
    assert d["volumes"]["in_period"]["decision"] == 10 and gather(str(path))["integrity"]["ok"] is True


def test_postgresql_facts_and_their_migration(pg_url, tmp_path):
    """The same on PostgreSQL: facts, groups and counts as appends write them, and as its
    migration step (8 there) builds them on a ledger its schema 7 wrote."""
    import psycopg

    from riskpipe.ledger import postgres as pg_backend

    build_ledger(tmp_path / "l.db", n=30, seed=7)
    with open_ledger(tmp_path / "l.db") as lite, open_ledger(pg_url) as pg:
        entries = [(e.kind, e.record, e.entry_id) for e in lite.records()]
        for start in range(0, len(entries), 7):
            pg.append_entries(entries[start:start + 7])
    want = _expected(pg_url)
    assert _state(pg_url) == want and want == _expected(tmp_path / "l.db")
    version = next(v for v, steps in pg_backend.STEPS if build_groups in steps)
    with psycopg.connect(pg_url, autocommit=True) as conn:  # back to what schema 7 left
        for stmt in ("DROP TABLE fact_groups", "DROP TABLE fact_counts", "DROP INDEX facts_window",
                     "DROP INDEX facts_gid", "DROP INDEX facts_queue_group", "DROP INDEX facts_queue_deadline",
                     "ALTER TABLE facts DROP COLUMN gid", "ALTER TABLE facts DROP COLUMN p_lower",
                     "CREATE INDEX facts_kind_t ON facts (kind, t)",
                     "CREATE INDEX facts_radius ON facts (threat_norm, threat_eps, radius_threat)"):
            conn.execute(stmt)
        conn.execute("DELETE FROM schema_version WHERE version >= %s", (version,))
    assert _state(pg_url) == want
    with psycopg.connect(pg_url, autocommit=True) as conn, pytest.raises(psycopg.Error, match="append-only"):
        conn.execute("UPDATE facts SET gid = 0")


def test_postgresql_binary_copy_stores_what_sqlite_stores(pg_url, tmp_path):
    """Facts rows, tree nodes and entries go to PostgreSQL as a binary COPY: odd values
    (an integer where a double is stored, a priority beyond 64 bits, no time, non-ASCII
    text, a shadow policy, a dead letter) are stored exactly as SQLite stores them."""
    from riskpipe.ledger import dlq_record

    recs = [decision_record(i, audit_sample=i % 3 == 0, abstained=i % 4 == 0) for i in range(12)]
    recs[1]["certificate"]["sigma"] = 1
    recs[2]["review"]["priority"] = 2**70
    recs[3]["ts"] = None
    recs[4]["model"]["name"] = "modèle ünï ✓"
    recs[5]["policy"]["shadow"] = True
    recs[6]["certificate"]["p_lower"] = 0.1 + 0.2
    dead, eid = dlq_record("bad_json", b"\xff not json", "2024-05-01T08:00:00.000Z", topic="in", partition=0,
                           offset=7, message="not JSON")
    entries = [("decision", r, None) for r in recs] + [("dlq", dead, eid)]
    with open_ledger(tmp_path / "l.db") as lite, open_ledger(pg_url) as pg:
        for led in (lite, pg):
            led.append_entries(entries[:5])
            led.append_entries(entries[5:])
            assert led.verify().ok
        assert [(e.entry_id, e.hash) for e in pg.records()] == [(e.entry_id, e.hash) for e in lite.records()]
        assert pg.tree_head()[1] == lite.tree_head()[1]
    want = _expected(pg_url)
    assert _state(pg_url) == want == _state(tmp_path / "l.db")
    assert {f[NAMES.index("priority")] for f in want[0]} >= {2**62 - 1}
