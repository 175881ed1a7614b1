"""Append-only, hash-chained ledger of decisions, review verdicts, policy changes and
dead letters, on SQLite (embedded default) or PostgreSQL (shared by many processes).

``open_ledger(target)`` is the one way in: a file path or ``sqlite:///PATH`` opens the
SQLite backend, ``postgresql://...`` (or ``postgres://``) the PostgreSQL backend; any
other ``scheme://`` is refused. Both store the same rows under the same hash-chain
definition (:mod:`riskpipe.ledger.chain`), so an export from either verifies
identically, and both version their schema (:mod:`riskpipe.ledger.migrations`).

What ``verify`` detects
-----------------------
* an edited row (record, kind, id or ts column): its hash no longer matches;
* a deleted row: a gap in ``seq`` or a ``prev_hash`` that no longer links;
* an inserted or reordered row: its ``prev_hash`` does not link to the row before it
  (an insert whose hash the forger recomputed breaks the link of the row after it);
* a truncated tail: the ``chain_state`` table (count and head, updated in the same
  transaction as every append) disagrees with the rows;
* with a public key (:mod:`riskpipe.ledger.checkpoint`): a chain rewritten and
  re-chained, or truncated, up to a signed checkpoint's row, even when the forger
  recomputed every hash and ``chain_state``.

Limits: rows appended after the latest checkpoint are protected by the hash chain
only; someone who can write the database can rewrite or drop them undetected until
the next checkpoint is signed. Checkpoints stored in the ledger can themselves be
deleted by such a person: keep the copies published to the ``checkpoints`` topic (or
``--expect-head`` anchors) elsewhere. Deletions and updates are also refused by
triggers, which stops accidents, not an attacker with database superuser rights.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from riskpipe.ledger.chain import (
    GENESIS,
    KINDS,
    Entry,
    LedgerError,
    LedgerUnavailable,
    VerifyResult,
    canonical_json,
    check_chain,
    entry_hash,
    parse_ts,
)
from riskpipe.ledger.postgres import PostgresLedger  # defining the backends makes backend_for find them
from riskpipe.ledger.sqlite import SqliteLedger
from riskpipe.ledger.store import Ledger, backend_for
from riskpipe.redaction import redact  # the one redaction function, re-exported

__all__ = ["GENESIS", "KINDS", "Entry", "Ledger", "LedgerError", "LedgerUnavailable", "PostgresLedger", "SqliteLedger",
           "VerifyResult", "backend_for", "canonical_json",
           "check_chain", "dlq_record", "entry_hash", "open_ledger", "parse_ts", "policy_record", "redact"]


def open_ledger(target: str | Path, **options: Any) -> Ledger:
    """Open (creating if absent, unless ``create=False``) the ledger ``target`` names."""
    return backend_for(target)(target, **options)


# -- record constructors for the non-decision kinds ------------------------------------------
def policy_record(name: str, version: str, sha256: str, ts: str, event: str = "loaded",
                  **extra: Any) -> tuple[dict[str, Any], str]:
    """A ``policy`` entry and its entry id; one entry per distinct (name, version, sha256)."""
    rec = {"id": f"{name}@{version}#{sha256}", "ts": ts, "event": event, "name": name, "version": str(version),
           "sha256": sha256, **extra}
    return rec, rec["id"]


def dlq_record(reason: str, value: bytes, ts: str, *, topic: str | None = None, partition: int | None = None,
               offset: int | None = None, file: str | None = None, line: int | None = None,
               message: str | None = None, digest: dict[str, Any] | None = None) -> tuple[dict[str, Any], str]:
    """A ``dlq`` entry and its entry id: reason, source and the payload's sha256 — never the payload.

    The entry id is the position plus the payload's digest (``topic:partition:offset:sha256[:16]``):
    a redelivery of the same message is one entry, while another message at a position
    used before (a topic deleted and re-created, a broker that lost its data, a rewritten
    file) is an entry of its own instead of being skipped as a duplicate. ``digest``
    ({sha256, size}) names a payload that is no longer at hand (a dead letter whose
    payload was left out to fit ``max_output_bytes``): the entry is the one the stage wrote."""
    digest = digest or {"sha256": hashlib.sha256(value).hexdigest(), "size": len(value)}
    sha = str(digest["sha256"])
    if topic is not None:
        source: dict[str, Any] = {"topic": topic, "partition": partition, "offset": offset}
        eid = f"{topic}:{partition}:{offset}:{sha[:16]}"
    else:
        source = {"file": file, "line": line}
        eid = f"{file}:{line}:{sha[:16]}"
    rec = {"id": eid, "ts": ts, "reason": reason, "message": message, "source": source,
           "digest": digest}
    return rec, eid
