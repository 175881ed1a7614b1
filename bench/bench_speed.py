"""Issue 15 benchmark: how close the stage runs to the machine's limit.

Measured side by side in one run (the machine is shared and noisy: ratios, not
absolute rates, are the figures to judge) and written to bench/results/speed.json:

* forward probe: the model's raw forward rate per batch size, its best rate and the
  batch size the stage chooses by itself (riskpipe.tuning, fresh probe), for the
  demo model and a CIFAR-sized CNN (3x32x32, 603k parameters);
* decide_batch evaluations/s at that batch size vs the best raw forward rate
  (target >= 0.9), both models; for the demo also vs the forward rate at the chosen
  size measured just before and after decide_batch in each round (the machine's load
  moves between the start-up probe and the round);
* demo model, same events: offline stage rate vs decide_batch alone (>= 0.8),
  broker rate vs offline rate (>= 0.9), broker rate vs the physical limit = best
  forward rate / mean evaluations per decision (>= 0.6);
* per-message work outside certification (batch wall time minus certifier time, per
  message), p50 offline (<= 0.15 ms) and through the broker (<= 0.3 ms);
* bytes on the wire and parse time per event (parse_event: envelope, decode,
  validation) for JSON FP32, binary FP32 and binary UINT8 at 3x32x32 and 3x224x224.

Usage: python bench/bench_speed.py [--events 2000] [--rounds 2] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from bench_stream import events, run_broker, run_offline  # noqa: E402
from common import best_forward, table, write_results  # noqa: E402
from riskpipe.app.compose import build_pipeline  # noqa: E402
from riskpipe.app.config import load_config  # noqa: E402
from synthetic import cifar_cnn, policy_without_context, save_torchscript  # noqa: E402


def probe_and_choose(model, cache: Path) -> dict:
    from riskpipe.tuning import certify_batch_size

    choice = certify_batch_size(model, cache_dir=cache)  # a fresh cache: a real probe
    return {"rates": {str(b): r for b, r in sorted(choice.rates.items())}, "best_rate": max(choice.rates.values()),
            "chosen": choice.size}


def decide_rate(entry, X: np.ndarray, seeds: list[int], chunk: int) -> dict:
    """decide_batch alone over ``X`` in micro-batches of ``chunk``: evaluations/s, decisions/s."""
    t, evals = 0.0, 0
    for s in range(0, len(X), chunk):
        t0 = time.perf_counter()
        certs = entry.certifier.run("decide", X[s:s + chunk], seeds[s:s + chunk], entry.epsilon_cert)
        t += time.perf_counter() - t0
        evals += sum(c.n_samples for c in certs)
    return {"seconds": t, "evaluations": evals, "evaluations_per_s": evals / t, "decisions_per_s": len(X) / t,
            "mean_evaluations_per_decision": evals / len(X)}


def stream_section(args, tmp: Path, cache: Path) -> dict:
    """Demo model: probe, decide_batch alone, offline and broker on the same events."""
    from riskpipe.models.digits import load_split

    pipeline = build_pipeline(load_config(None, torch_threads=args.threads))
    entry = pipeline.entries["digits"]
    model = entry.certified
    probe = probe_and_choose(model, cache)
    entry.certifier.batch_size = probe["chosen"]
    values = events(args.events, "s")
    X, _ = load_split("test")
    Xs = np.stack([X[i % len(X)] for i in range(args.events)])
    seeds = [pipeline.seed(f"s-{i}", "digits") for i in range(args.events)]
    run_offline(pipeline, events(256, "warm"), tmp)  # warm-up: caches, allocator, context index
    rounds = []
    for r in range(args.rounds):  # interleaved: each round measures all three back to back
        ov_off, ov_br = [], []
        fwd_before = best_forward(model, (probe["chosen"],), seconds=0.5)[0]
        alone = decide_rate(entry, Xs, seeds, 256)
        fwd_side = (fwd_before + best_forward(model, (probe["chosen"],), seconds=0.5)[0]) / 2
        c0 = pipeline.certify_seconds
        off_stats, off_s = run_offline(pipeline, values, tmp, lambda n, s, c: ov_off.append((s - c) / n))
        off_cert = pipeline.certify_seconds - c0
        br_stats, br_s, _ = run_broker(pipeline, [v.replace(b'"s-', f'"b{r}-'.encode()) for v in values],
                                    lambda n, s, c: ov_br.append((s - c) / n))
        assert off_stats.decided == br_stats.decided == args.events, (off_stats.decided, br_stats.decided)
        off_rate, br_rate = off_stats.decided / off_s, br_stats.decided / br_s
        limit = probe["best_rate"] / alone["mean_evaluations_per_decision"]
        rounds.append({
            "decide_batch_alone": alone, "offline_decisions_per_s": off_rate, "broker_decisions_per_s": br_rate,
            "offline_certify_seconds": off_cert, "offline_seconds": off_s,
            "ratio_offline_vs_decide_batch": off_rate / alone["decisions_per_s"],
            "ratio_broker_vs_offline": br_rate / off_rate,
            "physical_limit_decisions_per_s": limit, "ratio_broker_vs_physical_limit": br_rate / limit,
            "ratio_decide_evals_vs_best_forward": alone["evaluations_per_s"] / probe["best_rate"],
            # the same forward at the chosen size, just before and after (the load changes between)
            "forward_side_by_side_per_s": fwd_side,
            "ratio_decide_evals_vs_forward_side_by_side": alone["evaluations_per_s"] / fwd_side,
            "overhead_ms_p50_offline": 1e3 * float(np.median(ov_off)),
            "overhead_ms_p50_broker": 1e3 * float(np.median(ov_br)),
        })
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in rounds[-1].items() if isinstance(v, float)),
              flush=True)
    keys = [k for k, v in rounds[0].items() if isinstance(v, float)]
    return {"probe": probe, "rounds": rounds,
            "median": {k: statistics.median(r[k] for r in rounds) for k in keys}}


def cnn_section(args, tmp: Path, cache: Path) -> dict:
    """The CIFAR-sized CNN: probe, then decide_batch at the chosen size (and at 4096)."""
    spec = save_torchscript(cifar_cnn(), tmp / "cnn.pt", (3, 32, 32)) + "&range=0,1"
    cfg_path = tmp / "cnn.yaml"
    cfg_path.write_text(json.dumps({"policy": policy_without_context(tmp), "models": {"cnn": spec}}))
    entry = build_pipeline(load_config(str(cfg_path), torch_threads=args.threads)).entries["cnn"]
    probe = probe_and_choose(entry.certified, cache)
    rng = np.random.default_rng(0)
    X = (rng.integers(0, 256, size=(args.cnn_inputs, 3, 32, 32)) / 255).astype(np.float32)  # on the 8-bit grid
    seeds = list(range(len(X)))
    entry.certifier.batch_size = probe["chosen"]
    at_chosen = decide_rate(entry, X, seeds, len(X))
    return {"probe": probe, "decide_at_chosen": at_chosen,
            "ratio_decide_evals_vs_best_forward": at_chosen["evaluations_per_s"] / probe["best_rate"]}


def wire_section(reps: int) -> dict:
    """Bytes on the wire and parse time per event, three encodings, two image sizes."""
    from riskpipe.models.base import Model
    from riskpipe.stream.binary import make_binary_event
    from riskpipe.stream.events import make_event, parse_event

    out = {}
    rng = np.random.default_rng(0)
    for shape in ((3, 32, 32), (3, 224, 224)):
        model = Model(spec="shape-only", input_shape=shape, num_classes=10, sha256="0" * 64, value_range=(0.0, 1.0))
        models = {"m": model}
        pixels = rng.integers(0, 256, size=shape, dtype=np.uint8)
        x = pixels.astype(np.float32) / 255
        forms = {
            "json_fp32": (json.dumps(make_event("e", "m", x)).encode(), []),
            "binary_fp32": make_binary_event("e", "m", x, "FP32"),
            "binary_uint8": make_binary_event("e", "m", pixels, "UINT8"),
        }
        for name, (value, headers) in forms.items():
            n = max(3, reps // (10 if shape[1] > 100 and name == "json_fp32" else 1))
            parse_event(value, headers, models, max_bytes=64 << 20, max_binary_bytes=64 << 20)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                parse_event(value, headers, models, max_bytes=64 << 20, max_binary_bytes=64 << 20)
                times.append(time.perf_counter() - t0)
            out[f"{name}_{'x'.join(map(str, shape))}"] = {
                "bytes": len(value) + sum(len(k) + len(v) for k, v in headers),
                "parse_ms_p50": 1e3 * float(np.median(times)), "reps": n}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--cnn-inputs", type=int, default=16)
    ap.add_argument("--wire-reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the stage's torch_threads)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict = {"params": vars(args)}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results["wire"] = wire_section(args.wire_reps)
        results["cnn"] = cnn_section(args, tmp, tmp / "cache")
        results["demo"] = stream_section(args, tmp, tmp / "cache")
    path = write_results("speed", results)
    m, c, w = results["demo"]["median"], results["cnn"], results["wire"]
    ok = lambda v, t, ge=True: f"{'met' if (v >= t if ge else v <= t) else 'MISSED'}"  # noqa: E731
    rows = [
        ("demo: chosen batch / best forward rate", f"{results['demo']['probe']['chosen']} / "
         f"{results['demo']['probe']['best_rate']:.0f} evals/s", "", ""),
        ("demo: decide_batch evals/s vs best forward", f"{m['ratio_decide_evals_vs_best_forward']:.2f}", ">= 0.9",
         ok(m["ratio_decide_evals_vs_best_forward"], 0.9)),
        ("demo: decide_batch evals/s vs forward at chosen size, side by side",
         f"{m['ratio_decide_evals_vs_forward_side_by_side']:.2f}", ">= 0.9",
         ok(m["ratio_decide_evals_vs_forward_side_by_side"], 0.9)),
        ("cnn: chosen batch / best forward rate", f"{c['probe']['chosen']} / {c['probe']['best_rate']:.0f} evals/s",
         "", ""),
        ("cnn: decide_batch evals/s vs best forward", f"{c['ratio_decide_evals_vs_best_forward']:.2f}", ">= 0.9",
         ok(c["ratio_decide_evals_vs_best_forward"], 0.9)),
        ("offline vs decide_batch alone", f"{m['ratio_offline_vs_decide_batch']:.2f}", ">= 0.8",
         ok(m["ratio_offline_vs_decide_batch"], 0.8)),
        ("broker vs offline", f"{m['ratio_broker_vs_offline']:.2f}", ">= 0.9", ok(m["ratio_broker_vs_offline"], 0.9)),
        ("broker vs physical limit", f"{m['ratio_broker_vs_physical_limit']:.2f} "
         f"({m['broker_decisions_per_s']:.0f} of {m['physical_limit_decisions_per_s']:.0f}/s)", ">= 0.6",
         ok(m["ratio_broker_vs_physical_limit"], 0.6)),
        ("per-message work p50 offline", f"{m['overhead_ms_p50_offline']:.3f} ms", "<= 0.15 ms",
         ok(m["overhead_ms_p50_offline"], 0.15, ge=False)),
        ("per-message work p50 broker", f"{m['overhead_ms_p50_broker']:.3f} ms", "<= 0.3 ms",
         ok(m["overhead_ms_p50_broker"], 0.3, ge=False)),
    ] + [(f"wire {k}", f"{v['bytes']} B, parse {v['parse_ms_p50']:.3f} ms", "", "") for k, v in w.items()]
    print(table(rows, ("figure", "measured", "target", "")))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
