"""The review queue and verdicts, both kept in the ledger.

A full decision record (docs/records.md) is in the queue when the policy routed it to
review or drew it as an audit sample, and no verdict on it exists. Verdicts are ledger
entries of kind ``verdict`` whose entry id is the event id and whose record names the
decision's model and policy, so their scope (``riskpipe.ledger.chain.decision_scope``)
is the decision's: the ledger itself refuses a second verdict on the same decision, and
when several stages (models, policies) decided one event, a verdict on one stage's
decision leaves the others waiting. A verdict written before verdicts named their
decision has an empty scope and covers every decision of its id.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from riskpipe.ledger import Ledger, LedgerError, parse_ts
from riskpipe.ledger.chain import Entry, decision_scope
from riskpipe.policy.naming import model_name, policy_label
from riskpipe.timestamps import from_epoch, rfc3339_millis, utc_now

VERDICTS = {
    "confirmed_clean": "Confirmed clean",
    "confirmed_manipulated": "Confirmed manipulated",
    "unsure": "Unsure",
}
MAX_NOTE = 2000
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)


class ReviewError(ValueError):
    """A verdict or record the console cannot accept (message names field and reason)."""


class NeedsAnotherReviewer(ReviewError):
    """The verdict cannot be final on this reviewer's word (four eyes, double review): 409."""


class AlreadyReviewed(ReviewError):
    def __init__(self, event_id: str, existing: dict):
        self.existing = existing
        super().__init__(
            f"{event_id}: a verdict already exists ({existing.get('verdict')} by {existing.get('reviewer')} "
            f"at {existing.get('ts')}); verdicts are final"
        )


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
    # what the queue groups, filters and shows by: a list or a number there broke the feed's
    # scope check (unhashable) or every queue page (a filter over the models), not one item
    model, policy = record.get("model"), record.get("policy")
    if not (isinstance(model, str) or (isinstance(model, dict) and isinstance(model.get("name"), str))):
        raise ReviewError(f"{record['id']}: model: must be a name or an object with a string name")
    if policy is not None and not isinstance(policy, dict):
        raise ReviewError(f"{record['id']}: policy: must be an object")
    for where, obj in (("model", model), ("policy", policy)):
        if isinstance(obj, dict):
            for key in ("name", "version", "sha256"):
                if obj.get(key) is not None and not isinstance(obj[key], str):
                    raise ReviewError(f"{record['id']}: {where}.{key}: must be a string, got {type(obj[key]).__name__}")
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
    cursor: str | None = None  # where the next page starts after this item (``pending(after=...)``)
    # reviews given that are not final yet: 1 when it awaits a second reviewer (a four-eyes
    # override, a double-review sample), 2 when a third (a sample's two reviews disagree)
    reviews: int = 0

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


PAGE_SIZE = 50  # items per queue page unless asked otherwise
MAX_PAGE_SIZE = 200  # at most this many: a page stays small (about 0.5 KB of HTML per item)


@dataclass(frozen=True)
class QueueFilter:
    """Which waiting items to show: a model name, a policy name, a reason code (any may be None)."""

    model: str | None = None
    policy: str | None = None
    reason: str | None = None

    def admits(self, group: dict) -> bool:
        """Whether the items of a facts group (``fact_groups``: model, policy, the JSON
        list of reason codes) pass the filter; a reason matches whole codes only."""
        return ((not self.model or group["model"] == self.model)
                and (not self.policy or group["policy"] == self.policy)
                and (not self.reason or self.reason in json.loads(group["reasons"] or "[]")))


# The queue is read through the ledger's facts tables (riskpipe.ledger.facts): an item is a
# decision that was routed or audit-sampled and that the console can show (needs_review = 1
# AND review_ok = 1: columns of its group), without a verdict. Filters and the stage scope are
# decided on the groups (fact_groups, a few rows); a page reads its own rows through an index
# in queue order -- facts_queue for the whole queue, facts_queue_group group by group when a
# filter or a scope narrows it -- and counts come from the hourly counts (fact_counts), less
# the items with a verdict (read from the verdicts' side).
# A verdict covers the decision whose scope it carries, or (an older, unscoped one) every
# decision of its id; the decision's scope is read from its own row (f.seq), only for the
# ids that have a verdict.
def _covers(alias: str) -> str:
    """SQL: the review row ``alias`` (a verdict, first or second review) covers the decision ``f``."""
    return f"{alias}.scope IN ('', (SELECT d.scope FROM entries d WHERE d.seq = f.seq))"


