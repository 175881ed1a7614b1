"""Scaling benchmark (issue 21 item 6): ``riskpipe run --workers N`` and N replicas in one group.

Configurations, measured side by side (interleaved round by round, each on a fresh embedded
broker with a 4-partition input topic; demo model, default policy, no ledger):
* ``1 worker``: ``riskpipe run --workers 1``;
* ``--workers 2``: one ``riskpipe run`` that starts two worker processes;
* ``2 replicas``: two separate ``riskpipe run`` processes with the same group id.

For each run, written to bench/results/workers.json:
* group join time, from process start and from the last member's subscription, to the moment
  every member holds its final share of the partitions (from the workers' ``-v`` log lines:
  ``subscribed to``, ``partitions assigned``, ``partitions revoked``; each carries its worker id);
* start to ready: until every member's stage has started (its ``riskpipe.status: model``
  line): a member joins its group before it builds its pipeline, so this can come after the join;
* decisions/s in total and per worker, once every member is ready, timed from the production of the first event to the
  last decision (the latest create timestamp of the audit records, stamped when the stage
  sends them), and each worker's share (the audit record's ``worker``);
* per round, the ratio of each configuration's total decisions/s to 1 worker's.
min / median / max over the rounds: the machine is shared, so single runs are noisy.

``--baseline DIR`` (a copy of an older commit, e.g. ``git archive``) runs every configuration
from DIR too, interleaved round by round, as ``NAME (baseline)``: before/after side by side.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parent.parent / "tests")]
from bench_stream import events  # noqa: E402
from common import table, write_results  # noqa: E402
from riskpipe import kafka_clients  # noqa: E402
from riskpipe.stream.broker import DEFAULT_TOPICS, EmbeddedBroker  # noqa: E402

PARTITIONS = 4
CONFIGS = {"1 worker": ("workers", 1), "--workers 2": ("workers", 2), "2 replicas": ("replicas", 2)}
LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[([^\]]+)\] riskpipe\.stream: "
                  r"(subscribed to|partitions assigned|partitions revoked)(.*)$")
READY = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \w+ \[([^\]]+)\] riskpipe\.status: model ")
TIMING = re.compile(r"riskpipe\.kafka: group \S+: session timeout (\d+) ms, heartbeat interval (\d+) ms")


class Members:
    """What the log lines say of each member: when it subscribed, what it holds now."""

    def __init__(self):
        self.subscribed: dict[str, float] = {}
        self.holds: dict[str, frozenset] = {}
        self.timing: tuple[int, int] | None = None
        self.changed = 0.0  # wall time of the latest assignment or revocation
        self.ready: dict[str, float] = {}  # when each member's pipeline was built (its stage started)

    def read(self, text: str) -> None:
        for line in text.splitlines():
            if (tm := TIMING.search(line)) is not None:
                self.timing = (int(tm.group(1)), int(tm.group(2)))
            if (rd := READY.match(line)) is not None:
                self.ready.setdefault(rd.group(2), datetime.strptime(rd.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp())
            m = LINE.match(line)
            if not m:
                continue
            ts, who, what, rest = m.groups()
            t = datetime.strptime(ts, "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if what == "subscribed to":
                self.subscribed.setdefault(who, t)
                continue
            parts = frozenset(int(p.rsplit("-", 1)[1]) for p in ast.literal_eval(rest.lstrip(": ").strip()))
            self.holds[who] = (self.holds.get(who, frozenset()) - parts) if what == "partitions revoked" else parts
            self.changed = max(self.changed, t)

    def stable(self, n: int) -> bool:
        """n members, each holding a share, the shares disjoint and covering every partition."""
        held = [h for h in self.holds.values() if h]
        return (len(self.subscribed) >= n and len(held) == n and sum(map(len, held)) == PARTITIONS
                and len(frozenset().union(*held)) == PARTITIONS)


ROOT = Path(__file__).resolve().parent.parent


def launch(kind: str, n: int, bootstrap: str, group: str, logdir: Path, extra: list[str],
           root: Path = ROOT) -> list[subprocess.Popen]:
    base = [sys.executable, "-m", "riskpipe.cli", "run", "--bootstrap-servers", bootstrap, "--group-id", group,
            "--no-ledger", "-v", *extra]
    # cwd too: `python -m` puts the working directory ahead of PYTHONPATH
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    if kind == "workers":  # one parent; its workers are w0..w{n-1} (one worker: given that id)
        cmd = base + (["--workers", str(n)] if n > 1 else ["--worker-id", "w0"])
        return [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=(logdir / "p0.log").open("w"), env=env,
                                 cwd=root)]
    return [subprocess.Popen(base + ["--worker-id", f"r{i}"], stdout=subprocess.DEVNULL,
                             stderr=(logdir / f"p{i}.log").open("w"), env=env, cwd=root) for i in range(n)]


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=60)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def read_audit(reader, want: int, timeout: float) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        for recs in reader.poll(timeout_ms=500, max_records=5000).values():
            got.extend(recs)
    return got


def one_run(name: str, n_events: int, extra: list[str], run_no: int, root: Path = ROOT) -> dict:
    kind, n = CONFIGS[name]
    group = f"bench-{uuid.uuid4().hex[:8]}"
    with EmbeddedBroker() as b, tempfile.TemporaryDirectory() as d:
        b.create_topics(["inferences"], partitions=PARTITIONS)
        b.create_topics([t for t in DEFAULT_TOPICS if t != "inferences"])
        settings = kafka_clients.KafkaSettings(bootstrap_servers=b.bootstrap)
        values = events(n_events, f"{run_no}-{kind}{n}")
        logdir = Path(d)
        t_launch = time.time()
        procs = launch(kind, n, b.bootstrap, group, logdir, extra, root)
        members = Members()
        try:
            deadline = time.monotonic() + 180
            while not members.stable(n):
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    logs = "\n".join(f.read_text()[-3000:] for f in logdir.glob("*.log"))
                    codes = [p.poll() for p in procs]
                    raise RuntimeError(f"{name}: the group did not form (exit codes {codes})\n{logs}")
                time.sleep(0.05)
                members = Members()
                for f in sorted(logdir.glob("*.log")):
                    members.read(f.read_text())
            join = {"from_start_s": members.changed - t_launch,
                    "from_subscribe_s": members.changed - max(members.subscribed.values()),
                    "start_to_subscribe_s": max(members.subscribed.values()) - t_launch}
            # a member joins before its pipeline is built: events are produced once every one is ready,
            # so decisions/s is the stage's, not its start-up's
            while len(members.ready) < n:
                if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                    raise RuntimeError(f"{name}: the members did not start their stages")
                time.sleep(0.05)
                for f in sorted(logdir.glob("*.log")):
                    members.read(f.read_text())
            join["start_to_ready_s"] = max(members.ready.values()) - t_launch
            from kafka import TopicPartition

            reader = kafka_clients.consumer(settings, enable_auto_commit=False, fetch_max_wait_ms=100)
            reader.assign([TopicPartition("audit", 0)])
            reader.seek_to_beginning()
            producer = kafka_clients.producer(settings, acks="all", linger_ms=5, batch_size=1 << 18)
            t0 = time.time()
            for i, v in enumerate(values):
                producer.send("inferences", key=str(i).encode(), value=v)
            producer.flush()
            producer.close()
            recs = read_audit(reader, n_events, timeout=600)
            reader.close()
        finally:
            stop(procs)
    if len(recs) < n_events:
        raise RuntimeError(f"{name}: {len(recs)} of {n_events} decisions")
    last = max(r.timestamp for r in recs) / 1000
    per: dict[str, dict] = {}
    for r in recs:
        w = json.loads(r.value)["worker"]
        e = per.setdefault(w, {"decisions": 0, "last": 0.0})
        e["decisions"] += 1
        e["last"] = max(e["last"], r.timestamp / 1000)
    total = len(recs) / (last - t0)
    return {"config": name, "members": n, "join": join, "group_timing_ms": members.timing,
            "decisions": len(recs), "seconds": last - t0, "decisions_per_s": total,
            "per_worker_decisions_per_s": total / n,
            "workers": {w: {"decisions": e["decisions"], "decisions_per_s": e["decisions"] / (e["last"] - t0)}
                        for w, e in sorted(per.items())},
            "load_avg_1m": os.getloadavg()[0]}


def spread(vals: list[float]) -> dict:
    v = sorted(vals)
    return {"min": v[0], "median": float(np.median(v)), "max": v[-1]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000, help="events per run")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--session-timeout-ms", type=int, default=None, help="passed to riskpipe run (default: its own)")
    ap.add_argument("--heartbeat-interval-ms", type=int, default=None, help="passed to riskpipe run")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout, run side by side")
    args = ap.parse_args()
    roots = {"": ROOT} | ({" (baseline)": args.baseline.resolve()} if args.baseline else {})
    extra = []
    if args.session_timeout_ms is not None:
        extra += ["--session-timeout-ms", str(args.session_timeout_ms)]
    if args.heartbeat_interval_ms is not None:
        extra += ["--heartbeat-interval-ms", str(args.heartbeat_interval_ms)]
    runs: list[dict] = []
    for r in range(args.rounds):
        for config in CONFIGS:
            for suffix, root in roots.items():
                name = config + suffix
                run = one_run(config, args.events, extra, r, root)
                run["config"], run["round"] = name, r
                runs.append(run)
                print(f"round {r + 1} {name}: join {run['join']['from_start_s']:.2f} s from start, "
                          f"{run['join']['from_subscribe_s']:.2f} s from subscribe, ready "
                      f"{run['join']['start_to_ready_s']:.2f} s from start; {run['decisions_per_s']:.0f} "
                      f"decisions/s ({', '.join(w + ' ' + str(e['decisions']) for w, e in run['workers'].items())})",
                      flush=True)
    summary: dict = {}
    for name, suffix in ((c + sfx, sfx) for c in CONFIGS for sfx in roots):
        base = {x["round"]: x["decisions_per_s"] for x in runs if x["config"] == "1 worker" + suffix}
        mine = [x for x in runs if x["config"] == name]
        summary[name] = {
            "join_from_start_s": spread([x["join"]["from_start_s"] for x in mine]),
            "join_from_subscribe_s": spread([x["join"]["from_subscribe_s"] for x in mine]),
            "start_to_ready_s": spread([x["join"]["start_to_ready_s"] for x in mine]),
            "decisions_per_s": spread([x["decisions_per_s"] for x in mine]),
            "per_worker_decisions_per_s": spread([x["per_worker_decisions_per_s"] for x in mine]),
            "ratio_vs_1_worker": spread([x["decisions_per_s"] / base[x["round"]] for x in mine]),
        }
    timing = {tuple(x["group_timing_ms"] or ()) for x in runs}
    path = write_results("workers", {
        "params": {"events": args.events, "rounds": args.rounds, "partitions": PARTITIONS, "ledger": None,
                   "baseline": str(args.baseline) if args.baseline else None,
                   "model": "demo:digits", "policy": "default", "group_timing_ms": sorted(timing),
                   "machine_note": "2 cores shared with other users' jobs: figures are noisy, see load_avg_1m per run"},
        "summary": summary, "runs": runs})

    def mmm(d, fmt="{:.2f}"):
        return " / ".join(fmt.format(d[k]) for k in ("min", "median", "max"))

    print(table([(name, mmm(s["join_from_start_s"]), mmm(s["join_from_subscribe_s"]), mmm(s["start_to_ready_s"]),
                  mmm(s["decisions_per_s"], "{:.0f}"), mmm(s["per_worker_decisions_per_s"], "{:.0f}"),
                  mmm(s["ratio_vs_1_worker"]))
                 for name, s in summary.items()],
                ("config (min / median / max)", "join from start s", "join from subscribe s", "start to ready s",
                 "decisions/s",
                 "per worker", "vs 1 worker")))
    print(f"group timing (session, heartbeat ms): {sorted(timing)}; target: a 2-member group joins in <= 3 s")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
