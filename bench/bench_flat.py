"""Costs that must stay flat as the ledger grows, side by side in one run at two sizes:
``riskpipe report`` (with and without the chain walk), one review-queue page (its time
and bytes, over HTTP through the real console app), and ``ledger verify`` against its
measured lower bound. Writes bench/results/flat.json.

Records are full decision records (~2 KB of canonical JSON, tests/ledger_records.py),
every one routed to review, so the queue holds as many items as the ledger holds
decisions. The lower bound of ``verify`` is what any verifier of this chain must do,
timed in the same process on the same rows: fetch every row in order, sha256 of the
chain layout, and a fast JSON reader (orjson.loads) of each record; "with tree" adds the
RFC 9162 leaf hash the Merkle tree check needs.

    python bench/bench_flat.py [--rows 1000000] [--small 100000] [--cache bench/.cache]
    python bench/bench_flat.py --only-verify [--rounds 5] --rows 200000   # -> flat_verify.json

``--only-verify`` times ``verify`` and its lower bounds alone, interleaved over several
rounds at one size, wall and CPU time (min/median/max; the machine is shared and noisy).
``verify`` runs in one thread like the lower bound, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from common import table, write_results  # noqa: E402

CACHE = HERE / ".cache"  # built ledgers, reused across runs (a 1,000,000-row ledger takes minutes to write)
RECORDS = "v2"  # bump when the records below change: a cached ledger of other records is not reused


def record(i: int) -> dict:
    """Decision ``i``: routed to review, two models under two policies, three priorities."""
    from datetime import timedelta

    from ledger_records import MODEL, POLICY, POLICY_V4, T0, decision_record

    r = decision_record(i, t=T0 + timedelta(seconds=i), decision="review", radius=0.1 + (i % 97) / 100,
                        policy=POLICY if i % 4 else POLICY_V4)
    r["id"] = f"evt-{i:08d}"
    r["review"]["priority"] = 1 + i % 3
    if i % 2:
        r["model"] = {**MODEL, "name": "signs", "sha256": "5" * 64}
    r["certificate"]["p_lower"] = 0.5 + (i % 499) / 1000
    return r


def build(path: Path, rows: int) -> None:
    """A ledger of ``rows`` routed decisions, written through ``append_many`` (chain, Merkle
    tree and facts as the stage writes them) in large batches with synchronous=OFF: the
    file is a cache, not evidence. An interrupted build resumes where it stopped."""
    from riskpipe.ledger import open_ledger

    with open_ledger(path, synchronous="OFF") as led:
        have = led.count("decision")
        for start in range(have, rows, 10_000):
            led.append_many([record(i) for i in range(start, min(rows, start + 10_000))])
            if (start // 10_000) % 10 == 9:
                print(f"  built {start + 10_000} of {rows} rows", flush=True)


def timed(fn, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def report_seconds(path: Path, verify: bool) -> float:
    from riskpipe.report import write_report

    return timed(lambda: write_report(path, path.with_name(f"report-{verify}.html"), "html", verify=verify),
                 repeat=1 if verify else 2)


def queue_page(path: Path) -> dict:
    from werkzeug.security import generate_password_hash

    from riskpipe.review.app import create_app
    from riskpipe.review.settings import Credentials, ReviewSettings

    app = create_app(ReviewSettings(ledger=str(path), credentials=Credentials(
        users={"bench": generate_password_hash("bench passphrase")})), metrics=None)
    client = app.test_client()
    html = client.get("/login").get_data(as_text=True)
    token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)
    client.post("/login", data={"csrf_token": token, "username": "bench", "password": "bench passphrase"})
    from riskpipe.ledger import open_ledger

    with open_ledger(path) as led, led.snapshot() as q:  # the queue position halfway down (keyset cursor)
        n = q("SELECT COUNT(*) FROM facts WHERE needs_review = 1")[0][0]
        prio, due, seq = q("SELECT priority, due, seq FROM facts WHERE needs_review = 1 AND review_ok = 1 "
                           f"ORDER BY needs_review, review_ok, priority, due, seq LIMIT 1 OFFSET {n // 2}")[0]
    out = {}
    for name, url in (("first page", "/"), ("halfway down the queue", f"/?after={prio}:{due!r}:{seq}"),
                      ("largest page (200)", "/?size=200"), ("filtered (reason)", "/?reason=no_certificate&size=200"),
                      ("filtered (model, half the items)", "/?model=signs&size=200"),
                      ("filtered (policy, a quarter, deep)", f"/?policy=default&size=200&after={prio}:{due!r}:{seq}"),
                      ("filtered (no item matches)", "/?reason=model_fault")):
        body = {}

        def get():
            r = client.get(url)
            assert r.status_code == 200, r.status_code
            body["bytes"] = len(r.get_data())

        out[name] = {"seconds": round(timed(get), 4), "bytes": body["bytes"]}
    return out


def verify_fns(path: Path) -> dict:
    """``verify`` and its lower bounds (without and with the Merkle leaf hash) on ``path``."""
    import orjson

    from riskpipe.ledger import open_ledger

    def lower_bound(tree: bool):
        with open_ledger(path) as led, led.snapshot() as q:
            prev = "0" * 64
            last = 0
            while True:
                page = q("SELECT seq, kind, entry_id, ts, record, prev_hash, hash FROM entries WHERE seq > ? "
                         "ORDER BY seq LIMIT 20000", (last,))
                if not page:
                    return
                for _seq, kind, eid, _ts, text, _prev_hash, _stored in page:
                    raw = text.encode("utf-8")
                    h = hashlib.sha256(b"\n".join((prev.encode("ascii"), kind.encode(), eid.encode(), raw)))
                    if tree:
                        hashlib.sha256(b"\x00" + kind.encode() + b"\n" + eid.encode() + b"\n" + raw).digest()
                    orjson.loads(raw)
                    prev = h.hexdigest()
                last = page[-1][0]

    def verify():
        with open_ledger(path) as led:
            assert led.verify().ok

    return {"verify": verify, "lower_bound": lambda: lower_bound(False),
            "lower_bound_with_tree": lambda: lower_bound(True)}


def verify_vs_lower_bound(path: Path) -> dict:
    fns = verify_fns(path)
    t_verify = timed(fns["verify"], repeat=1)
    t_lb = timed(fns["lower_bound"], repeat=1)
    t_lb_tree = timed(fns["lower_bound_with_tree"], repeat=1)
    return {"verify_s": round(t_verify, 3), "lower_bound_s": round(t_lb, 3),
            "lower_bound_with_tree_s": round(t_lb_tree, 3),
            "ratio": round(t_lb / t_verify, 3), "ratio_with_tree": round(t_lb_tree / t_verify, 3)}


def migrate_seconds(path: Path) -> tuple[float, int, int]:
    """(seconds to open the ledger, its schema version before, after): a cached ledger
    written by an older schema is migrated on open (the facts backfill at full size)."""
    import sqlite3

    from riskpipe.ledger import open_ledger

    with sqlite3.connect(path) as db:
        before = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
    t0 = time.perf_counter()
    with open_ledger(path) as led:
        after = led.schema_version
    return time.perf_counter() - t0, before, after


def measure(path: Path, rows: int) -> dict:
    cached = path.exists()
    opened, before, after = migrate_seconds(path) if cached else (None, None, None)
    t0 = time.perf_counter()
    build(path, rows)
    built = time.perf_counter() - t0
    r = {"rows": rows, "build_s": None if cached else round(built, 1),
         "open_s": None if opened is None else round(opened, 2),
         "schema": f"{before} -> {after}" if before != after else after,
         "db_mb": round(path.stat().st_size / 2**20, 1),
         "report_no_verify_s": round(report_seconds(path, False), 3),
         "queue": queue_page(path), **verify_vs_lower_bound(path)}
    r["report_with_verify_s"] = round(report_seconds(path, True), 3)
    print(r, flush=True)
    return r


def only_verify(path: Path, rows: int, rounds: int) -> dict:
    """``verify`` against its lower bounds, interleaved over ``rounds`` rounds."""
    from statistics import median

    build(path, rows)
    fns = verify_fns(path)
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - w)
            cpu[k].append(time.process_time() - c)

    def stats(xs: list[float]) -> dict:
        return {"min": round(min(xs), 3), "median": round(median(xs), 3), "max": round(max(xs), 3)}

    out: dict = {"rows": rows, "rounds": rounds}
    for name, t in (("wall_s", wall), ("cpu_s", cpu)):
        out[name] = {k: stats(v) for k, v in t.items()}
        for bound in ("lower_bound", "lower_bound_with_tree"):  # per round, side by side
            out[name][f"ratio_{bound}"] = stats([b / v for b, v in zip(t[bound], t["verify"], strict=True)])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="the smaller size, for the growth ratio")
    ap.add_argument("--cache", default=str(CACHE), help="directory the built ledgers are kept (and reused) in")
    ap.add_argument("--only-verify", action="store_true", help="verify against its lower bound at --rows only")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds for --only-verify")
    args = ap.parse_args()
    where = Path(args.cache)
    where.mkdir(parents=True, exist_ok=True)
    if args.only_verify:
        r = only_verify(where / f"flat-{RECORDS}-{args.rows}.db", args.rows, args.rounds)
        print(table([(unit, k, v["min"], v["median"], v["max"]) for unit in ("wall_s", "cpu_s")
                     for k, v in r[unit].items()], ("unit", "what", "min", "median", "max")))
        path = write_results("flat_verify", {"settings": {"record": "tests/ledger_records.decision_record, ~2 KB",
                                                          "backend": "SQLite (WAL)", "threads": 1},
                                             "run": r, "targets": {"verify_ratio": 0.7}})
        print(f"wrote {path}")
        return
    runs = [measure(where / f"flat-{RECORDS}-{n}.db", n) for n in (args.small, args.rows)]
    small, big = runs
    growth = {k: round(big[k] / small[k], 2) for k in ("report_no_verify_s", "report_with_verify_s", "verify_s")}
    growth["queue_first_page"] = round(big["queue"]["first page"]["seconds"] / small["queue"]["first page"]["seconds"],
                                       2)
    print(table([(r["rows"], r["report_no_verify_s"], r["report_with_verify_s"], r["queue"]["first page"]["seconds"],
                  r["queue"]["largest page (200)"]["bytes"], r["verify_s"], r["ratio"]) for r in runs],
                ("rows", "report s", "report+verify s", "page s", "page(200) bytes", "verify s", "lower bound/verify")))
    print("growth", args.small, "->", args.rows, growth)
    path = write_results("flat", {"settings": {"record": "tests/ledger_records.decision_record, ~2 KB, all routed",
                                               "backend": "SQLite (WAL, synchronous=FULL)"},
                                  "runs": runs, "growth": growth,
                                  "targets": {"report_s_at_1m": 10, "page_kb": 200, "page_s": 0.5,
                                              "verify_ratio": 0.7}})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
