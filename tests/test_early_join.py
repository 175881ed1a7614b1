"""A stage joins its consumer group before its pipeline is built (riskpipe.stream.io.EarlyJoin,
issue 21): while held it is a member holding partitions, paused, and reads nothing; the
stage that takes it reads every event from the committed offsets. Real embedded broker."""

import time

import pytest

from riskpipe.app.config import load_config
from riskpipe.stream.broker import EmbeddedBroker
from riskpipe.stream.io import EarlyJoin
from streamkit import produce, wait_for

pytestmark = pytest.mark.broker

EVENTS = 40


def _config(bootstrap: str, group: str):
    return load_config(None, bootstrap_servers=bootstrap, group_id=group, session_timeout_ms=2000,
                       heartbeat_interval_ms=500, batch={"max_events": 64, "max_wait_ms": 20})


def _read_all(source, want: int, timeout: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += source.poll(max_records=64, timeout_ms=200)
    return got


def test_held_members_form_the_group_read_nothing_then_read_everything_once():
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=4)
        produce(b.bootstrap, [(f"e{i}".encode(), []) for i in range(EVENTS)])
        config = _config(b.bootstrap, "early-join")
        first = EarlyJoin(config)
        second = EarlyJoin(config)  # joins later: a rebalance while both are held
        try:
            def split() -> bool:
                held = [first.source.consumer.assignment(), second.source.consumer.assignment()]
                return all(held) and not (held[0] & held[1]) and len(held[0] | held[1]) == 4

            assert wait_for(split, 30), "the two held members did not share the 4 partitions"
            time.sleep(1.0)  # several held polls with events waiting on every partition
            for member in (first, second):
                consumer = member.source.consumer
                assert consumer.paused() == consumer.assignment()  # held: nothing fetchable
            sources = [first.take(None), second.take(None)]
            assert not any(s.held for s in sources) and not any(s.consumer.paused() for s in sources)
            got = _read_all(sources[0], EVENTS // 2) + _read_all(sources[1], EVENTS // 2)
            got += sources[0].poll(64, 500) + sources[1].poll(64, 500)
            # every event read once, from offset 0 of its partition: the hold consumed nothing
            assert sorted(m.value for m in got) == sorted(f"e{i}".encode() for i in range(EVENTS))
            by_partition: dict[int, list[int]] = {}
            for m in got:
                by_partition.setdefault(m.partition, []).append(m.offset)
            assert all(sorted(o) == list(range(len(o))) for o in by_partition.values())
        finally:
            for member in (first, second):
                member.source.close()


def test_a_member_never_taken_leaves_the_group():
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=2)
        config = _config(b.bootstrap, "early-leave")
        failed = EarlyJoin(config)  # its pipeline build failed: the runner closes it
        assert wait_for(lambda: len(failed.source.consumer.assignment()) == 2, 30)
        other = EarlyJoin(config)
        try:
            assert wait_for(lambda: other.source.consumer.assignment(), 30)
            failed.close()
            # the other member gets every partition at the next rebalance, not after a session timeout
            assert wait_for(lambda: len(other.source.consumer.assignment()) == 2, 10)
        finally:
            other.close()
