"""The bodies of ``riskpipe report`` and ``riskpipe verify-bundle``, imported when one runs (their options:
riskpipe/cli/report_cmd.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from riskpipe.app.config import ConfigError, load_config
from riskpipe.cli.common import fail, read_public_keys, working
from riskpipe.ledger import LedgerError, backend_for
from riskpipe.redaction import redact
from riskpipe.report import ReportError, write_report
from riskpipe.report.bundle import BundleError, write_bundle
from riskpipe.report.bundle import verify_bundle as check


def report(ledger_path, since, until, fmt, out_path, config_path, verify, bundle_path, key_path, sample, seed):
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


def verify_bundle(bundle_path, public_keys):
    res = check(bundle_path, read_public_keys(public_keys))
    for line in res.checks:
        click.echo(f"ok: {line}")
    if not res.ok:
        click.echo(f"INVALID: {res.problem}")
    sys.exit(0 if res.ok else 1)
