"""Randomized-smoothing benchmark (issue 2) on the demo digits test split.

sigma=0.25, alpha=0.001, epsilon=0.25 (l2). Prints a table and writes
bench/results/smoothing.json:
* model evaluations per decision in decide mode (median, p90, mean) vs CERTIFY at
  n0=100, n=100000, and their agreement on "radius >= epsilon";
* mean evaluations at budgets 100000, 10000, 2000 and how many inputs each budget
  turns from certified to not certified (against budget 100000);
* certification throughput vs the physical limit: evaluations/s inside decide_batch
  over the split / the model's best raw forward samples/s (same run), for the demo
  model and a 4x wider one;
* decisions/s of decide_batch over the split at budget 10000;
* peak memory of CERTIFY at n=100000 for one input, above the loaded model.

``--quick`` runs CERTIFY on a 60-input subset (the full split is 54M evaluations).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from common import best_forward, table, write_results
from riskpipe.certify.smoothing import Smoothing
from riskpipe.models import load_model
from riskpipe.models.digits import load_split

SIGMA, ALPHA, EPS = 0.25, 0.001, 0.25


def decide(model, X, budget, batch_size=4096):
    s = Smoothing(model, sigma=SIGMA, alpha=ALPHA, max_samples=budget, batch_size=batch_size)
    t0 = time.perf_counter()
    certs = s.decide_batch(X, list(range(len(X))), EPS)
    return certs, time.perf_counter() - t0


def peak_memory_certify() -> dict:
    """Run in a fresh process so the peak belongs to CERTIFY alone."""
    code = r'''
import json, sys
sys.path.insert(0, "bench")
from common import peak_rss_reset, rss_mb
from riskpipe.models import load_model
from riskpipe.models.digits import load_split
from riskpipe.certify.smoothing import Smoothing
m = load_model("demo:digits"); X, _ = load_split("test")
s = Smoothing(m, sigma=0.25, alpha=0.001, n0=100, n=1000)
s.certify(X[0], seed=0)            # warm up allocator and kernels
base = rss_mb(); peak_rss_reset()
s = Smoothing(m, sigma=0.25, alpha=0.001, n0=100, n=100000)
c = s.certify(X[0], seed=1)
print(json.dumps({"rss_after_model_mb": base, "peak_during_certify_mb": rss_mb("VmHWM"), "radius": c.radius}))
'''
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    r = __import__("json").loads(out.stdout.strip().splitlines()[-1])
    r["above_model_mb"] = r["peak_during_certify_mb"] - r["rss_after_model_mb"]
    return r


def wide_model():
    from riskpipe.models import demo

    demo.register_demo(demo.Recipe("digits-wide4", width=32), lambda: demo.digits_cnn(32), demo.train_noise)
    return load_model("demo:digits-wide4")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="CERTIFY on 60 inputs instead of all 540")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model("demo:digits")
    X, _y = load_split("test")
    results: dict = {"params": {"sigma": SIGMA, "alpha": ALPHA, "epsilon": EPS, "norm": "l2", "inputs": len(X)}}

    # 1. decide vs CERTIFY
    by_budget = {}
    for budget in (100_000, 10_000, 2_000):
        certs, wall = decide(model, X, budget)
        n = np.array([c.n_samples for c in certs])
        by_budget[budget] = {"certs": certs, "wall": wall, "n": n}
    full = by_budget[100_000]
    sub = slice(0, 60) if args.quick else slice(0, len(X))
    s = Smoothing(model, sigma=SIGMA, alpha=ALPHA, n0=100, n=100_000, batch_size=16384)
    t0 = time.perf_counter()
    cert = s.certify_batch(X[sub], list(range(len(X)))[sub])
    certify_wall = time.perf_counter() - t0
    cert_yes = np.array([(not c.abstained) and c.radius >= EPS for c in cert])
    dec_yes = np.array([c.certified for c in full["certs"]])[sub]
    median = float(np.median(full["n"]))
    results["decide_vs_certify"] = {
        "decide_median_evals": median, "decide_p90_evals": float(np.percentile(full["n"], 90)),
        "decide_mean_evals": float(full["n"].mean()), "certify_evals": 100_100,
        "fewer_times_median": 100_100 / median, "agreement": float((cert_yes == dec_yes).mean()),
        "agreement_inputs": int(len(cert_yes)), "certify_wall_s": certify_wall,
        "certify_certified": int(cert_yes.sum()), "decide_certified": int(dec_yes.sum()),
        "information_floor_evals": 40,
    }
    base_yes = np.array([c.certified for c in full["certs"]])
    results["budgets"] = {
        str(b): {"mean_evals": float(v["n"].mean()), "median_evals": float(np.median(v["n"])),
                 "certified": int(sum(c.certified for c in v["certs"])),
                 "lost_vs_100000": int(np.sum(base_yes & ~np.array([c.certified for c in v["certs"]]))),
                 "at_budget": int(sum(c.reason == "budget" for c in v["certs"])), "wall_s": v["wall"],
                 "decisions_per_s": len(X) / v["wall"]}
        for b, v in by_budget.items()
    }

    # 2. throughput vs the physical limit, demo and 4x wider
    results["throughput"] = {}
    for name, m in (("demo:digits", model), ("demo:digits-wide4 (4x width)", wide_model())):
        rate, bs = best_forward(m)
        certs, wall = decide(m, X, 10_000, batch_size=bs)
        evals = sum(c.n_samples for c in certs)
        results["throughput"][name] = {
            "params": sum(p.numel() for p in m.module.parameters()), "best_forward_samples_per_s": rate,
            "best_batch": bs, "decide_evals_per_s": evals / wall, "ratio": evals / wall / rate,
            "decisions_per_s": len(X) / wall,
        }

    # 3. memory
    results["certify_memory"] = peak_memory_certify()
    path = write_results("smoothing", results)

    d = results["decide_vs_certify"]
    print(table([
        ("decide median / p90 / mean evals (budget 1e5)",
         f"{d['decide_median_evals']:.0f} / {d['decide_p90_evals']:.0f} / {d['decide_mean_evals']:.0f}",
         "median <= 64"),
        ("fewer evals than CERTIFY (median)", f"{d['fewer_times_median']:.0f}x", ">= 1500x"),
        ("agreement with CERTIFY on radius >= eps", f"{d['agreement']:.3f} ({d['agreement_inputs']} inputs)",
         ">= 0.99"),
        *[(f"budget {b}: mean evals, lost certificates", f"{v['mean_evals']:.0f}, {v['lost_vs_100000']}", "")
          for b, v in results["budgets"].items()],
        *[(f"{n}: evals/s / best forward",
           f"{v['ratio']:.2f} ({v['decide_evals_per_s']:.0f} / {v['best_forward_samples_per_s']:.0f})", ">= 0.9")
          for n, v in results["throughput"].items()],
        ("decisions/s at budget 10000 (demo)", f"{results['budgets']['10000']['decisions_per_s']:.0f}", ">= 1000"),
        ("CERTIFY n=1e5 peak above model", f"{results['certify_memory']['above_model_mb']:.1f} MB", "<= 100 MB"),
    ], ("figure", "measured", "target")))
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
