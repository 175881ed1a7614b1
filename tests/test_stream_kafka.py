"""The stage against the real embedded Kafka broker (Tansu)."""

import json
import signal
import time

import pytest

from riskpipe.stream.broker import EmbeddedBroker
from streamkit import (
    StageThread,
    consume_all,
    kill_9_then_finish,
    ledger_ids,
    produce,
    ready_with_partitions,
    run_cli,
    stage_args,
    stop,
    valid_events,
    wait_for,
)

pytestmark = pytest.mark.broker

PRIVATE = ("radius", "p_lower", "p_upper", "score", "signals", "certificate", "context", "radius_threat")


@pytest.fixture
def broker():
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        yield b


@pytest.fixture(scope="module")
def pipeline():
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config

    return build_pipeline(load_config(None))


def config_for(broker, ledger, **kw):
    from riskpipe.app.config import load_config

    kw.setdefault("batch", {"max_events": 64, "max_wait_ms": 20})
    return load_config(None, bootstrap_servers=broker.bootstrap, ledger=str(ledger), session_timeout_ms=2000,
                       heartbeat_interval_ms=600, **kw)


def test_end_to_end_exactly_one_decision_per_event(broker, tmp_path, pipeline):
    """kafka-python and confluent-kafka (librdkafka, CloudEvents headers) producers;
    every valid event gets exactly one decision, bad ones land in the DLQ with reasons,
    the public topic carries no radius, probability or score."""
    import confluent_kafka

    from riskpipe.ledger import Ledger

    good = valid_events("kp", 40)
    bad = [(b"{oops", []), (json.dumps({"id": "m1", "model": "digits"}).encode(), []),
           (json.dumps({**valid_events("x", 1)[0], "model": "nope"}).encode(), [])]
    produce(broker.bootstrap, good + bad)
    ce_events = valid_events("ck", 20, offset=40)
    p = confluent_kafka.Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True})
    for e in ce_events:
        body = {k: v for k, v in e.items() if k != "id"}
        p.produce("inferences", key=e["id"], value=json.dumps(body),
                  headers=[("ce_id", e["id"]), ("ce_source", "/test"), ("ce_type", "org.kserve.inference.request"),
                           ("ce_specversion", "1.0"), ("content-type", "application/json")])
    assert p.flush(15) == 0
    ledger_path = tmp_path / "l.sqlite"
    with Ledger(str(ledger_path)) as led, StageThread(config_for(broker, ledger_path), pipeline, led) as stage:
        assert wait_for(lambda: stage.stats.decided + sum(stage.stats.dlq.values()) >= 63, 90)
    out = consume_all(broker.bootstrap, ["decisions", "audit", "review", "dlq"], expect=60 + 60 + 3)
    want = {e["id"] for e in good + ce_events}
    assert sorted(m.key.decode() for m in out["audit"]) == sorted(want)
    assert sorted(m.key.decode() for m in out["decisions"]) == sorted(want)
    assert sorted(ledger_ids(str(ledger_path))) == sorted(want)
    for m in out["decisions"]:
        pub = json.loads(m.value)
        assert set(pub) <= {"id", "ts", "decision", "policy_version"}
        assert not any(k in m.value.decode() for k in PRIVATE)
    for m in out["audit"]:
        rec = json.loads(m.value)
        assert rec["certificate"]["scope"] and "radius_threat" in rec["certificate"]
    routed = {json.loads(m.value)["id"] for m in out["audit"] if json.loads(m.value)["review"]["routed"]}
    assert routed <= {m.key.decode() for m in out["review"]}
    reasons = sorted(dict(m.headers)["__riskpipe.errors.reason"].decode() for m in out["dlq"])
    assert reasons == ["invalid_json", "missing_field", "unknown_model"]
    h = dict(out["dlq"][0].headers)
    assert h["__riskpipe.errors.topic"] == b"inferences" and "__riskpipe.errors.offset" in h
    assert {m.value for m in out["dlq"]} == {v for v, _ in bad}  # original bytes kept


def test_redelivery_does_not_produce_a_second_decision(broker, tmp_path, pipeline):
    from riskpipe.ledger import Ledger

    events = valid_events("r", 10)
    produce(broker.bootstrap, events + events[:5])  # the producer retried five of them
    ledger_path = tmp_path / "l.sqlite"
    with Ledger(str(ledger_path)) as led, StageThread(config_for(broker, ledger_path), pipeline, led) as stage:
        assert wait_for(lambda: stage.stats.decided + stage.stats.duplicates >= 15, 60)
        assert stage.stats.duplicates == 5
    assert sorted(ledger_ids(str(ledger_path))) == sorted(e["id"] for e in events)