VERDICT_COVERS = _covers("v")
_WAITING = ("f.needs_review = 1 AND f.review_ok = 1 AND NOT EXISTS "
            f"(SELECT 1 FROM entries v WHERE v.kind = 'verdict' AND v.entry_id = f.entry_id AND {VERDICT_COVERS})")
_ORDER = "ORDER BY f.priority, f.due, f.seq"
_AFTER = "(f.priority, f.due, f.seq) > (?, ?, ?)"
_GROUP_COLUMNS = ("gid", "model", "policy", "policy_version", "policy_sha", "reasons")


def _in_scope(scope, group: dict) -> bool:
    """A stage scope (riskpipe.review.scope.StageScope): each model under its policy (name,
    version and sha256), as ``StageScope.refuses`` decides."""
    p = scope.policies.get(group["model"]) if scope is not None else None
    return scope is None or (p is not None and (group["policy"], group["policy_version"], group["policy_sha"])
                             == (p.name, p.version, p.sha256))


def _groups(q, scope, where: QueueFilter) -> tuple[list[int], bool]:
    """(the queue's groups in ``scope`` matching ``where``, whether those narrow the queue)."""
    rows = q(f"SELECT {', '.join(_GROUP_COLUMNS)} FROM fact_groups WHERE needs_review = 1 AND review_ok = 1 "
             "ORDER BY gid")
    groups = [dict(zip(_GROUP_COLUMNS, r)) for r in rows]
    return ([g["gid"] for g in groups if _in_scope(scope, g) and where.admits(g)],
            scope is not None or where != QueueFilter())


def _marks(values: list) -> str:
    return ",".join("?" * len(values))


def _not_final() -> str:
    """SQL: the entry ``r`` is a review of the decision ``f`` that waits for another reviewer."""
    return f"r.kind IN ('{FIRST_REVIEW}', '{SECOND_REVIEW}') AND r.entry_id = f.entry_id AND {_covers('r')}"


def _reviewed_by(ledger: Ledger) -> str:
    """SQL: the decision ``f`` has a review, not final, by the reviewer ``?`` (read from
    the review's record by the backend's JSON access)."""
    return f"EXISTS (SELECT 1 FROM entries r WHERE {_not_final()} AND {ledger.text_at('reviewer', 'r.record')} = ?)"


def pending(ledger: Ledger, scope=None, where: QueueFilter = QueueFilter(), after: str | None = None,
            limit: int | None = None, reviewer: str | None = None) -> list[QueueItem]:
    """Records waiting for a verdict: priority 1 first, then the earliest deadline, then
    arrival; with a ``scope`` (riskpipe.review.scope) only the stage's own; ``where``
    filters. ``limit`` items from ``after`` (an item's ``cursor``: keyset pagination, so a
    page deep in the queue costs what the first one does); all of them without a limit.
    With a ``reviewer``, those waiting for another reviewer after this one's review are
    left out: this reviewer cannot give their verdict (a 409). (They are not counted for
    the page: that count would read every review ever given, a cost growing with the
    ledger; the page's own rows are checked through the reviews' entry-id index.)"""
    conds: list[str] = []
    params: list[Any] = []
    if after is not None:
        conds.append(_AFTER)
        params += list(parse_cursor(after))
    if reviewer is not None:
        conds.append(f"NOT {_reviewed_by(ledger)}")
        params.append(reviewer)
    page = f" LIMIT {int(limit)}" if limit is not None else ""
    with ledger.snapshot() as q:
        gids, narrowed = _groups(q, scope, where)
        if not narrowed:
            keys = q(f"SELECT f.priority, f.due, f.seq FROM facts f WHERE {' AND '.join([_WAITING, *conds])} "
                     f"{_ORDER}{page}", params)
        else:  # each group's first items through its own index range, merged
            keys = []
            for gid in gids:
                keys += q(f"SELECT f.priority, f.due, f.seq FROM facts f "
                          f"WHERE {' AND '.join([_WAITING, 'f.gid = ?', *conds])} {_ORDER}{page}", [gid, *params])
            keys = sorted(map(tuple, keys))[:limit]
        seqs = [k[2] for k in keys]
        texts: dict[int, str] = {}
        reviews: dict[int, int] = {}
        for i in range(0, len(seqs), 500):
            chunk = seqs[i:i + 500]
            texts.update(q(f"SELECT seq, record FROM entries WHERE seq IN ({_marks(chunk)})", chunk))
            reviews.update(q(f"SELECT f.seq, COUNT(DISTINCT r.kind) FROM facts f CROSS JOIN entries r "
                             f"WHERE f.seq IN ({_marks(chunk)}) AND {_not_final()} GROUP BY f.seq", chunk))
    return [QueueItem(json.loads(texts[seq]), seq, f"{prio}:{due!r}:{seq}", int(reviews.get(seq, 0)))
            for prio, due, seq in keys]


