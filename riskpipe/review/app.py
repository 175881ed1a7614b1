"""The review console: a Flask app with server-side templates.

``create_app`` configures the app (cookies, CSRF, limits), puts the shared ``ConsoleState``
on it and registers the console's blueprint. Where the parts live: ``blueprint`` (routes,
headers, error pages), ``auth`` (login, logout, the login guard), ``views`` (queue, item,
verdict, metrics), ``access`` (throttle, server-side sessions), ``context`` (ConsoleState,
the request's ledger).

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

import secrets
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from flask import Flask
from flask_wtf import CSRFProtect

from riskpipe.review.access import SHARED_MAX_FAILURES
from riskpipe.review.blueprint import review
from riskpipe.review.context import EXTENSION, ConsoleState, Publisher, default_metrics
from riskpipe.review.settings import ReviewSettings

if TYPE_CHECKING:
    from riskpipe.metrics import ReviewMetrics

# ConsoleState and SHARED_MAX_FAILURES are re-exported: callers and tests import them from here
__all__ = ["SHARED_MAX_FAILURES", "ConsoleState", "create_app"]


def create_app(settings: ReviewSettings, *, metrics: ReviewMetrics | Literal["default"] | None = "default",
               publisher: Publisher | None = None) -> Flask:
    """The console for ``settings``; ``metrics`` is a ReviewMetrics (or None for none)."""
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
    app.extensions[EXTENSION] = ConsoleState(settings, default_metrics() if metrics == "default" else metrics,
                                             publisher)
    app.register_blueprint(review)
    return app
