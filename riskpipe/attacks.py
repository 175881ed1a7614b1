"""Attacks on the model under test, used to evaluate a policy before it is deployed.

* ``pgd``: projected gradient descent (Madry et al. 2018) in l_inf or l2, untargeted
  or targeted, on the cross-entropy or the Carlini–Wagner margin; the one PGD of the
  code base (tests, ``compare``, ``evaluate``). The budget ``epsilon`` (one, or one
  per input) is in the attack norm. Every iterate is projected onto the
  norm ball around the clean input and clipped to the model's value range; clipping a
  point whose centre lies in the box moves every coordinate of the perturbation
  towards zero, so the clipped point stays inside the ball.
* ``norm_shift``: the attacker works in a different norm than the certificate. By
  Theorem 2 an l2 radius r covers an l_inf attacker only out to r / sqrt(d), so an
  l2 certificate that "looks" larger than the l_inf budget may still say nothing.
* ``GuidedAttacker`` / ``PublicAttacker``: which inputs an attacker with a limited
  number of attempts goes after. The guided one reads the trusted audit topic
  (certified radii) and skips inputs the certificate puts out of its reach; the
  public one reads only the public decisions topic. What each one may see is spelled
  out by the view types ``TrustedView`` and ``PublicView``: a ``PublicView`` is built
  from exactly ``PUBLIC_FIELDS`` and cannot hold a radius.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

from riskpipe import blackbox, tree_attack
from riskpipe.certify.norms import check_norm, conversion_factor
from riskpipe.models.base import range_tensors

ATTACK_NORMS = ("linf", "l2")
LOSSES = ("ce", "margin")
PUBLIC_FIELDS = ("id", "ts", "decision", "policy_version")


# ---------------------------------------------------------------------------- PGD


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def _check_attack_args(epsilon, norm: str, steps: int, value_range, loss: str) -> tuple[str, np.ndarray]:
    norm = check_norm(norm)
    if norm not in ATTACK_NORMS:
        raise ValueError(f"norm: attacks run in {' or '.join(ATTACK_NORMS)}, got {norm!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.ndarray, torch.Tensor, list, tuple)):
        raise ValueError(f"epsilon: must be a finite number >= 0 (or one per input), got {epsilon!r}")
    eps = np.asarray(epsilon.cpu() if isinstance(epsilon, torch.Tensor) else epsilon, dtype=np.float64)
    if eps.ndim > 1 or not (np.all(np.isfinite(eps)) and np.all(eps >= 0)):
        raise ValueError(f"epsilon: must be a finite number >= 0 (or one per input), got {epsilon!r}")
    if int(steps) < 1:
        raise ValueError(f"steps: must be >= 1, got {steps!r}")
    if value_range is not None:  # None: nothing declared, unbounded
        lo, hi = (np.asarray(v) for v in value_range)
        if not (lo < hi).all():
            raise ValueError(f"value_range: must be (lo, hi) with lo < hi, got {value_range!r}")
    if loss not in LOSSES:
        raise ValueError(f"loss: {loss!r} is not one of {', '.join(LOSSES)}")
    return norm, eps


def _per_sample_l2(t: torch.Tensor) -> torch.Tensor:
    """l2 norm of each sample, shaped to broadcast against ``t``."""
    n = t.flatten(1).norm(dim=1).clamp_min(1e-12)
    return n.view(-1, *([1] * (t.ndim - 1)))


def _project(delta: torch.Tensor, eps: torch.Tensor, norm: str) -> torch.Tensor:
    """Onto the ball of radius ``eps`` (shaped (B, 1, ...)) around 0."""
    if norm == "linf":
        return torch.maximum(torch.minimum(delta, eps), -eps)
    return delta * (eps / _per_sample_l2(delta)).clamp(max=1.0)


def _random_start(shape, eps: torch.Tensor, norm: str, gen: torch.Generator) -> torch.Tensor:
    """Uniform in the l_inf cube, or uniform in the l2 ball (direction times radius u^(1/d))."""
    if norm == "linf":
        return (torch.rand(shape, generator=gen) * 2 - 1) * eps
    d = int(np.prod(shape[1:]))
    direction = torch.randn(shape, generator=gen)
    direction = direction / _per_sample_l2(direction)
    radius = torch.rand((shape[0],), generator=gen) ** (1.0 / d)
    return direction * radius.view(-1, *([1] * (len(shape) - 1))) * eps


def _ascent_step(grad: torch.Tensor, step_size: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return step_size * grad.sign()
    return step_size * grad / _per_sample_l2(grad)


def _log_probs(module: nn.Module, x: torch.Tensor, noise_sigma: float, samples: int, gen: torch.Generator):
    """Log class probabilities: of the base model, or averaged over Gaussian noise."""
    if noise_sigma <= 0:
        return torch.log_softmax(module(x), dim=1)
    noise = torch.randn((samples, *x.shape), generator=gen).to(x.device) * noise_sigma
    probs = torch.softmax(module((x.unsqueeze(0) + noise).flatten(0, 1)), dim=1)
    probs = probs.view(samples, x.shape[0], -1).mean(dim=0)
    return torch.log(probs.clamp_min(1e-12))


def _objective(scores: torch.Tensor, label: torch.Tensor, targeted: bool, loss: str) -> torch.Tensor:
    """Per input, what the attacker maximises. ``ce``: cross-entropy of the true label (minus
    that of the target, for a targeted attack). ``margin`` (Carlini & Wagner): best other score minus the label's score,
    or the target's score minus the true class's (``label`` is then (true, target))."""
    if loss == "ce":
        nll = nn.functional.nll_loss(scores, label[:, int(targeted)], reduction="none")
        return -nll if targeted else nll
    zy = scores.gather(1, label[:, :1]).squeeze(1)
    if targeted:
        return scores.gather(1, label[:, 1:]).squeeze(1) - zy
    return scores.scatter(1, label[:, :1], -float("inf")).max(dim=1).values - zy


def pgd(
    module: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    epsilon,
    norm: str = "linf",
    steps: int = 40,
    step_size: float | None = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    seed: int = 0,
    random_start: bool = True,
    targeted: np.ndarray | None = None,
    batch_size: int = 512,
    noise_sigma: float = 0.0,
    noise_samples: int = 8,
    loss: str = "ce",
) -> np.ndarray:
    """Adversarial examples for ``module`` (float32 logits model), one per row of ``X``.

    The one PGD implementation (Madry et al. 2018): tests, ``compare`` and ``evaluate``
    use it. ``epsilon`` is one budget or one per input (e.g. each input's certified
    radius). Untargeted: maximises ``loss`` for the true label ``y``; targeted
    (``targeted`` = class ids, one per row): drives the input towards the target.
    ``loss`` is ``ce`` (cross-entropy) or ``margin`` (Carlini–Wagner logit margin, the
    stronger choice against certificates). Returns float32 with the shape of ``X``,
    within its ``epsilon`` of ``X`` in ``norm`` and inside ``value_range``. The iterate
    kept per input is the last one that reached the goal (label changed / target hit),
    else the one with the highest objective. Runs on the module's device; the random
    start is drawn on the CPU from ``seed``, so the result does not depend on the
    device's generator.

    ``noise_sigma > 0`` attacks the Gaussian-smoothed classifier instead of the base
    model (expectation over transformation, as in Salman et al. 2019): the scores are
    the log of the softmax averaged over ``noise_samples`` noisy copies, and success is
    judged on that average.
    """
    norm, eps_all = _check_attack_args(epsilon, norm, steps, value_range, loss)
    X = np.asarray(X.cpu() if isinstance(X, torch.Tensor) else X, dtype=np.float32)
    y = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64).reshape(-1)
    if len(X) != len(y):
        raise ValueError(f"y: {len(y)} labels for {len(X)} inputs")
    if eps_all.ndim == 1 and len(eps_all) != len(X):
        raise ValueError(f"epsilon: {len(eps_all)} budgets for {len(X)} inputs")
    eps_all = np.broadcast_to(eps_all, (len(X),))
    if targeted is not None:
        targeted = np.asarray(targeted, dtype=np.int64).reshape(-1)
        if len(targeted) != len(X):
            raise ValueError(f"targeted: {len(targeted)} targets for {len(X)} inputs")
    if not np.any(eps_all > 0) or len(X) == 0:
        return X.copy()
    device = _module_device(module)
    lo, hi = range_tensors(value_range, device)
    gen = torch.Generator().manual_seed(int(seed))
    labels = np.stack([y, targeted if targeted is not None else y], axis=1)
    was_training = module.training
    module.eval()
    out = np.empty_like(X)
    shape1 = (-1,) + (1,) * (X.ndim - 1)
    try:
        for start in range(0, len(X), batch_size):
            sl = slice(start, start + batch_size)
            x = torch.from_numpy(X[sl]).to(device)
            label = torch.from_numpy(labels[sl]).to(device)
            eps = torch.from_numpy(eps_all[sl].astype(np.float32)).view(shape1)
            step = eps * (2.5 / steps) if step_size is None else torch.full_like(eps, float(step_size))
            eps, step = eps.to(device), step.to(device)
            delta = _random_start(tuple(x.shape), eps.cpu(), norm, gen).to(device) if random_start \
                else torch.zeros_like(x)
            delta = (x + _project(delta, eps, norm)).clamp(lo, hi) - x
            best = (x + delta).detach().clone()
            best_obj = torch.full((len(x),), -float("inf"), device=device)
            reached_once = torch.zeros(len(x), dtype=torch.bool, device=device)
            for it in range(int(steps) + 1):
                delta.requires_grad_(True)
                scores = _log_probs(module, x + delta, noise_sigma, noise_samples, gen) if (
                    noise_sigma > 0 or loss == "ce") else module(x + delta)
                obj = _objective(scores, label, targeted is not None, loss)
                with torch.no_grad():
                    pred = scores.argmax(dim=1)
                    reached = pred == label[:, 1] if targeted is not None else pred != label[:, 0]
                    better = (obj > best_obj) & ~reached_once
                    keep = reached | better
                    best[keep] = (x + delta)[keep]
                    best_obj = torch.where(better, obj.detach(), best_obj)
                    reached_once |= reached
                if it == int(steps):
                    break
                (grad,) = torch.autograd.grad(obj.sum(), delta)
                with torch.no_grad():
                    delta = delta + _ascent_step(grad, step, norm)
                    delta = (x + _project(delta, eps, norm)).clamp(lo, hi) - x
                delta = delta.detach()
            out[sl] = best.cpu().numpy()
    finally:
        module.train(was_training)
    return out


def predict_labels(module: nn.Module, X: np.ndarray, batch_size: int = 1024) -> np.ndarray:
    """The base model's class ids for ``X`` (int64)."""
    device = _module_device(module)
    preds = []
    with torch.inference_mode():
        for start in range(0, len(X), batch_size):
            rows = np.array(X[start : start + batch_size], dtype=np.float32)  # a copy: a model may write into it
            xb = torch.from_numpy(rows).to(device)
            preds.append(module(xb).argmax(dim=1).cpu().numpy())
    return np.concatenate(preds) if preds else np.empty(0, dtype=np.int64)


