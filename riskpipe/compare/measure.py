"""Time and memory probes for the report card.

Peak memory on CPU is the process's peak resident set (Linux VmHWM), reset before
each measurement through /proc/self/clear_refs, minus the resident set at the
start: it counts what the method itself made the process hold (allocator reuse
can hide some of it). On CUDA, torch's peak allocated bytes. Where neither probe
exists the value is None and the card says so.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        _CLEAR.write_text("5")
        return True
    except OSError:
        return False


@contextmanager
def peak_memory(device: str = "cpu"):
    """Yields a dict that holds ``rss_peak_mb`` (CPU) and ``cuda_peak_mb`` after the block."""
    out: dict[str, float | None] = {"rss_peak_mb": None, "cuda_peak_mb": None}
    cuda = str(device).startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    ok = _reset_peak()
    base = _status_kb("VmRSS")
    try:
        yield out
    finally:
        if cuda:
            torch.cuda.synchronize()
            out["cuda_peak_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
        peak = _status_kb("VmHWM")
        if ok and base is not None and peak is not None:
            out["rss_peak_mb"] = max(peak - base, 0) / 1024


def sync(device: str) -> None:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, device: str = "cpu", repeat: int = 1) -> float:
    """Best wall time in ms of ``fn()`` over ``repeat`` runs (after synchronising)."""
    best = float("inf")
    for _ in range(repeat):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, (time.perf_counter() - t0) * 1e3)
    return best


def summary_ms(values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {"median": float(np.median(v)), "p90": float(np.percentile(v, 90)), "n": int(len(v))}
