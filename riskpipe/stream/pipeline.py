"""The stage's work on a micro-batch of valid events: certify, contextualise, score,
build records. No Kafka and no files here: the Kafka stage and the offline mode both
call ``Pipeline.process``, so a batch is decided the same way wherever it came from.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.certify.norms import convert_radius
from riskpipe.certify.samplers import GridError
from riskpipe.ledger.chain import canonical_json, decision_scope
from riskpipe.ledger.inputs import input_fields
from riskpipe.models import Model
from riskpipe.policy.evaluate import evaluate_batch
from riskpipe.policy.signals import json_safe
from riskpipe.stream.errors import EventError
from riskpipe.stream.events import Event
from riskpipe.timestamps import from_epoch, rfc3339_millis, rfc3339_seconds

if TYPE_CHECKING:
    from riskpipe.certify.protocol import Certifier
    from riskpipe.context import ContextIndex
    from riskpipe.policy.schema import Policy

log = logging.getLogger("riskpipe.stream")
MIN_NOISE_KEY_BYTES = 32


def seed_for(key: bytes, event_id: str, scope: str) -> int:
    """The noise seed of an event's certificate: HMAC-SHA256 under the stage's secret key
    of (event id, decision scope: the policy's sha256, the model's sha256 and name,
    riskpipe.ledger.chain.decision_scope), so the sender, who picks the id, cannot pick
    the noise (riskpipe.app.noise_key), and one id sent to two models draws two noises;
    the record holds the seed, so an auditor recomputes the certificate from it."""
    mac = hmac.new(key, f"{event_id}\x00{scope}".encode(), hashlib.sha256).digest()
    return int.from_bytes(mac[:8], "big") >> 1




def event_digest(input_sha256: str | None, model: str | None, prediction, upstream_risk, context) -> str:
    """sha256 of everything in an event that decides its outcome: the tensor (by its
    digest), the model, the prediction, the upstream risk and the context. The same id
    re-used with any of them changed is an ``id_conflict`` (stream/triage.py)."""
    fields = [input_sha256, model, prediction, json_safe(upstream_risk), context]
    return hashlib.sha256(canonical_json(fields).encode("utf-8")).hexdigest()


def record_digest(record: dict) -> str:
    """``event_digest`` of the event a stored decision record was made for."""
    return event_digest((record.get("input") or {}).get("sha256"), (record.get("model") or {}).get("name"),
                        record.get("prediction"), record.get("upstream_risk"), record.get("event_context"))


@dataclass
class ModelEntry:
    """One model as the stage runs it (built by riskpipe.app.compose).

    ``model`` validates raw inputs; ``certified`` is what the certifier sees: the
    model itself, or with a per-feature ``scale`` s the wrapped g(z) = f(s * z) on
    z = x / s (riskpipe.models.scaled), so radii and context distances are in the
    scaled norm ||delta / s||."""

    name: str
    model: Model
    policy: Policy
    certifier: Certifier
    epsilon_cert: float  # decide target in the certificate's norm (Theorem 2 applied)
    # None when built: the model itself (set in __post_init__, so readers always find a Model)
    certified: Model = None  # type: ignore[assignment]
    context: ContextIndex | None = None
    scale: np.ndarray | None = None  # shaped like the input
    scale_desc: str | None = None
    labels: list[str] | None = None
    feature_names: list[str] | None = None
    batch_size_source: str | None = None  # how the certifier's batch size was chosen (riskpipe.tuning)
    # the file the policy was loaded from: its ledger ``policy`` row names it, so an evidence
    # bundle (riskpipe.report.bundle) can include the YAML without being given the config
    policy_source: str | None = None
    # one input (1 row, certified space) this entry's certifier has taken without raising: a
    # start-up probe input, then the last input the stage certified (Pipeline.healthy)
    known_good: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.certified is None:
            self.certified = self.model

    def to_certified(self, X: np.ndarray) -> np.ndarray:
        """Raw inputs -> the certified model's input space (x / s)."""
        return X if self.scale is None else (np.asarray(X, dtype=np.float32) / self.scale).astype(np.float32)