# ---------------------------------------------------------------------- one entry point


AttackKind = Literal["pgd", "trees", "scores", "labels"]


def attack_kind(model) -> AttackKind:
    """Which attack riskpipe has for ``model`` (a riskpipe Model): ``"pgd"`` for torch
    models (gradients), ``"trees"`` for tree ensembles, ``"scores"`` for models that
    expose class scores without gradients (ONNX, predict_proba), ``"labels"`` for models
    with labels only. The one place that makes the choice: ``attack_name`` and
    ``attack_model`` (and whoever asks whether the attack has gradients) follow it."""
    if model.module is not None:
        return "pgd"
    if getattr(model, "trees", None) is not None:
        return "trees"
    if getattr(model, "_scores_fn", None) is not None:
        return "scores"
    return "labels"


def attack_name(model, steps: int, queries: int) -> str:
    """What ``attack_model`` runs on ``model``, with its strength, in plain words."""

    kind = attack_kind(model)
    if kind == "pgd":
        return f"PGD ({steps} steps, gradients)"
    if kind == "trees":
        return f"{tree_attack.NAME}, {tree_attack.MAX_CELLS} cells per feature and round"
    if kind == "scores":
        return f"{blackbox.SCORE_NAME}, {steps} steps x {2 * _samples(queries, steps) + 1} queries"
    return f"{blackbox.NAME}, {queries} queries"


