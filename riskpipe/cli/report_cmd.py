"""``riskpipe report``: the compliance report from a ledger."""

from __future__ import annotations

import click

from riskpipe.cli.common import public_key_option


@click.command()
@click.option("--ledger", "ledger_path", required=True, help="Ledger: a file or postgresql://USER@HOST/DB.")
@click.option("--since", default=None, help="RFC 3339 time, inclusive (default: start of ledger).")
@click.option("--until", default=None, help="RFC 3339 time, exclusive (default: now).")
@click.option("--format", "fmt", type=click.Choice(["html", "md", "json", "pdf"]), default="html", show_default=True,
              help="pdf needs WeasyPrint (the pdf extra).")
@click.option("--out", "out_path", default=None, help="Output file (default: report.<format> next to the ledger).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Stage config: its models: entries name classes (labels) and features in the input examples.")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Walk the whole chain first (as `riskpipe ledger verify`; its time grows with the ledger). "
                   "Without it the report states the head and count it read, not verified.")
@click.option("--bundle", "bundle_path", default=None, type=click.Path(dir_okay=False),
              help="Write an evidence bundle (zip) instead: report, policies, model sha256s, signed checkpoint, "
                   "sampled decision receipts, verify transcript, signed manifest (`riskpipe verify-bundle`).")
@click.option("--key", "key_path", default=None, type=click.Path(dir_okay=False),
              help="With --bundle: the ledger's Ed25519 checkpoint key (PEM); signs the manifest, and a checkpoint "
                   "when none covers every row.")
@click.option("--sample", type=click.IntRange(min=0), default=20, show_default=True,
              help="With --bundle: decisions drawn for receipts.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="With --bundle: seed of the receipt sample.")
def report(**options):
    """Write the compliance report: scope, policies, volumes, decisions, abstention, radii,
    review, dead letters, the control mapping (riskpipe/policy/frameworks), ledger integrity."""
    from riskpipe.cli import report_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    report_impl.report(**options)


@click.command("verify-bundle")
@click.argument("bundle_path", metavar="BUNDLE.zip")
@public_key_option("Ed25519 public key (PEM) of the ledger's checkpoints; repeatable (key rotation).", required=True)
def verify_bundle(**options):
    """Check an evidence bundle offline: the manifest's signature, every file against the
    manifest, the signed checkpoint, every receipt, every policy's sha256. Exit 0 if it
    holds, 1 if not."""
    from riskpipe.cli import report_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    report_impl.verify_bundle(**options)
