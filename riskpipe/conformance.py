"""One conformance suite for every certification family, like scikit-learn's ``check_estimator``.

``check_certifier(factory, model, X)`` runs every check below on the certifier that
``factory(model, **params)`` builds, in every mode it declares, and raises
``CertifierCheckError`` naming the check that failed:

* ``protocol``: the certifier has every member of ``riskpipe.certify.protocol.Certifier``
  and agrees with its family's registry entry (``riskpipe.certify.families``): method
  registered, native norm, modes, and a constructor that takes every section parameter
  the entry declares (and ``norm`` when the family certifies more than one), so the
  factory drops none of them;
* ``invalid_parameters``: each constructor parameter set to a value outside its domain
  is rejected at construction, with the parameter named in the message;
* ``reproducible``: the same inputs and seeds give the same certificates, bit for bit;
* ``batch_independent``: an input's certificate does not depend on its batch-mates
  (classes, counts and flags exactly; radii to 1e-6 relative, see ``_same``);
* ``abstain_radius_zero``: an abstaining certificate has radius 0 and no class;
* ``json_roundtrip``: ``Certificate.from_json(c.to_json()) == c``;
* ``no_attack_inside_radius``: the strongest attack for the model
  (``riskpipe.attacks.attack_model``: PGD with the margin loss for torch models, on the
  smoothed classifier for a smoothing family; the tree search for tree ensembles; a
  decision-based attack otherwise) finds no class change of the classifier the
  certificate speaks about inside any certified radius;
* ``alpha_level`` (families with an ``alpha``): on synthetic linear classifiers whose
  smoothed class probabilities are known exactly, certify mode over-states the radius
  and decide mode certifies a too-small radius in at most about alpha of the trials
  (one-sided binomial allowance at level 1e-4, so a seeded run does not fail by chance
  while a bound without confidence fails by far).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np
import torch
from scipy import stats

from riskpipe.attacks import attack_model
from riskpipe.certify.certificate import Certificate
from riskpipe.certify.families import FAMILIES
from riskpipe.certify.protocol import MEMBERS
from riskpipe.models.base import Model

_COMPARED = ("method", "norm", "mode", "radius", "abstained", "predicted_class", "p_lower", "p_upper", "n_samples",
             "certified", "reason", "sampler")


class CertifierCheckError(AssertionError):
    """A certifier that fails a conformance check; the message starts with the check's name."""


def _fail(check: str, why: str) -> NoReturn:
    raise CertifierCheckError(f"{check}: {why}")


def _key(c: Certificate) -> tuple:
    return tuple(getattr(c, f) for f in _COMPARED)


def _same(a: Certificate, b: Certificate) -> bool:
    """Classes, counts, flags and reasons equal; real numbers equal to 1e-6 relative (a model's
    float forward may round differently at another batch size, e.g. BLAS blocking; every
    family's floating-point slack is at least that)."""
    for u, v in zip(_key(a), _key(b)):
        if isinstance(u, float) and isinstance(v, float):
            if not math.isclose(u, v, rel_tol=1e-6, abs_tol=1e-12):
                return False
        elif u != v:
            return False
    return True


def _run(cert, mode: str, X, seeds, epsilon):
    return cert.run(mode, X, list(seeds), epsilon if mode == "decide" else None)


# ---- the checks ------------------------------------------------------------------------------
def check_protocol(factory: Callable[..., Any], model: Any) -> None:
    cert = factory(model)
    missing = [m for m in MEMBERS if not hasattr(cert, m)]
    if missing:
        _fail("protocol", f"{type(cert).__name__} lacks {', '.join(missing)}")
    entry = FAMILIES.get(cert.method)
    if entry is None:
        _fail("protocol", f"method {cert.method!r} is not in the registry ({', '.join(FAMILIES)})")
    if cert.norm != entry.native_norm:
        _fail("protocol", f"{cert.method}: default norm {cert.norm}, the registry says {entry.native_norm}")
    if tuple(cert.modes) != entry.modes:
        _fail("protocol", f"{cert.method}: modes {tuple(cert.modes)}, the registry says {entry.modes}")
    fields = {f.name for f in dataclasses.fields(cert)}
    takes = [p.name for p in entry.params] + (["norm"] if len(entry.norms) > 1 else [])
    dropped = [name for name in takes if name not in fields]
    if dropped:
        _fail("protocol", f"{cert.method}: the constructor does not take {', '.join(dropped)}, which the "
                          "registry declares (the factory would drop them)")


