"""Compliance report: every section, numbers that match the ledger, one self-contained HTML file
that renders in real headless Chromium without console errors."""

from __future__ import annotations

import json
import re
import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from browserkit import HAVE_CHROMIUM, chromium
from ledger_records import CONTROLS, POLICY, POLICY_V4, build_ledger
from riskpipe.cli import cli
from riskpipe.policy.controls import mapping
from riskpipe.report import ReportError, write_report
from riskpipe.report.data import CONTRADICTS

SECTIONS = ["scope", "policies", "volumes", "decisions", "abstention", "radius", "review", "dlq", "controls",
            "integrity"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tmp_path_factory.mktemp("rep") / "ledger.db"
    return path, build_ledger(path, n=60, seed=3)


@pytest.fixture(scope="module")
def report_json(demo):
    path, _ = demo
    out = write_report(path, path.with_name("r.json"), "json")
    return json.loads(out.read_text())


def test_json_numbers_match_the_ledger(demo, report_json):
    _, data = demo
    d, decisions, verdicts = report_json, data["decisions"], data["verdicts"]
    assert set(SECTIONS) <= set(d)
    assert d["integrity"]["ok"] and len(d["integrity"]["head"]) == 64
    assert d["volumes"]["in_period"] == {"decision": 60, "verdict": len(verdicts), "dlq": 5}
    for kind in ("allow", "review", "block"):
        assert d["decisions"]["totals"][kind] == sum(x["decision"] == kind for x in decisions)
    abst = sum(x["certificate"]["abstained"] for x in decisions)
    assert d["abstention"]["abstained"] == abst and d["abstention"]["rate"] == pytest.approx(abst / 60)
    g = d["radius"]["groups"][0]
    assert (g["norm"], g["epsilon"]) == ("l2", 0.25)
    assert g["below_epsilon"] == sum(x["certificate"]["radius_threat"] < 0.25 for x in decisions)
    assert {(p["version"], p["sha256"]) for p in d["policies"]} == {("3", POLICY["sha256"]), ("4", POLICY_V4["sha256"])}
    assert sum(p["decisions"] for p in d["policies"]) == 60
    overrides = sum((v["decision"], v["verdict"]) in CONTRADICTS for v in verdicts)
    assert d["review"]["overrides"] == overrides and overrides > 0
    assert d["review"]["verdicts_total"] == len(verdicts)
    assert d["review"]["routed"] == sum(x["review"]["routed"] for x in decisions)
    assert 5 <= d["review"]["minutes_to_review"]["median"] <= 300
    assert d["dlq"]["by_reason"] == {"wrong_shape": 2, "invalid_json": 1, "non_finite": 1, "missing_field": 1}
    ids = {c["full_id"] for c in d["controls"]}
    assert ids == set(mapping()) and {"A.8.15", "A.8.16", "A.5.33", "A.5.28"} <= {c["id"] for c in d["controls"]}
    cited = {c["full_id"]: c["cited_by_decisions"] for c in d["controls"]}
    assert all(cited[c] == 60 for c in CONTROLS)


def test_time_window(demo):
    path, data = demo
    out = write_report(path, path.with_name("w.json"), "json", since="2024-05-02T00:00:00Z",
                       until="2024-05-03T00:00:00Z")
    d = json.loads(out.read_text())
    want = [x for x in data["decisions"] if "2024-05-02" <= x["ts"] < "2024-05-03"]
    assert d["volumes"]["in_period"]["decision"] == len(want) == 12


def test_markdown_has_every_section(demo):
    path, _ = demo
    md = write_report(path, path.with_name("r.md"), "md").read_text()
    for title in ("Scope and limitations", "Theorem 1", "Theorem 2", "alpha", "Policies in effect", "Volumes",
                  "Decisions over time", "Abstention", "threat norm against epsilon", "Human review",
                  "override rate", "time to review", "Dead letters", "NIST AI RMF", "A.8.15", "A.8.16",
                  "Ledger integrity", "chain head"):
        assert title in md, title
    assert POLICY_V4["sha256"] in md


def test_tampered_ledger_is_reported(tmp_path):
    path = tmp_path / "l.db"
    build_ledger(path, n=10)
    db = sqlite3.connect(str(path), isolation_level=None)
    db.execute("DROP TRIGGER entries_no_update")
    db.execute("UPDATE entries SET record = replace(record, 'evt-00004', 'evt-00444') WHERE entry_id = 'evt-00004'")
    db.close()
    d = json.loads(write_report(path, tmp_path / "r.json", "json").read_text())
    assert not d["integrity"]["ok"] and d["integrity"]["first_bad_seq"] == 7
    assert any(c["status"] == "ledger verification FAILED" for c in d["controls"] if c["id"] == "A.5.33")


def test_empty_ledger_and_bad_options(tmp_path):
    from riskpipe.ledger import Ledger

    Ledger(tmp_path / "empty.db").close()
    html = write_report(tmp_path / "empty.db", tmp_path / "e.html", "html").read_text()
    assert "no decisions in this period" in html
    with pytest.raises(ReportError, match="file not found"):
        write_report(tmp_path / "none.db", tmp_path / "x.html", "html")
    with pytest.raises(ReportError, match="format"):
        write_report(tmp_path / "empty.db", tmp_path / "x.txt", "txt")
    r = CliRunner().invoke(cli, ["report", "--ledger", str(tmp_path / "empty.db"), "--since", "soon"])
    assert r.exit_code == 2 and "since: not an RFC 3339 time" in r.output
    for since, until in (("2030-01-01", "2020-01-01"), ("2026-01-01T00:00:00Z", "2026-01-01T01:00:00+01:00")):
        r = CliRunner().invoke(cli, ["report", "--ledger", str(tmp_path / "empty.db"), "--since", since, "--until",
                                     until, "--out", str(tmp_path / "p.html")])  # an empty period, not a report
        assert r.exit_code == 2 and f"since {since} is not before until {until}" in r.output, r.output
        assert not (tmp_path / "p.html").exists()


def test_html_is_self_contained_and_renders_in_chromium(demo, tmp_path):
    path, _ = demo
    out = tmp_path / "report.html"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(path), "--format", "html", "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    for s in SECTIONS:
        assert f'<section id="{s}">' in html
    # nothing outside the file: no http(s) URLs in src/href, images inline
    assert not re.search(r'(src|href)="(https?:)?//', html)
    assert len(re.findall(r'src="data:image/png;base64,', html)) >= 4
    if not HAVE_CHROMIUM:
        pytest.skip("needs Debian chromium and chromium-driver (make system-packages)")
    from selenium.webdriver.common.by import By

    driver = chromium(tmp_path / "profile", 1200, 900, browser_log=True)
    try:
        driver.get(Path(out).as_uri())
        assert driver.title == "riskpipe compliance report"
        for s in SECTIONS:
            assert driver.find_element(By.ID, s).is_displayed()
        images = driver.find_elements(By.TAG_NAME, "img")
        assert images and all(driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth > 0", i)
                              for i in images)
        shot = tmp_path / "report.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == []
    finally:
        driver.quit()
