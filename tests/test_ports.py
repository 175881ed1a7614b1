"""Every source and sink the stage is given implements ``Source`` / ``Sink``
(riskpipe/stream/ports.py): the Kafka and JSON-lines adapters and the in-memory ones
of the tests. The tables are typed, so a type checker run over the tests checks the
same conformance statically that ``isinstance`` checks here at run time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from riskpipe import kafka_clients
from riskpipe.app.config import load_config
from riskpipe.stream.io import JsonlSink, JsonlSource, KafkaSink, KafkaSource
from riskpipe.stream.ports import Message, Sink, Source
from streamkit import ListSource, LoggingSink
from test_bounded_outputs import BrokerLimitSink
from test_overlap import RowCheckingSink
from test_stage_poison import SimTime, SlowJoinSource


class FakeClient:
    """Stands in for kafka-python's consumer and producer: the adapters are built, no broker is needed."""

    def __init__(self, *args, **kwargs):
        pass

    def subscribe(self, topics, listener=None) -> None:
        pass

    def assignment(self) -> set:
        return set()

    def close(self, **kwargs) -> None:
        pass


@pytest.fixture
def no_broker(monkeypatch):
    monkeypatch.setattr(kafka_clients, "consumer", FakeClient)
    monkeypatch.setattr(kafka_clients, "producer", FakeClient)


def _jsonl(tmp: Path) -> str:
    (tmp / "in.jsonl").write_text('{"id": "a"}\n')
    return str(tmp / "in.jsonl")


SOURCES: dict[str, Callable[[Path], Source]] = {
    "kafka": lambda tmp: KafkaSource(load_config(None)),
    "jsonl": lambda tmp: JsonlSource(_jsonl(tmp)),
    "list (tests)": lambda tmp: ListSource([Message(b"{}", "t", 0, 0)]),
    "slow join (tests)": lambda tmp: SlowJoinSource(SimTime(), 1.0),
}

SINKS: dict[str, Callable[[Path], Sink]] = {
    "kafka": lambda tmp: KafkaSink(load_config(None)),
    "kafka, broker limit (tests)": lambda tmp: BrokerLimitSink(load_config(None)),
    "jsonl": lambda tmp: JsonlSink(str(tmp / "out")),
    "logging (tests)": lambda tmp: LoggingSink([]),
    "row checking (tests)": lambda tmp: RowCheckingSink([], None),
}


@pytest.mark.parametrize("name", SOURCES)
def test_every_source_is_a_source_with_its_optional_capabilities(name, tmp_path, no_broker):
    src = SOURCES[name](tmp_path)
    assert isinstance(src, Source)
    assert isinstance(src.exhausted, bool) and isinstance(src.holds_partitions, bool)
    assert isinstance(src.lag(), dict)
    assert isinstance(src.rewind(), bool)  # False: the stage re-opens its clients instead


@pytest.mark.parametrize("name", SINKS)
def test_every_sink_is_a_sink(name, tmp_path, no_broker):
    assert isinstance(SINKS[name](tmp_path), Sink)


def test_an_object_missing_a_member_is_neither():
    class PollOnly:
        def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
            return []

    class SendOnly:
        def send(self, topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None:
            pass

    assert not isinstance(PollOnly(), Source) and not isinstance(SendOnly(), Sink)


def test_a_file_source_rewinds_to_its_last_commit(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(f'{{"n": {i}}}\n' for i in range(4)))
    src = JsonlSource(str(path))
    first = src.poll(2, 0)
    src.commit(first[:1])
    src.poll(10, 0)
    assert src.exhausted
    assert src.rewind() and not src.exhausted
    assert [m.offset for m in src.poll(10, 0)] == [1, 2, 3]
    src.close()
