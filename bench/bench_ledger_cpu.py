"""The ledger's Python CPU per appended row, this tree against a base revision, side by side.

A child process appends batches of 256 full decision records (tests/ledger_records.py,
the stage's batch) to a fresh SQLite ledger and to a fresh PostgreSQL database (a
server from tests/pgserver.py) and reports its process CPU per row for the whole append
(``append_many``: canonical JSON, checks, chain and Merkle hashes, facts rows, SQL; not
the server's CPU), and for its two Python-heavy parts alone: ``prepare_entries`` (canonical
JSON and checks) and ``facts_of``. Children run the base revision (``git archive``'d
to a temporary directory) and this tree alternately, in interleaved rounds, the order
rotated per round; min/median/max over the rounds. Writes bench/results/ledger_cpu.json.

    python bench/bench_ledger_cpu.py [--base REV] [--rounds 5] [--batches 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(ROOT / "tests")]

from common import table, write_results  # noqa: E402
from ledger_records import decision_record  # noqa: E402
from pgserver import PostgresServer  # noqa: E402
from riskpipe.ledger import Ledger  # noqa: E402
from riskpipe.ledger.chain import prepare_entries  # noqa: E402
from riskpipe.ledger.facts import facts_of  # noqa: E402

BATCH = 256
PARTS = ("append_sqlite", "append_postgresql", "prepare_entries", "facts_of")


def _append_cpu(target: str, records: list[dict], batches: int) -> float:
    with Ledger(target) as led:
        led.append_many(records[:BATCH])  # warm: tables, groups, caches
        t0 = time.process_time()
        for b in range(1, batches + 1):
            led.append_many(records[b * BATCH:(b + 1) * BATCH])
        return (time.process_time() - t0) / (batches * BATCH) * 1e6


def child(batches: int, pg_url: str) -> dict[str, float]:
    """CPU microseconds per row of each part (run with the tree under test first on sys.path)."""
    records = [decision_record(i, audit_sample=i % 5 == 0, abstained=i % 11 == 0) for i in range((batches + 1) * BATCH)]
    n = batches * BATCH
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        out["append_sqlite"] = _append_cpu(os.path.join(tmp, "l.db"), records, batches)
    out["append_postgresql"] = _append_cpu(pg_url, records, batches)
    entries = [("decision", r, None) for r in records[BATCH:]]
    t0 = time.process_time()
    for b in range(batches):
        prepare_entries(entries[b * BATCH:(b + 1) * BATCH])
    out["prepare_entries"] = (time.process_time() - t0) / n * 1e6
    t0 = time.process_time()
    for i, r in enumerate(records[BATCH:]):
        facts_of(i, "decision", r["id"], r)
    out["facts_of"] = (time.process_time() - t0) / n * 1e6
    return out


def run_child(tree: Path, batches: int, pg_url: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    res = subprocess.run([sys.executable, __file__, "--child", "--batches", str(batches), "--pg", pg_url], env=env,
                         check=True, capture_output=True, text=True, cwd=tree)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="main", help="the revision to compare with (git rev)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--pg", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.batches, args.pg)))
        return
    base_rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    head_rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True, capture_output=True,
                              text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp, PostgresServer(fsync=True) as pg:
        archive = subprocess.run(["git", "archive", base_rev, "riskpipe"], cwd=ROOT, check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(tmp, filter="data")
        trees = {"base": Path(tmp), "this": ROOT}
        got: dict[str, list[dict[str, float]]] = {"base": [], "this": []}
        for r in range(args.rounds):
            for name in (("base", "this") if r % 2 == 0 else ("this", "base")):
                got[name].append(run_child(trees[name], args.batches, pg.create_database(f"c{r}{name}")))
    stats = {name: {p: {"min": min(v[p] for v in runs), "median": statistics.median(v[p] for v in runs),
                        "max": max(v[p] for v in runs)} for p in PARTS} for name, runs in got.items()}
    ratios = {p: sorted(t[p] / b[p] for t, b in zip(got["this"], got["base"])) for p in PARTS}
    rows = [(p, f"{stats['base'][p]['median']:.1f}", f"{stats['this'][p]['median']:.1f}",
             f"{min(ratios[p]):.2f}/{statistics.median(ratios[p]):.2f}/{max(ratios[p]):.2f}") for p in PARTS]
    print(table(rows, ("part (CPU us/row)", f"base {base_rev}", f"this {head_rev}+", "this/base min/med/max")))
    path = write_results("ledger_cpu", {
        "base": base_rev, "this": head_rev, "rounds": args.rounds, "rows_per_run": args.batches * BATCH,
        "batch": BATCH, "cpu_us_per_row": stats,
        "ratio_this_over_base": {p: {"min": min(v), "median": statistics.median(v), "max": max(v)}
                                 for p, v in ratios.items()}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
