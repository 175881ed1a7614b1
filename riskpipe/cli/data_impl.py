"""The bodies of the ``riskpipe data`` subcommands, imported when one runs (their options: riskpipe/cli/data_cmd.py)."""

from __future__ import annotations

import click
import numpy as np

from riskpipe.models.digits import load_split


def digits(split, out_path, labels_path):
    X, y = load_split(split)
    np.save(out_path, X)
    if labels_path:
        np.save(labels_path, y)
    click.echo(f"wrote {len(X)} {split} digits to {out_path}"
               + (f" and labels to {labels_path}" if labels_path else ""))
