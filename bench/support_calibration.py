"""Calibration of the support signal (policies/README.md, ``support_risk``).

For six data sets (scikit-learn's wine, breast cancer, iris, digits and the two examples'
reference sets) the rows are split in half at random (seed 0): one half is the reference
set, the other stands in for live in-distribution traffic. For each held-out row the
ratio d / q is measured: d its distance (l2; standardized units for tabular data, as
``scale: standardize`` uses) to the nearest reference row of any class, q the reference
set's own leave-one-out nearest-neighbour distance at quantile 0.99. The shipped
policies' ``factor`` must lie above what in-distribution rows reach.

Prints a table and writes bench/results/support.json.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import table, write_results  # noqa: E402
from riskpipe.context import ContextIndex  # noqa: E402

QUANTILE = 0.99
FACTORS = (1.0, 1.5, 2.0, 2.5, 3.0)


def held_out_ratios(X: np.ndarray, y: np.ndarray, tabular: bool) -> np.ndarray:
    order = np.random.default_rng(0).permutation(len(X))
    ref, held = order[: len(X) // 2], order[len(X) // 2:]
    Xr, Xh = X[ref].reshape(len(ref), -1).astype(np.float32), X[held].reshape(len(held), -1).astype(np.float32)
    if tabular:
        s = Xr.std(axis=0)
        s[s == 0] = 1.0
        Xr, Xh = Xr / s, Xh / s
    index = ContextIndex.build(Xr, y[ref], "l2")
    ctx = index.context(Xh, [None] * len(Xh), np.zeros(len(Xh)), support_quantile=QUANTILE)
    return np.array([c["nearest_reference_distance"] / c["support_reference_distance"] for c in ctx])


def datasets():
    from sklearn.datasets import load_breast_cancer, load_digits, load_iris, load_wine

    for name, load in (("wine", load_wine), ("breast_cancer", load_breast_cancer), ("iris", load_iris)):
        d = load()
        yield name, d.data, d.target, True
    d = load_digits()
    yield "digits", d.data / 16.0, d.target, False
    for name, tabular in (("image", False), ("tabular", True)):
        with np.load(ROOT / "examples" / name / "reference.npz") as z:
            yield f"examples/{name}", z["X"], z["y"], tabular


def main() -> None:
    results, rows = {}, []
    for name, X, y, tabular in datasets():
        r = held_out_ratios(X, y, tabular)
        beyond = {f"{f:g}": float((r > f).mean()) for f in FACTORS}
        results[name] = {"reference_rows": len(X) // 2, "held_out_rows": len(r), "max_ratio": float(r.max()),
                         "median_ratio": float(np.median(r)), "fraction_beyond_factor": beyond}
        rows.append((name, len(r), f"{np.median(r):.2f}", f"{r.max():.2f}",
                     *(f"{beyond[f'{f:g}']:.3f}" for f in FACTORS)))
    print(table(rows, ("data set", "held out", "median d/q", "max d/q", *(f"> {f:g}" for f in FACTORS))))
    path = write_results("support", {"quantile": QUANTILE, "data_sets": results,
                                     "max_ratio_overall": max(v["max_ratio"] for v in results.values())})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
