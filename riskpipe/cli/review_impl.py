"""The body of ``riskpipe review``, imported when the command runs (its options: riskpipe/cli/review_cmd.py)."""

from __future__ import annotations

import ipaddress
import logging
import signal
import sys

import click

from riskpipe.cli.common import fail
from riskpipe.ledger import LedgerError
from riskpipe.redaction import redact
from riskpipe.review.server import ConsoleServer
from riskpipe.review.settings import SettingsError, resolve_settings
from riskpipe.stream.infra import BROKER, describe, infrastructure_component


def review(ledger_path, bootstrap_servers, review_topic, outcomes_topic, host, port, config_path, password_file):
    try:
        settings = resolve_settings(
            ledger=ledger_path, config_path=config_path, password_file=password_file,
            bootstrap_servers=bootstrap_servers, review_topic=review_topic, outcomes_topic=outcomes_topic,
            host=host, port=port,
        )
    except SettingsError as e:
        fail(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kafka-python logs every reconnect attempt; the console logs what matters to a reviewer itself
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    try:
        server = ConsoleServer(settings)
    except (OSError, LedgerError) as e:
        fail(str(e))
    except Exception as e:
        # kafka-python raises its own errors for an unreachable broker; anything else is a
        # fault of the console, not the broker's, and is not reported as one
        if settings.bootstrap_servers and infrastructure_component(e) == BROKER:
            fail(f"--bootstrap-servers {settings.bootstrap_servers}: cannot reach the broker ({describe(e)})")
        raise
    users = sorted(settings.credentials.users)
    who = f"users {', '.join(users)}" if users else "the shared password"
    if users and settings.credentials.shared:
        who += " or the shared password"
    click.echo(f"riskpipe review: console at {server.url} (login with {who})")
    click.echo(f"riskpipe review: ledger {redact(settings.ledger)}: {server.counts['decision']} decision(s), "
               f"{server.counts['verdict']} verdict(s)")
    if settings.bootstrap_servers:
        click.echo(f"riskpipe review: reading {settings.review_topic}, publishing verdicts to "
                   f"{settings.outcomes_topic} on {settings.bootstrap_servers}")
    if (warning := plain_http_warning(settings.host)) is not None:
        click.echo(f"riskpipe review: WARNING: {warning}", err=True)
    click.echo("riskpipe review: /metrics carries review counters only (no record content); Ctrl-C stops")
    sys.stdout.flush()  # the address must reach a pipe (a supervisor, the demo) before serving blocks

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    # explicit: a process started with SIGINT ignored (nohup, `cmd &`) would otherwise never stop on Ctrl-C
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


def plain_http_warning(host: str) -> str | None:
    """What to say when the console listens beyond loopback: it speaks plain HTTP, so
    reviewers' passwords and session cookies would cross the network in clear text."""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        loopback = False
    if loopback:
        return None
    return (f"listening on {host} over plain HTTP: passwords and session cookies cross the network in clear "
            "text; listen on 127.0.0.1 and put a TLS-terminating proxy in front for remote reviewers")
