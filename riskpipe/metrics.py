"""Prometheus metrics of the riskpipe stage.

Names follow Prometheus conventions: prefix ``riskpipe_``, base units (seconds),
``_total`` for counters, and labels with a small, bounded set of values (never an
event id, never a radius). The alert rules in ``deploy/prometheus/`` and the
Grafana dashboard in ``deploy/grafana/`` are written against these names; the
tests check that they stay in step.

Several worker processes (``riskpipe run --workers N``)
--------------------------------------------------------
prometheus_client keeps one process's values in memory, so with several workers
every worker must write its values to shared files and the serving process must
aggregate them (prometheus_client "multiprocess mode"):

1. the parent sets ``PROMETHEUS_MULTIPROC_DIR`` to an empty, writable directory
   *before* prometheus_client is imported anywhere (the value class is chosen at
   import time), and starts workers with the ``spawn`` method or as subprocesses;
2. each worker builds its own :class:`StageMetrics` and records as usual;
3. the parent serves with :func:`serve` (registry ``None``), which aggregates the
   files through ``MultiProcessCollector``;
4. when a worker exits the parent calls :func:`mark_worker_dead` so the ``live*``
   gauges drop that worker's values.

Counters and histograms are summed over workers. Gauges say how they combine:
consumer lag per partition and review backlog take the largest live value (a
partition revoked from a worker is reported by its new owner; the old owner sets
it to 0 with :meth:`StageMetrics.drop_lag`), broker-up and last-poll take the
smallest (one stuck worker is enough to alert). Info metrics cannot be stored in
multiprocess mode, so policy and build info become gauges of value 1 with the
same name and labels (what the text exposition of an Info metric is anyway).

Per model, per policy
---------------------
Every decision, certificate, radius, fault and latency metric carries ``model`` and
``policy`` (the policy's name) labels: radii of a model certified in pixel units
and of one in standardised units never share a histogram, and each model's
abstention rate is its own. The values come from the config:
:meth:`StageMetrics.declare` names the stage's models with their policies (the
stage does that at start-up), pre-registers their series at zero, and a record of
any other model or policy is refused (``ValueError``), so the label set stays
the config's. ``riskpipe_policy_info{model, name, version, sha256}`` says which
policy version each model runs. DLQ messages stay unlabelled by model: a message
that cannot be parsed names no model, and one naming an unknown model must not
mint a label value.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import re
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
    make_wsgi_app,
    multiprocess,
    values,
)
from prometheus_client.exposition import ThreadingWSGIServer

import riskpipe
from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.decisions import DECISIONS

PREFIX = "riskpipe"

# The *_created series double the series count and nothing here queries them.
disable_created_metrics()

MODEL_LABELS = ("model", "policy")
EVENT_OUTCOMES = ("decided", "dlq", "duplicate", "other_model")
CERTIFICATE_OUTCOMES = ("certified", "abstained", "below_epsilon")
# DLQ reason codes (docs/records.md); anything else is counted as "other" so a
# bug can never explode the label set.
DLQ_REASONS = (
    "invalid_json", "not_an_object", "missing_field", "wrong_type", "wrong_dtype",
    "wrong_shape", "non_finite", "out_of_range", "unknown_model", "oversized",
    "unsupported_cloudevent", "bad_id", "bad_binary_header", "binary_size_mismatch", "off_grid",
    "bad_time", "duplicate_key", "id_conflict", "output_too_large", "internal_error", "model_timeout",
)
# levels of a model-timeout suspect (riskpipe.stream.watchdog): hung within a batch, hung alone
SUSPECT_LEVELS = ("batch", "alone")
REVIEW_VERDICTS = ("confirmed_clean", "confirmed_manipulated", "unsure")

# Bucket boundaries. Radii are distances in the threat-model norm, in each model's own
# units: l_inf radii on [0, 1] pixels sit around 1e-3..0.5, l2 radii around 0.01..10,
# radii on 0..255 pixels or raw tabular units reach the hundreds; geometric buckets
# 1-2-5 from 1e-4 to 1e3 cover them all (each model has its own histogram).
RADIUS_BUCKETS = tuple(round(m * 10.0 ** e, 6) for e in range(-4, 3) for m in (1, 2, 5)) + (1000.0,)
SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 1.0)
EVALUATION_BUCKETS = (1, 10, 30, 100, 300, 1_000, 3_000, 10_000, 30_000, 100_000)
CERTIFY_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
END_TO_END_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                      30.0, 60.0, 120.0, 300.0)
REVIEW_SECONDS_BUCKETS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600,
                          24 * 3600, 72 * 3600)

_LABEL_VALUE = re.compile(r"[^A-Za-z0-9_.:-]")


def multiprocess_enabled() -> bool:
    """True when PROMETHEUS_MULTIPROC_DIR is set (prometheus_client multiprocess mode)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or
                os.environ.get("prometheus_multiproc_dir"))  # noqa: SIM112 - the client's legacy name


