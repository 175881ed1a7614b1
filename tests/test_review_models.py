"""The review console on users' models, in real headless Chromium: the demo's 1x8x8 digit,
a 3x32x32 colour image and a tabular (skops) row, each drawn through riskpipe.render, with
class names from the config's ``labels``, feature names from the model, and the policy
(name, version) that decided the item."""

from __future__ import annotations

import numpy as np
import pytest

from browserkit import HAVE_CHROMIUM, by_id, chromium, click_and_wait, data_url_image, natural_size, screenshot
from riskpipe.ledger import Ledger
from riskpipe.render import ModelInfo, input_view, model_info
from riskpipe.review import serve_background
from test_review_records import decision_record
from usermodels import IMAGE_LABELS, synthetic_images, tabular_model

pytestmark = pytest.mark.slow
PASSWORD = "correct horse battery staple"


def _user_record(event_id: str, model: str, x: np.ndarray, prediction: int, policy: tuple[str, str]) -> dict:
    rec = decision_record(event_id, priority=1)
    rec["model"] = {"name": model, "spec": "from config", "sha256": "ef" * 32}
    rec["policy"] = {"name": policy[0], "version": policy[1], "sha256": "12" * 32, "shadow": False}
    rec["input"] = {"sha256": "00" * 32, "shape": list(x.shape), "datatype": "FP32",
                    "data": [float(v) for v in x.ravel()]}
    rec["prediction"] = prediction
    rec["certificate"] = {**rec["certificate"], "predicted_class": prediction, "abstained": False}
    return rec


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review-models")
    wine = tabular_model(tmp)  # the image model's file is not needed: the console reads its config entry
    image = synthetic_images(3, seed=5)[0][2]  # a blue ring, 3x32x32
    wine_x = np.load(wine.data)["X"][0]
    recs = {
        "evt-digit": decision_record("evt-digit", digit_index=0, priority=1),
        "evt-image": _user_record("evt-image", "signs", image, 2, ("signs-policy", "2")),
        "evt-row": _user_record("evt-row", "wine", wine_x, 1, ("tabular-strict", "7")),
    }
    with Ledger(tmp / "ledger.db") as led:
        for r in recs.values():
            led.append(r, kind="decision")
    models = {"digits": "demo:digits",
              "signs": {"spec": "signs.pt?shape=3,32,32", "labels": IMAGE_LABELS},
              "wine": {"spec": wine.spec, "labels": wine.labels}}  # feature names come from the model file
    server = serve_background(tmp / "ledger.db", "127.0.0.1", 0, PASSWORD, models=models, metrics=None)
    driver = chromium(tmp / "chromium") if HAVE_CHROMIUM else None
    yield server, driver, recs, wine
    if driver is not None:
        driver.quit()
    server.stop()


def _open_item(driver, server, event_id):
    driver.get(server.url + "login?next=/item/" + event_id)
    if "/login" in driver.current_url:
        by_id(driver, "username").send_keys("alice")
        by_id(driver, "password").send_keys(PASSWORD)
        click_and_wait(driver, by_id(driver, "login"))
    assert by_id(driver, "event-id").text == event_id


def _painted(driver, element) -> np.ndarray:
    w, h = natural_size(driver, element)
    assert (w, h) == (224, 224)  # decoded by the browser at its drawn size
    shot = screenshot(element)
    assert shot.std() > 10, "the painted input is flat"
    return shot


needs_browser = pytest.mark.skipif(not HAVE_CHROMIUM, reason="needs Debian chromium and chromium-driver")


@needs_browser
def test_queue_names_classes_and_policies(setup):
    from selenium.webdriver.common.by import By

    server, driver, recs, wine = setup
    _open_item(driver, server, "evt-image")
    driver.get(server.url)
    rows = {r.get_attribute("data-id"): [td.text for td in r.find_elements(By.TAG_NAME, "td")]
            for r in driver.find_elements(By.CSS_SELECTOR, "#queue tbody tr")}
    sha = "sha256 " + "12" * 6  # a policy is named by name, version and sha256 (two may share the first two)
    assert rows["evt-image"][-3:] == [f"{IMAGE_LABELS[2]} (class 2)", "signs", f"signs-policy v2 · {sha}"]
    assert rows["evt-row"][-3:] == [f"{wine.labels[1]} (class 1)", "wine", f"tabular-strict v7 · {sha}"]
    digit_sha = recs["evt-digit"]["policy"]["sha256"][:12]
    assert rows["evt-digit"][-2:] == ["digits", f"default v3 · sha256 {digit_sha}"]


@needs_browser
def test_demo_digit_is_a_grey_picture(setup):
    server, driver, recs, _ = setup
    _open_item(driver, server, "evt-digit")
    img = by_id(driver, "input-image")
    _painted(driver, img)
    pixels = data_url_image(img.get_attribute("src"))[::28, ::28, 0] / 255.0
    np.testing.assert_allclose(pixels, np.reshape(recs["evt-digit"]["input"]["data"], (8, 8)), atol=1 / 255)
    assert by_id(driver, "prediction").text.startswith(str(recs["evt-digit"]["prediction"]))
    assert by_id(driver, "policy").text.startswith("default v3")


@needs_browser
def test_colour_image_of_another_size_with_class_names(setup):
    server, driver, recs, _ = setup
    _open_item(driver, server, "evt-image")
    img = by_id(driver, "input-image")
    shot = _painted(driver, img)
    assert (shot[..., 2].astype(int) - shot[..., 0]).max() > 100, "the blue ring is not blue on screen"
    pixels = data_url_image(img.get_attribute("src"))[::7, ::7] / 255.0
    chw = np.reshape(recs["evt-image"]["input"]["data"], (3, 32, 32))
    np.testing.assert_allclose(pixels, np.moveaxis(chw, 0, -1), atol=1 / 255)  # CHW -> HWC, values as they are
    assert by_id(driver, "prediction").text.startswith(f"{IMAGE_LABELS[2]} (class 2)")
    assert by_id(driver, "policy").text.startswith("signs-policy v2")
    assert "shape [3, 32, 32]" in by_id(driver, "input-note").text


