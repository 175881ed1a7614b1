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
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from itertools import accumulate
from typing import Any

import orjson

from riskpipe.decisions import DECISIONS

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
    # verify_ledger with public keys found no signed checkpoint at all: nothing signed vouches
    # for the rows (``ok`` False), though the chain and tree hold on their own
    unsigned: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# orjson writes datetimes, dataclasses and str/int/dict/list subclasses itself; passed through
# (no ``default``) they raise instead, and the reference decides them
_WRITE_OPTIONS = (orjson.OPT_SORT_KEYS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
                  | orjson.OPT_PASSTHROUGH_SUBCLASS)


def canonical_json(record: Any) -> str:
    """The canonical JSON text of ``record`` (docs/records.md).

    Fast path: orjson's sorted-keys bytes, kept when reading them back gives ``record``
    again (so no NaN or Infinity became ``null``, no UUID or Enum became a string or a
    number: the reference refuses those) and they hold none of :func:`_orjson_own_form`'s
    float forms; anything else is decided by the standard library, the reference."""
    try:
        raw = orjson.dumps(record, option=_WRITE_OPTIONS)
        if not _orjson_own_form(raw) and orjson.loads(raw) == record:
            return raw.decode("utf-8")
    except _ORJSON_ERRORS:
        pass
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
    try:
        return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00+23:59 is before year 1 in UTC
        raise LedgerError(f"{field}: {value!r} is out of range once in UTC (years 1 to 9999)") from None


def time_window(since: Any, until: Any) -> tuple[datetime | None, datetime | None]:
    """``[since, until)`` as UTC datetimes (None: unbounded). LedgerError if a bound is not
    a time, or ``since`` is not before ``until``: that period is empty, and a report or an
    export of it would read as "nothing happened"."""
    lo = parse_ts(since, "since") if since is not None else None
    hi = parse_ts(until, "until") if until is not None else None
    if lo is not None and hi is not None and lo >= hi:
        raise LedgerError(f"since {since} is not before until {until}: the period would be empty")
    return lo, hi


@lru_cache(maxsize=4096)
def ts_epoch(text: str) -> float:
    """``parse_ts(text).timestamp()`` for a time text, remembered: an append checks each
    record's ``ts`` and its facts row needs the same instant (LedgerError as parse_ts)."""
    return parse_ts(text).timestamp()


def check_kind(kind: Any) -> str:
    if kind.__class__ is str and kind in KINDS:  # the usual kinds: no pattern match per row
        return kind
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
UNCHECKED = object()  # a row's scope column when the caller has none (check_chain's seven-column rows)


def check_chain(rows: Iterable[tuple[Any, ...]], expect_head: str | None = None, anchors: dict[int, str] | None = None
                ) -> tuple[int, str, Problem | None, int | None, Problem | None]:
    """Walk ``(seq, kind, entry_id, ts, record_text, prev_hash, hash[, scope])`` rows in order
    (a row without its scope column has that column unchecked).

    ``anchors`` maps a row number to the head a signed checkpoint recorded for it.
    Returns ``(n_good, head, bad, anchored_seq, bad_anchor)``: the number of rows that
    check out, the hash of the last good row, ``(first_bad_seq, reason)`` or None, the
    seq whose hash equals ``expect_head`` (None if not seen), and ``(first_bad_seq,
    reason)`` for the first anchor the chain no longer reaches (None if all match).
    A chain that is internally consistent but misses an anchor was rewritten and its
    hashes recomputed: the rewrite started after the last anchor that still matches.
    """
    walk = ChainWalk(expect_head, anchors)
    batch: list[tuple[Any, ...]] = []
    for row in rows:
        batch.append(row if len(row) > 7 else (*row, UNCHECKED))
        if len(batch) == 5000:
            walk.feed(batch)
            batch = []
            if walk.stopped:
                break
    if batch and not walk.stopped:
        walk.feed(batch)
    return walk.n, walk.prev, walk.bad, walk.anchored_seq, walk.bad_anchor


