"""The stage's work on a micro-batch of valid events: certify, contextualise, score,
build records. No Kafka and no files here: the Kafka stage and the offline mode both
call ``Pipeline.process``, so a batch is decided the same way wherever it came from.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from riskpipe.certify import certifier_for_policy
from riskpipe.certify.norms import convert_radius
from riskpipe.models import Model, load_model
from riskpipe.stream.events import Event, EventError


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def seed_for(event_id: str, policy_sha: str) -> int:
    """Certificates are seeded from (event id, policy) so an auditor can recompute one."""
    return int.from_bytes(hashlib.sha256(f"{event_id}\x00{policy_sha}".encode()).digest()[:8], "big") >> 1


def input_digest(x: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


@dataclass
class ModelEntry:
    name: str
    model: Model
    certifier: object
    epsilon_cert: float  # decide target in the certificate's norm (Theorem 2 applied)
    context: object | None


class Pipeline:
    """Models, certifiers, context indexes and the policy, ready to decide batches."""

    def __init__(self, policy, models: dict[str, str], device: str = "cpu", worker: str = "w0",
                 review_include_input: bool = True, context: bool = True):
        self.policy = policy
        self.worker = worker
        self.review_include_input = review_include_input
        self.entries: dict[str, ModelEntry] = {}
        self.certify_seconds = 0.0  # cumulative time inside certifiers (benchmarks read it)
        for name, spec in models.items():
            model = load_model(spec, device=device)
            self.entries[name] = self._entry(name, model, context)

    @property
    def models(self) -> dict[str, Model]:
        return {n: e.model for n, e in self.entries.items()}

    def _entry(self, name: str, model: Model, with_context: bool) -> ModelEntry:
        cert = certifier_for_policy(model, self.policy)
        eps = self.policy.certificate_epsilon(cert.norm, model.input_dim)
        entry = ModelEntry(name, model, cert, eps, None)
        if with_context:
            from riskpipe.context import ContextIndex

            def reference_radii(X: np.ndarray) -> np.ndarray:
                X = X[:300]
                certs = self._certify(entry, X, list(range(len(X))))
                return np.array([self._radius_threat(c, model) for c in certs])

            entry.context = ContextIndex.for_model(model, self.policy.threat_model.norm,
                                                   reference_radii_fn=reference_radii)
        return entry

    def admit(self, ev: Event) -> None:
        """EventError ``off_grid`` for an input its model's certifier cannot take (off the sound
        sampler's grid): that event goes to the DLQ instead of failing its micro-batch."""
        from riskpipe.certify.samplers import GridError

        try:
            self.entries[ev.model].certifier.check_inputs(ev.x[None])
        except GridError as e:
            raise EventError("off_grid", str(e)) from None

    def _certify(self, entry: ModelEntry, X: np.ndarray, seeds: list[int]):
        return entry.certifier.run(self.policy.certifier.mode, X, seeds, entry.epsilon_cert)

    def _radius_threat(self, cert, model: Model) -> float:
        return convert_radius(cert.radius, cert.norm, self.policy.threat_model.norm, model.input_dim)

    def process(self, events: list[Event], sources: list[dict]) -> list[dict]:
        """Full decision records (docs/records.md), one per event, in input order."""
        records: list[dict | None] = [None] * len(events)
        by_model: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            by_model.setdefault(ev.model, []).append(i)
        for name, idx in by_model.items():
            entry = self.entries[name]
            X = np.stack([events[i].x for i in idx])
            seeds = [seed_for(events[i].id, self.policy.sha256) for i in idx]
            t0 = time.perf_counter()
            certs = self._certify(entry, X, seeds)
            self.certify_seconds += time.perf_counter() - t0
            r_threat = np.array([self._radius_threat(c, entry.model) for c in certs])
            if entry.context is not None:
                preds = np.array([-1 if c.predicted_class is None else c.predicted_class for c in certs])
                contexts = entry.context.context(X, preds, r_threat)
            else:
                contexts = [None] * len(idx)
            for j, i in enumerate(idx):
                records[i] = self._record(events[i], entry, certs[j], float(r_threat[j]), contexts[j], sources[i])
        return records  # type: ignore[return-value]

    def _record(self, ev: Event, entry: ModelEntry, cert, radius_threat: float, context, source: dict) -> dict:
        p = self.policy
        decision = p.evaluate(cert, upstream_risk=ev.upstream_risk, context=context, event_id=ev.id)
        d = decision.to_dict()
        now = utc_now()
        review = dict(d.get("review") or {})
        deadline_s = review.pop("deadline_seconds", None)
        review["deadline"] = (
            datetime.fromtimestamp(time.time() + deadline_s, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            if deadline_s is not None and (review.get("routed") or review.get("audit_sample")) else None
        )
        certificate = {**cert.to_dict(), "radius_threat": radius_threat, "threat_norm": p.threat_model.norm,
                       "threat_epsilon": p.threat_model.epsilon}
        inp = {"sha256": input_digest(ev.x), "shape": list(ev.x.shape), "datatype": ev.datatype}
        if self.review_include_input and (review.get("routed") or review.get("audit_sample")):
            inp["data"] = np.asarray(ev.x, dtype=np.float32).ravel().tolist()
        return {
            "id": ev.id,
            "ts": now,
            "event_ts": ev.time or source.get("timestamp"),
            "model": {"name": entry.name, "spec": entry.model.spec, "sha256": entry.model.sha256},
            "policy": {"name": p.name, "version": p.version, "sha256": p.sha256, "shadow": p.shadow},
            "certificate": certificate,
            "context": context,
            "signals": d["signals"],
            "score": d["score"],
            "decision": d["decision"],
            "would_be": d.get("would_be"),
            "rule": d["rule"],
            "reasons": d["reasons"],
            "controls": d["controls"],
            "review": review,
            "explanation": d["explanation"],
            "scope": cert.scope,
            "input": inp,
            "prediction": ev.prediction,
            "upstream_risk": ev.upstream_risk,
            "event_context": ev.context,
            "source": {k: v for k, v in source.items() if k != "timestamp"},
            "worker": self.worker,
        }

    def public(self, record: dict) -> dict:
        return self.policy.public_view(record)
