"""One Kafka client factory: every component's clients carry the same TLS/SASL settings.

The security settings cannot be exercised against the embedded broker (Tansu serves
plaintext only here), so these tests record the keyword arguments kafka-python's client
classes receive and stop before any connection; the plaintext path is covered end to end
by the broker tests (stage, ingest, review console).
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from riskpipe import kafka_clients
from riskpipe.app.config import ConfigError, load_config
from riskpipe.kafka_clients import KafkaSettings

SECURE = dict(bootstrap_servers="kafka-0.example:9093,kafka-1.example:9093", security_protocol="SASL_SSL",
              sasl_mechanism="SCRAM-SHA-512", sasl_plain_username="riskpipe", sasl_plain_password="s3cret-pass",
              ssl_cafile="/etc/kafka/ca.pem", ssl_certfile="/etc/kafka/client.pem", ssl_keyfile="/etc/kafka/client.key")


class Refused(Exception):
    pass


@pytest.fixture
def recorded(monkeypatch):
    """Replace kafka-python's three client classes by recorders that refuse to connect."""
    import kafka
    import kafka.admin

    calls: list[tuple[str, tuple, dict]] = []

    def recorder(name):
        def make(*args, **kwargs):
            calls.append((name, args, kwargs))
            raise Refused(name)
        return make

    monkeypatch.setattr(kafka, "KafkaConsumer", recorder("consumer"))
    monkeypatch.setattr(kafka, "KafkaProducer", recorder("producer"))
    monkeypatch.setattr(kafka.admin, "KafkaAdminClient", recorder("admin"))
    return calls


def assert_secure(kwargs):
    assert kwargs["bootstrap_servers"] == ["kafka-0.example:9093", "kafka-1.example:9093"]
    for k, v in SECURE.items():
        if k != "bootstrap_servers":
            assert kwargs[k] == v, k
    assert kwargs["ssl_check_hostname"] is True


def test_factory_passes_every_setting_to_every_client(recorded):
    s = KafkaSettings(**SECURE)
    for make in (kafka_clients.consumer, kafka_clients.producer, kafka_clients.admin):
        with pytest.raises(Refused):
            make(s, client_id="x")
    assert [c[0] for c in recorded] == ["consumer", "producer", "admin"]
    for _, _, kwargs in recorded:
        assert_secure(kwargs)
        assert kwargs["client_id"] == "x"


def test_plaintext_sends_no_tls_options():
    opts = KafkaSettings(bootstrap_servers="127.0.0.1:9092").client_options()
    assert opts == {"bootstrap_servers": ["127.0.0.1:9092"], "security_protocol": "PLAINTEXT"}


def test_connection_settings_cannot_be_overridden_per_client():
    with pytest.raises(TypeError, match="security_protocol"):
        kafka_clients.producer(KafkaSettings(), security_protocol="PLAINTEXT")


@pytest.mark.parametrize("yaml_text, message", [
    ("security_protocol: SASL_SSL\n", "sasl_mechanism: required with security_protocol SASL_SSL"),
    ("security_protocol: SASL_SSL\nsasl_mechanism: PLAIN\nsasl_plain_username: u\n",
     "sasl_plain_username/sasl_plain_password: required"),
    ("ssl_certfile: /c.pem\n", "ssl_certfile/ssl_keyfile: give both"),
    ("security_protocol: TLS\n", "security_protocol: Input should be"),
    ("sasl_mechanism: MD5\n", "sasl_mechanism: Input should be"),
])
def test_inconsistent_security_settings_fail_with_one_line(tmp_path, yaml_text, message):
    f = tmp_path / "riskpipe.yaml"
    f.write_text(yaml_text)
    with pytest.raises(ConfigError, match=message) as e:
        load_config(str(f))
    assert str(e.value).startswith(str(f)) and "\n" not in str(e.value)


