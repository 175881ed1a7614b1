"""The evidence bundle: `riskpipe report --bundle` on a ledger built through the stage and
the review console, and `riskpipe verify-bundle` offline with the public key only; any
changed, added or removed file, or a wrong key, fails it."""

from __future__ import annotations

import json
import shutil
import zipfile

import pytest
import yaml
from click.testing import CliRunner
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from pdfkit import check_pdf
from riskpipe.cli import cli
from riskpipe.ledger import Ledger
from riskpipe.report import pdf_available
from test_report_statistics import stage_ledger  # noqa: F401 - the shared module fixture


def _keys(tmp, name: str):
    key = Ed25519PrivateKey.generate()
    priv, pub = tmp / f"{name}.pem", tmp / f"{name}.pub.pem"
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


@pytest.fixture(scope="module")
def bundle(stage_ledger, tmp_path_factory):  # noqa: F811
    path, records, _, _ = stage_ledger
    tmp = tmp_path_factory.mktemp("bundle")
    ledger = tmp / "ledger.db"
    shutil.copy(path, ledger)
    priv, pub = _keys(tmp, "ledger")
    stats = path.parent  # the stage's model and policy files (test_report_statistics.stage_ledger)
    config = tmp / "riskpipe.yaml"
    config.write_text(yaml.safe_dump({"models": {
        "wine": {"spec": str(stats / "wine.skops"), "reference": str(stats / "wine-test.npz"),
                 "policy": str(stats / "p1" / "default-variant.yaml")},
        "faulty": {"spec": f"{stats / 'faulty-nan.pt'}?shape=4", "policy": str(stats / "p2" / "default-variant.yaml")},
    }}))
    out = tmp / "evidence.zip"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--bundle", str(out), "--key", str(priv),
                                 "--sample", "5", "--seed", "3", "--config", str(config)])
    assert r.exit_code == 0, r.output
    return tmp, out, pub, records, ledger, config


def _verify(zip_path, pub):
    return CliRunner().invoke(cli, ["verify-bundle", str(zip_path), "--public-key", str(pub)])


def test_bundle_contents_and_offline_verification(bundle):
    tmp, out, pub, records, ledger, config = bundle
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        manifest = json.loads(z.read("MANIFEST.json"))
        models = json.loads(z.read("models.json"))
        policies = json.loads(z.read("policies.json"))
        receipts = [json.loads(z.read(n)) for n in sorted(names) if n.startswith("receipts/")]
        verify_txt = z.read("verify.txt").decode()
        html = z.read("report.html").decode()
        pdf = z.read("report.pdf") if "report.pdf" in names else None
    assert ("report.pdf" in names) == pdf_available()  # where WeasyPrint works (test_report_pdf says so)
    if pdf is not None:  # the stage's ledger of two non-demo models, every column on the page
        text = " ".join(check_pdf(pdf).split())
        assert "wine" in text and "faulty" in text and "Ledger integrity: intact" in text
    assert {"report.html", "report.json", "checkpoint.txt", "verify.txt", "models.json", "policies.json",
            "MANIFEST.json", "MANIFEST.sig"} <= names
    assert set(manifest["files"]) == names - {"MANIFEST.json", "MANIFEST.sig"}
    assert {m["name"] for m in models} == {"wine", "faulty"}
    assert {m["sha256"] for m in models} == {r["model"]["sha256"] for r in records}
    decided_under = {r["policy"]["sha256"] for r in records}
    assert {p["sha256"] for p in policies} == decided_under and all("canonical_json" in p for p in policies)
    assert len(receipts) == 5 == manifest["receipts"]["written"] and all(x["record"]["id"] for x in receipts)
    assert '"ok": true' in verify_txt and '<section id="certificates">' in html
    # the same seed draws the same sample
    again = tmp / "again.zip"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--bundle", str(again), "--key",
                                 str(tmp / "ledger.pem"), "--sample", "5", "--seed", "3", "--config", str(config)])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(again) as z:
        assert sorted(n for n in z.namelist() if n.startswith("receipts/")) == \
            sorted(n for n in names if n.startswith("receipts/"))
    r = _verify(out, pub)
    assert r.exit_code == 0, r.output
    assert "INVALID" not in r.output and "5 decision receipts verified" in r.output
    assert "2 policies hash to the sha256" in r.output


def test_bundle_finds_the_policy_files_through_the_ledger_without_the_config(bundle, stage_ledger):  # noqa: F811
    """The stage names each policy's file in its ledger ``policy`` row, so a bundle written
    without --config still carries every policy's YAML and canonical JSON."""
    tmp, _, pub, records, ledger, _ = bundle
    stats = stage_ledger[0].parent
    files = {"wine": stats / "p1" / "default-variant.yaml", "faulty": stats / "p2" / "default-variant.yaml"}
    with Ledger(str(ledger)) as led:
        sources = {e.record["sha256"]: e.record["source"] for e in led.records("policy")}
    shas = {r["model"]["name"]: r["policy"]["sha256"] for r in records}
    assert sources == {shas[m]: str(files[m]) for m in files}
    out = tmp / "no-config.zip"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--bundle", str(out), "--key",
                                 str(tmp / "ledger.pem"), "--sample", "2"])
    assert r.exit_code == 0, r.output
    with zipfile.ZipFile(out) as z:
        policies = {p["sha256"]: p for p in json.loads(z.read("policies.json"))}
        assert set(policies) == set(sources)
        for m, path in files.items():
            p = policies[shas[m]]
            assert "missing" not in p and z.read(p["source"]) == path.read_bytes()
    r = _verify(out, pub)
    assert r.exit_code == 0 and "2 policies hash to the sha256" in r.output, r.output


