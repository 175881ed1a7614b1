"""Certification families behind one protocol.

Every certifier has ``method`` and ``certify_batch(X, seeds) -> list[Certificate]``;
randomized smoothing adds ``predict_batch`` and ``decide_batch(X, seeds, epsilon)``.
Heavy modules (torch) load on first use, so importing the package is cheap.
"""

from typing import Protocol, Sequence

from riskpipe.certify.certificate import Certificate
from riskpipe.certify.norms import conversion_factor, convert_radius


class Certifier(Protocol):
    method: str

    def certify_batch(self, X, seeds: Sequence[int]) -> list[Certificate]: ...


def make_certifier(model, method: str = "smoothing", **params) -> Certifier:
    """Build the certifier for ``method`` (smoothing | ibp | lipschitz) on ``model``."""
    if method == "smoothing":
        from riskpipe.certify.smoothing import Smoothing

        return Smoothing(model, **params)
    if method == "ibp":
        from riskpipe.certify.bounds import IntervalBounds

        return IntervalBounds(model, **params)
    if method == "lipschitz":
        from riskpipe.certify.lipschitz import GlobalLipschitz

        return GlobalLipschitz(model, **params)
    raise ValueError(f"method: {method!r} is not one of smoothing, ibp, lipschitz")


def __getattr__(name):
    if name == "Smoothing":
        from riskpipe.certify.smoothing import Smoothing

        return Smoothing
    raise AttributeError(name)


__all__ = ["Certificate", "Certifier", "Smoothing", "conversion_factor", "convert_radius", "make_certifier"]
