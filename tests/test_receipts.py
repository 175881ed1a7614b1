"""Receipts: `ledger receipt` writes the six-key object of docs/receipts.md and both
`ledger verify-receipt` and an independent verifier written from that document
(tests/receipt_verifier.py: hashlib, base64, json, cryptography; no riskpipe) accept
it — and reject an edited record, an altered proof or leaf, a checkpoint re-signed with
another key, and a checkpoint for a smaller tree. On SQLite and PostgreSQL."""

from __future__ import annotations

import ast
import base64
import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

import receipt_verifier
from ledger_records import decision_record
from riskpipe.ledger import LedgerError, note, open_ledger
from riskpipe.ledger.checkpoint import load_private_key, make_checkpoint

CLI = [sys.executable, "-m", "riskpipe.cli", "ledger"]


def cli(*args):
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=120)


def test_the_independent_verifier_does_not_import_riskpipe():
    tree = ast.parse(Path(receipt_verifier.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "base64", "binascii", "hashlib", "json", "cryptography"}, imported


def test_receipt_round_trip_and_tampering(target, keys, tmp_path):
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(13)])
        small = make_checkpoint(led, load_private_key(keys / "key.pem"))  # tree size 13
        led.append_many([decision_record(i) for i in range(13, 37)])
        make_checkpoint(led, load_private_key(keys / "key.pem"))  # tree size 37
    pem = (keys / "pub.pem").read_bytes()
    out = tmp_path / "r.json"
    r = cli("receipt", "evt-00020", "--ledger", target, "--out", out)
    assert r.returncode == 0, r.stderr
    receipt = json.loads(out.read_text())
    assert set(receipt) == {"leaf", "record", "index", "tree_size", "inclusion_proof", "checkpoint"}
    assert receipt["index"] == 20 and receipt["tree_size"] == 37 and receipt["record"]["id"] == "evt-00020"
    assert len(receipt["inclusion_proof"]) == 6  # ceil(log2(37))
    leaf = base64.b64decode(receipt["leaf"])
    assert leaf.startswith(b"decision\nevt-00020\n{") and json.loads(leaf.split(b"\n", 2)[2]) == receipt["record"]
    receipt_verifier.verify(receipt, pem)
    r = cli("verify-receipt", out, "--public-key", keys / "pub.pem")
    assert r.returncode == 0 and r.stdout.startswith("ok: decision 'evt-00020', leaf 20 of riskpipe/ledger/"), r.stdout

    def edited(change):
        bad = copy.deepcopy(receipt)
        change(bad)
        return bad

    def flip_proof(b):
        p = b["inclusion_proof"]
        p[2] = ("0" if p[2][0] != "0" else "1") + p[2][1:]

    other = load_private_key(keys / "other.pem")
    body = receipt["checkpoint"].split("\n\n")[0] + "\n"
    cases = {
        "record edited": lambda b: b["record"].update(decision="block"),
        "record and leaf edited": lambda b: (b["record"].update(decision="block"), b.update(leaf=base64.b64encode(
            leaf.replace(b'"decision":"allow"', b'"decision":"block"')).decode())),
        "proof altered": flip_proof,
        "proof shortened": lambda b: b["inclusion_proof"].pop(),
        "index changed": lambda b: b.update(index=21),
        "re-signed with another key": lambda b: b.update(checkpoint=note.sign(body, body.split("\n")[0], other)),
        "checkpoint for a smaller tree": lambda b: b.update(checkpoint=small.note),
        "smaller tree, sizes agreeing": lambda b: b.update(checkpoint=small.note, tree_size=13, index=5),
        "extra key": lambda b: b.update(note="x"),
    }
    for name, change in cases.items():
        bad = edited(change)
        with pytest.raises(receipt_verifier.Invalid):
            receipt_verifier.verify(bad, pem)
        f = tmp_path / "bad.json"
        f.write_text(json.dumps(bad))
        r = cli("verify-receipt", f, "--public-key", keys / "pub.pem", "--json")
        assert r.returncode == 1 and not json.loads(r.stdout)["ok"], (name, r.stdout, r.stderr)