def test_two_workers_split_partitions(tmp_path):
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=4)
        b.create_topics()
        events = valid_events("w", 120)
        ledger = str(tmp_path / "l.sqlite")
        logs = [tmp_path / f"w{i}.log" for i in range(2)]
        procs = [run_cli(stage_args(b.bootstrap, ledger, "--worker-id", f"w{i}", "-v"), stderr=log.open("w"))
                 for i, log in enumerate(logs)]
        try:
            # both members are ready and hold partitions before the first event (a slow start-up must not
            # leave one worker all the traffic)
            assert wait_for(lambda: all(ready_with_partitions(log.read_text()) for log in logs), 120)
            produce(b.bootstrap, events)
            assert wait_for(lambda: len(ledger_ids(ledger)) >= 120, 150)
        finally:
            for p in procs:
                stop(p)
        ids = ledger_ids(ledger)
        assert sorted(ids) == sorted(e["id"] for e in events)
        out = consume_all(b.bootstrap, ["audit"], expect=120)
        workers = {json.loads(m.value)["worker"] for m in out["audit"]}
        assert workers == {"w0", "w1"}, workers
        assert len(out["audit"]) == 120  # each event decided once across the group


def test_kill_9_and_restart_loses_nothing_duplicates_nothing(tmp_path):
    with EmbeddedBroker() as b:
        b.create_topics()
        events = valid_events("k", 300)
        ledger = str(tmp_path / "l.sqlite")
        produce(b.bootstrap, events)
        kill_9_then_finish(b.bootstrap, ledger, total=300, kill_after=20, max_events=16)
        ids = ledger_ids(ledger)
        assert len(ids) == len(set(ids)) == 300


def test_sigterm_drains_commits_and_exits_cleanly(broker, tmp_path):
    ledger = str(tmp_path / "l.sqlite")
    produce(broker.bootstrap, valid_events("t", 50))
    p = run_cli(stage_args(broker.bootstrap, ledger))
    assert wait_for(lambda: len(ledger_ids(ledger)) >= 50, 120)
    rc, err = stop(p)
    assert rc == 0 and "decided 50 events" in err
    # committed: a new member of the group finds nothing left to do
    p = run_cli(stage_args(broker.bootstrap, ledger, "--idle-exit", "4"))
    rc, err = stop(p, sig=0, timeout=120) if False else (p.wait(timeout=120), p.stderr.read())
    assert rc == 0 and "decided 0 events" in err and "0 duplicates" in err


def test_broker_restart_recovers_and_decides_new_events(tmp_path, pipeline):
    from riskpipe.ledger import Ledger

    with EmbeddedBroker() as b:
        b.create_topics()
        ledger_path = tmp_path / "l.sqlite"
        # Tansu re-creates the input topic with 4 partitions when the reconnecting consumer
        # asks for its metadata first; a short metadata age lets the stage notice them
        cfg = config_for(b, ledger_path, create_topics=True, metadata_max_age_ms=1000)
        with Ledger(str(ledger_path)) as led, StageThread(cfg, pipeline, led) as stage:
            produce(b.bootstrap, valid_events("before", 10))
            assert wait_for(lambda: stage.stats.decided >= 10, 60)
            b.restart()  # memory storage: topics and offsets are gone
            b.create_topics()
            after = valid_events("after", 15, offset=10)
            assert wait_for(lambda: _produce_ok(b.bootstrap, after), 30)
            assert wait_for(lambda: stage.stats.decided >= 25, 120), stage.stats
        ids = set(ledger_ids(str(ledger_path)))
        assert {e["id"] for e in after} <= ids


def test_a_partition_the_broker_lost_is_read_again_from_its_start(tmp_path, pipeline):
    """The stage over a broker restart that loses its data, with fewer events after it
    than the stage had read before (the new log stays below the member's old offset):
    the stage notices the input topic's new id, counts it (stats and
    riskpipe_input_partition_recreated_total) and decides every new event once. (Here its
    producer also fails on the restarted broker and the stage re-opens its clients, which
    reads from the start too; the source test below shows the re-read on its own, where
    nothing else would have rescued the partition.)"""
    from riskpipe.ledger import Ledger
    from riskpipe.metrics import StageMetrics

    with EmbeddedBroker() as b:
        b.create_topics()
        ledger_path = tmp_path / "l.sqlite"
        cfg = config_for(b, ledger_path, create_topics=True, metadata_max_age_ms=1000)
        metrics = StageMetrics()
        with Ledger(str(ledger_path)) as led, StageThread(cfg, pipeline, led, metrics=metrics) as stage:
            produce(b.bootstrap, valid_events("before", 30))
            assert wait_for(lambda: stage.stats.decided >= 30, 60)
            b.restart()  # memory storage: the input log starts again at offset 0
            b.create_topics()
            after = valid_events("after", 6, offset=30)
            assert wait_for(lambda: _produce_ok(b.bootstrap, after), 30)
            assert wait_for(lambda: stage.stats.decided >= 36, 120), stage.stats
            assert stage.stats.recreated >= 1
            counted = metrics.registry.get_sample_value("riskpipe_input_partition_recreated_total",
                                                        {"topic": cfg.topics.input, "partition": "0"})
            assert counted is not None and counted >= 1
        ids = ledger_ids(str(ledger_path))
        assert {e["id"] for e in after} <= set(ids) and len(ids) == len(set(ids)) == 36


