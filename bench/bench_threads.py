"""Issue 15: how many intra-op threads torch should use in the stage (``torch_threads``).

decide_batch evaluations/s at 1, 2, ... (up to the core count) torch threads, measured
interleaved (each round runs every thread count back to back, so load changes hit all
alike), on the demo model and on a CIFAR-sized CNN (3x32x32, 603k parameters), at a
fixed certification batch size. Writes bench/results/threads.json; the stage's default
``torch_threads`` follows from it (riskpipe/app/config.py).

Usage: python bench/bench_threads.py [--rounds 4] [--inputs 256] [--cnn-inputs 4]
"""

from __future__ import annotations

import argparse
import json
import os
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
from common import table, write_results  # noqa: E402
from riskpipe.app.compose import build_pipeline  # noqa: E402
from riskpipe.app.config import load_config  # noqa: E402
from synthetic import cifar_cnn, policy_without_context, save_torchscript  # noqa: E402


def evals_per_s(entry, X, seeds) -> float:
    t0 = time.perf_counter()
    certs = entry.certifier.run("decide", X, seeds, entry.epsilon_cert)
    return sum(c.n_samples for c in certs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--inputs", type=int, default=256)
    ap.add_argument("--cnn-inputs", type=int, default=4)
    args = ap.parse_args()
    counts = list(range(1, (os.cpu_count() or 1) + 1))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        demo = build_pipeline(load_config(None, certify_batch_size=512)).entries["digits"]
        from riskpipe.models.digits import load_split

        X, _ = load_split("test")
        cases = {"demo": (demo, X[:args.inputs], list(range(args.inputs)))}
        spec = save_torchscript(cifar_cnn(), tmp / "cnn.pt", (3, 32, 32)) + "&range=0,1"
        (tmp / "cnn.yaml").write_text(json.dumps({"policy": policy_without_context(tmp), "models": {"cnn": spec},
                                                  "certify_batch_size": 128}))
        cnn = build_pipeline(load_config(str(tmp / "cnn.yaml"))).entries["cnn"]
        Xc = (np.random.default_rng(0).integers(0, 256, size=(args.cnn_inputs, 3, 32, 32)) / 255).astype(np.float32)
        cases["cnn"] = (cnn, Xc, list(range(args.cnn_inputs)))
        rates = {name: {t: [] for t in counts} for name in cases}
        for _ in range(args.rounds):
            for name, (entry, Xs, seeds) in cases.items():
                for t in counts:
                    torch.set_num_threads(t)
                    rates[name][t].append(evals_per_s(entry, Xs, seeds))
    results = {"params": vars(args), "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "models": {}}
    rows = []
    for name, by_t in rates.items():
        med = {t: statistics.median(v) for t, v in by_t.items()}
        results["models"][name] = {"evals_per_s": {str(t): v for t, v in by_t.items()},
                                   "median": {str(t): v for t, v in med.items()},
                                   "best_threads": max(med, key=med.get)}
        rows += [(name, t, f"{med[t]:.0f}", f"{med[t] / med[1]:.2f}", f"{min(by_t[t]):.0f}-{max(by_t[t]):.0f}")
                 for t in counts]
    path = write_results("threads", results)
    print(table(rows, ("model", "torch threads", "evals/s median", "vs 1 thread", "range")))
    print(f"load average {results['load_average']}\nwrote {path}")


if __name__ == "__main__":
    main()