def _check_multiprocess_setup() -> None:
    """Fail loudly if the env var was set after prometheus_client chose its value class."""

    if multiprocess_enabled() and values.ValueClass is values.MutexValue:
        raise RuntimeError(
            "PROMETHEUS_MULTIPROC_DIR: set after prometheus_client was imported; set it "
            "before starting the worker process (see riskpipe/metrics.py)")
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get(
        "prometheus_multiproc_dir")  # noqa: SIM112 - the client's legacy name
    if directory and not os.path.isdir(directory):
        raise RuntimeError(f"PROMETHEUS_MULTIPROC_DIR: {directory!r} is not a directory")


def _label(value: Any, default: str = "unknown", limit: int = 64) -> str:
    """A short, safe label value (labels must stay low-cardinality and printable)."""
    if value is None or value == "":
        return default
    return _LABEL_VALUE.sub("_", str(value))[:limit]


class _InfoMetric:
    """An Info metric holding one or more label sets (value 1 each) that also works in
    multiprocess mode (as a gauge of value 1)."""

    def __init__(self, name: str, doc: str, labelnames: tuple[str, ...],
                 registry: CollectorRegistry) -> None:
        self._labelnames = labelnames
        self._current: set[tuple[str, ...]] = set()
        if multiprocess_enabled():
            self._gauge: Gauge | None = Gauge(f"{name}_info", doc, labelnames,
                                              registry=registry, multiprocess_mode="livemax")
            self._info: Info | None = None
        else:
            self._gauge = None
            self._info = Info(name, doc, labelnames, registry=registry)

    def set(self, values: Mapping[str, str]) -> None:
        self.set_many([values])

    def set_many(self, many: list[Mapping[str, str]]) -> None:
        """Exactly these label sets are current; earlier ones are dropped."""
        now = {tuple(v[n] for n in self._labelnames) for v in many}
        for old in self._current - now:
            if self._info is not None:
                self._info.remove(*old)
            else:  # label removal is not possible across processes: mark the old one 0
                assert self._gauge is not None
                self._gauge.labels(*old).set(0)
        for labels in now:
            if self._info is not None:
                self._info.labels(*labels).info({})
            else:
                assert self._gauge is not None
                self._gauge.labels(*labels).set(1)
        self._current = now


def _torch_version() -> str:
    # From the installed distribution: importing torch here would cost seconds.
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - a hard dependency
        return "none"


