"""The model output contract (issue 19 item 2): a model whose output is not finite (N, C)
logits never yields a certificate or ``allow``; its inputs get uncertified certificates
with reason ``model_fault``, counted in ``riskpipe_model_faults_total{model}``, and at
start-up a broken model is one line naming it.

Before the contract, ``argmax`` of a NaN row was class 0, so every such input was
certified (radius ~0.26 on the demo) and allowed."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.models import Model, load_model
from riskpipe.models.output import check_output
from usermodels import FAULT_CLASSES, fault_inputs, fault_policy, faulty_model, faulty_onnx_model


# ---- the check itself ----------------------------------------------------------------------
def test_check_output_marks_non_finite_rows_only():
    out = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [0.0, float("inf")], [3.0, -1.0]])
    c = check_output(out, 4, 2)
    assert c.bad.tolist() == [False, True, True, False]
    assert "NaN" in c.reason and "inf" in c.reason and "2 of 4 rows" in c.reason
    assert torch.isfinite(c.values).all() and c.values[0].tolist() == [1.0, 2.0]
    assert check_output(out[[0, 3]], 2, 2).reason is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_check_output_reads_large_finite_logits_as_good_and_cancelling_infinities_as_bad(dtype):
    """The check sums the batch first (one op) and goes row by row only when the sum is not
    finite: finite logits whose sum overflows are still every one good, and +inf beside
    -inf (whose sum is NaN, not a cancellation) still bad."""
    big = torch.finfo(dtype).max
    out = torch.tensor([[big, big], [big, -1.0], [1.0, 2.0]], dtype=dtype)
    assert not torch.isfinite(out.sum())  # the sum overflows
    c = check_output(out, 3, 2)
    assert c.reason is None and not c.bad.any() and c.bad.shape == (3,) and c.bad.dtype == torch.bool
    assert c.values is out
    mixed = torch.tensor([[float("inf"), 0.0], [1.0, 2.0], [0.0, float("-inf")]], dtype=dtype)
    c = check_output(mixed, 3, 2)
    assert c.bad.tolist() == [True, False, True] and "inf" in c.reason
    good = check_output(torch.ones(5, 2, dtype=dtype), 5, 2)
    assert good.reason is None and good.bad.tolist() == [False] * 5


@pytest.mark.parametrize("out, why", [
    (torch.zeros(3, 2), "shape (3, 2), expected (4, 2)"),              # too few rows
    (torch.zeros(4, 2, 1), "shape (4, 2, 1)"),                          # an extra axis
    (torch.zeros(4, 3), "expected (4, 2)"),                             # another class count
    ((torch.zeros(4, 2),), "output is a tuple"),                        # not a tensor
    (torch.zeros(4, 2, dtype=torch.bool), "dtype torch.bool"),          # not numbers
    (np.array([0, 1, 2, 1]), "class ids outside [0, 2) in 1 of 4 rows"),  # ids out of range (one row)
    (np.array(["a"] * 4), "not numeric"),
])
def test_check_output_refuses_what_breaks_the_contract(out, why):
    c = check_output(out, 4, 2)
    assert c.any_bad and why in c.reason
    if "ids outside" not in why:
        assert bool(c.bad.all())  # a mis-shaped output cannot be blamed on one row


def _model(module: torch.nn.Module, classes: int = FAULT_CLASSES, features: int = 4) -> Model:
    return Model(spec="test:faulty", input_shape=(features,), num_classes=classes, sha256="0" * 64,
                 module=module.eval())


def _certifier(method: str, model: Model):
    from riskpipe.certify import certifier_for_policy
    from riskpipe.policy.schema import Certifier

    kw = {"smoothing": dict(sigma=0.25, alpha=0.01, n0=20, n=200, max_samples=400),
          "ibp": dict(norm="linf"), "lipschitz": {}}[method]
    return certifier_for_policy(model, Certifier.for_method(method, **kw), batch_size=64, epsilon=0.1)


# ---- every family --------------------------------------------------------------------------
@pytest.mark.parametrize("overlap", [None, True])  # the default rule, and the noise always drawn ahead
@pytest.mark.parametrize("mode", ["certify", "predict", "decide"])
@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "few_rows"])
def test_smoothing_faults_only_the_inputs_whose_noise_met_a_broken_output(tmp_path, kind, mode, overlap):
    healthy, faulty = fault_inputs(3, 2)
    X = np.concatenate([healthy, faulty])
    seeds = list(range(len(X)))
    broken = _certifier("smoothing", load_model(faulty_model(tmp_path, kind)))
    broken.overlap = overlap
    certs = broken.run(mode, X, seeds, 0.1)
    for c in certs[3:]:
        assert c.reason == MODEL_FAULT and c.abstained and c.radius == 0.0 and c.predicted_class is None
        assert not c.is_certified and c.extra[MODEL_FAULT]
    if kind == "few_rows":  # the batch lost a row: every input that shared a model call with it is faulted
        return
    # healthy inputs are certified exactly as alone (their noise batches never met a broken row)
    alone = broken.run(mode, healthy, seeds[:3], 0.1)
    assert [c.to_dict() | {"elapsed_ms": 0} for c in certs[:3]] == [c.to_dict() | {"elapsed_ms": 0} for c in alone]
    assert all(c.reason != MODEL_FAULT for c in certs[:3])
    if mode != "predict":
        assert all(c.is_certified for c in certs[:3])


@pytest.mark.parametrize("method", ["ibp", "lipschitz"])
def test_bound_families_fault_rows_with_non_finite_logits(method):
    lin = torch.nn.Linear(4, FAULT_CLASSES)
    with torch.no_grad():
        lin.weight.copy_(torch.eye(FAULT_CLASSES, 4) * 5)
        lin.bias.zero_()
    net = torch.nn.Sequential(lin)
    healthy, _ = fault_inputs(4, 0)
    good = _certifier(method, _model(net)).run("certify", healthy, list(range(4)))
    assert all(c.reason != MODEL_FAULT for c in good)
    with torch.no_grad():
        lin.bias[0] = float("nan")  # every logit row has a NaN
    bad = _certifier(method, _model(net)).run("certify", healthy, list(range(4)))
    assert all(c.reason == MODEL_FAULT and c.abstained and not c.is_certified for c in bad)
    assert "NaN" in bad[0].extra[MODEL_FAULT]


def test_predict_refuses_a_broken_output(tmp_path):
    from riskpipe.models import ModelFault

    model = load_model(faulty_model(tmp_path, "nan"))
    healthy, faulty = fault_inputs(2, 1)
    assert model.predict(healthy).shape == (2,)
    with pytest.raises(ModelFault, match="non-finite"):
        model.predict(faulty)


# ---- the policy ------------------------------------------------------------------------------
def test_the_policy_never_allows_a_model_fault_and_names_it():
    """Every shipped policy: a model_fault is not certified in the threat model, so the
    loader's invariant keeps it from allow; the shadow policy enforces it too."""
    from riskpipe.app.config import default_policy_path
    from riskpipe.certify.certificate import Certificate
    from riskpipe.policy import load_policy
    from riskpipe.policy.evaluate import evaluate

    cert = Certificate(method="smoothing", norm="l2", radius=0.0, abstained=True, predicted_class=None,
                       mode="decide", sigma=0.25, alpha=0.001, epsilon=0.25, certified=False, reason=MODEL_FAULT,
                       input_dim=4, extra={MODEL_FAULT: "output has non-finite values (NaN) in 1 of 1 rows"})
    policies = sorted((__import__("pathlib").Path(default_policy_path()).parent).glob("*.yaml"))
    assert len(policies) >= 3
    for path in policies:
        pol = load_policy(str(path))
        d = evaluate(pol, cert, upstream_risk=0.0, context=None, event_id="e", prediction=None)
        assert d.decision != "allow", path  # shadow policies too: a broken model is enforced even there
        assert MODEL_FAULT in d.reasons and not d.certified_in_threat, path
        assert "model fault" in cert.scope


