"""Ledger: chain integrity, tamper detection, idempotency, concurrent writers."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import sqlite3

import pytest

from ledger_records import build_ledger, decision_record, forge_tree
from riskpipe.ledger import GENESIS, Ledger, LedgerError, canonical_json, entry_hash
from riskpipe.ledger.chain import decision_scope


@pytest.fixture()
def ledger_path(tmp_path):
    path = tmp_path / "ledger.db"
    with Ledger(path) as led:
        assert led.append_many([decision_record(i) for i in range(10)]) == 10
    return path


def raw(path) -> sqlite3.Connection:
    """A plain SQLite connection with the append-only triggers dropped, as an attacker would."""
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("DROP TRIGGER entries_no_delete")
    return db


def verify(path, **kw):
    with Ledger(path) as led:
        return led.verify(**kw)


def test_intact_chain_and_byte_layout(ledger_path):
    with Ledger(ledger_path) as led:
        res = led.verify()
        assert res.ok and res.count == 10 and res.first_bad_seq is None and res.head == led.head()
        entries = list(led.records())
    assert [e.seq for e in entries] == list(range(1, 11))
    assert entries[0].prev_hash == GENESIS
    for prev, e in zip([GENESIS] + [x.hash for x in entries], entries):
        assert e.prev_hash == prev
        layout = (prev + "\n" + e.kind + "\n" + e.entry_id + "\n" + canonical_json(e.record)).encode()
        assert e.hash == hashlib.sha256(layout).hexdigest() == entry_hash(
            prev, e.kind, e.entry_id, canonical_json(e.record))


def test_triggers_refuse_update_and_delete(ledger_path):
    db = sqlite3.connect(str(ledger_path), isolation_level=None)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM entries WHERE seq = 3")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE entries SET ts = NULL WHERE seq = 3")
    db.close()
    assert verify(ledger_path).ok


def test_edited_field_is_named(ledger_path):
    db = raw(ledger_path)
    text = db.execute("SELECT record FROM entries WHERE seq = 4").fetchone()[0]
    rec = json.loads(text)
    rec["decision"] = "allow" if rec["decision"] != "allow" else "block"
    db.execute("UPDATE entries SET record = ? WHERE seq = 4", (canonical_json(rec),))
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 4 and "hash mismatch" in res.reason and res.count == 3


def test_relabelled_kind_is_named(ledger_path):
    db = raw(ledger_path)
    db.execute("UPDATE entries SET kind = 'verdict' WHERE seq = 6")
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 6


def test_deleted_row_is_named(ledger_path):
    db = raw(ledger_path)
    db.execute("DELETE FROM entries WHERE seq = 5")
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 5 and "missing" in res.reason


def test_deleted_and_renumbered_row_is_named(ledger_path):
    db = raw(ledger_path)
    db.execute("DELETE FROM entries WHERE seq = 5")
    for seq in range(6, 11):
        db.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq - 1, seq))
    db.execute("UPDATE chain_state SET count = 9")
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 5 and "does not link" in res.reason


def test_swapped_rows_are_named(ledger_path):
    db = raw(ledger_path)
    cols = "kind, entry_id, ts, record, prev_hash, hash"
    r3 = db.execute(f"SELECT {cols} FROM entries WHERE seq = 3").fetchone()
    r7 = db.execute(f"SELECT {cols} FROM entries WHERE seq = 7").fetchone()
    upd = "UPDATE entries SET kind=?, entry_id=?, ts=?, record=?, prev_hash=?, hash=? WHERE seq=?"
    db.execute(upd, (*r3[:1], "tmp", *r3[2:], 7))  # dodge UNIQUE(kind, entry_id) during the swap
    db.execute(upd, (*r7, 3))
    db.execute(upd, (*r3, 7))
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 3 and "does not link" in res.reason


def test_inserted_row_is_named(ledger_path):
    db = raw(ledger_path)
    for seq in range(10, 5, -1):  # make room at seq 6
        db.execute("UPDATE entries SET seq = ? WHERE seq = ?", (seq + 1, seq))
    forged = canonical_json(decision_record(99))
    prev = db.execute("SELECT hash FROM entries WHERE seq = 5").fetchone()[0]
    # A forger who knows the layout links the new row correctly; the row after it no longer links.
    db.execute("INSERT INTO entries (seq, kind, entry_id, ts, record, prev_hash, hash, scope) VALUES (6, 'decision', "
               "'evt-00099', ?, ?, ?, ?, ?)",
               (json.loads(forged)["ts"], forged, prev, entry_hash(prev, "decision", "evt-00099", forged),
                decision_scope("decision", json.loads(forged))))
    db.execute("UPDATE chain_state SET count = 11")
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 7 and "does not link to row 6" in res.reason


def test_appended_forged_row_caught_by_checkpoint(ledger_path):
    db = raw(ledger_path)
    prev = db.execute("SELECT hash FROM entries WHERE seq = 10").fetchone()[0]
    forged = canonical_json(decision_record(42))
    db.execute("INSERT INTO entries (seq, kind, entry_id, ts, record, prev_hash, hash) VALUES (11, 'decision', "
               "'evt-00042', ?, ?, ?, ?)",
               (json.loads(forged)["ts"], forged, prev, entry_hash(prev, "decision", "evt-00042", forged)))
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 11


def test_truncation_caught_by_checkpoint(ledger_path):
    db = raw(ledger_path)
    db.execute("DELETE FROM entries WHERE seq > 7")
    db.close()
    res = verify(ledger_path)
    assert not res.ok and res.first_bad_seq == 8 and "truncated" in res.reason


def test_truncation_with_forged_checkpoint_caught_by_anchor(ledger_path):
    with Ledger(ledger_path) as led:
        anchor, count = led.head(), led.count()
    db = raw(ledger_path)
    head7 = db.execute("SELECT hash FROM entries WHERE seq = 7").fetchone()[0]
    db.execute("DELETE FROM entries WHERE seq > 7")
    db.execute("UPDATE chain_state SET count = 7, head = ?", (head7,))
    db.close()
    assert not verify(ledger_path).ok  # the Merkle tree still has the cut rows' nodes
    forge_tree(ledger_path)
    assert verify(ledger_path).ok  # without an anchor a clean cut of rows and tree is invisible
    res = verify(ledger_path, expect_head=anchor)
    assert not res.ok and res.first_bad_seq == 8 and "not in the chain" in res.reason
    res = verify(ledger_path, expect_head=anchor, expect_count=count)
    assert not res.ok and res.first_bad_seq == 8 and "truncated" in res.reason


def test_anchor_survives_growth(ledger_path):
    with Ledger(ledger_path) as led:
        anchor, count = led.head(), led.count()
        led.append(decision_record(50))
        assert led.verify(expect_head=anchor, expect_count=count).ok
        assert not led.verify(expect_head=anchor, expect_count=count + 1).ok
        with pytest.raises(LedgerError, match="expect_head"):
            led.verify(expect_head="xyz")


def test_idempotent_on_kind_and_id(tmp_path):
    rec = decision_record(1)
    with Ledger(tmp_path / "l.db") as led:
        assert led.append(rec) is True
        head = led.head()
        assert led.append(rec) is False
        assert led.append({**rec, "worker": "w2"}) is False  # redelivery from another worker keeps the first
        assert led.append(rec, kind="verdict") is True  # same id, another kind
        assert led.append_many([decision_record(1), decision_record(2), decision_record(2)]) == 1
        assert led.count() == 3 and led.count("decision") == 2 and led.get("evt-00001") == rec
        assert led.head() != head and led.verify().ok


def test_bad_records_rejected_with_field(tmp_path):
    with Ledger(tmp_path / "l.db") as led:
        with pytest.raises(LedgerError, match=r"^id: "):
            led.append({"ts": "2024-01-01T00:00:00Z"})
        with pytest.raises(LedgerError, match=r"record\[0\]\.ts"):
            led.append({"id": "x", "ts": "yesterday"})
        with pytest.raises(LedgerError, match="canonical JSON"):
            led.append({"id": "x", "v": float("nan")})
        with pytest.raises(LedgerError, match="kind"):
            led.append({"id": "x"}, kind="Bad Kind")
        # a decision none of the three was counted under none of them: a report's totals fell
        # short of its rows; a review the console cannot order was left out of its queue
        for change, field in (
                ({"decision": "BLOCK"}, r"record\[0\]\.decision: must be one of allow, review, block"),
                ({"decision": None}, r"record\[0\]\.decision: must be one of"),
                ({"review": []}, r"record\[0\]\.review: must be an object"),
                ({"review": {"priority": 2.0}}, r"record\[0\]\.review\.priority: must be an integer"),
                ({"review": {"priority": True}}, r"record\[0\]\.review\.priority"),
                ({"review": {"deadline": "tomorrow"}}, r"record\[0\]\.review\.deadline: not an RFC 3339")):
            rec = {**decision_record(1), **change}
            with pytest.raises(LedgerError, match=field):
                led.append(rec)
            led.append(rec, kind="note")  # other kinds are not decisions: taken as they come
        assert led.count("decision") == 0 and led.count("note") == 1  # (one id: appended once)


def test_records_time_window(tmp_path):
    with Ledger(tmp_path / "l.db") as led:
        led.append_many([decision_record(i) for i in range(10)])
        got = [e.entry_id for e in led.records("decision", since="2024-05-01T08:03:00Z",
                                               until="2024-05-01T08:06:00+00:00")]
        assert got == ["evt-00003", "evt-00004", "evt-00005"]
        assert list(led.records("verdict")) == []


def test_full_fixture_ledger_verifies(tmp_path):
    data = build_ledger(tmp_path / "l.db", n=30)
    with Ledger(tmp_path / "l.db") as led:
        assert led.count("decision") == 30 and led.count("dlq") == len(data["dlq"]) and led.count("policy") == 2
        assert led.verify().ok


def _writer(path: str, start: int, n: int) -> None:
    with Ledger(path) as led:
        for i in range(start, start + n):
            led.append(decision_record(i, worker=f"w{start}"))


def test_two_processes_append_one_chain(tmp_path):
    path = str(tmp_path / "shared.db")
    Ledger(path).close()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, start, 40)) for start in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with Ledger(path) as led:
        res = led.verify()
        assert res.ok and res.count == 80
        workers = [e.record["worker"] for e in led.records()]
    assert workers.count("w0") == 40 and workers.count("w1000") == 40
