"""The floors of the package, checked from its import graph.

``FLOORS`` below is the single source of truth for what may import what (docs and
bench/house.py refer to it): every unit of ``riskpipe/`` (a top-level module or
subpackage; ``riskpipe`` is the package's own ``__init__``) sits on one floor, and a
module may import only units on its own floor or a lower one. On top of that no two
modules, and no two units, import each other, directly or round a longer cycle.

The graph holds every import the source spells out: module level, inside functions,
under ``if TYPE_CHECKING:``. An import whose target is a riskpipe module counts; one of
a package ``__init__`` counts as an import of that package (``riskpipe.ledger``).

A function-local import is allowed only for an optional dependency or to keep a heavy
one off the ``riskpipe --help`` start-up path, and says so in a reason comment
(``# lazy: ...`` or ``# optional: ...``) on its line or on a comment line above it
(one comment may head a block of imports).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "riskpipe"

# Lowest floor first. A unit may import its own floor and the floors below it.
FLOORS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # helpers with no riskpipe dependency of their own (riskpipe = the package __init__)
    ("base", ("riskpipe", "paths", "npy", "safe_yaml", "redaction", "kafka_clients", "timestamps", "json_text",
              "secret_file", "decisions")),
    # model loading and the layers the bound-based certifiers and robust training share
    ("models", ("models",)),
    # certification families: pure, arrays in, certificates out
    ("certify", ("certify",)),
    # what builds on certificates: attacks (and the conformance suite that attacks the
    # certifiers), policy, context, tuning, survey, metrics
    ("core", ("blackbox", "tree_attack", "attacks", "conformance", "policy", "context", "tuning", "survey",
              "metrics")),
    # records: the tamper-evident ledger and rendering of stored inputs and figures
    ("records", ("ledger", "render")),
    # the engine: source -> batch -> triage -> decide -> commit
    ("engine", ("stream",)),
    # the application: config model, composition root, runners
    ("app", ("app",)),
    # tools that read the app's config and the ledger
    ("tools", ("evaluate", "report", "review", "compare")),
    # entry points: the CLI and the demo (which drives the review console and the report)
    ("entry", ("cli", "demo_stream")),
)
FLOOR_OF = {unit: i for i, (_, units) in enumerate(FLOORS) for unit in units}
FLOOR_NAME = {unit: name for name, units in FLOORS for unit in units}

# Cycles closed only by imports under ``if TYPE_CHECKING:``, each with why it is still
# here. Nothing may be added without a reason; an entry whose cycle is gone fails the test
# until it is removed, so the list only shrinks.
TYPE_ONLY_CYCLES = {
    frozenset({"riskpipe.policy.evaluate", "riskpipe.policy.rules", "riskpipe.policy.schema",
               "riskpipe.policy.signals"}):
        "at run time schema imports rules (the whole-policy validator) and evaluate (Policy.evaluate); "
        "rules, signals and evaluate name schema's types back. Untangling moves the validator and "
        "Policy.evaluate out of the model (issue 24).",
}

REASON = re.compile(r"#\s*(lazy|optional)\b\s*:?\s*\S")


# ---- the graph -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Import:
    source: str  # importing module, e.g. riskpipe.stream.stage
    target: str  # imported riskpipe module (or package __init__)
    path: Path  # relative to the repository root
    line: int
    local: bool  # inside a function
    type_only: bool  # under ``if TYPE_CHECKING:``
    text: str  # the import statement as written (first line)

    def where(self) -> str:
        return f"{self.path}:{self.line}: `{self.text}`"


@dataclass
class Graph:
    modules: dict[str, Path]
    imports: list[Import] = field(default_factory=list)  # riskpipe targets only
    local_imports: list[tuple[Path, int, str, bool]] = field(default_factory=list)  # (path, line, text, has reason)

    def edges(self, type_only: bool = True) -> dict[str, set[str]]:
        """Module -> the modules it imports (``type_only=False``: leaving out imports
        made only under ``if TYPE_CHECKING:``)."""
        out: dict[str, set[str]] = defaultdict(set)
        for imp in self.imports:
            if imp.target != imp.source and (type_only or not imp.type_only):
                out[imp.source].add(imp.target)
        return out


def module_name(path: Path, package: Path = PACKAGE) -> str:
    name = ".".join(path.relative_to(package.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def _resolve(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> list[str]:
    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
        return list(dict.fromkeys(m for n in names if n.split(".")[0] == "riskpipe" and (m := known(n))))
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - node.level + 1]
        base = ".".join(pkg + ([node.module] if node.module else []))
    if base.split(".")[0] != "riskpipe":
        return []
    out = []
    for a in node.names:
        sub = f"{base}.{a.name}"
        m = sub if sub in modules else known(base)
        if m:
            out.append(m)
    return list(dict.fromkeys(out))


def _has_reason(lines: list[str], node: ast.stmt, prev_import_lines: set[int]) -> bool:
    """A reason comment on the statement's own lines, or on the comment lines above it,
    looking past the import and blank lines before it (one comment heads a block)."""
    if any(REASON.search(lines[i - 1]) for i in range(node.lineno, (node.end_lineno or node.lineno) + 1)):
        return True
    i = node.lineno - 1
    while i >= 1:
        text = lines[i - 1].strip()
        if text.startswith("#"):
            if REASON.search(text):
                return True
        elif text and i not in prev_import_lines:
            return False
        i -= 1
    return False


def _is_type_checking(node: ast.AST) -> bool:
    """``if TYPE_CHECKING:`` or ``if typing.TYPE_CHECKING:`` (its body, not its else)."""
    if not isinstance(node, ast.If):
        return False
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def build_graph(package: Path = PACKAGE) -> Graph:
    modules = {module_name(p, package): p.relative_to(package.parent) for p in sorted(package.rglob("*.py"))}
    g = Graph(modules)
    for module, path in modules.items():
        source = (package.parent / path).read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source, filename=str(path))
        import_lines: set[int] = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                import_lines.update(range(node.lineno, (node.end_lineno or node.lineno) + 1))

        def visit(node: ast.AST, in_function: bool, type_only: bool = False) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    text = lines[child.lineno - 1].strip()
                    if in_function:
                        g.local_imports.append((path, child.lineno, text, _has_reason(lines, child, import_lines)))
                    for target in _resolve(child, module, path.name == "__init__.py", modules):
                        g.imports.append(Import(module, target, path, child.lineno, in_function, type_only, text))
                visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)),
                      type_only or _is_type_checking(child))

        visit(tree, False)
    return g


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    nodes = sorted(set(edges) | {t for ts in edges.values() for t in ts})
    counter = 0
    for root in nodes:
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
    return out


def unit_edges(g: Graph) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for imp in g.imports:
        a, b = unit(imp.source), unit(imp.target)
        if a != b:
            out[a].add(b)
    return out


def upward(g: Graph) -> list[Import]:
    """Imports into a higher floor (units not in FLOORS are left to test_every_unit_has_a_floor)."""
    return [imp for imp in g.imports
            if unit(imp.source) in FLOOR_OF and unit(imp.target) in FLOOR_OF
            and FLOOR_OF[unit(imp.target)] > FLOOR_OF[unit(imp.source)]]


def _explain(g: Graph, comp: list[str], key) -> str:
    members = set(comp)
    return "\n".join(f"  {imp.where()} -> {imp.target}" for imp in g.imports
                     if key(imp.source) in members and key(imp.target) in members
                     and key(imp.source) != key(imp.target))


# ---- the checks ----------------------------------------------------------------------------
GRAPH = build_graph()


def test_every_unit_has_a_floor():
    units = {unit(m): p for m, p in GRAPH.modules.items()}
    missing = [f"{p}: unit {u!r} is not in FLOORS (tests/test_architecture.py); add it to the "
               "floor it belongs on" for u, p in sorted(units.items()) if u not in FLOOR_OF]
    assert not missing, "\n".join(missing)
    stale = sorted(set(FLOOR_OF) - set(units))
    assert not stale, f"FLOORS (tests/test_architecture.py) names units that no longer exist: {stale}"


def test_no_import_runs_upward():
    bad = [f"{imp.where()} imports {imp.target} (floor {FLOOR_NAME[unit(imp.target)]}) from floor "
           f"{FLOOR_NAME[unit(imp.source)]}" for imp in upward(GRAPH)]
    assert not bad, "imports into a higher floor (see FLOORS in tests/test_architecture.py):\n" + "\n".join(bad)


def test_no_module_imports_itself_round_a_cycle():
    runtime = {frozenset(c) for c in cycles(GRAPH.edges(type_only=False))}
    found = [c for c in cycles(GRAPH.edges()) if frozenset(c) in runtime or frozenset(c) not in TYPE_ONLY_CYCLES]
    assert not found, "module import cycles:\n" + "\n".join(
        f"{' <-> '.join(c)}:\n{_explain(GRAPH, c, lambda m: m)}" for c in found)
    gone = [sorted(c) for c in TYPE_ONLY_CYCLES if sorted(c) not in cycles(GRAPH.edges())]
    assert not gone, f"TYPE_ONLY_CYCLES (tests/test_architecture.py) lists cycles that no longer exist: {gone}"


def test_no_cycle_between_units():
    found = cycles(unit_edges(GRAPH))
    assert not found, "import cycles between packages:\n" + "\n".join(
        f"{' <-> '.join(c)}:\n{_explain(GRAPH, c, unit)}" for c in found)


def test_every_function_local_import_says_why():
    """Imports belong at the top of the file, where its dependencies can be read; one inside
    a function is for an optional dependency or to keep a heavy one off the start-up path,
    and says which in a reason comment (module docstring), so the count cannot creep back."""
    bare = [f"{path}:{line}: `{text}`" for path, line, text, reason in GRAPH.local_imports if not reason]
    assert not bare, ("function-local imports without a reason comment (`# lazy: ...` or `# optional: ...`); "
                      "move them to the top of the file or say why they stay:\n" + "\n".join(bare))


def test_the_engine_does_not_import_the_application():
    above = {u for u, f in FLOOR_OF.items() if f > FLOOR_OF["stream"]}
    bad = [f"{imp.where()}" for imp in GRAPH.imports if unit(imp.source) == "stream" and unit(imp.target) in above]
    assert not bad, "riskpipe.stream imports from above the engine:\n" + "\n".join(bad)


def test_graph_sees_local_and_type_checking_imports(tmp_path):
    pkg = tmp_path / "riskpipe"
    (pkg / "a").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a" / "__init__.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from riskpipe.b import X\n")
    (pkg / "a" / "m.py").write_text("def f():\n    from . import n\n    import riskpipe.b\n")
    (pkg / "a" / "n.py").write_text("def g():\n    # lazy: a reason\n    import json\n    import riskpipe.b  # lazy: "
                                    "x\n")
    (pkg / "b.py").write_text("from riskpipe.a import m\n")
    g = build_graph(pkg)
    got = {(i.source, i.target, i.local) for i in g.imports}
    assert ("riskpipe.a", "riskpipe.b", False) in got
    assert [i.type_only for i in g.imports if i.source == "riskpipe.a"] == [True]
    assert ("riskpipe.a.m", "riskpipe.a.n", True) in got and ("riskpipe.a.m", "riskpipe.b", True) in got
    assert ("riskpipe.b", "riskpipe.a.m", False) in got
    assert cycles(g.edges()) == [["riskpipe.a.m", "riskpipe.a.n", "riskpipe.b"]]
    assert [(p.name, reason) for p, _, _, reason in g.local_imports] == [
        ("m.py", False), ("m.py", False), ("n.py", True), ("n.py", True)]
