"""Poison among valid events on the real broker, the stage restarted twice: every valid
event is decided once, every poison event is dead-lettered once with its reason, the
partition advances (the committed offset reaches the end) and nothing gets stuck."""

import json

import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

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


class _RawName(str):
    """A header name kafka-python writes as these bytes: not UTF-8, as librdkafka and other
    clients that take header names as bytes allow."""

    def encode(self, *args, **kwargs):
        return b"\xff\xfebad-name"


def test_a_record_the_client_cannot_decode_is_never_skipped_and_the_stage_exits_naming_it(tmp_path):
    """kafka-python raises CorruptRecordError on such a record, then fetches nothing more
    of its partition, without an error. The stage took each error for a broker outage that
    ended at the next quiet poll: the clock restarted every second, the partition waited
    for ever and the stage never exited. Now the outage lasts while the source is stalled:
    past infrastructure_timeout_s the stage exits naming the partition and offset; the
    record is neither decided nor skipped (the group's offset stays at it)."""
    from riskpipe.stream.infra import InfrastructureUnavailable

    pipe, X = poisoned_tabular_pipeline(tmp_path)
    ledger_path = str(tmp_path / "l.sqlite")
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        cfg = load_config(None, bootstrap_servers=b.bootstrap, ledger=ledger_path, session_timeout_ms=2000,
                          heartbeat_interval_ms=600, infrastructure_timeout_s=5,
                          batch={"max_events": 8, "max_wait_ms": 20})
        produce(b.bootstrap, [tabular_event("ok-0", X[0])])  # one producer each: three record batches
        produce(b.bootstrap, [(json.dumps(tabular_event("bad-1", X[1])).encode(), [(_RawName("x"), b"v")])])
        produce(b.bootstrap, [tabular_event("ok-2", X[2])])
        with Ledger(ledger_path) as led:
            runner = StageThread(cfg, pipe, led)
            with runner:
                assert wait_for(lambda: runner.error is not None, 90), "the stage never gave up"
        assert isinstance(runner.error, InfrastructureUnavailable), runner.error
        assert "inferences-0 offset 1: the Kafka client cannot decode this record" in str(runner.error)
        assert committed_offset(b.bootstrap, cfg.group_id) == 1  # what came before it decided, it not skipped
        with Ledger(ledger_path) as led:
            assert [e.entry_id for e in led.records(kind="decision")] == ["ok-0"] and led.count("dlq") == 0
        operator = KafkaConsumer(bootstrap_servers=b.bootstrap, group_id=cfg.group_id, enable_auto_commit=False)
        operator.commit({TopicPartition("inferences", 0): OffsetAndMetadata(2, "", -1)})  # the runbook's step
        operator.close()
        with Ledger(ledger_path) as led, StageThread(cfg, pipe, led):
            assert wait_for(lambda: committed_offset(b.bootstrap, cfg.group_id) == 3, 60)
        with Ledger(ledger_path) as led:
            assert sorted(e.entry_id for e in led.records(kind="decision")) == ["ok-0", "ok-2"]