def certify(entry: ModelEntry, Z: np.ndarray, seeds: list[int]) -> list:
    """Certificates for ``Z`` (already in the certified model's space) as the entry's
    policy asks: the sequential decide test of radius >= epsilon, or a full radius."""
    certs = entry.certifier.run(entry.policy.certifier.mode, Z, seeds, entry.epsilon_cert)
    if entry.scale_desc is not None:  # the scope states the scaled norm
        certs = [c.replace(extra={**c.extra, "scale": entry.scale_desc}) for c in certs]
    return certs


def _log_faults(name: str, entry: ModelEntry, certs: list) -> None:
    """One warning per micro-batch with model faults (each is also in its record and metric)."""
    faults = [c for c in certs if c.reason == MODEL_FAULT]
    if faults:
        log.warning("model %s (%s): %d of %d inputs not certified, model_fault: %s", name, entry.model.spec,
                    len(faults), len(certs), faults[0].extra.get(MODEL_FAULT))


def radius_in_threat(entry: ModelEntry, cert) -> float:
    """The certified radius in the threat norm (Theorem 2, d = the certified input's dimension)."""
    return convert_radius(cert.radius, cert.norm, entry.policy.threat_model.norm, entry.certified.input_dim)


class Pipeline:
    """Models, each with its policy, certifier and context index, ready to decide
    batches. Built by ``riskpipe.app.compose.build_pipeline``; only computes."""

    def __init__(self, entries: dict[str, ModelEntry], *, noise_key: bytes, noise_key_source: str = "given",
                 worker: str = "w0", review_include_input: bool = True):
        if not entries:
            raise ValueError("entries: at least one model")
        if not isinstance(noise_key, bytes) or len(noise_key) < MIN_NOISE_KEY_BYTES:
            raise ValueError(f"noise_key: at least {MIN_NOISE_KEY_BYTES} bytes")
        self._noise_key = noise_key
        self.noise_key_source = noise_key_source  # for the start-up line; the key itself is never shown
        self.entries = entries
        self.worker = worker
        self.review_include_input = review_include_input
        # the stage sets this when it has a ledger: large inputs are then stored there once and
        # records carry a reference (riskpipe/ledger/inputs.py); without one they are inlined
        self.store_inputs = False
        self.certify_seconds = 0.0  # cumulative time inside certifiers (benchmarks read it)

    def healthy(self, name: str) -> bool | None:
        """Does model ``name`` still certify an input it has certified before (its
        ``known_good``, seed 0)? Asked when an event's certification ran out of memory on
        its own: True makes it that event's fault (its dead letter), False or None (no
        such input yet) the machine's (the stage pauses, riskpipe.stream.infra)."""
        entry = self.entries[name]
        if entry.known_good is None:
            return None
        try:
            certify(entry, entry.known_good, [0])
        except Exception:  # noqa: BLE001 - out of memory again, or worse: not a fault of the event
            return False
        return True

    def seed(self, event_id: str, model: str) -> int:
        """The noise seed of ``event_id``'s certificate by model ``model`` (seed_for)."""
        return seed_for(self._noise_key, event_id, self.scopes[model])

    @property
    def models(self) -> dict[str, Model]:
        """Models by name, for input validation (raw units, declared ranges)."""
        return {n: e.model for n, e in self.entries.items()}

    @property
    def policies(self) -> list[Policy]:
        """Every policy in force, once each (by sha256), in model order."""
        return [p for p, _ in self.policy_sources]

    @property
    def policy_sources(self) -> list[tuple[Policy, str | None]]:
        """``policies`` with the file each was loaded from (the first model's, when two
        files hold the same policy; None when the entry was built without one)."""
        out: dict[str, tuple[Policy, str | None]] = {}
        for e in self.entries.values():
            out.setdefault(e.policy.sha256, (e.policy, e.policy_source))
        return list(out.values())

    @property
    def scopes(self) -> dict[str, str]:
        """Each model's decision scope (ledger.chain.decision_scope): with the event id,
        the identity of the decisions this pipeline makes."""
        return {n: decision_scope("decision", {"policy": {"sha256": e.policy.sha256},
                                               "model": {"name": n, "sha256": e.model.sha256}})
                for n, e in self.entries.items()}

    def admit(self, ev: Event) -> None:
        """EventError for an input its model's certifier cannot take: ``non_finite`` when it
        leaves float32 once divided by the model's ``scale`` (3e38 / 0.2), ``off_grid`` off the
        sound sampler's grid; that event goes to the DLQ instead of failing its micro-batch."""

        entry = self.entries[ev.model]
        z = entry.to_certified(ev.x[None])
        if entry.scale is not None and not np.isfinite(z).all():
            j = int(np.argwhere(~np.isfinite(z.reshape(-1)))[0][0])
            raise EventError("non_finite", f"inputs[0].data: value {float(ev.x.reshape(-1)[j]):g} of feature {j} "
                                           f"divided by its scale {float(entry.scale.reshape(-1)[j]):g} (models."
                                           f"{ev.model}.scale) lies beyond float32; declare the model's range")
        try:
            entry.certifier.check_inputs(z)
        except GridError as e:
            raise EventError("off_grid", str(e)) from None

    def process(self, events: list[Event], sources: list[dict]) -> list[dict]:
        """Full decision records (docs/records.md), one per event, in input order."""
        records: list[dict | None] = [None] * len(events)
        by_model: dict[str, list[int]] = {}
        for i, ev in enumerate(events):
            by_model.setdefault(ev.model, []).append(i)
        scopes = self.scopes  # each model's decision scope, which its noise seeds cover
        for name, idx in by_model.items():
            entry = self.entries[name]
            Z = entry.to_certified(np.stack([events[i].x for i in idx]))
            seeds = [seed_for(self._noise_key, events[i].id, scopes[name]) for i in idx]
            t0 = time.perf_counter()
            certs = certify(entry, Z, seeds)
            self.certify_seconds += time.perf_counter() - t0
            entry.known_good = Z[:1].copy()  # not a view: it would keep the whole batch alive
            _log_faults(name, entry, certs)
            r_threat = np.array([radius_in_threat(entry, c) for c in certs])
            contexts: Sequence[dict | None]
            if entry.context is not None:
                preds = [c.predicted_class for c in certs]  # None (abstained): the nearest label stands in
                contexts = entry.context.context(Z, preds, r_threat,
                                                 support_quantile=entry.policy.signals.support_risk.quantile)
            else:
                contexts = [None] * len(idx)
            batch = [events[i] for i in idx]
            decisions = evaluate_batch(entry.policy, certs, [ev.upstream_risk for ev in batch], contexts,
                                       [ev.id for ev in batch], [ev.prediction for ev in batch])
            now, wall = rfc3339_millis(), time.time()  # one timestamp per micro-batch: its records are made together
            for j, i in enumerate(idx):
                records[i] = self._record(events[i], entry, certs[j], float(r_threat[j]), contexts[j], sources[i],
                                          decisions[j], now, wall)
        return records  # type: ignore[return-value]  # every event belongs to one model: no slot is left None

    def _record(self, ev: Event, entry: ModelEntry, cert, radius_threat: float, context, source: dict,
                decision, now: str, wall: float) -> dict:
        p = entry.policy
        d = decision.to_dict()
        review = dict(d.get("review") or {})
        deadline_s = review.pop("deadline_seconds", None)
        review["deadline"] = (
            rfc3339_seconds(from_epoch(wall + deadline_s))
            if deadline_s is not None and (review.get("routed") or review.get("audit_sample")) else None
        )
        certificate = {**cert.to_dict(), "radius_threat": radius_threat, "threat_norm": p.threat_model.norm,
                       "threat_epsilon": p.threat_model.epsilon}
        include = self.review_include_input and bool(review.get("routed") or review.get("audit_sample"))
        inp, _ = input_fields(ev.x, ev.datatype, ev.raw, include, self.store_inputs)
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
            "scope": certificate["scope"],
            "input": inp,
            "prediction": ev.prediction,
            "prediction_agrees": d["prediction_agrees"],
            "upstream_risk": json_safe(ev.upstream_risk),  # NaN is flagged, and JSON cannot carry it
            "event_context": ev.context,
            "source": {k: v for k, v in source.items() if k != "timestamp"},
            "worker": self.worker,
            "trace": ev.trace,
        }

    def public(self, record: dict) -> dict:
        """The public view of ``record`` under the policy that decided it. Where this stage
        serves more than one model, the view names the model (``model_name``) whatever the
        policy lists: one event id decided by two models gave two public decisions, same
        key, neither saying whose, and a consumer keeping the latest per key took the
        other model's ``allow``. The model name is no secret (a public field)."""
        name = record["model"]["name"]
        view = self.entries[name].policy.public_view(record)
        if len(self.entries) > 1 and "model_name" not in view:
            view["model_name"] = name
        return view