@pytest.fixture
def secure_config(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_PASSWORD", SECURE["sasl_plain_password"])
    monkeypatch.setenv("RISKPIPE_REVIEW_PASSWORD", "a long review passphrase")
    body = {k: v for k, v in SECURE.items() if k != "sasl_plain_password"}
    f = tmp_path / "riskpipe.yaml"
    f.write_text("".join(f"{k}: {v}\n" for k, v in body.items())
                 + "sasl_plain_password: ${KAFKA_PASSWORD}\n" + f"ledger: {tmp_path / 'l.db'}\n")
    return f


def test_stage_source_sink_and_topic_creation_use_the_settings(secure_config, recorded):
    from riskpipe.stream.broker import create_topics
    from riskpipe.stream.io import KafkaSink, KafkaSource

    cfg = load_config(str(secure_config))
    for build in (lambda: KafkaSource(cfg), lambda: KafkaSink(cfg),
                  lambda: create_topics(cfg.kafka(), ["t"], timeout=0)):
        with pytest.raises(Refused):
            build()
    # the source asks the cluster its id first (group timing), with the same settings
    assert [c[0] for c in recorded] == ["admin", "consumer", "producer", "admin"]
    for _, _, kwargs in recorded:
        assert_secure(kwargs)
    assert (recorded[1][2]["session_timeout_ms"], recorded[1][2]["heartbeat_interval_ms"]) == \
        kafka_clients.KAFKA_GROUP_TIMING  # the id could not be read: timing any Kafka accepts


def test_review_console_reads_expanded_settings_and_uses_them(secure_config, recorded):
    from riskpipe.review.server import ConsoleServer
    from riskpipe.review.settings import resolve_settings

    settings = resolve_settings(config_path=str(secure_config))
    assert settings.kafka.sasl_plain_password == SECURE["sasl_plain_password"]  # ${VAR} expanded
    with pytest.raises(Refused):
        ConsoleServer(settings)
    assert recorded[0][0] == "producer"
    assert_secure(recorded[0][2])


def test_ledger_ingest_uses_the_settings(secure_config, tmp_path):
    """`riskpipe ledger ingest --config` in a subprocess, with kafka-python's consumer replaced
    by a recorder through a sitecustomize module on the path."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(textwrap.dedent("""
        import json, os, kafka
        def record(*args, **kwargs):
            with open(os.environ["RECORD_TO"], "w") as f:
                json.dump({"args": list(args), "kwargs": kwargs}, f)
            raise SystemExit(7)
        kafka.KafkaConsumer = record
    """))
    import json
    import os

    out = tmp_path / "call.json"
    env = {**os.environ, "RECORD_TO": str(out),
           "PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "ingest", "--config", str(secure_config),
                        "--ledger", str(tmp_path / "l.db"), "--topic", "audit"], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 7, r.stderr
    call = json.loads(out.read_text())
    assert call["args"] == ["audit"]
    assert_secure(call["kwargs"])


def test_ingest_without_servers_fails_with_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "ingest", "--ledger", str(tmp_path / "l.db")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--bootstrap-servers: required" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("cluster, given, expected", [
    ("tansu_cluster", {}, kafka_clients.EMBEDDED_GROUP_TIMING),
    ("kafka-prod-1", {}, kafka_clients.KAFKA_GROUP_TIMING),
    (None, {}, kafka_clients.KAFKA_GROUP_TIMING),  # unreadable: a timing every Kafka accepts
    ("tansu_cluster", {"session_timeout_ms": 6000}, (6000, 500)),
    ("kafka-prod-1", {"session_timeout_ms": 6000}, (6000, 2000)),  # heartbeat at most a third
    ("tansu_cluster", {"heartbeat_interval_ms": 1000}, (3000, 1000)),
    ("kafka-prod-1", {"heartbeat_interval_ms": 1000}, (10_000, 1000)),
])
def test_group_timing_left_unset_follows_the_broker(monkeypatch, cluster, given, expected):
    monkeypatch.setattr(kafka_clients, "cluster_id", lambda settings: cluster)
    assert kafka_clients.group_timing(KafkaSettings(), **given) == expected


def test_group_timing_given_in_full_asks_nothing(monkeypatch):
    def refuse(settings):
        raise AssertionError("no probe expected")

    monkeypatch.setattr(kafka_clients, "cluster_id", refuse)
    assert kafka_clients.group_timing(KafkaSettings(), 45_000, 3_000) == (45_000, 3_000)


def test_stage_consumer_on_the_embedded_broker_gets_its_group_timing(caplog):
    import logging

    from riskpipe.stream.broker import EmbeddedBroker
    from riskpipe.stream.io import KafkaSource

    with EmbeddedBroker() as b:
        b.create_topics(["inferences"])
        cluster = kafka_clients.cluster_id(KafkaSettings(bootstrap_servers=b.bootstrap))
        assert cluster == kafka_clients.EMBEDDED_CLUSTER_ID
        with caplog.at_level(logging.INFO):
            source = KafkaSource(load_config(None, bootstrap_servers=b.bootstrap))
        try:
            c = source.consumer.config
            assert (c["session_timeout_ms"], c["heartbeat_interval_ms"]) == kafka_clients.EMBEDDED_GROUP_TIMING
            assert "group riskpipe: session timeout 2000 ms, heartbeat interval 500 ms" in caplog.text
            assert "subscribed to inferences as a member of group riskpipe" in caplog.text
        finally:
            source.close()
        # a config's values win
        source = KafkaSource(load_config(None, bootstrap_servers=b.bootstrap, session_timeout_ms=10_000,
                                         heartbeat_interval_ms=3_000))
        try:
            assert source.consumer.config["session_timeout_ms"] == 10_000
        finally:
            source.close()
