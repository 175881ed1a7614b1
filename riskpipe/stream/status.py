"""What a running stage tells a person without ``-v`` (logger ``riskpipe.status``, at INFO,
which ``riskpipe run`` always shows): one start-up line per model, and a progress line
every ``progress_interval_s`` while events flow, and a last one when the stage stops."""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from riskpipe.certify.families import family
from riskpipe.decisions import DECISIONS

log = logging.getLogger("riskpipe.status")


def _policy(p: Any) -> str:
    return f"{p.name} v{p.version} sha256 {p.sha256[:12]}"


def model_line(entry: Any, threads: int | None) -> str:
    """``model NAME: spec ..., sha256 ..., <certifier>, batch size ..., threads ..., policy ...``."""
    c = entry.policy.certifier
    how = family(c.method).summary(c)
    size = getattr(entry.certifier, "batch_size", None)
    batch = f"batch size {size} ({entry.batch_size_source or 'default'})" if size else "batch size n/a"
    return (f"model {entry.name}: spec {entry.model.spec}, sha256 {str(entry.model.sha256)[:12]}, {how}, {batch}, "
            f"torch threads {threads if threads is not None else 'default'}, policy {_policy(entry.policy)}")


def log_models(pipeline: Any) -> None:
    threads = torch.get_num_threads()
    for entry in pipeline.entries.values():
        log.info("%s", model_line(entry, threads))
    log.info("noise seeds: HMAC-SHA256 keyed by %s", pipeline.noise_key_source)
    # the pipeline is built: a worker that joined its group early reads from here on
    log.info("ready: %d model(s) loaded, reading events", len(pipeline.entries))


def progress_line(stats: Any, rate: float, lag: int | None) -> str:
    dlq = sum(stats.dlq.values())
    reasons = ", ".join(f"{r} {n}" for r, n in sorted(stats.dlq.items()))
    decisions = ", ".join(f"{d} {stats.decisions.get(d, 0)}" for d in DECISIONS)
    return (f"progress: decided {stats.decided} ({decisions}), DLQ {dlq}" + (f" ({reasons})" if reasons else "")
            + f", {rate:.1f} events/s, lag {lag if lag is not None else 'n/a'}")


class Progress:
    """Logs :func:`progress_line` at most every ``interval_s`` (0 or None: never); the rate
    is over the events handled since the previous line."""

    def __init__(self, interval_s: float | None, clock=time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last_t = clock()
        self._last_n = 0

    def due(self) -> bool:
        return bool(self.interval_s) and self.clock() - self._last_t >= self.interval_s

    @staticmethod
    def _handled(stats: Any) -> int:
        return stats.decided + sum(stats.dlq.values()) + stats.duplicates + stats.other_models

    def pending(self, stats: Any) -> bool:
        """Lines are on and events were handled since the last line."""
        return bool(self.interval_s) and self._handled(stats) > self._last_n

    def report(self, stats: Any) -> None:
        now = self.clock()
        n = self._handled(stats)
        rate = (n - self._last_n) / max(now - self._last_t, 1e-9)
        log.info("%s", progress_line(stats, rate, stats.lag))
        self._last_t, self._last_n = now, n
