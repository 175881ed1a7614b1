"""The batcher: polls the source and closes a micro-batch by size or by latency.

A batch closes when it holds ``batch.max_events`` messages, when its first message
has waited ``batch.max_wait_ms``, when a file source is exhausted, or when the stage
is stopping. Messages of partitions revoked in a rebalance are dropped unprocessed:
their new owner re-reads them from the last committed offset.
"""

from __future__ import annotations

import time

from riskpipe.stream.ports import Message, Source


class Batcher:
    def __init__(self, max_events: int, max_wait_ms: int):
        self.max_events = max_events
        self.max_wait_ms = max_wait_ms
        self.buffer: list[Message] = []
        self._first = 0.0  # monotonic time the buffer's first message arrived

    def _age_ms(self) -> float:
        return (time.monotonic() - self._first) * 1000

    def poll(self, source: Source, stopping: bool = False) -> int:
        """Poll ``source`` for at most the room left (waiting at most the batch's
        remaining latency budget); returns how many messages arrived."""
        room = self.max_events - len(self.buffer)
        if room <= 0 or stopping:
            return 0
        wait = self.max_wait_ms if not self.buffer else max(1, self.max_wait_ms - int(self._age_ms()))
        msgs = source.poll(room, wait)
        if msgs and not self.buffer:
            self._first = time.monotonic()
        self.buffer.extend(msgs)
        return len(msgs)

    def ready(self, source_exhausted: bool = False, stopping: bool = False) -> bool:
        return bool(self.buffer) and (len(self.buffer) >= self.max_events or self._age_ms() >= self.max_wait_ms
                                      or source_exhausted or stopping)

    def take(self) -> list[Message]:
        """The buffered messages, as one batch; the buffer starts empty again."""
        msgs, self.buffer = self.buffer, []
        return msgs

    def drop_partitions(self, gone: set[tuple[str, int]]) -> int:
        """Forget buffered messages of revoked partitions; returns how many."""
        before = len(self.buffer)
        self.buffer = [m for m in self.buffer if (m.topic, m.partition) not in gone]
        return before - len(self.buffer)

    def clear(self) -> None:
        self.buffer = []
