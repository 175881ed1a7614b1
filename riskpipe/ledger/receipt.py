"""Receipts: one decision, proved against a signed checkpoint without the rest of the ledger.

A receipt is one JSON object with exactly the keys ``leaf``, ``record``, ``index``,
``tree_size``, ``inclusion_proof`` and ``checkpoint``; docs/receipts.md specifies it
(well enough to write a verifier from the document alone: tests/test_receipts.py holds
one). Verifying costs one signature check and about log2(tree_size) hashes.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from riskpipe import json_text
from riskpipe.ledger import merkle
from riskpipe.ledger.anchors import Checkpoint
from riskpipe.ledger.chain import Entry, LedgerError, canonical_json
from riskpipe.ledger.note import b64decode_canonical
from riskpipe.ledger.tree import split_leaf

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from riskpipe.ledger.store import Ledger

_HEX64 = re.compile(r"[0-9a-f]{64}")
KEYS = ("checkpoint", "inclusion_proof", "index", "leaf", "record", "tree_size")


def make_receipt(ledger: Ledger, seq: int, note: str) -> dict[str, Any]:
    """The receipt of row ``seq`` against the signed checkpoint ``note`` (which must cover it)."""
    cp = Checkpoint.from_note(note)
    index = seq - 1
    if not 0 <= index < cp.tree_size:
        raise LedgerError(f"checkpoint for tree size {cp.tree_size} does not cover row {seq}")
    got = ledger.leaf_at(index)
    if got is None:
        raise LedgerError(f"ledger: row {seq} is missing")
    data, entry = got
    proof = ledger.inclusion_proof(index, cp.tree_size)
    if merkle.root_from_inclusion_proof(index, cp.tree_size, merkle.leaf_hash(data), proof) != cp.root:
        raise LedgerError(f"ledger: row {seq} does not lead to the signed root of tree size {cp.tree_size} "
                          "(ledger tampered: run `riskpipe ledger verify`)")
    return {"leaf": base64.b64encode(data).decode("ascii"), "record": entry.record, "index": index,
            "tree_size": cp.tree_size, "inclusion_proof": [p.hex() for p in proof], "checkpoint": note}


def parse_receipt(text: str | bytes) -> Any:
    """A receipt file's JSON (``refuse_repeated_names`` applied); LedgerError if it is not JSON."""
    try:
        receipt = json_text.loads(text)
    except ValueError as e:
        raise LedgerError(f"receipt: not JSON ({e})") from None
    refuse_repeated_names(text, receipt)
    return receipt


def refuse_repeated_names(text: str | bytes, receipt: Any) -> None:
    """LedgerError if the receipt's ``text`` (parsed as ``receipt``) gives a member name twice
    in one object: riskpipe's reader keeps the last copy, a reader that keeps the first
    would show an auditor another ``record`` than the one verified (docs/receipts.md, step 0)."""
    if (why := json_text.repeated_name(text, receipt)) is not None:
        raise LedgerError(f"receipt: {why}")


@dataclass(frozen=True)
class Proved:
    """What a receipt that holds proves: the entry of ``kind`` and ``entry_id`` (with the
    receipt's record) at its index in the tree ``checkpoint`` signs. ``event_id``: whose
    entry it is, the record's ``id`` (the entry id for a record without one): the stage
    keys an entry by it, but a writer of the ledger's API may give another entry id."""

    checkpoint: Checkpoint
    kind: str
    entry_id: str
    event_id: str