class ChainWalk:
    """:func:`check_chain` batch by batch (``verify`` feeds it the rows as the driver
    fetches them). ``feed`` returns the RFC 9162 leaf hashes of the batch's rows that
    check out, in order, for the Merkle tree check: each row's bytes are read once for
    both hashes. The record text may come as ``str`` or as its UTF-8 ``bytes``."""

    def __init__(self, expect_head: str | None = None, anchors: dict[int, str] | None = None) -> None:
        self.expect_head, self.anchors = expect_head, anchors or {}
        self.prev, self.n, self.anchored_seq, self.last_anchor = GENESIS, 0, None, 0
        self.bad: Problem | None = None
        self.bad_anchor: Problem | None = None

    @property
    def stopped(self) -> bool:
        return self.bad is not None or self.bad_anchor is not None

    def feed(self, rows: Iterable[tuple[Any, ...]]) -> list[bytes]:
        leaves: list[bytes] = []
        if self.stopped:
            return leaves
        rows = rows if isinstance(rows, list) else list(rows)
        own_forms = _own_form_seqs(rows)
        sha256, loads, dumps, sort_keys = hashlib.sha256, orjson.loads, orjson.dumps, orjson.OPT_SORT_KEYS
        decode_errors = _ORJSON_ERRORS
        prev, n, anchors, expect_head, keep = self.prev, self.n, self.anchors, self.expect_head, leaves.append
        for seq, kind, eid, ts, text, prev_hash, stored, scope in rows:
            if seq != n + 1:
                self.bad = (n + 1, f"row {n + 1} is missing (next row is seq {seq}): deleted")
                break
            if prev_hash != prev:
                self.bad = (seq, f"row {seq} does not link to row {seq - 1} (prev_hash mismatch): "
                                 "deleted, inserted or reordered")
                break
            raw = text if text.__class__ is bytes else text.encode("utf-8", "surrogatepass")
            try:  # the fast canonical check of read_canonical, inline: the reference decides anything else
                record = loads(raw)
                fast = dumps(record, option=sort_keys) == raw and seq not in own_forms
            except decode_errors:
                fast = False
            if not fast:
                record, problem = read_canonical(text)
                if problem is not None:
                    self.bad = (seq, f"row {seq}: {problem}")
                    break
            head = f"{kind}\n{eid}\n".encode()  # leaf bytes = head + raw; the chain hashes them after prev_hash
            if sha256(b"".join((prev.encode(), b"\n", head, raw))).hexdigest() != stored:
                self.bad = (seq, f"row {seq}: hash mismatch (record, kind or id edited)")
                break
            if ts != (record.get("ts") if record.__class__ is dict else None):
                self.bad = (seq, f"row {seq}: ts column {ts!r} differs from the record's ts (edited)")
                break
            if scope is not UNCHECKED and scope != decision_scope(kind, record) and (scope or kind != "decision"):
                # verdicts are joined on it; an empty one on a decision is a row of an older
                # riskpipe that wrote no scope (it covers that decision only by a legacy verdict)
                self.bad = (seq, f"row {seq}: scope column {scope!r} differs from the record's model and policy "
                                 "(edited: it decides which decision a verdict covers)")
                break
            keep(sha256(b"".join((b"\x00", head, raw))).digest())
            n, prev = seq, stored
            if expect_head is not None and stored == expect_head:
                self.anchored_seq = seq
            signed = anchors.get(seq) if anchors else None
            if signed is not None:
                if signed != stored:
                    first = self.last_anchor + 1
                    self.bad_anchor = (
                        first, f"row {seq} no longer has the head signed in its checkpoint ({signed[:12]}…): "
                               f"rows {first}..{seq} were rewritten and re-chained (row {self.last_anchor} still "
                               "matches its checkpoint)" if self.last_anchor else
                               f"row {seq} no longer has the head signed in its checkpoint ({signed[:12]}…): "
                               f"rows 1..{seq} were rewritten and re-chained")
                    break
                self.last_anchor = seq
        self.prev, self.n = prev, n
        return leaves


# Where orjson writes a float differently from the standard library (exponents -5 to -9:
# "0.00001" for "1e-05", "1e-6" for "1e-06"); every other value it writes alike. A number
# ``0.0000...`` is one not preceded by a digit or a point (so times such as
# "12:00:10.000000Z" in strings do not count); a one-digit negative exponent is ``e-N``.
_ORJSON_ZEROS = re.compile(rb"0\.0000(?<![0-9.]0\.0000)")
_ORJSON_SHORT_EXPONENT = re.compile(rb"e-[0-9](?![0-9])")
_ORJSON_ERRORS = (orjson.JSONDecodeError, orjson.JSONEncodeError)
_NONE: frozenset[int] = frozenset()


def _orjson_own_form(raw: bytes) -> bool:
    """Whether ``raw`` may hold a float in one of those forms."""
    return _ORJSON_ZEROS.search(raw) is not None or _ORJSON_SHORT_EXPONENT.search(raw) is not None


def _own_form_seqs(rows: list[tuple[Any, ...]]) -> frozenset[int] | set[int]:
    """The seqs of the ``(seq, kind, entry_id, ts, record_text, ...)`` rows whose text may
    hold one of orjson's own float forms (:func:`_orjson_own_form`, the same matches).

    Both expressions run once over the batch's texts joined by newlines rather than once
    per text (~0.8 us a ~2 KB record less: the per-call cost, not the scan, was half of
    it). Neither matches a newline, and one bounds a text as its start or end does (it is
    not a digit or a point), so a match lies inside one text and names it."""
    texts = [row[4] for row in rows]
    try:
        joined = b"\n".join(texts)
    except TypeError:  # str texts (check_chain's callers): their UTF-8, as the walk reads them
        texts = [t.encode("utf-8", "surrogatepass") if isinstance(t, str) else t if isinstance(t, bytes) else b""
                 for t in texts]  # anything else fails in the walk, as it always did
        joined = b"\n".join(texts)
    at = [m.start() for m in _ORJSON_ZEROS.finditer(joined)] + [m.start() for m in
                                                               _ORJSON_SHORT_EXPONENT.finditer(joined)]
    if not at:
        return _NONE
    ends = list(accumulate(len(t) + 1 for t in texts))  # where the text after each one starts
    return {rows[bisect_right(ends, i)][0] for i in at}


