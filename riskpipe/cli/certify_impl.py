"""The body of ``riskpipe certify``, imported when the command runs (its options: riskpipe/cli/certify_cmd.py)."""

from __future__ import annotations

import json
import sys

from pydantic import ValidationError

from riskpipe.certify import certifier_for_policy
from riskpipe.cli.common import fail, progress_bar, read_inputs
from riskpipe.models import InputError, ModelError, check_inputs, load_model_for
from riskpipe.models.base import one_line
from riskpipe.policy.schema import Certifier


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
