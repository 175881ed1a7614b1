"""The review queue and verdicts, both kept in the ledger.

A full decision record (docs/records.md) is in the queue when the policy routed it to
review or drew it as an audit sample, and no ``verdict`` entry exists for its id.
Verdicts are ledger entries of kind ``verdict`` whose entry id is the event id, so the
ledger itself refuses a second verdict for the same event.
"""

from __future__ import annotations

import json
import math
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from riskpipe.ledger import Ledger, LedgerError, parse_ts

VERDICTS = {
    "confirmed_clean": "Confirmed clean",
    "confirmed_manipulated": "Confirmed manipulated",
    "unsure": "Unsure",
}
MAX_NOTE = 2000
_FAR_FUTURE = datetime.max.replace(tzinfo=timezone.utc)


class ReviewError(ValueError):
    """A verdict or record the console cannot accept (message names field and reason)."""


class AlreadyReviewed(ReviewError):
    def __init__(self, event_id: str, existing: dict):
        self.existing = existing
        super().__init__(
            f"{event_id}: a verdict already exists ({existing.get('verdict')} by {existing.get('reviewer')} "
            f"at {existing.get('ts')}); verdicts are final"
        )


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def rfc3339(dt: datetime) -> str:
    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def needs_review(record: Any) -> bool:
    """Routed to review or drawn as an audit sample."""
    review = record.get("review") if isinstance(record, dict) else None
    return isinstance(review, dict) and bool(review.get("routed") or review.get("audit_sample"))


def check_decision_record(record: Any) -> dict:
    """The fields the console relies on; anything else is shown as it comes."""
    if not isinstance(record, dict):
        raise ReviewError(f"record: must be a JSON object, got {type(record).__name__}")
    if not isinstance(record.get("id"), str) or not record["id"]:
        raise ReviewError("id: missing or not a non-empty string")
    review = record.get("review")
    if not isinstance(review, dict):
        raise ReviewError(f"{record['id']}: review: missing or not an object")
    prio = review.get("priority")
    if prio is not None and (isinstance(prio, bool) or not isinstance(prio, int)):
        raise ReviewError(f"{record['id']}: review.priority: must be an integer, got {prio!r}")
    if review.get("deadline") is not None:
        try:
            parse_ts(review["deadline"], "review.deadline")
        except LedgerError as e:
            raise ReviewError(f"{record['id']}: {e}") from None
    return record


@dataclass(frozen=True)
class QueueItem:
    """One record waiting for a human, with the fields the queue page sorts and shows."""

    record: dict
    seq: int

    @property
    def id(self) -> str:
        return self.record["id"]

    @property
    def review(self) -> dict:
        return self.record.get("review") or {}

    @property
    def priority(self) -> int | None:
        return self.review.get("priority")

    @property
    def deadline(self) -> datetime | None:
        d = self.review.get("deadline")
        return parse_ts(d) if d else None

    def overdue(self, now: datetime) -> bool:
        return self.deadline is not None and now > self.deadline

    def sort_key(self) -> tuple:
        prio = self.priority if self.priority is not None else math.inf
        return (prio, self.deadline or _FAR_FUTURE, self.seq)


# Routed or audit-sampled decisions without a verdict, filtered inside SQLite so a ledger of
# many allowed decisions is not parsed row by row in Python. Reads the ledger's documented
# ``entries`` table (riskpipe/ledger.py); ``pending`` falls back to the Ledger API if it changes.
_PENDING_SQL = """
SELECT d.seq, d.record FROM entries AS d
WHERE d.kind = 'decision'
  AND (json_extract(d.record, '$.review.routed') = 1 OR json_extract(d.record, '$.review.audit_sample') = 1)
  AND NOT EXISTS (SELECT 1 FROM entries AS v WHERE v.kind = 'verdict' AND v.entry_id = d.entry_id)
"""


def _pending_rows(ledger: Ledger) -> list[tuple[int, dict]]:
    if ledger.backend != "sqlite":
        return _pending_rows_api(ledger)
    try:
        uri = f"file:{ledger.path.resolve()}?mode=ro"
        with closing(sqlite3.connect(uri, uri=True, timeout=30)) as db:
            return [(seq, json.loads(text)) for seq, text in db.execute(_PENDING_SQL)]
    except sqlite3.Error:
        return _pending_rows_api(ledger)


def _pending_rows_api(ledger: Ledger) -> list[tuple[int, dict]]:
    """The same rows through the Ledger API (parses every decision: slower)."""
    reviewed = {e.entry_id for e in ledger.records(kind="verdict")}
    return [(e.seq, e.record) for e in ledger.records(kind="decision")
            if e.entry_id not in reviewed and needs_review(e.record)]


def pending(ledger: Ledger, scope=None) -> list[QueueItem]:
    """Records waiting for a verdict: priority 1 first, then the earliest deadline; with a
    ``scope`` (riskpipe.review.scope) only the stage's own (``outside`` counts the rest)."""
    return pending_split(ledger, scope)[0]


def pending_split(ledger: Ledger, scope=None) -> tuple[list[QueueItem], int]:
    """(this stage's waiting items, how many waiting records belong to other stages)."""
    items, outside = [], 0
    for seq, record in _pending_rows(ledger):
        try:
            check_decision_record(record)
        except ReviewError:
            continue  # shown on its own page with the reason; never breaks the queue
        if scope is not None and scope.refuses(record) is not None:
            outside += 1
            continue
        items.append(QueueItem(record, seq))
    return sorted(items, key=QueueItem.sort_key), outside


def make_verdict(decision: dict, verdict: str, note: str, reviewer: str, when: datetime) -> dict:
    """The verdict record of docs/records.md for ``decision``."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict: must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise ReviewError(f"note: at most {MAX_NOTE} characters, got {len(note)}")
    if not reviewer:
        raise ReviewError("reviewer: missing")
    policy = decision.get("policy") if isinstance(decision.get("policy"), dict) else {}
    return {
        "id": decision["id"],
        "verdict": verdict,
        "note": note,
        "reviewer": reviewer,
        "ts": rfc3339(when),
        "decision_ts": decision.get("ts"),
        "decision": decision.get("decision"),
        "policy_version": policy.get("version"),
    }


def record_verdict(ledger: Ledger, event_id: str, verdict: str, note: str, reviewer: str,
                   when: datetime | None = None) -> dict:
    """Append the verdict to the ledger; AlreadyReviewed when the event has one."""
    decision = ledger.get(event_id, kind="decision")
    if decision is None:
        raise ReviewError(f"{event_id}: no decision record with this id in the ledger")
    record = make_verdict(decision, verdict, note, reviewer, when or now_utc())
    if not ledger.append(record, kind="verdict", entry_id=event_id):
        raise AlreadyReviewed(event_id, ledger.get(event_id, kind="verdict") or {})
    return record


def seconds_to_review(verdict: dict) -> float | None:
    """Decision time to verdict time, in seconds (None when the decision has no time)."""
    if not verdict.get("decision_ts"):
        return None
    return (parse_ts(verdict["ts"]) - parse_ts(verdict["decision_ts"])).total_seconds()