def _rewrite(src, dst, change):
    with zipfile.ZipFile(src) as z:
        files = {n: z.read(n) for n in z.namelist()}
    change(files)
    with zipfile.ZipFile(dst, "w") as z:
        for n, b in files.items():
            z.writestr(n, b)


def _flip_last_byte(name):
    def change(files):
        b = bytearray(files[name])
        b[-2] ^= 0x01
        files[name] = bytes(b)
    return change


def test_every_changed_file_fails_verification(bundle):
    tmp, out, pub, _, _, _ = bundle
    with zipfile.ZipFile(out) as z:
        names = z.namelist()
    assert len(names) >= 12
    for i, name in enumerate(names):
        bad = tmp / f"bad-{i}.zip"
        _rewrite(out, bad, _flip_last_byte(name))
        r = _verify(bad, pub)
        assert r.exit_code == 1 and "INVALID" in r.output, (name, r.output)


def test_added_removed_file_or_resigned_manifest_or_wrong_key_fail(bundle):
    tmp, out, pub, _, _, _ = bundle
    cases = {
        "added": lambda f: f.__setitem__("extra.txt", b"x"),
        "removed": lambda f: f.pop(sorted(n for n in f if n.startswith("receipts/"))[0]),
        "manifest updated to match an edited report": _edit_report_and_manifest,
    }
    for what, change in cases.items():
        bad = tmp / "case.zip"
        _rewrite(out, bad, change)
        r = _verify(bad, pub)
        assert r.exit_code == 1 and "INVALID" in r.output, (what, r.output)
    _, other = _keys(tmp, "other")
    r = _verify(out, other)
    assert r.exit_code == 1 and "MANIFEST.sig" in r.output


def test_a_zip_bomb_is_refused_before_any_file_is_read(bundle, monkeypatch):
    """verify_bundle reads every file into memory: an archive declaring more than a bundle's
    limit (a few kilobytes of zip that inflate to gigabytes) is INVALID before any is read.
    The limit is lowered here so the bomb stays small; the real bundle is far below it."""
    from riskpipe.report import bundle as bundle_mod

    tmp, out, pub, _, _, _ = bundle
    bomb = tmp / "bomb.zip"
    shutil.copy(out, bomb)
    with zipfile.ZipFile(bomb, "a", compression=zipfile.ZIP_DEFLATED) as z, z.open("zeros.bin", "w") as f:
        for _ in range(8):
            f.write(bytes(1 << 20))
    assert bomb.stat().st_size < out.stat().st_size + 64 * 1024
    monkeypatch.setattr(bundle_mod, "MAX_BUNDLE_BYTES", 8 << 20)
    read = []
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: read.append(name))
    r = _verify(bomb, pub)
    assert r.exit_code == 1 and "over a bundle's limit of 8388608" in r.output and read == [], r.output


def _edit_report_and_manifest(files):
    import hashlib

    files["report.html"] = files["report.html"].replace(b"Bound on false certificates", b"Bound on nothing")
    m = json.loads(files["MANIFEST.json"])
    m["files"]["report.html"] = hashlib.sha256(files["report.html"]).hexdigest()
    files["MANIFEST.json"] = (json.dumps(m, sort_keys=True, indent=1) + "\n").encode()


def test_bundle_needs_the_key_and_says_so(bundle):
    _, _, _, _, ledger, _ = bundle
    r = CliRunner().invoke(cli, ["report", "--ledger", str(ledger), "--bundle", "x.zip"])
    assert r.exit_code != 0 and "--bundle needs --key" in r.output and "Traceback" not in r.output
    with Ledger(str(ledger)) as led:
        assert led.latest_note() is not None


