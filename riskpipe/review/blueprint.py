"""The review console as a Flask blueprint: every route in one table, and the hooks the
console needs on the whole app that mounts it (security headers, error pages, template
context, closing the request's ledger). ``create_app`` registers it."""

from __future__ import annotations

from flask import Blueprint, render_template, request
from flask.blueprints import BlueprintSetupState
from flask.typing import ResponseReturnValue
from flask_wtf.csrf import CSRFError
from werkzeug.exceptions import HTTPException
from werkzeug.wrappers import Response

from riskpipe.policy.naming import policy_label
from riskpipe.review import auth, views
from riskpipe.review.context import close_request_ledger

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)

review = Blueprint("review", __name__)

review.add_url_rule("/login", view_func=auth.login, methods=["GET", "POST"])
review.add_url_rule("/logout", view_func=auth.logout, methods=["POST"])
review.add_url_rule("/", view_func=views.queue_page, methods=["GET"])
# items by ?id= (the links the console writes: a query string is never dot-resolved), and
# by path for links written before
review.add_url_rule("/item", view_func=views.item_page, methods=["GET"])
review.add_url_rule("/item/<path:event_id>", view_func=views.item_page, methods=["GET"])
review.add_url_rule("/verdict", view_func=views.verdict, methods=["POST"])
review.add_url_rule("/verdict/<path:event_id>", view_func=views.verdict, methods=["POST"])
review.add_url_rule("/metrics", view_func=views.metrics_endpoint, methods=["GET"])
review.add_url_rule("/healthz", view_func=views.healthz, methods=["GET"])
review.add_app_template_global(policy_label, "policy_label")
review.app_context_processor(auth.template_context)


@review.record_once
def _close_ledger_with_app_context(state: BlueprintSetupState) -> None:
    state.app.teardown_appcontext(close_request_ledger)


@review.after_app_request
def _security_headers(resp: Response) -> Response:
    """Nothing from outside the console, no framing, no sniffing, no referrer, no caching
    (the stylesheet excepted)."""
    resp.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers["Referrer-Policy"] = "no-referrer"
    if request.endpoint != "static":
        resp.headers["Cache-Control"] = "no-store"
    return resp


@review.app_errorhandler(CSRFError)
def _csrf_refused(e: CSRFError) -> ResponseReturnValue:
    return render_template("error.html", title="Request refused",
                           message=f"Cross-site request protection: {e.description}"), 400


@review.app_errorhandler(401)
def _unauthorized(e: HTTPException) -> ResponseReturnValue:
    return render_template("error.html", title="Not logged in", message="Log in to use the review console."), 401


@review.app_errorhandler(404)
def _not_found(e: HTTPException) -> ResponseReturnValue:
    return render_template("error.html", title="Not found", message=e.description), 404
