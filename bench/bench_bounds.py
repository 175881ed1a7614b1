"""Benchmark: IBP and Lipschitz certification cost relative to a plain forward pass,
and the compare card's totals. Writes bench/results/bounds.json and prints a table.

Ratios are measured side by side in one run (best of several repeats), so a busy
machine slows numerator and denominator alike.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from riskpipe.certify.bounds import IntervalBounds
from riskpipe.certify.lipschitz import GlobalLipschitz, lipschitz_constants
from riskpipe.compare import CompareConfig, run_compare
from riskpipe.compare.measure import timed
from riskpipe.models import load_model
from riskpipe.models.digits import load_split

OUT = Path(__file__).parent / "results" / "bounds.json"
REPEAT = 7


def main() -> int:
    torch.set_num_threads(1)
    X = np.concatenate([load_split("test")[0], load_split("train")[0]])[:1000]
    x = torch.from_numpy(X)
    rows = []
    for spec in ("demo:digits", "demo:digits-ibp", "demo:digits-lipschitz"):
        model = load_model(spec)
        ibp, lip = IntervalBounds(model), GlobalLipschitz(model)
        y = model.predict(X)
        yt = torch.from_numpy(y)
        with torch.inference_mode():
            fwd = timed(lambda: model.module(x), repeat=REPEAT)
        one_pass = timed(lambda: ibp.margin_bounds(x, 0.05, yt), repeat=REPEAT)
        full = timed(lambda: ibp.certify_batch(X, list(range(len(X)))), repeat=2)
        t0 = time.perf_counter()
        lipschitz_constants(model, lip.n_iter, lip.tol, lip.safety)
        const_ms = (time.perf_counter() - t0) * 1e3
        lip_ms = timed(lambda: lip.certify_batch(X, list(range(len(X)))), repeat=REPEAT)
        lip_core = timed(lambda: lip.radii(X), repeat=REPEAT)  # the bound itself, without Certificate objects
        rows.append({"model": spec, "batch": len(X), "forward_ms": fwd, "ibp_pass_ms": one_pass,
                     "ibp_pass_ratio": one_pass / fwd, "ibp_certify_ms": full, "ibp_certify_ratio": full / fwd,
                     "ibp_passes": ibp.steps + 2, "lipschitz_constant_ms": const_ms,
                     "lipschitz_certify_ms": lip_ms, "lipschitz_ratio": lip_ms / fwd,
                     "lipschitz_radii_ms": lip_core, "lipschitz_radii_ratio": lip_core / fwd})
    card = run_compare(CompareConfig())
    totals = {"total_s": card["total_s"], "models": len(card["models"]),
              "inputs": card["data"]["n"],
              "per_method_total_ms": {f"{m['spec']}/{r['method']}": r["total_ms"]
                                      for m in card["models"] for r in m["methods"]}}
    result = {"rows": rows, "compare_card": totals, "targets": {"ibp_pass_ratio": 4.0, "lipschitz_ratio": 1.5},
              "env": {"torch": torch.__version__, "threads": 1, "python": platform.python_version(),
                      "machine": platform.machine()}}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'model':24} {'fwd ms':>8} {'IBP pass':>9} {'x fwd':>6} {'IBP cert':>9} {'x fwd':>6} "
          f"{'Lip const':>9} {'Lip cert':>9} {'x fwd':>6} {'Lip core':>8} {'x fwd':>6}")
    for r in rows:
        print(f"{r['model']:24} {r['forward_ms']:8.2f} {r['ibp_pass_ms']:9.2f} {r['ibp_pass_ratio']:6.2f} "
              f"{r['ibp_certify_ms']:9.1f} {r['ibp_certify_ratio']:6.1f} {r['lipschitz_constant_ms']:9.1f} "
              f"{r['lipschitz_certify_ms']:9.2f} {r['lipschitz_ratio']:6.2f} {r['lipschitz_radii_ms']:8.2f} "
              f"{r['lipschitz_radii_ratio']:6.2f}")
    print(f"compare card (defaults): {totals['total_s']:.1f} s for {totals['models']} models x "
          f"{len(CompareConfig().methods)} methods on {totals['inputs']} inputs")
    print(f"wrote {OUT}")
    missed = [r["model"] for r in rows if r["ibp_pass_ratio"] > 4.0 or r["lipschitz_radii_ratio"] > 1.5]
    if missed:
        print(f"targets missed (IBP pass <= 4x, Lipschitz <= 1.5x forward) on: {', '.join(missed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