class StageMetrics:
    """Every metric the stage exports, with one method per thing that happens.

    ``registry=None`` creates a private registry (so several instances can coexist,
    e.g. in tests); pass ``prometheus_client.REGISTRY`` to add process metrics.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        _check_multiprocess_setup()
        self.registry = registry if registry is not None else CollectorRegistry()
        # registered in this order, which is the order of the exposition text
        self._decision_metrics(self.registry)
        self._distribution_metrics(self.registry)
        self._queue_metrics(self.registry)
        self._identity_metrics(self.registry)
        self._runtime_metrics(self.registry)

    def _decision_metrics(self, r: CollectorRegistry) -> None:
        """Events by outcome; decisions, certificates, model faults and deadlines by model and policy."""
        mp = list(MODEL_LABELS)
        self.events = Counter(f"{PREFIX}_events_total", "Input events by outcome.",
                              ["outcome"], registry=r)
        self.decisions = Counter(f"{PREFIX}_decisions_total", "Decisions by model, policy and kind.",
                                 [*mp, "decision"], registry=r)
        self.certificates = Counter(
            f"{PREFIX}_certificates_total",
            "Certificates by model, policy, method and outcome (certified in the threat model, "
            "abstained, or radius below the threat epsilon).",
            [*mp, "method", "outcome"], registry=r)
        self.model_faults = Counter(
            f"{PREFIX}_model_faults_total",
            "Inputs whose certificate is a model_fault: the model's output for them (or their noise "
            "batch) was not finite or not (N, C); never allowed.",
            ["model"], registry=r)
        self.certify_deadline = Counter(
            f"{PREFIX}_certify_deadline_total",
            "Inputs whose certification stopped at the policy's latency budget (max_latency_ms), "
            "treated as not certified.",
            [*mp, "method"], registry=r)

    def _distribution_metrics(self, r: CollectorRegistry) -> None:
        """Histograms per model and policy: radius, score, model evaluations, latencies."""
        mp = list(MODEL_LABELS)
        self.radius = Histogram(
            f"{PREFIX}_certified_radius",
            "Certified radius converted to the policy's threat-model norm (Theorem 2), per model: "
            "each model's radii are in its own units (pixels, standardised features); "
            "abstentions are not observed.",
            [*mp, "norm"], buckets=RADIUS_BUCKETS, registry=r)
        self.score = Histogram(f"{PREFIX}_risk_score", "Composite risk score in [0, 1].",
                               mp, buckets=SCORE_BUCKETS, registry=r)
        self.evaluations = Histogram(
            f"{PREFIX}_model_evaluations", "Model evaluations used by one certificate.",
            [*mp, "method"], buckets=EVALUATION_BUCKETS, registry=r)
        self.certify_seconds = Histogram(
            f"{PREFIX}_certification_duration_seconds", "Time to compute one certificate.",
            [*mp, "method"], buckets=CERTIFY_SECONDS_BUCKETS, registry=r)
        self.end_to_end_seconds = Histogram(
            f"{PREFIX}_end_to_end_latency_seconds",
            "From event time (or Kafka timestamp) to the decision being emitted.",
            mp, buckets=END_TO_END_BUCKETS, registry=r)

    def _queue_metrics(self, r: CollectorRegistry) -> None:
        """Where messages wait or go aside: the dead-letter topic, human review, consumer lag."""
        self.dlq_messages = Counter(f"{PREFIX}_dlq_messages_total",
                                    "Messages sent to the dead-letter topic, by reason.",
                                    ["reason"], registry=r)
        self.review_routed = Counter(f"{PREFIX}_review_routed_total",
                                     "Decisions routed to human review, by model, policy and first reason code.",
                                     [*MODEL_LABELS, "reason"], registry=r)
        self.lag = Gauge(f"{PREFIX}_consumer_lag_messages",
                         "Messages behind the partition's end offset.",
                         ["topic", "partition"], registry=r, multiprocess_mode="livemax")
        self.input_recreated = Counter(
            f"{PREFIX}_input_partition_recreated_total",
            "Input partitions found re-created (a new topic id: the broker lost its data, or the topic was deleted "
            "and made again) and read again from their start.", ["topic", "partition"], registry=r)

    def _identity_metrics(self, r: CollectorRegistry) -> None:
        """What runs: the policy in force for each model, and the riskpipe build."""
        self.policy_info = _InfoMetric(f"{PREFIX}_policy", "The policy in force for each model.",
                                       ("model", "name", "version", "sha256"), r)
        self._declared: set[tuple[str, str]] = set()
        self.policy_loaded = Gauge(f"{PREFIX}_policy_loaded_timestamp_seconds",
                                   "Unix time the policy in force was loaded.",
                                   registry=r, multiprocess_mode="livemax")
        self.build_info = build_info(r)

    def _runtime_metrics(self, r: CollectorRegistry) -> None:
        """The stage's connections (broker, ledger outages, polls) and how it is tuned."""
        self.broker_errors = Counter(f"{PREFIX}_broker_errors_total",
                                     "Errors talking to the Kafka broker, by kind.",
                                     ["kind"], registry=r)
        self.broker_up = Gauge(f"{PREFIX}_broker_up",
                               "1 when the stage is connected to the broker, else 0.",
                               registry=r, multiprocess_mode="livemin")
        self.reconnects = Counter(f"{PREFIX}_broker_reconnects_total",
                                  "Reconnections to the broker.", registry=r)
        self.infrastructure_outage = Gauge(
            f"{PREFIX}_infrastructure_outage",
            "1 while the stage is paused because its ledger, broker or memory is unavailable, else 0.",
            registry=r, multiprocess_mode="livemax")
        self.infrastructure_retries = Counter(
            f"{PREFIX}_infrastructure_retries_total",
            "Failed attempts while paused for an unavailable component (ledger, broker or memory).",
            ["component"], registry=r)
        self.model_hang_suspects = Gauge(
            f"{PREFIX}_model_hang_suspects",
            "Input positions whose certification model call ran past model_timeout_s (ledger kind model_timeout), "
            "by level: batch (each decided alone), alone (dead-lettered model_timeout).",
            ["level"], registry=r, multiprocess_mode="livemax")
        for level in SUSPECT_LEVELS:
            self.model_hang_suspects.labels(level)
        self.last_poll = Gauge(f"{PREFIX}_last_poll_timestamp_seconds",
                               "Unix time of the stage's last poll of the input topic.",
                               registry=r, multiprocess_mode="livemin")
        self.kafka_crc32c = _InfoMetric(
            f"{PREFIX}_kafka_crc32c",
            "CRC-32C implementation kafka-python uses (pure-python is about half as fast).",
            ("implementation",), r)
        self.certify_batch_size = Gauge(
            f"{PREFIX}_certify_batch_size",
            "Noise samples per model call in certification, per model, and how it was chosen "
            "(probe, cache or config).",
            ["model", "source"], registry=r, multiprocess_mode="livemax")

    # -- events and decisions -------------------------------------------------
    def event(self, outcome: str) -> None:
        """Count one input event: decided, dlq, duplicate or other_model (skipped: another stage's)."""
        if outcome not in EVENT_OUTCOMES:
            raise ValueError(f"outcome: {outcome!r} is not one of {EVENT_OUTCOMES}")
        self.events.labels(outcome).inc()

    def declare(self, models: Mapping[str, Any]) -> None:
        """The stage's models, each with the policy that decides its events (name,
        version, sha256, certifier.method, threat_model.norm, as riskpipe.policy has
        them): the only label values decision metrics accept. Their series start at
        zero, and ``riskpipe_policy_info`` names each model's policy version."""
        declared = set()
        infos: list[Mapping[str, str]] = []
        for model, policy in models.items():
            labels = (_label(model), _label(policy.name))
            declared.add(labels)
            method, norm = _label(policy.certifier.method), _label(policy.threat_model.norm)
            for decision in DECISIONS:
                self.decisions.labels(*labels, decision)
            for outcome in CERTIFICATE_OUTCOMES:
                self.certificates.labels(*labels, method, outcome)
            for metric in (self.certify_deadline, self.evaluations, self.certify_seconds):
                metric.labels(*labels, method)
            self.model_faults.labels(labels[0])
            self.radius.labels(*labels, norm)
            self.score.labels(*labels)
            self.end_to_end_seconds.labels(*labels)
            infos.append({"model": labels[0], "name": labels[1], "version": _label(policy.version),
                          "sha256": _label(policy.sha256)})
        self._declared = declared
        self.policy_info.set_many(infos)
        self.policy_loaded.set(time.time())

    def model_labels(self, record: Mapping[str, Any]) -> tuple[str, str]:
        """(model, policy) of a decision record; ValueError unless :meth:`declare` named them."""
        model = record.get("model")
        if isinstance(model, Mapping):
            model = model.get("name")
        labels = (_label(model), _label((record.get("policy") or {}).get("name")))
        if labels not in self._declared:
            raise ValueError(f"model {labels[0]!r} under policy {labels[1]!r}: not a model and policy of "
                             f"this stage's config (declared: {sorted(self._declared)})")
        return labels

    def decision(self, record: Mapping[str, Any]) -> None:
        """Record everything a full decision record (docs/records.md) says, under its
        model and policy.

        Missing optional fields are skipped rather than raised; a model or policy the
        config does not name is refused (see :meth:`declare`).
        """
        labels = self.model_labels(record)
        self.decisions.labels(*labels, _label(record.get("decision"))).inc()
        cert = record.get("certificate") or {}
        method = _label(cert.get("method"))
        self.certificates.labels(*labels, method, certificate_outcome(cert)).inc()
        if cert.get("reason") == MODEL_FAULT:
            self.model_faults.labels(labels[0]).inc()
        if cert.get("reason") == "deadline":
            self.certify_deadline.labels(*labels, method).inc()
        radius = _number(cert.get("radius_threat"))
        if radius is not None and not cert.get("abstained"):
            norm = cert.get("threat_norm") or cert.get("norm")
            self.radius.labels(*labels, _label(norm)).observe(radius)
        score = _number(record.get("score"))
        if score is not None:
            self.score.labels(*labels).observe(score)
        n = _number(cert.get("n_samples"))
        if n is not None:
            self.evaluations.labels(*labels, method).observe(n)
        ms = _number(cert.get("elapsed_ms"))
        if ms is not None:
            self.certify_seconds.labels(*labels, method).observe(ms / 1000.0)
        review = record.get("review") or {}
        if review.get("routed"):
            self.review_routed.labels(*labels, review_reason(record)).inc()

    def end_to_end(self, record: Mapping[str, Any], seconds: float) -> None:
        """Event time to emitted decision for ``record`` (under its model and policy)."""
        self.end_to_end_seconds.labels(*self.model_labels(record)).observe(max(0.0, float(seconds)))

    def dlq(self, reason: str) -> None:
        self.dlq_messages.labels(reason if reason in DLQ_REASONS else "other").inc()

    # -- consumer -------------------------------------------------------------
    def set_lag(self, topic: str, partition: int, lag: int | float) -> None:
        labels = (_label(topic, limit=249), str(int(partition)))
        self.lag.labels(*labels).set(max(0, lag))
        # the partition's re-creation counter exists at 0 before it counts: increase() takes
        # nothing from a series' first sample, so one born at 1 never fired RiskpipeInputRecreated
        self.input_recreated.labels(*labels)

    def drop_lag(self, topic: str, partition: int) -> None:
        """Forget a partition revoked in a rebalance (its new owner reports it)."""
        labels = (_label(topic, limit=249), str(int(partition)))
        if multiprocess_enabled():
            self.lag.labels(*labels).set(0)
        else:
            self.lag.remove(*labels)

    def poll(self) -> None:
        """Note a poll of the input topic (the "not consuming" alert watches this)."""
        self.last_poll.set(time.time())

    def broker_error(self, kind: str) -> None:
        self.broker_errors.labels(_label(kind, limit=40)).inc()

    def set_broker_up(self, up: bool) -> None:
        self.broker_up.set(1 if up else 0)

    def reconnect(self) -> None:
        self.reconnects.inc()

    def partition_recreated(self, topic: str, partition: int) -> None:
        self.input_recreated.labels(_label(topic, limit=249), str(int(partition))).inc()

    def infrastructure_retry(self, component: str) -> None:
        """One failed attempt while ``component`` is unavailable; the outage gauge goes to 1."""
        self.infrastructure_retries.labels(_label(component, limit=16)).inc()
        self.infrastructure_outage.set(1)

    def set_infrastructure_outage(self, on: bool) -> None:
        self.infrastructure_outage.set(1 if on else 0)

    def set_model_hang_suspects(self, counts: Mapping[str, int]) -> None:
        """The suspect positions the stage read from its ledger, by level (riskpipe.stream.watchdog)."""
        for level in SUSPECT_LEVELS:
            self.model_hang_suspects.labels(level).set(counts.get(level, 0))

    # -- start-up facts -----------------------------------------------------------
    def set_kafka_crc32c(self, implementation: str) -> None:
        self.kafka_crc32c.set({"implementation": _label(implementation)})

    def set_certify_batch_size(self, model: str, size: int, source: str) -> None:
        self.certify_batch_size.labels(_label(model), _label(source)).set(int(size))

    # -- exposition ----------------------------------------------------------------
    def serve(self, port: int, stall_seconds: float, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve this instance's metrics (all workers' in multiprocess mode)."""
        return serve(port, stall_seconds, addr, None if multiprocess_enabled() else self.registry)


def build_info(r: CollectorRegistry) -> _InfoMetric:
    """``riskpipe_build_info{version, python, torch}``: which riskpipe a process runs."""
    info = _InfoMetric(f"{PREFIX}_build", "riskpipe build.", ("version", "python", "torch"), r)
    info.set({"version": riskpipe.__version__, "python": platform.python_version(), "torch": _torch_version()})
    return info


class ReviewMetrics:
    """What the review console exports: the queue it serves (backlog, oldest item's age,
    deadline breaches) and its reviewers' verdicts, plus ``riskpipe_build_info``.

    Only the console measures the queue, so only it exports these. A stage that exported
    them as well (it did, as constant zeros) would show a backlog of 0 wherever no console
    runs, and the backlog alerts could never fire while routed items pile up; without the
    series ``RiskpipeReviewQueueUnwatched`` fires instead."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry if registry is not None else CollectorRegistry()
        self.review_backlog = Gauge(f"{PREFIX}_review_backlog",
                                    "Items in the review queue awaiting a verdict.", registry=r)
        self.review_backlog_age = Gauge(f"{PREFIX}_review_backlog_oldest_age_seconds",
                                        "Age of the oldest review item awaiting a verdict (0 when none waits).",
                                        registry=r)
        self.review_verdicts = Counter(f"{PREFIX}_review_verdicts_total",
                                       "Review verdicts received, by verdict.",
                                       ["verdict"], registry=r)
        self.review_seconds = Histogram(
            f"{PREFIX}_review_time_to_verdict_seconds",
            "From the decision to the reviewer's verdict.",
            ["verdict"], buckets=REVIEW_SECONDS_BUCKETS, registry=r)
        self.review_deadline_breaches = Counter(
            f"{PREFIX}_review_deadline_breaches_total",
            "Review items whose deadline passed without a verdict.", registry=r)
        self.build_info = build_info(r)

    def set_review_backlog(self, n: int) -> None:
        self.review_backlog.set(max(0, n))

    def set_review_backlog_age(self, seconds: float) -> None:
        self.review_backlog_age.set(max(0.0, seconds))

    def review_verdict(self, verdict: str, seconds_to_review: float | None) -> None:
        v = verdict if verdict in REVIEW_VERDICTS else "other"
        self.review_verdicts.labels(v).inc()
        if seconds_to_review is not None:
            self.review_seconds.labels(v).observe(max(0.0, float(seconds_to_review)))

    def review_deadline_breach(self) -> None:
        self.review_deadline_breaches.inc()


