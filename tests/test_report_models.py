"""The compliance report on a ledger where two users' models run under two policies: the
per-model and per-policy breakdowns match the records, and the HTML shows the routed
inputs as a colour picture (3x32x32) and as a table of named features, in Chromium."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from browserkit import HAVE_CHROMIUM, chromium, data_url_image, natural_size, screenshot
from ledger_records import decision_record, verdict_record
from riskpipe.cli import cli
from riskpipe.ledger import Ledger
from riskpipe.report import write_report
from usermodels import IMAGE_LABELS, synthetic_images

WINE_FEATURES = ["alcohol", "malic_acid", "ash"]
SIGNS = {"name": "signs-policy", "version": "2", "sha256": hashlib.sha256(b"signs").hexdigest(), "shadow": False}
TABLE = {"name": "tabular-strict", "version": "7", "sha256": hashlib.sha256(b"tab").hexdigest(), "shadow": False}
SIGNS_LABEL = f"signs-policy v2 · sha256 {SIGNS['sha256'][:12]}"
TABLE_LABEL = f"tabular-strict v7 · sha256 {TABLE['sha256'][:12]}"


def _record(i: int, model: str, policy: dict, x: np.ndarray, **kw) -> dict:
    d = decision_record(i, policy=policy, **kw)
    d["model"] = {"name": model, "spec": f"{model}.file", "sha256": hashlib.sha256(model.encode()).hexdigest()}
    d["input"] = {**d["input"], "shape": list(x.shape), "data": [float(v) for v in x.ravel()]}
    d["prediction"] = i % 3
    return d


@pytest.fixture(scope="module")
def ledger(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report-models")
    images = synthetic_images(12, seed=9)[0]
    rows = np.random.default_rng(0).uniform(0.5, 15, size=(8, 3)).astype(np.float32)
    decisions = [_record(i, "signs", SIGNS, images[i], abstained=i % 3 == 0) for i in range(12)]
    decisions += [_record(100 + i, "wine", TABLE, rows[i], radius=0.1 if i < 5 else 0.9) for i in range(8)]
    verdicts = [verdict_record(d, "confirmed_manipulated", 10) for d in decisions if d["review"]["routed"]][:4]
    with Ledger(tmp / "ledger.db") as led:
        led.append_many(decisions, "decision")
        led.append_many(verdicts, "verdict")
    models = {"signs": {"spec": "signs.pt?shape=3,32,32", "labels": IMAGE_LABELS},
              "wine": {"spec": "wine.skops", "labels": ["a", "b", "c"], "feature_names": WINE_FEATURES}}
    return tmp, decisions, verdicts, models


def test_breakdown_per_model_and_policy_matches_the_records(ledger):
    tmp, decisions, verdicts, _ = ledger
    r = CliRunner().invoke(cli, ["report", "--ledger", str(tmp / "ledger.db"), "--format", "json",
                                 "--out", str(tmp / "r.json")])
    assert r.exit_code == 0, r.output
    d = json.loads((tmp / "r.json").read_text())
    by_model = {row["name"]: row for row in d["breakdown"]["models"]}
    by_policy = {row["name"]: row for row in d["breakdown"]["policies"]}
    assert set(by_model) == {"signs", "wine"} and set(by_policy) == {SIGNS_LABEL, TABLE_LABEL}
    for name, pol, sub in (("signs", SIGNS_LABEL, decisions[:12]), ("wine", TABLE_LABEL, decisions[12:])):
        for row in (by_model[name], by_policy[pol]):
            assert row["decisions"] == len(sub)
            for kind in ("allow", "review", "block"):
                assert row[kind] == sum(x["decision"] == kind for x in sub)
            assert row["abstained"] == sum(x["certificate"]["abstained"] for x in sub)
            assert row["routed"] == sum(x["review"]["routed"] for x in sub)
            radii = sorted(x["certificate"]["radius_threat"] for x in sub)
            assert row["median_radius_threat"] == pytest.approx(float(np.median(radii)))
    assert by_model["signs"]["abstained"] == 4 and by_model["wine"]["review"] == 5
    assert sum(row["verdicts"]["confirmed_manipulated"] for row in by_model.values()) == len(verdicts)
    assert d["breakdown"]["model_policy"] == [{"model": "signs", "policy": SIGNS_LABEL, "decisions": 12},
                                              {"model": "wine", "policy": TABLE_LABEL, "decisions": 8}]
    # three routed examples per model, without their input values in JSON
    assert [e["model"] for e in d["examples"]] == ["signs"] * 3 + ["wine"] * 3
    assert all("data" not in e["input"] for e in d["examples"])


@pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian chromium and chromium-driver")
def test_html_shows_pictures_and_tables_of_routed_inputs(ledger):
    from selenium.webdriver.common.by import By

    tmp, decisions, _, models = ledger
    out = write_report(tmp / "ledger.db", tmp / "r.html", "html", models=models)  # models: the config's entries
    driver = chromium(tmp / "chromium")
    try:
        driver.get(out.as_uri())
        assert driver.find_element(By.ID, "by-model").is_displayed()
        images = driver.find_elements(By.CSS_SELECTOR, "#inputs img.input-image")
        assert len(images) == 3
        first = next(x for x in decisions if x["review"]["routed"])
        for img in images:
            assert natural_size(driver, img) == (224, 224)
            assert screenshot(img).std() > 10
        pixels = data_url_image(images[0].get_attribute("src"))[::7, ::7] / 255.0
        np.testing.assert_allclose(pixels, np.moveaxis(np.reshape(first["input"]["data"], (3, 32, 32)), 0, -1),
                                   atol=1 / 255)
        tables = driver.find_elements(By.CSS_SELECTOR, "#inputs table.input-table")
        assert len(tables) == 3
        assert [td.text for td in tables[0].find_elements(By.CSS_SELECTOR, "tr td:first-child")] == WINE_FEATURES
        captions = driver.find_element(By.ID, "inputs").text
        assert f"prediction {IMAGE_LABELS[first['prediction']]} (class {first['prediction']})" in captions
        assert f"policy {TABLE_LABEL}" in captions and "model wine" in captions
    finally:
        driver.quit()


def test_cli_takes_class_and_feature_names_from_the_stage_config(ledger):
    tmp, decisions, _, models = ledger
    config = tmp / "riskpipe.yaml"
    config.write_text(yaml.safe_dump({"ledger": str(tmp / "ledger.db"), "models": models}))
    out = tmp / "cli.html"
    r = CliRunner().invoke(cli, ["report", "--ledger", str(tmp / "ledger.db"), "--config", str(config),
                                 "--format", "html", "--out", str(out)])
    assert r.exit_code == 0, r.output
    html = out.read_text()
    first = next(x for x in decisions if x["review"]["routed"])
    assert f"prediction {IMAGE_LABELS[first['prediction']]} (class {first['prediction']})" in html
    assert all(f"<td class=\"name\">{name}</td>" in html for name in WINE_FEATURES)
    config.write_text(yaml.safe_dump({"models": {"wine": {"spec": "wine.skops", "labels": []}}}))
    r = CliRunner().invoke(cli, ["report", "--ledger", str(tmp / "ledger.db"), "--config", str(config)])
    assert r.exit_code == 2 and "models.wine.labels" in r.output and len(r.output.strip().splitlines()) == 1


def test_two_policies_with_one_name_and_version_are_two_rows(tmp_path):
    """Two stages' policies both called default v1.0.0 but with different content: the
    per-policy table keeps them apart by sha256 (it used to merge them into one row)."""
    a = {"name": "default", "version": "1.0.0", "sha256": "a" * 64, "shadow": False}
    b = {"name": "default", "version": "1.0.0", "sha256": "b" * 64, "shadow": False}
    decisions = [decision_record(i, policy=a) for i in range(3)] + [decision_record(10 + i, policy=b) for i in range(2)]
    with Ledger(tmp_path / "l.db") as led:
        led.append_many(decisions, "decision")
    d = json.loads(write_report(tmp_path / "l.db", tmp_path / "r.json", "json").read_text())
    rows = {row["name"]: row["decisions"] for row in d["breakdown"]["policies"]}
    assert rows == {"default v1.0.0 · sha256 aaaaaaaaaaaa": 3, "default v1.0.0 · sha256 bbbbbbbbbbbb": 2}
    assert {(p["sha256"], p["decisions"]) for p in d["policies"]} == {("a" * 64, 3), ("b" * 64, 2)}
