"""The ``riskpipe`` command. Subcommands live in their own modules and load lazily,
so ``riskpipe --help`` does not import torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from riskpipe.redaction import install

# command name -> "module:attribute"; a command whose module is absent is not listed.
COMMANDS = {
    "certify": "riskpipe.cli.certify_cmd:certify",
    "data": "riskpipe.cli.data_cmd:data",
    "policy": "riskpipe.cli.policy_cmd:policy",
    "run": "riskpipe.cli.run_cmd:run",
    "init": "riskpipe.cli.init_cmd:init",
    "demo": "riskpipe.cli.demo_cmd:demo",
    "broker": "riskpipe.cli.broker_cmd:broker",
    "ledger": "riskpipe.cli.ledger_cmd:ledger",
    "report": "riskpipe.cli.report_cmd:report",
    "verify-bundle": "riskpipe.cli.report_cmd:verify_bundle",
    "compare": "riskpipe.cli.compare_cmd:compare",
    "review": "riskpipe.cli.review_cmd:review",
    "evaluate": "riskpipe.cli.evaluate_cmd:evaluate",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, t in COMMANDS.items() if importlib.util.find_spec(t.split(":")[0]) is not None)

    def get_command(self, ctx, name):
        target = COMMANDS.get(name)
        if target is None or importlib.util.find_spec(target.split(":")[0]) is None:
            return None
        mod, attr = target.split(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="riskpipe")
def cli() -> None:
    """riskpipe: robustness certificates, risk policies and human review for inference streams."""


def main() -> None:
    install()  # no DSN password or other secret in any output of any command
    try:
        cli.main(prog_name="riskpipe", standalone_mode=True)
    except KeyboardInterrupt:
        sys.exit(130)
