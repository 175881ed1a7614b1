"""Signed checkpoints: C2SP checkpoint notes (Ed25519) over the Merkle tree size and root,
stored in the ledger and published; `verify --public-key` catches truncation and
rewriting (chain and tree recomputed) up to the latest checkpoint with only the public
key, on SQLite and on PostgreSQL (rows changed behind the triggers' back); `consistency`
proves a later checkpoint extends an earlier one; legacy checkpoints still verify."""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
import sys

import pytest

from ledger_records import as_superuser, decision_record, forge_tree
from riskpipe.ledger import LedgerError, canonical_json, entry_hash, open_ledger
from riskpipe.ledger.anchors import Checkpoint
from riskpipe.ledger.checkpoint import (
    load_private_key,
    load_public_key,
    make_checkpoint,
    read_checkpoint_file,
    verify_ledger,
)

CLI = [sys.executable, "-m", "riskpipe.cli", "ledger"]


def superuser_sql(target, statements):
    """Change rows as someone with full database rights: triggers off, then any SQL, then
    the Merkle tree rebuilt over the changed rows (a consistent forgery)."""
    as_superuser(target, statements)
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


def test_checkpoints_are_c2sp_notes_over_size_and_root(target, keys):
    import base64
    import hashlib

    from riskpipe.ledger.checkpoint import legacy_key_id
    from riskpipe.ledger.note import raw_public_key

    cp1, cp2 = build(target, keys)
    assert (cp1.tree_size, cp2.tree_size) == (10, 20)
    pub = load_public_key(keys / "pub.pem")
    with open_ledger(target) as led:
        assert led.notes() == [cp1.note, cp2.note]
        assert led.tree_root(10) == cp1.root and led.tree_head() == (20, cp2.root.hex())
        origin = f"riskpipe/ledger/{led.log_id()}"
        res = verify_ledger(led, [pub])
    assert res.ok and res.count == 20 and res.root == cp2.root.hex()
    # the format, checked byte by byte against the C2SP text (not against riskpipe's code)
    body, sig_line = cp1.note.split("\n\n")
    assert body == f"{origin}\n10\n{base64.b64encode(cp1.root).decode()}"
    dash, name, blob = sig_line.rstrip("\n").split(" ")
    assert dash == "\u2014" and name == origin and sig_line.endswith("\n") and cp1.note.count("\n") == 5
    blob = base64.b64decode(blob)
    assert len(blob) == 68
    assert blob[:4] == hashlib.sha256(origin.encode() + b"\n\x01" + raw_public_key(pub)).digest()[:4]
    pub.verify(blob[4:], (body + "\n").encode())
    rc, out = verify_with_key(target, keys)
    assert rc == 0 and out["ok"] and out["count"] == 20
    # it says which checkpoint the chain was matched against: the latest one
    assert out["checkpoint"] == {"kind": "c2sp", "origin": origin, "tree_size": 20, "root": cp2.root.hex(),
                                 "key": legacy_key_id(pub), "verified": 2}
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "pub.pem")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and (f"signed checkpoint matched: origin {origin}, tree size 20, root {cp2.root.hex()}, "
                                  f"key {legacy_key_id(pub)} (latest of 2 verified checkpoint(s))") in r.stdout


def test_signed_note_matches_the_go_reference_vector():
    """golang.org/x/mod/sumdb/note's documented example (key PeterNeumann+c74f20a3)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from riskpipe.ledger import note

    seed = base64.b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
    key = Ed25519PrivateKey.from_private_bytes(seed)
    assert base64.b64decode("ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")[1:] == note.raw_public_key(key.public_key())
    assert note.key_id("PeterNeumann", key.public_key()).hex() == "c74f20a3"
    text = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
    want = (text + "\n\u2014 PeterNeumann "
            "x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
    assert note.sign(text, "PeterNeumann", key) == want
    got, pub = note.verify(want, [key.public_key()])
    assert got == text and note.raw_public_key(pub) == note.raw_public_key(key.public_key())
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify(want.replace("cryptography", "cryptographY"), [key.public_key()])
    assert note.split_notes(want + "\n" + want) == [want, want]


def test_a_failed_signature_by_a_given_key_refuses_the_note_whatever_else_verifies():
    """Go's note.Open and the C2SP signed-note spec: a signature line of a known key that
    does not verify rejects the whole note. Before, a bad line by one given key was passed
    over when another given key's line verified, so a note one trusted signer did not sign
    (or whose copy was altered for that signer) was accepted. Unknown signers stay ignored;
    every line of a given key must verify (Go reads only a signer's first)."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from riskpipe.ledger import note

    log, witness, stranger = (Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32) for i in (1, 2, 3))
    text = note.checkpoint_text("example.com/log", 3, b"\x07" * 32)

    def line(name, key, body=text):
        return note.sign(body, name, key).split("\n\n")[1]

    signed = text + "\n" + line("example.com/log", log)
    forged = line("witness.example", witness, text.replace("\n3\n", "\n4\n"))  # its signature is over another text
    trusted = [log.public_key(), witness.public_key()]
    assert note.verify(signed + line("witness.example", witness), trusted)[0] == text
    assert note.verify(signed + line("stranger.example", stranger), trusted)[0] == text  # unknown: ignored
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify(signed + forged, trusted)
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify(text + "\n" + forged + line("example.com/log", log), trusted)
    short = "\u2014 witness.example " + base64.b64encode(note.key_id("witness.example", witness.public_key())
                                                          + b"\x00" * 10).decode() + "\n"
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify(signed + short, trusted)
    # every line of a given key counts, a second copy too (Go reads only the first)
    with pytest.raises(note.NoteError, match="does not verify"):
        note.verify(signed + line("example.com/log", log, text.replace("\n3\n", "\n4\n")), trusted)


