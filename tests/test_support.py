"""Support of the reference set (issue 19 item 4): an input far from every reference
input is reviewed with reason ``out_of_support`` (never allowed), calibrated on the
reference set's own leave-one-out nearest-neighbour distances; inputs outside the
range ``init`` declares are dead-lettered ``out_of_range``; in-support decisions are
unchanged; a larger distance never lowers the context or support risk. On a user's
tabular model (wine, skops) and a 3x32x32 CNN, not the demo."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from riskpipe.app.config import default_policy_path, load_config
from riskpipe.app.offline import run_offline
from riskpipe.context import ContextIndex
from riskpipe.policy import signals as sig
from riskpipe.policy.schema import ContextRiskSignal, SupportRiskSignal
from riskpipe.stream.events import make_event
from streamkit import tabular_event
from usermodels import image_model, synthetic_images, tabular_model

CHEAP = {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01, "max_samples": 200}


def policy_file(directory, base="default", support=True) -> str:
    """A shipped policy with a cheap certifier; ``support=False``: as it was before the
    support signal (signal off, its rule gone)."""
    with open(default_policy_path().replace("default.yaml", f"{base}.yaml"), encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data["certifier"] = CHEAP
    if not support:
        data["signals"].pop("support_risk")
        data["rules"] = [r for r in data["rules"] if r["id"] != "out-of-support"]
    path = directory / f"{base}-{'support' if support else 'nosupport'}.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def pipeline(um, policy, name):
    from riskpipe.app.compose import build_pipeline

    return build_pipeline(load_config(None, models={name: um.spec}, references={name: str(um.data)}, policy=policy))


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    d = tmp_path_factory.mktemp("wine")
    um = tabular_model(d)
    from sklearn.datasets import load_wine

    ref = np.load(um.data)["X"]
    every = load_wine().data.astype(np.float32)
    held_out = np.array([x for x in every if not (np.abs(ref - x).sum(axis=1) == 0).any()])  # not in the reference
    return d, um, ref, held_out


def decide(pipe, events, tmp, name="out"):
    res = run_offline(events, tmp / name, load_config(None, batch={"max_events": 16}), pipeline=pipe)
    return res, {r["id"]: r for r in res.read("audit")}


@pytest.mark.parametrize("value", [1e6, 1e20, 1e30, 3e38])
def test_a_feature_far_out_is_reviewed_out_of_support(tmp_path, wine, value):
    """However far: beyond ~1.8e19 a float32 squared distance overflowed to inf, the
    distance read as malformed, the signal fell back to its default and the input was
    allowed (with a ledger: an internal_error, inf being no JSON). Distances are float64."""
    from riskpipe.ledger import open_ledger

    _d, um, _ref, held = wine
    pipe = pipeline(um, policy_file(tmp_path), "wine")
    far = held[0].copy()
    far[0] = value
    with open_ledger(str(tmp_path / "l.db")) as led:
        res = run_offline([tabular_event("far", far), tabular_event("near", held[0])], tmp_path / "out",
                          load_config(None, batch={"max_events": 16}), pipeline=pipe, ledger=led)
        assert not res.read("dlq") and led.count("decision") == 2 and led.verify().ok
    recs = {r["id"]: r for r in res.read("audit")}
    rec = recs["far"]
    assert rec["decision"] == "review" and rec["rule"] == "out-of-support" and "out_of_support" in rec["reasons"]
    s = rec["signals"]["support_risk"]
    assert s["out_of_support"] is True and s["value"] == 1.0 and s["ratio"] > 1000 and s["weight"] == 0.0
    assert rec["context"]["support_percentile"] == 100.0 and rec["context"]["support_quantile"] == 0.99
    # the context risk of the far input is the highest the ratio term gives, never lower than the near one's
    assert rec["signals"]["context_risk"]["value"] >= recs["near"]["signals"]["context_risk"]["value"]
    assert recs["near"]["signals"]["support_risk"]["out_of_support"] is False
    assert recs["near"]["rule"] != "out-of-support"


def test_strict_policy_reviews_out_of_support_too(tmp_path, wine):
    _d, um, _ref, held = wine
    far = held[1].copy()
    far[3] = -1e6
    _, recs = decide(pipeline(um, policy_file(tmp_path, "strict"), "wine"), [tabular_event("far", far)], tmp_path)
    assert recs["far"]["decision"] == "review" and recs["far"]["reasons"][0] == "out_of_support"


def test_in_support_inputs_are_decided_as_before(tmp_path, wine):
    """Held-out wine rows (none in the reference): each record's certificate and context
    evaluated under the policy without the support signal gives the same decision, score,
    rule and reasons."""
    from riskpipe.policy import load_policy
    from riskpipe.policy.evaluate import evaluate

    _d, um, _ref, held = wine
    events = [tabular_event(f"h-{i}", x, upstream_risk=float(i % 5) / 5) for i, x in enumerate(held)]
    _, recs = decide(pipeline(um, policy_file(tmp_path), "wine"), events, tmp_path, "a")
    before = load_policy(policy_file(tmp_path, support=False))
    assert len(recs) == len(held) > 100
    assert not any(r["signals"]["support_risk"]["out_of_support"] for r in recs.values())
    assert {r["decision"] for r in recs.values()} >= {"allow"}
    for i, rec in recs.items():
        old = evaluate(before, rec["certificate"], rec["upstream_risk"], rec["context"], i, rec["prediction"])
        def core(reasons):  # the audit draw hashes the policy's sha256: another policy draws afresh
            return [r for r in reasons if r != "audit_sample"]

        assert (rec["decision"], rec["score"], rec["rule"], core(rec["reasons"])) == \
               (old.decision, old.score, old.rule, core(old.reasons))


def test_image_model_noise_is_out_of_support_and_images_are_not(tmp_path):
    um = image_model(tmp_path)
    pipe = pipeline(um, policy_file(tmp_path), "cnn")
    X, _ = synthetic_images(8, seed=7)  # drawn like the reference, another seed
    # inside [0, 1] but nothing like the reference: binary noise, an all-white image
    noise = np.concatenate([np.round(np.random.default_rng(3).random((3, 3, 32, 32), dtype=np.float32)),
                            np.ones((1, 3, 32, 32), dtype=np.float32)])
    events = ([make_event(f"img-{i}", "cnn", x, upstream_risk=0.1) for i, x in enumerate(X)]
              + [make_event(f"noise-{i}", "cnn", x, upstream_risk=0.1) for i, x in enumerate(noise)])
    _, recs = decide(pipe, events, tmp_path)
    for i in range(4):
        assert recs[f"noise-{i}"]["decision"] == "review" and recs[f"noise-{i}"]["rule"] == "out-of-support"
    for i in range(8):
        assert recs[f"img-{i}"]["signals"]["support_risk"]["out_of_support"] is False
        assert recs[f"img-{i}"]["rule"] != "out-of-support"


def test_init_range_dead_letters_out_of_range_and_reviews_a_far_combination(tmp_path, wine):
    """With the range ``init`` writes, a feature at 1e6 never reaches the model (DLQ
    ``out_of_range``); a row inside the range but far from every reference row (each
    feature near its range's edge) is reviewed ``out_of_support``."""
    from click.testing import CliRunner

    from riskpipe.cli import cli

    _d, um, _ref, held = wine
    out = tmp_path / "stage"
    r = CliRunner().invoke(cli, ["init", "--model", um.spec, "--reference", str(um.data), "--out", str(out),
                                 "--name", "wine", "--trial", "0"])
    assert r.exit_code == 0, r.output
    cfg = load_config(str(out / "riskpipe.yaml"))
    lo, hi = np.array(cfg.models["wine"].range).T
    far = held[0].copy()
    far[0] = 1e6
    corner = (hi - 0.05 * (hi - lo)).astype(np.float32)  # in range, off the support
    policy = policy_file(tmp_path)
    cfg = cfg.model_copy(update={"ledger": None, "policy": policy,
                                 "models": {"wine": cfg.models["wine"].model_copy(update={"policy": policy})}})
    res = run_offline([tabular_event("far", far), tabular_event("corner", corner), tabular_event("near", held[0])],
                      tmp_path / "o", cfg)
    dlq = {json.loads(x["value"])["id"]: x["headers"]["__riskpipe.errors.reason"] for x in res.read("dlq")}
    assert dlq == {"far": "out_of_range"}
    audit = {x["id"]: x for x in res.read("audit")}
    assert audit["corner"]["decision"] == "review" and audit["corner"]["rule"] == "out-of-support"
    assert audit["near"]["rule"] != "out-of-support"


def test_leave_one_out_distances_leave_each_sample_out():
    X = np.array([[0.0, 0.0], [1.0, 0.0], [3.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    idx = ContextIndex.build(X, np.array([0, 1, 0, 1]), "l2")
    assert idx.support_distances.tolist() == [1.0, 1.0, 2.0, 4.0]
    [c] = idx.context(np.array([[10.0, 0.0]]), [0], [0.1], support_quantile=1.0)
    assert c["nearest_reference_distance"] == pytest.approx(7.0) and c["support_reference_distance"] == 4.0
    assert c["support_percentile"] == 100.0


finite = st.floats(0.0, 1e9, allow_nan=False)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(radius=finite, d1=finite, d2=finite, pct=st.one_of(st.none(), st.floats(0.0, 100.0)),
       w=st.floats(0.0, 1.0))
def test_a_larger_distance_never_lowers_the_context_risk(radius, d1, d2, pct, w):
    lo, hi = sorted((d1, d2))
    cfg = ContextRiskSignal(ratio_weight=w)
    near = sig.context_risk(cfg, {"nearest_other_class_distance": lo, "radius_percentile": pct}, radius)
    far = sig.context_risk(cfg, {"nearest_other_class_distance": hi, "radius_percentile": pct}, radius)
    assert far["value"] >= near["value"] - 1e-12


@settings(max_examples=300, deadline=None, derandomize=True)
@given(d1=finite | st.just(math.inf), d2=finite | st.just(math.inf), q=finite, factor=st.floats(1.0, 100.0))
def test_a_larger_distance_never_lowers_the_support_risk(d1, d2, q, factor):
    """Up to an infinite distance (further than any float: out of support, never malformed)."""
    lo, hi = sorted((d1, d2))
    cfg = SupportRiskSignal(enabled=True, factor=factor)
    near = sig.support_risk(cfg, {"nearest_reference_distance": lo, "support_reference_distance": q})
    far = sig.support_risk(cfg, {"nearest_reference_distance": hi, "support_reference_distance": q})
    assert far["value"] >= near["value"] and far["out_of_support"] >= near["out_of_support"]
    assert 0.0 <= near["value"] <= 1.0
