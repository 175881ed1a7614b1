"""What the console's views share, kept on the Flask app: settings, metrics, the outcomes
publisher, the login throttle and sessions (``ConsoleState``), and the request's ledger.

``create_app`` puts one ``ConsoleState`` on ``app.extensions[EXTENSION]``; a view reaches it
with ``console()`` and the ledger with ``request_ledger()`` (one per app context, closed
when the context ends)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol

from flask import current_app, g

from riskpipe.ledger import Ledger
from riskpipe.render import ModelInfo, entry_info
from riskpipe.review import queue as rq
from riskpipe.review.access import LoginThrottle, SessionRegistry
from riskpipe.review.settings import ReviewSettings
from riskpipe.timestamps import utc_now

if TYPE_CHECKING:
    from riskpipe.metrics import ReviewMetrics

EXTENSION = "riskpipe_review"  # the key of the ConsoleState in app.extensions


class Publisher(Protocol):
    """Where a final verdict goes after the ledger (``kafka_io.OutcomePublisher``)."""

    def publish(self, record: dict[str, Any]) -> None: ...


class ConsoleState:
    """What the request handlers share: settings, metrics, the outcomes publisher."""

    def __init__(self, settings: ReviewSettings, metrics: ReviewMetrics | None = None,
                 publisher: Publisher | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.publisher = publisher
        self.throttle = LoginThrottle()
        self.sessions = SessionRegistry(settings.session_hours * 3600)
        self._breached: set[str] = set()
        self._breach_mark: tuple[float, int] | None = None  # how far the deadline scan has looked (rq.overdue)
        self._lock = threading.Lock()
        self._infos: dict[str, ModelInfo] = {}

    def model_info(self, record: dict[str, Any]) -> ModelInfo:
        """Labels, feature names and value range for the record's model, from the config's
        ``models:`` entry; a tabular model file (.skops, .onnx) whose entry names no features
        is loaded once for the names it carries itself."""
        model = record.get("model")
        name = model.get("name") if isinstance(model, dict) else model
        if not isinstance(name, str) or name not in self.settings.models:
            return ModelInfo()
        with self._lock:
            if name not in self._infos:
                self._infos[name] = entry_info(self.settings.models[name])
            return self._infos[name]

    def note_queue(self, ledger: Ledger) -> None:
        """Backlog gauges (size, oldest item's age), and one deadline breach per waiting
        item whose deadline has passed."""
        if self.metrics is None:
            return
        now = utc_now()
        self.metrics.set_review_backlog(rq.backlog(ledger, self.settings.scope))
        oldest = rq.oldest_waiting(ledger, self.settings.scope)
        self.metrics.set_review_backlog_age((now - oldest).total_seconds() if oldest else 0.0)
        late, self._breach_mark = rq.overdue(ledger, now, self.settings.scope, self._breach_mark)
        for event_id in late:
            self.note_breach(event_id)

    def note_breach(self, event_id: str) -> None:
        with self._lock:
            if event_id in self._breached:
                return
            self._breached.add(event_id)
        if self.metrics is not None:
            self.metrics.review_deadline_breach()


def default_metrics() -> ReviewMetrics | None:
    """A private-registry ReviewMetrics when riskpipe.metrics is available."""
    try:
        # lazy: riskpipe.metrics loads prometheus_client, which fixes its value class on
        # import (multiprocess mode, riskpipe/metrics.py); importing the console must not do that
        from riskpipe.metrics import ReviewMetrics
    except ImportError:
        return None
    return ReviewMetrics()


def console() -> ConsoleState:
    """The ConsoleState of the app serving this request."""
    state: ConsoleState = current_app.extensions[EXTENSION]
    return state


def request_ledger() -> Ledger:
    """The ledger for this request, opened on first use."""
    if "ledger" not in g:
        g.ledger = Ledger(console().settings.ledger)
    ledger: Ledger = g.ledger
    return ledger


def close_request_ledger(exc: BaseException | None) -> None:
    """Close the request's ledger when the app context ends (``teardown_appcontext``)."""
    led = g.pop("ledger", None)
    if led is not None:
        led.close()
