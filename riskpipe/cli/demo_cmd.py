"""``riskpipe demo``: the demo stream on the embedded broker."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from riskpipe.demo_stream import format_summary, run_demo
from riskpipe.paths import data_dir


@click.command()
@click.option("--out", "out_dir", default=None, help="Output directory (default: data dir/demo).")
@click.option("--ledger", default=None, help="Ledger path (default: OUT/ledger.sqlite, recreated).")
@click.option("--clean", "n_clean", type=int, default=None, help="Clean test digits to stream (default all 540).")
@click.option("--attacked", "n_attacked", type=int, default=120, show_default=True, help="PGD-attacked digits.")
@click.option("--attack-eps", type=float, default=1.0, show_default=True, help="PGD l2 budget.")
@click.option("--metrics-port", type=int, default=0, show_default=True, help="0 picks a free port.")
@click.option("--no-console", is_flag=True, help="Do not start the review console.")
@click.option("--keep-serving", is_flag=True, help="Keep the review console up after the summary.")
def demo(out_dir, ledger, n_clean, n_attacked, attack_eps, metrics_port, no_console, keep_serving):
    """Stream digits, attacked digits and malformed events through the stage."""

    out = Path(out_dir) if out_dir else data_dir() / "demo"
    ledger_path = Path(ledger) if ledger else out / "ledger.sqlite"
    if not ledger:
        for suffix in ("", "-wal", "-shm"):
            Path(str(ledger_path) + suffix).unlink(missing_ok=True)
    summary = run_demo(out, ledger_path, n_clean=n_clean, n_attacked=n_attacked, attack_eps=attack_eps,
                       metrics_port=metrics_port, console=not no_console, keep_serving=keep_serving,
                       echo=lambda m: click.echo(m), progress=sys.stderr.isatty())
    click.echo(format_summary(summary))
    click.echo(f"\nfinished in {summary['total_s']:.0f}s; review the queue later with: "
               f"riskpipe review --ledger {ledger_path} --password-file FILE")
