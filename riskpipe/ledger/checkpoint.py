"""Signed checkpoints: C2SP ``tlog-checkpoint`` notes over the ledger's Merkle tree.

A checkpoint says "the first ``tree_size`` rows of the log ``origin`` have RFC 9162
root ``root``", as a C2SP signed note (:mod:`riskpipe.ledger.note`) signed with an
Ed25519 key kept apart from the database (``openssl genpkey -algorithm ed25519``
writes one)::

    riskpipe/ledger/3f2a9c0d1b2e4f56
    1024
    <base64 root hash>

    — riskpipe/ledger/3f2a9c0d1b2e4f56 <base64(4-byte key id || 64-byte Ed25519 signature)>

The origin is config ``ledger_origin`` (or ``--origin``), by default
``riskpipe/ledger/<log id>`` with the random log id the ledger made when its tree was
created; the key name is the origin unless given. Checkpoints are stored in the
ledger's ``signed_notes`` table and, optionally, published to a Kafka topic (the note
text is the message value) so a copy lives outside the database. Sigstore, the Go
checksum database and Tessera use the same format, so their tools read these notes.

``verify`` with only the public key then detects what the hash chain alone cannot:
someone with write access to the database who truncates the ledger below a signed
tree size, or edits a row at or before it and recomputes every hash, the chain state
and the tree. Rows after the latest checkpoint are protected by the chain and tree only.
Such a writer can also delete the stored checkpoints: with keys and no checkpoint at all,
``verify_ledger`` is not ok (``unsigned``), and copies kept elsewhere (``external``, from
the topic) are what still vouch for the rows.

Checkpoints of riskpipe before the Merkle tree (JSON over (head, count, ts), class
:class:`~riskpipe.ledger.anchors.LegacyCheckpoint`, in the ``checkpoints`` table) are still verified with the
same keys: signed bytes are the canonical JSON of ``{"count": N, "head": "<64 hex>",
"ts": "<RFC 3339>", "type": "riskpipe-ledger-checkpoint/1"}``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_pem_public_key

from riskpipe import json_text, kafka_clients
from riskpipe.ledger import note as notes
from riskpipe.ledger.anchors import Checkpoint, LegacyCheckpoint
from riskpipe.ledger.chain import GENESIS, LedgerError, VerifyResult
from riskpipe.ledger.merkle import EMPTY_ROOT
from riskpipe.paths import read_small_bytes, read_text

if TYPE_CHECKING:

    from riskpipe.ledger.store import Ledger

def default_origin(ledger: Ledger) -> str:
    """``riskpipe/ledger/<log id>``: the log id is random, made with the ledger's tree."""
    return f"riskpipe/ledger/{ledger.log_id()}"


def make_checkpoint(ledger: Ledger, private_key: Ed25519PrivateKey, origin: str | None = None,
                    key_name: str | None = None, previous: Checkpoint | None = None) -> Checkpoint:
    """Sign the ledger's current tree size and root as a C2SP checkpoint and store it
    (rows other writers left pending are sequenced first, so it covers every stored row).
    Refused unless the tree extends what the key signed before (``refuse_fork``), and
    ``previous`` (a checkpoint the caller made and kept itself) too."""
    ledger.integrate()
    size, root = ledger.tree_head()
    refuse_fork(ledger, private_key.public_key(), size, root)
    if previous is not None:
        check_extends(ledger, previous, size, root)
    origin = default_origin(ledger) if origin is None else origin  # an empty one is refused, not replaced
    try:
        text = notes.sign(notes.checkpoint_text(origin, size, bytes.fromhex(root)),
                          origin if key_name is None else key_name, private_key)
    except notes.NoteError as e:
        raise LedgerError(f"checkpoint: {e}") from None
    cp = Checkpoint(origin, size, bytes.fromhex(root), text)
    ledger.add_note(size, root, text)
    return cp


