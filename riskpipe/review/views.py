"""The reviewer's pages: the queue, one item, the verdict on it (ledger, then the outcomes
topic and the review metrics), and the open ``/metrics`` and ``/healthz`` endpoints.

Only decision records of this console's stage are shown or take a verdict; another
stage's record is a 404 (``_own_decision``)."""

from __future__ import annotations

import logging
from typing import Any

from flask import abort, flash, g, redirect, render_template, request, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from wtforms import RadioField, TextAreaField
from wtforms.validators import DataRequired, Length

from riskpipe.ledger.chain import Entry
from riskpipe.redaction import redact
from riskpipe.render import class_name, record_view
from riskpipe.review import queue as rq
from riskpipe.review.auth import login_required
from riskpipe.review.context import console, request_ledger
from riskpipe.review.render import split_controls
from riskpipe.timestamps import utc_now

log = logging.getLogger("riskpipe.review")

class VerdictForm(FlaskForm):
    # values only (labels come from rq.VERDICTS in the template): the one choices form every wtforms 3 accepts
    verdict = RadioField("Verdict", choices=list(rq.VERDICTS), validators=[DataRequired()])
    note = TextAreaField("Note", validators=[Length(max=rq.MAX_NOTE)])


@login_required
def queue_page() -> ResponseReturnValue:
    state, ledger = console(), request_ledger()
    where = rq.QueueFilter(**{k: request.args.get(k) or None for k in ("model", "policy", "reason")})
    size = min(rq.MAX_PAGE_SIZE, max(1, request.args.get("size", rq.PAGE_SIZE, type=int)))
    after = request.args.get("after") or None
    scope = state.settings.scope
    try:
        # an item awaiting another reviewer after this one's review is not theirs to give (a 409)
        items = rq.pending(ledger, scope, where, after=after, limit=size + 1, reviewer=g.reviewer)
    except rq.ReviewError as e:
        abort(400, description=str(e))
    more, items = len(items) > size, items[:size]
    if state.metrics is not None:
        now = utc_now()
        for item in items:  # the gauges and the full breach scan run at every /metrics scrape
            if item.overdue(now):
                state.note_breach(item.id)
    return render_template("queue.html", items=items, total=rq.backlog(ledger, scope), where=where, size=size,
                           after=after, more=more, now=utc_now(), reviewed=ledger.count("verdict"),
                           class_name=class_name, labels_of=lambda rec: state.model_info(rec).labels,
                           outside=rq.outside(ledger, scope), scope=scope,
                           two_reviews=bool(state.settings.require_second_reviewer_for
                                            or state.settings.double_review_fraction))


def _event_id(event_id: str | None) -> str:
    """The item's id: ``?id=`` (what the console's own links use), or the path form. An id
    is any text without control characters, ``a/../b`` included, and in a path a browser
    (or werkzeug) resolves the dots: the row for ``x/../evt/7`` opened evt/7's page and
    took a verdict for it. A query string is never resolved."""
    if event_id is None:
        event_id = request.args.get("id")
    if not event_id:
        abort(400, description="id: missing (the console's links name the item as ?id=EVENT_ID)")
    return event_id


def _seq() -> int | None:
    """Which decision of the event the page shows and the verdict is for: its ledger position
    (``?seq=``, on every queue link and verdict form), so a decision re-made after the page
    was opened (the model file changed) never takes a verdict given on the one shown."""
    raw = request.args.get("seq")
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 18):
        abort(400, description="seq: not a ledger position")
    return int(raw)


@login_required
def item_page(event_id: str | None = None) -> ResponseReturnValue:
    return _render_item(_event_id(event_id), VerdictForm())


@login_required
def verdict(event_id: str | None = None) -> ResponseReturnValue:
    event_id = _event_id(event_id)
    form = VerdictForm()
    if not form.validate_on_submit():
        return _render_item(event_id, form, status=400)
    decision = _own_decision(event_id).record
    if not rq.needs_review(decision):
        return _render_item(event_id, form, status=409,
                            error="This decision was not routed to review or drawn for audit.")
    settings = console().settings
    try:
        record, kind = rq.record_review(request_ledger(), event_id, form.verdict.data, form.note.data or "",
                                        g.reviewer, settings.require_second_reviewer_for,
                                        settings.double_review_fraction, scope=settings.scope, seq=_seq())
    except (rq.AlreadyReviewed, rq.NeedsAnotherReviewer) as e:
        return _render_item(event_id, form, status=409, error=str(e))
    except rq.ReviewError as e:
        return _render_item(event_id, form, status=400, error=str(e))
    if kind != rq.VERDICT:
        _flash_pending_review(record, decision, event_id, kind)
        return redirect(url_for("review.queue_page"))
    log.info("review console: %s recorded %s for %s", g.reviewer, record["verdict"], event_id)
    _after_verdict(record, decision)
    flash(f"Verdict “{rq.VERDICTS[record['verdict']]}” recorded for {event_id} by {g.reviewer} at {record['ts']}.",
          "info")
    return redirect(url_for("review.queue_page"))


