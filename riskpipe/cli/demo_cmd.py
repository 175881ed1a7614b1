"""``riskpipe demo``: the demo stream on the embedded broker."""

from __future__ import annotations

import click


@click.command()
@click.option("--out", "out_dir", default=None, help="Output directory (default: data dir/demo).")
@click.option("--ledger", default=None, help="Ledger path (default: OUT/ledger.sqlite, recreated).")
@click.option("--clean", "n_clean", type=int, default=None, help="Clean test digits to stream (default all 540).")
@click.option("--attacked", "n_attacked", type=int, default=120, show_default=True, help="PGD-attacked digits.")
@click.option("--attack-eps", type=float, default=1.0, show_default=True, help="PGD l2 budget.")
@click.option("--metrics-port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--no-console", is_flag=True, help="Do not start the review console.")
@click.option("--keep-serving", is_flag=True, help="Keep the review console up after the summary.")
def demo(**options):
    """Stream digits, attacked digits and malformed events through the stage."""
    from riskpipe.cli import demo_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    demo_impl.demo(**options)
