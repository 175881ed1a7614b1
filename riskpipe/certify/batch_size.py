"""Pick the certification batch size from the model's measured forward throughput.

Randomized smoothing pushes thousands of noisy copies of each input through the
model, ``batch_size`` at a time. Throughput depends strongly on that size and the
best size depends on the model and the machine: on 2 CPU cores a CIFAR-sized CNN
ran 2.5x slower at 4096 than at 128–512, while the 8x8 demo model is fastest at
1024–2048 (issue 15). So the size is measured, not guessed: ``probe`` times the
model's forward pass over growing candidate sizes within a small time budget and
``BatchSizeProbe.best`` is the smallest size within ``tolerance`` of the fastest
(smaller batches hold less memory and cut latency for the same throughput).

No files here: the caller caches the result (riskpipe/tuning.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from riskpipe.models.base import Model

CANDIDATES = (64, 128, 256, 512, 1024, 2048, 4096)


@dataclass(frozen=True)
class BatchSizeProbe:
    """Forward rates (samples/s, best of the timed calls) per batch size."""

    rates: dict[int, float]
    tolerance: float = 0.97
    elapsed_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def best_rate(self) -> float:
        return max(self.rates.values())

    @property
    def best(self) -> int:
        """The smallest batch size whose rate is within ``tolerance`` of the fastest."""
        top = self.best_rate
        return min(b for b, r in self.rates.items() if r >= self.tolerance * top)


def probe_clock(model: Model) -> Callable[[], float]:
    """The clock the probe times with: the process's CPU time when the model computes on the
    CPU with one torch thread (the stage's default), so the calls of other processes on a
    shared machine do not move the answer (by the wall clock a loaded machine picked sizes
    at random); the wall clock otherwise, where the work runs on threads or a device whose
    time the process's CPU clock does not add up as throughput. On the CPU clock the probe's
    budget is CPU seconds: on a loaded machine it takes longer by the wall clock."""
    if str(getattr(model, "device", "cpu")) == "cpu" and torch.get_num_threads() == 1:
        return time.process_time
    return time.perf_counter


def probe(model: Model, candidates: Sequence[int] = CANDIDATES, budget_s: float = 1.5, min_time_s: float = 0.05,
          seed: int = 0, tolerance: float = 0.97,
          clock: Callable[[], float] | None = None) -> BatchSizeProbe:
    """Time ``model.predict_torch`` on noisy inputs at each candidate size, smallest first.

    Each size gets one warm-up call, then timed calls until ``min_time_s`` has passed
    (at least two); its rate is the fastest call's. The probe stops early when the
    next size would not fit in what is left of ``budget_s`` (predicted from the best
    rate so far) or when the rate has fallen below half the best (past the peak).
    Inputs are uniform over the model's declared value range ([0, 1] if none) plus N(0, 0.25^2) noise,
    the kind of batch smoothing sends. ``clock`` (seconds; default ``probe_clock``) times
    everything: tests pass a simulated one that their model advances, so the probe's
    choices are exact.
    """
    clock = clock or probe_clock(model)
    sizes = sorted({int(b) for b in candidates})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"candidates: need positive batch sizes, got {list(candidates)}")
    if budget_s <= 0:
        raise ValueError(f"budget_s: must be > 0, got {budget_s}")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    declared = getattr(model, "value_range", None)  # None: unbounded; scalars or per-feature arrays
    if declared is None:
        declared = (0.0, 1.0)
    lo, hi = (torch.as_tensor(np.asarray(v, dtype=np.float32)) for v in declared)
    shape = tuple(model.input_shape)
    t_start = clock()
    deadline = t_start + budget_s
    rates: dict[int, float] = {}
    notes: list[str] = []
    for b in sizes:
        if rates:
            predicted = 3 * b / max(rates.values())  # warm-up + two timed calls
            if clock() + predicted > deadline:
                notes.append(f"stopped before {b}: over the {budget_s:g} s budget")
                break
        x = torch.rand((b, *shape), generator=gen) * (hi - lo) + lo
        x += torch.randn((b, *shape), generator=gen) * 0.25
        x = x.to(model.device)
        model.predict_torch(x.clone(), scratch=True)  # warm-up: first call at a new shape allocates
        best, reps, t_size = float("inf"), 0, clock()
        while reps < 2 or (clock() - t_size < min_time_s and clock() < deadline):
            batch = x.clone()  # timed as smoothing calls the model: on a batch it may write into, not copied
            t0 = clock()
            model.predict_torch(batch, scratch=True)
            best = min(best, clock() - t0)
            reps += 1
        rates[b] = b / max(best, 1e-9)
        top = max(rates.values())
        falling = [r < 0.5 * top for r in rates.values()][-2:]
        if falling == [True, True]:  # two sizes in a row: not a noisy call on a busy machine
            notes.append(f"stopped after {b}: rate fell below half the best twice")
            break
    return BatchSizeProbe(rates, tolerance, clock() - t_start, notes)
