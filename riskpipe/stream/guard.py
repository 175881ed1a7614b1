"""The dead-letter guard: stop loudly when a partition's traffic is mostly invalid.

One bad event is data and goes to the DLQ; nearly all events bad means a
misconfiguration (wrong model registry, wrong producer) that would otherwise
quietly send all traffic to the DLQ. Limits are per partition.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from riskpipe.stream.ports import Message


class GuardTripped(RuntimeError):
    """Too much of a partition's traffic is invalid: most likely a misconfiguration."""


@dataclass
class PartitionGuard:
    max_ratio: float
    max_consecutive: int
    window: int
    consecutive: int = 0
    recent: deque = field(default_factory=deque)

    def observe(self, invalid: bool, where: str) -> None:
        self.consecutive = self.consecutive + 1 if invalid else 0
        self.recent.append(invalid)
        if len(self.recent) > self.window:
            self.recent.popleft()
        if self.consecutive >= self.max_consecutive:
            raise GuardTripped(f"{where}: {self.consecutive} consecutive invalid messages "
                               f"(limit {self.max_consecutive}); check producers and the model registry")
        if len(self.recent) == self.window and sum(self.recent) / self.window > self.max_ratio:
            raise GuardTripped(f"{where}: {sum(self.recent)} of the last {self.window} messages invalid "
                               f"(limit ratio {self.max_ratio:g}); check producers and the model registry")


class Guards:
    """One ``PartitionGuard`` per source partition, fed in message order."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.by_partition: dict[str, PartitionGuard] = {}

    def observe(self, msgs: list[Message], dead: set[tuple[str, int, int]]) -> None:
        """``dead``: (topic, partition, offset) of the batch's dead letters."""
        for m in msgs:
            where = f"{m.topic}[{m.partition}]"
            g = self.by_partition.get(where)
            if g is None:
                g = self.by_partition[where] = PartitionGuard(self.cfg.max_invalid_ratio,
                                                              self.cfg.max_consecutive_invalid, self.cfg.window)
            g.observe((m.topic, m.partition, m.offset) in dead, where)
