"""`riskpipe ledger` commands: verify exit codes, head, export, replay, ingest from a real broker."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ledger_records import build_ledger, decision_record, forge_tree
from riskpipe.cli import cli
from riskpipe.ledger import Ledger, canonical_json, entry_hash
from riskpipe.ledger.inputs import input_digest


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture()
def ledger_path(tmp_path):
    build_ledger(tmp_path / "l.db", n=20)
    return str(tmp_path / "l.db")


def test_verify_head_export(ledger_path, tmp_path):
    r = run("ledger", "verify", ledger_path)
    assert r.exit_code == 0 and r.output.startswith("ok: ")
    head = run("ledger", "head", ledger_path).output.strip()
    assert len(head) == 64 and head in r.output
    out = tmp_path / "all.jsonl"
    assert run("ledger", "export", ledger_path, "--out", str(out)).exit_code == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    with Ledger(ledger_path) as led:
        assert len(lines) == led.count()
    # an export is verifiable with nothing but sha256 and the documented layout
    prev = "0" * 64
    for e in lines:
        assert e["prev_hash"] == prev
        prev = entry_hash(prev, e["kind"], e["entry_id"], canonical_json(e["record"]))
        assert prev == e["hash"]
    assert prev == head
    r = run("ledger", "export", ledger_path, "--out", str(tmp_path / "v.jsonl"), "--kind", "verdict")
    lines = (tmp_path / "v.jsonl").read_text().splitlines()
    assert r.exit_code == 0 and all(json.loads(x)["kind"] == "verdict" for x in lines)
    # a period that is no period, or a bound that is no time: refused before the file is made (it
    # exited 0 with an empty export, which reads as "nothing happened")
    for bounds, message in ((("--since", "2030-01-01", "--until", "2020-01-01"), "is not before until 2020-01-01"),
                            (("--since", "2026-01-01T00:00:00Z", "--until", "2026-01-01T01:00:00+01:00"),
                             "the period would be empty"),
                            (("--since", "soon"), "since: not an RFC 3339 time")):
        r = CliRunner().invoke(cli, ["ledger", "export", ledger_path, "--out", str(tmp_path / "p.jsonl"), *bounds])
        assert r.exit_code == 2 and message in r.output and not (tmp_path / "p.jsonl").exists(), r.output


def test_verify_names_first_bad_row_and_exits_1(ledger_path):
    db = sqlite3.connect(ledger_path, isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("UPDATE entries SET record = replace(record, '\"decision\":\"allow\"', '\"decision\":\"block\"') WHERE "
               "seq = 9")
    db.close()
    r = run("ledger", "verify", ledger_path)
    assert r.exit_code == 1 and "first bad row 9" in r.output
    r = run("ledger", "verify", ledger_path, "--json")
    assert json.loads(r.output)["first_bad_seq"] == 9


def test_verify_expect_head_detects_truncation(ledger_path):
    anchor = run("ledger", "head", ledger_path).output.strip()
    with Ledger(ledger_path) as led:
        n = led.count()
    db = sqlite3.connect(ledger_path, isolation_level=None)
    db.execute("DROP TRIGGER entries_no_delete")
    db.execute("DELETE FROM entries WHERE seq > ?", (n - 3,))
    head = db.execute("SELECT hash FROM entries WHERE seq = ?", (n - 3,)).fetchone()[0]
    db.execute("UPDATE chain_state SET count = ?, head = ?", (n - 3, head))
    db.close()
    assert run("ledger", "verify", ledger_path).exit_code == 1  # the Merkle tree still covers the cut rows
    forge_tree(ledger_path)
    assert run("ledger", "verify", ledger_path).exit_code == 0
    r = run("ledger", "verify", ledger_path, "--expect-head", anchor, "--expect-count", str(n))
    assert r.exit_code == 1 and f"first bad row {n - 2}" in r.output


def test_cli_errors_are_one_line(tmp_path):
    r = CliRunner().invoke(cli, ["ledger", "verify", str(tmp_path / "missing.db")])
    assert r.exit_code == 2 and r.output.count("\n") == 1 and "file not found" in r.output
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    r = CliRunner().invoke(cli, ["ledger", "head", str(tmp_path / "junk.db")])
    assert r.exit_code == 2 and "not a usable ledger" in r.output


def test_an_output_file_that_cannot_be_written_is_one_line(ledger_path, tmp_path):
    """`--out` under a regular file (or in a missing or read-only directory): one line naming
    the file and the reason, exit 2, for every command (the CLI group catches the OSError;
    export and report used to end in a FileNotFoundError or NotADirectoryError traceback)."""
    (tmp_path / "file").write_text("x")
    blocked = tmp_path / "file" / "out"
    np.save(tmp_path / "x.npy", np.zeros((1, 1, 8, 8), np.float32))
    for args in (["ledger", "export", ledger_path, "--out", str(blocked)],
                 ["report", "--ledger", ledger_path, "--format", "json", "--out", str(blocked)],
                 ["certify", "--input", str(tmp_path / "x.npy"), "--mode", "predict", "--output", str(blocked)]):
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert r.output.startswith(f"riskpipe: error: {tmp_path / 'file'}") and r.output.count("\n") == 1, r.output
        assert "Traceback" not in r.output


# ---- replay ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_record():
    """A real demo:digits decide-mode certificate in a full record."""
    from riskpipe.certify import Smoothing
    from riskpipe.models import load_model
    from riskpipe.models.digits import load_split

    model = load_model("demo:digits")
    X, _ = load_split("test")
    x = X[3]
    cert = Smoothing(model, sigma=0.25, alpha=0.001, max_samples=4000).decide_batch(x[None], [7070], 0.25)[0]
    rec = decision_record(0)
    rec["model"] = {"name": "digits", "spec": "demo:digits", "sha256": model.sha256}
    rec["certificate"] = {**cert.to_dict(), "radius_threat": cert.radius, "threat_norm": "l2", "threat_epsilon": 0.25}
    rec["input"] = {"sha256": input_digest(x), "shape": list(x.shape), "datatype": "FP32"}
    return rec, X


def test_replay_matches_and_changed_input_does_not(digits_record, tmp_path):
    rec, X = digits_record
    path = str(tmp_path / "l.db")
    with Ledger(path) as led:
        led.append(rec)
    np.save(tmp_path / "batch.npy", X[:10])  # the right input among others: found by digest
    r = run("ledger", "replay", rec["id"], "--ledger", path, "--input", str(tmp_path / "batch.npy"))
    assert r.exit_code == 0, r.output
    assert "replay: match" in r.output and "match    radius" in r.output and "MISMATCH" not in r.output
    changed = X[3].copy()
    changed[0, 4, 4] = min(1.0, changed[0, 4, 4] + 0.01)
    np.save(tmp_path / "changed.npy", changed[None])
    r = run("ledger", "replay", rec["id"], "--ledger", path, "--input", str(tmp_path / "changed.npy"))
    assert r.exit_code == 1 and "MISMATCH input" in r.output
    assert run("ledger", "replay", "nope", "--ledger", path, "--input", str(tmp_path / "batch.npy")).exit_code == 2


def test_replay_of_an_event_two_stages_decided_names_them_and_takes_the_chosen_one(digits_record, tmp_path):
    """Two policies decided one event (one decision each in the ledger): replay does not
    pick one silently (it used to take the later); --policy-sha256 chooses, as for receipts."""
    rec, X = digits_record
    other = json.loads(json.dumps(rec))
    other["policy"] = {**other["policy"], "sha256": "e" * 64}
    other["certificate"]["radius"] += 0.05  # the later decision does not replay: taking it silently fails
    path = str(tmp_path / "l.db")
    with Ledger(path) as led:
        assert led.append(rec) and led.append(other)
    np.save(tmp_path / "x.npy", X[3][None])
    r = run("ledger", "replay", rec["id"], "--ledger", path, "--input", str(tmp_path / "x.npy"))
    assert r.exit_code == 2 and "2 decision entries" in r.output and "choose one with --model and --policy-sha256" \
        in r.output and "e" * 64 in r.output
    r = run("ledger", "replay", rec["id"], "--ledger", path, "--input", str(tmp_path / "x.npy"),
            "--policy-sha256", rec["policy"]["sha256"])
    assert r.exit_code == 0 and "replay: match" in r.output, r.output
    r = run("ledger", "replay", rec["id"], "--ledger", path, "--input", str(tmp_path / "x.npy"),
            "--policy-sha256", "e" * 64)
    assert r.exit_code == 1 and "MISMATCH" in r.output


def test_replay_detects_edited_certificate(digits_record, tmp_path):
    rec, X = digits_record
    forged = json.loads(json.dumps(rec))
    forged["id"] = "evt-forged"
    forged["certificate"]["radius"] += 0.05
    path = str(tmp_path / "l.db")
    with Ledger(path) as led:
        led.append(forged)
    np.save(tmp_path / "x.npy", X[3][None])
    r = run("ledger", "replay", "evt-forged", "--ledger", path, "--input", str(tmp_path / "x.npy"), "--json")
    assert r.exit_code == 1
    res = json.loads(r.output)
    bad = [c["name"] for c in res["checks"] if not c["match"]]
    assert bad == ["radius"] and res["input_match"] is True


# ---- ingest from the audit topic -------------------------------------------------------------

@pytest.mark.broker
def test_ingest_two_workers_share_one_ledger(tmp_path):
    from kafka import KafkaProducer

    from riskpipe.stream.broker import EmbeddedBroker

    path = str(tmp_path / "shared.db")
    records = [decision_record(i, worker=f"w{i % 2}") for i in range(40)]
    with EmbeddedBroker() as broker:
        broker.create_topics(["audit", "dlq"], partitions=2)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for rec in records:
            producer.send("audit", key=rec["id"].encode(), value=json.dumps(rec).encode())
        producer.send("audit", key=records[0]["id"].encode(), value=json.dumps(records[0]).encode())  # redelivery
        producer.send("audit", key=b"junk", value=b"{not json")
        producer.send("dlq", value=b"\x00secret payload", headers=[
            ("__riskpipe.errors.reason", b"invalid_json"), ("__riskpipe.errors.topic", b"inferences"),
            ("__riskpipe.errors.partition", b"0"), ("__riskpipe.errors.offset", b"77")])
        producer.flush()
        producer.close()
        cmd = [sys.executable, "-m", "riskpipe.cli", "ledger", "ingest", "--bootstrap-servers", broker.bootstrap,
               "--topic", "audit", "--topic", "dlq", "--ledger", path, "--until-idle", "4"]
        procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outs = [p.communicate(timeout=90) for p in procs]
    for p, (_out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    with Ledger(path) as led:
        assert led.verify().ok
        assert led.count("decision") == 40
        assert {e.entry_id for e in led.records("decision")} == {r["id"] for r in records}
        assert led.count("policy") == 1
        dlq = [e.record for e in led.records("dlq")]
    reasons = sorted(d["reason"] for d in dlq)
    assert reasons == ["invalid_json", "invalid_json"]
    assert all("payload" not in d and "secret" not in json.dumps(d) for d in dlq)
    assert any(d["source"] == {"topic": "inferences", "partition": 0, "offset": 77} for d in dlq)


def test_ingest_refuses_a_topic_kafka_would_refuse(tmp_path):
    r = CliRunner().invoke(cli, ["ledger", "ingest", "--ledger", str(tmp_path / "l.db"), "--bootstrap-servers",
                                 "127.0.0.1:1", "--topic", "a/b=verdict"])
    assert r.exit_code == 2 and "--topic a/b=verdict: 'a/b' is not a Kafka topic name" in r.output, r.output


def test_ingest_records_what_it_cannot_take_as_a_dead_letter_with_its_reason():
    """A verdict whose ``verdict`` is given twice (readers differ on which copy counts: the
    stage refuses such an event, so ingest refuses such a record) is a ``duplicate_key``
    dead letter naming the key, never a verdict; the other unreadable records keep their
    reasons, and a readable verdict is taken as it is."""
    from types import SimpleNamespace

    from riskpipe.cli.ledger_impl import message_entries

    def entries(value: bytes):
        return message_entries(SimpleNamespace(topic="review-outcomes", partition=0, offset=3, timestamp=0,
                                               value=value, headers=[]), "verdict")

    verdict = {"id": "e-1", "verdict": "confirmed_clean", "reviewer": "alice", "ts": "2026-01-01T00:00:00Z"}
    [(kind, rec, _)] = entries(json.dumps(verdict).encode())
    assert kind == "verdict" and rec == verdict
    twice = json.dumps(verdict).replace('"verdict": "confirmed_clean"',
                                        '"verdict": "confirmed_clean", "verdict": "confirmed_manipulated"')
    for value, reason, says in ((twice.encode(), "duplicate_key", "'verdict' appears twice"),
                                (b'["e-1"]', "not_an_object", "not a JSON object"),
                                (b'{"verdict": "unsure"}', "missing_field", "missing field 'id'"),
                                (b"{not json", "invalid_json", ""),
                                (b"[" * 100_000, "invalid_json", "nested too deeply")):  # was a RecursionError
        [(kind, rec, _)] = entries(value)
        assert (kind, rec["reason"]) == ("dlq", reason) and says in rec["message"], rec
        assert rec["source"] == {"topic": "review-outcomes", "partition": 0, "offset": 3}
    # an audit record always names its decision: one that does not would be counted under none
    for value in (b'{"id": "e-2"}', b'{"id": "e-2", "decision": "BLOCK"}'):
        [(kind, rec, _)] = message_entries(SimpleNamespace(topic="audit", partition=0, offset=4, timestamp=0,
                                                           value=value, headers=[]), "decision")
        assert (kind, rec["reason"]) == ("dlq", "missing_field") and "is not one of allow" in rec["message"], rec


def test_an_empty_or_foreign_ledger_is_never_ok(tmp_path):
    """A ledger with no rows verifies nothing (exit 1, EMPTY); a file without ledger tables (a
    WAL-mode ledger copied without its -wal file, an empty file, another database) is an error
    and is left as it was."""
    import shutil

    led = Ledger(tmp_path / "live.db")
    led.append_many([decision_record(i) for i in range(5)])
    shutil.copy(tmp_path / "live.db", tmp_path / "copied.db")  # the rows are still in live.db-wal
    led.close()
    with sqlite3.connect(tmp_path / "copied.db") as db:
        assert not db.execute("SELECT name FROM sqlite_master").fetchall()  # what the copy holds
    (tmp_path / "empty.db").write_bytes(b"")
    with sqlite3.connect(tmp_path / "other.db") as db:
        db.execute("CREATE TABLE t (x)")
    for name in ("copied.db", "empty.db", "other.db"):
        before = (tmp_path / name).read_bytes()
        r = CliRunner().invoke(cli, ["ledger", "verify", str(tmp_path / name)])
        assert r.exit_code == 2 and "holds no ledger tables" in r.output and "ok:" not in r.output, r.output
        assert (tmp_path / name).read_bytes() == before  # not turned into an empty ledger
    Ledger(tmp_path / "fresh.db").close()
    r = run_any("ledger", "verify", str(tmp_path / "fresh.db"))
    assert r.exit_code == 1 and r.output.startswith("EMPTY: empty: ") and "ok:" not in r.output
    r = run_any("ledger", "verify", str(tmp_path / "fresh.db"), "--json")
    out = json.loads(r.output)
    assert r.exit_code == 1 and out["ok"] is False and out["count"] == 0 and out["reason"].startswith("empty: ")


def run_any(*args):
    return CliRunner().invoke(cli, list(args))


def test_ingest_takes_every_message_a_forged_one_included_and_the_markdown_report_shows_it_as_text(tmp_path):
    """One audit record with a line break in its id (or a ts that is no time) stopped
    ``ledger ingest`` for good: the batch's append was refused, the good records with it,
    and every restart read it again; a dead letter with a partition header that is no number
    was a traceback; and a reason header holding a new line, a heading and ``<!--`` forged a
    "Ledger integrity: intact" section of the Markdown report and hid the real one."""
    from types import SimpleNamespace

    from riskpipe.cli.ledger_impl import message_entries
    from riskpipe.report import write_report

    def msg(value: bytes, offset: int, headers=()):
        return SimpleNamespace(topic="audit", partition=0, offset=offset, timestamp=1_740_830_400_000,
                               value=value, headers=list(headers))

    good = decision_record(0)
    forged = "x` | 1 |\n\n## 10. Ledger integrity\n\n- result: **intact**\n\n<!--"
    messages = [(msg(json.dumps(good).encode(), 0), "decision"),
                (msg(json.dumps({**decision_record(1), "id": "evt\nforged"}).encode(), 1), "decision"),
                (msg(json.dumps({**decision_record(2), "ts": "yesterday"}).encode(), 2), "decision"),
                (msg(b"payload", 3, [("__riskpipe.errors.reason", forged.encode()),
                                     ("__riskpipe.errors.topic", b"inferences"),
                                     ("__riskpipe.errors.partition", b"x")]), "dlq")]
    path = str(tmp_path / "l.sqlite")
    with Ledger(path) as led:
        for m, kind in messages:
            led.append_entries(message_entries(m, kind))  # each one on its own: none is refused
        dlq = [e.record for e in led.records("dlq")]
        assert led.get(good["id"]) is not None and led.count("decision") == 1
    assert sorted(d["reason"] for d in dlq) == ["bad_record", "bad_record", "unknown"]
    unknown = next(d for d in dlq if d["reason"] == "unknown")
    assert unknown["source"] == {"topic": "inferences", "partition": None, "offset": None}
    assert "## 10. Ledger integrity" in unknown["message"]  # kept as text, on record
    with Ledger(path) as led:  # text from the ledger that reaches the report as it is: a model's name
        led.append({**decision_record(4), "model": {**decision_record(4)["model"], "name": forged}})
    out = tmp_path / "report.md"
    write_report(path, out, fmt="md")
    text = out.read_text()
    headings = [line for line in text.splitlines() if line.startswith("#")]
    assert len([h for h in headings if "Ledger integrity" in h]) == 1 and "<!--" not in text
    assert not [h for h in headings if "intact**" in h]
