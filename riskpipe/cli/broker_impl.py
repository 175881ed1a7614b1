"""The body of ``riskpipe broker``, imported when the command runs (its options: riskpipe/cli/broker_cmd.py)."""

from __future__ import annotations

import signal
import threading

import click

from riskpipe.cli.common import fail
from riskpipe.stream.broker import DEFAULT_TOPICS, EmbeddedBroker


def broker(port, partitions, no_topics):
    b = EmbeddedBroker(port=port)
    try:
        b.start()
    except RuntimeError as e:
        fail(str(e))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        if not no_topics:
            b.create_topics(["inferences"], partitions=partitions)
            b.create_topics([t for t in DEFAULT_TOPICS if t != "inferences"])
        click.echo(f"bootstrap: {b.bootstrap}", err=False)
        click.echo(f"riskpipe run --bootstrap-servers {b.bootstrap}", err=True)
        while not stop.wait(0.5):
            if b.proc is None or b.proc.poll() is not None:
                fail("the broker process exited unexpectedly")
    finally:
        b.stop()
        click.echo("broker stopped", err=True)
