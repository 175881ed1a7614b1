"""The evidence bundle: one zip an auditor checks offline with the ledger's public key.

``write_bundle`` puts in it the report (HTML, the JSON figures, and a PDF where WeasyPrint
is installed), the policies in force (each policy's canonical JSON, whose sha256 is the
policy sha256 every decision names, and its YAML source when the file is at hand), the
models' sha256s, the newest signed checkpoint (C2SP), the receipts of a seeded sample of
decisions against it (docs/receipts.md), the transcript of a ledger verification, and
``MANIFEST.json`` (the sha256 of every other file) with ``MANIFEST.sig``: a C2SP signed
note over the manifest's sha256, signed with the checkpoint key.

``verify_bundle`` needs only the zip and the public key: the manifest's signature, every
file against the manifest (a changed, added or missing file fails), the checkpoint's
signature, every receipt against that checkpoint, and every policy file against its
sha256. It never opens the ledger.
"""

from __future__ import annotations

import hashlib
import json
import random
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from riskpipe.ledger import LedgerError, open_ledger, redact
from riskpipe.ledger import note as notes
from riskpipe.ledger.anchors import Checkpoint
from riskpipe.ledger.checkpoint import load_private_key, make_checkpoint, verify_ledger
from riskpipe.ledger.receipt import make_receipt, parse_receipt, verify_receipt
from riskpipe.policy import load_policy
from riskpipe.policy.loader import PolicyError
from riskpipe.report import html_to_pdf, pdf_available, render
from riskpipe.report.data import gather
from riskpipe.timestamps import rfc3339_seconds

BUNDLE_FORMAT = "riskpipe-evidence-bundle/1"
# A bundle holds a report, a sample of receipts and the policies: megabytes. verify_bundle reads
# every file into memory, so an archive declaring more is refused before any is read.
MAX_BUNDLE_BYTES = 1 << 30
MANIFEST, SIGNATURE, CHECKPOINT = "MANIFEST.json", "MANIFEST.sig", "checkpoint.txt"
# the signed note's first line: a bundle signature can never be read as a checkpoint
SIGNED_PREFIX = "riskpipe evidence bundle manifest\n"
_REFUSED = "no bundle written (a bundle attests a ledger that verifies; `riskpipe ledger verify` says more)"


