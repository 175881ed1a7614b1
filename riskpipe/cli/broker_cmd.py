"""``riskpipe broker``: the embedded Kafka-protocol broker (Tansu), for the demo and tests."""

from __future__ import annotations

import signal
import threading

import click

from riskpipe.cli.common import fail
from riskpipe.stream.broker import DEFAULT_TOPICS, EmbeddedBroker


@click.command()
@click.option("--port", type=int, default=None, help="Loopback port (default: a free one).")
@click.option("--partitions", type=int, default=1, show_default=True, help="Partitions of the input topic.")
@click.option("--no-topics", is_flag=True, help="Do not create the default topics.")
def broker(port, partitions, no_topics):
    """Start Tansu on 127.0.0.1, print the bootstrap address, stop cleanly on Ctrl-C/SIGTERM.

    Memory storage: everything is lost when it stops. Point production at your own
    Kafka with --bootstrap-servers."""

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
