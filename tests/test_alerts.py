"""The Prometheus alert rules: promtool lint + unit tests, and their contract.

Needs Debian's `prometheus` package (promtool), which `make test` installs.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from riskpipe.metrics import metric_names

PROM_DIR = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
RULES = PROM_DIR / "riskpipe-rules.yml"
RULE_TESTS = PROM_DIR / "riskpipe-rules.test.yml"
METRIC = re.compile(r"\briskpipe_[a-z0-9_]+")
SEVERITIES = {"critical", "warning", "info"}

needs_promtool = pytest.mark.skipif(shutil.which("promtool") is None,
                                    reason="promtool missing: run `make system-packages`")


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)


def _rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def _alerts() -> list[dict]:
    return [r for r in _rules() if "alert" in r]


@needs_promtool
def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    result = _promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_promtool
def test_promtool_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """The unit tests are not vacuous: a rule with a wrong threshold fails them."""
    broken = RULES.read_text().replace("riskpipe_review_backlog) > 100",
                                       "riskpipe_review_backlog) > 1000")
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = _promtool("test", "rules", str(tmp_path / RULE_TESTS.name))
    assert result.returncode != 0
    assert "RiskpipeReviewBacklogHigh" in result.stdout + result.stderr


def test_every_alert_has_severity_summary_and_description() -> None:
    alerts = _alerts()
    assert len(alerts) >= 10
    for alert in alerts:
        name = alert["alert"]
        assert alert.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = alert.get("annotations", {})
        assert annotations.get("summary", "").strip(), name
        # the description says what to check
        assert "Check" in annotations.get("description", ""), name


def test_issue_alerts_exist() -> None:
    names = {a["alert"] for a in _alerts()}
    required = {"RiskpipeStageDown", "RiskpipeNotConsuming", "RiskpipeConsumerLagGrowing",
                "RiskpipeAbstentionRateHigh", "RiskpipeMedianRadiusDrop",
                "RiskpipeReviewBacklogHigh", "RiskpipeReviewDeadlineBreached",
                "RiskpipeDLQSpike", "RiskpipeCertificationLatencyHigh", "RiskpipePolicyChanged"}
    assert required <= names, required - names


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested not firing"


def test_rules_query_only_exported_metrics_and_recorded_series() -> None:
    exported = metric_names()
    recorded = {r["record"] for r in _rules() if "record" in r}
    for rule in _rules():
        name = rule.get("alert") or rule.get("record")
        used = set(METRIC.findall(rule["expr"]))
        assert used <= exported, (name, used - exported)
        used_records = set(re.findall(r"\briskpipe:[a-z0-9_:]+", rule["expr"]))
        assert used_records <= recorded, (name, used_records - recorded)
        assert used or used_records or "up{" in rule["expr"], name


PER_MODEL_METRICS = ("riskpipe_certificates_total", "riskpipe_certified_radius", "riskpipe_decisions_total",
                     "riskpipe_certification_duration_seconds", "riskpipe_policy_info", "riskpipe:certificate",
                     "riskpipe:certified_radius", "riskpipe:certification_duration")


def test_rules_on_per_model_metrics_keep_the_model_label() -> None:
    """Every aggregation over a per-model metric groups by model: one model's radii or
    abstentions are never blended with another's (their units may differ)."""
    checked = 0
    for rule in _rules():
        expr = rule["expr"]
        if not any(m in expr for m in PER_MODEL_METRICS):
            continue
        checked += 1
        for grouping in re.findall(r"\b(?:by|on) \(([^)]*)\)", expr):
            assert "model" in grouping.replace(" ", "").split(","), (rule.get("alert") or rule.get("record"), grouping)
    assert checked >= 8
