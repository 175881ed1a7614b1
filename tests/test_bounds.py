"""Interval bound propagation: soundness against sampling and attacks, bisection, errors."""

import numpy as np
import pytest
import torch
from torch import nn

from riskpipe.attacks import pgd
from riskpipe.certify import family
from riskpipe.certify.bounds import IntervalBounds
from riskpipe.models import load_model
from riskpipe.models.base import Model, sha256_state_dict
from riskpipe.models.digits import load_split
from riskpipe.models.layers import worst_margin

pytestmark = pytest.mark.usefixtures("one_thread")


def _bn(n, dim=2):
    bn = nn.BatchNorm2d(n) if dim == 2 else nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(-1.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return bn


def _zoo():
    torch.manual_seed(0)
    return {
        "conv-bn-pool": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _bn(4), nn.ReLU(), nn.AvgPool2d(2),
                                      nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1), nn.ReLU(),
                                      nn.Flatten(), nn.Dropout(0.3), nn.Linear(24, 16), nn.ReLU(),
                                      nn.Linear(16, 5), nn.Identity()),
        "nested-mlp": nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 20), nn.ReLU()), nn.Linear(20, 5)),
        "bn-last": nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, 5), _bn(5, 1)),
    }


def _model(module, spec="test"):
    module.eval()
    return Model(spec=spec, input_shape=(1, 8, 8), num_classes=5, sha256=sha256_state_dict(module), module=module)


def _margins(module, x, y):
    with torch.no_grad():
        z = module(x)
    return z.gather(1, y[:, None]) - z


@pytest.mark.parametrize("name", ["conv-bn-pool", "nested-mlp", "bn-last"])
@pytest.mark.parametrize("eps", [0.03, 0.2])
def test_bounds_contain_sampled_outputs(name, eps):
    model = _model(_zoo()[name])
    ibp = IntervalBounds(model)
    g = torch.Generator().manual_seed(1)
    x = torch.rand((6, 1, 8, 8), generator=g)
    y = model.module(x).argmax(1)
    lower = ibp.margin_bounds(x, eps, y)
    for _ in range(40):  # uniform points and box corners, clipped to the value range
        u = torch.rand(x.shape, generator=g) * 2 - 1
        for noise in (u, u.sign()):
            xs = (x + eps * noise).clamp(0, 1)
            assert (_margins(model.module, xs, y) >= lower - 1e-5).all()


@pytest.mark.parametrize("name", ["conv-bn-pool", "nested-mlp", "bn-last"])
def test_bounds_contain_pgd_points(name):
    model = _model(_zoo()[name])
    ibp = IntervalBounds(model)
    x = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(2))
    y = model.module(x).argmax(1)
    eps = 0.1
    lower = ibp.margin_bounds(x, eps, y)
    for j in range(5):  # attack each margin z_y - z_j separately
        target = torch.full_like(y, j)
        xa = torch.from_numpy(pgd(model.module, x, y, eps, "linf", steps=30, seed=j, targeted=target.numpy(),
                                  loss="margin"))
        assert (xa - x).abs().max() <= eps + 1e-6 and xa.min() >= 0 and xa.max() <= 1
        assert (_margins(model.module, xa, y)[:, j] >= lower[:, j] - 1e-5).all()


@pytest.fixture(scope="module")
def ibp_digits():
    X, y = load_split("test")
    return load_model("demo:digits-ibp"), X[:80], y[:80]


def test_no_pgd_counterexample_inside_certified_radius(ibp_digits):
    model, X, _ = ibp_digits
    certs = IntervalBounds(model).certify_batch(X, list(range(len(X))))
    ok = [i for i, c in enumerate(certs) if not c.abstained]
    assert len(ok) > len(X) // 2  # the IBP-trained demo certifies most inputs
    x = torch.from_numpy(X[ok])
    radius = torch.tensor([certs[i].radius for i in ok])
    y = torch.tensor([certs[i].predicted_class for i in ok])
    assert (y == model.module(x).argmax(1)).all()
    for seed in range(2):
        xa = torch.from_numpy(pgd(model.module, x, y, radius, "linf", steps=30, seed=seed, loss="margin"))
        assert ((xa - x).abs().flatten(1).max(1).values <= radius + 1e-6).all()
        with torch.no_grad():
            assert (model.module(xa).argmax(1) == y).all()


def test_bisection_reports_the_checked_lower_end(ibp_digits):
    model, X, _ = ibp_digits
    ibp = IntervalBounds(model, tolerance=1e-3)
    certs = ibp.certify_batch(X, list(range(len(X))))
    y = torch.tensor([c.extra["model_class"] for c in certs])
    lo = torch.tensor([c.extra["linf_radius"] for c in certs])
    hi = torch.tensor([c.extra["linf_upper"] for c in certs])
    assert ((hi - lo) <= 1e-3 + 1e-9).all() and (lo <= hi).all()
    good = worst_margin(ibp.margin_bounds(X, lo, y), y) > 0
    cert = lo > 0
    assert good[cert].all()  # every reported radius was verified
    fails = worst_margin(ibp.margin_bounds(X, hi, y), y) <= 0
    assert fails[cert & (hi < ibp.eps_max)].all()  # and the bracket's top end was not


