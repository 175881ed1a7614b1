"""The Certificate: one robustness statement about one input, with its scope.

Every certification family (``riskpipe.certify.families``) returns this type, so the
policy, ledger and report never need to know which family produced it; the scope
wording of each family comes from its registry entry. A certificate bounds the distance to the nearest
class-changing input; it never says the input is clean (position paper, Theorem 1).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from riskpipe.certify.families import FAMILIES, NORMS

MODES = ("certify", "predict", "decide", "bound")
# The reason of a certificate computed from a model output that broke its contract
# (riskpipe.models.output): abstained, radius 0, never certified, whatever the family.
MODEL_FAULT = "model_fault"


def _finite(v: int | float) -> bool:
    try:
        return math.isfinite(v)
    except OverflowError:  # an integer beyond a double's range
        return False


# the type each field read back from a record must have (Certificate.from_dict)
_READ_TYPES: dict[str, tuple[type, ...]] = {
    "method": (str,), "norm": (str,), "mode": (str,), "radius": (int, float), "abstained": (bool,),
    "predicted_class": (int,), "epsilon": (int, float), "certified": (bool,), "input_dim": (int,),
    "sigma": (int, float), "alpha": (int, float), "n_samples": (int,), "extra": (dict,),
}


@dataclass(frozen=True)
class Certificate:
    """A robustness certificate for one input.

    radius is in ``norm`` and is 0.0 when the certificate abstains. For decide mode
    ``epsilon`` is the target radius and ``certified`` says whether radius >= epsilon
    was established at level alpha; ``reason`` says why not (e.g. ``budget``).
    ``n_samples`` counts model evaluations actually used, selection included.
    """

    method: str
    norm: str
    radius: float
    abstained: bool
    predicted_class: int | None
    mode: str = "certify"
    p_lower: float | None = None
    p_upper: float | None = None
    sigma: float | None = None
    alpha: float | None = None
    n_samples: int = 0
    elapsed_ms: float = 0.0
    seed: int | None = None
    epsilon: float | None = None
    certified: bool | None = None
    reason: str | None = None
    bound: str | None = None
    input_dim: int | None = None
    sampler: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in FAMILIES:
            raise ValueError(f"method: {self.method!r} is not one of {tuple(FAMILIES)}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: {self.norm!r} is not one of {NORMS}")
        if self.mode not in MODES:
            raise ValueError(f"mode: {self.mode!r} is not one of {MODES}")
        if not (self.radius >= 0.0) or math.isnan(self.radius):
            raise ValueError(f"radius: must be >= 0, got {self.radius!r}")
        if self.abstained and self.radius != 0.0:
            raise ValueError("radius: an abstaining certificate has radius 0")
        if self.alpha is not None and not (0.0 < self.alpha < 1.0):
            raise ValueError(f"alpha: must lie in (0, 1), got {self.alpha!r}")

    @property
    def is_certified(self) -> bool:
        """True when the certificate establishes what it was asked to: not abstained,
        and in decide mode radius >= epsilon."""
        if self.abstained:
            return False
        if self.certified is not None:
            return bool(self.certified)
        return self.radius > 0.0

    @property
    def scope(self) -> str:
        """Plain words: what this certificate guarantees and what it does not."""
        norm = {"l1": "l1", "l2": "l2", "linf": "l_inf"}[self.norm]
        what = FAMILIES[self.method].scope(self, norm)
        if self.reason == MODEL_FAULT:
            what = "no certificate (model fault: the model's output broke its contract, see extra.model_fault): " \
                + what
        elif self.abstained:
            what = "no certificate (abstained): " + what
        scale = self.extra.get("scale")
        if scale:  # certified on z = x / s (riskpipe.models.scaled): radii are in ||delta / s||
            what += f"; scaled {norm}: ||delta/s||_{norm[1:]}, s = {scale}"
            norm = f"scaled {norm}"
        return (
            what
            + f"; it covers only {norm}-bounded changes (other norms after Theorem 2 conversion)"
            + "; a certificate says nothing about whether the input is clean"
            " (adversarial inputs can be certified too)"
        )

    def to_dict(self) -> dict[str, Any]:
        # shallow on purpose: dataclasses.asdict deep-copies and cost ~0.2 ms per record
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["extra"] = dict(self.extra)
        d["scope"] = self.scope
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Certificate:
        """A certificate read back (a record, a file): ValueError naming the first field of
        the wrong type. The certifiers make them typed; a record someone else wrote, read by
        ``policy diff``/``explain`` or ``ledger replay``, is checked here, before a decision
        is made of it (an input_dim of "64" or a predicted_class of "x" ended in a traceback)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for name, kinds in _READ_TYPES.items():
            v = kw.get(name)
            if v is not None and (isinstance(v, bool) is not (bool in kinds) or not isinstance(v, kinds)):
                raise ValueError(f"{name}: {v!r:.40} is not {' or '.join(k.__name__ for k in kinds)}")
        for name in ("input_dim", "predicted_class"):
            if kw.get(name) is not None and kw[name] < (1 if name == "input_dim" else 0):
                raise ValueError(f"{name}: {kw[name]!r} is out of range")
        for name in ("radius", "epsilon", "sigma", "alpha"):
            if kw.get(name) is not None and not _finite(kw[name]):
                raise ValueError(f"{name}: {kw[name]!r:.40} is not a finite number")
        return cls(**kw)

    @classmethod
    def from_json(cls, s: str) -> Certificate:
        return cls.from_dict(json.loads(s))

    def replace(self, **changes: Any) -> Certificate:
        return dataclasses.replace(self, **changes)
