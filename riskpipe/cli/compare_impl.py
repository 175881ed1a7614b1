"""The body of ``riskpipe compare``, imported when the command runs (its options: riskpipe/cli/compare_cmd.py)."""

from __future__ import annotations

import sys

import click
import numpy as np
import torch

from riskpipe.app.config import read_labelled
from riskpipe.certify.norms import check_norm
from riskpipe.cli.common import fail, progress_bar
from riskpipe.compare import FORMATS, CompareConfig, render, run_compare
from riskpipe.compare.card import report_file
from riskpipe.compare.defaults import DEFAULT_GRID, DEFAULT_MODELS
from riskpipe.models import InputError, ModelError
from riskpipe.paths import OutDirError, check_out_dir


def _floats(text: str, field: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=field) from None


def _norm_or_none(name: str) -> str | None:
    try:
        return check_norm(name.strip())
    except ValueError:
        return None


def parse_grid(text: str | None, norms: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    """``0,0.1,0.2`` (every norm) or ``l2=0,0.5,1;linf=0,0.05`` (per norm; others keep defaults)."""
    grid: dict[str, tuple[float, ...]] = {n: DEFAULT_GRID[n] for n in norms if n in DEFAULT_GRID}
    if not text:
        return grid
    if "=" not in text:
        return {n: _floats(text, "--eps-grid") for n in norms}
    for part in text.split(";"):
        if not part.strip():
            continue
        norm, _, values = part.partition("=")
        key = _norm_or_none(norm)
        if key is None or key not in {_norm_or_none(n) for n in norms}:  # a norm not compared was silently dropped
            raise click.BadParameter(f"{norm.strip()!r} is not one of --norms {', '.join(norms)}",
                                     param_hint="--eps-grid")
        grid[key] = _floats(values, f"--eps-grid {norm.strip()}")
    return grid


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def compare(models, config_path, methods, eps_grid, norms, n_samples, limit, sigma, data_path, threads, device, seed,
            out_dir, formats):
    fmts = _csv(formats)
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        fail(f"--format: {', '.join(bad) or 'empty'} not among {', '.join(FORMATS)}")
    if threads < 1:
        fail(f"--threads: must be >= 1, got {threads}")
    norm_list = _csv(norms)
    try:
        cfg = CompareConfig(models=tuple(models) or DEFAULT_MODELS, methods=_csv(methods), norms=norm_list,
                            eps_grid=parse_grid(eps_grid, norm_list), n_samples=n_samples, limit=limit,
                            sigma=sigma, seed=seed, device=device, config=config_path)
    except ValueError as e:
        fail(str(e))
    X = y = None
    if data_path:
        try:  # finite numeric X, one integer label per row (float or 2-D labels were cast and miscounted)
            X, y = read_labelled(data_path)
        except ValueError as e:
            fail(f"--data {e}")
        y = y.astype(np.int64)
    try:  # before the certification's minutes: a file there was an error only once the card was done
        check_out_dir(out_dir, report_file, "an earlier riskpipe compare card")
    except OutDirError as e:
        fail(f"--out {e}")
    torch.set_num_threads(threads)
    try:
        result = run_compare(cfg, X, y, log=lambda m: click.echo(m, err=True),
                             bar=lambda total, desc: progress_bar(total, f"  {desc}"),
                             **({"data_name": data_path} if data_path else {}))
    except InputError as e:  # inputs that do not fit the model: without --data, the demo digits
        fail(f"{e}" if data_path else f"{e}; without --data the inputs are the demo digits: give your model's "
                                      "with --data DATA.npz")
    except (ModelError, ValueError) as e:
        fail(str(e))
    written = render(result, out_dir, fmts)
    for fmt, path in written.items():
        click.echo(f"{fmt}: {path}")
    click.echo(f"total {result['total_s']:.1f} s", file=sys.stderr)
