"""The dead-letter reason codes in one list (``riskpipe.metrics.DLQ_REASONS``), which the
metric's ``reason`` label is limited to (a code outside it is counted as ``other``, so an
alert on a new code would never fire), and the table of docs/records.md: every code the
stage can dead-letter with is in both, and the two lists are the same."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from riskpipe.metrics import DLQ_REASONS

ROOT = Path(__file__).resolve().parents[1]
RAISERS = ("EventError", "_error")  # _error: riskpipe/stream/binary.py's EventError with the tensor's name


def documented_codes() -> list[str]:
    doc = (ROOT / "docs" / "records.md").read_text()
    section = doc[doc.index("## Dead letter"):]
    section = section[:section.index("\n## ", 1)]
    return re.findall(r"^\| `([a-z_]+)` \|", section, re.M)


def raised_codes() -> dict[str, list[str]]:
    """Code -> where, for every ``EventError("code", ...)`` (or ``_error``) in riskpipe/ and every
    module-level constant that names a dead-letter reason (``INTERNAL_ERROR = "..."``)."""
    constants = {"INTERNAL_ERROR", "ID_CONFLICT", "OUTPUT_TOO_LARGE", "MODEL_TIMEOUT"}
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "riskpipe").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            code = None
            called = getattr(node, "func", None)
            if (isinstance(node, ast.Call) and getattr(called, "id", getattr(called, "attr", None)) in RAISERS
                    and node.args and isinstance(node.args[0], ast.Constant)):
                code = node.args[0].value
            elif (isinstance(node, ast.Assign) and len(node.targets) == 1
                  and getattr(node.targets[0], "id", None) in constants and isinstance(node.value, ast.Constant)):
                code = node.value.value
            if code is not None:
                found.setdefault(code, []).append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_the_codes_the_stage_raises_are_the_labelled_reasons():
    found = raised_codes()
    unknown = {c: where for c, where in found.items() if c not in DLQ_REASONS}
    assert not unknown, f"add these to riskpipe.metrics.DLQ_REASONS and docs/records.md: {unknown}"
    unused = set(DLQ_REASONS) - set(found)
    assert not unused, f"no code raises these reasons (or the scan misses their raise sites): {unused}"


def test_the_documented_codes_are_the_labelled_reasons():
    documented = documented_codes()
    assert len(documented) == len(set(documented)), documented
    assert documented == list(DLQ_REASONS)
