"""`riskpipe --help` and `riskpipe CMD [SUB] --help`: wall time of a fresh process for every
command and subcommand (issue 21 item 5, target <= 0.3 s each), and which heavy modules
the help loaded. With ``--baseline DIR`` (another checkout, e.g. a worktree of an older
commit) the same commands run from DIR too, interleaved round by round, so the two
columns share the machine's load. Writes bench/results/help.json.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_help.py [--rounds 3] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import click

from common import table, write_results
from riskpipe.cli import COMMANDS, cli

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 0.3
HEAVY = ("torch", "matplotlib", "sklearn", "scipy", "numpy", "onnxruntime", "kafka", "psycopg", "pydantic")
PROBE = ("import sys; from riskpipe.cli import main; sys.argv[0] = 'riskpipe'\n"
         "try:\n    main()\nexcept SystemExit:\n    pass\n"
         f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr)")


def command_paths() -> list[tuple[str, ...]]:
    paths: list[tuple[str, ...]] = [()]
    for name in sorted(COMMANDS):
        command = cli.get_command(click.Context(cli), name)
        paths.append((name,))
        if isinstance(command, click.Group):
            paths += [(name, sub) for sub in sorted(command.commands)]
    return paths


def one(root: Path, words: tuple[str, ...]) -> tuple[float, list[str]]:
    env = {**os.environ, "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", PROBE, *words, "--help"], capture_output=True, text=True, env=env,
                         cwd=root, timeout=120, check=True)
    wall = time.perf_counter() - t0
    return wall, json.loads(out.stderr.strip().splitlines()[-1].replace("'", '"'))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", type=Path, default=None, help="Another checkout to time side by side.")
    args = ap.parse_args()
    roots = {"now": ROOT} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
    paths = command_paths()
    times: dict[str, dict[tuple[str, ...], list[float]]] = {k: {p: [] for p in paths} for k in roots}
    heavy: dict[str, dict[tuple[str, ...], list[str]]] = {k: {} for k in roots}
    for _ in range(args.rounds):
        for p in paths:
            for label, root in roots.items():
                wall, loaded = one(root, p)
                times[label][p].append(wall)
                heavy[label][p] = loaded

    def stats(xs: list[float]) -> dict:
        return {"min_s": round(min(xs), 3), "median_s": round(statistics.median(xs), 3), "max_s": round(max(xs), 3)}

    rows, results = [], []
    for p in paths:
        name = " ".join(("riskpipe", *p, "--help"))
        entry = {"command": name, **{label: {**stats(times[label][p]), "heavy": heavy[label][p]} for label in roots}}
        results.append(entry)
        row = [name, f"{entry['now']['median_s']:.3f} ({entry['now']['min_s']:.3f}-{entry['now']['max_s']:.3f})",
               ",".join(entry["now"]["heavy"]) or "-"]
        if args.baseline:
            b = entry["baseline"]
            row[1:1] = [f"{b['median_s']:.3f} ({b['min_s']:.3f}-{b['max_s']:.3f})"]
            row.append(",".join(b["heavy"]) or "-")
        rows.append(tuple(row))
    headers = ("command", "median s (min-max)", "heavy modules loaded")
    if args.baseline:
        headers = ("command", "baseline median s (min-max)", "now median s (min-max)", "heavy now", "heavy baseline")
    print(table(rows, headers))
    worst = max(e["now"]["median_s"] for e in results)
    verdict = "met" if worst <= TARGET_S else "MISSED"
    print(f"\nslowest help now: median {worst:.3f} s (target {TARGET_S} s: {verdict})")
    path = write_results("help", {"rounds": args.rounds, "target_s": TARGET_S, "slowest_median_s": worst,
                                  "target": verdict, "baseline": str(args.baseline) if args.baseline else None,
                                  "commands": results})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