def _samples(queries: int, steps: int) -> int:
    """NES probe pairs per step so that a score-based attack spends about ``queries`` calls."""
    return max(1, (int(queries) // max(int(steps), 1) - 1) // 2)


def attack_model(model, X: np.ndarray, y: np.ndarray, epsilon, norm: str, *, steps: int, seed: int,
                 queries: int, noise_sigma: float = 0.0, noise_samples: int = 8, loss: str = "margin") -> np.ndarray:
    """The strongest attack riskpipe has for ``model`` (a riskpipe Model), one candidate
    per row: PGD with gradients for torch models (on the smoothed classifier when
    ``noise_sigma`` > 0), the tree search for tree ensembles, PGD on gradients estimated
    from the class scores for models that expose scores (ONNX, predict_proba), the
    decision-based HopSkipJump attack for models with labels only; the black-box ones
    spend about ``queries`` model calls per input."""
    kind = attack_kind(model)
    if kind == "pgd":
        return pgd(model.module, X, y, epsilon, norm=norm, steps=steps, seed=seed, value_range=model.value_range,
                   loss=loss, noise_sigma=noise_sigma, noise_samples=noise_samples)
    if kind == "trees":
        return tree_attack.tree_attack(model.trees, model.predict, X, y, epsilon, norm, value_range=model.value_range,
                                       seed=seed)
    if kind == "scores":
        return blackbox.nes_pgd(model.class_scores, X, y, epsilon, norm, steps=steps, samples=_samples(queries, steps),
                                value_range=model.value_range, seed=seed)
    return blackbox.hop_skip_jump(model.predict, X, y, epsilon, norm, queries=queries, value_range=model.value_range,
                                  seed=seed)


# ---------------------------------------------------------------------- norm shift


@dataclass(frozen=True)
class NormShift:
    """One norm-shift attack budget against certificates in another norm.

    ``covered`` says, per input, whether the certificate rules the attack out after
    the Theorem 2 conversion (radius * factor >= epsilon); ``naive_covered`` is the
    mistaken reading that compares the radius with the budget as if the norms were the
    same. ``needed_radius`` is the certificate radius (in ``cert_norm``) that would
    cover this budget.
    """

    attack_norm: str
    cert_norm: str
    epsilon: float
    input_dim: int
    factor: float
    needed_radius: float
    covered: np.ndarray
    naive_covered: np.ndarray

    @property
    def silent(self) -> bool:
        """True when no input's certificate covers this budget: the certificate says nothing."""
        return not bool(self.covered.any())

    def summary(self) -> dict:
        n = len(self.covered)
        return {
            "attack_norm": self.attack_norm,
            "cert_norm": self.cert_norm,
            "epsilon": self.epsilon,
            "input_dim": self.input_dim,
            "conversion_factor": self.factor,
            "needed_cert_radius": self.needed_radius,
            "covered_fraction": float(self.covered.mean()) if n else 0.0,
            "naive_covered_fraction": float(self.naive_covered.mean()) if n else 0.0,
            "certificate_silent": self.silent,
        }


def norm_shift_coverage(radii: np.ndarray, cert_norm: str, attack_norm: str, epsilon: float,
                        input_dim: int) -> NormShift:
    """Which certificates (``radii`` in ``cert_norm``) cover an ``attack_norm`` attack of ``epsilon``."""
    cert_norm, attack_norm = check_norm(cert_norm), check_norm(attack_norm)
    radii = np.asarray(radii, dtype=np.float64).reshape(-1)
    factor = conversion_factor(cert_norm, attack_norm, input_dim)
    return NormShift(
        attack_norm=attack_norm,
        cert_norm=cert_norm,
        epsilon=float(epsilon),
        input_dim=int(input_dim),
        factor=factor,
        needed_radius=float(epsilon) / factor,
        covered=radii * factor >= epsilon,
        naive_covered=radii >= epsilon,
    )


def norm_shift(
    module: nn.Module,
    X: np.ndarray,
    y: np.ndarray,
    radii: np.ndarray,
    cert_norm: str,
    epsilon: float,
    attack_norm: str = "linf",
    **pgd_kwargs,
) -> tuple[np.ndarray, NormShift]:
    """PGD in ``attack_norm`` against inputs certified in ``cert_norm``.

    Returns the adversarial examples and the coverage of each input's certificate;
    a successful example on an input that is ``naive_covered`` but not ``covered``
    shows a certificate read in the wrong norm.
    """
    if check_norm(attack_norm) == check_norm(cert_norm):
        raise ValueError(f"attack_norm: a norm-shift attack needs a norm other than the certificate's ({cert_norm})")
    X = np.asarray(X, dtype=np.float32)
    x_adv = pgd(module, X, y, epsilon, norm=attack_norm, **pgd_kwargs)
    cov = norm_shift_coverage(radii, cert_norm, attack_norm, epsilon, int(np.prod(X.shape[1:])))
    return x_adv, cov


# ------------------------------------------------- what each attacker gets to see


@dataclass(frozen=True)
class PublicEntry:
    """One public decision, exactly the ``PUBLIC_FIELDS`` of the decisions topic."""

    id: str
    ts: str
    decision: str
    policy_version: str


@dataclass(frozen=True)
class TrustedEntry:
    """What the audit topic tells a trusted reader about one input (Theorem 2-converted radius)."""

    id: str
    decision: str
    radius_threat: float
    abstained: bool
    predicted_class: int | None


@dataclass(frozen=True)
class PublicView:
    """The public decisions topic, reduced to ``PUBLIC_FIELDS``; anything else is dropped."""

    entries: tuple[PublicEntry, ...]

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> PublicView:
        entries = []
        for i, r in enumerate(records):
            missing = [f for f in PUBLIC_FIELDS if f not in r]
            if missing:
                raise ValueError(f"decisions[{i}]: missing field {missing[0]!r}")
            entries.append(PublicEntry(**{f: str(r[f]) for f in PUBLIC_FIELDS}))
        return cls(tuple(entries))


@dataclass(frozen=True)
class TrustedView:
    """The audit topic: full records, so the radius in the threat norm is known."""

    entries: tuple[TrustedEntry, ...]

    @classmethod
    def from_records(cls, records: Iterable[Mapping]) -> TrustedView:
        entries = []
        for i, r in enumerate(records):
            try:
                cert = r["certificate"]
                radius = cert.get("radius_threat")
                entries.append(
                    TrustedEntry(
                        id=str(r["id"]),
                        decision=str(r["decision"]),
                        radius_threat=float(radius if radius is not None else cert["radius"]),
                        abstained=bool(cert["abstained"]),
                        predicted_class=cert.get("predicted_class"),
                    )
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"audit[{i}]: not a full decision record ({type(e).__name__}: {e})") from None
        return cls(tuple(entries))


# --------------------------------------------------------------------- attackers

# The public attacker can only prefer inputs the policy currently lets through.
_DECISION_ORDER = {"allow": 0, "review": 1, "block": 2}


@dataclass(frozen=True)
class PublicAttacker:
    """Sees only the public decisions topic (``PublicView``).

    With ``attempts`` tries it picks allowed inputs first, in an order shuffled by
    ``seed`` (it has nothing to tell allowed inputs apart), then the others.
    """

    attempts: int
    seed: int = 0

    def choose(self, view: PublicView) -> list[str]:
        rng = np.random.default_rng(self.seed)
        tiebreak = rng.permutation(len(view.entries))
        order = sorted(
            range(len(view.entries)),
            key=lambda i: (_DECISION_ORDER.get(view.entries[i].decision, 3), tiebreak[i]),
        )
        return [view.entries[i].id for i in order[: self.attempts]]


@dataclass(frozen=True)
class GuidedAttacker:
    """Sees the trusted audit topic (``TrustedView``): certified radii in the threat norm.

    An input whose radius is at least the attacker's budget ``epsilon`` is out of
    reach (Theorem 1, up to the certificate's alpha), so it is skipped. To be allowed,
    an adversarial example must itself be certified, ``margin`` (the policy's
    epsilon) deep inside the wrong class, so inputs with radius below
    ``epsilon - margin`` come first; among those and then the rest in reach, allowed
    inputs before others, smallest radius first (those just above the policy's
    threshold). Given only a ``PublicView`` it has no radius and behaves exactly like
    ``PublicAttacker``.
    """

    attempts: int
    epsilon: float
    seed: int = 0
    margin: float = 0.0

    def choose(self, view: TrustedView | PublicView) -> list[str]:
        if isinstance(view, PublicView):
            return PublicAttacker(self.attempts, self.seed).choose(view)
        rng = np.random.default_rng(self.seed)
        tiebreak = rng.permutation(len(view.entries))
        reachable = [i for i, e in enumerate(view.entries) if e.abstained or e.radius_threat < self.epsilon]
        order = sorted(
            reachable,
            key=lambda i: (
                view.entries[i].radius_threat >= self.epsilon - self.margin,
                _DECISION_ORDER.get(view.entries[i].decision, 3),
                view.entries[i].radius_threat,
                tiebreak[i],
            ),
        )
        return [view.entries[i].id for i in order[: self.attempts]]


__all__ = [
    "ATTACK_NORMS",
    "PUBLIC_FIELDS",
    "GuidedAttacker",
    "NormShift",
    "PublicAttacker",
    "PublicEntry",
    "PublicView",
    "TrustedEntry",
    "TrustedView",
    "norm_shift",
    "norm_shift_coverage",
    "pgd",
    "predict_labels",
]
