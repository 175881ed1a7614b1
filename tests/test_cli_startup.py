"""`riskpipe --help` (and each subcommand's --help) stays light: no model stack, plots or
numerics are imported just to print usage (issue 21: start-up <= 0.3 s)."""

import json
import subprocess
import sys

import pytest

from riskpipe.cli import COMMANDS

HEAVY = ("torch", "matplotlib", "sklearn", "scipy", "numpy", "onnxruntime", "kafka", "psycopg")

PROBE = """
import json, sys
from click.testing import CliRunner
from riskpipe.cli import cli
result = CliRunner().invoke(cli, sys.argv[1:])
loaded = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(%r)))
print(json.dumps({"exit_code": result.exit_code, "output": result.output, "heavy": loaded}))
""" % json.dumps(HEAVY)  # noqa: UP031 - % keeps the probe's braces literal


def _help(*args):
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_top_level_help_imports_no_heavy_module():
    seen = _help("--help")
    assert seen["exit_code"] == 0
    assert "Commands:" in seen["output"] and "compare" in seen["output"]
    assert seen["heavy"] == [], f"`riskpipe --help` imported {seen['heavy']}"


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_subcommand_help_imports_no_heavy_module(command):
    seen = _help(command, "--help")
    assert seen["exit_code"] == 0, seen["output"]
    assert seen["heavy"] == [], f"`riskpipe {command} --help` imported {seen['heavy']}"
