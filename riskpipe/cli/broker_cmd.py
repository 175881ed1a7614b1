"""``riskpipe broker``: the embedded Kafka-protocol broker (Tansu), for the demo and tests."""

from __future__ import annotations

import click


@click.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Loopback port (default: a free one).")
@click.option("--partitions", type=click.IntRange(min=1), default=1, show_default=True,
              help="Partitions of the input topic.")
@click.option("--no-topics", is_flag=True, help="Do not create the default topics.")
def broker(**options):
    """Start Tansu on 127.0.0.1, print the bootstrap address, stop cleanly on Ctrl-C/SIGTERM.

    Memory storage: everything is lost when it stops. Point production at your own
    Kafka with --bootstrap-servers."""
    from riskpipe.cli import broker_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    broker_impl.broker(**options)