# ---- through the stage -------------------------------------------------------------------------
def _events(name: str, healthy: np.ndarray, faulty: np.ndarray) -> list[dict]:
    from riskpipe.stream.events import make_event

    evs = [make_event(f"ok-{i}", name, x, upstream_risk=0.0) for i, x in enumerate(healthy)]
    evs += [make_event(f"bad-{i}", name, x, upstream_risk=0.0) for i, x in enumerate(faulty)]
    return evs


def _samples(metrics) -> dict:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect() for s in m.samples}


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "few_rows", "onnx-nan"])
def test_stage_never_allows_a_model_fault_and_counts_it(tmp_path, kind):
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from riskpipe.metrics import StageMetrics

    if kind.startswith("onnx"):
        pytest.importorskip("onnx")
        spec = faulty_onnx_model(tmp_path, kind.split("-", 1)[1])
    else:
        spec = faulty_model(tmp_path, kind)
    healthy, faulty = fault_inputs(6, 4)
    config = load_config(None, models={"faulty": spec}, policy=fault_policy(tmp_path))
    config = config.model_copy(update={"certify_batch_size": 256})
    metrics = StageMetrics()
    res = run_offline(_events("faulty", healthy, faulty), tmp_path / "out", config, metrics=metrics)
    audit = {r["id"]: r for r in res.read("audit")}
    assert len(audit) == 10 and res.stats.decided == 10 and not res.stats.dlq
    faults = [r for r in audit.values() if r["certificate"]["reason"] == MODEL_FAULT]
    for i in range(4):
        r = audit[f"bad-{i}"]
        assert r["certificate"]["reason"] == MODEL_FAULT and r["certificate"]["abstained"]
        assert r["decision"] != "allow" and MODEL_FAULT in r["reasons"]
        assert r["review"]["routed"]
    assert all(r["decision"] != "allow" for r in faults)
    if kind != "few_rows":  # per-row faults: healthy inputs are decided as usual, and allowed
        assert len(faults) == 4
        assert all(audit[f"ok-{i}"]["decision"] == "allow" for i in range(6))
    assert res.stats.model_faults == len(faults)
    assert _samples(metrics)[("riskpipe_model_faults_total", (("model", "faulty"),))] == len(faults)
    public = {d["id"]: d["decision"] for d in res.read("decisions")}
    assert all(public[f"bad-{i}"] != "allow" for i in range(4))


