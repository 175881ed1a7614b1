"""Binary models with one output: the shape most fraud and abuse classifiers have (one
logit, or a sigmoid probability). Read as (n, C) scores such a model has one class, and
argmax over one column is class 0 for every input: every input was certified with the
largest radius there is (smoothing counted 2000 of 2000 samples for the top class, IBP
certified the whole value range) and allowed. Now a model of fewer than two classes is
refused at load, naming ``?binary=logit|probability``, which reads the one output as two
class scores by one fixed linear layer (riskpipe.models.layers.BinaryScores), so every
certifier family keeps its guarantee (the conformance suite runs on it)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.conformance import check_certifier
from riskpipe.models import Model, ModelError, load_model

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = 4
MODULE = __name__


def _data(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Points in [0, 1]^4 on the 8-bit grid; class 1 where x0 + x1 > 1 (away from the line)."""
    rng = np.random.default_rng(seed)
    X = (np.round(rng.uniform(0, 1, (4 * n, FEATURES)) * 255) / 255).astype(np.float32)
    s = X[:, 0] + X[:, 1]
    keep = np.abs(s - 1) > 0.25
    return X[keep][:n], (s[keep][:n] > 1).astype(np.int64)


def _trained() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(FEATURES, 8), nn.ReLU(), nn.Linear(8, 1))
    X, y = _data(400, 1)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y).float()[:, None]
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(200):
        loss = nn.functional.binary_cross_entropy_with_logits(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


_NET = _trained()


def one_logit() -> nn.Module:
    """The factory ``tests...:one_logit``: a Sequential whose last layer is Linear(8, 1)."""
    return _NET


class _Probability(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _NET

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(x)).squeeze(1)  # shape (n,), as many binary models return


def one_probability() -> nn.Module:
    return _Probability()


class _Centred(nn.Sequential):
    """A Sequential that normalises in its own forward: the binary head must keep it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward((x - 0.5) * 3.0)


def centred_logit() -> nn.Module:
    return _Centred(*_NET)


def _spec(factory: str, binary: str | None = None) -> str:
    return f"{MODULE}:{factory}?shape={FEATURES}&range=0,1" + (f"&binary={binary}" if binary else "")


def _onnx(tmp_path, module: nn.Module = _NET, name: str = "binary") -> str:
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.zeros(2, FEATURES),), str(path), dynamo=False, input_names=["x"],
                          output_names=["score"], dynamic_axes={"x": {0: "n"}, "score": {0: "n"}})
    return f"{path}?shape={FEATURES}&range=0,1"


def test_a_model_with_one_output_is_refused_naming_the_option(tmp_path):
    """Without ``?binary=`` a one-output model does not load (factory, TorchScript, ONNX),
    and no Model of fewer than two classes can be made."""
    ts = tmp_path / "binary.pt"
    torch.jit.script(_NET).save(str(ts))
    for spec in (_spec("one_logit"), _spec("one_probability"), f"{ts}?shape={FEATURES}", _onnx(tmp_path),
                 _onnx(tmp_path, _Probability(), "probability")):
        with pytest.raises(ModelError, match=r"\?binary=logit .*\?binary=probability"):
            load_model(spec)
    for classes in (1, 0, -2, True):
        with pytest.raises(ModelError, match="at least 2 classes"):
            Model(spec="test:one", input_shape=(FEATURES,), num_classes=classes, sha256="0" * 64, module=_NET)
    with pytest.raises(ModelError, match="binary='sigmoid': must be one of logit, probability"):
        load_model(_spec("one_logit", "sigmoid"))


def test_binary_reads_the_sign_of_the_logit_and_half_of_the_probability(tmp_path):
    """Class 1 exactly where the logit is > 0 (the probability > 0.5): the same classes
    from the logit, the probability, TorchScript and ONNX, and both classes occur."""
    X, y = _data(200, 2)
    with torch.no_grad():
        want = (_NET(torch.from_numpy(X))[:, 0] > 0).numpy().astype(np.int64)
    assert 0 < want.sum() < len(want) and np.mean(want == y) > 0.9
    ts = tmp_path / "binary.pt"
    torch.jit.script(_NET).save(str(ts))
    specs = [_spec("one_logit", "logit"), _spec("one_probability", "probability"),
             f"{ts}?shape={FEATURES}&binary=logit", _onnx(tmp_path) + "&binary=logit",
             _onnx(tmp_path, _Probability(), "probability") + "&binary=probability"]  # an (n,) output
    for spec in specs:
        model = load_model(spec)
        assert model.num_classes == 2 and model.meta["binary"] in ("logit", "probability")
        np.testing.assert_array_equal(model.predict(X), want, err_msg=spec)


def test_binary_is_refused_where_the_model_gives_a_score_per_class(tmp_path):
    """``?binary=`` on a model with two or more outputs is a mistake, not a no-op."""
    torch.manual_seed(0)
    two = nn.Sequential(nn.Linear(FEATURES, 2))
    ts = tmp_path / "two.pt"
    torch.jit.script(two).save(str(ts))
    with pytest.raises(ModelError, match=r"binary=logit: the model must give one score per input"):
        load_model(f"{ts}?shape={FEATURES}&binary=logit")


@pytest.mark.parametrize("name", ["ibp", "lipschitz", "smoothing"])
def test_every_family_conforms_on_a_binary_model(name):
    """The conformance suite (no attack inside any certified radius, reproducible, batch
    independent, ...) on the one-logit model read with ``?binary=logit``; both classes are
    certified somewhere."""
    from riskpipe.certify import family

    model = load_model(_spec("one_logit", "logit"))
    X, _ = _data(8, 3)
    kw = {"sigma": 0.25, "n0": 32, "n": 256, "max_samples": 1024, "batch_size": 1024, "sampler": "sound"} \
        if name == "smoothing" else {}
    report = check_certifier(lambda m, **k: family(name)(m, **{**kw, **k}), model, X, trials=300)
    assert report["attacked"] >= 1
    certs = family(name)(model, **kw).certify_batch(X, list(range(len(X))))
    assert {c.predicted_class for c in certs if not c.abstained} == {0, 1}


def test_the_stage_decides_a_binary_model_by_its_output(tmp_path):
    """Through the stage: each event's certified class is the one its logit says, so inputs
    of both classes are decided on their own certificates, not one made-up class."""
    from riskpipe.app.config import load_config
    from riskpipe.app.offline import run_offline
    from riskpipe.stream.events import make_event

    X, _ = _data(16, 4)
    ref = tmp_path / "ref.npz"
    Xr, yr = _data(300, 5)
    np.savez(ref, X=Xr, y=yr)
    config = load_config(None, models={"fraud": _spec("one_logit", "logit")}, references={"fraud": str(ref)})
    res = run_offline([make_event(f"e{i}", "fraud", x, upstream_risk=0.0) for i, x in enumerate(X)], tmp_path / "out",
                      config)
    recs = {r["id"]: r for r in res.read("audit")}
    assert len(recs) == len(X) and not res.read("dlq")
    with torch.no_grad():
        want = (_NET(torch.from_numpy(X))[:, 0] > 0).numpy()
    classes = [recs[f"e{i}"]["certificate"]["predicted_class"] for i in range(len(X))]
    assert {c for c in classes if c is not None} == {0, 1}
    assert all(c is None or c == int(w) for c, w in zip(classes, want))


class _Ids(nn.Module):
    """Class ids of the one-logit model, as integers or (a mistake) as floats."""

    def __init__(self, as_float: bool) -> None:
        super().__init__()
        self.net, self.as_float = _NET, as_float

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids = (self.net(x)[:, 0] > 0).long()
        return ids.float() if self.as_float else ids


def int_ids() -> nn.Module:
    return _Ids(False)


def float_ids() -> nn.Module:
    return _Ids(True)


def test_a_model_that_returns_class_ids_is_told_what_it_needs():
    """Integer ids cannot give the class count: the load asks for ``?classes=N`` and then
    works; float ids look like one score per input, so that refusal names both readings."""
    with pytest.raises(ModelError, match=r"returns class ids, .*add \?classes=N"):
        load_model(_spec("int_ids"))
    X, _ = _data(50, 6)
    with torch.no_grad():
        want = (_NET(torch.from_numpy(X))[:, 0] > 0).numpy().astype(np.int64)
    np.testing.assert_array_equal(load_model(_spec("int_ids") + "&classes=2").predict(X), want)
    with pytest.raises(ModelError, match=r"\?binary=logit .*returns them as integers, with \?classes=N"):
        load_model(_spec("float_ids"))


def test_the_binary_head_keeps_a_sequential_subclass_whole():
    """``?binary=`` rebuilt a Sequential as Sequential(*its layers, head), dropping a
    subclass's own forward: another model was certified and decided (it disagreed with
    the user's on 122 of 200 inputs, and Lipschitz certified classes the user's model
    does not give). Now the head follows the module whole: the classes are the user's,
    and the bound families refuse it as they refuse the subclass without the head."""
    from riskpipe.certify.bounds import IntervalBounds
    from riskpipe.certify.lipschitz import GlobalLipschitz

    X, _ = _data(200, 4)
    with torch.no_grad():
        want = (centred_logit()(torch.from_numpy(X))[:, 0] > 0).numpy().astype(np.int64)
        plain = (_NET(torch.from_numpy(X))[:, 0] > 0).numpy().astype(np.int64)
    assert (want != plain).sum() > 10  # the subclass's forward matters on these inputs
    model = load_model(_spec("centred_logit", "logit"))
    np.testing.assert_array_equal(model.predict(X), want)
    for family in (IntervalBounds, GlobalLipschitz):
        with pytest.raises(ValueError, match=r"_Centred overrides forward"):
            family(model)