def parse_cursor(text: str) -> tuple[int, float, int]:
    """An item's cursor back into its (priority, due, seq); ReviewError when malformed."""
    try:
        prio, due, seq = text.split(":")
        position = int(prio), float(due), int(seq)
    except (AttributeError, ValueError):
        raise ReviewError(f"after: not a queue position: {text!r}") from None
    if not (-2**63 <= position[0] < 2**63 and 0 <= position[2] < 2**63):  # the columns are 64-bit integers
        raise ReviewError(f"after: not a queue position: {text!r} (a number beyond 64 bits)")
    return position


def pending_split(ledger: Ledger, scope=None) -> tuple[list[QueueItem], int]:
    """(this stage's waiting items, how many waiting records belong to other stages)."""
    return pending(ledger, scope), outside(ledger, scope)


def outside(ledger: Ledger, scope=None) -> int:
    """How many waiting records belong to other stages (0 without a scope)."""
    return backlog(ledger) - backlog(ledger, scope) if scope is not None else 0


def backlog(ledger: Ledger, scope=None, where: QueueFilter = QueueFilter()) -> int:
    """How many records wait (in ``scope``, matching ``where``): the queue groups' rows in
    the hourly counts, less those with a verdict (from the verdicts' side), so the count
    costs what the groups, hours and verdicts cost, not the waiting records."""
    with ledger.snapshot() as q:
        gids, _ = _groups(q, scope, where)
        if not gids:
            return 0
        total = q(f"SELECT COALESCE(SUM(n), 0) FROM fact_counts WHERE gid IN ({_marks(gids)})", gids)[0][0]
        # from the verdicts (few) to their decisions: CROSS JOIN fixes that order in SQLite
        done = q(f"SELECT COUNT(DISTINCT f.seq) FROM entries v CROSS JOIN facts f WHERE v.kind = 'verdict' "
                 f"AND f.entry_id = v.entry_id AND {VERDICT_COVERS} AND f.gid IN ({_marks(gids)})", gids)[0][0]
    return int(total) - done


def oldest_waiting(ledger: Ledger, scope=None) -> datetime | None:
    """Decision time of the oldest waiting record (in ``scope``); None when none waits
    (the facts index in time order, from the oldest decision until one waits)."""
    with ledger.snapshot() as q:
        gids, _ = _groups(q, scope, QueueFilter())
        if not gids:
            return None
        row = q(f"SELECT f.t FROM facts f WHERE f.kind = 'decision' AND f.t IS NOT NULL AND f.gid IN ({_marks(gids)}) "
                f"AND {_WAITING} ORDER BY f.t LIMIT 1", gids)
    return from_epoch(row[0][0]) if row else None


