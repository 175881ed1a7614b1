"""Recompute a ledger entry's certificate from the original input (ISO/IEC 27001 A.5.28 evidence).

Certificates are seeded, so the same input, model weights, seed and parameters give
the same certificate bit for bit on the same software stack. The ledger keeps only
the input's digest (``riskpipe.ledger.inputs.input_digest``: ``sha256`` of the input
tensor as float32, C order); the digest is checked before anything is recomputed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from riskpipe.app.compose import build_entry
from riskpipe.app.config import ConfigError, load_config
from riskpipe.certify import certifier_for_policy
from riskpipe.ledger.inputs import input_digest
from riskpipe.models import load_model_for
from riskpipe.policy import PolicyError, load_policy
from riskpipe.policy.schema import Certifier

COMPARED = ("method", "predicted_class", "abstained", "certified", "n_samples", "radius")
TOLERANCE = 1e-9


class ReplayError(ValueError):
    """A ledger record or input that cannot be replayed (names field and reason)."""


@dataclass(frozen=True)
class FieldCheck:
    name: str
    recorded: Any
    replayed: Any
    match: bool


@dataclass(frozen=True)
class ReplayResult:
    entry_id: str
    input_match: bool
    recorded_digest: str
    input_digests: list[str]
    checks: list[FieldCheck] = field(default_factory=list)
    parameters: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.input_match and bool(self.checks) and all(c.match for c in self.checks)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=0.0, abs_tol=TOLERANCE)
    return a == b


def _need(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise ReplayError(f"{where}.{key}: missing from the ledger record")
    return d[key]


def recorded_parameters(cert: dict) -> dict:
    """Everything the certificate recorded about how it was made: its top-level fields over
    its ``extra`` (values older records did not carry take the family's defaults)."""
    _need(cert, "method", "certificate")
    return {**(cert.get("extra") or {}), **{k: v for k, v in cert.items() if k != "extra" and v is not None}}


def _certifier(model, cert: dict):
    """The certifier that made ``cert``, through the one policy-to-certifier function."""

    recorded = recorded_parameters(cert)
    try:
        # the mode is the run's, not the section's (a recorded predict certificate has no policy mode)
        section = Certifier.for_method(**{k: v for k, v in recorded.items() if k != "mode"})
    except ValidationError as e:
        err = e.errors()[0]
        raise ReplayError(f"certificate.{'.'.join(str(p) for p in err['loc'])}: "
                          f"{err['msg'].removeprefix('Value error, ')}") from None
    return certifier_for_policy(model, section, **recorded)


def stage_entry(config_path: str, record: dict, device: str = "cpu"):
    """The record's model as the stage config builds it (riskpipe.app.compose.build_entry):
    its declared range, its ``scale`` (the certified model g(z) = f(s * z) on z = x / s)
    and its policy."""

    name = _need(_need(record, "model", "record"), "name", "model")
    try:
        config = load_config(config_path, device=device)
        if name not in config.models:
            raise ReplayError(f"model.name: {name!r} is not a model of {config_path} "
                              f"(known: {', '.join(sorted(config.models))})")
        return build_entry(name, config.models[name], load_policy(config.model_policy(name)), device=device)
    except (ConfigError, PolicyError) as e:
        raise ReplayError(str(e)) from None


def replay(record: dict, X: np.ndarray, device: str = "cpu", model=None, entry=None) -> ReplayResult:
    """Recompute ``record``'s certificate on the input in ``X`` whose digest matches.

    ``X`` is one input or a batch; the row whose float32 digest equals
    ``record["input"]["sha256"]`` is used. No match: nothing is recomputed and the
    result says so. ``entry`` (``stage_entry``) is the model as the stage ran it: the
    input goes through its scale first, and its policy's sha256 is checked too.
    Without it the model is loaded from the record's spec, which a certificate made in
    a scaled norm cannot be replayed on.
    """

    entry_id = str(_need(record, "id", "record"))
    want = str(_need(_need(record, "input", "record"), "sha256", "input"))
    cert = _need(record, "certificate", "record")
    spec = _need(_need(record, "model", "record"), "spec", "model")
    X = np.asarray(X)
    shape = tuple((record.get("input") or {}).get("shape") or ())
    candidates = [X] if shape and X.shape == shape else list(X)
    digests = [input_digest(x) for x in candidates]
    if want not in digests:
        return ReplayResult(entry_id, False, want, digests)
    x = candidates[digests.index(want)]
    scale = (cert.get("extra") or {}).get("scale")
    if entry is not None:
        model = entry.certified
    elif scale:
        raise ReplayError(f"certificate.extra.scale: the certificate holds in a scaled norm ({scale}); give the "
                          "stage config (--config) so the model entry's scale is rebuilt as the stage built it")
    if model is None:
        model = load_model_for(spec, shape or x.shape, device=device)  # the record's input shape
    batch = np.ascontiguousarray(x, dtype=np.float32).reshape((1,) + tuple(model.input_shape))
    if entry is not None:
        batch = entry.to_certified(batch)
    seed = int(_need(cert, "seed", "certificate"))
    mode = cert.get("mode", "certify")
    certifier = _certifier(model, cert)
    epsilon = _need(cert, "epsilon", "certificate") if mode == "decide" else None
    new = certifier.run(mode, batch, [seed], epsilon)[0]
    params = {k: getattr(certifier, k) for k in certifier_fields(certifier)}
    replayed = new.to_dict()
    checks = [FieldCheck(name, cert.get(name), replayed.get(name), _same(cert.get(name), replayed.get(name)))
              for name in COMPARED]
    recorded_sha = (record.get("model") or {}).get("sha256")
    if recorded_sha:
        checks.append(FieldCheck("model.sha256", recorded_sha, model.sha256, recorded_sha == model.sha256))
    policy_sha = (record.get("policy") or {}).get("sha256")
    if entry is not None and policy_sha:
        checks.append(FieldCheck("policy.sha256", policy_sha, entry.policy.sha256, policy_sha == entry.policy.sha256))
    return ReplayResult(entry_id, True, want, digests, checks, {"mode": mode, "seed": seed, **params})


def certifier_fields(certifier) -> list[str]:
    return [f.name for f in dataclasses.fields(certifier) if f.name != "model"]