def test_a_receipt_giving_a_name_twice_is_invalid(tmp_path, keys):
    """A forged ``record`` written before the real one: riskpipe's reader keeps the last
    copy (the real one, whose proof holds), a reader keeping the first would show the
    forgery as verified. Such a receipt is INVALID, at the top level or inside the record."""
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(5)])
        make_checkpoint(led, load_private_key(keys / "key.pem"))
    out = tmp_path / "r.json"
    assert cli("receipt", "evt-00002", "--ledger", target, "--out", out).returncode == 0
    text = out.read_text()
    real, pem = json.loads(text), (keys / "pub.pem").read_bytes()
    receipt_verifier.verify(receipt_verifier.read(text), pem)
    forged = json.dumps({**real["record"], "decision": "block"})
    for name, bad in (("record", text.replace('"record":', f'"record": {forged}, "record":', 1)),
                      ("decision", text.replace('"decision": "', '"decision": "block", "decision": "', 1))):
        assert bad != text and json.loads(bad) == real  # what a last-copy reader sees: the real receipt
        receipt_verifier.verify(json.loads(bad), pem)  # steps 1-6 pass on that reading; step 0 refuses the text
        with pytest.raises(receipt_verifier.Invalid, match="given twice"):
            receipt_verifier.read(bad)
        f = tmp_path / f"{name}.json"
        f.write_text(bad)
        r = cli("verify-receipt", f, "--public-key", keys / "pub.pem")
        assert r.returncode == 1 and f"the member name '{name}' appears twice" in r.stdout + r.stderr, r
    assert cli("verify-receipt", out, "--public-key", keys / "pub.pem").returncode == 0


def test_every_leaf_of_a_small_log_gets_a_valid_receipt(tmp_path, keys):
    """Receipts for every index and a checkpoint at every size 1..20 (proof shapes differ)."""
    from riskpipe.ledger.checkpoint import load_public_key
    from riskpipe.ledger.receipt import make_receipt, verify_receipt

    key, pem = load_private_key(keys / "key.pem"), (keys / "pub.pem").read_bytes()
    with open_ledger(str(tmp_path / "l.db")) as led:
        for size in range(1, 21):
            led.append(decision_record(size))
            cp = make_checkpoint(led, key, origin="example.com/decisions")
            for seq in range(1, size + 1):
                rec = make_receipt(led, seq, cp.note)
                receipt_verifier.verify(rec, pem, origin="example.com/decisions")
                verify_receipt(rec, [load_public_key(keys / "pub.pem")], origin="example.com/decisions")
            with pytest.raises(receipt_verifier.Invalid):
                receipt_verifier.verify(rec, pem, origin="example.com/other")


def test_receipt_picks_one_decision_per_event(tmp_path, keys):
    """An event decided by two models (decision identity = event, model, policy): the
    receipt needs --model / --policy-sha256 and then proves that decision."""
    target = str(tmp_path / "l.db")
    a, b = decision_record(7), decision_record(7)
    b["model"] = {"name": "fraud-trees", "spec": "sklearn:fraud.skops", "sha256": "ab" * 32}
    with open_ledger(target) as led:
        led.append(a, entry_id="evt-00007|digits")
        led.append(b, entry_id="evt-00007|fraud-trees")
        led.append(decision_record(8))
    r = cli("receipt", "evt-00007", "--ledger", target, "--key", keys / "key.pem")
    assert r.returncode == 2 and "2 decision entries" in r.stderr and "--model" in r.stderr
    r = cli("receipt", "evt-00007", "--ledger", target, "--model", "fraud-trees", "--key", keys / "key.pem")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["record"]["model"]["name"] == "fraud-trees" and rec["index"] == 1 and rec["tree_size"] == 3
    receipt_verifier.verify(rec, (keys / "pub.pem").read_bytes())
    r = cli("receipt", "evt-00007", "--ledger", target, "--policy-sha256", "00" * 32)
    assert r.returncode == 2 and "no decision" in r.stderr