def overdue(ledger: Ledger, now: datetime, scope=None,
            mark: tuple[float, int] | None = None) -> tuple[list[str], tuple[float, int]]:
    """(ids of waiting records (in ``scope``) whose deadline has passed by ``now``, the mark
    for the next call). With ``mark``, the one a previous call returned, only those whose
    deadline passed since then or that were appended since (a late record may arrive
    overdue): a console that notes each breach once reads the new ones, not the backlog."""
    with ledger.snapshot() as q:
        gids, narrowed = _groups(q, scope, QueueFilter())
        new_mark = (now.timestamp(), q("SELECT COALESCE(MAX(seq), 0) FROM facts")[0][0])
        if narrowed and not gids:
            return [], new_mark
        conds, params = [_WAITING, "f.deadline < ?"], [now.timestamp()]
        if narrowed:
            conds.append(f"f.gid IN ({_marks(gids)})")
            params += gids
        where = " AND ".join(conds)
        if mark is None:
            rows = q(f"SELECT f.entry_id FROM facts f WHERE {where}", params)
        else:  # deadlines passed since the mark (their index), and rows appended since (by seq)
            rows = q(f"SELECT f.entry_id FROM facts f WHERE {where} AND f.deadline >= ? UNION ALL "
                     f"SELECT f.entry_id FROM facts f WHERE {where} AND f.seq > ?",
                     [*params, mark[0], *params, mark[1]])
    return list(dict.fromkeys(r[0] for r in rows)), new_mark


