"""Signed checkpoints: Ed25519 signatures over (head hash, row count, time).

A checkpoint says "row ``count`` of this ledger had hash ``head`` at ``ts``", signed
with a private key kept apart from the database (``openssl genpkey -algorithm ed25519``
writes one). It is stored in the ledger's ``checkpoints`` table and, optionally,
published to a Kafka topic so a copy lives outside the database.

``verify`` with only the public key then detects what the hash chain alone cannot:
someone with write access to the database who truncates the chain below a
checkpointed row, or deletes or edits a row at or before it and recomputes every later
hash (and ``chain_state``). The row reported first is the one after the last
checkpoint that still matches (a recomputed chain carries no trace of the edited
row itself). Rows after the latest checkpoint are protected by the hash chain only.

Signed bytes: the canonical JSON (``riskpipe.ledger.chain.canonical_json``) of
``{"count": N, "head": "<64 hex>", "ts": "<RFC 3339>", "type": "riskpipe-ledger-checkpoint/1"}``.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable

from riskpipe.ledger.chain import HEX64, LedgerError, VerifyResult, canonical_json

TYPE = "riskpipe-ledger-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    count: int
    head: str
    ts: str
    key_id: str  # first 16 hex digits of sha256(raw public key)
    public_key: str  # raw 32-byte Ed25519 public key, base64
    signature: str  # base64

    def payload(self) -> bytes:
        return signed_bytes(self.count, self.head, self.ts)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "checkpoint") -> "Checkpoint":
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


def _raw(public_key) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def key_id(public_key) -> str:
    return hashlib.sha256(_raw(public_key)).hexdigest()[:16]


def load_private_key(path: str | Path):
    """An Ed25519 private key from a PEM file (``openssl genpkey -algorithm ed25519``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(Path(path).read_bytes(), password=None)
    except OSError as e:
        raise LedgerError(f"--key {path}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise LedgerError(f"--key {path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"--key {path}: not an Ed25519 key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM file (``openssl pkey -in KEY.pem -pubout``)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    try:
        key = load_pem_public_key(Path(path).read_bytes())
    except OSError as e:
        raise LedgerError(f"--public-key {path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise LedgerError(f"--public-key {path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"--public-key {path}: not an Ed25519 public key")
    return key


def make_checkpoint(ledger, private_key, now: datetime | None = None) -> Checkpoint:
    """Sign the ledger's current (head, count, time) and store the checkpoint in it."""
    head, count = ledger.head_and_count()
    ts = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    pub = private_key.public_key()
    cp = Checkpoint(count, head, ts, key_id(pub), base64.b64encode(_raw(pub)).decode("ascii"),
                    base64.b64encode(private_key.sign(signed_bytes(count, head, ts))).decode("ascii"))
    ledger.add_checkpoint(cp)
    return cp


def check_signatures(checkpoints: Iterable[Checkpoint], public_keys) -> tuple[list[Checkpoint], str | None]:
    """The checkpoints whose signature verifies under one of ``public_keys``, or the first
    problem: a checkpoint signed by an unknown key, or a signature that does not verify."""
    from cryptography.exceptions import InvalidSignature

    by_id = {key_id(k): k for k in public_keys}
    good = []
    for i, cp in enumerate(checkpoints, 1):
        key = by_id.get(cp.key_id)
        if key is None:
            return good, f"checkpoint {i} (row {cp.count}, {cp.ts}) is signed by key {cp.key_id}, not by a given public key"
        try:
            key.verify(base64.b64decode(cp.signature), cp.payload())
        except (InvalidSignature, ValueError):
            return good, f"checkpoint {i} (row {cp.count}, {cp.ts}): signature does not verify (forged or altered)"
        good.append(cp)
    return good, None


def verify_ledger(ledger, public_keys, external: Iterable[Checkpoint] = ()) -> VerifyResult:
    """Check every checkpoint's signature (those stored in the ledger and ``external``
    copies, e.g. from the ``checkpoints`` topic), then the chain against all of them."""
    stored = ledger.checkpoints()
    good, problem = check_signatures([*stored, *external], public_keys)
    if problem:
        head, count = ledger.head_and_count()
        return VerifyResult(False, count, head, None, problem)
    res = ledger.verify(checkpoints=[cp for cp in good if cp.count > 0])
    if res.ok and not good:
        return VerifyResult(True, res.count, res.head, None, "no signed checkpoint yet: the chain alone was verified")
    return res


def read_checkpoint_file(path: str | Path) -> list[Checkpoint]:
    """Checkpoints from JSON lines (one ``Checkpoint.to_dict()`` per line, as published)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise LedgerError(f"--checkpoints {path}: cannot read ({e.strerror})") from None
    out = []
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LedgerError(f"--checkpoints {path}:{n}: invalid JSON ({e.msg})") from None
            out.append(Checkpoint.from_dict(obj, f"--checkpoints {path}:{n}"))
    return out


def publish(kafka, topic: str, cp: Checkpoint, timeout_s: float = 10.0) -> None:
    """Send the checkpoint to ``topic`` (key ``checkpoint``) and wait for the acknowledgement."""
    from riskpipe import kafka_clients

    producer = kafka_clients.producer(kafka, acks="all", retries=5)
    try:
        producer.send(topic, key=b"checkpoint", value=canonical_json(cp.to_dict()).encode("utf-8")).get(timeout=timeout_s)
    finally:
        producer.close(timeout=5)


class Checkpointer:
    """``signer(ledger, n)`` after ``n`` more records are committed: signs a checkpoint
    once ``every_records`` records or ``every_seconds`` have passed since the last one
    (whichever first, and only if something was written meanwhile).

    The stage calls it from its committer's after-commit hook (config section
    ``checkpoint:``, riskpipe.compose.checkpoint_hooks). A failure to publish is logged
    and counted, never fatal: the checkpoint is in the ledger already and the next one
    is published again.
    """

    def __init__(self, private_key, every_records: int | None = None, every_seconds: float | None = None,
                 kafka=None, topic: str | None = None, clock=None) -> None:
        import time

        if not every_records and not every_seconds:
            raise LedgerError("checkpoint: set every_records or every_seconds")
        self.key = private_key
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.kafka, self.topic = kafka, topic
        self.clock = clock or time.monotonic
        self.last_time = self.clock()
        self.rows_since = 0
        self.made = 0
        self.publish_failures = 0

    def __call__(self, ledger, written: int) -> Checkpoint | None:
        self.rows_since += written
        due = (self.every_records and self.rows_since >= self.every_records) or (
            self.every_seconds and self.rows_since and self.clock() - self.last_time >= self.every_seconds)
        if not due:
            return None
        cp = make_checkpoint(ledger, self.key)
        self.rows_since, self.last_time = 0, self.clock()
        self.made += 1
        if self.kafka is not None and self.topic:
            self._publish(cp)
        return cp

    def _publish(self, cp: Checkpoint) -> None:
        import logging

        try:  # a producer per checkpoint (one a minute or so): nothing to close when the stage ends
            publish(self.kafka, self.topic, cp)
        except Exception as e:  # noqa: BLE001 - the stage keeps deciding; the next checkpoint is published again
            self.publish_failures += 1
            logging.getLogger("riskpipe.ledger").error("checkpoint at row %d stored but not published to %s: %s",
                                                       cp.count, self.topic, e)


def checkpointer_for(section, kafka=None) -> Checkpointer:
    """The stage's Checkpointer from its ``checkpoint:`` config section (key loaded now:
    a bad key file stops the stage at start, not at the first checkpoint)."""
    try:
        key = load_private_key(section.key_file)
    except LedgerError as e:
        raise LedgerError(str(e).replace("--key", "checkpoint.key_file", 1)) from None
    return Checkpointer(key, section.every_records, section.every_seconds, kafka=kafka, topic=section.topic)