def test_the_source_reads_a_re_created_partition_from_its_start(tmp_path):
    """The mechanism alone, on the Kafka source: it read 40 messages of the input
    partition and committed; the topic is deleted and made again (offsets restart at 0
    under a new topic id; a broker that lost its data looks the same) and new messages
    arrive. kafka-python keeps the old position 40, and Tansu answers a fetch there with
    no records and no error, so without the re-read none of the new messages below
    offset 40 ever arrives. With it the source reads exactly what the new log holds."""
    from kafka import KafkaConsumer, KafkaProducer
    from kafka.admin import KafkaAdminClient

    from riskpipe.app.config import load_config
    from riskpipe.stream.io import KafkaSource

    def poll_for(src, seconds: float) -> list:
        out, deadline = [], time.monotonic() + seconds
        while time.monotonic() < deadline:  # back to back, as the stage polls
            out += src.poll(100, 200)
        return out

    with EmbeddedBroker() as b:
        b.create_topics(["inferences"])
        cfg = load_config(None, bootstrap_servers=b.bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=600,
                          metadata_max_age_ms=1000)
        p = KafkaProducer(bootstrap_servers=b.bootstrap)
        for i in range(40):
            p.send("inferences", value=b"old-%d" % i).get(timeout=30)
        src = KafkaSource(cfg)
        try:
            got: list = []
            deadline = time.monotonic() + 60
            while len(got) < 40 and time.monotonic() < deadline:
                got += src.poll(100, 200)
            assert len(got) == 40
            src.commit(got)
            admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
            admin.delete_topics(["inferences"])
            admin.close()
            poll_for(src, 3)
            b.create_topics(["inferences"])
            poll_for(src, 3)
            for i in range(12):
                p.send("inferences", value=b"new-%d" % i).get(timeout=30)
            p.close()
            new = [m.value for m in poll_for(src, 20) if m.value.startswith(b"new-")]
            truth = KafkaConsumer("inferences", bootstrap_servers=b.bootstrap, auto_offset_reset="earliest",
                                  consumer_timeout_ms=5000)
            held = [m.value for m in truth]  # what the new log holds, read by a consumer with no history
            truth.close()
            assert held and all(v.startswith(b"new-") for v in held)
            # the order across partitions is the fetch's (the consumer's own metadata request may
            # have made the topic first, with Tansu's 4 partitions)
            assert sorted(new) == sorted(held)
            assert src.recreated() == [("inferences", 0)]
        finally:
            src.close()


