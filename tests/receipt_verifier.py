"""An independent receipt verifier, written from docs/receipts.md alone.

It uses only the standard library (hashlib, base64, json) and the ``cryptography``
package; it must not import riskpipe (tests/test_receipts.py checks that), so that
it shows the document is enough to check a receipt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

FIELDS = {"leaf", "record", "index", "tree_size", "inclusion_proof", "checkpoint"}


class Invalid(Exception):
    pass


def _b64(text: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise Invalid(f"bad base64: {e}") from None
    if base64.b64encode(data).decode("ascii") != text:  # extra padding, nonzero pad bits
        raise Invalid("base64 not canonical")
    return data


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def read(text: str) -> dict:
    """Step 0: the receipt's JSON text, every member name once per object."""

    def unique(pairs):
        names = [k for k, _ in pairs]
        if len(names) != len(set(names)):
            raise Invalid("a member name given twice")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except ValueError as e:
        raise Invalid(f"not JSON: {e}") from None


P = 2**255 - 19


def _small_order(raw: bytes) -> bool:
    """Whether the key is of small order: its Montgomery form u = (1 + y) / (1 - y) gives
    X25519 (whose scalars are multiples of 8) the all-zero result, which cryptography
    refuses; y = 1 is the identity itself. (riskpipe checks [8]A on the Edwards curve.)"""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    if y == 1:
        return True
    u = (1 + y) * pow(1 - y, P - 2, P) % P
    try:
        X25519PrivateKey.generate().exchange(X25519PublicKey.from_public_bytes(u.to_bytes(32, "little")))
    except ValueError:
        return True
    return False


def verify(receipt: dict, public_key_pem: bytes, origin: str | None = None, kind: str | None = "decision") -> None:
    """Raise Invalid unless the receipt holds under the PEM public key."""
    pub = load_pem_public_key(public_key_pem)
    if not isinstance(pub, Ed25519PublicKey):
        raise Invalid("not an Ed25519 key")
    raw = pub.public_bytes(Encoding.Raw, PublicFormat.Raw)
    if _small_order(raw):  # the identity's signature (R = identity, S = 0) verifies every text
        raise Invalid("a key of small order: every signature would verify")
    # step 1
    if not isinstance(receipt, dict) or set(receipt) != FIELDS:
        raise Invalid("wrong keys")
    index, size = receipt["index"], receipt["tree_size"]
    if type(index) is not int or type(size) is not int or not 0 <= index < size:
        raise Invalid("index/tree_size")
    # step 2: the signed note
    note = receipt["checkpoint"]
    if not isinstance(note, str) or "\n\n" not in note:
        raise Invalid("checkpoint is not a signed note")
    sep = note.index("\n\n")
    text, sig_block = note[:sep + 1], note[sep + 2:]
    if not sig_block.endswith("\n"):
        raise Invalid("signature block must end with a newline")
    signed = False
    for line in sig_block[:-1].split("\n"):
        if not line.startswith("\u2014 "):
            raise Invalid("malformed signature line")
        name, _, blob_b64 = line[2:].partition(" ")
        blob = _b64(blob_b64)
        kid = hashlib.sha256(name.encode() + b"\x0a\x01" + raw).digest()[:4]
        if blob[:4] != kid:
            continue  # another key's line
        try:
            if len(blob) != 68:
                raise InvalidSignature
            pub.verify(blob[4:], text.encode("utf-8"))
        except InvalidSignature:
            raise Invalid("a signature line by the trusted key does not verify") from None
        signed = True
    if not signed:
        raise Invalid("no valid signature by the trusted key")
    # step 3: the checkpoint body
    lines = text.split("\n")
    if len(lines) < 4 or not lines[0]:
        raise Invalid("checkpoint body")
    if origin is not None and lines[0] != origin:
        raise Invalid("origin")
    if not lines[1].isdigit() or (lines[1] != "0" and lines[1].startswith("0")) or int(lines[1]) != size:
        raise Invalid("checkpoint tree size differs from tree_size")
    root = _b64(lines[2])
    if len(root) != 32:
        raise Invalid("root length")
    # step 4: leaf and record
    leaf = _b64(receipt["leaf"]) if isinstance(receipt["leaf"], str) else b""
    parts = leaf.split(b"\n", 2)
    if len(parts) != 3:
        raise Invalid("leaf layout")
    if kind is not None and parts[0] != kind.encode("utf-8"):
        raise Invalid("leaf kind")
    try:
        record_text = parts[2].decode("utf-8")
        parsed = json.loads(record_text)
    except (UnicodeDecodeError, ValueError):
        raise Invalid("record part is not JSON") from None
    if parsed != receipt["record"]:
        raise Invalid("record differs from the leaf")
    try:
        if _canonical(receipt["record"]) != record_text:
            raise Invalid("record part is not canonical")
    except ValueError:
        raise Invalid("record not serialisable") from None
    # step 5
    path = receipt["inclusion_proof"]
    if not isinstance(path, list):
        raise Invalid("inclusion_proof")
    try:
        nodes = [bytes.fromhex(p) for p in path if isinstance(p, str) and len(p) == 64 and p == p.lower()]
    except ValueError:
        raise Invalid("inclusion_proof hex") from None
    if len(nodes) != len(path):
        raise Invalid("inclusion_proof elements")
    # step 6: RFC 9162 2.1.3.2
    fn, sn = index, size - 1
    r = hashlib.sha256(b"\x00" + leaf).digest()
    for p in nodes:
        if sn == 0:
            raise Invalid("proof too long")
        if fn % 2 == 1 or fn == sn:
            r = hashlib.sha256(b"\x01" + p + r).digest()
            if fn % 2 == 0:
                while fn != 0 and fn % 2 == 0:
                    fn >>= 1
                    sn >>= 1
        else:
            r = hashlib.sha256(b"\x01" + r + p).digest()
        fn >>= 1
        sn >>= 1
    if sn != 0 or r != root:
        raise Invalid("inclusion proof does not lead to the signed root")
