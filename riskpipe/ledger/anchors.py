"""What a signed checkpoint anchors, as values: a C2SP checkpoint (origin, tree size,
root and the signed note) and a legacy checkpoint (a signed (count, head, ts)).

Signing, storing, publishing and verifying them against a ledger is
:mod:`riskpipe.ledger.checkpoint`; the store reads and checks these values, so they sit
below both (the store imports this module, the checkpoint module imports the store's
types).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from riskpipe.ledger import note as notes
from riskpipe.ledger.chain import HEX64, LedgerError, canonical_json

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

TYPE = "riskpipe-ledger-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """A C2SP checkpoint: origin, tree size, root hash and the signed note carrying them."""

    origin: str
    tree_size: int
    root: bytes
    note: str

    @classmethod
    def from_note(cls, text: str, public_keys: Iterable[Ed25519PublicKey] | None = None,
                  where: str = "checkpoint") -> Checkpoint:
        """Parse a signed note; with ``public_keys``, one of them must have signed it."""
        try:
            body = notes.verify(text, public_keys)[0] if public_keys is not None else notes.parse(text)[0]
            origin, size, root = notes.parse_checkpoint(body)
        except notes.NoteError as e:
            raise LedgerError(f"{where}: {e}") from None
        return cls(origin, size, root, text)


@dataclass(frozen=True)
class LegacyCheckpoint:
    count: int
    head: str
    ts: str
    key_id: str  # first 16 hex digits of sha256(raw public key)
    public_key: str  # raw 32-byte Ed25519 public key, base64
    signature: str  # base64

    def payload(self) -> bytes:
        return signed_bytes(self.count, self.head, self.ts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "checkpoint") -> LegacyCheckpoint:
        try:
            cp = cls(int(d["count"]), str(d["head"]), str(d["ts"]), str(d["key_id"]), str(d["public_key"]),
                     str(d["signature"]))
        except (KeyError, TypeError, ValueError) as e:
            raise LedgerError(f"{where}: not a checkpoint ({type(e).__name__}: {e})") from None
        if not HEX64.fullmatch(cp.head) or cp.count < 0:
            raise LedgerError(f"{where}: head must be 64 lowercase hex characters and count >= 0")
        return cp


def signed_bytes(count: int, head: str, ts: str) -> bytes:
    return canonical_json({"count": count, "head": head, "ts": ts, "type": TYPE}).encode("utf-8")