def test_a_member_applies_a_join_answered_after_its_poll_timed_out():
    """kafka-python 3 drops a join answer that arrives after ``poll``'s timeout when the
    rebalance began on a metadata change (the input topic made again, partitions added):
    the member's partitions were revoked and it never takes any again, sends no
    heartbeat and never rejoins, so the stage reads nothing (the CI failure of the
    re-created-partition test, reproduced on a loaded machine where SyncGroup took 13 ms).
    Here every join answer arrives 0.6 s late, as over a slow link, while the member polls
    every 100 ms; a consumer riskpipe builds (``kafka_clients.consumer``) still applies it
    and reads what the new log holds. Without ``_rejoin_until_applied`` nothing arrives."""
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient
    from kafka.consumer.subscription_state import ConsumerRebalanceListener

    from riskpipe import kafka_clients

    events: list = []

    class Recorder(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked):
            events.append("revoked")

        def on_partitions_assigned(self, assigned):
            events.append("assigned")

    def poll_until(check, seconds: float) -> list:
        got, deadline = [], time.monotonic() + seconds
        while not check(got) and time.monotonic() < deadline:
            got += [r.value for recs in member.poll(timeout_ms=100).values() for r in recs]
        return got

    with EmbeddedBroker() as b:
        b.create_topics(["t"], partitions=1)
        member = kafka_clients.consumer(
            kafka_clients.KafkaSettings(bootstrap_servers=b.bootstrap), group_id="g", enable_auto_commit=False,
            auto_offset_reset="earliest", session_timeout_ms=2000, heartbeat_interval_ms=600, metadata_max_age_ms=300)
        try:
            member.subscribe(["t"], listener=Recorder())
            poll_until(lambda _: events[-1:] == ["assigned"], 60)
            assert events[-1:] == ["assigned"]
            coordinator = member._coordinator
            join = coordinator._do_join_and_sync_async

            async def late_answer():
                answer = await join()
                await coordinator._manager._net.sleep(0.6)
                return answer

            coordinator._do_join_and_sync_async = late_answer
            events.clear()
            admin = KafkaAdminClient(bootstrap_servers=b.bootstrap)
            admin.delete_topics(["t"])
            admin.close()
            b.create_topics(["t"], partitions=2)  # a partition more: the leader's metadata check sees it
            poll_until(lambda _: "revoked" in events, 30)
            assert "revoked" in events  # the rebalance has begun
            p = KafkaProducer(bootstrap_servers=b.bootstrap)
            for i in range(5):
                p.send("t", value=b"new-%d" % i, partition=0).get(timeout=30)
            p.close()
            got = poll_until(lambda got: len(got) >= 5, 30)
            assert events[-1] == "assigned" and got == [b"new-%d" % i for i in range(5)]
        finally:
            member.close()


def _produce_ok(bootstrap, events) -> bool:
    try:
        produce(bootstrap, events)
        return True
    except Exception:  # noqa: BLE001 - broker still coming back
        return False


def test_dlq_guard_stops_the_stage_loudly(broker, tmp_path):
    produce(broker.bootstrap, [(b"garbage", [])] * 30)
    ledger = str(tmp_path / "l.sqlite")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"bootstrap_servers: {broker.bootstrap}\nguard: {{max_consecutive_invalid: 20, window: 50}}\n"
                   "session_timeout_ms: 2000\nheartbeat_interval_ms: 600\n")
    p = run_cli(["run", "--config", str(cfg), "--ledger", ledger])
    rc, err = stop(p, sig=0, timeout=120) if False else (p.wait(timeout=120), p.stderr.read())
    assert rc == 3
    assert "DLQ guard tripped" in err and "20 consecutive invalid" in err and "Traceback" not in err


def test_broker_command_prints_address_and_stops_cleanly():
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "broker", "--partitions", "2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("bootstrap: 127.0.0.1:")
        bootstrap = line.split()[1]
        from kafka import KafkaConsumer

        c = KafkaConsumer(bootstrap_servers=bootstrap)
        assert {"inferences", "decisions", "review", "audit", "dlq", "review-outcomes", "checkpoints"} <= c.topics()
        assert len(c.partitions_for_topic("inferences")) == 2
        assert len(c.partitions_for_topic("checkpoints")) == 1  # before: not made (4 when auto-created)
        c.close()
    finally:
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "broker stopped" in err


def test_stage_exports_lag_and_decision_metrics(broker, tmp_path, pipeline):
    from riskpipe.metrics import StageMetrics, expose

    produce(broker.bootstrap, valid_events("m", 48) + [(b"nope", [])])
    m = StageMetrics()
    cfg = config_for(broker, tmp_path / "l.sqlite", batch={"max_events": 16, "max_wait_ms": 10})
    with StageThread(cfg, pipeline, None, m) as stage:
        assert wait_for(lambda: stage.stats.decided >= 48 and sum(stage.stats.dlq.values()) == 1, 60)
        time.sleep(0.3)
        text = expose(m.registry).decode()
    assert 'riskpipe_consumer_lag_messages{partition="0",topic="inferences"}' in text
    assert 'riskpipe_events_total{outcome="decided"} 48.0' in text
    assert 'riskpipe_dlq_messages_total{reason="invalid_json"} 1.0' in text
    assert "riskpipe_policy_info" in text


def test_broker_command_on_a_port_in_use_says_so_and_touches_nothing_there():
    """`riskpipe broker --port P` with P taken (another broker, any program): Tansu could not
    listen, but the readiness check connected to whatever held P, so the command created its
    topics there, printed `bootstrap: 127.0.0.1:P` as its own, then `the broker process exited
    unexpectedly`, with no reason."""
    import socket

    from click.testing import CliRunner

    from riskpipe.cli import cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["broker", "--port", str(port)])
    assert r.exit_code == 2 and r.stdout == "", r.output
    assert r.stderr.strip().splitlines()[0] == (
        f"riskpipe: error: embedded broker: 127.0.0.1:{port} is in use (Address already in use)")
