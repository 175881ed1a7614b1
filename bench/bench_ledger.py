"""Ledger backends side by side in one run: appends/s with 1, 2 and 4 concurrent writer
processes on PostgreSQL and SQLite, and ``verify`` time per 100,000 rows on each.

Both durable: SQLite ``synchronous=FULL`` (the default), PostgreSQL with ``fsync=on``.
Records are full decision records as the stage writes them (~2.0 KB of canonical
JSON); writers append batches of 256 (the stage's default batch) or 16, each writer
its own ids. PostgreSQL appends are serialised by an advisory lock (one chain), SQLite
by its file lock, so extra writers add contention rather than throughput; the figures
show how much. Writes bench/results/ledger.json.

    python bench/bench_ledger.py [--quick]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import table, write_results  # noqa: E402


def _records(writer: int, start: int, n: int) -> list[dict]:
    from ledger_records import decision_record

    out = []
    for i in range(start, start + n):
        r = decision_record(i, worker=f"w{writer}")
        r["id"] = f"w{writer}-{i:07d}"
        out.append(r)
    return out


def _writer(target: str, mode: str, writer: int, batches: int, batch: int, go, q) -> None:
    """One writer process: ``queued`` appends as the stage does (``append_many``), ``locked``
    through ``Ledger.append_entries`` (every append under the chain's lock)."""
    from riskpipe.ledger import Ledger, open_ledger

    data = [_records(writer, b * batch, batch) for b in range(batches)]  # built before the clock starts
    with open_ledger(target) as led:
        append = led.append_many if mode == "queued" else (
            lambda recs: Ledger.append_entries(led, (("decision", r, None) for r in recs)))
        go.wait()
        t0 = time.perf_counter()
        n = sum(append(recs) for recs in data)
        q.put((n, t0, time.perf_counter()))


def appends_per_s(target: str, writers: int, total_batches: int, batch: int, mode: str = "queued",
                  timeout_s: float = 600) -> dict:
    """``writers`` processes appending ``total_batches`` batches of ``batch`` records to
    ``target`` between them, released together: rows and seconds from the first start to
    the last finish (also bench_ledger_writers.py)."""
    ctx = mp.get_context("spawn")
    go, q = ctx.Event(), ctx.Queue()
    per = total_batches // writers
    procs = [ctx.Process(target=_writer, args=(target, mode, w, per, batch, go, q)) for w in range(writers)]
    for p in procs:
        p.start()
    time.sleep(3.0)  # let every writer import, connect and build its records
    go.set()
    got = [q.get(timeout=timeout_s) for _ in procs]
    for p in procs:
        p.join()
    rows = sum(n for n, _, _ in got)
    wall = max(t1 for _, _, t1 in got) - min(t0 for _, t0, _ in got)
    return {"writers": writers, "batch": batch, "rows": rows, "seconds": round(wall, 3),
            "appends_per_s": round(rows / wall, 1)}


def verify_seconds(target: str, rows: int) -> dict:
    from riskpipe.ledger import open_ledger

    with open_ledger(target) as led:
        have = led.count()
        step = 5000
        for start in range(have, rows, step):
            led.append_many(_records(9, start, min(step, rows - start)))
        t0 = time.perf_counter()
        res = led.verify()
        dt = time.perf_counter() - t0
    assert res.ok and res.count == rows, res
    return {"rows": rows, "verify_seconds": round(dt, 3), "verify_seconds_per_100k": round(dt * 100_000 / rows, 3)}


def main() -> None:
    from pgserver import PostgresServer

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer rows (a smoke run)")
    args = ap.parse_args()
    total_batches, verify_rows = (8, 10_000) if args.quick else (48, 100_000)
    appends, verifies = [], []
    with PostgresServer(fsync=True) as pg, tempfile.TemporaryDirectory() as tmp:
        n = 0
        for batch, batches in ((256, total_batches), (16, total_batches * 8)):
            for writers in (1, 2, 4):
                for backend in ("sqlite", "postgresql"):  # side by side, alternating, in one run
                    n += 1
                    target = str(Path(tmp) / f"a{n}.db") if backend == "sqlite" else pg.create_database(f"a{n}")
                    r = {"backend": backend, **appends_per_s(target, writers, batches, batch)}
                    appends.append(r)
                    print(r, flush=True)
        for backend in ("sqlite", "postgresql"):
            target = str(Path(tmp) / "v.db") if backend == "sqlite" else pg.create_database("v")
            r = {"backend": backend, **verify_seconds(target, verify_rows)}
            verifies.append(r)
            print(r, flush=True)
    print(table([(a["backend"], a["batch"], a["writers"], a["rows"], a["seconds"],
                  a["appends_per_s"]) for a in appends],
                ("backend", "batch", "writers", "rows", "seconds", "appends/s")))
    print(table([(v["backend"], v["rows"], v["verify_seconds"], v["verify_seconds_per_100k"]) for v in verifies],
                ("backend", "rows", "verify s", "verify s / 100k rows")))
    path = write_results("ledger", {
        "settings": {"record_bytes": "~2.0 KB canonical JSON (tests/ledger_records.decision_record)",
                     "sqlite": "WAL, synchronous=FULL", "postgresql": "15, fsync=on, one local server, TCP 127.0.0.1",
                     "quick": args.quick},
        "appends": appends, "verify": verifies})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