def test_a_ledger_that_does_not_verify_gets_no_bundle_and_no_signature(bundle):
    """A row edited in place (a block made an allow, hashes left as they were): the bundle
    is refused before anything is signed or written. It used to be written and signed
    with ``verified: false`` inside, and `verify-bundle`, which reads the signatures,
    passed it."""
    import sqlite3

    tmp, _, _, _, ledger, _ = bundle
    bad = tmp / "edited.db"
    shutil.copy(ledger, bad)
    db = sqlite3.connect(bad, isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    seq, rec = db.execute("SELECT seq, record FROM entries WHERE kind = 'decision' AND record LIKE "
                          "'%\"decision\":\"block\"%' ORDER BY seq LIMIT 1").fetchone()
    db.execute("UPDATE entries SET record = ? WHERE seq = ?",
               (rec.replace('"decision":"block"', '"decision":"allow"'), seq))
    notes_before = db.execute("SELECT COUNT(*) FROM signed_notes").fetchone()[0]
    db.close()
    out = tmp / "edited.zip"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(bad), "--bundle", str(out), "--key",
                                 str(tmp / "ledger.pem"), "--sample", "2"])
    assert r.exit_code != 0 and "does not verify" in r.output and f"row {seq}" in r.output, r.output
    assert "no bundle written" in r.output and "Traceback" not in r.output
    assert not out.exists()
    with sqlite3.connect(bad) as db:
        assert db.execute("SELECT COUNT(*) FROM signed_notes").fetchone()[0] == notes_before


def test_a_signed_manifest_saying_the_ledger_failed_is_invalid(bundle):
    """A bundle an older riskpipe wrote over a failed ledger: signed, every file matching,
    but its manifest records ``verified: false``. verify-bundle reads that flag."""
    import hashlib

    from riskpipe.ledger import note as notes
    from riskpipe.ledger.checkpoint import load_private_key
    from riskpipe.report.bundle import SIGNED_PREFIX

    tmp, out, pub, _, _, _ = bundle
    key = load_private_key(str(tmp / "ledger.pem"))

    def failed(files):
        m = json.loads(files["MANIFEST.json"])
        m["verified"] = False
        files["MANIFEST.json"] = (json.dumps(m, sort_keys=True, indent=1) + "\n").encode()
        origin = m["checkpoint"]["origin"]
        files["MANIFEST.sig"] = notes.sign(
            f"{SIGNED_PREFIX}{hashlib.sha256(files['MANIFEST.json']).hexdigest()}\n", origin, key).encode()

    bad = tmp / "failed.zip"
    _rewrite(out, bad, failed)
    r = _verify(bad, pub)
    assert r.exit_code == 1 and "ok: manifest signature verified" in r.output, r.output
    assert "INVALID: MANIFEST.json: records that the ledger did not verify" in r.output


def test_a_receipt_against_another_tree_of_the_bundles_size_is_a_fork(tmp_path):
    """The bundle's receipts are all made against its checkpoint, and verify-bundle says they
    were verified against it. It checked each receipt against the checkpoint the receipt
    carries and only that its tree was no larger: a receipt from another tree of the same
    size under the same key and origin (a fork: two roots signed for one tree size) passed,
    and so did one against a smaller tree no proof ties to the bundle's. Each is INVALID
    now; small hand-made bundles, signed as write_bundle signs them."""
    from ledger_records import decision_record
    from riskpipe.ledger import note, open_ledger
    from riskpipe.ledger.checkpoint import load_private_key, make_checkpoint
    from riskpipe.ledger.receipt import make_receipt
    from riskpipe.report.bundle import CHECKPOINT, MANIFEST, SIGNATURE, SIGNED_PREFIX, _dump, _sha256

    priv, pub = _keys(tmp_path, "ledger")
    key = load_private_key(priv)
    receipts = {}
    with open_ledger(str(tmp_path / "a.db")) as led:
        led.append_many([decision_record(i) for i in range(3)])
        small = make_checkpoint(led, key, origin="example.com/log")
        receipts["smaller tree"] = make_receipt(led, 2, small.note)
        led.append_many([decision_record(i) for i in range(3, 6)])
        cp = make_checkpoint(led, key, origin="example.com/log")
        receipts["own"] = make_receipt(led, 2, cp.note)
    with open_ledger(str(tmp_path / "b.db")) as led:  # the fork: six other rows, the same origin and key
        led.append_many([decision_record(i) for i in range(100, 106)])
        fork = make_checkpoint(led, key, origin="example.com/log")
        receipts["same size, another root"] = make_receipt(led, 2, fork.note)
    assert (fork.tree_size, fork.origin) == (cp.tree_size, cp.origin) and fork.root != cp.root

    def verify(receipt):
        files = {CHECKPOINT: cp.note.encode(), "policies.json": b"[]\n", "receipts/row-2.json": _dump(receipt)}
        manifest = _dump({"format": "riskpipe-evidence-bundle/1", "verified": True,
                          "files": {n: _sha256(b) for n, b in sorted(files.items())}})
        files[MANIFEST] = manifest
        files[SIGNATURE] = note.sign(f"{SIGNED_PREFIX}{_sha256(manifest)}\n", cp.origin, key).encode()
        path = tmp_path / "b.zip"
        with zipfile.ZipFile(path, "w") as z:
            for name, body in files.items():
                z.writestr(name, body)
        return _verify(path, pub)

    r = verify(receipts["own"])
    assert r.exit_code == 0, r.output
    for what in ("same size, another root", "smaller tree"):
        r = verify(receipts[what])
        assert r.exit_code == 1 and "INVALID" in r.output and "receipts/row-2.json" in r.output, (what, r.output)
        assert "not the bundle's checkpoint" in r.output, (what, r.output)