def _run_cli(tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_cli_run_decides_model_faults_as_review(tmp_path):
    healthy, faulty = fault_inputs(3, 2)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in _events("f", healthy, faulty)))
    r = _run_cli(tmp_path, "run", "--model", f"f={faulty_model(tmp_path, 'nan')}", "--policy", fault_policy(tmp_path),
                 "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
                 "--ledger", str(tmp_path / "ledger.db"), "--certify-batch-size", "256", "--no-metrics-server")
    assert r.returncode == 0, r.stderr
    assert "decided 5 events" in r.stderr and "2 of them model faults" in r.stderr
    assert "Traceback" not in r.stderr
    decided = {d["id"]: d["decision"] for d in map(json.loads, (tmp_path / "out" / "decisions.jsonl").open())}
    assert decided["bad-0"] == decided["bad-1"] == "review"
    assert {decided[f"ok-{i}"] for i in range(3)} == {"allow"}


def test_cli_certify_reports_model_fault_per_input(tmp_path):
    healthy, faulty = fault_inputs(1, 1)
    np.save(tmp_path / "x.npy", np.concatenate([healthy, faulty]))
    r = _run_cli(tmp_path, "certify", "--model", faulty_model(tmp_path, "inf"), "--input", str(tmp_path / "x.npy"),
                 "--n0", "20", "--n", "200", "--alpha", "0.01", "--batch-size", "64")
    assert r.returncode == 0, r.stderr
    ok, bad = map(json.loads, r.stdout.splitlines())
    assert ok["reason"] != MODEL_FAULT and not ok["abstained"]
    assert bad["reason"] == MODEL_FAULT and bad["abstained"] and "inf" in bad["extra"][MODEL_FAULT]


# ---- start-up ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, why", [
    ("nan", "non-finite values (NaN)"),
    ("few_rows", "output shape (1, 3), expected (2, 3)"),
    ("extra_axis", "output shape (2, 3, 1)"),
    ("raises", "the model blew up"),
])
def test_startup_refuses_a_broken_model_in_one_line(tmp_path, kind, why):
    spec = faulty_model(tmp_path, kind, always=True)
    (tmp_path / "events.jsonl").write_text("")
    r = _run_cli(tmp_path, "run", "--model", f"broken={spec}&classes=3", "--policy", fault_policy(tmp_path),
                 "--source", f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
                 "--no-ledger", "--certify-batch-size", "64", "--no-metrics-server")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert lines[0].startswith("riskpipe: error: ") and "models.broken.spec" in lines[0] and spec in lines[0]
    assert why in lines[0] and ("forward pass raised" in lines[0]) == (kind == "raises"), lines[0]


