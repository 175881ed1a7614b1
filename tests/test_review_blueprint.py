"""The console is a blueprint of module-level views; the app factory registers it and
keeps each app's state (sessions, ledger) on that app, so two apps never share it."""

from __future__ import annotations

import inspect
import sys

from riskpipe.review import blueprint
from riskpipe.review.app import create_app
from riskpipe.review.context import EXTENSION, ConsoleState
from riskpipe.review.settings import Credentials, ReviewSettings
from test_review_records import seed_ledger
from test_review_security import PASSWORD, log_in

ROUTES = {
    ("/login", "review.login"), ("/logout", "review.logout"), ("/", "review.queue_page"),
    ("/item", "review.item_page"), ("/verdict", "review.verdict"),  # ?id=: what the console's links use
    ("/item/<path:event_id>", "review.item_page"), ("/verdict/<path:event_id>", "review.verdict"),
    ("/metrics", "review.metrics_endpoint"), ("/healthz", "review.healthz"), ("/static/<path:filename>", "static"),
}


def _settings(ledger, secret_key: bytes | None = None) -> ReviewSettings:
    return ReviewSettings(ledger=str(ledger), credentials=Credentials(shared=PASSWORD), secret_key=secret_key)


def test_the_factory_registers_the_blueprint_whose_views_are_module_level(tmp_path):
    app = create_app(_settings(tmp_path / "ledger.sqlite3"), metrics=None)
    assert app.blueprints == {"review": blueprint.review}
    assert isinstance(app.extensions[EXTENSION], ConsoleState)
    assert {(rule.rule, rule.endpoint) for rule in app.url_map.iter_rules()} == ROUTES
    for endpoint, view in app.view_functions.items():
        if endpoint == "static":
            continue
        module = sys.modules[view.__module__]
        assert module.__name__.startswith("riskpipe.review.")
        assert "<locals>" not in inspect.unwrap(view).__qualname__
        assert getattr(module, view.__name__) is view, endpoint  # what runs is the module's own function


def test_two_apps_keep_their_own_sessions_and_ledgers(tmp_path):
    seeded, empty = tmp_path / "seeded.sqlite3", tmp_path / "empty.sqlite3"
    seed_ledger(seeded)
    key = b"k" * 32  # one signing key: only the server-side session decides
    first, second = create_app(_settings(seeded, key), metrics=None), create_app(_settings(empty, key), metrics=None)
    client = first.test_client()
    assert log_in(client).status_code == 302
    assert client.get("/item/evt-urgent").status_code == 200
    copied = second.test_client()
    copied.set_cookie("riskpipe_review", client.get_cookie("riskpipe_review").value)
    refused = copied.get("/item/evt-urgent")
    assert refused.status_code == 302 and refused.headers["Location"].startswith("/login?next=")
    other = second.test_client()
    assert log_in(other).status_code == 302
    assert other.get("/item/evt-urgent").status_code == 404  # the second app reads its own ledger
