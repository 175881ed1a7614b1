"""StageMetrics: what a decision record turns into, naming, exposition, serving."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from riskpipe.app.config import LIVENESS_STALL_S
from riskpipe.metrics import (
    ReviewMetrics,
    StageMetrics,
    certificate_outcome,
    expose,
    metric_names,
    review_reason,
)


def _policy(name: str = "default", version: str = "3", sha256: str = "ab" * 32, method: str = "smoothing",
            norm: str = "linf") -> SimpleNamespace:
    """What StageMetrics.declare reads of a policy (riskpipe.policy's Policy has these fields)."""
    return SimpleNamespace(name=name, version=version, sha256=sha256, certifier=SimpleNamespace(method=method),
                           threat_model=SimpleNamespace(norm=norm))


def _metrics(**models) -> StageMetrics:
    m = StageMetrics()
    m.declare(models or {"digits": _policy()})
    return m


M = (("model", "digits"), ("policy", "default"))  # the labels every per-model series carries here


def _record(**over) -> dict:
    record = {
        "id": "e-1",
        "model": {"name": "digits", "spec": "demo:digits", "sha256": "cd" * 32},
        "decision": "review",
        "policy": {"name": "default", "version": "3", "sha256": "ab" * 32},
        "score": 0.62,
        "reasons": ["below_epsilon", "upstream_risk"],
        "review": {"routed": True, "priority": "high", "deadline": None, "audit_sample": False},
        "certificate": {"method": "smoothing", "norm": "l2", "radius": 0.4,
                        "radius_threat": 0.2, "threat_norm": "linf", "threat_epsilon": 0.25,
                        "abstained": False, "certified": None, "n_samples": 1200,
                        "elapsed_ms": 35.0},
    }
    record.update(over)
    return record


def _samples(metrics: StageMetrics | ReviewMetrics) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in text_string_to_metric_families(expose(metrics.registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _key(name: str, *labels: tuple[str, str]) -> tuple[str, tuple]:
    return name, tuple(sorted([*M, *labels]))


def test_decision_record_feeds_every_metric() -> None:
    m = _metrics()
    m.decision(_record())
    m.end_to_end(_record(), 0.3)
    s = _samples(m)
    assert s[_key("riskpipe_decisions_total", ("decision", "review"))] == 1
    assert s[_key("riskpipe_certificates_total", ("method", "smoothing"), ("outcome", "below_epsilon"))] == 1
    # radius in the threat norm, not the certificate's own
    assert s[_key("riskpipe_certified_radius_sum", ("norm", "linf"))] == pytest.approx(0.2)
    assert s[_key("riskpipe_certified_radius_bucket", ("le", "0.2"), ("norm", "linf"))] == 1
    assert s[_key("riskpipe_certified_radius_bucket", ("le", "0.1"), ("norm", "linf"))] == 0
    assert s[_key("riskpipe_risk_score_sum")] == pytest.approx(0.62)
    assert s[_key("riskpipe_model_evaluations_sum", ("method", "smoothing"))] == 1200
    assert s[_key("riskpipe_model_evaluations_bucket", ("le", "100000.0"), ("method", "smoothing"))] == 1
    assert s[_key("riskpipe_certification_duration_seconds_sum", ("method", "smoothing"))] == pytest.approx(0.035)
    assert s[_key("riskpipe_review_routed_total", ("reason", "below_epsilon"))] == 1
    assert s[_key("riskpipe_end_to_end_latency_seconds_count")] == 1


def test_two_models_in_different_units_get_their_own_series() -> None:
    """A pixel-unit image model (radii ~0.5) and a standardised tabular model (radii ~50) in one
    stage: each model's radius histogram holds only its own radii, under its own policy."""
    m = _metrics(cnn=_policy("cnn-policy", "2026.12.02", "11" * 32, norm="l2"),
                 credit=_policy("credit-policy", "2026.12.01", "22" * 32, norm="l2"))
    for i in range(3):
        cert = {"method": "smoothing", "abstained": False, "radius_threat": 0.5 + 0.01 * i, "threat_norm": "l2",
                "threat_epsilon": 0.1}
        m.decision(_record(model={"name": "cnn"}, policy={"name": "cnn-policy"}, certificate=cert))
    cert = {"method": "smoothing", "abstained": False, "radius_threat": 50.0, "threat_norm": "l2",
            "threat_epsilon": 1.0}
    m.decision(_record(model={"name": "credit"}, policy={"name": "credit-policy"}, certificate=cert))
    s = _samples(m)
    cnn = (("model", "cnn"), ("norm", "l2"), ("policy", "cnn-policy"))
    credit = (("model", "credit"), ("norm", "l2"), ("policy", "credit-policy"))
    assert s[("riskpipe_certified_radius_count", cnn)] == 3
    assert s[("riskpipe_certified_radius_sum", cnn)] == pytest.approx(1.53)
    assert s[("riskpipe_certified_radius_count", credit)] == 1
    assert s[("riskpipe_certified_radius_bucket", tuple(sorted([("le", "10.0"), *credit])))] == 0
    infos = {dict(k[1])["model"]: dict(k[1]) for k in s if k[0] == "riskpipe_policy_info"}
    assert infos["cnn"]["version"] == "2026.12.02" and infos["credit"]["sha256"] == "22" * 32


def test_declared_series_start_at_zero_and_undeclared_ones_are_refused() -> None:
    m = _metrics()
    s = _samples(m)
    for decision in ("allow", "review", "block"):
        assert s[_key("riskpipe_decisions_total", ("decision", decision))] == 0
    assert s[_key("riskpipe_certificates_total", ("method", "smoothing"), ("outcome", "abstained"))] == 0
    with pytest.raises(ValueError, match=r"'other'.*not a model and policy of this stage's config"):
        m.decision(_record(model={"name": "other"}))
    with pytest.raises(ValueError, match="'strict'"):  # a declared model under a policy it does not run
        m.decision(_record(policy={"name": "strict"}))
    with pytest.raises(ValueError, match="not a model"):
        StageMetrics().decision(_record())  # nothing declared: nothing accepted
    assert not any(dict(k[1]).get("model") in ("other", "unknown") for k in _samples(m))


@pytest.mark.parametrize("cert, outcome", [
    ({"abstained": True, "radius_threat": 0.0, "threat_epsilon": 0.1}, "abstained"),
    ({"abstained": False, "certified": True, "radius_threat": 0.01, "threat_epsilon": 0.1},
     "certified"),
    ({"abstained": False, "certified": False, "radius_threat": 0.5, "threat_epsilon": 0.1},
     "below_epsilon"),
    ({"abstained": False, "certified": None, "radius_threat": 0.1, "threat_epsilon": 0.1},
     "certified"),
    ({"abstained": False, "certified": None, "radius_threat": 0.09, "threat_epsilon": 0.1},
     "below_epsilon"),
    ({"abstained": False, "certified": None, "radius_threat": 0.3}, "certified"),
    ({"abstained": False}, "below_epsilon"),
])
def test_certificate_outcome(cert: dict, outcome: str) -> None:
    assert certificate_outcome(cert) == outcome


def test_abstention_is_counted_but_has_no_radius() -> None:
    m = _metrics()
    cert = {"method": "ibp", "abstained": True, "radius": 0.0, "radius_threat": 0.0,
            "threat_norm": "l2", "n_samples": 1, "elapsed_ms": 2.0}
    m.decision(_record(certificate=cert, review={"routed": True, "audit_sample": True}))
    s = _samples(m)
    assert s[_key("riskpipe_certificates_total", ("method", "ibp"), ("outcome", "abstained"))] == 1
    assert s[_key("riskpipe_certified_radius_count", ("norm", "linf"))] == 0  # declared, never observed
    assert s[_key("riskpipe_review_routed_total", ("reason", "audit_sample"))] == 1


def test_review_reason() -> None:
    assert review_reason({"review": {"audit_sample": True}, "reasons": ["x"]}) == "audit_sample"
    assert review_reason({"review": {}, "reasons": ["no_certificate"]}) == "no_certificate"
    assert review_reason({"review": {}, "reasons": []}) == "unspecified"


def test_sparse_record_does_not_raise() -> None:
    m = _metrics()
    ids = {"model": {"name": "digits"}, "policy": {"name": "default"}}
    m.decision({**ids, "decision": "allow"})
    m.decision({**ids, "decision": "block", "certificate": {"elapsed_ms": float("nan")},
                "score": None, "review": None})
    s = _samples(m)
    assert s[_key("riskpipe_decisions_total", ("decision", "allow"))] == 1
    assert s[_key("riskpipe_certification_duration_seconds_count", ("method", "smoothing"))] == 0


def test_labels_stay_bounded() -> None:
    m = StageMetrics()
    with pytest.raises(ValueError, match="outcome"):
        m.event("exploded")
    m.dlq("wrong_shape")
    m.dlq("some new reason with spaces")
    review = ReviewMetrics()
    review.review_verdict("confirmed_clean", 120.0)
    review.review_verdict("typo", None)
    s = _samples(m)
    assert s[("riskpipe_dlq_messages_total", (("reason", "wrong_shape"),))] == 1
    assert s[("riskpipe_dlq_messages_total", (("reason", "other"),))] == 1
    s = _samples(review)
    assert s[("riskpipe_review_verdicts_total", (("verdict", "other"),))] == 1
    assert s[("riskpipe_review_time_to_verdict_seconds_count",
              (("verdict", "confirmed_clean"),))] == 1


def test_gauges_infos_and_counters() -> None:
    start = time.time()  # timestamps are bracketed by reads of the clock, never compared with a slack
    m = StageMetrics()
    m.set_lag("inferences", 0, 42)
    m.set_lag("inferences", 1, 7)
    m.drop_lag("inferences", 1)
    m.declare({"digits": _policy(version="1", sha256="a" * 64)})
    m.declare({"digits": _policy(version="2", sha256="b" * 64)})
    m.set_broker_up(True)
    m.broker_error("timeout")
    m.reconnect()
    review = ReviewMetrics()
    review.set_review_backlog(5)
    review.review_deadline_breach()
    before = time.time()
    m.poll()
    s = _samples(m)
    assert s[("riskpipe_consumer_lag_messages",
              (("partition", "0"), ("topic", "inferences")))] == 42
    assert ("riskpipe_consumer_lag_messages",
            (("partition", "1"), ("topic", "inferences"))) not in s
    policies = [k for k in s if k[0] == "riskpipe_policy_info"]
    assert policies == [("riskpipe_policy_info",
                         (("model", "digits"), ("name", "default"), ("sha256", "b" * 64), ("version", "2")))]
    assert s[("riskpipe_broker_up", ())] == 1
    assert s[("riskpipe_broker_errors_total", (("kind", "timeout"),))] == 1
    assert s[("riskpipe_broker_reconnects_total", ())] == 1
    assert not [k for k in s if k[0].startswith("riskpipe_review_") and k[0] != "riskpipe_review_routed_total"]
    r = _samples(review)
    assert r[("riskpipe_review_backlog", ())] == 5 and r[("riskpipe_review_deadline_breaches_total", ())] == 1
    assert [k[0] for k in r if k[0] == "riskpipe_build_info"] == ["riskpipe_build_info"]
    assert s[("riskpipe_last_poll_timestamp_seconds", ())] >= before
    assert start <= s[("riskpipe_policy_loaded_timestamp_seconds", ())] <= before
    build = [dict(k[1]) for k in s if k[0] == "riskpipe_build_info"]
    assert len(build) == 1 and set(build[0]) == {"version", "python", "torch"}


def test_names_follow_prometheus_conventions() -> None:
    names = metric_names()
    assert all(n.startswith("riskpipe_") for n in names)
    for family in [*StageMetrics().registry.collect(), *ReviewMetrics().registry.collect()]:
        if family.type == "counter":
            assert (family.name + "_total") in names
        if "latency" in family.name or "duration" in family.name or "time" in family.name:
            assert family.name.endswith("_seconds"), family.name
        if family.type == "gauge" and "timestamp" in family.name:
            assert family.name.endswith("_timestamp_seconds")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing")
def test_promtool_check_metrics_lints_a_real_scrape() -> None:
    m = _metrics()
    m.event("decided")
    m.decision(_record())
    m.set_lag("inferences", 0, 3)
    m.dlq("invalid_json")
    server = m.serve(0, LIVENESS_STALL_S)
    try:
        scrape = urllib.request.urlopen(server.url, timeout=5).read()
    finally:
        server.shutdown()
    review = ReviewMetrics()  # the console's, as its /metrics serves them
    review.review_verdict("unsure", 30.0)
    review.set_review_backlog(3)
    for text in (scrape, expose(review.registry)):
        result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
        assert result.returncode == 0, (result.stdout + result.stderr).decode()
    assert b"riskpipe_decisions_total" in scrape


def test_serve_metrics_and_healthz() -> None:
    m = StageMetrics()
    server = m.serve(0, LIVENESS_STALL_S)
    try:
        base = f"http://127.0.0.1:{server.port}"
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).read() == b"ok\n"
        m.poll()
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
        m.last_poll.set(time.time() - 3600)  # a loop wedged for an hour
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert err.value.code == 503
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read()
        assert b"riskpipe_last_poll_timestamp_seconds" in body
    finally:
        server.shutdown()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{base}/metrics", timeout=2)


def test_serve_rejects_a_bad_port() -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        StageMetrics().serve(70000, LIVENESS_STALL_S)


def test_a_partition_read_has_its_recreation_counter_at_zero_before_it_counts() -> None:
    """increase() takes nothing from a series' first sample: a counter born at 1 (the first
    re-creation of a partition) never fired RiskpipeInputRecreated (promtool, with the series
    as the stage exported it). A partition whose lag is reported has the counter at 0."""
    m = StageMetrics()
    m.set_lag("inferences", 3, 0)
    s = _samples(m)
    assert s[("riskpipe_input_partition_recreated_total", (("partition", "3"), ("topic", "inferences")))] == 0
    m.partition_recreated("inferences", 3)
    assert _samples(m)[("riskpipe_input_partition_recreated_total",
                        (("partition", "3"), ("topic", "inferences")))] == 1


def test_a_metrics_address_that_cannot_be_bound_is_one_line_naming_it(tmp_path) -> None:
    """`riskpipe run --metrics-port P` with P taken said only `riskpipe: error: Address already
    in use` (a `metrics_addr` that does not resolve: `Name or service not known`), naming neither
    the setting nor the address."""
    import socket

    from click.testing import CliRunner

    from riskpipe.cli import cli

    (tmp_path / "events.jsonl").write_text("")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(cli, ["run", "--metrics-port", str(port), "--no-ledger", "--source",
                                     f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.strip().splitlines() == [
        f"riskpipe: error: metrics_addr '127.0.0.1', metrics_port {port}: cannot listen: Address already in use"]