def certificate_outcome(cert: Mapping[str, Any]) -> str:
    """certified / abstained / below_epsilon, judged in the policy's threat model."""
    if cert.get("abstained"):
        return "abstained"
    certified = cert.get("certified")
    if certified is not None:
        return "certified" if certified else "below_epsilon"
    radius = _number(cert.get("radius_threat"))
    epsilon = _number(cert.get("threat_epsilon"))
    if radius is None:
        return "below_epsilon"
    if epsilon is None:
        return "certified" if radius > 0 else "below_epsilon"
    return "certified" if radius >= epsilon else "below_epsilon"


def review_reason(record: Mapping[str, Any]) -> str:
    """The label a review routing is counted under: audit_sample or the first reason."""
    review = record.get("review") or {}
    if review.get("audit_sample"):
        return "audit_sample"
    reasons = record.get("reasons") or []
    return _label(reasons[0] if reasons else None, default="unspecified")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# -- serving ----------------------------------------------------------------------

def exposition_registry(registry: CollectorRegistry | None = None) -> CollectorRegistry:
    """The registry to expose: ``registry``, or all workers' files in multiprocess mode."""
    if registry is not None:
        return registry
    if not multiprocess_enabled():
        raise ValueError("registry: required unless PROMETHEUS_MULTIPROC_DIR is set")
    # Only reads the workers' files, so the import-order check does not apply here.
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged)
    return merged


