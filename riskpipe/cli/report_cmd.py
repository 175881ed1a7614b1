"""``riskpipe report``: the compliance report from a ledger."""

from __future__ import annotations

import click


@click.command()
@click.option("--ledger", "ledger_path", required=True, help="Ledger: a file or postgresql://USER@HOST/DB.")
@click.option("--since", default=None, help="RFC 3339 time, inclusive (default: start of ledger).")
@click.option("--until", default=None, help="RFC 3339 time, exclusive (default: now).")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json", "pdf"]), default="html", show_default=True,
              help="pdf only when WeasyPrint is installed.")
@click.option("--out", "out_path", default=None, help="Output file (default: report.<format> next to the ledger).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Stage config: its models: entries name classes (labels) and features in the input examples.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Walk the whole chain first (as `riskpipe ledger verify`; its time grows with the ledger). "
                   "Without it the report states the head and count it read, not verified.")
def report(ledger_path, since, until, fmt, out_path, config_path, verify):
    """Write the compliance report: scope, policies, volumes, decisions, abstention, radii,
    review, dead letters, NIST AI RMF / ISO 27001 mapping, ledger integrity."""
    from pathlib import Path

    from riskpipe.cli.common import fail, working
    from riskpipe.report import ReportError, write_report

    from riskpipe.ledger import backend_for, redact

    try:
        beside = backend_for(ledger_path).backend == "sqlite"
    except ValueError as e:  # LedgerError: an unknown scheme
        fail(str(e))
    out = out_path or str(Path(ledger_path).with_name(f"report.{fmt}") if beside else Path(f"report.{fmt}"))
    models = None
    if config_path:
        from riskpipe.stream.config import ConfigError, load_config

        try:
            models = dict(load_config(config_path).models)
        except ConfigError as e:
            fail(str(e))
    try:
        with working(f"report ({fmt}) from {redact(ledger_path)}"):
            path = write_report(ledger_path, out, fmt, since=since, until=until, models=models, verify=verify)
    except ReportError as e:
        fail(str(e))
    click.echo(str(path))
