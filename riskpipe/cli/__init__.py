"""The ``riskpipe`` command. Subcommands live in their own modules and load only when
named: ``riskpipe --help`` and command-name completion print from ``COMMANDS`` and
import no command module (so no torch, pydantic, kafka or psycopg). A command module
(``NAME_cmd.py``) declares only the options; the command imports its body (``NAME_impl.py``)
when it runs, so ``riskpipe NAME --help`` stays as light (docs/architecture.md, section 4)."""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click
from click.shell_completion import CompletionItem

from riskpipe.redaction import install, redact

# command name -> ("module:attribute", its short help). The short help is the command's
# first sentence, repeated here so listing commands imports none of them;
# tests/test_cli_startup.py fails when it differs from the command's own. A command whose
# module is absent is not listed.
COMMANDS: dict[str, tuple[str, str]] = {
    "certify": ("riskpipe.cli.certify_cmd:certify",
                "Certify every input of FILE and write one JSON line per input."),
    "data": ("riskpipe.cli.data_cmd:data", "Demo data sets."),
    "policy": ("riskpipe.cli.policy_cmd:policy",
               "Validate, explain and compare risk policies (policies/README.md)."),
    "run": ("riskpipe.cli.run_cmd:run", "Run the stage: validate, certify, score and route every inference event."),
    "init": ("riskpipe.cli.init_cmd:init",
             "Propose sigma and epsilon for your model from its reference set; write a stage config and a policy."),
    "demo": ("riskpipe.cli.demo_cmd:demo",
             "Stream digits, attacked digits and malformed events through the stage."),
    "broker": ("riskpipe.cli.broker_cmd:broker",
               "Start Tansu on 127.0.0.1, print the bootstrap address, stop cleanly on Ctrl-C/SIGTERM."),
    "ledger": ("riskpipe.cli.ledger_cmd:ledger",
               "The tamper-evident ledger of decisions, verdicts, policies and dead letters."),
    "report": ("riskpipe.cli.report_cmd:report",
               "Write the compliance report: scope, policies, volumes, decisions, abstention, radii, review, dead "
               "letters, the control mapping (riskpipe/policy/frameworks), ledger integrity."),
    "verify-bundle": ("riskpipe.cli.report_cmd:verify_bundle",
                      "Check an evidence bundle offline: the manifest's signature, every file against the manifest, "
                      "the signed checkpoint, every receipt, every policy's sha256."),
    "compare": ("riskpipe.cli.compare_cmd:compare",
                "Certified accuracy, time, memory and parallelism of smoothing, IBP and Lipschitz, side by side."),
    "review": ("riskpipe.cli.review_cmd:review",
               "Serve the review console: the queue, each item with its certificate, and verdicts."),
    "evaluate": ("riskpipe.cli.evaluate_cmd:evaluate",
                 "Evaluate POLICY on clean and attacked traffic: reviewer workload, where successful adversarial "
                 "examples go, certified adversarial examples (Theorem 1), norm shift (Theorem 2), and what a "
                 "certificate-guided attacker gains over a public-only one."),
}


def short_help(name: str, limit: int = 45) -> str:
    """``name``'s short help cut to ``limit`` characters as click cuts a command's own."""
    return click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit)


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(n for n, (t, _) in COMMANDS.items() if importlib.util.find_spec(t.split(":")[0]) is not None)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        mod, attr = COMMANDS[name][0].split(":")
        if importlib.util.find_spec(mod) is None:
            return None
        return getattr(importlib.import_module(mod), attr)

    def format_commands(self, ctx, formatter):
        """click's command list, from ``COMMANDS``: click's own asks every command for its
        short help, which imports every command module."""
        names = self.list_commands(ctx)
        if names:
            limit = formatter.width - 6 - max(len(n) for n in names)  # click's own spacing
            with formatter.section("Commands"):
                formatter.write_dl([(n, short_help(n, limit)) for n in names])

    def invoke(self, ctx):
        """Every command: a file it cannot read or write (``--out`` in a missing or read-only
        directory, say) is one line naming the file and the reason, exit 2, as the commands'
        own checks say it, never a traceback. A closed pipe (``| head``) stays click's."""
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            raise
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            click.echo(f"riskpipe: error: {redact(where + (e.strerror or str(e)))}", err=True)
            sys.exit(2)

    def shell_complete(self, ctx, incomplete):
        """Command-name completion from ``COMMANDS``, without importing the commands."""
        items = [CompletionItem(n, help=short_help(n)) for n in self.list_commands(ctx) if n.startswith(incomplete)]
        return items + click.Command.shell_complete(self, ctx, incomplete)


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
