"""The body of ``riskpipe evaluate``, imported when the command runs (its options: riskpipe/cli/evaluate_cmd.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from riskpipe.cli.common import fail
from riskpipe.evaluate import FORMATS, EvaluationError, Settings, parse_budgets, run_evaluation, write_report
from riskpipe.evaluate.report import STAGE_DIR, own_file
from riskpipe.models import ModelError
from riskpipe.paths import OutDirError, check_out_dir
from riskpipe.policy import PolicyError


def _formats(value: str) -> tuple[str, ...]:
    """``--format``'s comma-separated list, checked (a usage error, as a click callback's)."""
    fmts = tuple(f.strip().lower() for f in value.split(",") if f.strip())
    bad = [f for f in fmts if f not in FORMATS]
    if bad or not fmts:
        raise click.BadParameter(f"{bad[0] if bad else value!r} is not one of {', '.join(FORMATS)}",
                                 param_hint="'--format'")
    return fmts


def evaluate(model_spec, config_path, reference, policies, data, budgets, shift_budgets, n, steps, queries, attempts,
             out_dir, formats, seed, device,
             base_attack, upstream_risk):
    formats = _formats(formats)
    for p in policies:
        if not Path(p).is_file():
            fail(f"policy {p}: file not found")
    if attempts is not None and attempts < 1:
        fail(f"attempts: must be >= 1, got {attempts}")
    try:
        settings = Settings(model=model_spec, config=config_path, reference=reference, policies=tuple(policies),
                            data=data, n=n or None,
                            budgets=parse_budgets(budgets), shift_budgets=parse_budgets(shift_budgets, "shift-budgets"),
                            steps=steps, queries=queries, attempts=attempts, seed=seed, device=device,
                            smoothed_attack=not base_attack, upstream_risk=upstream_risk)
        # before the attacks' minutes: a file there, a directory that cannot be made or written,
        # or someone else's files (the report would be written among them, replacing any of the same name)
        out = check_out_dir(out_dir, own_file, "an earlier riskpipe evaluate report")

        def progress(msg: str) -> None:
            click.echo(f"riskpipe evaluate: {msg}", err=True)

        result = run_evaluation(settings, out / STAGE_DIR, progress=progress)
    except OutDirError as e:
        fail(f"--out {e}")
    except (EvaluationError, ModelError, PolicyError) as e:
        fail(str(e))
    except (RuntimeError, AssertionError) as e:
        if device != "cpu":
            fail(f"device {device}: {e}")
        raise
    for path in write_report(result, out, formats):
        click.echo(str(path))
    sys.stdout.flush()
