"""The composition root on users' models (not the demo): model entries in the stage
config, context only where the policy uses it, several models each under its own
policy in one stage, tabular scale, declared ranges; offline and on the real broker."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import ConfigError, load_config
from riskpipe.app.offline import run_offline
from riskpipe.stream.events import make_event

ROOT = Path(__file__).resolve().parents[1]


def write_policy(path: Path, name: str, *, context: bool, mode: str = "decide", sigma: float = 0.25,
                 epsilon: float = 0.25, n: int = 1000) -> Path:
    """policies/default.yaml with another name, certifier settings and context switch."""
    p = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    p["metadata"]["name"] = name
    p["threat_model"]["epsilon"] = epsilon
    p["certifier"] = {"method": "smoothing", "mode": mode, "sigma": sigma, "alpha": 0.001, "max_samples": n,
                      **({"n0": 50, "n": n} if mode == "certify" else {})}
    p["signals"]["context_risk"]["enabled"] = context
    p["signals"]["support_risk"]["enabled"] = context  # the other signal that reads the context index
    if not context:
        p["score"]["weights"]["context_risk"] = 0.0
    path.write_text(yaml.safe_dump(p, sort_keys=False))
    return path


def low_variance_model(tmp: Path) -> tuple[str, Path]:
    """A skops logistic regression whose decision is sign(x0): feature 0 has std 0.01
    in the reference set, feature 1 std 100 and no influence. Returns (spec, reference)."""
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    X = np.stack([0.01 * rng.standard_normal(400), 100 * rng.standard_normal(400)], axis=1).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    est = LogisticRegression().fit(X, y)
    est.coef_ = np.array([[1000.0, 0.0]])  # exactly: class 1 iff x0 > 0
    est.intercept_ = np.array([0.0])
    sio.dump(est, tmp / "lowvar.skops")
    np.savez(tmp / "lowvar-ref.npz", X=X, y=y)
    return str(tmp / "lowvar.skops"), tmp / "lowvar-ref.npz"


@pytest.fixture(scope="module")
def user(tmp_path_factory):
    from usermodels import image_model, tabular_model

    tmp = tmp_path_factory.mktemp("user")
    img, tab = image_model(tmp), tabular_model(tmp)
    spec, ref = low_variance_model(tmp)
    return {
        "tmp": tmp, "image": img, "tabular": tab, "lowvar": (spec, ref),
        "no_context": write_policy(tmp / "signs-policy.yaml", "signs", context=False, n=600),
        "tabular_policy": write_policy(tmp / "wine-policy.yaml", "wine", context=True, mode="certify",
                                       sigma=0.5, epsilon=0.1, n=500),
    }


def write_config(path: Path, models: dict, policy: Path | None = None, **extra) -> Path:
    path.write_text(yaml.safe_dump({"models": models, **({"policy": str(policy)} if policy else {}), **extra}))
    return path


def events_for(name: str, X: np.ndarray, prefix: str) -> list[dict]:
    return [make_event(f"{prefix}-{i}", name, x, upstream_risk=0.1) for i, x in enumerate(X)]


# ---------------------------------------------------------------- config errors ----
def test_config_errors_name_the_key_in_one_line(user, tmp_path):
    img, tab = user["image"], user["tabular"]
    cases = [
        ({"signs": {"spec": img.spec, "colour": "red"}}, "models.signs.colour: Extra inputs are not permitted"),
        ({"signs": {"spec": img.spec, "reference": str(tmp_path / "nope.npz")}},
         "models.signs.reference: " + str(tmp_path / "nope.npz") + ": file not found"),
        ({"signs": {"spec": img.spec, "policy": "policies/nope.yaml"}}, "models.signs.policy: "),
        ({"wine": {"spec": tab.spec, "scale": [1.0, 0.0]}},
         "models.wine.scale: every scale must be a finite number > 0"),
        ({"wine": {"spec": tab.spec, "scale": "whiten"}}, "models.wine.scale: must be 'standardize' or"),
        ({"wine": {"spec": tab.spec, "scale": "standardize"}}, "models.wine.scale: 'standardize' needs a reference"),
        ({"wine": {"spec": tab.spec, "scale": [1.0, 2.0]}}, "models.wine.scale: 2 values, the model has 13 features"),
        ({"signs": {"spec": img.spec, "labels": ["a", "b"]}}, "models.signs.labels: 2 labels, the model has 3 classes"),
        ({"wine": {"spec": tab.spec, "range": [[0, 1]] * 3}}, "models.wine.range: 3 [lo, hi] pairs, the model has 13"),
        ({"wine": {"spec": tab.spec, "range": [2, 1]}}, "models.wine.range: need lo < hi"),
        ({"wine": {"spec": tab.spec, "range": [float("-inf"), float("inf")]}},
         "models.wine.range: every lo and hi must be a finite number"),
        ({"wine": {"spec": tab.spec, "range": [[0, 1]] * 12 + [[-1e39, 1]]}},
         "models.wine.range: every lo and hi must be a finite number (within float32"),
        ({"signs": {"spec": str(tmp_path / "missing.pt")}}, "models.signs.spec: model "),
    ]
    for i, (models, want) in enumerate(cases):
        cfg_path = write_config(tmp_path / f"c{i}.yaml", models, user["no_context"])
        with pytest.raises(ConfigError) as e:
            build_pipeline(load_config(str(cfg_path)))
        msg = str(e.value)
        assert want in msg and "\n" not in msg, (want, msg)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_cli_config_error_is_one_line_without_traceback(user, tmp_path, workers):
    """Also with --workers: each worker checks the entries as it builds its pipeline (the
    parent validates the config file only, and loads no model), and the parent prints their
    identical error once."""
    cfg = write_config(tmp_path / "c.yaml", {"wine": {"spec": user["tabular"].spec, "scale": [1.0, 2.0]}},
                       user["no_context"])
    (tmp_path / "none.jsonl").write_text("")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--no-ledger",
                        "--workers", workers, "--source", f"jsonl:{tmp_path / 'none.jsonl'}",
                        "--sink", f"jsonl:{tmp_path / 'o'}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines == [f"riskpipe: error: {cfg}: models.wine.scale: 2 values, the model has 13 features"], r.stderr


def test_workers_get_the_command_line_without_the_parents_options():
    """`run --workers N` starts each worker with the same arguments less --workers and
    --metrics-port (the parent serves the aggregated /metrics), in either spelling."""
    from riskpipe.cli.run_impl import _worker_argv

    argv = ["--config", "c.yaml", "--workers", "3", "--metrics-port=9100", "--source", "jsonl:e.jsonl",
            "--workers=3", "--metrics-port", "9100", "-v"]
    assert _worker_argv(argv) == ["--config", "c.yaml", "--source", "jsonl:e.jsonl", "-v"]


def test_relative_paths_resolve_against_the_config_file(user, tmp_path):
    d = tmp_path / "deploy"
    d.mkdir()
    (d / "m").mkdir()
    spec, ref = user["lowvar"]
    (d / "m" / "lowvar.skops").write_bytes(Path(spec).read_bytes())
    (d / "m" / "ref.npz").write_bytes(ref.read_bytes())
    (d / "p.yaml").write_text(user["no_context"].read_text())
    cfg = load_config(str(write_config(d / "riskpipe.yaml", {"t": {"spec": "m/lowvar.skops", "reference": "m/ref.npz",
                                                                    "policy": "p.yaml"}}, policy=None)))
    mc = cfg.models["t"]
    assert mc.spec == str(d / "m" / "lowvar.skops") and mc.reference == str(d / "m" / "ref.npz")
    assert cfg.model_policy("t") == str(d / "p.yaml")


# ---------------------------------------------------------------- context ----------
def test_context_only_where_the_policy_uses_it(user, tmp_path):
    img = user["image"]
    pipe = build_pipeline(load_config(None, models={"signs": img.spec}, policy=str(user["no_context"])))
    assert pipe.entries["signs"].context is None  # no reference needed, none built
    with pytest.raises(ConfigError) as e:
        build_pipeline(load_config(None, models={"signs": img.spec}, policy=str(ROOT / "policies" / "default.yaml")))
    msg = str(e.value)
    assert msg.startswith("models.signs.reference: policy default uses context risk") and "\n" not in msg
    with_ref = build_pipeline(load_config(None, models={"signs": img.spec}, references={"signs": str(img.data)},
                                          policy=str(ROOT / "policies" / "default.yaml")))
    ctx = with_ref.entries["signs"].context
    assert ctx is not None and ctx.reference["size"] == 60 and ctx.reference_radii is not None


def test_demo_reference_is_data_and_radii_are_cached(user, tmp_path, monkeypatch):
    from riskpipe.models.digits import reference_file

    entry = build_pipeline(load_config(None)).entries["digits"]  # the default policy uses context risk
    assert entry.context.reference == {"name": "digits-train", "size": 1257, "norm": "l2"}
    assert Path(entry.model.default_reference) == reference_file()

    monkeypatch.setenv("RISKPIPE_CACHE_DIR", str(tmp_path))
    spec, ref = user["lowvar"]
    policy = write_policy(tmp_path / "p.yaml", "ctx", context=True, n=300)
    cfg = load_config(None, models={"t": spec}, references={"t": str(ref)}, policy=str(policy))
    build_pipeline(cfg)
    cached = list((tmp_path / "context").glob("radii-*.npy"))
    assert len(cached) == 1
    np.save(cached[0], np.full(300, 7.0))  # a cached value is used, not recomputed
    ctx = build_pipeline(cfg).entries["t"].context
    assert ctx.percentile(6.9) == 0.0 and ctx.percentile(7.0) == 100.0
    other = write_policy(tmp_path / "q.yaml", "ctx", context=True, n=300, sigma=0.5)  # other certifier settings
    build_pipeline(load_config(None, models={"t": spec}, references={"t": str(ref)}, policy=str(other)))
    assert len(list((tmp_path / "context").glob("radii-*.npy"))) == 2


# ---------------------------------------------------------------- several policies -
@pytest.fixture(scope="module")
def two_policies(user):
    """signs (3x32x32 TorchScript) under a no-context policy; wine (skops, 13 raw
    features) under its own policy with context, a reference and a standardize scale."""
    img, tab = user["image"], user["tabular"]
    cfg_path = write_config(user["tmp"] / "two.yaml", {
        "signs": {"spec": img.spec, "labels": [str(v) for v in img.labels]},
        "wine": {"spec": tab.spec, "reference": str(tab.data), "policy": str(user["tabular_policy"]),
                 "scale": "standardize", "labels": [str(v) for v in tab.labels],
                 "feature_names": [str(v) for v in tab.feature_names]},
    }, user["no_context"])
    cfg = load_config(str(cfg_path))
    return cfg_path, cfg, build_pipeline(cfg)


def two_model_events(user, prefix: str) -> list[dict]:
    Xi = np.load(user["image"].data)["X"][:8]
    Xt = np.load(user["tabular"].data)["X"][:8]
    evs = events_for("signs", Xi, f"{prefix}-img") + events_for("wine", Xt, f"{prefix}-tab")
    return [evs[i // 2 + (len(evs) // 2) * (i % 2)] for i in range(len(evs))]  # interleaved


def check_records(records: list[dict], pipe) -> None:
    policies = {e.name: e.policy for e in pipe.entries.values()}
    for r in records:
        p = policies[r["model"]["name"]]
        assert r["policy"]["name"] == p.name and r["policy"]["sha256"] == p.sha256
        assert r["certificate"]["seed"] == pipe.seed(r["id"], r["model"]["name"])
    wine = [r for r in records if r["model"]["name"] == "wine"]
    signs = [r for r in records if r["model"]["name"] == "signs"]
    assert wine and signs
    assert all(r["context"] is None for r in signs)  # its policy does not use context
    assert all(r["context"]["nearest_other_class_distance"] > 0 for r in wine)
    for r in wine:
        assert "scaled l2: ||delta/s||_2, s = standardize(reference)" in r["certificate"]["scope"]


def test_two_models_two_policies_offline(user, two_policies, tmp_path):
    from riskpipe.ledger import Ledger
    from riskpipe.metrics import StageMetrics

    _, cfg, pipe = two_policies
    assert sorted(p.name for p in pipe.policies) == ["signs", "wine"]
    evs = two_model_events(user, "off")
    metrics = StageMetrics()
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline(evs, tmp_path / "out", cfg, pipeline=pipe, ledger=led, metrics=metrics)
        assert led.count("policy") == 2 and led.count("decision") == len(evs)
        rows = {r["name"]: r["sha256"] for r in (e.record for e in led.records(kind="policy"))}
    assert rows == {p.name: p.sha256 for p in pipe.policies}
    audit = res.read("audit")
    assert sorted(r["id"] for r in audit) == sorted(e["id"] for e in evs)
    check_records(audit, pipe)
    for d in res.read("decisions"):  # public view under the deciding policy
        assert set(d) <= {"id", "ts", "decision", "policy_version", "model_name"}  # two models: named
    infos = {s.labels["name"]: s.labels["sha256"] for fam in metrics.registry.collect()
             if fam.name == "riskpipe_policy" for s in fam.samples}
    assert infos == rows
    # two models in different units (pixels, standardised features): each its own series
    samples = [s for fam in metrics.registry.collect() for s in fam.samples]
    by_model = {name: {"decided": 0.0, "radii": 0.0, "radius_sum": 0.0} for name in ("signs", "wine")}
    for s in samples:
        model = s.labels.get("model")
        if s.name == "riskpipe_decisions_total":
            by_model[model]["decided"] += s.value
            assert s.labels["policy"] == pipe.entries[model].policy.name
        if s.name == "riskpipe_certified_radius_count":
            by_model[model]["radii"] += s.value
        if s.name == "riskpipe_certified_radius_sum":
            by_model[model]["radius_sum"] += s.value
    for name in ("signs", "wine"):
        recs = [r for r in audit if r["model"]["name"] == name]
        assert by_model[name]["decided"] == len(recs)
        radii = [r["certificate"]["radius_threat"] for r in recs if not r["certificate"]["abstained"]]
        assert by_model[name]["radii"] == len(radii)
        assert by_model[name]["radius_sum"] == pytest.approx(sum(radii))


def test_two_models_on_the_broker(user, two_policies, tmp_path):
    from riskpipe.ledger import Ledger
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import FAST_GROUP, StageThread, consume_all, produce, wait_for

    _, cfg, pipe = two_policies
    evs = two_model_events(user, "kb")
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        produce(b.bootstrap, evs)  # a Kafka client library, as a user's producer would
        config = cfg.model_copy(update={"bootstrap_servers": b.bootstrap, **FAST_GROUP})
        with Ledger(str(tmp_path / "l.sqlite")) as led, StageThread(config, pipe, led) as stage:
            assert wait_for(lambda: stage.stats.decided >= len(evs), 120)
        out = consume_all(b.bootstrap, ["audit", "decisions"], expect=2 * len(evs))
    audit = [json.loads(m.value) for m in out["audit"]]
    assert sorted(r["id"] for r in audit) == sorted(e["id"] for e in evs)  # each decided once
    assert len(out["decisions"]) == len(evs)
    check_records(audit, pipe)


def test_run_command_offline_with_reference_flag(user, tmp_path):
    img, tab = user["image"], user["tabular"]
    cfg = write_config(tmp_path / "c.yaml", {"signs": img.spec, "wine": {"spec": tab.spec,
                                             "policy": str(user["tabular_policy"])}}, user["no_context"])
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(e) for e in two_model_events(user, "cli")) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--reference",
                        f"wine={tab.data}", "--source", f"jsonl:{src}", "--sink", f"jsonl:{out}",
                        "--ledger", str(tmp_path / "l.sqlite")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decided 16 events, 0 to the DLQ" in r.stderr
    audit = [json.loads(x) for x in (out / "audit.jsonl").read_text().splitlines()]
    assert {r["model"]["name"]: r["policy"]["name"] for r in audit} == {"signs": "signs", "wine": "wine"}
    with pytest.raises(ConfigError, match=r"--reference nope=.*: no model named 'nope'"):
        load_config(str(cfg), references={"nope": str(tab.data)})


# ---------------------------------------------------------------- scale and range --
def test_scaled_noise_certifies_in_the_scaled_norm(user, tmp_path):
    """The model decides on x0 alone, whose reference std is 0.01. At x0 = 0.02 the true
    distance to the boundary is 0.02 / s0 ~ 2 in the scaled norm and 0.02 in raw l2.
    With scale: standardize the smoothing noise on x0 has std sigma * s0, so a radius
    close to (and never above) that distance is certified; unscaled noise of std sigma
    swamps x0 and the certifier abstains."""
    spec, ref = user["lowvar"]
    policy = write_policy(tmp_path / "p.yaml", "lowvar", context=True, mode="certify", sigma=1.0, n=2000)
    models = {"scaled": {"spec": spec, "reference": str(ref), "scale": "standardize"},
              "raw": {"spec": spec, "reference": str(ref)}}
    pipe = build_pipeline(load_config(str(write_config(tmp_path / "c.yaml", models, policy))))
    s = pipe.entries["scaled"].scale.ravel()
    X_ref = np.load(ref)["X"]
    assert s == pytest.approx(X_ref.std(axis=0), rel=1e-5)
    x = np.array([0.02, 37.0], np.float32)
    res = run_offline(events_for("scaled", [x], "s") + events_for("raw", [x], "r"), tmp_path / "o",
                      load_config(None), pipeline=pipe)
    recs = {r["model"]["name"]: r for r in res.read("audit")}
    scaled, raw = recs["scaled"]["certificate"], recs["raw"]["certificate"]
    distance = 0.02 / s[0]
    assert not scaled["abstained"] and 0.6 * distance < scaled["radius"] <= distance
    assert "scaled l2: ||delta/s||_2, s = standardize(reference)" in scaled["scope"]
    assert raw["abstained"] or raw["radius"] < 0.05
    assert "scaled" not in raw["scope"]
    # context distances are measured on X / s: the nearest other-class reference point is
    # a few scaled units away (in raw units feature 1 alone puts it tens of units away)
    d_scaled = recs["scaled"]["context"]["nearest_other_class_distance"]
    d_raw = recs["raw"]["context"]["nearest_other_class_distance"]
    Z = X_ref / s
    y_ref = np.load(ref)["y"]
    assert d_scaled == pytest.approx(np.linalg.norm(Z[y_ref != 1] - x / s, axis=1).min(), rel=1e-4)
    assert d_scaled > 1.5  # the other class starts where x0 changes sign: >= 0.02 / s0
    raw_d = np.linalg.norm(X_ref - x, axis=1)  # abstained: the nearest sample's label stands in
    assert d_raw == pytest.approx(raw_d[y_ref != y_ref[raw_d.argmin()]].min(), rel=1e-4)


def test_declared_ranges_and_finiteness_only_without_one(user, tmp_path):
    spec, _ref = user["lowvar"]
    models = {"free": {"spec": spec}, "ranged": {"spec": spec, "range": [[-1, 1], [-500, 500]]},
              "image": user["image"].spec, "demo": "demo:digits"}
    cfg = load_config(str(write_config(tmp_path / "c.yaml", models, user["no_context"])))
    pipe = build_pipeline(cfg)
    big = np.array([0.5, 1.0e6], np.float32)
    evs = (events_for("free", [big], "f") + events_for("ranged", [big], "g")
           + events_for("image", [np.full((3, 32, 32), 3.0, np.float32)], "i")
           + events_for("demo", [np.full((1, 8, 8), 3.0, np.float32)], "d"))
    res = run_offline(evs, tmp_path / "o", cfg, pipeline=pipe)
    assert sorted(r["id"] for r in res.read("audit")) == ["f-0", "i-0"]  # no range declared: only finiteness
    dlq = {json.loads(d["value"])["id"]: d["headers"] for d in res.read("dlq")}
    assert dlq["g-0"]["__riskpipe.errors.reason"] == "out_of_range"
    assert "feature 1 must lie in [-500, 500]" in dlq["g-0"]["__riskpipe.errors.message"]
    assert dlq["d-0"]["__riskpipe.errors.reason"] == "out_of_range"  # the demo keeps [0, 1]


def sign_of_x0():
    """``module:factory`` for a torch tabular model: class 1 iff x0 > 0 (feature 1 ignored)."""
    import torch

    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[-1000.0, 0.0], [1000.0, 0.0]]))
        layer.bias.zero_()
    return torch.nn.Sequential(layer)


@pytest.mark.parametrize("method,norm", [("ibp", "linf"), ("lipschitz", "l2")])
def test_scale_wraps_torch_models_for_the_bound_families(user, tmp_path, method, norm):
    """With scale, IBP and global-Lipschitz certify g(z) = f(s * z) too: at x0 = 0.02 with
    s0 ~ 0.01 the exact distance to the boundary is 0.02 / s0 ~ 2 in the scaled norm
    (both families are tight on a linear model), never more."""
    _, ref = user["lowvar"]
    p = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    p["threat_model"] = {"norm": norm, "epsilon": 0.5}
    p["certifier"] = {"method": method, "mode": "certify"}
    p["signals"]["context_risk"]["enabled"] = False
    p["signals"]["support_risk"]["enabled"] = False
    p["score"]["weights"]["context_risk"] = 0.0
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p))
    models = {"t": {"spec": "test_compose:sign_of_x0?shape=2", "reference": str(ref), "scale": "standardize",
                    "range": [[-1, 1], [-1000, 1000]]}}
    pipe = build_pipeline(load_config(str(write_config(tmp_path / "c.yaml", models, tmp_path / "p.yaml"))))
    s = pipe.entries["t"].scale.ravel()
    res = run_offline(events_for("t", [np.array([0.02, 37.0], np.float32)], "b"), tmp_path / "o", load_config(None),
                      pipeline=pipe)
    cert = res.read("audit")[0]["certificate"]
    assert cert["method"] == method and not cert["abstained"] and cert["predicted_class"] == 1
    assert 0.9 * (0.02 / s[0]) <= cert["radius"] <= 0.02 / s[0] + 1e-4
    assert "scaled" in cert["scope"]


def centred_sign_of_x0():
    """``module:factory``: ``sign_of_x0`` behind a Sequential whose own forward centres the
    input, the way normalising models are often written."""
    import torch

    class Centred(torch.nn.Sequential):
        def forward(self, x):
            return super().forward((x - 0.5) * 40.0)

    return Centred(*sign_of_x0())


def rotated_sign_of_x0():
    """``module:factory``: ``sign_of_x0`` whose first weight comes through a parametrization
    holding a float32 matrix as a plain attribute: the model runs, but a copy moved to
    float64 (as the Lipschitz bounds make one) fails with a dtype mismatch."""
    import torch
    from torch.nn.utils import parametrize

    class Rotate(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q = torch.eye(2)  # not a buffer: .double() leaves it float32

        def forward(self, w):
            return w @ self.q

    m = sign_of_x0()
    first = next(layer for layer in m if isinstance(layer, torch.nn.Linear))
    parametrize.register_parametrization(first, "weight", Rotate())
    return m


def _start_refused(user, tmp_path, method: str, factory: str) -> str:
    """The ConfigError of a stage whose one model ``test_compose:FACTORY`` (2 features) is
    certified by ``method`` under the default policy without context."""
    _, ref = user["lowvar"]
    p = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    p["threat_model"] = {"norm": "linf" if method == "ibp" else "l2", "epsilon": 0.5}
    p["certifier"] = {"method": method, "mode": "certify"}
    p["signals"]["context_risk"]["enabled"] = p["signals"]["support_risk"]["enabled"] = False
    p["score"]["weights"]["context_risk"] = 0.0
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(p))
    models = {"t": {"spec": f"test_compose:{factory}?shape=2", "reference": str(ref)}}
    with pytest.raises(ConfigError) as e:
        build_pipeline(load_config(str(write_config(tmp_path / "c.yaml", models, tmp_path / "p.yaml"))))
    return str(e.value)


def test_a_bound_family_that_cannot_be_set_up_for_a_model_is_one_line(user, tmp_path):
    """A model whose layers fail inside the Lipschitz set-up (a RuntimeError, not the
    ValueError of an unsupported layer): the constants were first computed at the first
    event, so the stage started and dead-lettered every event as internal_error (and the
    API gave a traceback). The certifier's one-time work now runs at start-up, and its
    failure stops the start in one line naming the model key."""
    msg = _start_refused(user, tmp_path, "lipschitz", "rotated_sign_of_x0")
    assert "models.t" in msg and "the lipschitz certifier cannot be set up for model" in msg, msg
    assert "RuntimeError" in msg and "\n" not in msg


@pytest.mark.parametrize("method", ["ibp", "lipschitz"])
def test_a_model_whose_forward_is_not_its_layers_does_not_start_under_a_bound_family(user, tmp_path, method):
    """The bound families bound the layers; a Sequential with its own forward computes
    something else, so the stage refuses it at start-up in one line naming the model key
    (smoothing, which only calls the model, still takes it)."""
    msg = _start_refused(user, tmp_path, method, "centred_sign_of_x0")
    assert "models.t" in msg and "computes something other than its layers" in msg and "Centred.forward" in msg
    assert "\n" not in msg
    models = {"t": {"spec": "test_compose:centred_sign_of_x0?shape=2", "reference": str(user["lowvar"][1])}}
    build_pipeline(load_config(str(write_config(tmp_path / "s.yaml", models, user["no_context"]))))


def test_torch_threads_is_set_before_the_models_are_built(user, tmp_path):
    """``torch_threads`` (default 1, bench/results/threads.json) is torch's intra-op thread
    count from the pipeline on; null leaves it alone; 0 is refused naming the key."""
    import torch

    img = user["image"]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        build_pipeline(load_config(str(write_config(tmp_path / "a.yaml", {"signs": img.spec}, user["no_context"]))))
        assert torch.get_num_threads() == 1
        build_pipeline(load_config(str(write_config(tmp_path / "b.yaml", {"signs": img.spec}, user["no_context"],
                                                    torch_threads=2))))
        assert torch.get_num_threads() == 2
        torch.set_num_threads(3)
        build_pipeline(load_config(str(write_config(tmp_path / "c.yaml", {"signs": img.spec}, user["no_context"],
                                                    torch_threads=None))))
        assert torch.get_num_threads() == 3
        with pytest.raises(ConfigError) as e:
            load_config(str(write_config(tmp_path / "d.yaml", {"signs": img.spec}, user["no_context"],
                                         torch_threads=0)))
        assert "torch_threads" in str(e.value) and "\n" not in str(e.value)
    finally:
        torch.set_num_threads(before)


def test_a_device_or_port_this_machine_cannot_use_is_a_config_error(tmp_path):
    """A device torch does not know, CUDA on a machine without it, a port beyond 65535: one
    config line naming the key (they were an AssertionError, a RuntimeError or a ValueError
    traceback at start-up), before any model is loaded. (--workers 0: test_cli_startup.)"""
    import torch

    from riskpipe.app.config import StageConfig
    from riskpipe.models import ModelError, check_device

    bad = {"foo": "not a torch device", "meta": "riskpipe runs models on cpu, cuda or mps"}
    if not torch.cuda.is_available():
        bad.update({"cuda": "CUDA is not available here", "cuda:7": "CUDA is not available here"})
    else:
        bad[f"cuda:{torch.cuda.device_count()}"] = "CUDA device(s)"
    for device, why in bad.items():
        with pytest.raises(ConfigError, match=rf"^device: '{device}': {why}"):
            build_pipeline(StageConfig(device=device))
        with pytest.raises(ModelError, match=rf"^device '{device}': {why}"):
            check_device(device)
    assert check_device("cpu") == torch.device("cpu")
    for port in (-1, 65536):
        (tmp_path / "c.yaml").write_text(yaml.safe_dump({"metrics_port": port}))
        with pytest.raises(ConfigError, match="metrics_port: Input should be"):
            load_config(str(tmp_path / "c.yaml"))


def test_topic_names_follow_kafkas_rule(tmp_path):
    """A topic Kafka would refuse (a space, a slash, over 249 characters, '..') is a config
    error naming the key; offline, '../../x' was a file written outside the sink directory,
    and on a broker the refusal came at the first send."""
    for key, name in (("topics.audit", "../../x"), ("topics.input", "a b"), ("topics.dlq", "t" * 250),
                      ("topics.review", ".."), ("checkpoint.topic", "a/b")):
        section, field = key.split(".")
        body = {section: {field: name}} if section == "topics" else {
            "checkpoint": {"key_file": "k.pem", field: name}}
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(body))
        with pytest.raises(ConfigError, match=rf"{key}: .* is not a Kafka topic name"):
            load_config(str(tmp_path / "c.yaml"))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"topics": {"audit": "team.audit_v2-" + "t" * 235}}))
    assert len(load_config(str(tmp_path / "c.yaml")).topics.audit) == 249



def test_class_names_come_from_a_scikit_learn_model_in_its_own_order(tmp_path):
    """A model fitted on string classes keeps them sorted (``classes_ == ['fraud',
    'legit']``): class 0 is ``fraud`` whatever order the user wrote them in. With no
    ``labels`` the stage and the review console name the classes from the model; labels
    that are the same names in another order are refused (a reviewer would read ``legit``
    for a fraud prediction); other names of the user's own are kept."""
    import skops.io as sio
    from sklearn.linear_model import LogisticRegression

    from riskpipe.render.inputs import entry_info

    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3)).astype(np.float32)
    y = np.where(X[:, 0] > 0, "legit", "fraud")  # the user's natural order: legit first
    est = LogisticRegression().fit(X, y)
    assert list(est.classes_) == ["fraud", "legit"]
    path = tmp_path / "fraud.skops"
    sio.dump(est, path)
    policy = str(write_policy(tmp_path / "p.yaml", "fraud", context=False))

    def entry(labels):
        cfg = {"spec": str(path), **({"labels": labels} if labels is not None else {})}
        f = tmp_path / "riskpipe.yaml"
        f.write_text(yaml.safe_dump({"policy": policy, "models": {"fraud": cfg}}))
        return load_config(str(f))

    assert build_pipeline(entry(None)).entries["fraud"].labels == ["fraud", "legit"]
    assert entry_info({"spec": str(path)}).labels == ("fraud", "legit")
    with pytest.raises(ConfigError) as e:
        build_pipeline(entry(["legit", "fraud"]))
    assert "models.fraud.labels" in str(e.value) and "['fraud', 'legit']" in str(e.value)
    assert build_pipeline(entry(["Fraudulent", "Legitimate"])).entries["fraud"].labels == ["Fraudulent", "Legitimate"]

    skl2onnx = pytest.importorskip("skl2onnx")  # the same estimator as ONNX: its ZipMap is keyed by classes_
    from skl2onnx.common.data_types import FloatTensorType

    onx = skl2onnx.convert_sklearn(est, initial_types=[("x", FloatTensorType([None, 3]))])
    path = tmp_path / "fraud.onnx"
    path.write_bytes(onx.SerializeToString())
    assert build_pipeline(entry(None)).entries["fraud"].labels == ["fraud", "legit"]
    with pytest.raises(ConfigError, match=r"models\.fraud\.labels"):
        build_pipeline(entry(["legit", "fraud"]))
