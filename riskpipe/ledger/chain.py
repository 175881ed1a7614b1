"""The hash chain: its byte layout, record checks and the walk that verifies it.

Pure functions and dataclasses, shared by every backend (SQLite, PostgreSQL), so an
export from either verifies identically with nothing but sha256.

Chain
-----
Rows are numbered ``seq = 1, 2, 3, ...`` without gaps. Each row stores its canonical
record (``docs/records.md``: ``json.dumps(record, sort_keys=True, separators=(",", ":"),
ensure_ascii=False, allow_nan=False)``), the previous row's hash and its own hash::

    hash(row) = sha256( prev_hash       # 64 lowercase hex ASCII bytes; GENESIS for seq 1
                        + b"\\n" + kind     # UTF-8, e.g. b"decision"
                        + b"\\n" + entry_id # UTF-8, no control characters
                        + b"\\n" + record ) # canonical JSON, UTF-8
    GENESIS = "0" * 64

``kind`` and ``entry_id`` are inside the hash so that relabelling a row is caught too;
neither may contain a newline, so the layout is unambiguous.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime, UTC
from typing import Any
from collections.abc import Iterable

import orjson

GENESIS = "0" * 64
KINDS = ("decision", "verdict", "policy", "dlq")
_KIND_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
HEX64 = re.compile(r"[0-9a-f]{64}")


class LedgerError(ValueError):
    """A record or argument the ledger cannot accept (message names field and reason)."""


class LedgerUnavailable(LedgerError):
    """The ledger's server cannot be reached (an infrastructure fault, not the record's:
    see riskpipe.stream.infra); the same call may succeed once it is back."""


@dataclass(frozen=True)
class Entry:
    seq: int
    kind: str
    entry_id: str
    ts: str | None
    record: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    count: int
    head: str
    first_bad_seq: int | None = None
    reason: str | None = None
    root: str | None = None  # the Merkle root of the ``count`` rows (hex), when they all check out
    # the latest signed checkpoint the chain was checked against (verify_ledger)
    checkpoint: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def canonical_json(record: Any) -> str:
    """The canonical JSON text of ``record`` (docs/records.md)."""
    try:
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LedgerError(f"record: not canonical JSON ({exc})") from None


def entry_hash(prev_hash: str, kind: str, entry_id: str, canonical_record: str) -> str:
    """sha256 over the byte layout documented in the module docstring."""
    h = hashlib.sha256()
    h.update(prev_hash.encode("ascii"))
    for part in (kind, entry_id, canonical_record):
        h.update(b"\n")
        h.update(part.encode("utf-8"))
    return h.hexdigest()


def parse_ts(value: Any, field: str = "ts") -> datetime:
    """RFC 3339 / ISO 8601 text or datetime -> aware UTC datetime (naive means UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip())
        except ValueError:
            raise LedgerError(f"{field}: not an RFC 3339 time: {value!r}") from None
    else:
        raise LedgerError(f"{field}: expected an RFC 3339 time, got {type(value).__name__}")
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def check_kind(kind: Any) -> str:
    if not isinstance(kind, str) or not _KIND_RE.match(kind):
        raise LedgerError(f"kind: must be a short lowercase name such as {', '.join(KINDS)}; got {kind!r}")
    return kind


def check_entry_id(entry_id: Any) -> str:
    if not isinstance(entry_id, str) or not entry_id or len(entry_id) > 512 or _CONTROL_RE.search(entry_id):
        raise LedgerError(
            f"id: must be a non-empty string of at most 512 characters without control characters; got {entry_id!r}"
        )
    return entry_id


Problem = tuple[int, str]  # (first bad seq, reason)


def check_chain(rows: Iterable[tuple[Any, ...]], expect_head: str | None = None, anchors: dict[int, str] | None = None
                ) -> tuple[int, str, Problem | None, int | None, Problem | None]:
    """Walk ``(seq, kind, entry_id, ts, record_text, prev_hash, hash)`` rows in order.

    ``anchors`` maps a row number to the head a signed checkpoint recorded for it.
    Returns ``(n_good, head, bad, anchored_seq, bad_anchor)``: the number of rows that
    check out, the hash of the last good row, ``(first_bad_seq, reason)`` or None, the
    seq whose hash equals ``expect_head`` (None if not seen), and ``(first_bad_seq,
    reason)`` for the first anchor the chain no longer reaches (None if all match).
    A chain that is internally consistent but misses an anchor was rewritten and its
    hashes recomputed: the rewrite started after the last anchor that still matches.
    """
    anchors = anchors or {}
    prev, n, anchored_seq, last_anchor = GENESIS, 0, None, 0
    for seq, kind, eid, ts, text, prev_hash, stored in rows:
        expected_seq = n + 1
        if seq != expected_seq:
            return n, prev, (expected_seq,
                             f"row {expected_seq} is missing (next row is seq {seq}): deleted"), anchored_seq, None
        problem = None
        if prev_hash != prev:
            problem = f"row {seq} does not link to row {seq - 1} (prev_hash mismatch): deleted, inserted or reordered"
        else:
            record, problem = read_canonical(text)
            if problem is not None:
                problem = f"row {seq}: {problem}"
            elif entry_hash(prev, kind, eid, text) != stored:
                problem = f"row {seq}: hash mismatch (record, kind or id edited)"
            elif problem is None and ts != (record.get("ts") if isinstance(record, dict) else None):
                problem = f"row {seq}: ts column {ts!r} differs from the record's ts (edited)"
        if problem:
            return n, prev, (seq, problem), anchored_seq, None
        n, prev = seq, stored
        if expect_head is not None and stored == expect_head:
            anchored_seq = seq
        signed = anchors.get(seq)
        if signed is not None:
            if signed != stored:
                first = last_anchor + 1
                return n, prev, None, anchored_seq, (
                    first, f"row {seq} no longer has the head signed in its checkpoint ({signed[:12]}…): "
                           f"rows {first}..{seq} were rewritten and re-chained (row {last_anchor} still matches its "
                           "checkpoint)"
                           if last_anchor else
                           f"row {seq} no longer has the head signed in its checkpoint ({signed[:12]}…): "
                           f"rows 1..{seq} were rewritten and re-chained")
            last_anchor = seq
    return n, prev, None, anchored_seq, None


