"""``riskpipe policy``: check (validate + lint), explain a recorded decision, diff two
policies by replaying recorded decisions."""

from __future__ import annotations

import click


@click.group()
def policy() -> None:
    """Validate, explain and compare risk policies (policies/README.md)."""


@policy.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--input-dim", type=click.IntRange(min=1), default=64, show_default=True,
              help="Input dimension for Theorem 2 norm conversion in lint messages.")
@click.option("--strict", is_flag=True, help="Exit non-zero on lint warnings too.")
@click.option("--model", "model_spec", default=None,
              help="Also build each policy's certifier on this model (the stage's own construction) and lint "
                   "with its input dimension.")
def check(**options):
    """Validate FILES and lint them. Exit 0 when valid; otherwise one line per problem
    (``file:line: field: reason``) and exit 1."""
    from riskpipe.cli import policy_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    policy_impl.check(**options)


@policy.command()
@click.argument("file")
@click.option("--record", "record_path", required=True, help="A full decision record (JSON, or JSON lines).")
@click.option("--id", "record_id", default=None, help="Which record, when the file holds several.")
@click.option("--json", "as_json", is_flag=True, help="Print the decision and rule trace as JSON.")
def explain(**options):
    """Re-evaluate a recorded decision under FILE: which rule fired and why, signal by signal."""
    from riskpipe.cli import policy_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    policy_impl.explain(**options)


@policy.command()
@click.argument("old")
@click.argument("new")
@click.option("--ledger", "ledger_path", required=True,
              help="Decision records: a ledger database, or JSON lines (full records or `ledger export` lines).")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, help="Changed records to list.")
@click.option("--json", "as_json", is_flag=True, help="Print the full comparison as JSON.")
def diff(**options):
    """Replay recorded decisions under OLD and NEW and show what would change."""
    from riskpipe.cli import policy_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    policy_impl.diff(**options)