def expose(registry: CollectorRegistry | None = None) -> bytes:
    """The Prometheus text exposition of ``registry`` (or of all workers)."""
    return generate_latest(exposition_registry(registry))


def mark_worker_dead(pid: int) -> None:
    """Drop a dead worker's live gauges (call from the parent when a worker exits)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(pid)


def last_poll_age(registry: CollectorRegistry, now: float | None = None) -> float | None:
    """Seconds since the stalest worker's last poll, or None before any poll."""
    for family in registry.collect():
        if family.name == f"{PREFIX}_last_poll_timestamp_seconds":
            stamps = [s.value for s in family.samples if s.value > 0]
            if stamps:
                return (now if now is not None else time.time()) - min(stamps)
    return None


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # stdlib name
        pass


class MetricsServer:
    """A running metrics endpoint; ``shutdown()`` stops it and frees the port."""

    def __init__(self, httpd: ThreadingWSGIServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        self.port: int = httpd.server_port
        self.addr: str = str(httpd.server_address[0])

    @property
    def url(self) -> str:
        return f"http://{self.addr}:{self.port}/metrics"

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def health_app(registry: CollectorRegistry, stall_seconds: float):
    """WSGI app: ``/metrics`` and ``/healthz``, which fails once polling has stalled.

    /healthz is for a liveness probe: it answers 200 until the stage has polled
    at least once and then gone ``stall_seconds`` without polling (a wedged loop),
    which a restart may fix. It does not look at the broker: restarting pods does
    not fix a broker outage, and the broker_up alert covers that.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/healthz":
            age = last_poll_age(registry)
            if age is not None and age > stall_seconds:
                start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
                return [f"stalled: no poll for {age:.0f} s\n".encode()]
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"ok\n"]
        return metrics_app(environ, start_response)

    return app


def serve(port: int, stall_seconds: float, addr: str = "127.0.0.1",
          registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``/metrics`` and ``/healthz`` on ``addr:port`` in a daemon thread.

    ``port=0`` picks a free port (see ``.port``). ``registry=None`` serves all
    workers' metrics in multiprocess mode.
    """
    if not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics_port: {port!r} is not a TCP port")
    app = health_app(exposition_registry(registry), stall_seconds)
    try:
        httpd = make_server(addr, int(port), app, ThreadingWSGIServer, handler_class=_QuietHandler)
    except OSError as e:  # a port taken, an address that does not resolve or is not this host's
        # the CLI prints an OSError as "FILENAME: STRERROR": the settings, then why
        where = f"metrics_addr {addr!r}, metrics_port {port}"
        raise OSError(e.errno, f"cannot listen: {e.strerror or e}", where) from None
    thread = threading.Thread(target=httpd.serve_forever, name="riskpipe-metrics", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


def metric_names(registry: CollectorRegistry | None = None) -> set[str]:
    """Every sample name ``registry`` exports (``_total``, ``_bucket``, ``_info``...); by
    default the stage's (StageMetrics) and the review console's (ReviewMetrics).

    Dashboards and alert rules may only query these; the deploy tests check that.
    """
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"),
                "info": ("_info",), "gauge": ("",)}
    registries = [registry] if registry is not None else [StageMetrics().registry, ReviewMetrics().registry]
    families = [f for r in registries for f in r.collect()]
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}
