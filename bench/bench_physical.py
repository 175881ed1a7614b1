"""Physical-limit ratio (issue 21 item 3): how close the stage runs to its model's own speed.

Physical limit of a model under smoothing = its best forward rate (samples/s, noise-free
batches, ``common.best_forward``) / mean model evaluations per decision (the
certificates' ``n_samples``). Ratio = the stage's decisions/s / that limit.

For the demo (``demo:digits``, default config and policy), the image example (3x32x32
CNN, its own policy: sound sampler, 8-bit grid) and the tabular example (skops MLP,
predict-only), in one process, interleaved over ``--rounds`` (min / median / max):

* best forward rate: a sweep over the default batch sizes once per model, then in each
  round at the best size just before and just after that model's stage run (their mean:
  the machine is shared and its load moves);
* offline: ``run_offline`` over a pre-written JSON-lines file (the stage's own code path,
  no ledger), wall time of the run; evaluations per decision from its audit records;
* the demo through the embedded broker (``bench_stream.run_broker``), timed from the
  production of the first event to the last decision, evaluations from its records;
* the process's peak RSS (VmHWM), the whole run;
* the offline ratio with the noise never drawn ahead (``ratio_overlap_off``: the
  certifier's ``overlap`` False, run right after the default run, which draws ahead
  where ``Smoothing._overlaps`` says it pays), so the helper thread's gain or loss on
  this machine's load is measured side by side;
* the offline ratio by CPU time too (``ratio_cpu``: decisions per CPU second of the process
  over the forward rate per CPU second / evaluations), less moved than the wall clock by
  the other processes of a shared machine; work on a second thread counts in it.

Every round decides the same events (same ids: same seeds), so each model's
certificates must be identical across rounds and between offline and broker; a digest
of them is written (``common.certificates_digest``) to compare code versions.
Writes bench/results/physical.json with the targets and met / MISSED.

    python bench/bench_physical.py [--rounds 3] [--demo-events 2000] [--image-events 96] [--tabular-events 1000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]
from bench_models import CASES, inputs  # noqa: E402
from bench_stream import run_broker  # noqa: E402
from common import (  # noqa: E402
    best_forward,
    certificates_digest,
    forward_rates,
    peak_rss_reset,
    rss_mb,
    table,
    write_results,
)
from riskpipe.app.compose import build_pipeline  # noqa: E402
from riskpipe.app.config import load_config  # noqa: E402
from riskpipe.app.offline import run_offline  # noqa: E402
from riskpipe.stream.events import make_event  # noqa: E402

TARGETS = {"demo": 0.8, "image": 0.8, "tabular": None, "demo_broker": 0.7}
SHORT = {"digits": "demo", "shapes": "image", "cancer": "tabular"}


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


class Case:
    """One model under its own config and policy: pipeline, events on disk, forward sweep."""

    def __init__(self, label: str, config_path: Path | None, model: str, n: int, tmp: Path, forward_s: float):
        self.label, self.model, self.name = label, model, SHORT[model]
        self.config = load_config(str(config_path) if config_path else None, ledger=None)
        self.pipeline = build_pipeline(self.config)  # sets the stage's torch threads before the probe
        self.entry = self.pipeline.entries[model]
        self.events = [make_event(f"{model}-{i}", model, x, upstream_risk=0.1) for i, x in enumerate(inputs(model, n))]
        self.path = tmp / f"{model}.jsonl"
        self.path.write_text("".join(json.dumps(e) + "\n" for e in self.events))
        self.tmp, self.forward_s = tmp, forward_s
        warm = tmp / f"{model}-warm.jsonl"  # first-call costs (allocator, lookup tables) out of the timing
        warm.write_text("".join(json.dumps(e) + "\n" for e in self.events[:64]))
        run_offline(str(warm), tmp / "warm", self.config, pipeline=self.pipeline)
        self.sweep_rate, self.best_batch = best_forward(self.entry.certified, seconds=forward_s)
        self.rounds: list[dict] = []
        self.digests: set[str] = set()
        self.broker_digests: set[str] = set()

    def forward(self) -> tuple[float, float]:
        """(wall-clock, CPU-time) forward rates at the best batch size."""
        return forward_rates(self.entry.certified, self.best_batch, self.forward_s)

    def offline_round(self) -> dict:
        fwd_before = self.forward()
        peak_rss_reset()
        wall, cpu, audit = self.run("auto")
        peak = rss_mb("VmHWM")
        off_wall, _, off_audit = self.run("off")
        fwd = mean_rates(fwd_before, self.forward())
        assert certificates_digest(off_audit) == certificates_digest(audit), self.label  # overlap changes none
        evals = sum(r["certificate"]["n_samples"] for r in audit)
        out = measure(len(audit), wall, evals, fwd, peak_rss_mb=peak, cpu=cpu)
        out["ratio_overlap_off"] = measure(len(audit), off_wall, evals, fwd)["ratio"]
        return out

    def run(self, overlap: str) -> tuple[float, float, list[dict]]:
        """(wall s, CPU s, audit records) of one offline run; ``overlap`` "off": never draw ahead."""
        certifier = self.entry.certifier
        saved = getattr(certifier, "overlap", None)
        if overlap == "off" and hasattr(certifier, "overlap"):
            certifier.overlap = False
        try:
            t0, c0 = time.perf_counter(), time.process_time()
            res = run_offline(str(self.path), self.tmp / f"{self.model}-{overlap}", self.config, pipeline=self.pipeline)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        finally:
            if hasattr(certifier, "overlap"):
                certifier.overlap = saved
        audit = res.read("audit")
        assert len(audit) == len(self.events), (self.label, len(audit), res.read("dlq")[:1])
        self.digests.add(certificates_digest(audit))
        return wall, cpu, audit


def mean_rates(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    return (a[0] + b[0]) / 2, (a[1] + b[1]) / 2


def measure(decided: int, wall: float, evals: int, forward: tuple[float, float], cpu: float | None = None,
            **extra) -> dict:
    """The ratio by the wall clock (the definition); with ``cpu`` (the run's CPU seconds) also by
    CPU time: decisions per CPU second over the forward rate per CPU second / evaluations."""
    evals_per_decision = evals / decided
    limit = forward[0] / evals_per_decision
    out = {"decisions_per_s": decided / wall, "wall_s": wall, "evals_per_decision": evals_per_decision,
           "forward_samples_per_s": forward[0], "physical_limit_decisions_per_s": limit,
           "ratio": decided / wall / limit, **extra}
    if cpu is not None:
        out.update(cpu_s=cpu, forward_samples_per_cpu_s=forward[1],
                   ratio_cpu=decided / cpu / (forward[1] / evals_per_decision))
    return out


def broker_round(demo: Case) -> dict:
    """The demo's events through the embedded broker (same ids: same certificates)."""
    records: list[dict] = []
    values = [json.dumps(e).encode() for e in demo.events]
    fwd_before = demo.forward()
    peak_rss_reset()
    stats, secs, join_s = run_broker(demo.pipeline, values, on_record=records.append)
    peak = rss_mb("VmHWM")
    fwd = mean_rates(fwd_before, demo.forward())
    assert stats.decided == len(values) == len(records), (stats.decided, len(records))
    demo.broker_digests.add(certificates_digest(records))
    return measure(stats.decided, secs, sum(r["certificate"]["n_samples"] for r in records), fwd,
                   group_join_s=join_s, peak_rss_mb=peak)


def summary(rounds: list[dict]) -> dict:
    keys = [k for k, v in rounds[0].items() if isinstance(v, float | int)]
    return {k: spread([r[k] for r in rounds]) for k in keys}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--demo-events", type=int, default=2000)
    ap.add_argument("--image-events", type=int, default=96)
    ap.add_argument("--tabular-events", type=int, default=1000)
    ap.add_argument("--forward-seconds", type=float, default=0.5, help="per batch size, per forward measurement")
    ap.add_argument("--no-broker", action="store_true", help="offline only")
    ap.add_argument("--out", default="physical", help="results name: bench/results/OUT.json")
    args = ap.parse_args()
    sizes = {"digits": args.demo_events, "shapes": args.image_events, "cancer": args.tabular_events}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = [Case(label, path, model, sizes[model], tmp, args.forward_seconds) for label, path, model in CASES]
        demo = next(c for c in cases if c.name == "demo")
        broker: list[dict] = []
        for r in range(args.rounds):  # interleaved: each round measures every case back to back
            for c in cases:
                c.rounds.append(c.offline_round())
            if not args.no_broker:
                broker.append(broker_round(demo))
            print(f"round {r + 1}: " + ", ".join(f"{c.name} {c.rounds[-1]['ratio']:.2f} (CPU time "
                                                  f"{c.rounds[-1]['ratio_cpu']:.2f})" for c in cases)
                  + (f", demo broker {broker[-1]['ratio']:.2f}" if broker else ""), flush=True)
    results: dict = {"params": vars(args), "definition": __doc__.split("\n\n")[1].replace("\n", " "), "models": {}}
    rows = []
    for c in cases:
        s = summary(c.rounds)
        target = TARGETS[c.name]
        results["models"][c.name] = {
            "label": c.label, "spec": c.entry.model.spec, "policy": c.entry.policy.name,
            "sampler": c.entry.certifier.sampler, "certify_batch_size": c.entry.certifier.batch_size,
            "noise_overlap": "auto (Smoothing._overlaps: a spare core and >= OVERLAP_MIN coordinates a piece)"
            if getattr(c.entry.certifier, "overlap", False) is None else getattr(c.entry.certifier, "overlap", None),
            "forward_batch": getattr(c.entry.certifier, "forward_batch", None),
            "events": len(c.events), "best_forward_sweep": {"samples_per_s": c.sweep_rate, "batch": c.best_batch},
            "rounds": c.rounds, **s, "target_ratio": target,
            "target_met": None if target is None else s["ratio"]["median"] >= target,
            "certificates_sha256": sorted(c.digests), "same_certificates_every_round": len(c.digests) == 1}
        rows.append(row(f"{c.name} offline", c.entry.certifier, s, target))
    if broker:
        s = summary(broker)
        target = TARGETS["demo_broker"]
        results["demo_broker"] = {"rounds": broker, **s, "target_ratio": target,
                                  "target_met": s["ratio"]["median"] >= target,
                                  "certificates_sha256": sorted(demo.broker_digests),
                                  "same_certificates_as_offline": demo.broker_digests == demo.digests}
        rows.append(row("demo broker", demo.entry.certifier, s, target))
    results["peak_rss_mb"] = max(
        [r["peak_rss_mb"] for c in cases for r in c.rounds] + [r["peak_rss_mb"] for r in broker])
    results["run_seconds"] = time.perf_counter() - t_start
    path = write_results(args.out, results)
    print(table(rows, ("case", "sampler", "noise piece / call", "best forward/s", "evals/decision",
                       "limit decisions/s", "decisions/s", "ratio min / median / max", "target (median)",
                       "CPU-time ratio", "ratio, noise not drawn ahead")))
    print(f"peak RSS of the stage process {results['peak_rss_mb']:.0f} MB; same certificates every round: "
          + ", ".join(f"{c.name} {len(c.digests) == 1}" for c in cases)
          + (f"; broker = offline: {demo.broker_digests == demo.digests}" if broker else ""))
    print(f"wrote {path} ({results['run_seconds']:.0f} s)")


def row(case: str, certifier, s: dict, target: float | None) -> tuple:
    return (case, certifier.sampler, calls(certifier), f"{s['forward_samples_per_s']['median']:.0f}",
            f"{s['evals_per_decision']['median']:.1f}", f"{s['physical_limit_decisions_per_s']['median']:.0f}",
            f"{s['decisions_per_s']['median']:.0f}", fmt(s["ratio"]), status(s["ratio"], target),
            fmt(s["ratio_cpu"]) if "ratio_cpu" in s else "",
            fmt(s["ratio_overlap_off"]) if "ratio_overlap_off" in s else "")


def calls(certifier) -> str:
    """Noise piece size (batch_size) / rows per model call (forward_size, where the code has one)."""
    return f"{certifier.batch_size} / {getattr(certifier, 'forward_size', certifier.batch_size)}"


def fmt(s: dict) -> str:
    return f"{s['min']:.2f} / {s['median']:.2f} / {s['max']:.2f}"


def status(s: dict, target: float | None) -> str:
    if target is None:
        return "(no target)"
    return f">= {target}: {'met' if s['median'] >= target else 'MISSED'}"


if __name__ == "__main__":
    main()