def test_legacy_checkpoints_still_verify(tmp_path, keys):
    """A checkpoint signed by riskpipe before the tree (JSON over head and count) keeps
    anchoring the chain after the migration, with the same key."""
    import base64

    from riskpipe.ledger.anchors import signed_bytes
    from riskpipe.ledger.checkpoint import legacy_key_id
    from riskpipe.ledger.note import raw_public_key

    target = str(tmp_path / "l.db")
    key = load_private_key(keys / "key.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(6)])
        head = led.head()
    ts = "2024-05-01T00:00:00.000000Z"
    pub = key.public_key()
    sig = base64.b64encode(key.sign(signed_bytes(6, head, ts))).decode()
    db = sqlite3.connect(target, isolation_level=None)
    db.execute("INSERT INTO checkpoints (count, head, ts, key_id, public_key, signature) VALUES (?,?,?,?,?,?)",
               (6, head, ts, legacy_key_id(pub), base64.b64encode(raw_public_key(pub)).decode(), sig))
    db.close()
    with open_ledger(target) as led:
        assert [c.count for c in led.legacy_checkpoints()] == [6]
        assert verify_ledger(led, [load_public_key(keys / "pub.pem")]).ok
    rechain_from(target, 2, lambda r: {**r, "decision": "block"})
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 1 and "rewritten and re-chained" in out["reason"]


def test_rechained_history_is_caught_with_only_the_public_key(target, keys):
    build(target, keys)
    rechain_from(target, 14, lambda r: {**r, "decision": "block"})
    with open_ledger(target) as led:
        assert led.verify().ok  # the hash chain alone cannot see a recomputed chain
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 11, out  # after checkpoint 1 (row 10), which still matches
    assert "rows among 11..20 were changed, removed or replaced" in out["reason"]


def test_rechaining_before_the_first_checkpoint_is_reported_from_row_1(target, keys):
    build(target, keys)
    rechain_from(target, 3, lambda r: {**r, "decision": "block"})
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 1 and "rows among 1..10" in out["reason"]


def test_truncation_after_a_checkpoint_is_caught_with_only_the_public_key(target, keys):
    _cp1, _cp2 = build(target, keys)
    with open_ledger(target) as led:
        head15 = led.hash_at(15)
    # drop rows 16..20 and forge the chain state so the plain chain looks intact
    superuser_sql(target, ["DELETE FROM entries WHERE seq > 15",
                           f"UPDATE chain_state SET count = 15, head = '{head15}' WHERE id = 1"])
    with open_ledger(target) as led:
        assert led.verify().ok
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["first_bad_seq"] == 16 and "truncated" in out["reason"], out


def test_the_report_checks_the_largest_stored_checkpoint(target, keys):
    """Rows cut below a stored checkpoint, with chain state and tree made to match: the
    report said "intact" (it recomputed the chain and tree only) while the ledger's own
    signed_notes said it had held more. Without the key it cannot check the signature,
    but a stored checkpoint the rows do not reach is a failure."""
    from riskpipe.report.data import _integrity, gather

    build(target, keys)
    assert gather(str(target))["integrity"]["ok"] is True
    with open_ledger(target) as led:
        head15 = led.hash_at(15)
    superuser_sql(target, ["DELETE FROM entries WHERE seq > 15",
                           f"UPDATE chain_state SET count = 15, head = '{head15}' WHERE id = 1"])
    integrity = gather(str(target))["integrity"]  # (its facts table, left as it was, fails it as well)
    assert integrity["ok"] is False and integrity["first_bad_seq"] == 16, integrity
    with open_ledger(target) as led:
        chain = _integrity(led, str(target), True)
    assert chain["ok"] is False and "truncated: a signed checkpoint covers tree size 20" in chain["reason"], chain


def test_a_rolled_back_or_rewritten_log_is_never_signed(target, keys):
    """The signer checked nothing: after rows 16..20 were cut (below the checkpoint of 20)
    and other rows appended, with chain and tree rebuilt, the routine ``ledger checkpoint``
    signed the fork; with the old note deleted, ``verify --public-key`` then said ok. Now
    a key signs only a tree that extends the largest tree it signed before."""
    build(target, keys)  # checkpoints at 10 and 20
    with open_ledger(target) as led:
        head15 = led.hash_at(15)
    as_superuser(target, ["DELETE FROM entries WHERE seq > 15", "DELETE FROM facts WHERE seq > 15",
                          f"UPDATE chain_state SET count = 15, head = '{head15}' WHERE id = 1"], ("entries", "facts"))
    forge_tree(target)
    key = load_private_key(keys / "key.pem")
    with open_ledger(target) as led:
        with pytest.raises(LedgerError, match="not signed: this key signed a tree of 20 leaves, and the ledger's "
                                              "tree now has only 15: the log was rolled back or rewritten"):
            make_checkpoint(led, key)
        led.append_many([decision_record(100 + i) for i in range(10)])  # a fork of 25 leaves
        with pytest.raises(LedgerError, match="tree of 20 leaves, and the ledger's tree now has other rows in the "
                                              "first 20"):
            make_checkpoint(led, key)
        assert len(led.notes()) == 2  # nothing stored
    r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "rolled back or rewritten" in r.stderr, r.stderr
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "pub.pem")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and r.stdout.startswith("TAMPERED: first bad row 11: ")  # the checkpoint at 10 holds
    assert "the hash chain links all 25 rows" in r.stdout and "check out before it" not in r.stdout
    with open_ledger(target) as led:  # another key's notes vouch for nothing: it signs what it sees
        assert make_checkpoint(led, load_private_key(keys / "other.pem")).tree_size == 25


