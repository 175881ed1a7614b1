"""How readable the house is: package lines and files, function-local imports (and how
many carry a reason comment), dependencies between packages (and how many exist only
through function-local imports), imports that run up a floor, import cycles, and the
largest functions and classes. Prints a summary and writes bench/results/house.json.

The import graph and the floor table are those of tests/test_architecture.py (its
``FLOORS`` is the single source of truth), loaded from there so both count alike.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "results" / "house.json"
TOP = 8


def _architecture():
    spec = importlib.util.spec_from_file_location("_architecture", ROOT / "tests" / "test_architecture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def _sizes(modules: dict[str, Path]) -> tuple[list, list]:
    funcs, classes = [], []
    for name, rel in modules.items():
        tree = ast.parse((ROOT / rel).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            n = (node.end_lineno or node.lineno) - node.lineno + 1
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((n, f"{name}:{node.name}"))
            else:
                classes.append((n, f"{name}:{node.name}"))
    return sorted(funcs, reverse=True)[:TOP], sorted(classes, reverse=True)[:TOP]


def measure() -> dict:
    arch = _architecture()
    g = arch.build_graph()
    lines = sum(len((ROOT / p).read_text(encoding="utf-8").splitlines()) for p in g.modules.values())
    kinds: dict[tuple[str, str], set[bool]] = defaultdict(set)
    for imp in g.imports:
        a, b = arch.unit(imp.source), arch.unit(imp.target)
        if a != b:
            kinds[(a, b)].add(imp.local)
    funcs, classes = _sizes(g.modules)
    per_package: dict[str, int] = defaultdict(int)
    for path, _, _, _ in g.local_imports:
        per_package[arch.unit(arch.module_name(ROOT / path))] += 1
    return {
        "package_lines": lines,
        "files": len(g.modules),
        "function_local_imports": len(g.local_imports),
        "function_local_imports_with_reason": sum(1 for *_, reason in g.local_imports if reason),
        "function_local_imports_per_package": dict(sorted(per_package.items(), key=lambda kv: -kv[1])),
        "package_dependencies": len(kinds),
        "package_dependencies_only_via_function_local_imports": sum(1 for v in kinds.values() if v == {True}),
        "upward_imports": [f"{imp.where()} -> {imp.target}" for imp in arch.upward(g)],
        "module_cycles": arch.cycles(g.edges()),
        "package_cycles": arch.cycles(arch.unit_edges(g)),
        "largest_functions": [{"lines": n, "name": name} for n, name in funcs],
        "largest_classes": [{"lines": n, "name": name} for n, name in classes],
    }


def main() -> int:
    r = measure()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(r, indent=1) + "\n", encoding="utf-8")
    print(f"package: {r['package_lines']} lines in {r['files']} files")
    print(f"function-local imports: {r['function_local_imports']} "
          f"({r['function_local_imports_with_reason']} with a reason comment)")
    print(f"package dependencies: {r['package_dependencies']} "
          f"({r['package_dependencies_only_via_function_local_imports']} only via function-local imports)")
    print(f"upward imports: {len(r['upward_imports'])}; module cycles: {len(r['module_cycles'])}; "
          f"package cycles: {len(r['package_cycles'])}")
    for line in r["upward_imports"]:
        print("  up:", line)
    for c in r["module_cycles"] + r["package_cycles"]:
        print("  cycle:", " <-> ".join(c))
    print("largest functions:", ", ".join(f"{f['name']} {f['lines']}" for f in r["largest_functions"][:4]))
    print("largest classes:", ", ".join(f"{c['name']} {c['lines']}" for c in r["largest_classes"][:4]))
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