def _flash_pending_review(record: dict[str, Any], decision: dict[str, Any], event_id: str, kind: str) -> None:
    """Tell the reviewer their review (``kind``: the first or second) waits for another one, and why."""
    log.info("review console: %s gave a review that is not final (%s) for %s", g.reviewer, record["verdict"], event_id)
    if kind == rq.SECOND_REVIEW:
        # the second review of a blind pair, on the record now: telling its reviewer does not bias it
        which, why = "Second", (f"it and the first review disagree on overriding the {decision.get('decision')}: "
                                "a third reviewer, seeing both, gives the verdict")
    else:
        which, why = "First", (f"overriding a {decision.get('decision')} takes effect when a second reviewer "
                               "confirms it" if record["double_review"] == "four_eyes" else
                               "this item is in the double-review sample: a second reviewer judges it independently")
    flash(f"{which} review “{rq.VERDICTS[record['verdict']]}” recorded for {event_id} by {g.reviewer}: {why}.", "info")


def _after_verdict(record: dict[str, Any], decision: dict[str, Any]) -> None:
    """A final verdict is in the ledger: publish it to the outcomes topic, count it."""
    state = console()
    if state.publisher is not None:
        try:
            state.publisher.publish(record)
        except Exception as e:  # noqa: BLE001 - the ledger has it; tell the reviewer, don't lose the page
            topic = state.settings.outcomes_topic
            log.error("review console: verdict %s not published to %s: %s", record["id"], topic, e)
            flash(f"The verdict is in the ledger but was not published to {topic}: {type(e).__name__}: {e}", "error")
    if state.metrics is not None:
        state.metrics.review_verdict(record["verdict"], rq.seconds_to_review(record))
        item = rq.QueueItem(decision, 0)
        if item.overdue(rq.parse_ts(record["ts"])):
            state.note_breach(record["id"])


def _own_decision(event_id: str) -> Entry:
    """The decision ``event_id`` of this console's stage (``queue.decision_entry``; the one at
    ``?seq=`` when given), else 404 (another stage's record is not shown, and takes no
    verdict here; no decision at that position), or 409 when several stages decided the
    event and neither the link nor this console names one."""
    ledger, scope, seq = request_ledger(), console().settings.scope, _seq()
    try:
        return rq.decision_entry(ledger, event_id, scope, seq)
    except rq.ReviewError as e:  # only now: which of the three it is
        decisions = ledger.get_all(event_id, kind="decision")
        if not decisions or seq is not None:
            abort(404, description=str(e) if decisions else f"No decision record {event_id!r} in the ledger.")
        if scope is None:
            abort(409, description=str(e))
        abort(404, description=f"{event_id!r} is not a record of this console's stage: "
                               f"{scope.refuses(decisions[-1])}.")


def _render_item(event_id: str, form: VerdictForm, status: int = 200, error: str | None = None) -> ResponseReturnValue:
    entry = _own_decision(event_id)
    decision = entry.record
    try:
        rq.check_decision_record(decision)
        problem = None
    except rq.ReviewError as e:
        problem = str(e)
    nist, other = split_controls(decision.get("controls"))
    info = console().model_info(decision)
    ledger = request_ledger()
    return render_template(
        "item.html", rec=decision, item=rq.QueueItem(decision, 0) if problem is None else None,
        problem=problem, form=form, error=error, view=record_view(decision, info, ledger.get_input),
        labels=info.labels, class_name=class_name,
        verdict=rq.review_of(ledger, decision), routed=rq.needs_review(decision),
        first_review=rq.review_of(ledger, decision, rq.FIRST_REVIEW),
        second_review=rq.review_of(ledger, decision, rq.SECOND_REVIEW),
        nist=nist, other_controls=other, now=utc_now(), seq=entry.seq,
    ), status


def metrics_endpoint() -> ResponseReturnValue:
    metrics = console().metrics
    if metrics is None:
        abort(404, description="Metrics are off (riskpipe.metrics is not available).")
    # lazy: prometheus_client fixes its metric value class on import (riskpipe/metrics.py), so the console
    # imports it only once metrics are on, like riskpipe.metrics itself (context.default_metrics)
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    # the backlog gauges as of this scrape, their one place: set after a feed batch or a
    # verdict instead, the oldest item's age froze on a quiet console and
    # RiskpipeReviewBacklogStale never fired
    try:
        console().note_queue(request_ledger())
    except Exception as e:  # noqa: BLE001 - a ledger hiccup: serve the last values, say so once per scrape
        log.warning("review console: backlog gauges not refreshed for this scrape: %s", redact(str(e)))
    body = generate_latest(metrics.registry)
    return body, 200, {"Content-Type": CONTENT_TYPE_LATEST}


def healthz() -> ResponseReturnValue:
    return "ok\n", 200, {"Content-Type": "text/plain"}
