"""``riskpipe evaluate``: a policy on clean versus attacked traffic, through the stage's code."""

from __future__ import annotations

import click


@click.command()
@click.option("--model", "model_spec", default="demo:digits", show_default=True,
              help="Model spec, or with --config the name of one of its models: entries. PGD on torch models, "
                   "the tree search on tree ensembles, black-box attacks on others (skops, ONNX).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Stage config: evaluate its models: entry --model (reference, scale, range) as the stage runs it.")
@click.option("--reference", default=None, type=click.Path(dir_okay=False),
              help="Reference .npz (X, y) of a --model spec, for policies that use context risk.")
@click.option("--policy", "policies", multiple=True, required=True,
              help="Policy YAML file; repeat to compare policies on the same traffic.")
@click.option("--data", default="digits", show_default=True,
              help="'digits' (demo test split) or an .npz file with arrays X and y.")
@click.option("--budgets", default="0.5x,1x,2x,4x", show_default=True,
              help="PGD budgets in the policy's threat norm; Nx = N times the policy epsilon.")
@click.option("--shift-budgets", default="1x,2x,4x,8x", show_default=True,
              help="Norm-shift budgets in the other norm; Nx = N times the policy epsilon converted by Theorem 2.")
@click.option("--n", "n", type=int, default=200, show_default=True, help="Inputs (a stratified subset; 0 = all).")
@click.option("--steps", type=int, default=20, show_default=True, help="PGD steps (torch models).")
@click.option("--queries", type=int, default=1000, show_default=True,
              help="Model calls per input of the black-box attacks (models without gradients or trees: "
                   "score-based PGD on NES estimates where the model gives scores, else HopSkipJump).")
@click.option("--attempts", type=int, default=None, help="Attempts per attacker (default: a fifth of the inputs).")
@click.option("--out", "out_dir", default="evaluation", show_default=True,
              help="Output directory: new, empty, or holding an earlier evaluate report, which this one replaces "
                   "(its files not written again are removed); anything else there is refused before the "
                   "evaluation runs.")
@click.option("--format", "formats", default="html,md,json", show_default=True,
              help="Comma-separated: html, md, json.")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--base-attack", is_flag=True, help="Attack the base model even when the policy smooths.")
@click.option("--upstream-risk", type=float, default=None,
              help="upstream_risk sent with every clean and attacked event (default: none sent).")
def evaluate(**options):
    """Evaluate POLICY on clean and attacked traffic: reviewer workload, where successful
    adversarial examples go, certified adversarial examples (Theorem 1), norm shift
    (Theorem 2), and what a certificate-guided attacker gains over a public-only one."""
    from riskpipe.cli import evaluate_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    evaluate_impl.evaluate(**options)
