"""Stream-stage benchmark (issue 4), demo model, default policy (decide mode).

Measured in one run and written to bench/results/stream.json:
* end-to-end decisions/s through the embedded broker (Tansu), timed from the
  production of the first event to the last decision, and the same stage in
  offline mode over the same events, and their ratio (target >= 0.8; >= 1000/s);
* per-message overhead outside certification (batch wall time minus time in the
  certifier, per message), p50 and p99 over batches (target p50 <= 0.5 ms);
* decisions/s with no ledger, a SQLite and a PostgreSQL ledger, interleaved, offline
  and through the broker, and each ledger's ratio to no ledger (target >= 0.95), with
  the writer thread's ledger time and the stage thread's wait for it per batch;
* resident memory of the stage after 10k and after N events (default 100k; target
  flat within 10%), offline mode with the events cycled.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]
from common import rss_mb, table, write_results  # noqa: E402
from riskpipe.app.compose import build_pipeline  # noqa: E402
from riskpipe.app.config import load_config  # noqa: E402
from riskpipe.models.digits import load_split  # noqa: E402
from riskpipe.stream.events import make_event  # noqa: E402


def events(n: int, prefix: str) -> list[bytes]:
    X, _ = load_split("test")
    return [json.dumps(make_event(f"{prefix}-{i}", "digits", X[i % len(X)], upstream_risk=0.1)).encode()
            for i in range(n)]


def run_offline(pipeline, values, tmp: Path, on_batch=None, ledger=None, after_commit=None):
    from riskpipe.stream.io import JsonlSink, JsonlSource
    from riskpipe.stream.stage import Stage

    src = tmp / f"in-{time.monotonic_ns()}.jsonl"
    src.write_bytes(b"\n".join(values) + b"\n")
    cfg = load_config(None, batch={"max_events": 256, "max_wait_ms": 50})
    stage = Stage(cfg, pipeline, lambda r: JsonlSource(str(src)), lambda: JsonlSink(str(tmp / "out")),
                  ledger=ledger, on_batch=on_batch, after_commit=after_commit)
    t0 = time.perf_counter()
    stats = stage.run()
    return stats, time.perf_counter() - t0


def run_broker(pipeline, values, on_batch=None, ledger=None, on_record=None, after_commit=None):
    """``values`` through the embedded broker; returns (stats, seconds, join seconds).

    The stage starts first and joins its group (that one-off join is timed apart, as
    the join seconds); the clock then runs from the production of the first event to
    the last decision, so the producer's time and the first batch's wait are counted."""
    from kafka import KafkaProducer

    from riskpipe.app.compose import build_stage
    from riskpipe.stream.broker import EmbeddedBroker

    with EmbeddedBroker() as b:
        b.create_topics()
        p = KafkaProducer(bootstrap_servers=b.bootstrap, acks="all", linger_ms=5, batch_size=1 << 18)
        cfg = load_config(None, bootstrap_servers=b.bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=600,
                          batch={"max_events": 256, "max_wait_ms": 50})
        stage = build_stage(cfg, pipeline=pipeline, ledger=ledger)
        stage.observer.on_batch = on_batch
        stage.observer.on_record = on_record
        stage.committer.after_commit += after_commit or []
        th = threading.Thread(target=stage.run, daemon=True)
        t_join = time.perf_counter()
        th.start()
        while stage.source is None or not stage.source.holds_partitions:
            time.sleep(0.01)
        t0 = time.perf_counter()
        for i, v in enumerate(values):
            p.send("inferences", key=str(i).encode(), value=v)
        p.flush()
        while stage.stats.decided < len(values):
            time.sleep(0.005)
        t_end = time.perf_counter()
        stage.stop()
        th.join(timeout=30)
        p.close()
    return stage.stats, t_end - t0, t0 - t_join


BACKENDS = ("none", "sqlite", "postgresql")


def ledger_section(pipeline, n: int, rounds: int, tmp: Path, broker: bool) -> dict:
    """Decisions/s with no ledger, a SQLite ledger and a PostgreSQL ledger (fsync on),
    interleaved round by round (the order rotated each round) on fresh events; each
    ledger's ratio to no ledger in the same round, min/median/max over the rounds.

    Offline (JSONL source, no broker) the stage is CPU-bound and the figure is steady;
    through the embedded broker it is what production sees, and noisier. Per batch, the
    writer thread's time in the ledger (``Outcome.ledger_seconds``) and the stage
    thread's wait for it (``Outcome.waited``: what the overlap did not hide), and the
    process's CPU time per decision (all its threads; not the broker's or PostgreSQL's
    processes): on a loaded machine the wall-clock ratio swings with the neighbours,
    the CPU cost of the ledger much less."""
    from pgserver import PostgresServer
    from riskpipe.ledger import open_ledger

    out: dict = {"mode": "broker" if broker else "offline", "events": n, "rounds": []}
    with PostgresServer(fsync=True) as pg:
        for r in range(rounds):
            row: dict = {}
            for backend in BACKENDS[r % 3:] + BACKENDS[:r % 3]:
                target = {"none": None, "sqlite": str(tmp / f"l{r}{broker}.sqlite"),
                          "postgresql": pg.create_database(f"l{r}{'b' if broker else 'o'}")}[backend]
                led = open_ledger(target) if target else None
                batches: list = []
                values = events(n, f"l{r}{backend[0]}{'b' if broker else 'o'}")
                cpu = time.process_time()
                try:
                    if broker:
                        stats, secs, _ = run_broker(pipeline, values, ledger=led, after_commit=[batches.append])
                    else:
                        stats, secs = run_offline(pipeline, values, tmp, ledger=led, after_commit=[batches.append])
                finally:
                    if led is not None:
                        led.close()
                row[backend] = stats.decided / secs
                row[f"{backend}_cpu_ms_per_decision"] = 1000 * (time.process_time() - cpu) / stats.decided
                row[f"{backend}_ledger_ms_per_batch"] = 1000 * float(np.mean([o.ledger_seconds for o in batches]))
                row[f"{backend}_waited_ms_per_batch"] = 1000 * float(np.mean([o.waited for o in batches]))
                row[f"{backend}_batches"] = len(batches)
            row["ratio_sqlite_vs_none"] = row["sqlite"] / row["none"]
            row["ratio_postgresql_vs_none"] = row["postgresql"] / row["none"]
            for b in BACKENDS[1:]:
                row[f"cpu_{b}_vs_none"] = row[f"{b}_cpu_ms_per_decision"] / row["none_cpu_ms_per_decision"]
            print(f"{out['mode']} round {r + 1}: " + ", ".join(
                f"{k} {row[k]:.3g}" for k in (*BACKENDS, "ratio_sqlite_vs_none", "ratio_postgresql_vs_none",
                                              "cpu_sqlite_vs_none", "cpu_postgresql_vs_none")),
                flush=True)
            out["rounds"].append(row)
    keys = ("ratio_sqlite_vs_none", "ratio_postgresql_vs_none", "cpu_sqlite_vs_none", "cpu_postgresql_vs_none",
            *BACKENDS, *(f"{b}_cpu_ms_per_decision" for b in BACKENDS),
            *(f"{b}_{m}_ms_per_batch" for b in BACKENDS[1:] for m in ("ledger", "waited")))
    for k in keys:
        vals = sorted(x[k] for x in out["rounds"])
        out[k] = {"min": vals[0], "median": float(np.median(vals)), "max": vals[-1]}
    return out


def ledger_table(sections: list[dict]) -> str:
    rows = []
    for led in sections:
        for b in BACKENDS[1:]:
            k = f"ratio_{b}_vs_none"
            rows.append((f"{led['mode']}: {b} / no ledger (min / median / max)",
                         f"{led[k]['min']:.2f} / {led[k]['median']:.2f} / {led[k]['max']:.2f}", ">= 0.95"))
            k = f"cpu_{b}_vs_none"
            rows.append((f"{led['mode']}: {b} / no ledger, process CPU per decision",
                         f"{led[k]['min']:.2f} / {led[k]['median']:.2f} / {led[k]['max']:.2f}", ""))
            rows.append((f"{led['mode']}: {b} ledger ms / stage waited ms, per batch (median)",
                         f"{led[f'{b}_ledger_ms_per_batch']['median']:.1f} / "
                         f"{led[f'{b}_waited_ms_per_batch']['median']:.1f}", ""))
    return table(rows, ("ledger in the stage", "measured", "target"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=5000, help="events for the throughput comparison")
    ap.add_argument("--memory-events", type=int, default=100_000)
    ap.add_argument("--ledger-events", type=int, default=1500, help="events per run of the ledger comparison")
    ap.add_argument("--ledger-rounds", type=int, default=7)
    ap.add_argument("--offline-ledger-events", type=int, default=1500,
                    help="events per run of the offline ledger comparison (0: skip it)")
    ap.add_argument("--only-ledger", action="store_true",
                    help="just the ledger comparison (bench/results/stream_ledger.json)")
    args = ap.parse_args()
    cfg = load_config(None)
    pipeline = build_pipeline(cfg)
    results: dict = {"params": {"events": args.events, "policy": cfg.policy, "batch_max_events": 256}}
    overhead = []

    def on_batch(n, s, c):
        overhead.append((s - c) / n)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        run_offline(pipeline, events(300, "warm"), tmp)  # warm caches and the context index
        offline = (ledger_section(pipeline, args.offline_ledger_events, args.ledger_rounds, tmp, broker=False)
                   if args.offline_ledger_events else None)
        led = ledger_section(pipeline, args.ledger_events, args.ledger_rounds, tmp, broker=True)
        print(ledger_table([x for x in (offline, led) if x is not None]))
        if args.only_ledger:
            print(f"wrote {write_results('stream_ledger', {'params': vars(args), 'ledger': led, 'offline': offline})}")
            return
        results["ledger"], results["ledger_offline"] = led, offline
        off_stats, off_s = run_offline(pipeline, events(args.events, "off"), tmp, on_batch)
        br_stats, br_s, join_s = run_broker(pipeline, events(args.events, "br"), on_batch)
        results["throughput"] = {"group_join_seconds": join_s,
            "offline_decisions_per_s": off_stats.decided / off_s, "broker_decisions_per_s": br_stats.decided / br_s,
            "ratio_broker_vs_offline": (br_stats.decided / br_s) / (off_stats.decided / off_s),
            "offline_certify_share": pipeline.certify_seconds and None,
        }
        ov = np.array(overhead) * 1000
        results["overhead_ms_per_message"] = {"p50": float(np.percentile(ov, 50)), "p99": float(np.percentile(ov, 99)),
                                              "batches": int(len(ov))}
        # memory: the same stage, events cycled, RSS at 10k and at N
        mem = {}
        done = {"n": 0}

        def mem_hook(n, s, c):
            done["n"] += n
            for mark in (10_000, args.memory_events):
                if done["n"] >= mark and mark not in mem:
                    mem[mark] = rss_mb()

        chunk = 10_000
        sent = 0
        while sent < args.memory_events:
            run_offline(pipeline, events(min(chunk, args.memory_events - sent), f"m{sent}"), tmp, mem_hook)
            sent += chunk
            for f in (tmp / "out").glob("*.jsonl"):
                f.unlink()
        results["memory_mb"] = {str(k): v for k, v in sorted(mem.items())}
        results["memory_growth"] = mem[args.memory_events] / mem[10_000] - 1
    results["throughput"].pop("offline_certify_share")
    path = write_results("stream", results)
    t, o = results["throughput"], results["overhead_ms_per_message"]
    print(table([
        ("offline decisions/s", f"{t['offline_decisions_per_s']:.0f}", ">= 1000"),
        ("broker decisions/s", f"{t['broker_decisions_per_s']:.0f}", ">= 1000"),
        ("broker / offline", f"{t['ratio_broker_vs_offline']:.2f}", ">= 0.8"),
        ("overhead outside certification p50 / p99", f"{o['p50']:.3f} / {o['p99']:.3f} ms", "p50 <= 0.5 ms"),
        (f"RSS after 10k / {args.memory_events // 1000}k events",
         f"{results['memory_mb']['10000']:.0f} / {results['memory_mb'][str(args.memory_events)]:.0f} MB "
         f"({results['memory_growth'] * 100:+.1f}%)", "within 10%"),
    ], ("figure", "measured", "target")))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
