"""Loading, validation errors (broken-policy gallery), identity and lint of policies."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import get_args

import pytest
import yaml
from pydantic import ValidationError

from riskpipe.decisions import DECISIONS
from riskpipe.policy import Policy, PolicyError, load_policy, parse_policy
from riskpipe.policy.lint import lint
from riskpipe.policy.schema import Fallback, Rule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "policies").glob("*.yaml"))
GALLERY = sorted((ROOT / "tests" / "data" / "policies").glob("*.yaml"))


def test_three_examples_exist():
    assert {p.stem for p in EXAMPLES} >= {"default", "strict", "shadow"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_loads_and_lints_clean(path):
    pol = load_policy(path)
    assert isinstance(pol, Policy)
    # a shipped policy's version changes with its content (1.1.0: the support signal; default 1.2.0, shadow
    # 1.1.0: upstream-malformed)
    assert pol.name == path.stem and pol.version == {"default": "1.2.0", "strict": "1.1.0"}.get(path.stem, "1.1.0")
    assert len(pol.sha256) == 64
    assert lint(pol, input_dim=64) == []


def test_shadow_flag_of_examples():
    assert load_policy(ROOT / "policies/shadow.yaml").shadow is True
    assert load_policy(ROOT / "policies/default.yaml").shadow is False


def test_default_is_the_fast_demo_policy():
    c = load_policy(ROOT / "policies/default.yaml").certifier
    assert (c.method, c.mode, c.sigma, c.alpha, c.max_samples) == ("smoothing", "decide", 0.25, 0.001, 10000)


@pytest.mark.parametrize("path", GALLERY, ids=lambda p: p.stem)
def test_broken_policy_gives_its_expected_lines(path):
    expected = [f"{path}:{line[len('# expect: '):].rstrip()}" for line in path.read_text().splitlines()
                if line.startswith("# expect: ")]
    assert expected, f"{path.name} states no expected error"
    with pytest.raises(PolicyError) as err:
        load_policy(path)
    assert str(err.value).splitlines() == expected
    assert len(err.value.problems) == len(expected)
    for p in err.value.problems:
        assert p.file == str(path) and p.line >= 1 and p.field and p.reason


def test_missing_file_is_one_line():
    with pytest.raises(PolicyError) as err:
        load_policy("/nonexistent/p.yaml")
    assert str(err.value) == "/nonexistent/p.yaml:0: (file): file not found"


def test_policy_is_immutable():
    pol = load_policy(ROOT / "policies/default.yaml")
    with pytest.raises(ValidationError):
        pol.threat_model.epsilon = 1.0  # type: ignore[misc]
    with pytest.raises(ValidationError):
        pol.shadow = True  # type: ignore[misc]
    assert isinstance(pol.rules, tuple)


def test_sha256_is_of_the_canonical_form_not_the_text():
    text = (ROOT / "policies/default.yaml").read_text()
    a = parse_policy(text, "a.yaml")
    reordered = yaml.safe_dump(dict(reversed(list(yaml.safe_load(text).items()))), sort_keys=False)
    b = parse_policy("# a comment\n" + reordered, "b.yaml")
    assert a.sha256 == b.sha256
    c = parse_policy(text.replace("epsilon: 0.25", "epsilon: 0.26"), "c.yaml")
    assert c.sha256 != a.sha256


def test_defaults_are_explicit_in_the_canonical_form():
    pol = load_policy(ROOT / "policies/shadow.yaml")
    canon = pol.canonical_json()
    assert '"public_fields":["id","ts","decision","policy_version"]' in canon
    assert '"fallback":{"controls":[],"decision":"review"' in canon


def test_certificate_epsilon_follows_theorem_2():
    text = (ROOT / "policies/default.yaml").read_text()
    text = text.replace("norm: l2\n  epsilon: 0.25", "norm: linf\n  epsilon: 0.03")
    pol = parse_policy(text, "linf.yaml")
    # an l2 radius r covers r / sqrt(d) in linf: covering 0.03 needs 0.03 * sqrt(64)
    assert pol.certificate_epsilon("l2", 64) == pytest.approx(0.24)
    assert pol.certificate_epsilon("linf", 64) == pytest.approx(0.03)
    # same norm: no conversion, whatever the dimension
    assert load_policy(ROOT / "policies/default.yaml").certificate_epsilon("l2", 784) == pytest.approx(0.25)


def test_lint_reports_norm_shrink_unreachable_and_uncovered(tmp_path):
    text = (ROOT / "policies/default.yaml").read_text()
    text = text.replace("norm: l2\n  epsilon: 0.25", "norm: linf\n  epsilon: 0.03")
    text = text.replace("{field: score, op: ge, value: 0.6}", "{field: score, op: gt, value: 1.0}")
    # the final allow no longer covers certified samples with a flagged upstream risk
    text = text.replace("        - {field: certified_in_threat, op: eq, value: true}\n    decision: allow",
                        "        - {field: certified_in_threat, op: eq, value: true}\n"
                        "        - {field: signals.upstream_risk.flagged, op: eq, value: false}\n    decision: allow")
    pol = parse_policy(text, "x.yaml")
    msgs = [w.message for w in lint(pol, input_dim=64)]
    assert any("can never hold" in m and "score gt 1" in m for m in msgs)
    assert any(m.startswith("uncovered cases") and "signals.upstream_risk.flagged=true" in m for m in msgs)
    assert any("threat norm linf differs from the certificate norm l2" in m and "0.125 * r" in m for m in msgs)


def test_lint_unreachable_rule():
    text = (ROOT / "policies/default.yaml").read_text()
    text = text.replace("fallback:\n",
                        "  - id: never\n    when:\n      all:\n        - {field: score, op: ge, value: 0.9}\n"
                                      "    decision: block\n    reasons: [late]\nfallback:\n")
    msgs = [w.message for w in lint(parse_policy(text, "x.yaml"))]
    assert msgs == ["unreachable: earlier rules match every input rule 'never' matches"]


def test_lint_certifier_that_can_never_certify():
    text = (ROOT / "policies/default.yaml").read_text().replace("max_samples: 10000", "max_samples: 20")
    msgs = [w.message for w in lint(parse_policy(text, "x.yaml"))]
    assert any(m.startswith("no input can be certified: with max_samples=20") for m in msgs)


def test_shadow_policy_may_allow_uncertified():
    text = (ROOT / "tests/data/policies/catch_all_allow.yaml").read_text().replace("shadow: false", "shadow: true")
    assert parse_policy(text, "s.yaml").shadow


def test_disclosure_public_view_default():
    pol = load_policy(ROOT / "policies/default.yaml")
    record = {"id": "e1", "ts": "2024-01-01T00:00:00Z", "decision": "review", "score": 0.9,
              "policy": {"name": "default", "version": "1.0.0", "sha256": pol.sha256},
              "certificate": {"radius": 0.3}, "signals": {}, "context": {}}
    assert pol.public_view(record) == {"id": "e1", "ts": "2024-01-01T00:00:00Z", "decision": "review",
                                       "policy_version": "1.0.0"}


def test_decision_dataclass_is_frozen():
    from riskpipe.certify import Certificate

    pol = load_policy(ROOT / "policies/default.yaml")
    d = pol.evaluate(Certificate(method="smoothing", norm="l2", radius=0.0, abstained=True, predicted_class=None))
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.decision = "allow"  # type: ignore[misc]


def test_a_rule_can_reach_exactly_the_decisions_every_counter_counts():
    """The ledger's check, the metrics and the report count ``riskpipe.decisions.DECISIONS``:
    a rule decision outside it would be written and counted nowhere."""
    assert get_args(Rule.model_fields["decision"].annotation) == DECISIONS
    assert set(get_args(Fallback.model_fields["decision"].annotation)) < set(DECISIONS)