def make_verdict(decision: dict, verdict: str, note: str, reviewer: str, when: datetime) -> dict:
    """The verdict record of docs/records.md for ``decision``."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict: must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    note = (note or "").strip()
    if len(note) > MAX_NOTE:
        raise ReviewError(f"note: at most {MAX_NOTE} characters, got {len(note)}")
    if not reviewer:
        raise ReviewError("reviewer: missing")
    raw, raw_model = decision.get("policy"), decision.get("model")
    policy = raw if isinstance(raw, dict) else {}
    model = raw_model if isinstance(raw_model, dict) else {"name": raw_model}
    return {
        "id": decision["id"],
        "verdict": verdict,
        "note": note,
        "reviewer": reviewer,
        "ts": rfc3339_millis(when),
        "decision_ts": decision.get("ts"),
        "decision": decision.get("decision"),
        "policy_version": policy.get("version"),
        # which decision of the event this verdict is on (its ledger scope: decision_scope)
        "model": {"name": model.get("name"), "sha256": model.get("sha256")},
        "policy": {"name": policy.get("name"), "version": policy.get("version"), "sha256": policy.get("sha256")},
    }


def decision_of(ledger: Ledger, event_id: str, scope=None, seq: int | None = None) -> dict:
    """The decision record of ``event_id`` a verdict is given on (``decision_entry``)."""
    return decision_entry(ledger, event_id, scope, seq).record


def decision_entry(ledger: Ledger, event_id: str, scope=None, seq: int | None = None) -> Entry:
    """The decision of ``event_id`` a verdict is given on: the one at ledger position ``seq``
    (the decision the reviewer's page showed: the console's links and forms carry it), else
    with a stage ``scope`` (riskpipe.review.scope.StageScope) that stage's latest, else the
    event's only decision. ReviewError when there is none (or none at ``seq``, for this
    stage), or when several stages decided the event and neither ``seq`` nor a scope says
    whose: a verdict is never given on a decision nobody chose. Without ``seq`` a decision
    re-made after the page was shown (its model file changed) took the verdict, unseen."""
    entries = ledger.entries(event_id, kind="decision")
    if scope is not None:
        entries = [e for e in entries if scope.refuses(e.record) is None]
    if seq is not None:
        entries = [e for e in entries if e.seq == seq]
        if not entries:
            raise ReviewError(f"{event_id}: no decision of this event at ledger position {seq}"
                              + (" for this stage" if scope is not None else ""))
        return entries[0]
    if not entries:
        raise ReviewError(f"{event_id}: no decision record with this id in the ledger"
                          + (" for this stage" if scope is not None else ""))
    decisions = [e.record for e in entries]
    stages = len({decision_scope("decision", d) for d in decisions}) if scope is None else 1
    if stages > 1:
        which = "; ".join(f"model {model_name(d)!r} under policy {policy_label(d.get('policy'))}"
                          for d in decisions[:5])
        raise ReviewError(f"{event_id}: decided by {stages} stages ({which}); review it in the "
                          "console of its stage (riskpipe review --config), which picks that stage's decision")
    return entries[-1]


def review_of(ledger: Ledger, decision: dict, kind: str = "verdict") -> dict | None:
    """The ``verdict`` (or ``first_review``) on ``decision``: one naming that decision, or an
    older one that names none (it covers every decision of its id); None when there is none."""
    mine = decision_scope("decision", decision)
    found = [r for r in ledger.get_all(str(decision.get("id")), kind=kind) if decision_scope(kind, r) in ("", mine)]
    return found[-1] if found else None


def _append_final(ledger: Ledger, record: dict, decision: dict) -> dict:
    """Append a final verdict on ``decision``; AlreadyReviewed when it has one."""
    existing = review_of(ledger, decision)
    if existing is not None or not ledger.append(record, kind=VERDICT, entry_id=record["id"]):
        raise AlreadyReviewed(record["id"], existing or review_of(ledger, decision) or {})
    return record


def record_verdict(ledger: Ledger, event_id: str, verdict: str, note: str, reviewer: str,
                   when: datetime | None = None, scope=None) -> dict:
    """Append the verdict on the event's decision (``decision_of``, in ``scope``) to the
    ledger; AlreadyReviewed when that decision has one."""
    decision = decision_of(ledger, event_id, scope)
    return _append_final(ledger, make_verdict(decision, verdict, note, reviewer, when or utc_now()), decision)


# a verdict overrides a decision when it contradicts it; "review" decisions hand the call to the reviewer
OVERRIDES = frozenset({("allow", "confirmed_manipulated"), ("block", "confirmed_clean")})
FIRST_REVIEW = "first_review"  # ledger kind: the first of two reviews (a four-eyes override, or a double-review sample)
# ledger kind: a double-review sample's second review that disagrees with the first on a four-eyes
# override; a third reviewer, seeing both, gives the final verdict
SECOND_REVIEW = "second_review"
VERDICT = "verdict"  # ledger kind: a final verdict


def in_double_review_sample(event_id: str, fraction: float) -> bool:
    """Deterministic draw keyed on the event id (every console replica agrees)."""
    return fraction > 0 and int(hashlib.sha256(event_id.encode("utf-8")).hexdigest()[:8], 16) < fraction * 2**32


def four_eyes(decision: dict, verdict: str, second_reviewer_for: tuple[str, ...] = ()) -> bool:
    """Does ``verdict`` override a decision that ``review.require_second_reviewer_for`` names?"""
    return (decision.get("decision"), verdict) in OVERRIDES and decision.get("decision") in second_reviewer_for


def two_reviews(decision: dict, verdict: str, second_reviewer_for: tuple[str, ...] = (),
                double_review_fraction: float = 0.0) -> str | None:
    """Why this verdict needs a second reviewer: ``sample`` (the item is in the double-review
    sample, ``review.double_review_fraction``), ``four_eyes`` (it overrides a decision in
    ``review.require_second_reviewer_for``), or None.

    The sample comes first: its draw is keyed on the event id alone, so the label the second
    reviewer's page shows says nothing about the first verdict. Labelled ``four_eyes`` when
    the first verdict was an override, a sampled item told the second reviewer that verdict
    (the page shows a four-eyes first review, to be confirmed), and the pair was not blind."""
    if needs_review(decision) and in_double_review_sample(str(decision.get("id")), double_review_fraction):
        return "sample"
    if four_eyes(decision, verdict, second_reviewer_for):
        return "four_eyes"
    return None


def record_review(ledger: Ledger, event_id: str, verdict: str, note: str, reviewer: str,
                  second_reviewer_for: tuple[str, ...] = (), double_review_fraction: float = 0.0,
                  when: datetime | None = None, scope=None, seq: int | None = None) -> tuple[dict, str]:
    """``(record, kind)`` for the event's decision (``decision_of``, in ``scope``, the one at
    ``seq`` when given: the decision the reviewer saw); ``kind`` is the ledger kind written:
    ``verdict`` (final), ``FIRST_REVIEW`` or ``SECOND_REVIEW`` (waiting for another reviewer).

    Without a first review in the ledger, a verdict that needs two reviews
    (:func:`two_reviews`) is recorded as a ``first_review`` entry, not final; any other is
    final at once. With one, this is another reviewer's verdict, final, carrying
    ``first_reviewer``, ``first_verdict`` and ``double_review`` (why there were two), except
    where the two disagree on a four-eyes override:

    * a ``four_eyes`` first review (shown to the second reviewer): an override the first
      review does not give is refused, so the decision stands unless two give it;
    * a double-review ``sample`` (blind): refusing would tell the second reviewer the first
      verdict and let them change theirs, which biased the sample's agreement. Their verdict
      is recorded as a ``second_review`` and a third reviewer, who sees both, gives the
      final verdict (carrying ``second_reviewer`` and ``second_verdict`` too); an override
      is final only when one of the two gave it as well.

    The reviewers of one item are distinct people (``NeedsAnotherReviewer``)."""
    decision = decision_of(ledger, event_id, scope, seq)
    record = make_verdict(decision, verdict, note, reviewer, when or utc_now())
    first = review_of(ledger, decision, FIRST_REVIEW)
    if first is None:
        why = two_reviews(decision, verdict, second_reviewer_for, double_review_fraction)
        if why is None:
            return _append_final(ledger, record, decision), VERDICT
        return _append_review(ledger, decision, {**record, "double_review": why}, FIRST_REVIEW, "first"), FIRST_REVIEW
    second = review_of(ledger, decision, SECOND_REVIEW)
    for earlier in (first, second):
        if earlier is not None and earlier.get("reviewer") == reviewer:
            which = ("overriding a " + str(decision.get("decision")) if first.get("double_review") == "four_eyes"
                     else "double-review sample")
            raise NeedsAnotherReviewer(f"{event_id}: this item needs a {'second' if second is None else 'third'} "
                                       f"reviewer ({which}); {reviewer} gave a review at {earlier.get('ts')}")
    given = [first.get("verdict")] + ([second.get("verdict")] if second is not None else [])
    if four_eyes(decision, verdict, second_reviewer_for) and verdict not in given:
        if first.get("double_review") == "sample" and second is None:
            return _append_review(ledger, decision, {**record, "double_review": "sample"}, SECOND_REVIEW,
                                  "second"), SECOND_REVIEW
        # an override is final only when two reviewers give it
        raise NeedsAnotherReviewer(
            f"{event_id}: overriding a {decision.get('decision')} needs two reviewers giving that verdict, and the "
            "first review of this item does not; the decision stands unless a verdict that keeps it (or unsure) is "
            "given")
    final = {**record, "first_reviewer": first.get("reviewer"), "first_verdict": first.get("verdict"),
             "first_review_ts": first.get("ts"), "double_review": first.get("double_review")}
    if second is not None:
        final.update(second_reviewer=second.get("reviewer"), second_verdict=second.get("verdict"),
                     second_review_ts=second.get("ts"))
    return _append_final(ledger, final, decision), VERDICT


def _append_review(ledger: Ledger, decision: dict, record: dict, kind: str, which: str) -> dict:
    """Append a review of ``decision`` that is not final yet (``kind``: first or second of
    several); AlreadyReviewed when the decision has a final verdict, NeedsAnotherReviewer
    when another reviewer has just given this review."""
    if (existing := review_of(ledger, decision)) is not None:
        raise AlreadyReviewed(record["id"], existing)
    if not ledger.append(record, kind=kind, entry_id=record["id"]):
        raise NeedsAnotherReviewer(f"{record['id']}: another reviewer has just given the {which} review; "
                                   "another reviewer gives the verdict")
    return record


def seconds_to_review(verdict: dict) -> float | None:
    """Decision time to verdict time, in seconds (None when the decision has no time)."""
    if not verdict.get("decision_ts"):
        return None
    return (parse_ts(verdict["ts"]) - parse_ts(verdict["decision_ts"])).total_seconds()