def test_certificate_fields_and_l2_ball_in_box(ibp_digits):
    model, X, _ = ibp_digits
    linf = family("ibp")(model, norm="linf").certify_batch(X[:10], list(range(10)))
    l2 = family("ibp")(model, norm="l2").certify_batch(X[:10], list(range(10)))
    for a, b in zip(linf, l2):
        assert (a.method, a.mode, a.norm, b.norm) == ("ibp", "bound", "linf", "l2")
        assert b.radius == a.radius  # an l2 ball of radius r lies in the l_inf box of radius r
        assert a.n_samples == a.extra["passes"] and a.seed is not None
        assert "interval bound propagation" in a.scope


def test_abstains_without_a_positive_margin():
    module = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    with torch.no_grad():
        module[1].weight.zero_()
        module[1].bias.zero_()  # every class ties
    c = IntervalBounds(_model(module)).certify_batch(np.zeros((1, 1, 8, 8), np.float32), [0])[0]
    assert c.abstained and c.radius == 0 and c.predicted_class is None and c.reason == "margin_not_positive"


@pytest.mark.parametrize("module, match", [
    (nn.Sequential(nn.Flatten(), nn.Linear(64, 5), nn.Sigmoid()), r"layer 2 \(Sigmoid\)"),
    (nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(16, 5)), r"layer 0 \(MaxPool2d\)"),
    (nn.Sequential(nn.Flatten(), nn.Sequential(nn.Linear(64, 5), nn.Tanh())), r"layer 1\.1 \(Tanh\)"),
    (nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(), nn.Linear(128, 5)),
     "padding_mode"),
    (nn.Linear(64, 5), "nn.Sequential"),
    # a negative divisor makes the pool's coefficients negative: |A| = A no longer holds, and
    # the box radius went negative (every input certified over the whole range)
    (nn.Sequential(nn.AvgPool2d(2, divisor_override=-1), nn.Flatten(), nn.Linear(16, 5)), "divisor_override=-1"),
])
def test_unsupported_layers_are_named(module, match):
    with pytest.raises(ValueError, match=match):
        IntervalBounds(_model(module))


def test_bad_parameters():
    model = _model(_zoo()["nested-mlp"])
    for kw, field in (({"norm": "l1"}, "norm"), ({"tolerance": 0}, "tolerance"), ({"eps_max": -1}, "eps_max")):
        with pytest.raises(ValueError, match=field):
            IntervalBounds(model, **kw)


class _Centred(nn.Sequential):
    """A common way to write a normalising model: the Sequential's own forward."""

    def forward(self, x):
        return super().forward((x - 0.5) * 40.0)


class _Sharpened(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 100.0


class _Normalize(nn.Identity):
    def forward(self, x):
        return (x - 0.5) * 40.0


class _ScaledConv(nn.Conv2d):
    """Keeps Conv2d.forward, changes the helper it calls."""

    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x * 100.0, weight, bias)


class _PropertyForward(nn.Linear):
    """``forward`` as a property returning a function: Python calls it all the same."""

    @property
    def forward(self):
        return lambda x: nn.functional.linear(x, self.weight, self.bias) * 100.0


class _ClassmethodForward(nn.ReLU):
    @classmethod
    def forward(cls, x):
        return -x


def _replaced(where):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    target = m if where == "sequential" else m[1]
    plain = target.forward
    target.forward = lambda x: plain(x) * 100.0  # on the instance: its class still says Linear.forward
    return m


def _hooked(kind):
    m = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5))
    if kind == "forward":
        m[1].register_forward_hook(lambda mod, i, out: out * 100.0)
    else:
        m[1].register_forward_pre_hook(lambda mod, i: (i[0] * 100.0,))
    return m


