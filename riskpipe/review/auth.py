"""Logging in and out of the review console: the forms, the ``login_required`` guard, the
login and logout views, and who the templates see as logged in.

A session is valid only while the server's ``SessionRegistry`` still holds its id; failed
logins are counted per address, per reviewer name and, for the shared password, per
credential (``riskpipe.review.access``)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any, ParamSpec
from urllib.parse import urlsplit

from flask import abort, flash, g, redirect, render_template, request, session, url_for
from flask.typing import ResponseReturnValue
from flask_wtf import FlaskForm
from werkzeug.wrappers import Response
from wtforms import Field, PasswordField, StringField
from wtforms.validators import DataRequired, ValidationError

from riskpipe.review import queue as rq
from riskpipe.review.access import SHARED_CREDENTIAL
from riskpipe.review.context import console
from riskpipe.review.settings import client_address, normalize_reviewer
from riskpipe.timestamps import rfc3339_millis

log = logging.getLogger("riskpipe.review")

P = ParamSpec("P")


def _reviewer_name(form: FlaskForm, field: Field) -> None:
    if normalize_reviewer(field.data) is None:
        raise ValidationError("not a valid reviewer name (letters, digits, . _ @ -)")


class LoginForm(FlaskForm):
    username = StringField("Reviewer", validators=[DataRequired(), _reviewer_name])
    password = PasswordField("Password", validators=[DataRequired()])


class LogoutForm(FlaskForm):
    pass


def login_required(view: Callable[P, ResponseReturnValue]) -> Callable[P, ResponseReturnValue]:
    """Run ``view`` for a reviewer whose session the server still holds (``g.reviewer``);
    anyone else gets the login page (GET) or 401, and their cookie is cleared."""

    @wraps(view)
    def wrapped(*args: P.args, **kwargs: P.kwargs) -> ResponseReturnValue:
        if not session.get("reviewer") or not console().sessions.valid(session.get("sid"), session["reviewer"]):
            session.clear()
            if request.method == "GET":
                return redirect(url_for("review.login", next=request.full_path.rstrip("?")))
            abort(401)
        g.reviewer = session["reviewer"]
        return view(*args, **kwargs)

    return wrapped


def login() -> ResponseReturnValue:
    form = LoginForm()
    state = console()
    addr = client_address(request.remote_addr, request.headers.get("X-Forwarded-For"), state.settings.trusted_proxies)
    status = 200
    if form.validate_on_submit():
        name = normalize_reviewer(form.username.data) or ""  # never "": the form validated the name
        keys = (f"addr:{addr}", f"user:{name}")
        credential = (SHARED_CREDENTIAL,) if name not in state.settings.credentials.users else ()
        if state.throttle.locked(*keys, *credential):
            flash("Too many failed logins for this reviewer, from this address or with this password; "
                  "try again in a few minutes.", "error")
            return render_template("login.html", form=form), 429
        who = state.settings.credentials.authenticate(name, form.password.data)
        if who is not None:
            state.throttle.clear(*keys)
            return _start_session(who, addr)
        state.throttle.fail(*keys, *credential)
        log.warning("review console: failed login for %r from %s", name, addr)
        flash("Wrong reviewer name or password.", "error")
        status = 401
    elif request.method == "POST":
        status = 400
    return render_template("login.html", form=form), status


def _start_session(who: str, addr: str) -> Response:
    """A fresh session for ``who`` (nothing kept from before the login), then on to ``?next=``."""
    session.clear()
    session.permanent = True
    session["reviewer"] = who
    session["sid"] = console().sessions.start(who)
    session["login_at"] = rfc3339_millis()
    log.info("review console: %s logged in from %s", who, addr)
    return redirect(_safe_next(request.args.get("next")))


@login_required
def logout() -> ResponseReturnValue:
    console().sessions.end(session.get("sid"))
    session.clear()
    flash("Logged out.", "info")
    return redirect(url_for("review.login"))


def template_context() -> dict[str, Any]:
    """For every template: the logged-in reviewer (None unless the session is still open),
    the logout form and the verdict labels."""
    who = session.get("reviewer")
    return {"reviewer": who if console().sessions.valid(session.get("sid"), who) else None,
            "logout_form": LogoutForm(), "verdict_labels": rq.VERDICTS}


def _safe_next(target: str | None) -> str:
    """Only same-site relative paths: no open redirect through ``?next=``."""
    if not target:
        return "/"
    try:
        parts = urlsplit(target)
    except ValueError:  # "//[x": an IPv6 host that is none (it raised: a 500); no page of ours
        return "/"
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target