def refuse_fork(ledger: Ledger, public_key: Ed25519PublicKey, size: int, root: str) -> None:
    """LedgerError unless the ledger's tree of ``size`` leaves and ``root`` (hex) is
    consistent with the largest tree ``public_key`` signed for it before: it extends that
    tree, or (another writer with the key, e.g. a replica, signed a larger one since
    ``size`` was read) the ledger's tree now extends both.

    Someone who can write the database can roll the log back, append other rows and
    rebuild the chain and the tree; ``verify`` then finds the signed checkpoint broken.
    Signing the rewritten tree would turn that into a signed history that verifies (once
    the old note is deleted): the key holder's routine ``ledger checkpoint``, the stage's
    checkpointer or a report bundle would vouch for the rewrite. Notes other keys signed
    vouch for nothing here and are passed over. The stored notes are what this reads, so
    a writer who deletes them first is not caught here: the stage's checkpointer keeps its
    last checkpoint in memory too (``Checkpointer``), and ``verify --checkpoints`` with
    the published copies finds the rewrite."""
    signed = _largest_signed(ledger, public_key)
    if signed is not None:
        check_extends(ledger, signed, size, root)


def _largest_signed(ledger: Ledger, public_key: Ed25519PublicKey) -> Checkpoint | None:
    for text in ledger.notes_largest_first():
        try:
            return Checkpoint.from_note(text, [public_key])
        except LedgerError:
            continue
    return None


def check_extends(ledger: Ledger, signed: Checkpoint, size: int, root: str) -> None:
    """LedgerError unless the tree of ``size`` leaves and ``root`` and the ``signed`` tree
    are both prefixes of the ledger's tree now (``refuse_fork``)."""
    if signed.tree_size <= size:
        ok, now = ledger.tree_root(signed.tree_size) == signed.root, size
    else:  # signed after ``size`` was read, by another writer with the key: both must be prefixes now
        now = ledger.tree_head()[0]
        ok = (now >= signed.tree_size and ledger.tree_root(signed.tree_size) == signed.root
              and ledger.tree_root(size) == bytes.fromhex(root))
    if not ok:
        state = f"has only {now}" if now < signed.tree_size else f"has other rows in the first {signed.tree_size}"
        raise LedgerError(f"checkpoint: not signed: this key signed a tree of {signed.tree_size} leaves, and the "
                          f"ledger's tree now {state}: the log was rolled back or rewritten (`riskpipe ledger "
                          "verify --public-key` says where)")