def test_receipt_finds_every_decision_of_an_event_however_many_ids_share_its_prefix(tmp_path, keys):
    """The look-up was a prefix scan capped at 1,000 rows in chain order: with evt-1000 ..
    evt-1999 between two models' decisions of evt-1, the second was never seen, so the
    receipt did not refuse to guess (it proved the first) and --model found none."""
    target = str(tmp_path / "l.db")

    def decision(eid, model):
        r = decision_record(1)
        r["id"] = eid
        r["model"] = {"name": model, "spec": "demo:digits", "sha256": model[0] * 64}
        return r

    with open_ledger(target) as led:
        led.append(decision("evt-1", "a-model"))
        led.append_many([decision(f"evt-1{i:03d}", "a-model") for i in range(1000)])
        led.append(decision("evt-1", "b-model"))
    r = cli("receipt", "evt-1", "--ledger", target, "--key", keys / "key.pem")
    assert r.returncode == 2 and "2 decision entries" in r.stderr, r.stderr
    r = cli("receipt", "evt-1", "--ledger", target, "--model", "b-model", "--key", keys / "key.pem")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["record"]["model"]["name"] == "b-model" and rec["index"] == 1001
    receipt_verifier.verify(rec, (keys / "pub.pem").read_bytes())


def test_receipt_needs_a_covering_checkpoint(tmp_path, keys):
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(3)])
        make_checkpoint(led, load_private_key(keys / "key.pem"))
        led.append(decision_record(9))
    r = cli("receipt", "evt-00009", "--ledger", target)
    assert r.returncode == 2 and "no signed checkpoint covers row 4" in r.stderr and "Traceback" not in r.stderr
    r = cli("receipt", "evt-00001", "--ledger", target)
    assert r.returncode == 0 and json.loads(r.stdout)["tree_size"] == 3
    r = cli("verify-receipt", tmp_path / "missing.json", "--public-key", keys / "pub.pem")
    assert r.returncode == 2 and "cannot read" in r.stderr
    (tmp_path / "deep.json").write_text("[" * 100_000)  # was a RecursionError traceback
    r = cli("verify-receipt", tmp_path / "deep.json", "--public-key", keys / "pub.pem")
    assert r.returncode == 2 and "not JSON (nested too deeply" in r.stderr and "Traceback" not in r.stderr


def test_a_receipt_proves_its_kind_and_id_and_a_decision_receipt_needs_a_decision_leaf(tmp_path, keys):
    """Anyone who may publish to an ingested topic (review outcomes are stored as
    ``verdict``) can put a decision-shaped record into the log: a copy of a ``block``
    decision saying ``allow``. Its receipt verified as 'ok: leaf 1', kind never checked or
    shown. Now ``verify-receipt`` takes a decision's receipt by default, names the kind
    and entry id it proves, and ``--kind`` asks for another kind (or ``any``)."""
    target = str(tmp_path / "l.db")
    real = decision_record(7, decision="block")
    with open_ledger(target) as led:
        led.append(real)
        led.append({**real, "decision": "allow"}, kind="verdict")
        make_checkpoint(led, load_private_key(keys / "key.pem"))
    out = tmp_path / "v.json"
    assert cli("receipt", "evt-00007", "--kind", "verdict", "--ledger", target, "--out", out).returncode == 0
    r = cli("verify-receipt", out, "--public-key", keys / "pub.pem")
    assert r.returncode == 1 and "INVALID: receipt.leaf: an entry of kind 'verdict', not 'decision'" in r.stdout
    for kind in ("verdict", "any"):
        r = cli("verify-receipt", out, "--public-key", keys / "pub.pem", "--kind", kind, "--json")
        got = json.loads(r.stdout)
        assert r.returncode == 0 and (got["kind"], got["entry_id"]) == ("verdict", "evt-00007"), r.stdout
    assert cli("receipt", "evt-00007", "--ledger", target, "--out", out).returncode == 0
    r = cli("verify-receipt", out, "--public-key", keys / "pub.pem")
    assert r.returncode == 0 and r.stdout.startswith("ok: decision 'evt-00007', leaf 0 of "), r.stdout