def check_invalid_parameters(factory: Callable, model) -> None:
    cert = factory(model)
    for f in dataclasses.fields(cert):
        if f.name == "model":
            continue
        value = getattr(cert, f.name)
        if isinstance(value, bool):
            continue
        bad = "no-such-value" if isinstance(value, str) else -1
        try:
            factory(model, **{f.name: bad})
        except (ValueError, TypeError) as e:
            if f.name not in str(e):
                _fail("invalid_parameters", f"{f.name}={bad!r} was rejected without naming the parameter: {e}")
            continue
        _fail("invalid_parameters", f"{f.name}={bad!r} was accepted")


def check_reproducible(factory, model, X, mode, epsilon, seeds) -> list[Certificate]:
    a = _run(factory(model), mode, X, seeds, epsilon)
    b = _run(factory(model), mode, X, seeds, epsilon)
    for i, (u, v) in enumerate(zip(a, b)):
        if not _same(u, v):
            _fail("reproducible", f"{mode} input {i} seed {seeds[i]}: {_key(u)} then {_key(v)}")
    return a


def check_batch_independent(factory, model, X, mode, epsilon, seeds, batch: list[Certificate]) -> None:
    cert = factory(model)
    for i in (0, len(X) - 1):
        alone = _run(cert, mode, X[i:i + 1], seeds[i:i + 1], epsilon)[0]
        if not _same(alone, batch[i]):
            _fail("batch_independent", f"{mode} input {i}: alone {_key(alone)}, in a batch {_key(batch[i])}")


def check_abstain_radius_zero(certs: list[Certificate], mode: str) -> None:
    for i, c in enumerate(certs):
        if c.abstained and (c.radius != 0.0 or c.predicted_class is not None):
            _fail("abstain_radius_zero", f"{mode} input {i}: abstained with radius {c.radius}, "
                                         f"class {c.predicted_class}")


def check_json_roundtrip(certs: list[Certificate], mode: str) -> None:
    for i, c in enumerate(certs):
        back = Certificate.from_json(c.to_json())
        if back != c:
            _fail("json_roundtrip", f"{mode} input {i}: {c} came back as {back}")


def check_no_attack_inside_radius(factory, model, X, certs: list[Certificate], seed: int, steps: int) -> int:
    """Returns how many certified inputs were attacked."""

    cert = factory(model)
    ok = [i for i, c in enumerate(certs) if not c.abstained and c.radius > 0]
    if not ok:
        return 0
    norm = certs[ok[0]].norm
    x = np.asarray(X, dtype=np.float32)[ok]
    y = np.array([certs[i].predicted_class for i in ok])
    radius = np.array([certs[i].radius for i in ok]) * (1 - 1e-6)
    noise = float(cert.noise_sigma or 0.0)  # aim at the classifier the certificates speak about
    x_adv = attack_model(model, x, y, radius, norm, steps=steps, seed=seed, queries=50 * steps, loss="margin",
                         noise_sigma=noise, noise_samples=16)
    x_adv = cert.admissible(x, x_adv)
    got = cert.classify(x_adv, [seed + 1000 + i for i in range(len(x_adv))])
    for j, i in enumerate(ok):
        if got[j] is not None and got[j] != y[j]:
            _fail("no_attack_inside_radius", f"input {i}: certified class {y[j]} at {norm} radius "
                                             f"{certs[i].radius:.6g}, the attack found class {got[j]} inside it")
    return len(ok)


def _max_allowed(alpha: float, trials: int) -> int:
    return int(stats.binom.ppf(1 - 1e-4, trials, alpha))


def threshold_classifier(threshold: float):
    """f(x) = 0 if x[0] < threshold else 1 on inputs of dimension 1 in [0, 1] (a riskpipe Model).

    At x = 0 under N(0, sigma^2) noise, P(f = 0) = Phi(threshold / sigma) and the smoothed
    classifier's radius is ``threshold``; with the threshold half-way between two grid
    points the same holds for noise rounded to that grid."""

    lin = torch.nn.Linear(1, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0], [1.0]]))
        lin.bias.copy_(torch.tensor([threshold, -threshold]))
    return Model(spec=f"synthetic:threshold={threshold}", input_shape=(1,), num_classes=2, sha256="0" * 64,
                 value_range=(0.0, 1.0), module=torch.nn.Sequential(lin).eval())