def legacy_key_id(public_key: Ed25519PublicKey) -> str:
    """A legacy checkpoint's key id: the first 16 hex digits of sha256(raw public key); also
    how ``verify`` names the key that verified a C2SP checkpoint (a signature line's key
    name is not signed, so it cannot name the key)."""
    return hashlib.sha256(notes.raw_public_key(public_key)).hexdigest()[:16]


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from a PEM file (``openssl genpkey -algorithm ed25519``)."""

    if "-----BEGIN" in str(path) or "\n" in str(path):  # key material given where a path belongs: never echo it
        raise LedgerError("--key: expected the path of a PEM file, got what looks like key material (not shown)")
    try:
        key = load_pem_private_key(read_small_bytes(path), password=None)
    except OSError as e:
        raise LedgerError(f"--key {path}: cannot read ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise LedgerError(f"--key {path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LedgerError(f"--key {path}: not an Ed25519 key (make one with `openssl genpkey -algorithm ed25519`)")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``openssl pkey -in KEY.pem -pubout``)."""

    try:
        key = load_pem_public_key(read_small_bytes(path))
    except OSError as e:
        raise LedgerError(f"--public-key {path}: cannot read ({e.strerror})") from None
    except ValueError as e:
        raise LedgerError(f"--public-key {path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LedgerError(f"--public-key {path}: not an Ed25519 public key")
    try:
        notes.check_public_key(key)
    except notes.NoteError as e:
        raise LedgerError(f"--public-key {path}: {e}") from None
    return key


def check_signatures(checkpoints: Iterable[LegacyCheckpoint], public_keys: Iterable[Ed25519PublicKey]
                     ) -> tuple[list[LegacyCheckpoint], str | None]:
    """The checkpoints whose signature verifies under one of ``public_keys``, or the first
    problem: a key under which every signature verifies (``notes.check_public_key``, as
    ``notes.verify`` checks for C2SP notes), a checkpoint signed by an unknown key, or a
    signature that does not verify."""

    public_keys = list(public_keys)
    for k in public_keys:
        try:
            notes.check_public_key(k)
        except notes.NoteError as e:
            return [], f"public key {legacy_key_id(k)}: {e}"
    by_id = {legacy_key_id(k): k for k in public_keys}
    good: list[LegacyCheckpoint] = []
    for i, cp in enumerate(checkpoints, 1):
        key = by_id.get(cp.key_id)
        if key is None:
            return good, (f"checkpoint {i} (row {cp.count}, {cp.ts}) is signed by key {cp.key_id}, "
                          "not by a given public key")
        try:
            key.verify(base64.b64decode(cp.signature), cp.payload())
        except (InvalidSignature, ValueError):
            return good, f"checkpoint {i} (row {cp.count}, {cp.ts}): signature does not verify (forged or altered)"
        good.append(cp)
    return good, None


def _matched(legacy: list[LegacyCheckpoint], signed: list[Checkpoint], public_keys: Iterable[Ed25519PublicKey]
             ) -> dict[str, Any]:
    """The latest verified checkpoint (the largest tree size; a C2SP one before a legacy one
    of the same size), as ``ledger verify`` reports it."""
    verified = len(legacy) + len(signed)
    if signed:
        cp = max(signed, key=lambda c: c.tree_size)
        if not legacy or cp.tree_size >= max(c.count for c in legacy):
            return {"kind": "c2sp", "origin": cp.origin, "tree_size": cp.tree_size, "root": cp.root.hex(),
                    "key": legacy_key_id(notes.verify(cp.note, public_keys)[1]), "verified": verified}
    old = max(legacy, key=lambda c: (c.count, c.ts))
    return {"kind": "legacy", "tree_size": old.count, "head": old.head, "ts": old.ts, "key": old.key_id,
            "verified": verified}


def find_fork(legacy: Iterable[LegacyCheckpoint], signed: Iterable[Checkpoint]) -> str | None:
    """The first two verified checkpoints that say different things of one prefix of the
    log (a legacy head for one row, a C2SP root for one tree size), else None. The empty
    prefix has one head (GENESIS) and one root (the empty tree's) that no key need sign.
    ``Ledger.verify`` keeps one checkpoint per row and per tree size: without this, the
    one read last was checked against the rows, the other dropped unseen (and counted
    among the verified)."""
    said: dict[tuple[str, int], tuple[str, str]] = {("row", 0): (GENESIS, "the empty chain's head is"),
                                                    ("tree size", 0): (EMPTY_ROOT.hex(), "the empty tree's root is")}
    claims = [*(("row", c.count, c.head, "heads") for c in legacy),
              *(("tree size", c.tree_size, c.root.hex(), "roots") for c in signed)]
    for what, size, value, plural in claims:
        first, by = said.setdefault((what, size), (value, "one says"))
        if first != value:
            return (f"two signed checkpoints for {what} {size} with different {plural} (a fork): {by} "
                    f"{first[:12]}…, another {value[:12]}…")
    return None


def verify_ledger(ledger: Ledger, public_keys: Sequence[Ed25519PublicKey],
                  external: Iterable[str | LegacyCheckpoint] = ()) -> VerifyResult:
    """Check every checkpoint's signature (those stored in the ledger and ``external``
    copies, e.g. from the ``checkpoints`` topic: note texts or legacy checkpoints), then
    the chain and tree against all of them."""
    external = list(external)
    legacy = [*ledger.legacy_checkpoints(), *(c for c in external if isinstance(c, LegacyCheckpoint))]
    good, problem = check_signatures(legacy, public_keys)
    signed: list[Checkpoint] = []
    if problem is None:
        for i, text in enumerate([*ledger.notes(), *(c for c in external if isinstance(c, str))], 1):
            try:
                signed.append(Checkpoint.from_note(text, public_keys, f"signed checkpoint {i}"))
            except LedgerError as e:
                problem = str(e)
                break
    if problem is None:
        problem = find_fork(good, signed)
    if problem:
        head, count = ledger.head_and_count()
        return VerifyResult(False, count, head, None, problem)
    res = ledger.verify(checkpoints=[*(cp for cp in good if cp.count > 0), *(cp for cp in signed if cp.tree_size > 0)])
    if res.ok and not good and not signed:
        # keys were given to check signatures, and there are none: never "ok". Whoever can
        # rewrite the rows (and recompute every hash) can delete the stored checkpoints too;
        # only copies kept elsewhere (--checkpoints) vouch for a ledger then
        return VerifyResult(False, res.count, res.head, None,
                            "no signed checkpoint: a public key was given, but the ledger holds none and none were "
                            "given with --checkpoints, so nothing signed vouches for the rows (a ledger whose "
                            "checkpoints were deleted looks the same); the chain and tree alone hold",
                            res.root, unsigned=True)
    if res.ok:  # say which checkpoint the chain and tree were matched against, not just "ok"
        res = dataclasses.replace(res, checkpoint=_matched(good, signed, public_keys))
    return res


def read_checkpoint_file(path: str | Path) -> list[str] | list[LegacyCheckpoint]:
    """Checkpoints from a file: signed notes one after another (as published), or JSON
    lines of legacy checkpoints (``LegacyCheckpoint.to_dict()``). A file with none is
    refused: the copies it was to hold would go unchecked without a word."""
    text = read_text(path, "--checkpoints", LedgerError)
    if not text.strip():
        raise LedgerError(f"--checkpoints {path}: holds no checkpoint (nothing to compare the ledger with)")
    if not text.lstrip().startswith("{"):
        try:
            return notes.split_notes(text)
        except notes.NoteError as e:
            raise LedgerError(f"--checkpoints {path}: {e}") from None
    out: list[LegacyCheckpoint] = []
    for n, line in enumerate(json_text.jsonl_lines(text), 1):
        if line.strip():
            try:
                obj = json_text.loads(line)
            except json.JSONDecodeError as e:
                raise LedgerError(f"--checkpoints {path}:{n}: invalid JSON ({e.msg})") from None
            out.append(LegacyCheckpoint.from_dict(obj, f"--checkpoints {path}:{n}"))
    return out


def publish(kafka: Any, topic: str, cp: Checkpoint, timeout_s: float = 10.0) -> None:
    """Send the signed note to ``topic`` (key ``checkpoint``) and wait for the acknowledgement."""

    producer = kafka_clients.producer(kafka, acks="all", retries=5)
    try:
        producer.send(topic, key=b"checkpoint", value=cp.note.encode("utf-8")).get(timeout=timeout_s)
    finally:
        producer.close(timeout=5)


class Checkpointer:
    """``signer(ledger, n)`` after ``n`` more records are committed: signs a checkpoint
    once ``every_records`` records or ``every_seconds`` have passed since the last one
    (whichever first, and only if something was written meanwhile).

    The stage calls it from its committer's after-commit hook (config section
    ``checkpoint:``, riskpipe.app.compose.checkpoint_hooks), with ``n = 0`` at turns where
    it holds nothing (so ``every_seconds`` holds while no event arrives: before, rows a
    burst left below ``every_records`` stayed unsigned until the next commit, for ever if
    none came), and ``final`` when it stops cleanly. A failure to publish is logged
    and counted, never fatal: the checkpoint is in the ledger already and the next one
    is published again.

    Its count starts from the ledger, not from 0: at its first call it reads how many
    leaves the tree has past the largest checkpoint its key signed (``_left_unsigned``), and
    signs at once if some of them are not the ``n`` it was just told of: rows a run
    killed before its clean stop left unsigned, or that this stage wrote before any
    batch (its ``policy`` rows). Before, a restarted stage counted from 0, so the tail
    of the run before it stayed unsigned until its own counters came due (never, if it
    stopped cleanly without writing a row), open to a rewrite ``verify --public-key``
    did not see.
    """

    def __init__(self, private_key: Ed25519PrivateKey, every_records: int | None = None,
                 every_seconds: float | None = None, kafka: Any = None, topic: str | None = None,
                 clock: Callable[[], float] | None = None, origin: str | None = None) -> None:
        if not every_records and not every_seconds:
            raise LedgerError("checkpoint: set every_records or every_seconds")
        self.key = private_key
        self.every_records = every_records
        self.every_seconds = every_seconds
        self.kafka, self.topic = kafka, topic
        self.origin = origin
        self.clock = clock or time.monotonic
        self.last_time = self.clock()
        self.rows_since = 0
        self.resumed = False  # the ledger's unsigned tail read (at the first call)
        self.made = 0
        self.publish_failures = 0
        self.last: Checkpoint | None = None

    def __call__(self, ledger: Ledger, written: int) -> Checkpoint | None:
        if self._left_unsigned(ledger) > written:
            return self._sign(ledger)  # rows left unsigned before this run: not held until the counters are due
        self.rows_since += written
        due = (self.every_records and self.rows_since >= self.every_records) or (
            self.every_seconds and self.rows_since and self.clock() - self.last_time >= self.every_seconds)
        return self._sign(ledger) if due else None

    def _left_unsigned(self, ledger: Ledger) -> int:
        """At the first call only (0 after it): the rows (sequenced or pending) past the
        largest tree this key signed in the ledger, which includes the ``written`` rows of
        the call that asks (so ``rows_since`` starts at 0 and counts them as usual). A
        ledger smaller than what the key signed (rolled back) counts 0 here; the next
        ``_sign`` refuses it (``refuse_fork``)."""
        if self.resumed:
            return 0
        signed = _largest_signed(ledger, self.key.public_key())
        unsigned = ledger.tree_head()[0] + ledger.pending() - (signed.tree_size if signed else 0)
        self.resumed = True
        return max(unsigned, 0)

    def _sign(self, ledger: Ledger) -> Checkpoint:
        cp = make_checkpoint(ledger, self.key, self.origin, previous=self.last)
        self.last = cp  # kept in memory: deleting the stored notes does not make this process forget it
        self.rows_since, self.last_time = 0, self.clock()
        self.made += 1
        if self.kafka is not None and self.topic:
            self._publish(cp, self.topic)
        return cp

    def final(self, ledger: Ledger) -> Checkpoint | None:
        """Sign what was written since the last checkpoint, due or not: the stage calls it
        when it stops cleanly, so the rows of its last minutes are not left unsigned
        until some later run writes more."""
        # the rows an earlier run left unsigned are signed even if this one wrote none
        return self._sign(ledger) if self._left_unsigned(ledger) or self.rows_since else None

    def _publish(self, cp: Checkpoint, topic: str) -> None:
        try:  # a producer per checkpoint (one a minute or so): nothing to close when the stage ends
            publish(self.kafka, topic, cp)
        except Exception as e:  # noqa: BLE001 - the stage keeps deciding; the next checkpoint is published again
            self.publish_failures += 1
            logging.getLogger("riskpipe.ledger").error("checkpoint at tree size %d stored but not published to %s: %s",
                                                       cp.tree_size, topic, e)


def checkpointer_for(section: Any, kafka: Any = None, origin: str | None = None) -> Checkpointer:
    """The stage's Checkpointer from its ``checkpoint:`` config section (key loaded now:
    a bad key file stops the stage at start, not at the first checkpoint)."""
    try:
        key = load_private_key(section.key_file)
    except LedgerError as e:
        raise LedgerError(str(e).replace("--key", "checkpoint.key_file", 1)) from None
    return Checkpointer(key, section.every_records, section.every_seconds, kafka=kafka, topic=section.topic,
                        origin=origin)
