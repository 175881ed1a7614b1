"""The examples end to end through the real embedded broker (Tansu): events produced with
kafka-python, every event decided once under its model's policy, records read back from
the topics; and one stage serving both examples and the demo model at once."""

import json
from pathlib import Path

import numpy as np
import pytest

from riskpipe.stream.broker import EmbeddedBroker
from riskpipe.stream.events import make_event
from streamkit import StageThread, consume_all, digits, ledger_ids, produce, wait_for
from test_examples import build_module

pytestmark = pytest.mark.broker

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOPICS = ["decisions", "audit", "review", "dlq"]
PUBLIC = {"id", "ts", "decision", "policy_version"}
POLICY = {"shapes": "image-shapes", "cancer": "tabular-breast-cancer", "digits": "default"}


@pytest.fixture
def broker():
    with EmbeddedBroker() as b:
        b.create_topics(partitions=2)
        yield b


def example_inputs(model: str, n: int) -> np.ndarray:
    """Inputs the models never saw: freshly drawn images; tabular reference rows (raw units)
    nudged by 1 % of each feature's std; digits from the demo's test split."""
    if model == "shapes":
        return build_module("image").make_images(n, seed=777)[0]
    if model == "cancer":
        with np.load(EXAMPLES / "tabular" / "reference.npz") as z:
            X = z["X"][:n]
            return X + 0.01 * X.std(axis=0) * np.random.default_rng(5).standard_normal(X.shape).astype(np.float32)
    return digits(n)


def events_for(model: str, n: int) -> list[dict]:
    return [make_event(f"{model}-{i}", model, x, upstream_risk=0.1) for i, x in enumerate(example_inputs(model, n))]


def bad_events() -> dict[str, tuple[dict, str]]:
    """One malformed event per example model, with the DLQ reason it must get."""
    img = example_inputs("shapes", 1)[0].copy()
    img[0, 0, 0] = 2.0  # the image example declares range [0, 1]
    row = example_inputs("cancer", 1)[0][:29]  # one feature short
    return {"shapes-bad": (make_event("shapes-bad", "shapes", img), "out_of_range"),
            "cancer-bad": (make_event("cancer-bad", "cancer", row), "wrong_shape")}


def run_stage(broker, tmp_path, config, expect_decided: int, expect_dlq: int, expect_duplicates: int = 0):
    from riskpipe.app.compose import build_pipeline
    from riskpipe.ledger import Ledger

    ledger_path = tmp_path / "ledger.sqlite"
    with Ledger(str(ledger_path)) as led, StageThread(config, build_pipeline(config), led) as stage:
        total = expect_decided + expect_dlq + expect_duplicates
        assert wait_for(lambda: stage.stats.decided + sum(stage.stats.dlq.values()) + stage.stats.duplicates >= total,
                        180), (stage.stats, stage.stats.dlq)
        assert stage.stats.decided == expect_decided and stage.stats.duplicates == expect_duplicates
    out = consume_all(broker.bootstrap, TOPICS, expect=2 * expect_decided + expect_dlq)
    return out, ledger_ids(str(ledger_path))


def check_outputs(out, ledger, good: list[dict], bad: dict, public: set = PUBLIC):
    want = sorted(e["id"] for e in good)
    audit = [json.loads(m.value) for m in out["audit"]]
    assert sorted(r["id"] for r in audit) == want  # each event decided exactly once
    assert sorted(ledger) == want
    assert sorted(m.key.decode() for m in out["decisions"]) == want
    for m in out["decisions"]:
        assert set(json.loads(m.value)) <= public  # nothing that locates the decision boundary
    routed = {r["id"] for r in audit if r["review"]["routed"]}
    assert routed == {m.key.decode() for m in out["review"]}
    for r in audit:
        model = r["model"]["name"]
        assert r["policy"]["name"] == POLICY[model], r["policy"]
        assert r["decision"] in ("allow", "review", "block") and r["certificate"]["sigma"] == 0.25
        if not r["certificate"]["certified"]:
            assert r["decision"] != "allow"  # the invariant, per policy
        if model == "cancer":  # raw tabular units are on no grid: the default sampler
            assert "||delta/s||_2" in r["certificate"]["scope"] and r["certificate"]["input_dim"] == 30
            assert r["certificate"]["sampler"] == "gaussian" and "not floating-point sound" in r["certificate"]["scope"]
        if model == "shapes":  # 8-bit images: the sound sampler on the 1/255 grid
            assert r["input"]["shape"] == [3, 32, 32] and r["certificate"]["input_dim"] == 3072
            assert r["certificate"]["sampler"] == "sound" and "sampler sound" in r["certificate"]["scope"]
    reasons = {m.key.decode() if m.key else json.loads(m.value)["id"]: dict(m.headers)["__riskpipe.errors.reason"]
               .decode() for m in out["dlq"]}
    assert reasons == {k: reason for k, (_, reason) in bad.items()}
    return audit


