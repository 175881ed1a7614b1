"""Small seeded models that are NOT the demo: a 3x32x32 TorchScript CNN on synthetic colour
images and a tabular scikit-learn model (skops) on the wine data set, each with labelled
data in the ``.npz`` (X, y) form the CLI reads. Built in seconds, identical on every run."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_SHAPE = (3, 32, 32)
IMAGE_LABELS = ["red-square", "green-bar", "blue-ring"]


@dataclass(frozen=True)
class UserModel:
    spec: str
    data: Path  # .npz with X, y
    labels: list[str]
    feature_names: list[str] | None = None


def synthetic_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three classes of 3x32x32 images in [0, 1]: a red square, a green bar, a blue ring,
    at random positions on a noisy grey background."""
    rng = np.random.default_rng(seed)
    X = np.clip(0.35 + 0.08 * rng.standard_normal((n,) + IMAGE_SHAPE), 0, 1).astype(np.float32)
    y = np.arange(n) % 3
    yy, xx = np.mgrid[:32, :32]
    for i, k in enumerate(y):
        r, c = rng.integers(8, 24, size=2)
        if k == 0:
            mask = (abs(yy - r) < 6) & (abs(xx - c) < 6)
        elif k == 1:
            mask = abs(xx - c) < 3
        else:
            d = np.hypot(yy - r, xx - c)
            mask = (d > 4) & (d < 7.5)
        X[i, :, mask] = 0.1
        X[i, k, mask] = 0.95
    return X, y.astype(np.int64)


class _Cnn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(8, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(16 * 8 * 8, 3))

    def forward(self, x):
        return self.net(x)


def image_model(tmp: Path) -> UserModel:
    """A trained 3x32x32 TorchScript CNN (noise-augmented so smoothing certifies some inputs)."""
    tmp = Path(tmp)
    torch.manual_seed(0)
    X, y = synthetic_images(360, seed=1)
    net = _Cnn()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        for idx in torch.randperm(len(xt), generator=g).split(64):
            xb = xt[idx] + 0.25 * torch.randn(xt[idx].shape, generator=g)
            loss = torch.nn.functional.cross_entropy(net(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    path = tmp / "signs.pt"
    torch.jit.script(net).save(str(path))
    Xt, yt_ = synthetic_images(60, seed=2)
    np.savez(tmp / "signs-test.npz", X=Xt, y=yt_)
    return UserModel(spec=f"{path}?shape=3,32,32", data=tmp / "signs-test.npz", labels=list(IMAGE_LABELS))


def tabular_model(tmp: Path) -> UserModel:
    """A skops LogisticRegression on scikit-learn's wine data (13 features in raw units, 3 classes)."""
    import skops.io as sio
    from sklearn.datasets import load_wine
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    tmp = Path(tmp)
    wine = load_wine()
    X, y = wine.data.astype(np.float32), wine.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:120], order[120:]
    est = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000, random_state=0)).fit(X[train], y[train])
    # as if fitted on a DataFrame (no pandas here): the model carries its feature names
    est[0].feature_names_in_ = np.asarray(wine.feature_names, dtype=object)
    path = tmp / "wine.skops"
    sio.dump(est, path)
    np.savez(tmp / "wine-test.npz", X=X[test], y=y[test])
    return UserModel(spec=str(path), data=tmp / "wine-test.npz", labels=list(wine.target_names),
                     feature_names=list(wine.feature_names))


