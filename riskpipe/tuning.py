"""Start-up tuning with a per-machine cache: the certification batch size.

The probe (riskpipe/certify/batch_size.py) costs about a second per model, so its
answer is kept in the cache directory under (model sha256, device, torch threads):
the things that change the answer. A size given in the config or on the command
line wins and skips the probe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from riskpipe.certify import batch_size
from riskpipe.paths import atomic_write
from riskpipe.paths import cache_dir as default_cache_dir

log = logging.getLogger("riskpipe.tuning")


@dataclass(frozen=True)
class BatchSizeChoice:
    size: int
    source: str  # config | cache | probe
    rates: dict[int, float] | None = None

    @property
    def forward(self) -> int | None:
        """Rows per model call: the measured size the model ran fastest at, not below
        ``size`` (the smallest size within tolerance of the fastest: it shapes the
        noise, so certificates record it, and the call size does not). None when the size
        was configured: it then caps every call, as given."""
        rates = self.rates
        return max(self.size, max(rates, key=rates.__getitem__)) if rates else None


def cache_path(model, cache_dir: Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    device = str(model.device).replace(":", "_")
    # "-c2": probed by CPU time (batch_size.probe_clock); answers of the wall-clock probe are not reused
    return root / "batch_size" / f"{model.sha256[:32]}-{device}-t{torch.get_num_threads()}-c2.json"


def certify_batch_size(model, configured: int | None = None, cache_dir: Path | None = None,
                       budget_s: float = 1.5, name: str | None = None,
                       clock: Callable[[], float] | None = None) -> BatchSizeChoice:
    """The batch size to certify ``model`` with: ``configured`` if given, else the cached
    probe result for this model/device/thread count, else a fresh probe (then cached).
    ``clock`` times the probe (default: ``batch_size.probe_clock``; tests pass a simulated one)."""

    label = name or model.spec
    if configured is not None:
        choice = BatchSizeChoice(int(configured), "config")
    else:
        path = cache_path(model, cache_dir)
        cached = _read(path)
        if cached is not None:
            choice = cached
        else:
            p = batch_size.probe(model, budget_s=budget_s, clock=clock)
            choice = BatchSizeChoice(p.best, "probe", p.rates)
            _write(path, choice)
            log.info("model %s: probed forward rates %s in %.2f s", label,
                     ", ".join(f"{b}: {r:.0f}/s" for b, r in sorted(p.rates.items())), p.elapsed_s)

    log.info("model %s: certification batch size %d (%s), torch threads %d", label, choice.size, choice.source,
             torch.get_num_threads())
    return choice


def _read(path: Path) -> BatchSizeChoice | None:
    try:
        data = json.loads(path.read_text())
        size = int(data["batch_size"])
        rates = {int(k): float(v) for k, v in data.get("rates", {}).items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None  # absent or unreadable: probe again
    return BatchSizeChoice(size, "cache", rates) if size >= 1 else None


def _write(path: Path, choice: BatchSizeChoice) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as f:
            f.write(json.dumps({"batch_size": choice.size, "rates": choice.rates}, sort_keys=True))
    except OSError as e:  # a read-only cache costs a probe per start, nothing else
        log.warning("batch size cache %s: cannot write (%s)", path, e.strerror)