def test_a_receipt_names_the_event_its_record_is_of_and_id_requires_it(tmp_path, keys):
    """A writer of the ledger's API filed event evt-00003's decision under entry id
    "evt-00009". Its receipt verified as "ok: decision 'evt-00009'": a relying party asking
    about evt-00009 was shown evt-00003's decision. The ok line now names the record's
    event (and the entry id where it differs), and ``--id`` refuses a receipt of another
    event."""
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append(decision_record(3, decision="allow"), entry_id="evt-00009")
        make_checkpoint(led, load_private_key(keys / "key.pem"))
    out = tmp_path / "r.json"
    assert cli("receipt", "evt-00009", "--ledger", target, "--out", out).returncode == 0
    pub = keys / "pub.pem"
    r = cli("verify-receipt", out, "--public-key", pub)
    assert r.returncode == 0 and r.stdout.startswith("ok: decision 'evt-00003' (entry id 'evt-00009'), leaf 0"), \
        r.stdout
    r = cli("verify-receipt", out, "--public-key", pub, "--id", "evt-00009")
    assert r.returncode == 1 and "INVALID: receipt: proves the decision of event 'evt-00003' (entry id " \
        "'evt-00009'), not of 'evt-00009'" in r.stdout, r.stdout
    r = cli("verify-receipt", out, "--public-key", pub, "--id", "evt-00003", "--json")
    got = json.loads(r.stdout)
    assert r.returncode == 0 and (got["event_id"], got["entry_id"]) == ("evt-00003", "evt-00009"), r.stdout
    # a receipt the stage's own rows give: the entry id is the event id
    with open_ledger(target) as led:
        led.append(decision_record(5))
        make_checkpoint(led, load_private_key(keys / "key.pem"))
    assert cli("receipt", "evt-00005", "--ledger", target, "--out", out).returncode == 0
    r = cli("verify-receipt", out, "--public-key", pub, "--id", "evt-00005")
    assert r.returncode == 0 and r.stdout.startswith("ok: decision 'evt-00005', leaf 1 of "), r.stdout


@pytest.mark.parametrize("origin", ["evil\n", "bad\ud800", "a\u2028b"])
def test_a_name_that_would_break_the_note_is_refused_and_never_a_traceback(tmp_path, keys, origin):
    """``^[^\\s+]+$`` let ``evil\\n`` through (``$`` matches before a final newline): the
    checkpoint was stored with a broken signature line and every later ``verify`` failed
    for good; a lone surrogate in a receipt's origin ended ``verify-receipt`` in a traceback.
    """
    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(3)])
        with pytest.raises(LedgerError, match="origin: must be non-empty UTF-8 text"):
            make_checkpoint(led, load_private_key(keys / "key.pem"), origin=origin)
        assert led.notes() == []
        good = make_checkpoint(led, load_private_key(keys / "key.pem"))
    out = tmp_path / "r.json"
    assert cli("receipt", "evt-00001", "--ledger", target, "--out", out).returncode == 0
    receipt = json.loads(out.read_text())
    receipt["checkpoint"] = receipt["checkpoint"].replace(good.origin, origin.replace("\n", ""), 1)
    out.write_text(json.dumps(receipt))  # \ud800 written as an escape: the JSON is valid
    r = cli("verify-receipt", out, "--public-key", keys / "pub.pem")
    assert r.returncode == 1 and r.stdout.startswith("INVALID: receipt.checkpoint: ") and "Traceback" not in r.stderr


def test_names_c2sp_allows_are_taken(tmp_path, keys):
    """C2SP: a key name is well-formed UTF-8 without Unicode spaces or '+': a zero-width
    joiner, a soft hyphen, a private-use character are names (a check on printability
    refused them, and which code points count as printable depends on Python's version)."""
    with open_ledger(str(tmp_path / "l.db")) as led:
        led.append_many([decision_record(i) for i in range(2)])
        for allowed in ("a\u200db", "soft\u00adhyphen", "private\ue000use"):
            assert make_checkpoint(led, load_private_key(keys / "key.pem"), origin=allowed).origin == allowed


