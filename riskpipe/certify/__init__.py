"""Certification families behind one protocol, built from a policy by one function.

Every certifier has ``method``, ``norm`` (of its radii) and ``modes``, and is reached
through ``run(mode, X, seeds, epsilon)`` (``riskpipe.certify.protocol``). The one place
that turns a policy's ``certifier`` section into a certifier is
``certifier_for_policy``; the stage, ``certify``, ``compare`` and replay all use it.
Heavy modules (torch) load on first use, so importing the package is cheap.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Sequence
from typing import Any, Protocol

from riskpipe.certify.certificate import Certificate
from riskpipe.certify.families import FAMILIES as _FAMILIES


class Certifier(Protocol):
    method: str
    norm: str
    modes: tuple[str, ...]
    inputs_per_call: int

    def run(self, mode: str, X, seeds: Sequence[int], epsilon: float | None = None) -> list[Certificate]: ...

    def prepare(self) -> None: ...

    def check_inputs(self, X) -> None: ...


def family(method: str) -> type:
    """The certifier class of ``method`` (one of ``riskpipe.certify.families.METHODS``)."""
    if method not in _FAMILIES:
        raise ValueError(f"method: {method!r} is not one of {', '.join(_FAMILIES)}")
    module, name, _ = _FAMILIES[method]
    return getattr(importlib.import_module(module), name)


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name != "model"}


def certifier_for_policy(model, policy, **overrides: Any) -> Certifier:
    """The certifier a policy asks for, on ``model``.

    ``policy`` is a loaded Policy or its ``certifier`` section (``schema.Certifier``).
    Every section field the family's constructor takes is passed on; the norm is the
    section's ``certificate_norm`` (the family's native norm unless the policy names
    one). ``overrides`` are tuning knobs of the deployment (batch_size, epsilon for
    a GloRo-style Lipschitz abstain, ...) and those the family does not take are
    dropped, so one call serves every family. The constructor validates the rest.
    """
    cls = family(getattr(policy, "certifier", policy).method)
    names = _fields(cls)
    params = certifier_parameters(policy)
    params.update({k: v for k, v in overrides.items() if k in names and v is not None})
    return cls(model, **params)


def certifier_parameters(policy) -> dict[str, Any]:
    """The parameters ``certifier_for_policy`` passes for ``policy`` (no model needed)."""
    section = getattr(policy, "certifier", policy)
    names = _fields(family(section.method))
    params = {k: v for k, v in section.model_dump().items() if k in names and v is not None}
    if "norm" in names:
        params["norm"] = section.certificate_norm
    return params


def __getattr__(name):
    if name == "Smoothing":
        return family("smoothing")
    if name in ("conversion_factor", "convert_radius"):  # numpy: loaded on first use
        from riskpipe.certify import norms

        return getattr(norms, name)
    raise AttributeError(name)


__all__ = ["Certificate", "Certifier", "Smoothing", "certifier_for_policy", "certifier_parameters",
           "conversion_factor", "convert_radius", "family"]
