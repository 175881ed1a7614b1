"""The body of ``riskpipe demo``, imported when the command runs (its options: riskpipe/cli/demo_cmd.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from riskpipe.demo_stream import format_summary, run_demo
from riskpipe.paths import data_dir


def demo(out_dir, ledger, n_clean, n_attacked, attack_eps, metrics_port, no_console, keep_serving):
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
