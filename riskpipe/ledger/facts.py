"""The ``facts`` table: what the report and the review queue group, filter and sort by,
one row per decision and dead letter, written in the same transaction as its ledger row.

Why: the compliance report and the review queue used to parse every record in Python,
so their cost grew with the ledger (31 s for a report at 100,000 rows). With these
columns they are SQL aggregates and indexed lookups on either backend; only the records
they show (review items, examples, verdicts) are read whole.

The table is derived data: every column is a pure function of the record
(:func:`facts_of`) and the rows are append-only like ``entries`` (triggers, which stop
accidents, not someone with write access to the database). The hash chain, not this
table, is the evidence: ``riskpipe ledger verify`` checks the chain; the report states
that its figures are read from this table, and checks that it holds one row per
decision and dead letter in the ledger (a deleted or added row shows); an edited facts
row is not detected short of recomputing it from the record.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from riskpipe.ledger.chain import LedgerError, parse_ts
from riskpipe.ledger.conn import Db, Row
from riskpipe.policy.naming import policy_label

KINDS = ("decision", "dlq")
NO_PRIORITY = 2**62  # sorts after every priority a record can carry (in the ``priority`` column)
NO_DEADLINE = 1e300  # sorts after every deadline (in the ``due`` column; ``deadline`` stays NULL)

# (column, SQL type) in insert order; "REAL" is a double on both backends once mapped.
COLUMNS: tuple[tuple[str, str], ...] = (
    ("seq", "INT"), ("kind", "TEXT"), ("entry_id", "TEXT"),
    ("t", "REAL"), ("hour", "TEXT"), ("day", "TEXT"),
    ("decision", "TEXT"), ("model", "TEXT"), ("model_sha", "TEXT"), ("model_label", "TEXT"),
    ("policy", "TEXT"), ("policy_version", "TEXT"), ("policy_sha", "TEXT"), ("policy_shadow", "INTEGER"),
    ("policy_label", "TEXT"),
    ("method", "TEXT"), ("mode", "TEXT"), ("norm", "TEXT"), ("sigma", "REAL"), ("alpha", "REAL"),
    ("threat_norm", "TEXT"), ("threat_eps", "REAL"), ("radius_threat", "REAL"),
    ("abstained", "INTEGER"), ("not_certified", "INTEGER"),
    ("routed", "INTEGER"), ("audit", "INTEGER"), ("needs_review", "INTEGER"), ("review_ok", "INTEGER"),
    ("priority", "BIG"), ("priority_label", "TEXT"), ("deadline", "REAL"), ("due", "REAL"),
    ("rule", "TEXT"), ("worker", "TEXT"), ("has_input", "INTEGER"), ("scope_key", "TEXT"),
    ("reasons", "TEXT"), ("controls", "TEXT"), ("dlq_reason", "TEXT"), ("dlq_source", "TEXT"),
)
NAMES = tuple(c for c, _ in COLUMNS)
_INSERT = f"INSERT INTO facts ({', '.join(NAMES)}) VALUES ({','.join('?' * len(NAMES))})"


def table_statements(int_type: str, real_type: str) -> list[str]:
    """The table and the indexes the report and the queue read through."""
    types = {"INT": f"{int_type} PRIMARY KEY", "BIG": int_type, "REAL": real_type, "INTEGER": "INTEGER", "TEXT": "TEXT"}
    cols = ",\n            ".join(f"{c} {types[t]}" for c, t in COLUMNS)
    return [
        f"CREATE TABLE facts (\n            {cols})",
        "CREATE INDEX facts_kind_t ON facts (kind, t)",
        "CREATE INDEX facts_entry_id ON facts (entry_id)",
        # the queue's order (priority 1 first, no priority last, then deadline, none last, then arrival)
        "CREATE INDEX facts_queue ON facts (needs_review, review_ok, priority, due, seq)",
        "CREATE INDEX facts_radius ON facts (threat_norm, threat_eps, radius_threat)",
    ]


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _text(v: Any) -> str | None:
    return v if isinstance(v, str) else None


def _epoch(v: Any) -> float | None:
    try:
        return parse_ts(v).timestamp() if v is not None else None
    except LedgerError:
        return None


def _bool(v: Any) -> int:
    return 1 if v is True else 0


def _deadline(review: Any) -> tuple[float | None, int]:
    """(deadline as epoch seconds or None, whether the console can show the item: the
    checks of ``riskpipe.review.queue.check_decision_record``)."""
    if not isinstance(review, dict):
        return None, 0
    t = _epoch(review.get("deadline"))
    prio = review.get("priority")
    ok = (prio is None or (isinstance(prio, int) and not isinstance(prio, bool))) and (
        review.get("deadline") is None or t is not None)
    return t, int(ok)


def facts_of(seq: int, kind: str, entry_id: str, record: dict[str, Any]) -> Row | None:
    """The facts row of one ledger row (None for kinds the report reads whole)."""
    if kind not in KINDS:
        return None

    t = _epoch(record.get("ts"))
    when = datetime.fromtimestamp(t, timezone.utc) if t is not None else None
    row = dict.fromkeys(NAMES)
    row.update(seq=seq, kind=kind, entry_id=entry_id, t=t,
               hour=when.strftime("%Y-%m-%dT%H:00Z") if when else None, day=when.strftime("%Y-%m-%d") if when else None)
    if kind == "dlq":
        row.update(dlq_reason=str(record.get("reason")),
                   dlq_source=str(_get(record, "source", "topic") or _get(record, "source", "file")))
        return tuple(row[c] for c in NAMES)
    cert, review, model, policy = (record.get(k) for k in ("certificate", "review", "model", "policy"))
    abstained = _get(cert, "abstained") is True
    prio = _get(review, "priority")
    deadline, review_ok = _deadline(review)
    inp = record.get("input")
    scope = record.get("scope")
    row.update(
        decision=_text(record.get("decision")),
        model=_text(_get(model, "name")), model_sha=_text(_get(model, "sha256")),
        model_label=str(model.get("name") if isinstance(model, dict) else model),
        policy=_text(_get(policy, "name")), policy_version=str(_get(policy, "version")),
        policy_sha=_text(_get(policy, "sha256")),
        policy_shadow=None if not isinstance(_get(policy, "shadow"), bool) else int(_get(policy, "shadow")),
        policy_label=policy_label(policy),
        method=_text(_get(cert, "method")), mode=_text(_get(cert, "mode")), norm=_text(_get(cert, "norm")),
        sigma=_num(_get(cert, "sigma")), alpha=_num(_get(cert, "alpha")),
        threat_norm=_text(_get(cert, "threat_norm")), threat_eps=_num(_get(cert, "threat_epsilon")),
        radius_threat=_num(_get(cert, "radius_threat")),
        abstained=int(abstained), not_certified=int(abstained or _get(cert, "certified") is False),
        routed=_bool(_get(review, "routed")), audit=_bool(_get(review, "audit_sample")),
        needs_review=int(isinstance(review, dict) and bool(review.get("routed") or review.get("audit_sample"))),
        review_ok=review_ok, priority=_priority_key(prio) if review_ok else NO_PRIORITY,
        priority_label=str(prio), deadline=deadline, due=NO_DEADLINE if deadline is None else deadline,
        rule=str(record.get("rule")), worker=str(record.get("worker")),
        has_input=int(isinstance(inp, dict) and (inp.get("data") is not None or isinstance(inp.get("tensor"), dict))),
        scope_key=hashlib.sha256(str(scope).encode("utf-8", "surrogatepass")).hexdigest()[:16] if scope else None,
        reasons=_list_text(record.get("reasons")), controls=_list_text(record.get("controls")),
    )
    return tuple(row[c] for c in NAMES)


def _priority_key(prio: Any) -> int:
    """The queue's sort key: the priority (clamped into 64 bits), NO_PRIORITY when none."""
    if prio is None or isinstance(prio, bool) or not isinstance(prio, int):
        return NO_PRIORITY
    return max(-NO_PRIORITY, min(NO_PRIORITY - 1, prio))


def _list_text(v: Any) -> str:
    """A list field as canonical JSON text (``[]`` when absent), grouped on in SQL and
    expanded in Python: the distinct combinations are few."""
    return json.dumps(list(v) if isinstance(v, (list, tuple)) else [], sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False, default=str)


def insert(db: Db, rows: list[tuple[int, str, str, dict[str, Any]]]) -> None:
    """Insert the facts of ``(seq, kind, entry_id, record)`` rows (inside the append)."""
    facts = [f for f in (facts_of(*r) for r in rows) if f is not None]
    if facts:
        db.executemany(_INSERT, facts)


def build_existing(db: Db) -> None:
    """Migration step: the facts of the rows an older ledger already holds."""
    last = 0
    while True:  # pages by seq: bounded memory on a large ledger
        rows = db.execute("SELECT seq, kind, entry_id, record FROM entries WHERE seq > ? AND kind IN ('decision', 'dlq') "
                          "ORDER BY seq LIMIT 5000", (last,)).fetchall()
        if not rows:
            return
        insert(db, [(seq, kind, eid, json.loads(text)) for seq, kind, eid, text in rows])
        last = rows[-1][0]
