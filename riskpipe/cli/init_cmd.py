"""``riskpipe init``: from a model file and a reference set to a stage config and a policy.

Surveys the model on the reference set (riskpipe.survey), writes ``DIR/policy.yaml``
(policies/default.yaml with the proposed sigma and epsilon, and the sound sampler with
the measured grid when the reference set is quantised) and ``DIR/riskpipe.yaml``
(one ``models:`` entry), checks the policy as ``riskpipe policy check`` does, and
decides a few reference inputs with the written config through the stage's own code
path, so ``riskpipe run --config DIR/riskpipe.yaml`` is known to work.
"""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "spec", required=True, metavar="SPEC",
              help="Your model: PATH.pt (TorchScript), PATH.onnx, PATH.skops, module:factory@weights or demo:NAME.")
@click.option("--reference", required=True, metavar="REF.npz",
              help="Clean held-out inputs: .npz with X (N, *input shape) and integer labels y.")
@click.option("--out", "out_dir", default=".", show_default=True, help="Directory for riskpipe.yaml and policy.yaml.")
@click.option("--name", default=None, help="Model name events carry (default: from the model file name).")
@click.option("--trial", type=click.IntRange(0, 10_000), default=24, show_default=True,
              help="Decide this many reference inputs with the written config (0: skip).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--force", is_flag=True, help="Overwrite riskpipe.yaml and policy.yaml in --out.")
def init(**options):
    """Propose sigma and epsilon for your model from its reference set; write a stage config and a policy."""
    from riskpipe.cli import init_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    init_impl.init(**options)