def verify_receipt(receipt: Any, public_keys: Iterable[Ed25519PublicKey], origin: str | None = None,
                   kind: str | None = "decision", event_id: str | None = None) -> Proved:
    """Check a receipt offline; returns what it proves, or raises LedgerError naming the
    first check that failed (docs/receipts.md, "Verifying"). ``kind``: the ledger kind the
    leaf must have (None: any). A decision's receipt must be of a ``decision`` leaf: a
    verdict or dead letter holds whatever its writer put in its record, so a copy of a
    decision record saying ``allow`` in a review-outcomes message proves no decision.
    ``event_id``: the event the receipt must be of (``Proved.event_id``): a receipt of
    another event's decision is refused, whatever its entry id says."""
    if not isinstance(receipt, dict) or set(receipt) != set(KEYS):
        got = sorted(receipt) if isinstance(receipt, dict) else type(receipt).__name__
        raise LedgerError(f"receipt: expected exactly the keys {', '.join(KEYS)}; got {got}")
    index, size, proof_hex = receipt["index"], receipt["tree_size"], receipt["inclusion_proof"]
    if not (type(index) is int and type(size) is int and 0 <= index < size):
        raise LedgerError(f"receipt: index {index!r} must be an integer in [0, tree_size {size!r})")
    if not isinstance(receipt["checkpoint"], str):
        raise LedgerError("receipt.checkpoint: not text")
    cp = Checkpoint.from_note(receipt["checkpoint"], public_keys, "receipt.checkpoint")
    if origin is not None and cp.origin != origin:
        raise LedgerError(f"receipt.checkpoint: origin {cp.origin!r}, expected {origin!r}")
    if cp.tree_size != size:
        raise LedgerError(f"receipt: tree_size {size} but the checkpoint is for tree size {cp.tree_size}")
    try:
        data = b64decode_canonical(receipt["leaf"])
        leaf_kind, entry_id, text = split_leaf(data)
    except (binascii.Error, ValueError, TypeError):
        raise LedgerError("receipt.leaf: not canonical base64 of 'kind \\n entry id \\n record'") from None
    if kind is not None and leaf_kind != kind:
        raise LedgerError(f"receipt.leaf: an entry of kind {leaf_kind[:40]!r}, not {kind!r} (a {kind}'s receipt "
                          "proves a leaf of that kind only)")
    try:
        parsed = json_text.loads(text)
    except ValueError:
        raise LedgerError("receipt.leaf: its record part is not JSON") from None
    if canonical_json(parsed) != text:
        raise LedgerError("receipt.leaf: its record part is not canonical JSON")
    if parsed != receipt["record"] or canonical_json(receipt["record"]) != text:
        raise LedgerError("receipt.record: differs from the record in the leaf (edited)")
    if not isinstance(proof_hex, list) or not all(isinstance(p, str) and len(p) == 64 for p in proof_hex):
        raise LedgerError("receipt.inclusion_proof: must be a list of 64-character hex hashes")
    if not all(_HEX64.fullmatch(p) for p in proof_hex):  # one spelling per hash (docs/receipts.md)
        raise LedgerError("receipt.inclusion_proof: not lowercase hex")
    proof = [bytes.fromhex(p) for p in proof_hex]
    try:
        merkle.verify_inclusion(index, size, merkle.leaf_hash(data), proof, cp.root)
    except merkle.ProofError as e:
        raise LedgerError(f"receipt: {e} (leaf, index or proof altered)") from None
    own = parsed.get("id") if isinstance(parsed, dict) else None
    proved = Proved(cp, leaf_kind, entry_id, own if isinstance(own, str) else entry_id)
    if event_id is not None and proved.event_id != event_id:
        raise LedgerError(f"receipt: proves the {leaf_kind} of event {proved.event_id[:80]!r}"
                          + (f" (entry id {entry_id[:80]!r})" if entry_id != proved.event_id else "")
                          + f", not of {event_id[:80]!r}")
    return proved


def find_decisions(ledger: Ledger, event_id: str, kind: str = "decision", model: str | None = None,
                   policy_sha256: str | None = None) -> list[Entry]:
    """Entries of ``kind`` for ``event_id``: the entry id itself, or any entry whose record's
    ``id`` is the event id (when decisions are keyed by event, model and policy), narrowed
    by model name and policy sha256."""
    found = []
    for e in ledger.entries_with_prefix(event_id, kind):
        if e.entry_id != event_id and e.record.get("id") != event_id:
            continue
        m, p = e.record.get("model"), e.record.get("policy")
        if model is not None and not (isinstance(m, dict) and m.get("name") == model):
            continue
        if policy_sha256 is not None and not (isinstance(p, dict) and p.get("sha256") == policy_sha256):
            continue
        found.append(e)
    return found
