"""``riskpipe data``: write the demo data splits."""

from __future__ import annotations

import click
import numpy as np

from riskpipe.models.digits import load_split


@click.group()
def data():
    """Demo data sets."""


@data.command("digits")
@click.option("--split", type=click.Choice(["train", "test"]), default="test", show_default=True)
@click.option("--out", "out_path", required=True, help="Where to write X (.npy, float32 (N,1,8,8) in [0,1]).")
@click.option("--labels", "labels_path", default=None, help="Where to write y (.npy, int64).")
def digits(split, out_path, labels_path):
    """Write scikit-learn's digits split (test_size=0.3, random_state=0, stratified)."""

    X, y = load_split(split)
    np.save(out_path, X)
    if labels_path:
        np.save(labels_path, y)
    click.echo(f"wrote {len(X)} {split} digits to {out_path}"
               + (f" and labels to {labels_path}" if labels_path else ""))