def _respelled(b64: str) -> str:
    """The same bytes in base64 no encoder writes: a nonzero pad bit, or an extra '='."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    if b64.endswith("="):
        body = b64.rstrip("=")
        last = alphabet[alphabet.index(body[-1]) ^ 1]
        out = body[:-1] + last + b64[len(body):]
    else:
        out = b64 + "="
    assert out != b64 and base64.b64decode(out) == base64.b64decode(b64)
    return out


def test_a_receipt_has_one_spelling(tmp_path, keys):
    """Base64 that a decoder takes but no encoder writes (a nonzero pad bit, an extra '=') and
    upper-case hex spell the same bytes otherwise: the leaf, the checkpoint's signature and
    root, the proof's hashes each verified in several texts ("ok" for a receipt no riskpipe
    wrote). Each is INVALID now, in riskpipe and in the independent verifier."""
    target = str(tmp_path / "l.db")
    key = load_private_key(keys / "key.pem")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(7)])
        make_checkpoint(led, key)
    out = tmp_path / "r.json"
    assert cli("receipt", "evt-00003", "--ledger", target, "--out", out).returncode == 0
    real, pem = json.loads(out.read_text()), (keys / "pub.pem").read_bytes()
    body, sig_line = real["checkpoint"].split("\n\n")
    origin, size, root = body.split("\n")[:3]
    blob = sig_line.split(" ")[2].strip()
    cases = {
        "leaf": {**real, "leaf": _respelled(real["leaf"])},
        "signature": {**real, "checkpoint": real["checkpoint"].replace(blob, _respelled(blob))},
        "root": {**real, "checkpoint": note.sign(f"{origin}\n{size}\n{_respelled(root)}\n", origin, key)},
        "proof": {**real, "inclusion_proof": [p.upper() for p in real["inclusion_proof"]]},
    }
    for name, bad in cases.items():
        with pytest.raises(receipt_verifier.Invalid):
            receipt_verifier.verify(bad, pem)
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps(bad))
        r = cli("verify-receipt", f, "--public-key", keys / "pub.pem")
        assert r.returncode == 1 and r.stdout.startswith("INVALID: ") and "Traceback" not in r.stderr, (name, r)
        assert "canonical base64" in r.stdout or "lowercase hex" in r.stdout, (name, r.stdout)
    assert cli("verify-receipt", out, "--public-key", keys / "pub.pem").returncode == 0


def test_what_a_verifier_reads_is_one_small_regular_file_read_as_it_is(tmp_path, keys):
    """verify-receipt's FILE, consistency's OLD and NEW and every --public-key / --key were
    read whole with no limit: a FIFO blocked the command for ever, /dev/zero ran it out of
    memory (a MemoryError traceback). They are read as riskpipe reads configs and policies
    now (riskpipe.paths: a regular file of at most 16 MiB), one line and exit 2 otherwise.
    And a note file was read with newline translation: a copy with CRLF line ends (CR is a
    control character, which a signed note may not hold) verified as the note it was made
    from, where the same note in a receipt or a --checkpoints file is refused."""
    import os

    from click.testing import CliRunner

    from riskpipe.cli import cli as riskpipe_cli
    from riskpipe.ledger.receipt import make_receipt

    target = str(tmp_path / "l.db")
    with open_ledger(target) as led:
        led.append_many([decision_record(i) for i in range(3)])
        old = make_checkpoint(led, load_private_key(keys / "key.pem"))
        led.append_many([decision_record(i) for i in range(3, 6)])
        new = make_checkpoint(led, load_private_key(keys / "key.pem"))
        (tmp_path / "r.json").write_text(json.dumps(make_receipt(led, 2, new.note)))
    old_txt, new_txt, r_json, pub = tmp_path / "old.txt", tmp_path / "new.txt", tmp_path / "r.json", keys / "pub.pem"
    old_txt.write_text(old.note)
    new_txt.write_text(new.note)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    runs = [["verify-receipt", fifo, "--public-key", pub], ["verify-receipt", r_json, "--public-key", fifo],
            ["consistency", fifo, new_txt, "--ledger", target, "--public-key", pub],
            ["checkpoint", target, "--key", fifo]]
    # one interpreter for all (a FIFO blocked the old code for ever: the timeout ends it)
    code = ("import json, sys; from click.testing import CliRunner; from riskpipe.cli import cli\n"
            "for args in json.loads(sys.argv[1]):\n"
            "    r = CliRunner().invoke(cli, ['ledger', *args])\n"
            "    print(json.dumps([r.exit_code, r.stderr, repr(r.exception)]))\n")
    r = subprocess.run([sys.executable, "-c", code, json.dumps([[str(a) for a in run] for run in runs])],
                       capture_output=True, text=True, timeout=60)
    results = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(results) == len(runs), r.stderr
    for run, (rc, err, exc) in zip(runs, results, strict=True):
        assert rc == 2 and "not a regular file" in err and err.count("\n") == 1 and exc == "SystemExit(2)", (run, err)

    def riskpipe(*args):
        return CliRunner().invoke(riskpipe_cli, ["ledger", *map(str, args)])

    assert riskpipe("verify-receipt", r_json, "--public-key", pub).exit_code == 0
    assert riskpipe("consistency", old_txt, new_txt, "--ledger", target, "--public-key", pub).exit_code == 0
    (tmp_path / "old-crlf.txt").write_bytes(old.note.replace("\n", "\r\n").encode())
    r = riskpipe("consistency", tmp_path / "old-crlf.txt", new_txt, "--ledger", target, "--public-key", pub)
    assert r.exit_code == 2 and "OLD" in r.stderr and "note:" in r.stderr and not r.stdout, (r.stdout, r.stderr)


def test_a_public_key_that_every_signature_verifies_under_is_refused(tmp_path, keys):
    """Ed25519 (RFC 8032) takes a public key of small order: under the identity point, the
    signature R = identity, S = 0 verifies for every text. A key file holding such a key (as
    an auditor may be handed with a receipt) made verify-receipt say "ok" for a receipt
    forged from nothing: any record, a one-leaf tree, a note "signed" without any private
    key. Such a key is no key: refused when read (exit 2, naming the file), and by the note
    verifier itself for a key given through the API; so is 32 bytes that are no curve point."""
    import hashlib

    from click.testing import CliRunner
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from riskpipe.cli import cli as riskpipe_cli
    from riskpipe.ledger.receipt import verify_receipt

    identity = (1).to_bytes(32, "little")
    p = 2**255 - 19
    record = {**decision_record(1), "decision": "allow"}
    leaf = f"decision\n{record['id']}\n{json.dumps(record, sort_keys=True, separators=(',', ':'))}".encode()
    root = base64.b64encode(hashlib.sha256(b"\x00" + leaf).digest()).decode()
    body = f"example.com/log\n1\n{root}\n"
    for name, raw in (("identity", identity), ("order 2", (p - 1).to_bytes(32, "little")),
                      ("order 4", bytes(32)), ("not on the curve", (2).to_bytes(32, "little"))):
        weak = Ed25519PublicKey.from_public_bytes(raw)
        sig = base64.b64encode(note.key_id("example.com/log", weak) + identity + bytes(32)).decode()
        forged = {"leaf": base64.b64encode(leaf).decode(), "record": record, "index": 0, "tree_size": 1,
                  "inclusion_proof": [], "checkpoint": f"{body}\n\u2014 example.com/log {sig}\n"}
        pem = tmp_path / "weak.pem"
        pem.write_bytes(weak.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
        (tmp_path / "forged.json").write_text(json.dumps(forged))
        r = CliRunner().invoke(riskpipe_cli, ["ledger", "verify-receipt", str(tmp_path / "forged.json"),
                                              "--public-key", str(pem)])
        assert r.exit_code == 2 and not r.stdout and r.exception.__class__ is SystemExit, (name, r.output)
        assert f"--public-key {pem}: " in r.stderr and "proves nothing" in r.stderr, (name, r.stderr)
        with pytest.raises(LedgerError, match="proves nothing"):
            verify_receipt(forged, [weak])
        with pytest.raises(receipt_verifier.Invalid):  # a point off the curve: no signature verifies
            receipt_verifier.verify(forged, pem.read_bytes())
