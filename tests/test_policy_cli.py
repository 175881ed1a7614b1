"""``riskpipe policy check / explain / diff`` on fixed files and records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from riskpipe.cli.policy_cmd import policy

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "policies"
RECORDS = DATA / "records.jsonl"
DEFAULT, STRICT, SHADOW = (str(ROOT / f"policies/{n}.yaml") for n in ("default", "strict", "shadow"))


def run(*args):
    return CliRunner().invoke(policy, [str(a) for a in args])


def test_check_valid_exits_zero():
    r = run("check", DEFAULT, STRICT, SHADOW, "--strict")
    assert r.exit_code == 0, r.output
    assert r.output.count(": ok: ") == 3 and "warning" not in r.output


def test_check_invalid_exits_one_with_one_line_per_problem():
    path = DATA / "typo_field.yaml"
    r = run("check", path)
    assert r.exit_code == 1
    assert r.output.splitlines() == [
        f"{path}:12: threat_model.epsilon: required field is missing",
        f"{path}:14: threat_model.epsilom: unknown field; did you mean 'epsilon'?",
    ]
    assert "Traceback" not in r.output


def test_check_mixed_files_fails_but_reports_all():
    r = run("check", DEFAULT, DATA / "bad_norm.yaml")
    assert r.exit_code == 1
    assert ": ok: default" in r.output and "threat_model.norm: 'l3' is not one of l1, l2, linf" in r.output


def test_check_warnings_and_theorem_2_factor(tmp_path):
    text = Path(DEFAULT).read_text().replace("norm: l2\n  epsilon: 0.25", "norm: linf\n  epsilon: 0.03")
    p = tmp_path / "linf.yaml"
    p.write_text(text)
    r = run("check", p, "--input-dim", "784")
    assert r.exit_code == 0
    line = next(ln for ln in r.output.splitlines() if "warning" in ln)
    # l2 -> linf at d = 784 shrinks by 1/sqrt(784) = 1/28
    assert line.startswith(f"{p}:14: threat_model.norm: warning: threat norm linf differs")
    assert "0.03571 * r" in line and "must reach 0.84" in line
    assert run("check", p, "--strict").exit_code == 1


def test_check_missing_file():
    r = run("check", "/nonexistent.yaml")
    assert r.exit_code == 1 and r.output.strip() == "/nonexistent.yaml:0: (file): file not found"


def test_explain_certified_record():
    r = run("explain", DEFAULT, "--record", RECORDS, "--id", "evt-certified")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "record evt-certified: recorded allow (rule certified) under default 1.0.0" in out
    assert "radius 0.31 -> 0.31 in l2 vs epsilon 0.25: certified in the threat model" in out
    assert "1. out-of-support: no" in out  # the record's context predates the support signal
    assert "2. prediction-mismatch: no" in out and "3. uncertified: no" in out
    assert "[no ] certified_in_threat eq false   (actual true)" in out
    assert "7. certified: FIRED" in out and "[yes] certified_in_threat eq true   (actual true)" in out
    assert "score = weighted_mean = sum(w_i * s_i) / sum(w_i)" in out
    assert "decision: allow" in out and "note:" not in out


def test_explain_flags_missing_upstream_signal_by_signal():
    r = run("explain", DEFAULT, "--record", RECORDS, "--id", "evt-below-eps")
    assert r.exit_code == 0, r.output
    assert "upstream_risk     0.5000" in r.output and "FLAGGED (missing: policy default used)" in r.output
    assert "3. uncertified: FIRED" in r.output and "decision: review" in r.output


def test_explain_under_another_policy_notes_the_difference():
    r = run("explain", STRICT, "--record", RECORDS, "--id", "evt-abstained", "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert (d["decision"], d["rule"]) == ("block", "abstained") and d["trace"][1]["matched"]


def test_explain_bad_record_is_one_line(tmp_path):
    p = tmp_path / "r.json"
    p.write_text('{"id": "x"}')
    r = run("explain", DEFAULT, "--record", p)
    assert r.exit_code == 2 and "certificate: missing" in r.output and "Traceback" not in r.output


def test_diff_default_to_strict_needs_recertification():
    r = run("diff", DEFAULT, STRICT, "--ledger", RECORDS, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["records"] == 5 and d["recorded_mismatch"] == []
    # strict certifies in certify mode at epsilon 0.35: default's decide-mode certificates (epsilon 0.25)
    # do not answer that question, so none counts and every record needs re-certification.
    assert sorted(x["id"] for x in d["needs_recertification"]) == sorted(
        ["evt-certified", "evt-abstained", "evt-below-eps", "evt-upstream-high", "evt-no-context"])
    assert any("mode 'decide' -> 'certify'" in c for c in d["certifier_changes"])
    changed = {c["id"]: (c["old"]["decision"], c["new"]["decision"]) for c in d["changes"]}
    assert changed == {"evt-certified": ("allow", "review"), "evt-abstained": ("review", "block"),
                       "evt-upstream-high": ("block", "review"), "evt-no-context": ("allow", "review")}
    text = run("diff", DEFAULT, STRICT, "--ledger", RECORDS).output
    assert "decisions changed: 4 of 5" in text and "re-certification needed" in text
    assert "evt-abstained: review (uncertified" in text


def test_diff_to_shadow_allows_everything_without_recertification():
    d = json.loads(run("diff", DEFAULT, SHADOW, "--ledger", RECORDS, "--json").output)
    assert d["needs_recertification"] == [] and d["certifier_changes"] == []
    assert {c["new"]["decision"] for c in d["changes"]} == {"allow"}
    assert d["transitions"]["review -> allow"] == 2 and d["transitions"]["block -> allow"] == 1


def test_diff_same_policy_changes_nothing():
    d = json.loads(run("diff", DEFAULT, DEFAULT, "--ledger", RECORDS, "--json").output)
    assert d["changed"] == 0 and d["records"] == 5


def test_diff_reads_a_ledger_database_and_export_lines(tmp_path):
    ledger_mod = pytest.importorskip("riskpipe.ledger")
    db = tmp_path / "ledger.db"
    records = [json.loads(ln) for ln in RECORDS.read_text().splitlines()]
    with ledger_mod.Ledger(db) as led:
        for rec in records:
            led.append(rec, kind="decision", entry_id=rec["id"])
    from_db = json.loads(run("diff", DEFAULT, STRICT, "--ledger", db, "--json").output)
    from_jsonl = json.loads(run("diff", DEFAULT, STRICT, "--ledger", RECORDS, "--json").output)
    assert from_db == from_jsonl
    export = tmp_path / "export.jsonl"
    export.write_text("".join(json.dumps({"seq": i, "kind": "decision", "record": r}) + "\n"
                              for i, r in enumerate(records, 1))
                      + json.dumps({"seq": 9, "kind": "verdict", "record": {"id": "v"}}) + "\n")
    assert json.loads(run("diff", DEFAULT, STRICT, "--ledger", export, "--json").output) == from_jsonl


def test_diff_that_replays_nothing_exits_1(tmp_path):
    """Records none of which could be replayed (or none at all) are no evidence that the new
    policy changes nothing: "decisions changed: 0 of 0" used to exit 0, so a CI gate on the
    exit status (or on --json's "changed": 0) passed on any such file."""
    f = tmp_path / "none.jsonl"
    for text, skipped in (('{"id": "a"}\n[1]\n', " (2 skipped)"), ("", "")):
        f.write_text(text)
        for extra in ([], ["--json"]):
            r = run("diff", DEFAULT, STRICT, "--ledger", f, *extra)
            assert r.exit_code == 1, r.output
            assert f"nothing replayed: {f} holds no decision record with a certificate{skipped}" in r.output
    assert run("diff", DEFAULT, STRICT, "--ledger", RECORDS).exit_code == 0


def test_diff_bad_inputs_are_one_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n')
    r = run("diff", DEFAULT, STRICT, "--ledger", bad)
    assert r.exit_code == 2 and "bad.jsonl:2: invalid JSON" in r.output
    r = run("diff", DEFAULT, DATA / "bad_norm.yaml", "--ledger", RECORDS)
    assert r.exit_code == 1 and "threat_model.norm" in r.output
    bad.write_text('{"id": "a"}\n' + "[" * 100_000 + "\n")  # the standard library's RecursionError
    for r in (run("diff", DEFAULT, STRICT, "--ledger", bad), run("explain", DEFAULT, "--record", bad)):
        assert r.exit_code == 2 and "bad.jsonl:2: invalid JSON (nested too deeply)" in r.output, r.output


def _variant(tmp_path, name: str, **changes) -> str:
    import yaml

    data = yaml.safe_load(Path(DEFAULT).read_text())
    for path, value in changes.items():
        node = data
        *head, last = path.split(".")
        for k in head:
            node = node[k]
        node[last] = value
    out = tmp_path / f"{name}.yaml"
    out.write_text(yaml.safe_dump(data))
    return str(out)


def test_diff_flags_a_certificate_withheld_at_a_larger_epsilon_than_the_new_policy_needs(tmp_path):
    """A certificate withheld at its own epsilon (decide mode's test; Lipschitz abstains
    below it and records radius 0) replayed as still uncertified under a policy asking for
    a smaller epsilon: 'decisions changed: 0', while the new policy, certifying anew,
    allowed 17 of 20. Such records now need re-certification."""
    smaller = _variant(tmp_path, "eps", **{"threat_model.epsilon": 0.1})
    d = json.loads(run("diff", DEFAULT, smaller, "--ledger", RECORDS, "--json").output)
    flagged = {x["id"]: x["reasons"] for x in d["needs_recertification"]}
    assert "not certified at epsilon 0.25; the 0.1 now needed may be reached" in flagged["evt-below-eps"]
    assert "evt-certified" not in flagged  # certified at 0.25 holds at 0.1
    lip = {"id": "lip-1", "decision": "review", "upstream_risk": 0.1, "context": None, "prediction": None,
           "certificate": {"method": "lipschitz", "mode": "bound", "norm": "l2", "radius": 0.0, "abstained": True,
                           "certified": False, "reason": "radius_below_epsilon", "epsilon": 0.5, "input_dim": 64,
                           "predicted_class": None, "n_samples": 1, "seed": 0, "extra": {"radius_bound": 0.3}}}
    (tmp_path / "lip.jsonl").write_text(json.dumps(lip) + "\n")
    old = _variant(tmp_path, "lip-old", **{"certifier": {"method": "lipschitz", "mode": "certify"},
                                           "threat_model.epsilon": 0.5})
    new = _variant(tmp_path, "lip-new", **{"certifier": {"method": "lipschitz", "mode": "certify"},
                                           "threat_model.epsilon": 0.05})
    d = json.loads(run("diff", old, new, "--ledger", tmp_path / "lip.jsonl", "--json").output)
    assert [x["id"] for x in d["needs_recertification"]] == ["lip-1"], d


def test_diff_flags_records_without_the_context_a_new_policy_reads(tmp_path):
    """OLD read no context, so its records hold none; NEW reads it. The replay used the
    signals' defaults and reported decisions the new policy would not make (no change where
    it routes out-of-support inputs to review), without a word."""
    blind = _variant(tmp_path, "blind", **{"signals.context_risk.enabled": False,
                                          "signals.support_risk.enabled": False, "score.weights.context_risk": 0.0})
    rec = json.loads(RECORDS.read_text().splitlines()[0])
    (tmp_path / "r.jsonl").write_text(json.dumps({**rec, "context": None}) + "\n")
    d = json.loads(run("diff", blind, DEFAULT, "--ledger", tmp_path / "r.jsonl", "--json").output)
    assert [x["id"] for x in d["needs_recertification"]] == [rec["id"]]
    assert "no context in the record" in d["needs_recertification"][0]["reasons"][0]
    d = json.loads(run("diff", DEFAULT, DEFAULT, "--ledger", tmp_path / "r.jsonl", "--json").output)
    assert d["needs_recertification"] == []  # same policy: what its stage had, replayed as it was


@pytest.mark.parametrize("field, value, message", [
    ("certificate.input_dim", "64", "input_dim: '64' is not int"),
    ("certificate.input_dim", -4, "input_dim: -4 is out of range"),
    ("certificate.predicted_class", "x", "predicted_class: 'x' is not int"),
    ("certificate.epsilon", "big", "epsilon: 'big' is not int or float"),
    ("certificate.extra", [1], "extra: [1] is not dict"),
])
def test_a_record_with_a_certificate_field_of_the_wrong_type_is_one_line(tmp_path, field, value, message):
    """explain and diff ended in a traceback (int('x'), conversion_factor('64'), ...)."""
    rec = json.loads(RECORDS.read_text().splitlines()[0])
    rec["certificate"][field.split(".")[1]] = value
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    r = run("explain", DEFAULT, "--record", path)
    assert r.exit_code == 2 and message in r.output and "Traceback" not in r.output, r.output
    r = run("diff", DEFAULT, STRICT, "--ledger", path)
    assert r.exit_code == 1 and message in r.output, r.output  # skipped, said why, nothing replayed


@pytest.mark.parametrize("prediction", [7.9, 7.0, "7", [7], 10 ** 400])
def test_a_prediction_that_is_no_class_id_agrees_with_no_certificate(tmp_path, prediction):
    """int(7.9) read as class 7 replayed as agreeing with the certificate's 7, and allowed;
    "7", [7] and 10**400 were tracebacks. No class id agrees with a certified class."""
    rec = json.loads(RECORDS.read_text().splitlines()[0])
    assert rec["certificate"]["predicted_class"] == 7 and rec["decision"] == "allow"
    rec["prediction"] = prediction
    path = tmp_path / "r.json"
    path.write_text(json.dumps(rec))
    r = run("explain", DEFAULT, "--record", path, "--json")
    d = json.loads(r.output)
    assert d["decision"] != "allow" and "prediction_mismatch" in d["reasons"], d