@pytest.mark.parametrize("kind", ["extra_axis", "raises"])
def test_loading_a_broken_model_without_classes_is_one_line(tmp_path, kind):
    """Without ?classes= the loader probes the class count; that probe fails in one line too."""
    np.save(tmp_path / "x.npy", np.zeros((1, 4), np.float32))
    r = _run_cli(tmp_path, "certify", "--model", faulty_model(tmp_path, kind, always=True), "--input",
                 str(tmp_path / "x.npy"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "faulty-" in r.stderr


def test_a_predict_answer_that_is_no_class_is_a_fault_not_the_class_beside_it(tmp_path):
    """A scikit-learn estimator without ``classes_`` (here a regressor, given ``?classes=2``)
    answers values that are no class: 0.37 used to be read as class 1 (where it sorts among
    0 and 1) and certified. Now such a row is a model fault, so the start-up check refuses
    the model in one line; a classifier's own labels still map to their indices."""
    import skops.io as sio
    from sklearn.linear_model import LinearRegression

    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.models.loader import _class_index

    rng = np.random.default_rng(0)
    X = rng.uniform(0, 1, (200, 3)).astype(np.float32)
    y = (rng.uniform(0, 1, 200) < 0.3 + 0.4 * X[:, 0]).astype(np.int64)  # a weak signal: answers near 0.5
    path = tmp_path / "regressor.skops"
    sio.dump(LinearRegression().fit(X, y), path)
    model = load_model(f"{path}?classes=2&range=0,1")
    c = model.classes(torch.from_numpy(X[:8]))
    assert c.bad.all() and "class ids outside [0, 2)" in c.reason
    np.savez(tmp_path / "ref.npz", X=X, y=y)
    with pytest.raises(ConfigError, match=r"models\.reg\.spec: .*class ids outside \[0, 2\)"):
        build_pipeline(load_config(None, models={"reg": f"{path}?classes=2&range=0,1"},
                                   references={"reg": str(tmp_path / "ref.npz")}))
    names = np.array(["fraud", "legit"])
    assert _class_index(names, np.array(["legit", "fraud", "other"])).tolist() == [1, 0, -1]
    assert _class_index(np.array([0, 1]), np.array([1.0, 0.0, 0.37, 2.0])).tolist() == [1, 0, -1, -1]


# ---- a model whose rows see one another -------------------------------------------------------
class _BatchCentred(torch.nn.Module):
    """Class 1 where 4 * (x0 - the batch's mean of x0) + x1 > 0: a per-batch centring in
    ``forward``. ``centred=False`` is its row-independent twin (4 * x0 + x1)."""

    def __init__(self, centred: bool = True):
        super().__init__()
        self.centred = centred

    def forward(self, x):
        x0 = x[:, 0] - x[:, 0].mean() if self.centred else x[:, 0]
        s = 4.0 * x0 + x[:, 1]
        return torch.stack([torch.zeros_like(s), s], dim=1)


def test_a_model_whose_rows_see_one_another_does_not_start(tmp_path):
    """Smoothing packs the noise of several events into one model call. With a model that
    centres each call on its own mean, 4 events whose noise alone abstained (review) were
    all certified and allowed once 4 events far to the side shared their micro-batch (and
    those 4 were allowed too): one event decided another's certificate. Now the start-up
    check gives every probe input alone as well and refuses such a model in one line; its
    row-independent twin starts, and logits that move by float rounding only pass."""
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import ConfigError, load_config
    from riskpipe.models.output import row_dependence

    rng = np.random.default_rng(0)
    X = rng.normal(size=(64, 4)).astype(np.float32)
    np.savez(tmp_path / "ref.npz", X=X, y=(X[:, 1] > 0).astype(np.int64))
    specs = {}
    for centred in (True, False):
        path = tmp_path / f"m-{centred}.pt"
        torch.jit.script(_BatchCentred(centred).eval()).save(str(path))
        specs[centred] = f"{path}?shape=4"
    policy = fault_policy(tmp_path)
    with pytest.raises(ConfigError) as e:
        build_pipeline(load_config(None, models={"m": specs[True]}, references={"m": str(tmp_path / "ref.npz")},
                                   policy=policy))
    msg = str(e.value)
    assert "models.m.spec" in msg and "depends on the other rows of its batch" in msg and "\n" not in msg, msg
    pipe = build_pipeline(load_config(None, models={"m": specs[False]}, references={"m": str(tmp_path / "ref.npz")},
                                      policy=policy))
    assert list(pipe.entries) == ["m"]
    logits = torch.tensor([[1.0, 200.0], [3.0, -4.0]])
    assert row_dependence(logits, [logits[:1] + 1e-4, logits[1:] - 1e-4]) is None  # rounding, not dependence
    half = torch.tensor([[1.0, 2.0], [3.0, -4.0]], dtype=torch.float16)
    assert row_dependence(half, [half[:1], half[1:] + 0.0625]) is None  # float16: a few of its units
    assert "1 of 2 rows" in str(row_dependence(logits, [logits[:1], logits[1:] + 0.5]))
    ids = torch.tensor([0, 1])
    assert row_dependence(ids, [ids[:1], ids[1:]]) is None and row_dependence(ids, [ids[:1], ids[:1]]) is not None