def _threshold_for(p: float, sigma: float, step: float | None) -> float:
    t = sigma * stats.norm.ppf(p)
    return t if step is None else (math.floor(t / step) + 0.5) * step


def check_alpha_level(factory, modes: tuple[str, ...], trials: int) -> dict:
    """Synthetic classifiers with known probabilities: error rates at most about alpha."""
    probe = factory(threshold_classifier(0.5))
    sigma, step = float(probe.sigma), getattr(getattr(probe, "noise", None), "step", None)
    params = {"alpha": 0.05, "n0": 20, "n": 200, "max_samples": 2000, "first_look": 20, "batch_size": 8192}
    allowed = _max_allowed(0.05, trials)
    out = {"trials": trials, "allowed": allowed}
    zeros = np.zeros((trials, 1), np.float32)
    if "certify" in modes:
        t = _threshold_for(0.8, sigma, step)
        certs = factory(threshold_classifier(t), **params).run("certify", zeros, list(range(trials)))
        errors = sum(c.radius > t + 1e-12 for c in certs if not c.abstained)
        if errors > allowed:
            _fail("alpha_level", f"certify over-stated the radius {t:.4g} in {errors} of {trials} trials "
                                 f"(at most {allowed} allowed at alpha 0.05)")
        if sum(not c.abstained for c in certs) < trials // 2:
            _fail("alpha_level", "certify abstained on most trials: the check has no teeth")
        out["certify_errors"] = int(errors)
    if "decide" in modes:
        t = _threshold_for(0.8, sigma, step)
        eps = t + (step if step is not None else 0.02) * 0.5  # just above the true radius
        certs = factory(threshold_classifier(t), **params).run("decide", zeros, list(range(trials)), eps)
        wrong = sum(bool(c.certified) for c in certs)
        if wrong > allowed:
            _fail("alpha_level", f"decide certified radius >= {eps:.4g} (true {t:.4g}) in {wrong} of {trials} "
                                 f"trials (at most {allowed} allowed at alpha 0.05)")
        easy = factory(threshold_classifier(_threshold_for(0.995, sigma, step)), **params)
        ok = easy.run("decide", zeros[:200], list(range(200)), sigma * stats.norm.ppf(0.8))
        if sum(bool(c.certified) for c in ok) < 180:
            _fail("alpha_level", "decide refused an easy certificate: the check has no teeth")
        out["decide_errors"] = int(wrong)
    return out


# ---- the suite -------------------------------------------------------------------------------
def check_certifier(factory: Callable, model, X, *, epsilon: float | None = None, seed: int = 0,
                    attack_steps: int = 20, trials: int = 2000) -> dict:
    """Run every check on ``factory(model, **params)`` over inputs ``X``; raise
    ``CertifierCheckError`` on the first failure, else return what was checked.

    ``epsilon`` is the decide-mode target (default: the median certify-mode radius)."""
    X = np.asarray(X, dtype=np.float32)
    if len(X) < 2:
        raise ValueError("X: the suite needs at least two inputs")
    report: dict = {"checks": []}
    check_protocol(factory, model)
    check_invalid_parameters(factory, model)
    report["checks"] += ["protocol", "invalid_parameters"]
    cert = factory(model)
    seeds = [seed + 17 * i + 1 for i in range(len(X))]
    modes = tuple(cert.modes)
    for mode in modes:
        eps = epsilon
        if mode == "decide" and eps is None:
            radii = [c.radius for c in _run(cert, "certify", X, seeds, None) if c.radius > 0]
            eps = float(np.median(radii)) if radii else 0.1
        certs = check_reproducible(factory, model, X, mode, eps, seeds)
        check_batch_independent(factory, model, X, mode, eps, seeds, certs)
        check_abstain_radius_zero(certs, mode)
        check_json_roundtrip(certs, mode)
        report[mode] = {"inputs": len(X), "abstained": sum(c.abstained for c in certs)}
        if mode == "certify":
            report["attacked"] = check_no_attack_inside_radius(factory, model, X, certs, seed, attack_steps)
    report["checks"] += ["reproducible", "batch_independent", "abstain_radius_zero", "json_roundtrip",
                         "no_attack_inside_radius"]
    if getattr(cert, "alpha", None) is not None:
        report["alpha_level"] = check_alpha_level(factory, modes, trials)
        report["checks"].append("alpha_level")
    return report


__all__ = ["CertifierCheckError", "check_certifier", "threshold_classifier"]
