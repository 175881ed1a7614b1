"""C2SP signed notes (https://c2sp.org/signed-note) with Ed25519, and the C2SP
checkpoint body (https://c2sp.org/tlog-checkpoint) they carry.

A note is UTF-8 text ending in a newline, then a blank line, then one or more lines::

    — <key name> <base64(key id || signature)>

(U+2014 EM DASH, space). For Ed25519 the signature is 64 bytes over the note text
(every byte before the blank line, final newline included) and the key id is the first
4 bytes of SHA-256(key name || 0x0A || 0x01 || 32-byte public key). A checkpoint's text
is ``<origin>\\n<tree size, decimal>\\n<base64 root hash>\\n`` (extension lines may follow;
they are kept in the text and ignored here).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from nacl.bindings import crypto_core_ed25519_is_valid_point

from riskpipe.ledger.merkle import EMPTY_ROOT

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

DASH = "\u2014"
ED25519 = 0x01
_NAME = re.compile(r"^[^\s+]+$")
_SIZE = re.compile(r"^(0|[1-9][0-9]{0,19})$")


class NoteError(ValueError):
    """A note or checkpoint that is malformed or whose signature does not verify."""


def b64decode_canonical(text: str) -> bytes:
    """The bytes of ``text``, standard base64 with ``=`` padding as the encoder writes it; a
    ValueError for anything else. ``b64decode(validate=True)`` also takes extra padding
    ("...=" after a full group) and nonzero pad bits ("Ab==" for "AQ=="): the same bytes
    under many spellings, so one signed note or receipt had many texts that all verified."""
    data = base64.b64decode(text, validate=True)
    if base64.b64encode(data).decode("ascii") != text:
        raise ValueError("not canonical base64")
    return data


def raw_public_key(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def check_public_key(public_key: Ed25519PublicKey) -> None:
    """NoteError unless ``public_key`` is a canonical point of the curve's prime-order
    subgroup (libsodium's ``crypto_core_ed25519_is_valid_point``). RFC 8032 verifiers
    (OpenSSL's among them) take any 32 bytes: under a small-order key such as the
    identity, the signature (R = identity, S = 0) verifies for every text, so a signed
    note "by" it proves nothing. Keys made by ``openssl genpkey`` are never such."""
    if not crypto_core_ed25519_is_valid_point(raw_public_key(public_key)):
        raise NoteError("not a point of the Ed25519 curve's prime-order subgroup (a key of small order, or no "
                        "curve point: one signature can verify under it for every text, so it proves nothing)")


def key_id(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte signed-note key id of an Ed25519 public key under ``name``."""
    return hashlib.sha256(name.encode("utf-8") + b"\n" + bytes([ED25519]) + raw_public_key(public_key)).digest()[:4]


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_name(name: str, what: str = "key name") -> str:
    # fullmatch: ``$`` matches before a final newline, so "evil\n" passed and broke the note it signed;
    # C2SP: a well-formed UTF-8 name without Unicode spaces or '+' (a lone surrogate is not UTF-8)
    if not isinstance(name, str) or not _NAME.fullmatch(name) or not _utf8(name):
        shown = name[:80] if isinstance(name, str) else name
        raise NoteError(f"{what}: must be non-empty UTF-8 text, without spaces or '+'; got {shown!r}")
    return name


def sign(text: str, name: str, private_key: Ed25519PrivateKey) -> str:
    """The signed note: ``text`` (ending in a newline), a blank line, one signature line."""
    check_name(name)
    if not text.endswith("\n"):
        raise NoteError("note text must end with a newline")
    sig = private_key.sign(text.encode("utf-8"))
    kid = key_id(name, private_key.public_key())
    return f"{text}\n{DASH} {name} {base64.b64encode(kid + sig).decode('ascii')}\n"


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes
    signature: bytes


def parse(note: str) -> tuple[str, list[Signature]]:
    """(text, signature lines) of a signed note; NoteError if malformed."""
    if not isinstance(note, str):
        raise NoteError("note: not text")
    if not _utf8(note):
        raise NoteError("note: not valid Unicode text (a lone surrogate)")
    text, sep, sigs = note.partition("\n\n")  # a note's text has no empty line
    if not sep or not text or not sigs.endswith("\n"):
        raise NoteError("note: no blank line followed by signature lines")
    text += "\n"
    if any(ord(c) < 0x20 and c != "\n" for c in note):
        raise NoteError("note: control characters")
    out = []
    for line in sigs[:-1].split("\n"):
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise NoteError(f"note: malformed signature line {line[:60]!r}")
        try:
            blob = b64decode_canonical(parts[2])
        except (binascii.Error, ValueError):
            raise NoteError(f"note: signature of {parts[1]!r} is not canonical base64") from None
        if len(blob) < 5:
            raise NoteError(f"note: signature of {parts[1]!r} is too short")
        out.append(Signature(check_name(parts[1]), blob[:4], blob[4:]))
    return text, out


def verify(note: str, public_keys: Iterable[Ed25519PublicKey]) -> tuple[str, Ed25519PublicKey]:
    """(text, the public key that verified it) of a note with at least one valid Ed25519
    signature by one of ``public_keys`` (matched by key id under the line's name) and
    no line of theirs that does not verify (C2SP signed-note and Go's ``note.Open``: a
    failed signature of a known key rejects the whole note; lines of unknown keys are
    ignored); NoteError otherwise. The key name is not returned: it is not signed
    (anyone can recompute the key id for another name over the same signature), so it
    names nothing."""

    public_keys = list(public_keys)
    for pk in public_keys:
        check_public_key(pk)
    text, sigs = parse(note)
    verified: Ed25519PublicKey | None = None
    for s in sigs:
        for pk in public_keys:
            if key_id(s.name, pk) != s.key_id:
                continue
            try:
                if len(s.signature) != 64:
                    raise InvalidSignature
                pk.verify(s.signature, text.encode("utf-8"))
            except InvalidSignature:
                raise NoteError("note: signature does not verify (forged or altered)") from None
            verified = verified or pk
    if verified is not None:
        return text, verified
    names = list(dict.fromkeys(s.name[:80] for s in sigs))  # repr: a bidi or C1 character shows escaped
    more = f" and {len(names) - 5} more" if len(names) > 5 else ""
    raise NoteError(f"note: signed by {', '.join(map(repr, names[:5]))}{more} with no given public key")


def checkpoint_text(origin: str, size: int, root: bytes) -> str:
    check_name(origin, "origin")
    return f"{origin}\n{size}\n{base64.b64encode(root).decode('ascii')}\n"


def parse_checkpoint(text: str) -> tuple[str, int, bytes]:
    """(origin, tree size, root hash) of a checkpoint's note text; NoteError if malformed."""
    lines = text.split("\n")
    if len(lines) < 4:
        raise NoteError("checkpoint: needs origin, tree size and root hash lines")
    origin, size, root = lines[:3]
    check_name(origin, "checkpoint origin")
    if not _SIZE.fullmatch(size):
        raise NoteError(f"checkpoint: tree size {size[:30]!r} is not a decimal number")
    try:
        root_bytes = b64decode_canonical(root)
    except (binascii.Error, ValueError):
        raise NoteError("checkpoint: root hash is not canonical base64") from None
    if len(root_bytes) != 32:
        raise NoteError(f"checkpoint: root hash has {len(root_bytes)} bytes, not 32")
    if int(size) == 0 and root_bytes != EMPTY_ROOT:  # no tree has it: a signed false statement
        raise NoteError(f"checkpoint: tree size 0 with root {root_bytes.hex()}; the empty tree's root is "
                        f"{EMPTY_ROOT.hex()}")
    return origin, int(size), root_bytes


def split_notes(text: str) -> list[str]:
    """The signed notes in ``text``, one after another (as a consumer of the checkpoints
    topic writes them); blank lines between notes are allowed."""
    notes: list[str] = []
    body: list[str] = []
    sigs: list[str] = []
    lines = text.split("\n")
    for line in lines:
        if sigs and not line.startswith(DASH + " "):
            notes.append("\n".join(body) + "\n\n" + "\n".join(sigs) + "\n")
            body, sigs = [], []
        if line.startswith(DASH + " ") and body and (sigs or body[-1] == ""):
            if not sigs:
                body.pop()  # the blank line before the signatures
            sigs.append(line)
        elif line or body:
            body.append(line)
    if sigs:
        notes.append("\n".join(body) + "\n\n" + "\n".join(sigs) + "\n")
    elif any(b.strip() for b in body):
        raise NoteError("checkpoints file: text after the last signed note has no signature")
    return notes
