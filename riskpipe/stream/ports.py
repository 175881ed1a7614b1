"""The stage's ports: what it needs from a source of messages and from a sink of outputs.

The stage loop (``stage``), the batcher and the committer use exactly the members of
``Source`` and ``Sink`` below, and nothing else. The adapters in ``stream/io.py``
(Kafka, JSON lines) implement them, and so do the in-memory ones the tests use;
``tests/test_ports.py`` checks every one against these protocols.

A source's optional capabilities (being finite, holding partitions, rewinding,
reporting lag) are members like the others, with defaults on ``SourceBase``, so the
stage never asks whether a member exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from riskpipe.timestamps import from_epoch, rfc3339_millis


@dataclass
class Message:
    """One message as a source delivers it (a Kafka record, a line of a file)."""

    value: bytes | None
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: list = field(default_factory=list)
    timestamp: int | None = None  # ms since epoch

    def source(self) -> dict:
        ts = None
        if self.timestamp is not None and self.timestamp > 0:
            ts = rfc3339_millis(from_epoch(self.timestamp / 1000))
        return {"topic": self.topic, "partition": self.partition, "offset": self.offset, "timestamp": ts}


class SinkError(RuntimeError):
    """Sends not acknowledged by ``Sink.flush``: the broker is unavailable (``infra``)."""


@runtime_checkable
class Source(Protocol):
    """Where the stage's messages come from. ``poll`` returns at most ``max_records``
    messages, waiting at most ``timeout_ms``; ``commit`` marks messages done (they are
    not delivered again after a restart); ``close`` releases the source."""

    @property
    def exhausted(self) -> bool:
        """True once a finite source (a file) has delivered everything: the stage stops."""
        ...

    @property
    def holds_partitions(self) -> bool:
        """Does the source hold input now? (A Kafka consumer between group assignments
        does not: time without partitions is not idleness.)"""
        ...

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]: ...

    def commit(self, messages: list[Message]) -> None: ...

    def rewind(self) -> bool:
        """Back to the last committed position, so that what was polled but not committed
        is delivered again; False if this source cannot (the stage then closes and
        re-opens its clients, which starts from the committed position too)."""
        ...

    def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind the end, per (topic, partition); empty if unknown."""
        ...

    @property
    def connected(self) -> bool | None:
        """Does the source reach its broker now? None for a source without one (a file).
        A consumer whose broker died while no message was due raises nothing, so the
        stage asks once a turn (``riskpipe_broker_up``)."""
        ...

    def recreated(self) -> list[tuple[str, int]]:
        """The (topic, partition)s found re-created since the last call (a broker that lost
        its data, a topic deleted and made again) and read again from their start, so no
        message of the new log is skipped; each call returns them once."""
        ...

    def close(self) -> None: ...


class SourceBase:
    """Defaults for ``Source``'s optional capabilities: an endless source that always
    holds its input, cannot rewind and knows no lag. Adapters override what they can do."""

    exhausted: bool = False

    @property
    def holds_partitions(self) -> bool:
        return True

    def rewind(self) -> bool:
        return False

    def lag(self) -> dict[tuple[str, int], int]:
        return {}

    @property
    def connected(self) -> bool | None:
        return None

    def recreated(self) -> list[tuple[str, int]]:
        return []


@runtime_checkable
class Sink(Protocol):
    """Where outputs go. ``send`` may return before the output is stored; ``flush``
    returns only once every send since the last flush is acknowledged, and raises
    ``SinkError`` otherwise. The stage commits a message only after the flush that
    carried all of its outputs (``committer``)."""

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None: ...

    def flush(self, timeout: float = 30.0) -> None: ...

    def close(self) -> None: ...