def test_a_replica_signing_a_larger_tree_meanwhile_is_no_rollback(tmp_path, keys):
    """Two replicas with one key: this one read tree size 10, the other appended and signed
    15 before this one looked at the notes. That is an honest history (the tree now extends
    both) and was refused as a rollback; a rewrite is still refused."""
    from riskpipe.ledger.checkpoint import refuse_fork

    pk = load_public_key(keys / "pub.pem")
    with open_ledger(str(tmp_path / "l.db")) as led:
        led.append_many([decision_record(i) for i in range(10)])
        size, root = led.tree_head()
        led.append_many([decision_record(i) for i in range(10, 15)])
        assert make_checkpoint(led, load_private_key(keys / "key.pem")).tree_size == 15  # the other replica
        refuse_fork(led, pk, size, root)  # this one, with what it read before
        with pytest.raises(LedgerError, match="rolled back or rewritten"):
            refuse_fork(led, pk, size, "00" * 32)  # a tree of 10 the ledger's does not extend


def test_the_stage_checkpointer_remembers_what_it_signed_when_the_stored_notes_are_deleted(target, keys):
    """Deleting the stored notes before the rollback left nothing to compare with, and the
    next checkpoint signed the fork. The stage's checkpointer keeps its last checkpoint in
    memory and refuses a tree that does not extend it."""
    from riskpipe.ledger.checkpoint import Checkpointer

    cpr = Checkpointer(load_private_key(keys / "key.pem"), every_records=1)
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(20)])
        assert cpr(led, 20).tree_size == 20
        head15 = led.hash_at(15)
    as_superuser(target, ["DELETE FROM signed_notes", "DELETE FROM entries WHERE seq > 15",
                          "DELETE FROM facts WHERE seq > 15",
                          f"UPDATE chain_state SET count = 15, head = '{head15}' WHERE id = 1"],
                 ("entries", "facts", "signed_notes"))
    forge_tree(target)
    with open_ledger(target) as led:
        led.append_many([decision_record(100 + i) for i in range(10)])
        with pytest.raises(LedgerError, match="this key signed a tree of 20 leaves, and the ledger's tree now has "
                                              "other rows in the first 20"):
            cpr(led, 10)
        assert led.notes() == []


def test_a_key_signs_a_log_that_grew_from_what_it_signed(tmp_path, keys):
    """The check passes every honest history: growth after each checkpoint, a second key
    signing beside the first, and a note of another key with a larger size."""
    target = str(tmp_path / "l.db")
    key, other = load_private_key(keys / "key.pem"), load_private_key(keys / "other.pem")
    with open_ledger(target) as led:
        for n in range(3):
            led.append_many([decision_record(10 * n + i) for i in range(5)])
            assert make_checkpoint(led, key).tree_size == 5 * (n + 1)
        assert make_checkpoint(led, key).tree_size == 15  # the same tree again
        assert make_checkpoint(led, other).tree_size == 15
        led.append_many([decision_record(99)])
        assert make_checkpoint(led, key).tree_size == 16


def test_deleted_checkpoints_are_caught_by_the_published_copies(target, keys, tmp_path):
    cp1, cp2 = build(target, keys)
    with open_ledger(target) as led:
        head12 = led.hash_at(12)
    published = tmp_path / "checkpoints.txt"
    published.write_text(cp1.note + "\n" + cp2.note)  # as a consumer of the checkpoints topic writes them
    if target.startswith("postgresql://"):
        superuser_sql(target, ["DELETE FROM signed_notes WHERE tree_size = 20", "DELETE FROM entries WHERE seq > 12",
                               f"UPDATE chain_state SET count = 12, head = '{head12}' WHERE id = 1"])
    else:
        superuser_sql(target, ["DROP TRIGGER signed_notes_no_delete", "DELETE FROM signed_notes WHERE tree_size = 20",
                               "DELETE FROM entries WHERE seq > 12",
                               f"UPDATE chain_state SET count = 12, head = '{head12}' WHERE id = 1"])
    rc, out = verify_with_key(target, keys)
    assert rc == 0  # the ledger alone now looks fine: its latest checkpoint (row 10) still matches
    rc, out = verify_with_key(target, keys, "--checkpoints", str(published))
    assert rc == 1 and out["first_bad_seq"] == 13 and "truncated" in out["reason"]


