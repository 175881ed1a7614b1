"""The review console: a Flask app with server-side templates.

Security model
--------------
* Every page but ``/login``, ``/metrics``, ``/healthz`` and the stylesheet needs a
  logged-in reviewer; anything else gets a redirect to the login page (GET) or 401
  (other methods), and never a byte of a record.
* Passwords are compared in constant time, and a login attempt costs the same whether
  the name exists or not (``settings.Credentials``); five failed logins from one
  address, or for one reviewer name, within five minutes lock that address or name
  out for five minutes.
* The session is Flask's signed cookie (HttpOnly, SameSite=Strict) carrying a session
  id the server keeps (``SessionRegistry``): logout ends the session on the server,
  so a copied old cookie stops working; restarting the console logs everyone out.
* Every POST carries a Flask-WTF CSRF token tied to the session (CSRFProtect).
* Responses set a Content-Security-Policy that allows nothing from outside the console
  (images are data: URIs), forbid framing, and are not cached.
* ``/metrics`` is open, like any Prometheus endpoint: it carries only the review
  counters (backlog, verdicts, time to verdict, deadline breaches), no record content.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from functools import wraps
from typing import Any
from urllib.parse import urlsplit

from flask import Flask, abort, flash, g, redirect, render_template, request, session, url_for
from flask_wtf import CSRFProtect, FlaskForm
from flask_wtf.csrf import CSRFError
from wtforms import PasswordField, RadioField, StringField, TextAreaField
from wtforms.validators import DataRequired, Length, ValidationError

from riskpipe.ledger import Ledger
from riskpipe.policy.naming import policy_label
from riskpipe.render import class_name, record_view
from riskpipe.review import queue as rq
from riskpipe.review.access import SHARED_CREDENTIAL, SHARED_MAX_FAILURES
from riskpipe.review.context import ConsoleState, default_metrics
from riskpipe.review.render import split_controls
from riskpipe.review.settings import ReviewSettings, client_address, normalize_reviewer

log = logging.getLogger("riskpipe.review")

# ConsoleState and SHARED_MAX_FAILURES are re-exported: callers and tests import them from here
__all__ = ["SHARED_MAX_FAILURES", "ConsoleState", "create_app"]

# Sample names the console exposes; the stage's own metrics are not the console's to report.
REVIEW_METRIC_SAMPLES = (
    "riskpipe_review_backlog",
    "riskpipe_review_backlog_oldest_age_seconds",
    "riskpipe_review_verdicts_total",
    "riskpipe_review_time_to_verdict_seconds_bucket",
    "riskpipe_review_time_to_verdict_seconds_count",
    "riskpipe_review_time_to_verdict_seconds_sum",
    "riskpipe_review_deadline_breaches_total",
)


def _reviewer_name(form, field) -> None:
    if normalize_reviewer(field.data) is None:
        raise ValidationError("not a valid reviewer name (letters, digits, . _ @ -)")


class LoginForm(FlaskForm):
    username = StringField("Reviewer", validators=[DataRequired(), _reviewer_name])
    password = PasswordField("Password", validators=[DataRequired()])


class VerdictForm(FlaskForm):
    # values only (labels come from rq.VERDICTS in the template): the one choices form every wtforms 3 accepts
    verdict = RadioField("Verdict", choices=list(rq.VERDICTS), validators=[DataRequired()])
    note = TextAreaField("Note", validators=[Length(max=rq.MAX_NOTE)])


class LogoutForm(FlaskForm):
    pass


def create_app(settings: ReviewSettings, *, metrics: Any = "default", publisher=None) -> Flask:
    """The console for ``settings``; ``metrics`` is a StageMetrics (or None for none)."""
    app = Flask(__name__)
    app.config.update(
        SECRET_KEY=settings.secret_key or secrets.token_bytes(32),
        SESSION_COOKIE_NAME="riskpipe_review",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Strict",
        SESSION_COOKIE_SECURE=False,  # loopback HTTP by default; put TLS in front for remote reviewers
        PERMANENT_SESSION_LIFETIME=timedelta(hours=settings.session_hours),
        WTF_CSRF_TIME_LIMIT=int(settings.session_hours * 3600),
        MAX_CONTENT_LENGTH=64 * 1024,
    )
    CSRFProtect(app)
    app.jinja_env.globals["policy_label"] = policy_label
    state = ConsoleState(settings, default_metrics() if metrics == "default" else metrics, publisher)
    app.extensions["riskpipe_review"] = state

    def ledger() -> Ledger:
        if "ledger" not in g:
            g.ledger = Ledger(settings.ledger)
        return g.ledger

    @app.teardown_appcontext
    def _close_ledger(exc) -> None:
        led = g.pop("ledger", None)
        if led is not None:
            led.close()

    @app.after_request
    def _headers(resp):
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
            "frame-ancestors 'none'; base-uri 'none'"
        )
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if request.endpoint != "static":
            resp.headers["Cache-Control"] = "no-store"
        return resp

    def login_required(view):
        @wraps(view)
        def wrapped(*args, **kwargs):
            if not session.get("reviewer") or not state.sessions.valid(session.get("sid"), session["reviewer"]):
                session.clear()
                if request.method == "GET":
                    return redirect(url_for("login", next=request.full_path.rstrip("?")))
                abort(401)
            g.reviewer = session["reviewer"]
            return view(*args, **kwargs)

        return wrapped

    @app.context_processor
    def _common():
        who = session.get("reviewer")
        return {"reviewer": who if state.sessions.valid(session.get("sid"), who) else None, "logout_form": LogoutForm(), "verdict_labels": rq.VERDICTS}

    @app.errorhandler(CSRFError)
    def _csrf(e: CSRFError):
        return render_template("error.html", title="Request refused",
                               message=f"Cross-site request protection: {e.description}"), 400

    @app.errorhandler(401)
    def _unauthorized(e):
        return render_template("error.html", title="Not logged in", message="Log in to use the review console."), 401

    @app.errorhandler(404)
    def _not_found(e):
        return render_template("error.html", title="Not found", message=e.description), 404

    @app.route("/login", methods=["GET", "POST"])
    def login():
        form = LoginForm()
        addr = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"), settings.trusted_proxies)
        status = 200
        if form.validate_on_submit():
            name = normalize_reviewer(form.username.data)
            keys = (f"addr:{addr}", f"user:{name}")
            credential = (SHARED_CREDENTIAL,) if name not in settings.credentials.users else ()
            if state.throttle.locked(*keys, *credential):
                flash("Too many failed logins for this reviewer, from this address or with this password; "
                      "try again in a few minutes.", "error")
                return render_template("login.html", form=form), 429
            who = settings.credentials.authenticate(name, form.password.data)
            if who is None:
                state.throttle.fail(*keys, *credential)
                log.warning("review console: failed login for %r from %s", name, addr)
                flash("Wrong reviewer name or password.", "error")
                status = 401
            else:
                state.throttle.clear(*keys)
                session.clear()
                session.permanent = True
                session["reviewer"] = who
                session["sid"] = state.sessions.start(who)
                session["login_at"] = rq.rfc3339(rq.now_utc())
                log.info("review console: %s logged in from %s", who, addr)
                return redirect(_safe_next(request.args.get("next")))
        elif request.method == "POST":
            status = 400
        return render_template("login.html", form=form), status

    @app.post("/logout")
    @login_required
    def logout():
        state.sessions.end(session.get("sid"))
        session.clear()
        flash("Logged out.", "info")
        return redirect(url_for("login"))

    @app.get("/")
    @login_required
    def queue_page():
        where = rq.QueueFilter(**{k: request.args.get(k) or None for k in ("model", "policy", "reason")})
        size = min(rq.MAX_PAGE_SIZE, max(1, request.args.get("size", rq.PAGE_SIZE, type=int)))
        after = request.args.get("after") or None
        scope = settings.scope
        try:
            items = rq.pending(ledger(), scope, where, after=after, limit=size + 1)
        except rq.ReviewError as e:
            abort(400, description=str(e))
        more, items = len(items) > size, items[:size]
        if state.metrics is not None:
            now = rq.now_utc()
            for item in items:  # the gauge and the full breach scan run with the backlog refresh
                if item.overdue(now):
                    state.note_breach(item.id)
        return render_template("queue.html", items=items, total=rq.backlog(ledger(), scope), where=where, size=size,
                               after=after, more=more, now=rq.now_utc(), reviewed=ledger().count("verdict"),
                               class_name=class_name, labels_of=lambda rec: state.model_info(rec).labels,
                               outside=rq.outside(ledger(), scope), scope=scope)

    @app.get("/item/<path:event_id>")
    @login_required
    def item_page(event_id: str):
        return _render_item(event_id, VerdictForm())

    @app.post("/verdict/<path:event_id>")
    @login_required
    def verdict(event_id: str):
        form = VerdictForm()
        if not form.validate_on_submit():
            return _render_item(event_id, form, status=400)
        decision = _own_decision(event_id)
        if not rq.needs_review(decision):
            return _render_item(event_id, form, status=409,
                                error="This decision was not routed to review or drawn for audit.")
        try:
            record, final = rq.record_review(ledger(), event_id, form.verdict.data, form.note.data or "", g.reviewer,
                                             settings.require_second_reviewer_for, settings.double_review_fraction)
        except rq.AlreadyReviewed as e:
            return _render_item(event_id, form, status=409, error=str(e))
        except rq.ReviewError as e:
            return _render_item(event_id, form, status=409 if "second reviewer" in str(e) else 400, error=str(e))
        if not final:
            log.info("review console: %s gave the first of two reviews (%s) for %s", g.reviewer, record["verdict"],
                     event_id)
            why = (f"overriding a {decision.get('decision')} takes effect when a second reviewer confirms it"
                   if record["double_review"] == "four_eyes" else
                   "this item is in the double-review sample: a second reviewer judges it independently")
            flash(f"First review “{rq.VERDICTS[record['verdict']]}” recorded for {event_id} by {g.reviewer}: {why}.",
                  "info")
            return redirect(url_for("queue_page"))
        log.info("review console: %s recorded %s for %s", g.reviewer, record["verdict"], event_id)
        _after_verdict(record, decision)
        flash(f"Verdict “{rq.VERDICTS[record['verdict']]}” recorded for {event_id} by {g.reviewer} at {record['ts']}.",
              "info")
        return redirect(url_for("queue_page"))

    def _after_verdict(record: dict, decision: dict) -> None:
        if state.publisher is not None:
            try:
                state.publisher.publish(record)
            except Exception as e:  # noqa: BLE001 - the ledger has it; tell the reviewer, don't lose the page
                log.error("review console: verdict %s not published to %s: %s", record["id"],
                          settings.outcomes_topic, e)
                flash(f"The verdict is in the ledger but was not published to {settings.outcomes_topic}: "
                      f"{type(e).__name__}: {e}", "error")
        if state.metrics is not None:
            state.metrics.review_verdict(record["verdict"], rq.seconds_to_review(record))
            item = rq.QueueItem(decision, 0)
            if item.overdue(rq.parse_ts(record["ts"])):
                state.note_breach(record["id"])
            state.note_queue(ledger())

    def _own_decision(event_id: str) -> dict:
        """The decision record ``event_id`` of this console's stage, else 404 (another
        stage's record is not shown, and takes no verdict here)."""
        decision = ledger().get(event_id, kind="decision")
        if decision is None:
            abort(404, description=f"No decision record {event_id!r} in the ledger.")
        why = settings.scope.refuses(decision) if settings.scope is not None else None
        if why is not None:
            abort(404, description=f"{event_id!r} is not a record of this console's stage: {why}.")
        return decision

    def _render_item(event_id: str, form: VerdictForm, status: int = 200, error: str | None = None):
        decision = _own_decision(event_id)
        try:
            rq.check_decision_record(decision)
            problem = None
        except rq.ReviewError as e:
            problem = str(e)
        nist, other = split_controls(decision.get("controls"))
        info = state.model_info(decision)
        return render_template(
            "item.html", rec=decision, item=rq.QueueItem(decision, 0) if problem is None else None,
            problem=problem, form=form, error=error, view=record_view(decision, info, ledger().get_input),
            labels=info.labels, class_name=class_name,
            verdict=ledger().get(event_id, kind="verdict"), routed=rq.needs_review(decision),
            first_review=ledger().get(event_id, kind=rq.FIRST_REVIEW),
            nist=nist, other_controls=other, now=rq.now_utc(),
        ), status

    @app.get("/metrics")
    def metrics_endpoint():
        if state.metrics is None:
            abort(404, description="Metrics are off (riskpipe.metrics is not available).")
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(state.metrics.registry.restricted_registry(REVIEW_METRIC_SAMPLES))
        return body, 200, {"Content-Type": CONTENT_TYPE_LATEST}

    @app.get("/healthz")
    def healthz():
        return "ok\n", 200, {"Content-Type": "text/plain"}

    return app


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: no open redirect through ``?next=``."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
