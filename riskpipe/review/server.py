"""Run the console: the Flask app on a werkzeug server, plus its Kafka edges."""

from __future__ import annotations

import logging
import socket
import threading
from typing import cast

from werkzeug.serving import LISTEN_QUEUE, ThreadedWSGIServer, get_sockaddr, make_server, select_address_family

from riskpipe.kafka_clients import KafkaSettings
from riskpipe.ledger import Ledger
from riskpipe.review.app import create_app
from riskpipe.review.context import EXTENSION, ConsoleState
from riskpipe.review.kafka_io import OutcomePublisher, ReviewTopicFeed
from riskpipe.review.settings import Credentials, ReviewSettings

log = logging.getLogger("riskpipe.review")


def _listen(host: str, port: int) -> socket.socket:
    """The console's listening socket, bound here: werkzeug's own bind prints the error and a
    hint to stderr and calls ``sys.exit(1)``, so a port in use came out as three lines and the
    reason ``(1)``."""
    family = select_address_family(host, port)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as werkzeug's own server
        sock.bind(get_sockaddr(host, port, family))
        sock.listen(LISTEN_QUEUE)
    except BaseException:
        sock.close()
        raise
    return sock


class ConsoleServer:
    """A running console; ``.url`` to open it, ``.stop()`` to end it and its Kafka clients."""

    def __init__(self, settings: ReviewSettings, *, metrics="default",
                 consumer_session_timeout_ms: int = 10_000, consumer_heartbeat_ms: int = 3_000) -> None:
        self.settings = settings
        with Ledger(settings.ledger) as ledger:  # fails here, not on the first page, when unusable
            self.counts = {"decision": ledger.count("decision"), "verdict": ledger.count("verdict")}
        self.feed = None
        self.publisher = None
        if settings.kafka is not None:
            self.publisher = OutcomePublisher(settings.kafka, settings.outcomes_topic)
        self.app = create_app(settings, metrics=metrics, publisher=self.publisher)
        self.state: ConsoleState = self.app.extensions[EXTENSION]
        if settings.kafka is not None:
            self.feed = ReviewTopicFeed(settings.kafka, settings.review_topic, settings.ledger,
                                        session_timeout_ms=consumer_session_timeout_ms,
                                        heartbeat_interval_ms=consumer_heartbeat_ms,
                                        scope=settings.scope)
        try:
            listener = _listen(settings.host, settings.port)
        except OSError as e:
            self._close_kafka()
            raise OSError(f"review console: cannot listen on {settings.host}:{settings.port} "
                          f"({e.strerror or e})") from None
        with listener:  # werkzeug serves a duplicate of it
            # threaded=True: a ThreadedWSGIServer
            self._httpd = cast(ThreadedWSGIServer, make_server(settings.host, settings.port, self.app, threaded=True,
                                                               fd=listener.fileno()))
        self.port = self._httpd.port  # werkzeug records the bound port (the socket is ours: no server_port)
        self._httpd.daemon_threads = True  # a lingering request thread must not hold up exit
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="riskpipe-review-http", daemon=True)

    @property
    def url(self) -> str:
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.port}/"

    def start(self) -> ConsoleServer:
        if self.feed is not None:
            self.feed.start()
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        """Block until interrupted (the CLI); Ctrl-C stops cleanly."""
        if self.feed is not None:
            self.feed.start()
        try:
            self._httpd.serve_forever()
        finally:
            self._close_kafka()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self._close_kafka()

    def _close_kafka(self) -> None:
        if self.feed is not None:
            self.feed.stop()
            self.feed = None
        if self.publisher is not None:
            self.publisher.close()
            self.publisher = None

    def __enter__(self) -> ConsoleServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_background(ledger_path: str, host: str = "127.0.0.1", port: int = 0, password: str | None = None, *,
                     users: dict[str, str] | None = None, bootstrap_servers: str | None = None,
                     kafka: KafkaSettings | None = None,
                     review_topic: str = "review", outcomes_topic: str = "review-outcomes",
                     secret_key: bytes | None = None, metrics="default", models: dict | None = None,
                     scope=None, trusted_proxies: tuple[str, ...] = (), **server_options) -> ConsoleServer:
    """Start the console in a thread (for ``riskpipe demo`` and tests).

    ``password`` (shared) or ``users`` is required: there is no default credential.
    ``kafka`` (full settings) or ``bootstrap_servers`` (plaintext) connects the Kafka edges.
    ``models`` are the stage config's ``models:`` entries (class and feature names per model);
    ``scope`` (riskpipe.review.scope.StageScope) limits the console to that stage's records.
    Returns the running server: print ``.url``, call ``.stop()`` when done.
    """
    settings = ReviewSettings(
        ledger=str(ledger_path), credentials=Credentials(users=dict(users or {}), shared=password),
        kafka=kafka or (KafkaSettings(bootstrap_servers=bootstrap_servers) if bootstrap_servers else None),
        review_topic=review_topic, outcomes_topic=outcomes_topic,
        host=host, port=port, secret_key=secret_key, models=dict(models or {}), scope=scope,
        trusted_proxies=tuple(trusted_proxies),
    )
    return start(settings, metrics=metrics, **server_options)


def start(settings: ReviewSettings, **options) -> ConsoleServer:
    return ConsoleServer(settings, **options).start()