def test_a_ledger_whose_checkpoints_are_all_deleted_is_never_ok_with_a_public_key(target, keys, tmp_path):
    """A writer with full rights rewrites a decision, recomputes every hash
    and the tree, and deletes every stored checkpoint: with a public key, verify said "ok
    (no signed checkpoint yet)", exit 0. Now UNSIGNED, exit 1; the published copies then
    name the rewritten rows."""
    cp1, cp2 = build(target, keys)
    published = tmp_path / "checkpoints.txt"
    published.write_text(cp1.note + "\n" + cp2.note)
    rechain_from(target, 4, lambda r: {**r, "decision": "block"})
    drop = [] if target.startswith("postgresql://") else ["DROP TRIGGER signed_notes_no_delete"]
    as_superuser(target, [*drop, "DELETE FROM signed_notes"], tables=())  # entries: done by rechain_from
    with open_ledger(target) as led:
        assert led.verify().ok and not led.notes()  # consistent on its own
    rc, out = verify_with_key(target, keys)
    assert rc == 1 and out["ok"] is False and out["unsigned"] is True and "no signed checkpoint" in out["reason"]
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "pub.pem")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 1 and r.stdout.startswith("UNSIGNED: ") and "20 rows" in r.stdout
    rc, out = verify_with_key(target, keys, "--checkpoints", str(published))
    assert rc == 1 and out["first_bad_seq"] == 1 and not out["unsigned"]


def make_note(origin, size, root, key, name=None):
    from riskpipe.ledger import note

    return note.sign(note.checkpoint_text(origin, size, root), name or origin, key)