def stage_ledger(tmp_path, example: str, model: str, n: int = 3, **event_fields):
    """Run the stage offline (``riskpipe run --config examples/EXAMPLE/riskpipe.yaml``) on the
    first ``n`` reference inputs as events ``EXAMPLE-i`` (with ``event_fields``, e.g.
    upstream_risk); returns (ledger, inputs .npy)."""
    import json

    from click.testing import CliRunner

    from riskpipe.cli import cli
    from riskpipe.stream.events import make_event

    X = np.load(f"examples/{example}/reference.npz")["X"][:n].astype(np.float32)
    np.save(tmp_path / "inputs.npy", X)
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(make_event(f"{example}-{i}", model, x, **event_fields))
                                                   + "\n" for i, x in enumerate(X)))
    ledger = tmp_path / "ledger.db"
    r = CliRunner().invoke(cli, ["run", "--config", f"examples/{example}/riskpipe.yaml", "--source",
                                 f"jsonl:{tmp_path / 'events.jsonl'}", "--sink", f"jsonl:{tmp_path / 'out'}",
                                 "--ledger", str(ledger), "--no-metrics-server"])
    assert r.exit_code == 0 and f"decided {n} events" in r.output, r.output
    return ledger, tmp_path / "inputs.npy"



def cheap_pipeline(tmp: Path, name: str, um: UserModel):
    """A Pipeline serving the user's model ``um`` as ``name`` under a cheap smoothing
    policy (few samples), for stage tests that need a non-demo model."""
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from streamkit import policy_with

    policy = policy_with(tmp, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                         "max_samples": 200})
    return build_pipeline(load_config(None, models={name: um.spec}, references={name: str(um.data)}, policy=policy))


def cheap_image_pipeline(tmp: Path):
    """``cheap_pipeline`` around the 3x32x32 TorchScript CNN (``image_model``) as ``cnn``."""
    return cheap_pipeline(tmp, "cnn", image_model(tmp))


# ---- models that break the output contract (issue 19: fail closed) --------------------------
FAULT_FEATURES = 4
FAULT_CLASSES = 3


class _Faulty(torch.nn.Module):
    """Logits 5 * x[1:4] (a clear margin, so healthy inputs certify), broken for every row
    whose first feature is above 2.5 (start-up probes stay below): ``nan``/``inf``/``-inf``
    logits, ``few_rows`` (the batch loses its last row), ``extra_axis`` ((N, C, 1)),
    ``raises``. ``always`` breaks every row."""

    def __init__(self, kind: str, always: bool = False):
        super().__init__()
        self.kind, self.always = kind, always
        w = torch.zeros(FAULT_CLASSES, FAULT_FEATURES)
        w[0, 1], w[1, 2], w[2, 3] = 5.0, 5.0, 5.0
        self.register_buffer("w", w)

    def forward(self, x):
        out = x @ self.w.t()
        hit = torch.ones_like(x[:, 0], dtype=torch.bool) if self.always else x[:, 0] > 2.5
        if self.kind in ("nan", "inf", "-inf"):
            value = float(self.kind)
            return torch.where(hit[:, None], torch.full_like(out, value), out)
        if bool(hit.any()):
            if self.kind == "few_rows":
                return out[:-1]
            if self.kind == "extra_axis":
                return out[:, :, None]
            if self.kind == "raises":
                raise RuntimeError("the model blew up")
        return out


def faulty_model(tmp: Path, kind: str, always: bool = False) -> str:
    """A TorchScript file of ``_Faulty(kind)`` (4 features, 3 classes); returns its spec."""
    path = Path(tmp) / f"faulty-{kind}{'-always' if always else ''}.pt"
    torch.jit.script(_Faulty(kind, always)).save(str(path))
    return f"{path}?shape={FAULT_FEATURES}"


def faulty_onnx_model(tmp: Path, kind: str = "nan") -> str:
    """``_Faulty(kind)`` exported to ONNX (the TorchScript-based exporter, no onnxscript needed)."""
    import warnings

    path = Path(tmp) / f"faulty-{kind}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(_Faulty(kind).eval(), (torch.zeros(2, FAULT_FEATURES),), str(path), dynamo=False,
                          input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return f"{path}?shape={FAULT_FEATURES}"