def stage_config(broker, tmp_path, path=None, **kw):
    from riskpipe.app.config import load_config

    return load_config(str(path) if path else None, bootstrap_servers=broker.bootstrap,
                       ledger=str(tmp_path / "ledger.sqlite"), session_timeout_ms=2000, heartbeat_interval_ms=600,
                       batch={"max_events": 32, "max_wait_ms": 20}, create_topics=False, **kw)


@pytest.mark.parametrize("example, model", [("image", "shapes"), ("tabular", "cancer")])
def test_example_config_end_to_end_through_the_broker(broker, tmp_path, example, model):
    """The example's own riskpipe.yaml, as committed (only broker address and timings overridden)."""
    good = events_for(model, 24)
    bad = {k: v for k, v in bad_events().items() if k.startswith(model)}
    produce(broker.bootstrap, good + [e for e, _ in bad.values()] + good[:4])  # four retried by the producer
    config = stage_config(broker, tmp_path, EXAMPLES / example / "riskpipe.yaml")
    out, ledger = run_stage(broker, tmp_path, config, len(good), len(bad), expect_duplicates=4)
    audit = check_outputs(out, ledger, good, bad)
    assert {r["model"]["name"] for r in audit} == {model}
    # a noise-trained model on inputs like its training data: most are certified and allowed
    allowed = sum(r["decision"] == "allow" for r in audit)
    assert allowed >= len(good) // 2, [r["decision"] for r in audit]


def test_one_stage_serves_both_examples_and_the_demo_each_under_its_own_policy(broker, tmp_path):
    models = {"digits": "demo:digits"}
    for example, model in (("image", "shapes"), ("tabular", "cancer")):
        models[model] = _entry(EXAMPLES / example / "riskpipe.yaml", model)
    good = events_for("shapes", 12) + events_for("cancer", 12) + events_for("digits", 12)
    order = np.random.default_rng(0).permutation(len(good))  # interleaved: batches mix the models
    good = [good[i] for i in order]
    bad = bad_events()
    produce(broker.bootstrap, good + [e for e, _ in bad.values()])
    import yaml

    path = tmp_path / "riskpipe.yaml"  # a user's config listing all three models
    path.write_text(yaml.safe_dump({"models": models}))
    config = stage_config(broker, tmp_path, path)
    out, ledger = run_stage(broker, tmp_path, config, len(good), len(bad))
    audit = check_outputs(out, ledger, good, bad, PUBLIC | {"model_name"})  # several models: named
    by_model = {m: [r for r in audit if r["model"]["name"] == m] for m in POLICY}
    assert {m: len(v) for m, v in by_model.items()} == {"shapes": 12, "cancer": 12, "digits": 12}
    shas = {m: {r["policy"]["sha256"] for r in v} for m, v in by_model.items()}
    assert all(len(s) == 1 for s in shas.values()) and len(set.union(*shas.values())) == 3


def _entry(config_path: Path, model: str) -> dict:
    """A model entry of an example config with its paths made absolute (for a config built here)."""
    import yaml

    entry = yaml.safe_load(config_path.read_text())["models"][model]
    base, sep, opts = entry["spec"].partition("?")
    entry["spec"] = str(config_path.parent / base) + sep + opts
    for key in ("reference", "policy"):
        entry[key] = str(config_path.parent / entry[key])
    return entry


def test_fraud_example_end_to_end_through_the_broker_with_the_trees_certificate(broker, tmp_path):
    """examples/fraud/riskpipe.yaml as committed: a HistGradientBoosting decided with the
    deterministic trees certificate in standardized l_inf units; a short row is dead-lettered."""
    with np.load(EXAMPLES / "fraud" / "reference.npz") as z:
        X = z["X"][:24]
    good = [make_event(f"fraud-{i}", "fraud", x, upstream_risk=0.1) for i, x in enumerate(X)]
    bad = make_event("fraud-bad", "fraud", X[0][:9])
    produce(broker.bootstrap, good + [bad])
    config = stage_config(broker, tmp_path, EXAMPLES / "fraud" / "riskpipe.yaml")
    out, ledger = run_stage(broker, tmp_path, config, len(good), 1)
    audit = [json.loads(m.value) for m in out["audit"]]
    assert sorted(r["id"] for r in audit) == sorted(e["id"] for e in good) == sorted(ledger)
    for m in out["decisions"]:
        assert set(json.loads(m.value)) <= PUBLIC
    for r in audit:
        c = r["certificate"]
        assert r["policy"]["name"] == "fraud-transactions" and c["method"] == "trees" and c["norm"] == "linf"
        assert c["sigma"] is None and c["input_dim"] == 10 and c["threat_norm"] == "linf"
        assert "exact for a single tree" in r["scope"] and "scaled l_inf" in r["scope"]
        if c["abstained"] or c["radius_threat"] < 0.1:  # uncertified at the threat model's epsilon
            assert r["decision"] != "allow"
    certified = [r for r in audit if not r["certificate"]["abstained"] and r["certificate"]["radius_threat"] >= 0.1]
    assert len(certified) >= len(good) // 2
    assert sum(r["decision"] == "allow" for r in audit) >= len(good) // 2
    (dlq,) = out["dlq"]
    assert dict(dlq.headers)["__riskpipe.errors.reason"].decode() == "wrong_shape"
