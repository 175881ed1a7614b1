"""``riskpipe compare``: the certification families side by side, as a report card."""

from __future__ import annotations

import click

from riskpipe.certify.families import FAMILIES
from riskpipe.compare.defaults import DEFAULT_METHODS, DEFAULT_MODELS


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
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--out", "out_dir", default="compare-report", show_default=True,
              help="Output directory: new, empty, or holding an earlier compare card, which this one replaces "
                   "(its files not written again are removed); anything else there is refused before the "
                   "certification runs.")
@click.option("--format", "formats", default="html,md,json", show_default=True, help="Comma-separated: html, md, json.")
def compare(**options):
    """Certified accuracy, time, memory and parallelism of smoothing, IBP and Lipschitz, side by side."""
    from riskpipe.cli import compare_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    compare_impl.compare(**options)
