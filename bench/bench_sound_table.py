"""Issue 19: the sound sampler's noise table, built the old way and the new way, side by side.

The table T_i = ceil(2^62 Phi((i + 1/2) h / sigma)), i = -J .. J-1 (riskpipe.certify.samplers)
used to be evaluated entry by entry in 60-digit arithmetic; riskpipe.certify.normal_table
builds the same integers from about a hundred anchors. For sigma 0.25 on [0, 1] at 255
levels (8-bit images), 4,096 levels and 65,280 levels (what ``riskpipe init`` suggests for
UINT8 data scaled by 1/256), this times both (wall and process CPU time, so the load of a
shared machine shows), checks that they are equal entry for entry, and writes
bench/results/sound_table.json. ``--skip-old-above N`` times the old way only on tables of
at most N entries (it takes minutes on the largest).

Usage: python bench/bench_sound_table.py [--skip-old-above 400000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import table, write_results  # noqa: E402
from riskpipe.certify import normal_table  # noqa: E402

SIGMA = 0.25
LEVELS = (255, 4096, 65280)


def old_table(s: float, J: int) -> np.ndarray:
    """The former riskpipe.certify.samplers._table: every entry in 60-digit arithmetic."""
    import mpmath

    mpmath.mp.dps = 60
    ms = mpmath.mpf(s)
    q = 1 << 62
    return np.array([int(mpmath.ceil(q * mpmath.ncdf((i + mpmath.mpf(0.5)) / ms))) for i in range(-J, J)],
                    dtype=np.int64)


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-old-above", type=int, default=400_000)
    args = ap.parse_args()
    import mpmath

    mpmath.mp.dps = 60
    mpmath.ncdf(mpmath.mpf(1))  # imports and first-call set-up outside the timings
    rows, results = [], []
    for levels in LEVELS:
        s = SIGMA * levels  # sigma / h with h = 1 / levels
        J = normal_table.table_entries(s) // 2
        new, new_wall, new_cpu = timed(lambda: normal_table.thresholds(s, J, 62))
        entry = {"levels": levels, "sigma": SIGMA, "entries": 2 * J, "new_wall_s": round(new_wall, 4),
                 "new_cpu_s": round(new_cpu, 4)}
        if args.skip_old_above >= 2 * J:
            old, old_wall, old_cpu = timed(lambda: old_table(s, J))
            entry.update(old_wall_s=round(old_wall, 3), old_cpu_s=round(old_cpu, 3),
                         equal=bool(np.array_equal(old, new)),
                         speedup_cpu=round(old_cpu / max(new_cpu, 1e-9), 1))
        results.append(entry)
        rows.append((levels, 2 * J, entry.get("old_cpu_s", "-"), entry.get("old_wall_s", "-"), entry["new_cpu_s"],
                     entry["new_wall_s"], entry.get("equal", "-"), entry.get("speedup_cpu", "-")))
        print(rows[-1], flush=True)
    print(table(rows, ("levels", "entries", "old cpu s", "old wall s", "new cpu s", "new wall s", "equal",
                       "speedup (cpu)")))
    print("written", write_results("sound_table", {"tables": results, "bound_entries": normal_table.MAX_TABLE_ENTRIES,
                                                   "note": "sigma 0.25 on [0, 1]; old = 60-digit mpmath per entry"}))


if __name__ == "__main__":
    main()
