"""The one list of certification families: method name, where its class lives, its norms.

Everything that spells the family list (the Certificate's method check, the policy
schema, ``certify --method``, ``compare``) reads it from here, so adding a family is
one line. Only names here: nothing heavy is imported.
"""

from __future__ import annotations

from typing import NamedTuple


class Family(NamedTuple):
    module: str
    cls: str
    norms: tuple[str, ...]  # the first is the family's native norm


FAMILIES: dict[str, Family] = {
    "smoothing": Family("riskpipe.certify.smoothing", "Smoothing", ("l2",)),
    "ibp": Family("riskpipe.certify.bounds", "IntervalBounds", ("linf", "l2")),
    "lipschitz": Family("riskpipe.certify.lipschitz", "GlobalLipschitz", ("l2",)),
    "trees": Family("riskpipe.certify.trees", "TreeBounds", ("linf", "l2")),
}
METHODS: tuple[str, ...] = tuple(FAMILIES)
CERT_NORMS: dict[str, tuple[str, ...]] = {m: f.norms for m, f in FAMILIES.items()}

__all__ = ["CERT_NORMS", "FAMILIES", "METHODS", "Family"]
