"""Poison among valid events on the real broker, the stage restarted twice: every valid
event is decided once, every poison event is dead-lettered once with its reason, the
partition advances (the committed offset reaches the end) and nothing gets stuck."""

import json

import pytest
from kafka import KafkaConsumer, TopicPartition

from riskpipe.app.config import load_config
from riskpipe.ledger import Ledger
from riskpipe.stream.broker import EmbeddedBroker
from streamkit import StageThread, consume_all, poisoned_tabular_pipeline, produce, tabular_event, wait_for

pytestmark = pytest.mark.broker


def poison(tag: str, x) -> list:
    """One message of every poison class: (value bytes, headers)."""
    ev = lambda eid, **kw: json.dumps(tabular_event(eid, x, **kw))  # noqa: E731
    values = [
        ev(f"{tag}-ctrl\n"),
        ev("SURR").replace("SURR", f"{tag}-\\ud800"),
        ev(f"{tag}-huge", prediction=0).replace('"prediction": 0', '"prediction": ' + "9" * 5000),
        ev(f"{tag}-nanctx", context={"a": float("nan")}),
        ev(f"{tag}-time", time="not a time"),
        ev(f"poison-{tag}"),  # the model raises
        "{broken",
    ]
    return [(v.encode("utf-8", "surrogatepass"), []) for v in values]


REASONS = ["bad_id", "bad_id", "out_of_range", "non_finite", "bad_time", "internal_error", "invalid_json"]


def committed_offset(bootstrap: str, group: str, topic: str = "inferences") -> int | None:
    c = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        return c.committed(TopicPartition(topic, 0))
    finally:
        c.close()


def test_poison_among_valid_events_across_two_restarts(tmp_path):
    pipe, X = poisoned_tabular_pipeline(tmp_path)
    ledger_path = str(tmp_path / "l.sqlite")
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        cfg = load_config(None, bootstrap_servers=b.bootstrap, ledger=ledger_path, session_timeout_ms=2000,
                          heartbeat_interval_ms=600,
                          batch={"max_events": 8, "max_wait_ms": 20})
        valid, total = [], 0
        for run in range(3):  # the first start and two restarts
            evs = [tabular_event(f"r{run}-{i}", X[(run * 10 + i) % len(X)]) for i in range(10)]
            valid += [e["id"] for e in evs]
            msgs = evs[:5] + poison(f"r{run}", X[run]) + evs[5:]
            produce(b.bootstrap, msgs)
            total += len(msgs)
            with Ledger(ledger_path) as led, StageThread(cfg, pipe, led) as stage:
                assert wait_for(lambda: committed_offset(b.bootstrap, cfg.group_id) == total, 90), \
                    (committed_offset(b.bootstrap, cfg.group_id), total, stage.stats)
                assert stage.stats.decided == 10 and dict(stage.stats.dlq) == {
                    r: REASONS.count(r) for r in REASONS}
        with Ledger(ledger_path) as led:
            assert led.verify().ok
            ids = [e.entry_id for e in led.records(kind="decision")]
            dlq = [e.record for e in led.records(kind="dlq")]
        assert sorted(ids) == sorted(valid)  # each decision once
        assert sorted(r["reason"] for r in dlq) == sorted(REASONS * 3)
        out = consume_all(b.bootstrap, ["decisions", "dlq"], expect=len(valid) + 3 * len(REASONS))
        assert sorted(json.loads(r.value)["id"] for r in out["decisions"]) == sorted(valid)
        reasons = [dict(r.headers)["__riskpipe.errors.reason"].decode() for r in out["dlq"]]
        assert sorted(reasons) == sorted(REASONS * 3)
