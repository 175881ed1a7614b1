"""`riskpipe --help` and every `riskpipe CMD --help` stay light (issue 21: start-up <= 0.3 s).
The top level lists the commands from ``riskpipe.cli.COMMANDS`` and imports no command
module; a command's module (``riskpipe/cli/*_cmd.py``) declares only its options, and its
body (``riskpipe/cli/*_impl.py``, with its imports at the top, issue 24 item 2) is imported
when the command runs. So no help loads the model stack, plots, numerics, kafka or psycopg."""

import json
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner

from riskpipe.cli import COMMANDS, cli, short_help

HEAVY = ("torch", "matplotlib", "sklearn", "scipy", "numpy", "onnxruntime", "kafka", "psycopg", "pydantic")

# prints what `riskpipe ARGS` printed, or with `--complete WORD` the completions of `riskpipe WORD`,
# and which heavy and riskpipe.cli modules that loaded
PROBE = """
import json, sys
from click.shell_completion import BashComplete
from click.testing import CliRunner
from riskpipe.cli import cli
if sys.argv[1:2] == ["--complete"]:
    items = BashComplete(cli, {}, "riskpipe", "_RISKPIPE_COMPLETE").get_completions([], sys.argv[2])
    result = {"exit_code": 0, "output": [(i.value, i.help) for i in items]}
else:
    run = CliRunner().invoke(cli, sys.argv[1:])
    result = {"exit_code": run.exit_code, "output": run.output}
result["heavy"] = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(%r)))
result["commands"] = sorted(m for m in sys.modules if m.startswith("riskpipe.cli."))
print(json.dumps(result))
""" % json.dumps(HEAVY)  # noqa: UP031 - % keeps the probe's braces literal


def _probe(*args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_top_level_help_imports_no_command_module():
    seen = _probe("--help")
    assert seen["exit_code"] == 0
    assert "Commands:" in seen["output"] and "compare" in seen["output"]
    assert seen["commands"] == [], f"`riskpipe --help` imported {seen['commands']}"
    assert seen["heavy"] == [], f"`riskpipe --help` imported {seen['heavy']}"


def test_command_name_completion_imports_no_command_module():
    seen = _probe("--complete", "")
    assert seen["output"] == [[n, short_help(n)] for n in sorted(COMMANDS)]
    assert seen["commands"] == [], f"completing a command name imported {seen['commands']}"
    assert _probe("--complete", "re")["output"] == [["report", short_help("report")], ["review", short_help("review")]]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_table_short_help_is_the_commands_own(name):
    """The table repeats each command's first sentence; it cannot drift from the command."""
    command = cli.get_command(click.Context(cli), name)
    assert command is not None and not command.hidden and not command.deprecated
    for limit in (30, 45, 60, 74, 200, 10_000):
        assert short_help(name, limit) == command.get_short_help_str(limit), (name, limit)


def test_command_list_is_clicks_own():
    """`riskpipe --help` lists the commands exactly as click's default would (which imports them all)."""
    ctx = click.Context(cli, info_name="riskpipe")
    ours, clicks = ctx.make_formatter(), ctx.make_formatter()
    cli.format_commands(ctx, ours)
    click.Group.format_commands(cli, ctx, clicks)
    assert ours.getvalue() == clicks.getvalue() and "verify-bundle" in ours.getvalue()


def _command_paths() -> list[tuple[str, ...]]:
    """Every command and subcommand, as the words that name it (``("ledger", "verify")``)."""
    paths = []
    for name in sorted(COMMANDS):
        command = cli.get_command(click.Context(cli), name)
        paths.append((name,))
        if isinstance(command, click.Group):
            paths += [(name, sub) for sub in sorted(command.commands)]
    return paths


@pytest.mark.parametrize("words", _command_paths(), ids=" ".join)
def test_command_help_imports_only_its_options(words):
    """`riskpipe CMD [SUB] --help` loads no heavy module and no command body: the help is
    built from the options alone (issue 21 item 5: subcommands import lazily)."""
    seen = _probe(*words, "--help")
    assert seen["exit_code"] == 0, seen["output"]
    assert seen["output"].startswith(f"Usage: cli {' '.join(words)} ")
    assert seen["heavy"] == [], f"`riskpipe {' '.join(words)} --help` imported {seen['heavy']}"
    bodies = [m for m in seen["commands"] if m.endswith("_impl")]
    assert bodies == [], f"`riskpipe {' '.join(words)} --help` imported {bodies}"
    assert COMMANDS[words[0]][0].split(":")[0] in seen["commands"]  # the help was the command's own


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_subcommand_help(name):
    result = CliRunner().invoke(cli, [name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: cli {name} ")


@pytest.mark.parametrize("args,says", [
    (["demo", "--clean", "0"], "'--clean': 0 is not in the range x>=1"),  # IndexError: no digit to attack
    (["demo", "--clean", "-1"], "'--clean': -1 is not in the range x>=1"),  # silently all but the last digit
    (["demo", "--attacked", "-5"], "'--attacked': -5 is not in the range x>=0"),  # ValueError traceback
    (["demo", "--attack-eps", "nan"], "'--attack-eps': nan is not a finite number > 0"),
    (["demo", "--attack-eps", "-1"], "'--attack-eps': -1 is not a finite number > 0"),
    (["demo", "--metrics-port", "99999"], "'--metrics-port': 99999 is not in the range 0<=x<=65535"),
    (["run", "--workers", "0"], "'--workers': 0 is not in the range x>=1"),
    (["run", "--idle-exit", "nan"], "'--idle-exit': nan is not a finite number >= 0"),
    (["run", "--idle-exit", "-1"], "'--idle-exit': -1 is not a finite number >= 0"),
    (["broker", "--partitions", "0"], "'--partitions': 0 is not in the range x>=1"),  # started a broker
    (["broker", "--port", "99999"], "'--port': 99999 is not in the range 1<=x<=65535"),
])
def test_out_of_range_options_are_refused_before_the_command_runs(args, says):
    """The main job's options among them: each was a traceback, or ran something else."""
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 2 and says in r.output, r.output
