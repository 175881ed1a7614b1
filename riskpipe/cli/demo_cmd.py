"""``riskpipe demo``: the demo stream on the embedded broker."""

from __future__ import annotations

import click

from riskpipe.cli.params import FiniteFloat


@click.command()
@click.option("--out", "out_dir", default=None, help="Output directory (default: data dir/demo).")
@click.option("--ledger", default=None, help="Ledger path (default: OUT/ledger.sqlite, recreated).")
@click.option("--clean", "n_clean", type=click.IntRange(min=1), default=None,
              help="Clean test digits to stream (default all 540); the attacked ones are drawn from them.")
@click.option("--attacked", "n_attacked", type=click.IntRange(min=0), default=120, show_default=True,
              help="PGD-attacked digits (at most --clean).")
@click.option("--attack-eps", type=FiniteFloat(0, closed=False), default=1.0, show_default=True,
              help="PGD l2 budget.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=0, show_default=True,
              help="0 picks a free port.")
@click.option("--no-console", is_flag=True, help="Do not start the review console.")
@click.option("--keep-serving", is_flag=True, help="Keep the review console up after the summary.")
def demo(**options):
    """Stream digits, attacked digits and malformed events through the stage."""
    from riskpipe.cli import demo_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    demo_impl.demo(**options)
