"""``riskpipe report``: the compliance report from a ledger."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from riskpipe.app.config import ConfigError, load_config
from riskpipe.cli.common import fail, public_key_option, read_public_keys, working
from riskpipe.ledger import LedgerError, backend_for
from riskpipe.redaction import redact
from riskpipe.report import ReportError, write_report
from riskpipe.report.bundle import BundleError, write_bundle
from riskpipe.report.bundle import verify_bundle as check


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
@click.option("--bundle", "bundle_path", default=None, type=click.Path(dir_okay=False),
              help="Write an evidence bundle (zip) instead: report, policies, model sha256s, signed checkpoint, "
                   "sampled decision receipts, verify transcript, signed manifest (`riskpipe verify-bundle`).")
@click.option("--key", "key_path", default=None, type=click.Path(dir_okay=False),
              help="With --bundle: the ledger's Ed25519 checkpoint key (PEM); signs the manifest, and a checkpoint "
                   "when none covers every row.")
@click.option("--sample", type=click.IntRange(min=0), default=20, show_default=True,
              help="With --bundle: decisions drawn for receipts.")
@click.option("--seed", type=int, default=0, show_default=True, help="With --bundle: seed of the receipt sample.")
def report(ledger_path, since, until, fmt, out_path, config_path, verify, bundle_path, key_path, sample, seed):
    """Write the compliance report: scope, policies, volumes, decisions, abstention, radii,
    review, dead letters, the control mapping (riskpipe/policy/frameworks), ledger integrity."""

    try:
        beside = backend_for(ledger_path).backend == "sqlite"
    except ValueError as e:  # LedgerError: an unknown scheme
        fail(str(e))
    out = out_path or str(Path(ledger_path).with_name(f"report.{fmt}") if beside else Path(f"report.{fmt}"))
    models, policies = None, []
    if config_path:
        try:
            config = load_config(config_path)
        except ConfigError as e:
            fail(str(e))
        models = dict(config.models)
        policies = sorted({config.model_policy(name) for name in config.models})
    if bundle_path:
        _bundle(ledger_path, bundle_path, key_path, sample, seed, since, until, models, policies)
        return
    try:
        with working(f"report ({fmt}) from {redact(ledger_path)}"):
            path = write_report(ledger_path, out, fmt, since=since, until=until, models=models, verify=verify)
    except ReportError as e:
        fail(str(e))
    click.echo(str(path))


def _bundle(ledger_path, bundle_path, key_path, sample, seed, since, until, models, policies) -> None:
    if not key_path:
        fail("--bundle needs --key (the ledger's checkpoint key signs the bundle's manifest)")
    try:
        with working(f"evidence bundle from {redact(ledger_path)}"):
            m = write_bundle(ledger_path, bundle_path, key_path=key_path, sample=sample, seed=seed, since=since,
                             until=until, models=models, config_policies=policies)
    except (BundleError, LedgerError) as e:
        fail(str(e))
    click.echo(f"{bundle_path}: {len(m['files'])} files, {m['receipts']['written']} receipts against tree size "
               f"{m['checkpoint']['tree_size']}; check with "
               f"`riskpipe verify-bundle {bundle_path} --public-key PUB.pem`")


@click.command("verify-bundle")
@click.argument("bundle_path", metavar="BUNDLE.zip")
@public_key_option("Ed25519 public key (PEM) of the ledger's checkpoints; repeatable (key rotation).", required=True)
def verify_bundle(bundle_path, public_keys):
    """Check an evidence bundle offline: the manifest's signature, every file against the
    manifest, the signed checkpoint, every receipt, every policy's sha256. Exit 0 if it
    holds, 1 if not."""

    res = check(bundle_path, read_public_keys(public_keys))
    for line in res.checks:
        click.echo(f"ok: {line}")
    if not res.ok:
        click.echo(f"INVALID: {res.problem}")
    sys.exit(0 if res.ok else 1)
