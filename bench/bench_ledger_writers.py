"""PostgreSQL appends with 1, 2 and 4 concurrent writer processes, side by side in one
run: the appends of this riskpipe (rows inserted unsequenced, no lock shared by the
writers; one integrator at a time sequences them into the chain and Merkle tree,
riskpipe/ledger/postgres.py) next to the previous scheme (every append under one
advisory lock: ``Ledger.append_entries``, still what SQLite does), on the same server.

PostgreSQL with ``fsync=on``; full decision records (~2.0 KB canonical JSON), each
writer its own ids, batches of 16 and 256. A run's time ends when the last writer
returns, and a writer's append returns after the pending rows are sequenced (by it or by
the lease holder, which keeps going until none are left), so appends/s counts rows in
the chain and tree, not only inserted. Writes bench/results/ledger_writers.json.

    python bench/bench_ledger_writers.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_ledger import appends_per_s  # noqa: E402
from common import table, write_results  # noqa: E402


def run(target: str, mode: str, writers: int, total_batches: int, batch: int) -> dict:
    from riskpipe.ledger import open_ledger

    r = appends_per_s(target, writers, total_batches, batch, mode, timeout_s=900)
    with open_ledger(target) as led:
        res = led.verify()
        pending = led.pending()
    assert res.ok and res.count == r["rows"] and pending == 0, (res, pending)
    return {"mode": mode, **r}


def proof_sizes(target: str) -> dict:
    from riskpipe.ledger import open_ledger

    with open_ledger(target) as led:
        n = led.tree_head()[0]
        t0 = time.perf_counter()
        assert led.verify().ok
        verify_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        proofs = [led.inclusion_proof(i, n) for i in range(0, n, max(1, n // 200))]
        dt = (time.perf_counter() - t0) / len(proofs)
        cons = led.consistency_proof(n // 3, n)
    return {"tree_size": n, "inclusion_proof_hashes_max": max(map(len, proofs)),
            "inclusion_proof_bytes_max": 32 * max(map(len, proofs)), "inclusion_proof_ms": round(dt * 1000, 3),
            "consistency_proof_hashes": len(cons), "verify_seconds": round(verify_s, 3),
            "verify_seconds_per_100k": round(verify_s * 100_000 / n, 2)}


def main() -> None:
    from pgserver import PostgresServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    args = ap.parse_args()
    rows_per_run = 2048 if args.quick else 6144
    results = []
    with PostgresServer(fsync=True) as pg:
        n = 0
        for batch in (16, 256):
            for writers in (1, 2, 4):
                for mode in ("locked", "queued"):  # side by side, alternating, in one run
                    n += 1
                    r = run(pg.create_database(f"w{n}"), mode, writers, rows_per_run // batch, batch)
                    results.append(r)
                    print(r, flush=True)
        proofs = proof_sizes(pg.url(f"w{n}"))  # the last run's ledger
    ratios = {}
    for batch in (16, 256):
        for mode in ("locked", "queued"):
            by = {r["writers"]: r["appends_per_s"] for r in results if r["batch"] == batch and r["mode"] == mode}
            ratios[f"{mode}_batch{batch}_4_over_1"] = round(by[4] / by[1], 2)
    print(table([(r["mode"], r["batch"], r["writers"], r["rows"], r["seconds"], r["appends_per_s"]) for r in results],
                ("mode", "batch", "writers", "rows", "seconds", "appends/s")))
    print(ratios, proofs)
    path = write_results("ledger_writers", {
        "settings": {"record_bytes": "~2.0 KB canonical JSON (tests/ledger_records.decision_record)",
                     "postgresql": "fsync=on, one local server, TCP 127.0.0.1", "rows_per_run": rows_per_run,
                     "quick": args.quick},
        "appends": results, "ratios_4_writers_over_1": ratios, "proofs": proofs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
