"""``riskpipe data``: write the demo data splits."""

from __future__ import annotations

import click


@click.group()
def data():
    """Demo data sets."""


@data.command("digits")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--out", "out_path", required=True, help="Where to write X (.npy, float32 (N,1,8,8) in [0,1]).")
@click.option("--labels", "labels_path", default=None, help="Where to write y (.npy, int64).")
def digits(**options):
    """Write scikit-learn's digits split (test_size=0.3, random_state=0, stratified)."""
    from riskpipe.cli import data_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    data_impl.digits(**options)
