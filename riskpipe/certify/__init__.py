"""Certification families behind one protocol, built from a policy by one function.

Every certifier follows ``riskpipe.certify.protocol.Certifier`` (``method``, ``norm``,
``modes``, ``run(mode, X, seeds, epsilon)``, ...); which families exist, and what each
takes, is the registry ``riskpipe.certify.families``. The one place that turns a
policy's ``certifier`` section into a certifier is ``certifier_for_policy``; the stage,
``certify``, ``compare`` and replay all use it. Heavy modules (torch, numpy) load on
first use, so importing the package is cheap.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from riskpipe.certify import families as _families
from riskpipe.certify.certificate import Certificate

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Certifier


def family(method: str) -> type:
    """The certifier class of ``method`` (a name in ``riskpipe.certify.families.FAMILIES``)."""
    return _families.family(method).load()


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.name != "model"}


def certifier_for_policy(model: Any, policy: Any, **overrides: Any) -> Certifier:
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
    certifier: Certifier = cls(model, **params)
    return certifier


def certifier_parameters(policy: Any) -> dict[str, Any]:
    """The parameters ``certifier_for_policy`` passes for ``policy`` (no model needed)."""
    section = getattr(policy, "certifier", policy)
    names = _fields(family(section.method))
    params = {k: v for k, v in section.model_dump().items() if k in names and v is not None}
    if "norm" in names:
        params["norm"] = section.certificate_norm
    return params


def __getattr__(name: str) -> Any:
    # each family's class by its class name (riskpipe.certify.Smoothing), imported on first use
    for f in _families.FAMILIES.values():
        if f.factory.endswith(f":{name}"):
            return f.load()
    if name == "Certifier":  # numpy: the protocol module loads on first use
        from riskpipe.certify.protocol import Certifier  # lazy: numpy off the CLI start-up path

        return Certifier
    if name in ("conversion_factor", "convert_radius"):  # numpy: loaded on first use
        from riskpipe.certify import norms  # lazy: numpy off the CLI start-up path

        return getattr(norms, name)
    raise AttributeError(name)


__all__ = ["Certificate", "Certifier", "certifier_for_policy", "certifier_parameters", "conversion_factor",
           "convert_radius", "family"]