def fault_policy(tmp: Path) -> str:
    """The default policy with a cheap certifier and no context signal (these models have no reference)."""
    from streamkit import policy_with

    return policy_with(tmp, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                       "max_samples": 400},
                       signals={"certificate_risk": {"function": "exponential", "half_life": 1.0},
                                "upstream_risk": {"default": 0.5}, "context_risk": {"enabled": False}},
                       score={"combiner": "weighted_mean",
                              "weights": {"certificate_risk": 0.5, "upstream_risk": 0.5, "context_risk": 0.0}})


def fault_inputs(healthy: int, faulty: int) -> tuple[np.ndarray, np.ndarray]:
    """(healthy inputs: first feature -3, far from the trigger under any smoothing noise;
    triggering inputs: first feature 5), each with a clear class in features 1..3."""
    rng = np.random.default_rng(7)

    def rows(n, first):
        X = np.zeros((n, FAULT_FEATURES), np.float32)
        X[:, 0] = first
        X[np.arange(n), 1 + rng.integers(0, FAULT_CLASSES, n)] = 1.0
        return X

    return rows(healthy, -3.0), rows(faulty, 5.0)


# ---- a model the machine runs short of memory for (infrastructure, not data) ---------------
# How many of the next forward passes raise torch's out-of-memory error; tests set it once
# the model is loaded (its start-up check runs a forward pass too).
MEMORY_FAULTS = {"left": 0}
POISON_ERRORS = {
    "oom": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "timeout": lambda: TimeoutError("the model's feature store timed out"),
    "oserror": lambda: OSError(5, "Input/output error"),
}


class _ShortOfMemory(torch.nn.Module):
    """Logits 5 * x[1:4]; the next ``MEMORY_FAULTS['left']`` forward passes raise
    ``torch.OutOfMemoryError`` as a GPU short of memory does, and with ``poison`` every
    pass holding a row whose first feature is above 2.5 raises ``POISON_ERRORS[poison]``
    (an input that makes the model fail: the event's fault, whatever the error says)."""

    def __init__(self, poison: str | None = None):
        super().__init__()
        self.poison = poison
        w = torch.zeros(FAULT_CLASSES, FAULT_FEATURES)
        w[0, 1], w[1, 2], w[2, 3] = 5.0, 5.0, 5.0
        self.register_buffer("w", w)

    def forward(self, x):
        if MEMORY_FAULTS["left"] > 0:
            MEMORY_FAULTS["left"] -= 1
            raise POISON_ERRORS["oom"]()
        if self.poison is not None and bool((x[:, 0] > 2.5).any()):
            raise POISON_ERRORS[self.poison]()
        return x @ self.w.t()


def short_of_memory_model() -> torch.nn.Module:
    """The factory of ``_ShortOfMemory`` (spec ``usermodels:short_of_memory_model?shape=4``)."""
    return _ShortOfMemory()


def poisoned_oom_model() -> torch.nn.Module:
    return _ShortOfMemory("oom")


def poisoned_timeout_model() -> torch.nn.Module:
    return _ShortOfMemory("timeout")


def poisoned_oserror_model() -> torch.nn.Module:
    return _ShortOfMemory("oserror")


# ---- a model that never returns on one input (riskpipe.stream.watchdog) --------------------
class _Hangs(torch.nn.Module):
    """Logits 5 * x[1:4]; a forward pass holding a row whose first feature is above 2.5
    never returns (a loop, as a model stuck on one input); start-up probes stay below."""

    def __init__(self):
        super().__init__()
        w = torch.zeros(FAULT_CLASSES, FAULT_FEATURES)
        w[0, 1], w[1, 2], w[2, 3] = 5.0, 5.0, 5.0
        self.register_buffer("w", w)

    def forward(self, x):
        while bool((x[:, 0] > 2.5).any()):
            time.sleep(0.05)
        return x @ self.w.t()


def hanging_model() -> torch.nn.Module:
    """The factory of ``_Hangs`` (spec ``usermodels:hanging_model?shape=4``)."""
    return _Hangs()
