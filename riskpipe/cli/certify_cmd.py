"""``riskpipe certify``: one JSON line per input with the certificate's fields."""

from __future__ import annotations

import json
import sys

import click
from pydantic import ValidationError

from riskpipe.certify import certifier_for_policy
from riskpipe.certify.families import DEFAULT_METHOD, FAMILIES
from riskpipe.cli.common import fail, progress_bar, read_inputs
from riskpipe.models import InputError, ModelError, check_inputs, load_model_for
from riskpipe.models.base import one_line
from riskpipe.policy.schema import Certifier


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
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of input i is seed + i.")
@click.option("--batch-size", type=click.IntRange(1, 1 << 20), default=4096, show_default=True,
              help="Noise samples per model call.")
@click.option("--device", default="cpu", show_default=True)
@click.option("--output", "output_path", default="-", help="Output JSON lines file (default stdout).")
def certify(model_spec, input_path, method, mode, sigma, alpha, n0, n, epsilon, norm, bound, sampler, grid_levels,
            grid_step, max_samples, seed, batch_size, device, output_path):
    """Certify every input of FILE and write one JSON line per input."""

    X = read_inputs(input_path)
    try:
        model = load_model_for(model_spec, X.shape[1:], device=device)  # TorchScript: shape from the inputs
    except ModelError as e:
        fail(str(e))
    except (RuntimeError, AssertionError) as e:
        fail(f"device {device}: {e}")
    try:
        X = check_inputs(X, model)
    except InputError as e:
        fail(f"input {input_path}: {e}")
    try:
        section = Certifier.for_method(method, norm=norm, sigma=sigma, alpha=alpha, n0=n0, n=n,
                                       bound=bound, max_samples=max_samples, sampler=sampler,
                                       grid_levels=grid_levels, grid_step=grid_step)
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"]) or "options"
        fail(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    try:
        cert = certifier_for_policy(model, section, batch_size=batch_size, epsilon=epsilon)
    except (ValueError, TypeError) as e:
        fail(str(e))
    if mode not in cert.modes:
        fail(f"--mode: {method} supports {', '.join(cert.modes)}, not {mode}")
    try:
        cert.check_inputs(X)
    except ValueError as e:
        fail(f"input {input_path}: {e}")
    out = sys.stdout if output_path == "-" else open(output_path, "w", encoding="utf-8")
    chunk = cert.inputs_per_call
    bar = progress_bar(len(X), f"certify ({method}, {mode})")
    try:
        for start in range(0, len(X), chunk):
            xb = X[start : start + chunk]
            seeds = [seed + start + i for i in range(len(xb))]
            try:
                certs = cert.run(mode, xb, seeds, epsilon)
            except Exception as e:  # noqa: BLE001 - the user's model raising: one line, never a traceback
                fail(f"model {model_spec}: certifying inputs {start}..{start + len(xb) - 1} of {input_path}: "
                     f"{type(e).__name__}: {one_line(e)}")
            for c in certs:
                out.write(json.dumps(c.to_dict(), sort_keys=True) + "\n")
            bar.update(len(xb))
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