def read_canonical(text: Any) -> tuple[Any, str | None]:
    """(record, None) if ``text`` (``str``, or its UTF-8 ``bytes``) is the canonical JSON
    of the record it holds, else (record or None, problem).

    Fast path: orjson reads the text and writes it back with sorted keys; if that gives
    the same bytes and the text holds none of the few float forms orjson writes
    otherwise than the standard library, the standard library would too. Anything else
    (a mismatch, a value orjson refuses such as an integer beyond 64 bits) is decided by
    the standard library, the reference (``canonical_json``)."""
    if isinstance(text, (str, bytes)):
        raw = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
        try:
            record = orjson.loads(raw)
            if orjson.dumps(record, option=orjson.OPT_SORT_KEYS) == raw and not _orjson_own_form(raw):
                return record, None
        except _ORJSON_ERRORS:
            pass
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError:
            return None, "stored record is not JSON (edited)"
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


# kinds whose rows are about one decision: a review of it carries the decision's model and
# policy, so each decision of an event id has its own review (riskpipe.review.queue)
REVIEW_KINDS = ("verdict", "first_review", "second_review")


def decision_scope(kind: str, record: Any) -> str:
    """The part of a row's identity beyond (kind, entry id): for a ``decision``, the
    ``policy sha256/model sha256/model name`` that decided it, so one event id holds one
    decision per (model, policy) -- a decision is identified by (event id, model, policy
    sha256). A review (``REVIEW_KINDS``) that names its decision's ``model`` takes that
    decision's scope, so one event id holds one verdict per decision, and a verdict on
    one model's or policy's decision is never read as a verdict on another's. Empty for
    every other kind, and for a review written before reviews named their decision (it
    covers every decision of its id). Derived from the record (which the hash covers),
    so it is an index column, not part of the chain; schema 3's migration computes the
    same text in SQL (``migrations.scope_sql``), for decisions (no review named its
    decision then)."""
    if not isinstance(record, dict) or not (
            kind == "decision" or (kind in REVIEW_KINDS and isinstance(record.get("model"), dict))):
        return ""
    policy, model = record.get("policy"), record.get("model")
    return f"{_text_of(policy, 'sha256')}/{_text_of(model, 'sha256')}/{_text_of(model, 'name')}"


def _text_of(obj: Any, key: str) -> str:
    v = obj.get(key) if isinstance(obj, dict) else None
    return v if isinstance(v, str) else ""


def _check_decision(i: int, record: dict[str, Any]) -> None:
    """LedgerError for a ``decision`` row the stage never writes and its readers would
    misread: a decision none of allow, review or block (counted under none of them, so
    a report's totals fell short of its rows without a word), or a review priority or
    deadline the review console cannot order by (the item was left out of the queue,
    its backlog and the backlog metric: a routed decision nobody saw). A record without
    a ``decision`` member stays a plain row (the generic ``append``); ``ledger ingest``
    requires one of an audit record."""
    if "decision" in record and record["decision"] not in DECISIONS:
        raise LedgerError(f"record[{i}].decision: must be one of {', '.join(DECISIONS)}, "
                          f"got {str(record.get('decision'))[:40]!r}")
    review = record.get("review")
    if review is None:
        return
    if not isinstance(review, dict):
        raise LedgerError(f"record[{i}].review: must be an object, got {type(review).__name__}")
    prio, deadline = review.get("priority"), review.get("deadline")
    if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int)):
        raise LedgerError(f"record[{i}].review.priority: must be an integer or null, got {str(prio)[:40]!r}")
    if deadline is not None:
        try:
            ts_epoch(deadline if isinstance(deadline, str) else "")
        except LedgerError:
            raise LedgerError(f"record[{i}].review.deadline: not an RFC 3339 time: {str(deadline)[:40]!r}") from None


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
        if kind == "decision":
            _check_decision(i, record)
        ts = record.get("ts")
        if ts is not None:
            if not isinstance(ts, str):
                raise LedgerError(f"record[{i}].ts: must be an RFC 3339 string, got {type(ts).__name__}")
            try:
                ts_epoch(ts)  # the facts row reads the same time (cached)
            except LedgerError:
                raise LedgerError(f"record[{i}].ts: not an RFC 3339 time: {ts!r}") from None
        prepared.append((kind, eid, ts, canonical_json(record), decision_scope(kind, record)))
    return prepared
