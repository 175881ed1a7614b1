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
import re
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
from riskpipe.ledger.store import Ledger


from riskpipe.redaction import redact  # noqa: E402 - the one redaction function, re-exported

__all__ = ["GENESIS", "KINDS", "Entry", "Ledger", "LedgerError", "LedgerUnavailable", "VerifyResult", "backend_for", "canonical_json",
           "check_chain", "dlq_record", "entry_hash", "open_ledger", "parse_ts", "policy_record", "redact"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# libpq connection keywords (https://www.postgresql.org/docs/current/libpq-connect.html)
_LIBPQ_KEYWORDS = frozenset("""host hostaddr port dbname user password passfile channel_binding connect_timeout
    client_encoding options application_name fallback_application_name keepalives keepalives_idle
    keepalives_interval keepalives_count tcp_user_timeout replication gssencmode sslmode requiressl
    sslcompression sslcert sslkey sslpassword sslcertmode sslrootcert sslcrl sslcrldir sslsni
    requirepeer ssl_min_protocol_version ssl_max_protocol_version krbsrvname gsslib gssdelegation
    service target_session_attrs load_balance_hosts""".split())
_KEYWORD_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']+)")


def _keyword_dsn(target: str) -> list[str] | None:
    """The keywords of a libpq keyword DSN (``host=db dbname=x password=...``), or None
    when ``target`` is not one."""
    keys, pos = [], 0
    while pos < len(target.rstrip()):
        m = _KEYWORD_PAIR.match(target, pos)
        if m is None:
            return None
        keys.append(m.group(1).lower())
        pos = m.end()
    return keys or None


def _register_dsn_password(target: str) -> None:
    from urllib.parse import urlsplit

    from riskpipe.redaction import register_secret

    try:
        register_secret(urlsplit(target).password)
    except ValueError:
        pass
    for m in re.finditer(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", target):
        v = m.group(1)
        register_secret(v[1:-1].replace("\\'", "'").replace("\\\\", "\\") if v.startswith("'") else v)


def backend_for(target: Any) -> type[Ledger]:
    """The Ledger class for ``target``; LedgerError (one line) for an unknown scheme.

    PostgreSQL takes a URL (``postgresql://USER:PASSWORD@HOST/DB``) or a libpq keyword
    DSN (``host=HOST dbname=DB user=USER password=...``); a keyword string with an
    unknown keyword is refused rather than taken for a file name. Either way the
    password is registered for redaction (riskpipe.redaction)."""
    if isinstance(target, Path):
        from riskpipe.ledger.sqlite import SqliteLedger

        return SqliteLedger
    if not isinstance(target, str) or not target.strip():
        raise LedgerError(f"ledger: expected a file path, a postgresql:// URL or a keyword DSN, got {redact(repr(target))}")
    m = _SCHEME.match(target)
    scheme = m.group(1).lower() if m else None
    if scheme is None:
        keys = _keyword_dsn(target)
        if keys is not None:
            _register_dsn_password(target)
            unknown = sorted(set(keys) - _LIBPQ_KEYWORDS)
            if unknown:
                raise LedgerError(f"ledger {redact(target)}: not a PostgreSQL keyword DSN (unknown keyword "
                                  f"{', '.join(unknown)}); use postgresql://USER@HOST/DB or host=... dbname=..., "
                                  "or sqlite:///PATH for a file whose name holds '='")
            from riskpipe.ledger.postgres import PostgresLedger

            return PostgresLedger
        if "${" in target:
            raise LedgerError(f"ledger {redact(target)}: holds an unexpanded ${{VAR}} (set the variable)")
    if scheme in ("postgresql", "postgres"):
        _register_dsn_password(target)
        from riskpipe.ledger.postgres import PostgresLedger

        return PostgresLedger
    if scheme in (None, "sqlite"):
        from riskpipe.ledger.sqlite import SqliteLedger

        return SqliteLedger
    raise LedgerError(f"ledger {redact(target)}: unknown scheme {scheme!r} "
                      "(use a file path, sqlite:///PATH or postgresql://USER@HOST/DB)")


def open_ledger(target: str | Path, **options: Any) -> Ledger:
    """Open (creating if absent, unless ``create=False``) the ledger ``target`` names."""
    return backend_for(target)(target, **options)


# -- record constructors for the non-decision kinds ------------------------------------------
def policy_record(name: str, version: str, sha256: str, ts: str, event: str = "loaded", **extra: Any) -> tuple[dict[str, Any], str]:
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
