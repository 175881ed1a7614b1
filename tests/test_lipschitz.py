"""Global Lipschitz certificates: constants bound real gradients, radii survive attacks."""

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.attacks import pgd
from riskpipe.certify import family
from riskpipe.certify import lipschitz as lipschitz_module
from riskpipe.certify.lipschitz import GlobalLipschitz, lipschitz_constants, spectral_bound
from riskpipe.models import load_model
from riskpipe.models.base import Model, sha256_state_dict
from riskpipe.models.digits import load_split

pytestmark = pytest.mark.usefixtures("one_thread")


def spectral_norm(apply: Callable, in_shape: tuple[int, ...], n_iter: int = 500,
                  tol: float = 1e-7,
                  seed: int = 0) -> tuple[float, int]:
    """Power-iteration estimate of ||A||_2 for the linear map ``apply`` (float64), and the
    iterations used: what the certifier used before its bounds. The estimate ||A v|| with
    ||v|| = 1 never exceeds the true norm, so it is no bound (the tests show how far under)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn((1,) + tuple(in_shape), generator=g, dtype=torch.float64)
    v /= v.norm()
    sigma, prev, it = 0.0, -1.0, 0
    for it in range(1, n_iter + 1):
        v.requires_grad_(True)
        u = apply(v)
        (w,) = torch.autograd.grad(u, v, grad_outputs=u.detach())  # A^T A v
        sigma = float(u.detach().norm())
        nw = w.norm()
        if nw == 0:
            return 0.0, it
        v = (w / nw).detach()
        if abs(sigma - prev) <= tol * sigma:
            break
        prev = sigma
    with torch.no_grad():
        sigma = max(sigma, float(apply(v).norm()))
    return sigma, it


def _model(module):
    module.eval()
    return Model(spec="test", input_shape=(1, 8, 8), num_classes=5, sha256=sha256_state_dict(module), module=module)


def _cnn():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_var.uniform_(0.3, 2.0)
        bn.weight.uniform_(-2, 2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), bn, nn.ReLU(), nn.Conv2d(4, 6, 3, stride=2, padding=2,
                         dilation=2), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(24, 12), nn.ReLU(),
                         nn.Linear(12, 5))


@pytest.mark.parametrize("op, shape", [
    (nn.Conv2d(3, 5, 3, stride=2, padding=1), (3, 9, 9)),
    (nn.Conv2d(2, 4, 4, stride=1, padding=2, dilation=2), (2, 7, 7)),
    (nn.Linear(30, 17), (30,)),
    (nn.AvgPool2d(3, stride=2, padding=1), (2, 8, 8)),
])
def test_power_iteration_matches_the_exact_operator_norm(op, shape):
    torch.manual_seed(3)
    op = op.double()

    def apply(x):
        if isinstance(op, nn.Conv2d):
            return torch.nn.functional.conv2d(x, op.weight, None, op.stride, op.padding, op.dilation)
        if isinstance(op, nn.Linear):
            return torch.nn.functional.linear(x, op.weight)
        return op(x)

    est, _ = spectral_norm(apply, shape, n_iter=2000, tol=1e-10)
    jac = torch.autograd.functional.jacobian(apply, torch.zeros((1,) + shape, dtype=torch.float64))
    exact = torch.linalg.matrix_norm(jac.reshape(-1, int(np.prod(shape))), ord=2).item()
    assert est <= exact * (1 + 1e-9)  # power iteration approaches from below ...
    assert est * 1.01 >= exact  # ... and the default safety margin covers the gap


@pytest.mark.parametrize("exact", [True, False], ids=["gram", "hoelder"])
@pytest.mark.parametrize("group, shape", [
    ([nn.Conv2d(3, 5, 3, stride=2, padding=1)], (3, 9, 9)),
    ([nn.Conv2d(2, 4, 4, stride=1, padding=2, dilation=2), nn.AvgPool2d(2)], (2, 7, 7)),
    ([nn.Flatten(), nn.Linear(30, 17)], (30,)),
    ([nn.Conv2d(1, 3, 3, padding=1, groups=1), nn.Flatten(), nn.Linear(3 * 36, 9)], (1, 6, 6)),
])
def test_the_group_norm_is_a_bound_never_below_the_exact_norm(group, shape, exact, monkeypatch):
    """The Gram route (inputs up to EXACT_MAX) gives the exact norm; the Hoelder route
    (beyond) gives an upper bound. Neither is ever below the exact SVD."""
    torch.manual_seed(3)
    group = [layer.double().eval() for layer in group]
    if not exact:
        monkeypatch.setattr(lipschitz_module, "EXACT_MAX", 1)
    bound, _ = spectral_bound(group, shape)
    apply = lipschitz_module._linear_map(group)
    jac = torch.autograd.functional.jacobian(apply, torch.zeros((1,) + shape, dtype=torch.float64))
    exact_norm = torch.linalg.matrix_norm(jac.reshape(-1, int(np.prod(shape))), ord=2).item()
    assert bound >= exact_norm * (1 - 1e-12)
    if exact:
        assert bound <= exact_norm * (1 + 1e-6)


def test_a_start_vector_near_another_singular_vector_cannot_shrink_the_constant():
    """W1 = I - 0.8 v v^T with v the power iteration's own (seed 0) start vector: the
    estimate stopped at 0.2 for a norm of 1, and a point at l2 distance 1.5 changed the
    class inside a certified radius of 4.95. The constant is now a bound: radius 0.99."""
    d = 4
    v = torch.randn((1, d), generator=torch.Generator().manual_seed(0), dtype=torch.float64).reshape(d)
    v = v / v.norm()
    W1 = torch.eye(d, dtype=torch.float64) - 0.8 * torch.outer(v, v)
    u = torch.linalg.svd(torch.eye(d, dtype=torch.float64) - torch.outer(v, v))[0][:, 0]  # W1 u = u, u _|_ v
    net = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2)).eval()
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[0].bias.fill_(10.0)  # the ReLU stays active near 0
        net[2].weight.copy_(torch.stack([u, -u]) / 2)
        net[2].bias.copy_(torch.tensor([0.5, -0.5], dtype=torch.float64) - net[2].weight @ net[0].bias)
    model = Model(spec="aligned", input_shape=(d,), num_classes=2, sha256=sha256_state_dict(net), module=net)
    assert spectral_norm(lambda x: torch.nn.functional.linear(x, W1), (d,))[0] < 0.25  # the estimate's failure
    cert = GlobalLipschitz(model).certify_batch(np.zeros((1, d), np.float32), [0])[0]
    assert cert.predicted_class == 0 and 0.9 < cert.radius < 1.0
    x_adv = (-1.5 * u).float().numpy()[None]
    assert model.predict(x_adv)[0] == 1 and np.linalg.norm(x_adv) > cert.radius


def _max_margin_gradients(module, x, K):
    x = x.clone().requires_grad_(True)
    z = module(x)
    grads = torch.zeros(len(x), K, K)
    for i in range(K):
        for j in range(K):
            if i != j:
                (g,) = torch.autograd.grad((z[:, i] - z[:, j]).sum(), x, retain_graph=True)
                grads[:, i, j] = g.flatten(1).norm(dim=1)
    return grads.max(dim=0).values


@pytest.mark.parametrize("which", ["cnn", "demo"])
def test_constant_bounds_every_sampled_gradient(which):
    model = _model(_cnn()) if which == "cnn" else load_model("demo:digits-lipschitz")
    K = model.num_classes
    consts = lipschitz_constants(model)
    g = torch.Generator().manual_seed(0)
    X = torch.from_numpy(load_split("test")[0][:50]) if which == "demo" else torch.rand((200, 1, 8, 8), generator=g)
    seen = _max_margin_gradients(model.module, X, K)
    assert (torch.from_numpy(consts.pairwise).float() >= seen).all()
    assert consts.pairwise.diagonal().max() == 0


@pytest.fixture(scope="module")
def lip_digits():
    X, _ = load_split("test")
    return load_model("demo:digits-lipschitz"), X[:80]


def test_no_pgd_counterexample_inside_certified_radius(lip_digits):
    model, X = lip_digits
    certs = GlobalLipschitz(model).certify_batch(X, list(range(len(X))))
    ok = [i for i, c in enumerate(certs) if not c.abstained]
    assert len(ok) > len(X) // 2
    x = torch.from_numpy(X[ok])
    radius = torch.tensor([certs[i].radius for i in ok])
    y = torch.tensor([certs[i].predicted_class for i in ok])
    for seed in range(2):
        xa = torch.from_numpy(pgd(model.module, x, y, radius, "l2", steps=30, seed=seed, loss="margin"))
        assert ((xa - x).flatten(1).norm(dim=1) <= radius * (1 + 1e-5)).all()
        with torch.no_grad():
            assert (model.module(xa).argmax(1) == y).all()
    # and just beyond a much larger radius the attack does find class changes: the test has teeth
    xa = torch.from_numpy(pgd(model.module, x, y, radius * 6, "l2", steps=30, seed=0, loss="margin"))
    with torch.no_grad():
        assert (model.module(xa).argmax(1) != y).any()


def test_gloro_abstain_below_epsilon(lip_digits):
    model, X = lip_digits
    free = family("lipschitz")(model, epsilon=0.0).certify_batch(X, list(range(len(X))))
    radii = np.array([c.radius for c in free])
    eps = float(np.median(radii[radii > 0]))
    gated = family("lipschitz")(model, epsilon=eps).certify_batch(X, list(range(len(X))))
    for a, b in zip(free, gated):
        assert (b.method, b.mode, b.norm, b.n_samples) == ("lipschitz", "bound", "l2", 1)
        if a.radius < eps:
            assert b.abstained and b.radius == 0 and b.predicted_class is None and b.reason in (
                "radius_below_epsilon", "margin_not_positive")
        else:
            assert not b.abstained and b.radius == a.radius and b.predicted_class == a.predicted_class
    assert any(c.abstained for c in gated) and not all(c.abstained for c in gated)


def test_constant_is_cached_per_model_version(lip_digits):
    model, _ = lip_digits
    assert lipschitz_constants(model) is lipschitz_constants(model)
    other = _model(_cnn())
    assert lipschitz_constants(other) is not lipschitz_constants(model)


def test_a_scaled_model_never_gets_the_constant_of_the_model_it_wraps():
    """g(z) = f(s * z) (riskpipe.models.scaled) keeps f's sha256, which names the model
    file; its constant is max(s) times f's. Certified after f in one process it used to
    get f's cached constant: a radius 10 times too large, an unsound certificate. Either
    order now gives each model the radius it gets alone; the same layers with other
    settings (a stride, a slope) are other layers too."""
    from riskpipe.certify import lipschitz
    from riskpipe.models.scaled import scaled_model

    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    raw = Model(spec="user:mlp", input_shape=(4,), num_classes=3, sha256=sha256_state_dict(seq), module=seq)
    scaled = scaled_model(raw, np.full(4, 10.0), "test: s = 10")
    assert scaled.sha256 == raw.sha256
    z = np.array([[0.01, 0.02, -0.01, 0.0]], np.float32)
    inputs = {"raw": z * 10, "scaled": z}  # the same raw point
    models = {"raw": raw, "scaled": scaled}

    def radii(order):
        lipschitz._CACHE.clear()
        return {k: GlobalLipschitz(models[k]).certify_batch(inputs[k], [0])[0].radius for k in order}

    alone = {k: radii([k])[k] for k in models}
    assert alone["raw"] == pytest.approx(10 * alone["scaled"], rel=1e-6) and alone["scaled"] > 0
    assert radii(["raw", "scaled"]) == alone and radii(["scaled", "raw"]) == alone

    def conv(stride: int) -> Model:
        torch.manual_seed(1)  # the same weights: only the stride differs
        return _model(nn.Sequential(nn.Conv2d(1, 2, 3, stride=stride), nn.ReLU()))

    one, two = conv(1), conv(2)
    assert one.sha256 == two.sha256
    assert lipschitz.layers_fingerprint(one) != lipschitz.layers_fingerprint(two)


@pytest.mark.parametrize("module, match", [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Softmax(dim=1)), r"layer 2 \(Softmax\)"),
    (nn.Linear(64, 5), "nn.Sequential"),
])
def test_unsupported_models_are_named(module, match):
    with pytest.raises(ValueError, match=match):
        GlobalLipschitz(_model(module))


def test_bad_parameters():
    model = _model(_cnn())
    for kw, field in (({"epsilon": -1}, "epsilon"), ({"safety": -0.1}, "safety")):
        with pytest.raises(ValueError, match=field):
            GlobalLipschitz(model, **kw)
    no_module = Model(spec="x.onnx", input_shape=(1, 8, 8), num_classes=5, sha256="0")
    with pytest.raises(ValueError, match="torch model"):
        GlobalLipschitz(no_module)
