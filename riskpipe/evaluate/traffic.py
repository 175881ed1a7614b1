"""The traffic an evaluation sends through the stage: clean samples and attacked copies.

Every sample set keeps the labels, the base model's predictions and the event ids, so
the metrics can join the stage's records back to what was sent. Event ids name the
set (``clean-00042``, ``pgd-l2-0.5-00042``, ``shift-linf-0.0625-00042``) and end with
the row index, so the attacked copy of an input is found from its clean id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sklearn.model_selection import train_test_split

from riskpipe import attacks
from riskpipe.stream.events import make_event

QUERIES = 1000  # model calls per input of the black-box attacks (models without gradients or trees)


@dataclass(frozen=True)
class AttackSpec:
    """One attack setting: PGD in the threat norm, or a norm-shift attack in another norm."""

    kind: str
    norm: str
    epsilon: float
    label: str = ""  # how the budget was asked for, e.g. "2x" the policy epsilon

    @property
    def name(self) -> str:
        return f"{'pgd' if self.kind == 'pgd' else 'shift'}-{self.norm}-{self.epsilon:g}"


@dataclass
class SampleSet:
    """One set of inputs sent through the stage, with what the evaluation knows about them."""

    name: str
    kind: str
    X: np.ndarray
    y: np.ndarray
    pred: np.ndarray  # base model's prediction on X
    attack: AttackSpec | None = None
    ids: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.ids:
            self.ids = [f"{self.name}-{i:05d}" for i in range(len(self.X))]

    @property
    def spec(self) -> AttackSpec:
        """The attack that made this set; ValueError for the clean set."""
        if self.attack is None:
            raise ValueError(f"{self.name}: not an attacked set")
        return self.attack

    def events(self, model_name: str, upstream_risk: float | None = None) -> list[dict]:
        """Inference events; ``upstream_risk`` (the same for every sample: an upstream
        detector that tells clean from attacked no better than chance) is omitted when None."""
        extra = {} if upstream_risk is None else {"upstream_risk": float(upstream_risk)}
        return [make_event(eid, model_name, x, prediction=int(p), **extra)
                for eid, x, p in zip(self.ids, self.X, self.pred)]


def row_of(event_id: str) -> int:
    return int(event_id.rsplit("-", 1)[1])


def clean_set(model, X: np.ndarray, y: np.ndarray) -> SampleSet:
    return SampleSet("clean", "clean", X, y, model.predict(X))


def attack_name(model, steps: int, queries: int = QUERIES) -> str:
    """The attack ``attacked_set`` runs on ``model``, with its strength."""
    return attacks.attack_name(model, steps, queries)


def attacked_set(model, clean: SampleSet, spec: AttackSpec, *, steps: int, seed: int, noise_sigma: float = 0.0,
                 queries: int = QUERIES) -> SampleSet:
    """The attack at ``spec`` on every clean input (seeded per attack, so sets are
    reproducible): the model's strongest attack (``riskpipe.attacks.attack_model``: PGD
    with gradients, the tree search for tree ensembles, score-based or decision-based
    black-box attacks otherwise)."""
    X_adv = attacks.attack_model(model, clean.X, clean.y, spec.epsilon, spec.norm, steps=steps, seed=seed,
                                 queries=queries, noise_sigma=noise_sigma, loss="ce")
    return SampleSet(spec.name, spec.kind, X_adv, clean.y, model.predict(X_adv), attack=spec)


def subsample(X: np.ndarray, y: np.ndarray, n: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded subset of ``n`` rows, stratified by label, in a fixed order."""
    if n is None or n >= len(X):
        return X, y

    classes, counts = np.unique(y, return_counts=True)
    stratify = y if n >= len(classes) and counts.min() >= 2 else None
    idx, _ = train_test_split(np.arange(len(X)), train_size=n, random_state=seed, stratify=stratify)
    idx = np.sort(idx)
    return X[idx], y[idx]
