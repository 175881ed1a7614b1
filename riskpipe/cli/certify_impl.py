"""The body of ``riskpipe certify``, imported when the command runs (its options: riskpipe/cli/certify_cmd.py)."""

from __future__ import annotations

import json
import re
import sys

from pydantic import ValidationError

from riskpipe.certify import certifier_for_policy
from riskpipe.cli.common import fail, progress_bar, read_inputs
from riskpipe.models import InputError, ModelError, check_inputs, load_model_for
from riskpipe.models.base import one_line
from riskpipe.policy.schema import Certifier

# the certifier fields this command takes as options of the same name
_OPTIONS = frozenset({"method", "mode", "sigma", "alpha", "n0", "n", "epsilon", "norm", "bound", "sampler",
                      "grid_levels", "grid_step", "max_samples", "seed", "batch_size", "device"})


def _option(field: str) -> str:
    """The option of a certifier field (``grid_step``: ``--grid-step``): the section is built
    from this command's options, so its errors name them, not the policy's keys."""
    return "--" + field.replace("_", "-")


def _as_options(text: str) -> str:
    """A certifier's error in this command's terms: ``grid_step: ... (certifier.grid_step)``
    as ``--grid-step: ... (--grid-step)``."""
    head, sep, rest = text.partition(": ")
    if sep and head in _OPTIONS:
        text = f"{_option(head)}: {rest}"
    return re.sub(r"certifier\.([a-z_]+)", lambda m: _option(m.group(1)) if m.group(1) in _OPTIONS else m.group(0),
                  text)


def certify(model_spec, input_path, method, mode, sigma, alpha, n0, n, epsilon, norm, bound, sampler, grid_levels,
            grid_step, max_samples, seed, batch_size, device, output_path):
    X = read_inputs(input_path)
    try:
        model = load_model_for(model_spec, X.shape[1:], device=device)  # TorchScript: shape from the inputs
    except ModelError as e:  # a device this machine lacks included (check_device)
        fail(str(e))
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
        field = ".".join(str(p) for p in err["loc"])
        msg = err["msg"].removeprefix("Value error, ").removeprefix(f"{field}: ")
        fail(f"{_option(field) if field else 'options'}: {msg}")
    try:
        cert = certifier_for_policy(model, section, batch_size=batch_size, epsilon=epsilon)
    except (ValueError, TypeError) as e:
        fail(_as_options(str(e)))
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