class BundleError(ValueError):
    """The bundle cannot be written, or does not verify (names the file and the check)."""


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _dump(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode("utf-8")


def _policy_files(ledger, config_policies: list[str]) -> tuple[dict[str, bytes], list[dict]]:
    """Files of the policies in the ledger (``policy`` rows) and the config: canonical JSON
    (hashes to the policy sha256) and the YAML source. Policies whose file is not at hand
    (or whose content changed since) are listed as missing, never passed off."""

    wanted: dict[Any, dict[str, Any]] = {}
    for e in ledger.records("policy"):
        r = e.record
        wanted.setdefault(r.get("sha256"), {"name": r.get("name"), "version": r.get("version"),
                                            "sha256": r.get("sha256"), "source": r.get("source")})
    candidates = [*config_policies, *(w["source"] for w in wanted.values() if w.get("source"))]
    files, found = {}, {}
    for path in candidates:
        try:
            pol = load_policy(path)
        except (PolicyError, OSError):
            continue
        if pol.sha256 in found:
            continue
        stem = f"policies/{pol.name}-v{pol.version}-{pol.sha256[:12]}"
        files[f"{stem}.canonical.json"] = pol.canonical_json().encode("utf-8")
        files[f"{stem}.yaml"] = Path(path).read_bytes()
        found[pol.sha256] = {"name": pol.name, "version": str(pol.version), "sha256": pol.sha256,
                             "canonical_json": f"{stem}.canonical.json", "source": f"{stem}.yaml"}
    listed = list(found.values())
    listed += [{**w, "missing": "the policy file was not at hand (pass --config) or has changed since"}
               for s, w in wanted.items() if s not in found]
    return files, listed


def write_bundle(ledger_path: str, out_path: str | Path, *, key_path: str, sample: int = 20, seed: int = 0,
                 since: Any = None, until: Any = None, models: dict | None = None,
                 config_policies: list[str] | None = None) -> dict:
    """Write the bundle; returns its manifest. A checkpoint of the current tree is signed
    with ``key_path`` when the newest stored one does not cover every row.

    A ledger that does not verify gets no bundle: BundleError before the zip is written
    (and, where the chain or tree is broken, before a checkpoint is signed). A bundle is
    evidence that the ledger held, and a signed one that says otherwise inside would pass
    the checks of anyone who reads only the signatures."""

    key = load_private_key(key_path)
    data = gather(str(ledger_path), since=since, until=until)  # verifies the chain and tree
    if not data["integrity"]["ok"]:
        raise BundleError(f"the ledger does not verify: {data['integrity'].get('reason')}; {_REFUSED}")
    files: dict[str, bytes] = {"report.html": render(data, "html", models).encode("utf-8"),
                               "report.json": render(data, "json", models).encode("utf-8")}
    if pdf_available():
        files["report.pdf"] = html_to_pdf(files["report.html"].decode("utf-8"))
    with open_ledger(str(ledger_path), create=False) as led:
        led.integrate()
        size, _ = led.tree_head()
        note = led.latest_note(min_size=size)
        cp = Checkpoint.from_note(note) if note else make_checkpoint(led, key)
        result = verify_ledger(led, [key.public_key()])  # and against every stored checkpoint
        if not result.ok:
            raise BundleError(f"the ledger does not verify: {result.reason}; {_REFUSED}")
        seqs = [e.seq for e in led.records("decision", since, until) if e.seq is not None and e.seq <= cp.tree_size]
        chosen = sorted(random.Random(seed).sample(seqs, min(sample, len(seqs))))
        for seq in chosen:
            files[f"receipts/row-{seq}.json"] = _dump(make_receipt(led, seq, cp.note))
        policy_files, policies = _policy_files(led, list(config_policies or []))
    files.update(policy_files)
    files["policies.json"] = _dump(policies)
    files["models.json"] = _dump([{"name": m["name"], "sha256": m["sha256"], "decisions": m["decisions"]}
                                  for m in data["volumes"]["models"]])
    files[CHECKPOINT] = cp.note.encode("utf-8")
    files["verify.txt"] = (
        f"$ riskpipe ledger verify {redact(str(ledger_path))} --public-key PUB.pem --json\n"
        + json.dumps(result.to_dict(), sort_keys=True) + "\n"
        + ("ok: chain and Merkle tree intact, checkpoints verified\n" if result.ok else f"FAILED: {result.reason}\n")
    ).encode("utf-8")
    manifest = {"format": BUNDLE_FORMAT, "created": rfc3339_seconds(),
                "ledger": redact(str(ledger_path)), "checkpoint": {"origin": cp.origin, "tree_size": cp.tree_size},
                "receipts": {"seed": seed, "requested": sample, "written": len(chosen), "population": len(seqs)},
                "verified": result.ok, "files": {n: _sha256(b) for n, b in sorted(files.items())}}
    manifest_bytes = _dump(manifest)
    try:
        signature = notes.sign(f"{SIGNED_PREFIX}{_sha256(manifest_bytes)}\n", cp.origin, key)
    except notes.NoteError as e:
        raise BundleError(f"bundle: cannot sign the manifest: {e}") from None
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name, body in sorted({**files, MANIFEST: manifest_bytes, SIGNATURE: signature.encode("utf-8")}.items()):
            z.writestr(name, body)
    return manifest


@dataclass
class BundleCheck:
    ok: bool
    checks: list[str] = field(default_factory=list)
    problem: str | None = None


def verify_bundle(path: str | Path, public_keys) -> BundleCheck:
    """Check a bundle offline (module docstring); the first failed check is the problem."""

    res = BundleCheck(True)

    def fail(msg: str) -> BundleCheck:
        res.ok, res.problem = False, msg
        return res

    try:
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist()]
            if len(names) != len(set(names)):
                return fail("the zip holds a file name twice")
            declared = sum(i.file_size for i in z.infolist())  # zipfile reads no member past its declared size
            if declared > MAX_BUNDLE_BYTES:
                return fail(f"the zip's files declare {declared} bytes uncompressed, over a bundle's limit of "
                            f"{MAX_BUNDLE_BYTES} (refused before reading: a zip bomb would fill the memory)")
            files = {n: z.read(n) for n in names}
    except (OSError, zipfile.BadZipFile) as e:
        return fail(f"{path}: not a readable zip ({e})")
    for required in (MANIFEST, SIGNATURE, CHECKPOINT):
        if required not in files:
            return fail(f"{required}: missing")
    try:
        text, _ = notes.verify(files[SIGNATURE].decode("utf-8"), public_keys)
    except (notes.NoteError, UnicodeDecodeError) as e:
        return fail(f"{SIGNATURE}: {e}")
    if text != f"{SIGNED_PREFIX}{_sha256(files[MANIFEST])}\n":
        return fail(f"{MANIFEST}: its sha256 is not the one signed in {SIGNATURE} (manifest changed)")
    res.checks.append("manifest signature verified")
    try:
        manifest = json.loads(files[MANIFEST])
        listed = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        return fail(f"{MANIFEST}: not a bundle manifest")
    if manifest.get("format") != BUNDLE_FORMAT:
        return fail(f"{MANIFEST}: format {manifest.get('format')!r}, expected {BUNDLE_FORMAT!r}")
    if manifest.get("verified") is not True:  # written by a version that bundled a failed ledger
        return fail(f"{MANIFEST}: records that the ledger did not verify when the bundle was written "
                    f"(verified: {manifest.get('verified')!r}; see verify.txt)")
    present = set(files) - {MANIFEST, SIGNATURE}
    if present - set(listed):
        return fail(f"{sorted(present - set(listed))[0]}: not in the manifest (file added)")
    if set(listed) - present:
        return fail(f"{sorted(set(listed) - present)[0]}: in the manifest but not in the bundle (file removed)")
    for name in sorted(listed):
        if _sha256(files[name]) != listed[name]:
            return fail(f"{name}: sha256 differs from the manifest (file changed)")
    res.checks.append(f"{len(listed)} files match the manifest")
    try:
        cp = Checkpoint.from_note(files[CHECKPOINT].decode("utf-8"), public_keys, CHECKPOINT)
    except (LedgerError, UnicodeDecodeError) as e:
        return fail(str(e))
    res.checks.append(f"checkpoint of {cp.origin} at tree size {cp.tree_size} verified")
    receipts = sorted(n for n in listed if n.startswith("receipts/"))
    for name in receipts:
        try:
            got = verify_receipt(parse_receipt(files[name]), public_keys, cp.origin).checkpoint
        except (LedgerError, ValueError) as e:
            return fail(f"{name}: {e}")
        if (got.tree_size, got.root) != (cp.tree_size, cp.root):  # the same size: a fork; smaller: no proof ties it
            return fail(f"{name}: proved against tree size {got.tree_size} with root {got.root.hex()[:16]}…, not the "
                        f"bundle's checkpoint (tree size {cp.tree_size}, root {cp.root.hex()[:16]}…)")
    res.checks.append(f"{len(receipts)} decision receipts verified against the signed checkpoint")
    try:
        policies = json.loads(files["policies.json"])
    except (KeyError, ValueError):
        return fail("policies.json: missing or not JSON")
    for p in policies:
        if "canonical_json" in p and _sha256(files.get(p["canonical_json"], b"")) != p["sha256"]:
            return fail(f"{p['canonical_json']}: does not hash to the policy sha256 {p['sha256']}")
    res.checks.append(f"{sum('canonical_json' in p for p in policies)} policies hash to the sha256 their decisions "
                      f"name ({sum('missing' in p for p in policies)} listed without their file)")
    return res
