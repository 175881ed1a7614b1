"""The bodies of the ``riskpipe data`` subcommands, imported when one runs (their options: riskpipe/cli/data_cmd.py)."""

from __future__ import annotations

import click
import numpy as np

from riskpipe.cli.common import fail
from riskpipe.models.digits import load_split


def _save(path: str, array: np.ndarray, option: str) -> None:
    """``array`` as .npy at exactly ``path`` (np.save given a name appends ``.npy`` to it)."""
    try:
        with open(path, "wb") as f:
            np.save(f, array)
    except OSError as e:
        fail(f"{option} {path}: cannot write ({e.strerror})")


def digits(split, out_path, labels_path):
    X, y = load_split(split)
    _save(out_path, X, "--out")
    if labels_path:
        _save(labels_path, y, "--labels")
    click.echo(f"wrote {len(X)} {split} digits to {out_path}"
               + (f" and labels to {labels_path}" if labels_path else ""))