# Where orjson writes a float differently from the standard library (exponents -5 to -9:
# "0.00001" for "1e-05", "1e-6" for "1e-06"); every other value it writes alike.
_ORJSON_OWN_FLOAT = re.compile(rb"0\.0000|e-[0-9](?![0-9])")


def read_canonical(text: Any) -> tuple[Any, str | None]:
    """(record, None) if ``text`` is the canonical JSON of the record it holds, else
    (record or None, problem).

    Fast path: orjson reads the text and writes it back with sorted keys; if that gives
    the same bytes and the text holds none of the few float forms orjson writes
    otherwise than the standard library, the standard library would too. Anything else
    (a mismatch, a value orjson refuses such as an integer beyond 64 bits) is decided by
    the standard library, the reference (``canonical_json``)."""
    if isinstance(text, str):
        raw = text.encode("utf-8", "surrogatepass")
        try:
            record = orjson.loads(raw)
            if orjson.dumps(record, option=orjson.OPT_SORT_KEYS) == raw and not (
                    b"0.0000" in raw or (b"e-" in raw and _ORJSON_OWN_FLOAT.search(raw))):
                return record, None
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):
            pass
    try:
        record = json.loads(text)
    except (TypeError, ValueError):
        return None, "stored record is not JSON (edited)"
    try:
        canonical = canonical_json(record)
    except LedgerError:  # NaN or Infinity: the standard library reads them, canonical JSON has none
        canonical = None
    if canonical != text:
        return record, "stored record is not canonical JSON (edited)"
    return record, None


def row_to_entry(row: tuple[Any, ...]) -> Entry:
    seq, kind, entry_id, ts, record, prev_hash, hash_ = row
    return Entry(seq, kind, entry_id, ts, json.loads(record), prev_hash, hash_)




def decision_scope(kind: str, record: Any) -> str:
    """The part of a row's identity beyond (kind, entry id): for a ``decision``, the
    ``policy sha256/model sha256/model name`` that decided it, so one event id holds one
    decision per (model, policy) -- a decision is identified by (event id, model, policy
    sha256). Empty for every other kind. Derived from the record (which the hash
    covers), so it is an index column, not part of the chain; schema 3's migration
    computes the same text in SQL (``migrations.scope_sql``)."""
    if kind != "decision" or not isinstance(record, dict):
        return ""

    def text(obj: Any, key: str) -> str:
        v = obj.get(key) if isinstance(obj, dict) else None
        return v if isinstance(v, str) else ""

    policy, model = record.get("policy"), record.get("model")
    return f"{text(policy, 'sha256')}/{text(model, 'sha256')}/{text(model, 'name')}"


def prepare_entries(entries: Iterable[tuple[str, dict[str, Any], str | None]]
                    ) -> list[tuple[str, str, str | None, str, str]]:
    """Validate ``(kind, record, entry_id or None)`` items before anything is written.

    Returns ``(kind, entry_id, ts, canonical_record, scope)`` tuples; raises LedgerError
    naming the item and field at the first bad one.
    """
    prepared = []
    for i, (kind, record, eid) in enumerate(entries):
        check_kind(kind)
        if not isinstance(record, dict):
            raise LedgerError(f"record[{i}]: must be a JSON object, got {type(record).__name__}")
        eid = check_entry_id(record.get("id") if eid is None else eid)
        ts = record.get("ts")
        if ts is not None:
            if not isinstance(ts, str):
                raise LedgerError(f"record[{i}].ts: must be an RFC 3339 string, got {type(ts).__name__}")
            parse_ts(ts, f"record[{i}].ts")
        prepared.append((kind, eid, ts, canonical_json(record), decision_scope(kind, record)))
    return prepared
