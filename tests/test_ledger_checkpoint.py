"""Signed checkpoints: Ed25519 over (head, count, time), stored in the ledger and published;
`verify --public-key` catches truncation and re-chaining up to the latest checkpoint with
only the public key, on SQLite and on PostgreSQL (rows changed behind the triggers' back)."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys

import psycopg
import pytest
from ledger_records import decision_record, forge_tree

from riskpipe.ledger import LedgerError, canonical_json, entry_hash, open_ledger
from riskpipe.ledger.checkpoint import (
    Checkpoint,
    load_private_key,
    load_public_key,
    make_checkpoint,
    verify_ledger,
)

CLI = [sys.executable, "-m", "riskpipe.cli", "ledger"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """A key pair as the docs tell users to make it: openssl genpkey -algorithm ed25519."""
    d = tmp_path_factory.mktemp("keys")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / "key.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "key.pem"), "-pubout", "-out", str(d / "pub.pem")], check=True)
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / "other.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "other.pem"), "-pubout", "-out", str(d / "other.pub.pem")], check=True)
    return d


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path):
    if request.param == "sqlite":
        return str(tmp_path / "ledger.db")
    return request.getfixturevalue("pg_url")


def superuser_sql(target, statements):
    """Change rows as someone with full database rights: triggers off, then any SQL, then
    the Merkle tree rebuilt over the changed rows (a consistent forgery)."""
    if target.startswith("postgresql://"):
        with psycopg.connect(target, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            for s in statements:
                conn.execute(s)
    else:
        db = sqlite3.connect(target, isolation_level=None)
        db.execute("DROP TRIGGER entries_no_update")
        db.execute("DROP TRIGGER entries_no_delete")
        for s in statements:
            db.execute(s)
        db.close()
    forge_tree(target)


def rechain_from(target, start, edit):
    """Edit row ``start`` (``edit(record) -> record``) and recompute every later hash and the
    chain state: an internally consistent forgery the plain hash chain cannot see."""
    with open_ledger(target) as led:
        rows = list(led.records())
    prev = rows[start - 2].hash if start > 1 else "0" * 64
    stmts = []
    for e in rows[start - 1:]:
        rec = edit(e.record) if e.seq == start else e.record
        text = canonical_json(rec)
        h = entry_hash(prev, e.kind, e.entry_id, text)
        stmts.append(f"UPDATE entries SET record = '{text.replace(chr(39), chr(39) * 2)}', prev_hash = '{prev}', "
                     f"hash = '{h}' WHERE seq = {e.seq}")
        prev = h
    stmts.append(f"UPDATE chain_state SET count = {len(rows)}, head = '{prev}' WHERE id = 1")
    superuser_sql(target, stmts)


def build(target, keys, n1=10, n2=10):
    """n1 rows, a checkpoint, n2 rows, a second checkpoint at n1 + n2."""
    key = load_private_key(keys / "key.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(n1)])
        cp1 = make_checkpoint(led, key)
        led.append_many([decision_record(i) for i in range(n1, n1 + n2)])
        cp2 = make_checkpoint(led, key)
    return cp1, cp2


def verify_with_key(target, keys, *extra):
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "pub.pem"), "--json", *extra],
                       capture_output=True, text=True, timeout=60)
    return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else r.stderr)


def test_checkpoints_sign_head_and_count(target, keys):
    cp1, cp2 = build(target, keys)
    assert (cp1.count, cp2.count) == (10, 20)
    with open_ledger(target) as led:
        assert led.checkpoints() == [cp1, cp2]
        assert led.hash_at(10) == cp1.head and led.head() == cp2.head
        res = verify_ledger(led, [load_public_key(keys / "pub.pem")])
    assert res.ok and res.count == 20
    rc, out = verify_with_key(target, keys)
    assert rc == 0 and out["ok"] and out["count"] == 20


def test_rechained_history_is_caught_with_only_the_public_key(target, keys):
    build(target, keys)
    rechain_from(target, 14, lambda r: {**r, "decision": "block"})
    with open_ledger(target) as led:
        assert led.verify().ok  # the hash chain alone cannot see a recomputed chain
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 11, out  # after checkpoint 1 (row 10), which still matches
    assert "rows 11..20 were rewritten" in out["reason"]


def test_rechaining_before_the_first_checkpoint_is_reported_from_row_1(target, keys):
    build(target, keys)
    rechain_from(target, 3, lambda r: {**r, "decision": "block"})
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 1 and "rows 1..10" in out["reason"]


def test_truncation_after_a_checkpoint_is_caught_with_only_the_public_key(target, keys):
    cp1, cp2 = build(target, keys)
    with open_ledger(target) as led:
        head15 = led.hash_at(15)
    # drop rows 16..20 and forge the chain state so the plain chain looks intact
    superuser_sql(target, ["DELETE FROM entries WHERE seq > 15",
                           f"UPDATE chain_state SET count = 15, head = '{head15}' WHERE id = 1"])
    with open_ledger(target) as led:
        assert led.verify().ok
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 16 and "truncated" in out["reason"], out


def test_deleted_checkpoints_are_caught_by_the_published_copies(target, keys, tmp_path):
    cp1, cp2 = build(target, keys)
    with open_ledger(target) as led:
        head12 = led.hash_at(12)
    published = tmp_path / "checkpoints.jsonl"
    published.write_text("\n".join(canonical_json(c.to_dict()) for c in (cp1, cp2)) + "\n")
    if target.startswith("postgresql://"):
        superuser_sql(target, ["DELETE FROM checkpoints WHERE count = 20", "DELETE FROM entries WHERE seq > 12",
                               f"UPDATE chain_state SET count = 12, head = '{head12}' WHERE id = 1"])
    else:
        superuser_sql(target, ["DROP TRIGGER checkpoints_no_delete", "DELETE FROM checkpoints WHERE count = 20",
                               "DELETE FROM entries WHERE seq > 12",
                               f"UPDATE chain_state SET count = 12, head = '{head12}' WHERE id = 1"])
    rc, out = verify_with_key(target, keys)
    assert rc == 0  # the ledger alone now looks fine: its latest checkpoint (row 10) still matches
    rc, out = verify_with_key(target, keys, "--checkpoints", str(published))
    assert rc == 1 and out["first_bad_seq"] == 13 and "truncated" in out["reason"]


def test_forged_or_foreign_checkpoints_fail(tmp_path, keys):
    target = str(tmp_path / "l.db")
    cp1, _ = build(target, keys)
    forged = Checkpoint(**{**cp1.to_dict(), "count": 9})
    f = tmp_path / "forged.jsonl"
    f.write_text(canonical_json(forged.to_dict()) + "\n")
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 1 and "signature does not verify" in out["reason"]
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "other.pub.pem")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "not by a given public key" in r.stdout
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "other.pub.pem"), "--public-key",
                        str(keys / "pub.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout  # a rotated key: both public keys given


def test_checkpoint_command_and_bad_keys(tmp_path, keys):
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(3)])
        head = led.head()
    r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem"), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cp = json.loads(r.stdout)
    assert cp["count"] == 3 and cp["head"] == head
    for bad, message in [(keys / "pub.pem", "not an unencrypted PEM private key"), (tmp_path / "nope.pem", "cannot read")]:
        r = subprocess.run([*CLI, "checkpoint", target, "--key", str(bad)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(LedgerError, match="not an Ed25519 public key|not a PEM public key"):
        load_public_key(keys / "key.pem")


@pytest.mark.broker
def test_checkpoint_is_published_to_the_checkpoints_topic(tmp_path, keys):
    from kafka import TopicPartition

    from riskpipe import kafka_clients
    from riskpipe.kafka_clients import KafkaSettings
    from riskpipe.stream.broker import EmbeddedBroker

    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(4)])
    with EmbeddedBroker() as broker:
        broker.create_topics(["checkpoints"])
        r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem"), "--bootstrap-servers",
                            broker.bootstrap, "--json"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        consumer = kafka_clients.consumer(KafkaSettings(bootstrap_servers=broker.bootstrap), enable_auto_commit=False,
                                          consumer_timeout_ms=5000)
        consumer.assign([TopicPartition("checkpoints", 0)])
        consumer.seek_to_beginning()
        got = [json.loads(m.value) for m in consumer]
        consumer.close()
    assert got == [json.loads(r.stdout)]
    published = tmp_path / "published.jsonl"
    published.write_text(json.dumps(got[0]) + "\n")
    rc, out = verify_with_key(target, keys, "--checkpoints", str(published))
    assert rc == 0 and out["ok"]


def test_checkpointer_signs_every_n_records_or_seconds(tmp_path, keys):
    from riskpipe.ledger.checkpoint import Checkpointer

    now = [0.0]
    cpr = Checkpointer(load_private_key(keys / "key.pem"), every_records=10, every_seconds=30, clock=lambda: now[0])
    with open_ledger(str(tmp_path / "l.db")) as led:
        def commit(records):  # what the stage's after-commit hook does after each batch
            led.append_many(records)
            cpr(led, len(records))

        commit([decision_record(i) for i in range(6)])
        assert led.checkpoints() == []
        commit([decision_record(i) for i in range(6, 12)])  # 12 records >= 10: due
        assert [c.count for c in led.checkpoints()] == [12]
        now[0] = 31.0
        commit([])  # 31 s but nothing committed since: nothing to sign
        assert len(led.checkpoints()) == 1
        commit([decision_record(50)])  # 31 s and one new record: due
        assert [c.count for c in led.checkpoints()] == [12, 13]
        assert verify_ledger(led, [load_public_key(keys / "pub.pem")]).ok


def test_stage_config_checkpoint_section(tmp_path, keys):
    from riskpipe.ledger.checkpoint import checkpointer_for
    from riskpipe.stream.config import ConfigError, load_config

    f = tmp_path / "c.yaml"
    f.write_text(f"checkpoint: {{key_file: {keys / 'key.pem'}, every_records: 5}}\n")
    cfg = load_config(str(f))
    assert cfg.checkpoint.every_records == 5 and cfg.checkpoint.topic == "checkpoints"
    assert checkpointer_for(cfg.checkpoint).every_records == 5
    f.write_text(f"checkpoint: {{key_file: {tmp_path / 'missing.pem'}}}\n")
    with pytest.raises(LedgerError, match="checkpoint.key_file .*missing.pem: cannot read"):
        checkpointer_for(load_config(str(f)).checkpoint)
    f.write_text("checkpoint: {every_records: 5}\n")
    with pytest.raises(ConfigError, match="checkpoint.key_file: Field required"):
        load_config(str(f))


def test_offline_stage_signs_checkpoints_after_commits(tmp_path, keys):
    from streamkit import valid_events

    events = tmp_path / "events.jsonl"
    events.write_text("".join(json.dumps(e) + "\n" for e in valid_events("cp", 40)))
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text(f"batch: {{max_events: 8}}\ncheckpoint: {{key_file: {keys / 'key.pem'}, every_records: 16}}\n")
    ledger = str(tmp_path / "l.db")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--source",
                        f"jsonl:{events}", "--sink", f"jsonl:{tmp_path / 'out'}", "--ledger", ledger],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    with open_ledger(ledger) as led:
        counts = [c.count for c in led.checkpoints()]
        assert led.count("decision") == 40
    assert len(counts) == 2 and counts == sorted(counts) and counts[-1] <= 41  # every 16 records: after 16, 32
    rc, out = verify_with_key(ledger, keys)
    assert rc == 0 and out["ok"]
    cfg.write_text(f"checkpoint: {{key_file: {tmp_path / 'nope.pem'}}}\n")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--source",
                        f"jsonl:{events}", "--sink", f"jsonl:{tmp_path / 'out'}", "--ledger", ledger],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint.key_file" in r.stderr and "Traceback" not in r.stderr
