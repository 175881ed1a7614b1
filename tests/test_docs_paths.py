"""docs/architecture.md cannot rot silently: every backticked repository path in it exists,
every ``path.py:Name.attr`` names a definition in that file, every ``tests/x.py::test_y``
a test, and its floor table is ``FLOORS`` of tests/test_architecture.py, row for row."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from test_architecture import FLOORS

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"

TOP = ("riskpipe", "tests", "bench", "docs", "policies", "deploy", "examples")
FILES = ("README.md", "Makefile", "pyproject.toml")
# `path`, `path/`, `path.py:Name.attr` or `tests/x.py::test_y`
REF = re.compile(r"^(?P<path>(?:(?:{})/[\w./-]*|{}))(?:::?(?P<name>[A-Za-z_][\w.]*))?$".format(
    "|".join(TOP), "|".join(re.escape(f) for f in FILES)))


def references(text: str) -> list[tuple[str, str | None]]:
    """(path, qualified name or None) for every backticked span that is a repository reference."""
    out = []
    for span in re.findall(r"`([^`\n]+)`", text):
        m = REF.match(span.strip())
        if m:
            out.append((m["path"], m["name"]))
    return out


def _names(node: ast.stmt) -> set[str]:
    """The names a statement defines: a function or class, or the targets of an assignment."""
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
    return {t.id for t in targets if isinstance(t, ast.Name)}


def defines(path: Path, qualname: str) -> bool:
    """Does ``path`` define ``qualname`` (``f``, ``Class``, ``Class.method``, ``CONSTANT``,
    a class attribute), at module level or nested in classes?"""
    scope: list[ast.stmt] = ast.parse(path.read_text(encoding="utf-8")).body
    for part in qualname.split("."):
        found = next((node for node in reversed(scope) if part in _names(node)), None)
        if found is None:
            return False
        scope = found.body if isinstance(found, ast.ClassDef) else []
    return True


def problems(text: str, root: Path = ROOT) -> list[str]:
    out = []
    for path, name in references(text):
        p = root / path
        if not p.exists():
            out.append(f"`{path}` does not exist")
        elif name is not None and not (p.is_file() and p.suffix == ".py" and defines(p, name)):
            out.append(f"`{path}` does not define {name!r}")
    return out


def floor_table(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """The (floor, units) rows of the table in section 1."""
    section = text.split("## 1. Floors", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and cells[0] not in ("Floor", "") and not set(cells[0]) <= {"-"}:
            rows.append((cells[0], tuple(re.findall(r"`([^`]+)`", cells[1]))))
    return rows


def test_every_path_and_name_in_the_architecture_doc_exists():
    text = DOC.read_text(encoding="utf-8")
    refs = references(text)
    assert len(refs) >= 60 and sum(1 for _, n in refs if n) >= 40, f"only {len(refs)} references found"
    bad = problems(text)
    assert not bad, "docs/architecture.md names what is not there:\n" + "\n".join(bad)


def test_the_doc_floor_table_is_the_tests_floors():
    assert floor_table(DOC.read_text(encoding="utf-8")) == [(name, units) for name, units in FLOORS]


def test_the_checker_catches_a_missing_path_or_name(tmp_path):
    (tmp_path / "riskpipe").mkdir()
    (tmp_path / "riskpipe" / "m.py").write_text("class A:\n    x: int = 1\n    def f(self): ...\ndef g(): ...\nK = 1\n")
    good = "`riskpipe/m.py:A.f` `riskpipe/m.py:A.x` `riskpipe/m.py:g` `riskpipe/m.py:K` `riskpipe/` `not/a/ref.py`"
    assert problems(good, tmp_path) == []
    assert len(references(good)) == 5
    bad = "`riskpipe/m.py:A.g` `riskpipe/gone.py` `riskpipe/m.py:f` `riskpipe/`"
    assert problems(bad, tmp_path) == ["`riskpipe/m.py` does not define 'A.g'", "`riskpipe/gone.py` does not exist",
                                       "`riskpipe/m.py` does not define 'f'"]