def test_forged_or_foreign_checkpoints_fail(tmp_path, keys):
    target = str(tmp_path / "l.db")
    cp1, _ = build(target, keys)
    f = tmp_path / "forged.txt"
    f.write_text(cp1.note.replace("\n10\n", "\n9\n"))  # a smaller tree under the old signature
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 1 and "signature does not verify" in out["reason"]
    other = load_private_key(keys / "other.pem")
    f.write_text(make_note(cp1.origin, 10, b"\x07" * 32, other))  # re-signed with another key
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 1 and "with no given public key" in out["reason"]
    # the names on lines of unknown keys are shown escaped, five at most: a bidi override in
    # one reversed the line it was printed in
    lines = "".join(make_note(cp1.origin, 10, b"\x07" * 32, other, name=f"evil\u202e{i}").split("\n\n")[1]
                    for i in range(7))
    f.write_text(make_note(cp1.origin, 10, b"\x07" * 32, other).rstrip("\n") + "\n" + lines)
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 1 and "'evil\\u202e0'" in out["reason"] and "\u202e" not in out["reason"], out["reason"]
    assert "and 3 more with no given public key" in out["reason"]
    f.write_text(make_note(cp1.origin, 10, b"\x07" * 32, load_private_key(keys / "key.pem")))  # the key, another root
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 1 and "different roots (a fork)" in out["reason"]
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "other.pub.pem")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1 and "with no given public key" in r.stdout
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "other.pub.pem"), "--public-key",
                        str(keys / "pub.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout  # a rotated key: both public keys given


def test_a_signed_size_zero_with_another_root_is_refused(tmp_path, keys):
    """The empty tree has one root (SHA-256 of nothing), and every tree extends it, so no
    proof is asked of it: a checkpoint of size 0 signed with another root was 'consistent'
    with any later one and counted among the verified checkpoints, though no tree has it.
    ``ledger verify`` fails it without saying any row was checked; ``consistency`` refuses it."""
    target = str(tmp_path / "l.db")
    cp1, _ = build(target, keys)
    zero = tmp_path / "zero.txt"
    zero.write_text(make_note(cp1.origin, 0, bytes(32), load_private_key(keys / "key.pem")))
    r = subprocess.run([*CLI, "verify", target, "--public-key", str(keys / "pub.pem"), "--checkpoints", str(zero)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "tree size 0 with root 00000000" in r.stdout
    assert "first bad row None" not in r.stdout and "check out before it" not in r.stdout
    assert "the rows were not checked" in r.stdout
    old = tmp_path / "old.txt"
    old.write_text(cp1.note)
    r = subprocess.run([*CLI, "consistency", str(zero), str(old), "--ledger", target, "--public-key",
                        str(keys / "pub.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "the empty tree's root is e3b0c442" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty.txt"  # the true empty tree stays consistent with every later checkpoint
    empty.write_text(make_note(cp1.origin, 0, hashlib.sha256(b"").digest(), load_private_key(keys / "key.pem")))
    r = subprocess.run([*CLI, "consistency", str(empty), str(old), "--ledger", target, "--public-key",
                        str(keys / "pub.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("consistent: tree size 0 -> 10")


def test_checkpoint_command_and_bad_keys(tmp_path, keys):
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(3)])
        _size, root = led.tree_head()
    r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem"), "--json"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cp = json.loads(r.stdout)
    assert cp["tree_size"] == 3 and cp["root"] == root and cp["note"].startswith(cp["origin"] + "\n3\n")
    cfg = tmp_path / "riskpipe.yaml"
    cfg.write_text("ledger_origin: example.com/decisions\n")
    r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem"), "--config", str(cfg),
                        "--out", str(tmp_path / "cp.txt")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout == (tmp_path / "cp.txt").read_text() and r.stdout.startswith("example.com/decisions\n3\n")
    assert "\n\n\u2014 example.com/decisions " in r.stdout
    for bad, message in [(keys / "pub.pem", "not an unencrypted PEM private key"),
                         (tmp_path / "nope.pem", "cannot read")]:
        r = subprocess.run([*CLI, "checkpoint", target, "--key", str(bad)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    for flag, what in [("--origin", "origin"), ("--key-name", "key name")]:  # given empty: refused, not defaulted
        r = subprocess.run([*CLI, "checkpoint", target, "--key", str(keys / "key.pem"), flag, ""], capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 2 and f"{what}: must be non-empty" in r.stderr and r.stdout == ""
    with pytest.raises(LedgerError, match=r"not an Ed25519 public key|not a PEM public key"):
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
        got = [m.value.decode("utf-8") for m in consumer]
        consumer.close()
    assert got == [json.loads(r.stdout)["note"]]
    published = tmp_path / "published.txt"
    published.write_text(got[0])
    rc, out = verify_with_key(target, keys, "--checkpoints", str(published))
    assert rc == 0 and out["ok"]


@pytest.mark.broker
def test_a_stage_that_creates_its_topics_creates_the_checkpoints_topic(tmp_path, keys):
    """``create_topics: true`` made the input and output topics but not the one the stage
    publishes its checkpoints to: that was left to the broker's auto-creation (refused
    where it is off: every checkpoint then stored but not published; Tansu makes it with 4
    partitions, where the notes lose their order). It is made with the others, one
    partition, and the stage's notes are read back from it in order."""
    import numpy as np
    from kafka import KafkaConsumer, TopicPartition

    from riskpipe import kafka_clients
    from riskpipe.app.config import load_config
    from riskpipe.kafka_clients import KafkaSettings
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import StageThread, produce, tabular_event, wait_for
    from usermodels import cheap_pipeline, tabular_model

    um = tabular_model(tmp_path)
    pipeline = cheap_pipeline(tmp_path, "wine", um)
    X = np.load(um.data)["X"]
    ledger = str(tmp_path / "l.db")
    with EmbeddedBroker() as b, open_ledger(ledger) as led:  # no topic made beforehand
        cfg = load_config(None, bootstrap_servers=b.bootstrap, ledger=ledger, session_timeout_ms=2000,
                          heartbeat_interval_ms=600, models={"wine": um.spec}, references={"wine": str(um.data)},
                          batch={"max_events": 4, "max_wait_ms": 20}, create_topics=True,
                          topics={"input": "cp-in"}, checkpoint={"key_file": str(keys / "key.pem"),
                                                                 "every_records": 4, "topic": "cp-notes"})
        assert cfg.topics_to_create() == ("cp-in", "decisions", "review", "audit", "dlq", "cp-notes")
        assert "cp-notes" not in cfg.topics_to_create(f"jsonl:{tmp_path / 'out'}")  # nothing published there
        with StageThread(cfg, pipeline, led) as stage:
            watcher = KafkaConsumer(bootstrap_servers=b.bootstrap)
            assert wait_for(lambda: "cp-in" in watcher.topics(), 30)  # made by the stage, not by the producer
            watcher.close()
            produce(b.bootstrap, [tabular_event(f"t-{i}", x) for i, x in enumerate(X[:10])], topic="cp-in")
            assert wait_for(lambda: stage.stats.decided >= 10, 60)
        consumer = kafka_clients.consumer(KafkaSettings(bootstrap_servers=b.bootstrap), enable_auto_commit=False,
                                          consumer_timeout_ms=5000)
        assert consumer.partitions_for_topic("cp-notes") == {0}
        consumer.assign([TopicPartition("cp-notes", 0)])
        consumer.seek_to_beginning()
        got = [m.value.decode("utf-8") for m in consumer]
        consumer.close()
        stored = led.notes()
    assert len(stored) >= 2 and got == stored


def test_checkpointer_signs_every_n_records_or_seconds(tmp_path, keys):
    from riskpipe.ledger.checkpoint import Checkpointer

    now = [0.0]
    cpr = Checkpointer(load_private_key(keys / "key.pem"), every_records=10, every_seconds=30, clock=lambda: now[0])
    with open_ledger(str(tmp_path / "l.db")) as led:
        def commit(records):  # what the stage's after-commit hook does after each batch
            led.append_many(records)
            cpr(led, len(records))

        def sizes():
            return [Checkpoint.from_note(n).tree_size for n in led.notes()]

        commit([decision_record(i) for i in range(6)])
        assert sizes() == []
        commit([decision_record(i) for i in range(6, 12)])  # 12 records >= 10: due
        assert sizes() == [12]
        now[0] = 31.0
        commit([])  # 31 s but nothing committed since: nothing to sign
        assert len(sizes()) == 1
        commit([decision_record(50)])  # 31 s and one new record: due
        assert sizes() == [12, 13]
        assert verify_ledger(led, [load_public_key(keys / "pub.pem")]).ok


def test_the_checkpointer_counts_from_the_rows_the_ledger_has_unsigned(target, keys):
    """A new Checkpointer (a restarted stage) on a ledger with rows past the largest tree
    its key signed signs them at its first call, even an idle one (``n = 0``) long before
    ``every_records`` or ``every_seconds``; the rows of the batch it is told of at its
    first call are counted once, and a tree another key signed vouches for nothing here."""
    from riskpipe.ledger.checkpoint import Checkpointer

    key, other = load_private_key(keys / "key.pem"), load_private_key(keys / "other.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(6)])
        make_checkpoint(led, key)
        led.append_many([decision_record(i) for i in range(6, 9)])  # then killed: 3 rows unsigned
        make_checkpoint(led, other)
        cpr = Checkpointer(key, every_records=1000, every_seconds=3600, clock=lambda: 0.0)
        assert cpr(led, 0).tree_size == 9
        assert cpr.rows_since == 0 and cpr.final(led) is None
        led.append_many([decision_record(i) for i in range(9, 13)])
        fresh = Checkpointer(key, every_records=5, every_seconds=3600, clock=lambda: 0.0)
        assert fresh(led, 4) is None and fresh.rows_since == 4  # its own batch: counted, not yet due
        assert fresh(led, 0) is None
        assert fresh.final(led).tree_size == 13


def test_a_restarted_stage_signs_what_a_killed_run_left_unsigned_with_its_first_batch(tmp_path, keys, monkeypatch):
    """A run killed (kill -9) between checkpoints leaves its last rows unsigned; the next
    run counted from 0, so they stayed unsigned until its own ``every_records`` or
    ``every_seconds`` came due (never, had it stopped before writing a row) and whoever
    could write the database could rewrite them unseen by ``verify --public-key``. It now
    starts from the ledger's unsigned tail and signs it after its first batch."""
    import numpy as np

    from riskpipe.app import compose
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from streamkit import tabular_event
    from usermodels import cheap_pipeline, tabular_model

    um = tabular_model(tmp_path)
    pipeline = cheap_pipeline(tmp_path, "wine", um)
    X = np.load(um.data)["X"]
    ledger = str(tmp_path / "l.db")

    def config(every_records):
        return load_config(None, ledger=ledger, models={"wine": um.spec}, references={"wine": str(um.data)},
                           batch={"max_events": 4}, checkpoint={"key_file": str(keys / "key.pem"), "topic": None,
                                                                "every_records": every_records, "every_seconds": 3600})

    def sizes(led):
        return [Checkpoint.from_note(n).tree_size for n in led.notes()]

    with open_ledger(ledger) as led:
        with monkeypatch.context() as m:  # the first run is killed before its clean stop signs the rest
            m.setattr(compose.CheckpointHook, "finish", lambda self: None)
            run_offline([tabular_event(f"a-{i}", x) for i, x in enumerate(X[:10])], tmp_path / "out", config(4),
                        pipeline=pipeline, ledger=led)
        assert led.tree_head()[0] == 11 and sizes(led) == [5, 9]  # a policy row, 10 decisions: 2 unsigned
        run_offline([tabular_event(f"b-{i}", x) for i, x in enumerate(X[10:18])], tmp_path / "out", config(1000),
                    pipeline=pipeline, ledger=led)
        # after its first batch (11 + 4), not only when it stops (19): every_records 1000 never came due
        assert led.tree_head()[0] == 19 and sizes(led) == [5, 9, 15, 19]
    rc, out = verify_with_key(ledger, keys)
    assert rc == 0 and out["ok"] and out["checkpoint"]["tree_size"] == 19


def test_stage_config_checkpoint_section(tmp_path, keys):
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.ledger.checkpoint import checkpointer_for

    f = tmp_path / "c.yaml"
    f.write_text(f"checkpoint: {{key_file: {keys / 'key.pem'}, every_records: 5}}\n")
    cfg = load_config(str(f))
    assert cfg.checkpoint.every_records == 5 and cfg.checkpoint.topic == "checkpoints"
    assert checkpointer_for(cfg.checkpoint).every_records == 5
    f.write_text(f"checkpoint: {{key_file: {tmp_path / 'missing.pem'}}}\n")
    with pytest.raises(LedgerError, match=r"checkpoint.key_file .*missing.pem: cannot read"):
        checkpointer_for(load_config(str(f)).checkpoint)
    f.write_text("checkpoint: {every_records: 5}\n")
    with pytest.raises(ConfigError, match=r"checkpoint.key_file: Field required"):
        load_config(str(f))


def test_a_relative_key_file_is_read_next_to_the_config(tmp_path, keys, monkeypatch):
    """README: every path in a config is read relative to its directory. `checkpoint.key_file`
    was read relative to the working directory: a stage config with its key beside it, run
    from anywhere else, stopped with `checkpoint.key_file key.pem: cannot read`."""
    from riskpipe.app.config import load_config
    from riskpipe.ledger.checkpoint import checkpointer_for

    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "key.pem").write_bytes((keys / "key.pem").read_bytes())
    (stage / "riskpipe.yaml").write_text("checkpoint: {key_file: key.pem, every_records: 5}\n"
                                         "ssl_cafile: ca.pem\n")
    (stage / "ca.pem").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = load_config("stage/riskpipe.yaml")
    assert cfg.checkpoint.key_file == str(stage / "key.pem") and cfg.ssl_cafile == str(stage / "ca.pem")
    assert checkpointer_for(cfg.checkpoint).every_records == 5


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
        counts = [Checkpoint.from_note(n).tree_size for n in led.notes()]
        assert led.count("decision") == 40
    # every 16 records (after 16, 32), and the last rows when the stage stops (before: left unsigned)
    assert len(counts) == 3 and counts == sorted(counts) and counts[-1] == 41
    rc, out = verify_with_key(ledger, keys)
    assert rc == 0 and out["ok"]
    cfg.write_text(f"checkpoint: {{key_file: {tmp_path / 'nope.pem'}}}\n")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--source",
                        f"jsonl:{events}", "--sink", f"jsonl:{tmp_path / 'out'}", "--ledger", ledger],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "checkpoint.key_file" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.broker
def test_a_stage_that_goes_quiet_signs_its_last_rows_by_time_and_when_it_stops(tmp_path, keys):
    """``every_seconds`` holds while no event arrives, and a clean stop signs the rest:
    before, a burst below ``every_records`` stayed unsigned until the next commit (for ever
    when none came), so whoever could write the database could rewrite the newest
    decisions and ``verify --public-key`` said ok."""
    import numpy as np

    from riskpipe.app.config import load_config
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import StageThread, produce, tabular_event, wait_for
    from usermodels import cheap_pipeline, tabular_model

    um = tabular_model(tmp_path)
    pipeline = cheap_pipeline(tmp_path, "wine", um)
    X = np.load(um.data)["X"]
    ledger = str(tmp_path / "l.db")
    with EmbeddedBroker() as b, open_ledger(ledger) as led:
        b.create_topics()
        cfg = load_config(None, bootstrap_servers=b.bootstrap, ledger=ledger, session_timeout_ms=2000,
                          heartbeat_interval_ms=600, models={"wine": um.spec}, references={"wine": str(um.data)},
                          batch={"max_events": 4, "max_wait_ms": 20},
                          checkpoint={"key_file": str(keys / "key.pem"), "every_records": 1000, "every_seconds": 1,
                                      "topic": None})
        with StageThread(cfg, pipeline, led) as stage:
            produce(b.bootstrap, [tabular_event(f"q-{i}", x) for i, x in enumerate(X[:6])])
            assert wait_for(lambda: stage.stats.decided >= 6, 60)
            # nothing more arrives: the time-based checkpoint comes all the same
            assert wait_for(lambda: [Checkpoint.from_note(n).tree_size for n in led.notes()][-1:] == [7], 20)
            produce(b.bootstrap, [tabular_event("q-last", X[6])])
            assert wait_for(lambda: stage.stats.decided >= 7, 60)
        # stopped within the second: the last row is signed on the way out
        assert [Checkpoint.from_note(n).tree_size for n in led.notes()][-1] == 8
    rc, out = verify_with_key(ledger, keys)
    assert rc == 0 and out["ok"]


def test_consistency_between_checkpoints(tmp_path, keys):
    target = str(tmp_path / "l.db")
    cp1, cp2 = build(target, keys)
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    old.write_text(cp1.note)
    new.write_text(cp2.note)

    def consistency(a, b, *extra):
        r = subprocess.run([*CLI, "consistency", str(a), str(b), "--ledger", target, "--json", *extra],
                           capture_output=True, text=True, timeout=60)
        return r.returncode, (json.loads(r.stdout) if r.stdout.strip() else r.stderr)

    rc, out = consistency(old, new, "--public-key", str(keys / "pub.pem"))
    assert rc == 0 and out["ok"] and out["signatures_checked"] and (out["old_size"], out["new_size"]) == (10, 20)
    assert 1 <= len(out["proof"]) <= 5
    rc, out = consistency(new, old)  # a checkpoint for a smaller tree cannot extend a larger one
    assert rc == 1 and "smaller" in out["reason"]
    # a fork: another history under the same origin and key (rows 11..20 differ)
    fork = str(tmp_path / "fork.db")
    key = load_private_key(keys / "key.pem")
    with open_ledger(fork) as led:
        led.append_many([decision_record(i) for i in range(10)])
        led.append_many([decision_record(i) for i in range(100, 110)])
        forked = make_note(cp1.origin, 20, bytes.fromhex(led.tree_head()[1]), key)
    (tmp_path / "forked.txt").write_text(forked)
    rc, out = consistency(old, tmp_path / "forked.txt", "--public-key", str(keys / "pub.pem"))
    assert rc == 1 and not out["ok"] and "does not lead to the root of tree size 20" in out["reason"]
    # a checkpoint re-signed with another key is refused before any proof is asked for
    (tmp_path / "other.txt").write_text(make_note(cp1.origin, 20, cp2.root, load_private_key(keys / "other.pem")))
    rc, err = consistency(old, tmp_path / "other.txt", "--public-key", str(keys / "pub.pem"))
    assert rc == 2 and "with no given public key" in err and "Traceback" not in err


def test_an_unreadable_checkpoints_file_is_one_error_naming_the_line(tmp_path):
    """Legacy checkpoints are JSON lines: a line nested too deeply for the standard library
    (a RecursionError, before) is invalid JSON like any other."""
    f = tmp_path / "checkpoints.jsonl"
    for line, says in (("{not json", "invalid JSON"), ('{"a":' * 50_000, "invalid JSON (nested too deeply)")):
        f.write_text(line + "\n")
        with pytest.raises(LedgerError, match=rf"--checkpoints {re.escape(str(f))}:1: {re.escape(says)}"):
            read_checkpoint_file(f)


def test_a_checkpoints_file_with_no_checkpoint_is_refused(tmp_path):
    """``verify --checkpoints FILE`` compares the ledger with the published copies; an empty
    file (an export that wrote nothing) compared nothing and said nothing, so the run
    read as if the published copies had been checked."""
    f = tmp_path / "checkpoints.txt"
    for text in ("", "\n\n", "  \n"):
        f.write_text(text)
        with pytest.raises(LedgerError, match=rf"--checkpoints {re.escape(str(f))}: holds no checkpoint"):
            read_checkpoint_file(f)


def _legacy(key, count, head, ts="2024-05-01T00:00:00.000000Z"):
    """A checkpoint as riskpipe signed them before the Merkle tree (JSON over count and head)."""
    import base64

    from riskpipe.ledger.anchors import LegacyCheckpoint, signed_bytes
    from riskpipe.ledger.checkpoint import legacy_key_id
    from riskpipe.ledger.note import raw_public_key

    pub = key.public_key()
    return LegacyCheckpoint(count, head, ts, legacy_key_id(pub), base64.b64encode(raw_public_key(pub)).decode(),
                            base64.b64encode(key.sign(signed_bytes(count, head, ts))).decode())


def test_a_legacy_checkpoint_under_a_small_order_key_proves_nothing(tmp_path):
    """Under the identity point as public key, the signature (R = identity, S = 0) verifies
    every text. The CLI's key reader refuses such a key, but verify_ledger took one from an
    API caller and counted a legacy checkpoint "signed" by it: a rewritten ledger was ok."""
    import base64

    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from riskpipe.ledger.anchors import LegacyCheckpoint
    from riskpipe.ledger.checkpoint import legacy_key_id
    from riskpipe.ledger.note import raw_public_key

    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(4)])
        head = led.head()
    identity = (1).to_bytes(32, "little")
    weak = Ed25519PublicKey.from_public_bytes(identity)
    forged = LegacyCheckpoint(4, head, "2024-05-01T00:00:00.000000Z", legacy_key_id(weak),
                              base64.b64encode(raw_public_key(weak)).decode(),
                              base64.b64encode(identity + bytes(32)).decode())
    with open_ledger(target) as led:
        res = verify_ledger(led, [weak], [forged])
    assert not res.ok and "proves nothing" in res.reason, res


def test_two_signed_legacy_heads_for_one_row_are_a_fork(tmp_path, keys):
    """The key signed head A for row 6, and later head B for row 6 (the log was rolled back
    and rewritten, and the legacy signer signed the new history too): both copies are on the
    checkpoints topic. The chain was checked against one of them (the last read) and the
    other was dropped unseen, counted among the verified: "ok". Like two C2SP checkpoints of
    one tree size with different roots it is a fork, and a signed head for row 0 other than
    the empty chain's is a signed false statement, as a size-0 root other than the empty
    tree's is."""
    from riskpipe.ledger import GENESIS

    target = str(tmp_path / "l.db")
    key = load_private_key(keys / "key.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(6)])
        head = led.head()
    pubs = [load_public_key(keys / "pub.pem")]
    with open_ledger(target) as led:
        assert verify_ledger(led, pubs, [_legacy(key, 6, head)]).ok
        for other, says in (((_legacy(key, 6, "ab" * 32)), "row 6"), (_legacy(key, 0, "ab" * 32), "row 0")):
            for both in ([other, _legacy(key, 6, head)], [_legacy(key, 6, head), other]):
                res = verify_ledger(led, pubs, both)
                assert not res.ok and res.first_bad_seq is None, (says, res)
                assert f"two signed checkpoints for {says} with different heads (a fork)" in res.reason
                if says == "row 0":
                    assert f"the empty chain's head is {GENESIS[:12]}" in res.reason


def test_verify_names_the_key_that_verified_not_the_name_on_the_signature_line(tmp_path, keys):
    """A signature line's key name is not signed: the key id is SHA-256(name, 0x0A, 0x01,
    public key)[:4], which anyone can recompute for another name over the same signature.
    `verify` reported that name as the checkpoint's key ("key auditor.example/witness" for a
    note the ledger's own key signed, relabelled in the database or on the topic). It names
    the given public key that verified the note (the first 16 hex digits of the SHA-256 of
    its raw 32 bytes, as for a legacy checkpoint) instead."""
    import base64

    from riskpipe.ledger import note
    from riskpipe.ledger.checkpoint import legacy_key_id

    target = str(tmp_path / "l.db")
    key, pub = load_private_key(keys / "key.pem"), load_public_key(keys / "pub.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(4)])
        cp = make_checkpoint(led, key)
        led.append_many([decision_record(i) for i in range(4, 9)])
        size, root = led.tree_head()
    signed = make_note(cp.origin, size, bytes.fromhex(root), key)
    body, sig_line = signed.split("\n\n")
    blob = base64.b64decode(sig_line.split(" ")[2])
    name = "auditor.example/witness"
    relabelled = f"{body}\n\n\u2014 {name} {base64.b64encode(note.key_id(name, pub) + blob[4:]).decode()}\n"
    f = tmp_path / "published.txt"
    f.write_text(relabelled)
    rc, out = verify_with_key(target, keys, "--checkpoints", str(f))
    assert rc == 0 and out["checkpoint"]["tree_size"] == 9, out
    assert out["checkpoint"]["key"] == legacy_key_id(pub) and name not in json.dumps(out), out