@needs_browser
def test_tabular_row_is_a_table_with_the_models_feature_names(setup):
    from selenium.webdriver.common.by import By

    server, driver, recs, wine = setup
    _open_item(driver, server, "evt-row")
    assert not driver.find_elements(By.ID, "input-image")
    table = by_id(driver, "input-table")
    names = [th.text for th in table.find_elements(By.CSS_SELECTOR, "tbody th, tr > th")][2:]
    values = [float(td.text) for td in table.find_elements(By.CSS_SELECTOR, "td")]
    assert names == wine.feature_names
    np.testing.assert_allclose(values, recs["evt-row"]["input"]["data"], rtol=1e-5)
    assert by_id(driver, "prediction").text.startswith(f"{wine.labels[1]} (class 1)")
    assert by_id(driver, "policy").text.startswith("tabular-strict v7")
    assert table.is_displayed() and screenshot(table).std() > 10


def test_views_without_a_browser():
    """The view rules: value range scaling, CHW and HWC, tables with and without names."""
    x = np.linspace(-1, 1, 3 * 5 * 4).reshape(3, 5, 4)
    scaled = input_view(x.ravel().tolist(), [1, 3, 5, 4], ModelInfo(value_range=(-1.0, 1.0)))
    assert scaled.kind == "image" and "range [-1, 1]" in scaled.note and (scaled.width, scaled.height) == (176, 220)
    assert input_view(x.ravel().tolist(), [5, 4, 3]).kind == "image"  # channels last
    row = input_view([1.5, 2.0], [1, 2], ModelInfo(feature_names=("a", "b")))
    assert row.kind == "table" and row.rows == (("a", "1.5"), ("b", "2"))
    unnamed = input_view([1.5, 2.0, 3.0], [3], ModelInfo(feature_names=("a", "b")))
    assert [n for n, _ in unnamed.rows] == ["x[0]", "x[1]", "x[2]"] and "do not match" in unnamed.note
    assert input_view([1.0] * 5, [2, 3]).kind == "none"
    assert model_info({"spec": "m.pt?shape=3,8,8&range=-2,2", "labels": ["a"]}) == ModelInfo(("a",), None, (-2.0, 2.0))


def test_console_reads_names_from_the_stage_config_and_the_model_file():
    """The tabular example's config names the classes; its skops pipeline carries the feature names."""
    from riskpipe.review.app import ConsoleState
    from riskpipe.review.settings import resolve_settings

    settings = resolve_settings(config_path="examples/tabular/riskpipe.yaml", ledger="unused.db",
                                environ={"RISKPIPE_REVIEW_PASSWORD": PASSWORD})
    info = ConsoleState(settings).model_info({"model": {"name": "cancer"}})
    assert info.labels == ("malignant", "benign")
    assert info.feature_names is not None and len(info.feature_names) == 30 and info.feature_names[0] == "mean radius"
    assert ConsoleState(settings).model_info({"model": {"name": "unknown"}}) == ModelInfo()


@needs_browser
@pytest.mark.parametrize("example, model", [("image", "shapes"), ("tabular", "cancer")])
def test_items_the_stage_routed_for_the_examples(tmp_path, example, model):
    """End to end: the stage decides the example's inputs (an upstream risk of 0.99 blocks and
    routes them), the console reads the same stage config, Chromium shows the real records."""
    from selenium.webdriver.common.by import By

    from riskpipe.app.config import load_config
    from riskpipe.policy import load_policy
    from riskpipe.review import queue as rq
    from usermodels import stage_ledger

    ledger, inputs = stage_ledger(tmp_path, example, model, n=2, upstream_risk=0.99)
    with Ledger(ledger) as led:
        routed = [it.id for it in rq.pending(led)]
    assert sorted(routed) == [f"{example}-0", f"{example}-1"]
    config = load_config(f"examples/{example}/riskpipe.yaml")
    server = serve_background(ledger, "127.0.0.1", 0, PASSWORD, models=config.models, metrics=None)
    driver = chromium(tmp_path / "chromium")
    try:
        _open_item(driver, server, f"{example}-1")
        x = np.load(inputs)[1]
        labels = config.models[model].labels
        shown = by_id(driver, "prediction").text  # the event carries no prediction: the certified class by name
        assert shown.startswith("n/a (certified classifier predicts ")
        assert any(f"predicts {n} (class {i})" in shown for i, n in enumerate(labels)), shown
        policy = load_policy(config.model_policy(model))
        assert by_id(driver, "policy").text.startswith(f"{policy.name} v{policy.version}")
        assert by_id(driver, "decision").text in ("review", "block")
        if example == "image":
            img = by_id(driver, "input-image")
            _painted(driver, img)
            pixels = data_url_image(img.get_attribute("src"))[::7, ::7] / 255.0
            np.testing.assert_allclose(pixels, np.moveaxis(x, 0, -1), atol=1 / 255)  # declared range [0, 1]
        else:
            table = by_id(driver, "input-table")
            names = [td.text for td in table.find_elements(By.CSS_SELECTOR, "tbody tr > th")]
            assert len(names) == 30 and names[0] == "mean radius"  # from the skops file
            values = [float(td.text) for td in table.find_elements(By.CSS_SELECTOR, "td")]
            np.testing.assert_allclose(values, x, rtol=1e-5)
    finally:
        driver.quit()
        server.stop()
