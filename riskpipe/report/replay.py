"""Recompute a ledger entry's certificate from the original input (ISO/IEC 27001 A.5.28 evidence).

Certificates are seeded, so the same input, model weights, seed and parameters give
the same certificate bit for bit on the same software stack. The ledger keeps only
the input's digest: ``sha256`` of the input tensor as float32, C order
(``np.ascontiguousarray(x, dtype=np.float32).tobytes()``); the digest is checked before
anything is recomputed.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

COMPARED = ("method", "predicted_class", "abstained", "certified", "n_samples", "radius")
TOLERANCE = 1e-9


class ReplayError(ValueError):
    """A ledger record or input that cannot be replayed (names field and reason)."""


def input_digest(x: Any) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


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


def certifier_parameters(cert: dict) -> dict:
    """The certifier's constructor arguments as recorded (falling back to Smoothing's defaults
    for values older records did not carry)."""
    from riskpipe.certify import Smoothing

    method = _need(cert, "method", "certificate")
    extra = cert.get("extra") or {}
    if method == "smoothing":
        defaults = Smoothing.__dataclass_fields__
        params = {"sigma": _need(cert, "sigma", "certificate"), "alpha": _need(cert, "alpha", "certificate"),
                  "bound": cert.get("bound") or "cp"}
        for name in ("n0", "n", "max_samples", "batch_size", "first_look", "growth"):
            params[name] = extra.get(name, defaults[name].default)
        return params
    if method == "ibp":
        return {"norm": _need(cert, "norm", "certificate")}
    if method == "lipschitz":
        return {"epsilon": _need(cert, "epsilon", "certificate")}
    raise ReplayError(f"certificate.method: {method!r} is not one of smoothing, ibp, lipschitz")


def replay(record: dict, X: np.ndarray, device: str = "cpu", model=None) -> ReplayResult:
    """Recompute ``record``'s certificate on the input in ``X`` whose digest matches.

    ``X`` is one input or a batch; the row whose float32 digest equals
    ``record["input"]["sha256"]`` is used. No match: nothing is recomputed and the
    result says so.
    """
    from riskpipe.certify import make_certifier
    from riskpipe.models import load_model

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
    params = certifier_parameters(cert)
    if model is None:
        model = load_model(spec, device=device)
    batch = np.ascontiguousarray(x, dtype=np.float32).reshape((1,) + tuple(model.input_shape))
    seed = int(_need(cert, "seed", "certificate"))
    method, mode = cert["method"], cert.get("mode", "certify")
    certifier = make_certifier(model, method, **params)
    if method == "smoothing" and mode == "decide":
        new = certifier.decide_batch(batch, [seed], float(_need(cert, "epsilon", "certificate")))[0]
    elif method == "smoothing" and mode == "predict":
        new = certifier.predict_batch(batch, [seed])[0]
    else:
        new = certifier.certify_batch(batch, [seed])[0]
    replayed = new.to_dict()
    checks = [FieldCheck(name, cert.get(name), replayed.get(name), _same(cert.get(name), replayed.get(name)))
              for name in COMPARED]
    recorded_sha = (record.get("model") or {}).get("sha256")
    if recorded_sha:
        checks.append(FieldCheck("model.sha256", recorded_sha, model.sha256, recorded_sha == model.sha256))
    return ReplayResult(entry_id, True, want, digests, checks, {"mode": mode, "seed": seed, **params})
