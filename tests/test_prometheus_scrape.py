"""A real Prometheus server scrapes a running stage (`riskpipe run` on the embedded
Kafka broker) and the expected series come back through its HTTP API."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import yaml

from riskpipe.stream.broker import EmbeddedBroker, free_port
from riskpipe.stream.events import make_event

RULES = Path(__file__).resolve().parents[1] / "deploy" / "prometheus" / "riskpipe-rules.yml"

pytestmark = [
    pytest.mark.broker, pytest.mark.slow,
    pytest.mark.skipif(shutil.which("prometheus") is None,
                       reason="prometheus missing: run `make system-packages`"),
]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def _query(base: str, promql: str) -> list[dict]:
    body = _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert body["status"] == "success", body
    return body["data"]["result"]


def _wait(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = predicate()
            if last:
                return last
        except OSError as e:  # server not listening yet
            last = e
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prometheus(tmp_path: Path, stage_port: int, prom_port: int) -> subprocess.Popen:
    """A real Prometheus scraping the stage every second, with the alert and recording rules."""
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "riskpipe", "static_configs": [{"targets": [f"127.0.0.1:{stage_port}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    return subprocess.Popen(
        ["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prom_port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))


def test_prometheus_scrapes_a_running_stage(tmp_path: Path) -> None:
    from kafka import KafkaProducer

    stage_port, prom_port = free_port(), free_port()
    with EmbeddedBroker() as broker:
        broker.create_topics()
        rng = np.random.default_rng(0)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i in range(4):
            event = make_event(f"scrape-{i}", "digits", rng.random((1, 8, 8)))  # digits: 8x8 pixels in [0, 1]
            producer.send("inferences", key=event["id"].encode(), value=json.dumps(event).encode())
        producer.send("inferences", key=b"bad", value=b"{not json")
        producer.flush()
        producer.close()

        env = dict(os.environ, RISKPIPE_DATA_DIR=str(tmp_path / "data"))
        stage = subprocess.Popen(
            [sys.executable, "-m", "riskpipe.cli", "run", "--bootstrap-servers", broker.bootstrap,
             "--metrics-port", str(stage_port), "--no-ledger"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stage.log", "wb"))
        prometheus = _prometheus(tmp_path, stage_port, prom_port)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            decided = _wait(lambda: _query(base, 'riskpipe_events_total{job="riskpipe", outcome="decided"} >= 4'),
                            90, "4 decided events in Prometheus")
            assert stage.poll() is None, (tmp_path / "stage.log").read_text()[-2000:]
            assert decided[0]["metric"]["instance"] == f"127.0.0.1:{stage_port}"
            assert _query(base, 'up{job="riskpipe"} == 1')
            dlq = _wait(lambda: _query(base, 'riskpipe_dlq_messages_total{reason="invalid_json"}'),
                        30, "the DLQ counter")
            assert float(dlq[0]["value"][1]) == 1
            certs = _query(base, "sum(riskpipe_certificates_total)")
            assert float(certs[0]["value"][1]) == 4
            for series in ("riskpipe_decisions_total", "riskpipe_certification_duration_seconds_bucket",
                           "riskpipe_model_evaluations_count", "riskpipe_risk_score_count",
                           "riskpipe_last_poll_timestamp_seconds", "riskpipe_broker_up"):
                assert _query(base, series), series
            # per model: every decision series names the model and its policy, nothing else
            by_model = _query(base, "sum by (model, policy) (riskpipe_decisions_total)")
            assert [(r["metric"]["model"], r["metric"]["policy"], float(r["value"][1])) for r in by_model] == [
                ("digits", "default", 4.0)]
            assert _query(base, 'riskpipe_certified_radius_count{model="digits", policy="default"}')
            policy = _query(base, "riskpipe_policy_info")
            assert policy and policy[0]["metric"]["name"] == "default" and policy[0]["metric"]["model"] == "digits"
            assert len(policy[0]["metric"]["sha256"]) == 64
            build = _query(base, "riskpipe_build_info")
            assert set(build[0]["metric"]) >= {"version", "python", "torch"}
            # the alert rules load and evaluate against the live series
            groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
            assert {g["name"] for g in groups} == {"riskpipe.recording", "riskpipe.alerts"}
            # (the recording group runs every minute, so it may not have run yet)
            assert not [r for g in groups for r in g["rules"] if r["health"] == "err"], groups
            # a rule evaluated while the stage was still loading its model (no poll yet: last poll 0,
            # broker_up 0) leaves RiskpipeNotConsuming pending until the next evaluation (1 s) sees the
            # polls; on a loaded machine that start-up takes long enough to be scraped. A healthy stage
            # has neither alert pending or firing once its series are in
            def calm():
                firing = [a["labels"]["alertname"] for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]]
                return not ({"RiskpipeStageDown", "RiskpipeNotConsuming"} & set(firing)) or None

            _wait(calm, 15, "RiskpipeStageDown and RiskpipeNotConsuming neither pending nor firing")
        finally:
            _stop(prometheus)
            _stop(stage)


def test_prometheus_sees_two_models_in_different_units_apart(tmp_path: Path) -> None:
    """One stage, two models: the demo's 8x8 pixels in [0, 1] and the tabular example's 30 raw
    features certified in standardised units. Every per-model series carries its model and
    policy, the radius histograms are separate, and the per-model recording rules evaluate."""
    from kafka import KafkaProducer

    root = Path(__file__).resolve().parents[1]
    tab = root / "examples" / "tabular"
    config = {"policy": str(root / "policies" / "default.yaml"), "progress_interval_s": 0,
              "models": {"digits": {"spec": "demo:digits"},
                         "cancer": {"spec": str(tab / "model.skops"), "reference": str(tab / "reference.npz"),
                                    "policy": str(tab / "policy.yaml"), "scale": "standardize"}}}
    stage_port, prom_port = free_port(), free_port()
    with EmbeddedBroker() as broker:
        broker.create_topics()
        config["bootstrap_servers"] = broker.bootstrap
        (tmp_path / "riskpipe.yaml").write_text(yaml.safe_dump(config))
        rng = np.random.default_rng(1)
        X = np.load(tab / "reference.npz")["X"]
        events = [make_event(f"px-{i}", "digits", rng.random((1, 8, 8))) for i in range(4)]
        events += [make_event(f"tab-{i}", "cancer", X[i]) for i in range(5)]
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for event in events:
            producer.send("inferences", key=event["id"].encode(), value=json.dumps(event).encode())
        producer.flush()
        producer.close()
        env = dict(os.environ, RISKPIPE_DATA_DIR=str(tmp_path / "data"))
        stage = subprocess.Popen(
            [sys.executable, "-m", "riskpipe.cli", "run", "--config", str(tmp_path / "riskpipe.yaml"),
             "--metrics-port", str(stage_port), "--no-ledger"],
            env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stage.log", "wb"))
        prometheus = _prometheus(tmp_path, stage_port, prom_port)
        base = f"http://127.0.0.1:{prom_port}"
        try:
            _wait(lambda: _query(base, 'sum(riskpipe_events_total{outcome="decided"}) >= 9'), 120, "9 decisions")
            assert stage.poll() is None, (tmp_path / "stage.log").read_text()[-2000:]
            by_model = {r["metric"]["model"]: (r["metric"]["policy"], float(r["value"][1]))
                        for r in _query(base, "sum by (model, policy) (riskpipe_decisions_total)")}
            assert by_model == {"digits": ("default", 4.0), "cancer": ("tabular-breast-cancer", 5.0)}
            radii = {r["metric"]["model"] for r in _query(base, "riskpipe_certified_radius_bucket")}
            assert radii == {"digits", "cancer"}  # one histogram per model, never a shared one
            infos = {r["metric"]["model"]: r["metric"]["name"] for r in _query(base, "riskpipe_policy_info == 1")}
            assert infos == {"digits": "default", "cancer": "tabular-breast-cancer"}
            # the per-model recording rules evaluate against these series (health, not values: they run each minute)
            groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
            assert not [r for g in groups for r in g["rules"] if r["health"] == "err"], groups
        finally:
            _stop(prometheus)
            _stop(stage)
