"""``riskpipe compare``: the certification families side by side, as a report card."""

from __future__ import annotations

import sys

import click
import numpy as np
import torch

from riskpipe import npy
from riskpipe.certify.families import FAMILIES
from riskpipe.cli.common import fail, progress_bar
from riskpipe.compare import FORMATS, CompareConfig, render, run_compare
from riskpipe.compare.defaults import DEFAULT_GRID, DEFAULT_METHODS, DEFAULT_MODELS
from riskpipe.models import InputError, ModelError


def _floats(text: str, field: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers", param_hint=field) from None


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
        grid[norm.strip()] = _floats(values, f"--eps-grid {norm.strip()}")
    return grid


def _csv(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


@click.command()
@click.option("--model", "models", multiple=True,
              help=f"Model spec, or with --config a model name (repeatable; default: {', '.join(DEFAULT_MODELS)}).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Stage config: a --model NAME of its models: entries is certified as the stage builds it "
                   "(declared range, scale).")
@click.option("--methods", default=",".join(DEFAULT_METHODS), show_default=True,
              help=f"Comma-separated families ({', '.join(FAMILIES)}).")
@click.option("--eps-grid", default=None, help="Epsilons: '0,0.1,0.2' for every norm or 'l2=0,0.5;linf=0,0.05'.")
@click.option("--norms", default="l2,linf", show_default=True, help="Norms to compare in (after Theorem 2).")
@click.option("--n-samples", type=int, default=1000, show_default=True, help="Smoothing estimation samples n.")
@click.option("--limit", type=int, default=100, show_default=True, help="Labelled inputs to certify.")
@click.option("--sigma", type=float, default=0.25, show_default=True, help="Smoothing noise level.")
@click.option("--data", "data_path", default=None,
              help="Labelled data: .npz with arrays X and y (default: demo digits test split).")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Torch CPU threads (1 suits small models and busy machines).")
@click.option("--device", default="cpu", show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", "out_dir", default="compare-report", show_default=True, help="Output directory.")
@click.option("--format", "formats", default="html,md,json", show_default=True, help="Comma-separated: html, md, json.")
def compare(models, config_path, methods, eps_grid, norms, n_samples, limit, sigma, data_path, threads, device, seed,
            out_dir, formats):
    """Certified accuracy, time, memory and parallelism of smoothing, IBP and Lipschitz, side by side."""

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
        try:
            with npy.load(data_path) as d:
                X, y = d["X"], d["y"].astype(np.int64)
        except (OSError, ValueError) as e:
            fail(f"--data {data_path}: not a readable .npz ({type(e).__name__}: {e})")
        except KeyError as e:
            fail(f"--data {data_path}: missing array {e} (need X and y)")
        if len(X) != len(y):
            fail(f"--data {data_path}: X has {len(X)} rows, y has {len(y)}")
    torch.set_num_threads(threads)
    try:
        result = run_compare(cfg, X, y, log=lambda m: click.echo(m, err=True),
                             bar=lambda total, desc: progress_bar(total, f"  {desc}"))
    except (ModelError, InputError, ValueError) as e:
        fail(str(e))
    written = render(result, out_dir, fmts)
    for fmt, path in written.items():
        click.echo(f"{fmt}: {path}")
    click.echo(f"total {result['total_s']:.1f} s", file=sys.stderr)
