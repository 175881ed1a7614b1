"""``riskpipe certify``: one JSON line per input with the certificate's fields."""

from __future__ import annotations

import click

from riskpipe.certify.families import DEFAULT_METHOD, FAMILIES


def _norm_choices() -> str:
    """``ibp, trees: linf or l2``: the families that certify more than one norm, by norms."""
    by_norms: dict[tuple[str, ...], list[str]] = {}
    for name, f in FAMILIES.items():
        if len(f.norms) > 1:
            by_norms.setdefault(f.norms, []).append(name)
    return "; ".join(f"{', '.join(names)}: {' or '.join(norms)}" for norms, names in by_norms.items())


@click.command()
@click.option("--model", "model_spec", default="demo:digits", show_default=True, help="Model spec (see docs).")
@click.option("--input", "input_path", required=True, help="Inputs: .npy or JSON lines.")
@click.option("--method", type=click.Choice(list(FAMILIES)), default=DEFAULT_METHOD, show_default=True)
@click.option("--mode", type=click.Choice(["certify", "predict", "decide"]), default="certify", show_default=True)
@click.option("--sigma", type=float, default=0.25, show_default=True, help="Smoothing noise level.")
@click.option("--alpha", type=float, default=0.001, show_default=True, help="Failure probability.")
@click.option("--n0", type=int, default=100, show_default=True, help="Selection samples (certify).")
@click.option("--n", type=int, default=100_000, show_default=True, help="Estimation samples.")
@click.option("--epsilon", type=float, default=0.25, show_default=True,
              help="Target radius (decide mode, Lipschitz abstain).")
@click.option("--norm", default=None, help=f"Certificate norm ({_norm_choices()}; default: the method's native norm).")
@click.option("--bound", type=click.Choice(["cp", "bonferroni", "goodman"]), default="cp", show_default=True,
              help="cp: Cohen CERTIFY; bonferroni/goodman: seed eq. (4) with simultaneous bounds.")
@click.option("--sampler", type=click.Choice(["gaussian", "sound"]), default="gaussian", show_default=True,
              help="Smoothing noise: gaussian (float, not floating-point sound) or sound (inputs on a grid).")
@click.option("--grid-levels", type=int, default=255, show_default=True,
              help="Sound sampler: grid steps across the model's value range (255: 8-bit images).")
@click.option("--grid-step", type=float, default=None, help="Sound sampler: a declared grid step instead.")
@click.option("--max-samples", type=int, default=100_000, show_default=True, help="Sample budget (decide mode).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Seed of input i is seed + i.")
@click.option("--batch-size", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Noise samples per model call.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--output", "output_path", default="-", help="Output JSON lines file (default stdout).")
def certify(**options):
    """Certify every input of FILE and write one JSON line per input."""
    from riskpipe.cli import certify_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    certify_impl.certify(**options)