def _layers_that_compute_otherwise():
    torch.manual_seed(3)
    train_bn = _zoo()["conv-bn-pool"]
    return {
        "sequential forward": (_Centred(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 5)),
                               r"the Sequential \(_Centred\).*_Centred\.forward"),
        "nested sequential forward": (nn.Sequential(nn.Flatten(), _Centred(nn.Linear(64, 5))),
                                      r"layer 1 \(_Centred\)"),
        "linear forward": (nn.Sequential(nn.Flatten(), _Sharpened(64, 16), nn.ReLU(), nn.Linear(16, 5)),
                           r"layer 1 \(_Sharpened\).*_Sharpened\.forward"),
        "identity forward": (nn.Sequential(_Normalize(), nn.Flatten(), nn.Linear(64, 5)),
                             r"layer 0 \(_Normalize\)"),
        "conv helper": (nn.Sequential(_ScaledConv(1, 2, 3), nn.Flatten(), nn.Linear(72, 5)),
                        r"layer 0 \(_ScaledConv\).*overrides _conv_forward"),
        "property forward": (nn.Sequential(nn.Flatten(), _PropertyForward(64, 16), nn.ReLU(), nn.Linear(16, 5)),
                             r"layer 1 \(_PropertyForward\).*overrides forward"),
        "classmethod forward": (nn.Sequential(nn.Flatten(), nn.Linear(64, 16), _ClassmethodForward(), nn.Linear(16, 5)),
                                r"layer 2 \(_ClassmethodForward\).*overrides forward"),
        "linear forward on the instance": (_replaced("linear"), r"layer 1 \(Linear\).*forward is replaced on the"),
        "sequential forward on the instance": (_replaced("sequential"),
                                               r"the Sequential \(Sequential\).*forward is replaced on the"),
        "forward hook": (_hooked("forward"), r"layer 1 \(Linear\).*forward hook"),
        "forward pre-hook": (_hooked("pre"), r"layer 1 \(Linear\).*forward hook"),
        "batch norm training": (train_bn, r"layer 1 \(BatchNorm2d\).*training mode"),
    }


@pytest.mark.parametrize("case", list(_layers_that_compute_otherwise()))
def test_a_layer_that_computes_otherwise_than_its_type_is_refused(case):
    """A layer that isinstance-matches a supported type but runs another forward (a
    subclass's, a hook's, batch statistics in training mode) would be bounded as the plain
    type: radii of another model. Measured before the check on a 4-feature MLP: each of 32
    certified inputs had a class change inside its IBP and its Lipschitz radius, for a
    subclassed Linear, Identity or Sequential and for a forward hook alike. Both bound
    families refuse such a layer, naming it and why."""
    from riskpipe.certify.lipschitz import GlobalLipschitz

    module, match = _layers_that_compute_otherwise()[case]
    model = _model(module)
    if case == "batch norm training":
        module.train()
    for family_cls in (IntervalBounds, GlobalLipschitz):
        with pytest.raises(ValueError, match=match) as e:
            family_cls(model)
        assert "computes something other than its layers" in str(e.value) and "\n" not in str(e.value)


def test_a_parametrized_weight_is_a_plain_layer():
    """torch's parametrizations subclass the layer (a weight property, __getstate__,
    __deepcopy__) and keep its computation: bounded as the layer with the weight the
    parametrization gives, and no class changes inside a certified l_inf radius."""
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(5)
    module = nn.Sequential(nn.Flatten(), orthogonal(nn.Linear(64, 16)), nn.ReLU(), nn.Linear(16, 5)).eval()
    model = _model(module)
    X = torch.rand(16, 1, 8, 8)
    certs = IntervalBounds(model).certify_batch(X.numpy(), list(range(16)))
    certified = [(x, c) for x, c in zip(X, certs, strict=True) if not c.abstained]
    assert certified
    gen = torch.Generator().manual_seed(6)
    for x, c in certified:
        corners = (x + c.radius * (2 * torch.randint(0, 2, (256, *x.shape), generator=gen) - 1)).clamp(0, 1)
        with torch.no_grad():
            assert (module(corners).argmax(1) == c.predicted_class).all()


def test_a_global_forward_hook_is_refused():
    from torch.nn.modules.module import register_module_forward_hook

    model = _model(_zoo()["nested-mlp"])
    handle = register_module_forward_hook(lambda mod, i, out: out)
    try:
        with pytest.raises(ValueError, match="global module forward hook"):
            IntervalBounds(model)
    finally:
        handle.remove()
    IntervalBounds(model)  # gone with the hook


def test_a_parametrized_layer_keeps_its_forward_and_stays_sound():
    """weight_norm makes a subclass of Linear at run time; its forward is Linear's, so it is
    accepted, and its bounds hold for sampled points."""
    torch.manual_seed(4)
    module = nn.Sequential(nn.Flatten(), nn.utils.parametrizations.weight_norm(nn.Linear(64, 16)), nn.ReLU(),
                           nn.Linear(16, 5))
    assert type(module[1]) is not nn.Linear
    model = _model(module)
    ibp = IntervalBounds(model)
    g = torch.Generator().manual_seed(5)
    x = torch.rand((6, 1, 8, 8), generator=g)
    y = module(x).argmax(1)
    lower = ibp.margin_bounds(x, 0.1, y)
    for _ in range(40):
        xs = (x + 0.1 * (torch.rand(x.shape, generator=g) * 2 - 1)).clamp(0, 1)
        assert (_margins(module, xs, y) >= lower - 1e-5).all()
