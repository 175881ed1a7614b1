"""The observer: the stage's one place for counting — stats, Prometheus metrics and
the user's callbacks (``on_record`` per decided record, ``on_batch`` per batch).

Batches are counted only after their commit: a batch that failed to flush is
redelivered and counted then (its events as ``decided``, and as ``redelivered`` too
when their ledger rows were already written by the failed attempt).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.stream.ports import Source
from riskpipe.stream.status import log_models

log = logging.getLogger("riskpipe.stream")


@dataclass
class Stats:
    events: int = 0
    decided: int = 0
    duplicates: int = 0
    other_models: int = 0  # events of models other stages serve on the input topic (config other_models): skipped
    # of ``decided``: already in the ledger from a batch whose commit never happened
    # (crash or broker error after the ledger write); counted now, outputs sent again
    redelivered: int = 0
    # of ``decided``: events the ledger already held a decision of under another model
    # or policy, by "policy NAME vV (sha256 ...), model ..." (decided anew under this one)
    earlier: Counter = field(default_factory=Counter)
    dlq: dict = field(default_factory=lambda: defaultdict(int))
    decisions: dict = field(default_factory=lambda: defaultdict(int))
    abstained: int = 0
    model_faults: int = 0  # of ``decided``: certificates with reason model_fault
    broker_errors: int = 0
    infrastructure_retries: dict = field(default_factory=lambda: defaultdict(int))  # by component
    reconnects: int = 0
    recreated: int = 0  # input partitions found re-created and read again from their start
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0
    lag: int | None = None  # messages behind the input partitions' ends (Kafka sources), last seen


class Observer:
    broker_up: bool | None = None  # last known: None before the source opens, or without a broker

    def __init__(self, metrics=None, on_record=None, on_batch=None, progress=None):
        self.metrics = metrics
        self.progress = progress  # riskpipe.stream.status.Progress: the periodic line for people
        self.on_record = on_record
        self.on_batch = on_batch  # (messages, seconds, certify seconds) per committed batch
        self.stats = Stats()

    def started(self, pipeline) -> None:
        """Log one line per model for people; declare the pipeline's models and their
        policies: the label values of every per-model metric."""

        log_models(pipeline)
        if self.metrics:
            self.metrics.declare({name: e.policy for name, e in pipeline.entries.items()})

    def connected(self) -> None:
        self.broker_up = True
        if self.metrics:
            self.metrics.set_broker_up(True)

    def polled(self) -> None:
        if self.metrics:
            self.metrics.poll()

    def lag(self, source: Source) -> None:
        """Once per turn of the loop: consumer lag, then the progress line when due."""
        due = self.progress is not None and self.progress.due()
        self._reachable(source.connected)
        if self.metrics or due:
            lags = source.lag()
            self.stats.lag = int(sum(lags.values())) if lags else None  # None: a file, or no partitions yet
            if self.metrics:
                for (topic, part), lag in lags.items():
                    self.metrics.set_lag(topic, part, lag)
        if due:
            self.progress.report(self.stats)

    def _reachable(self, up: bool | None) -> None:
        """The source's broker reachable or not (None: it has none), checked every turn:
        ``riskpipe_broker_up`` follows it, and each change is logged once."""
        if up is None or up == self.broker_up:
            return
        if self.broker_up is not None or not up:
            log.warning("broker %s", "reachable again" if up else
                        "unreachable: the consumer lost its group coordinator (riskpipe_broker_up 0)")
        self.broker_up = up
        if self.metrics:
            self.metrics.set_broker_up(up)

    def finished(self) -> None:
        """The stage stops: a last progress line when lines are on and work was done since
        the previous one (a run shorter than one interval still gets its line)."""
        if self.progress is not None and self.progress.pending(self.stats):
            self.progress.report(self.stats)

    def recreated(self, partitions: list[tuple[str, int]]) -> None:
        """Input partitions the source found re-created and reads again from their start."""
        self.stats.recreated += len(partitions)
        if self.metrics:
            for topic, partition in partitions:
                self.metrics.partition_recreated(topic, partition)

    def revoked(self, partitions) -> None:
        if self.metrics:
            for tp in partitions:
                self.metrics.drop_lag(tp.topic, tp.partition)

    def infrastructure_error(self, component: str, e: Exception) -> None:
        """One failed attempt while ``component`` (ledger, broker or memory) is unavailable."""
        self.stats.infrastructure_retries[component] += 1
        if component == "broker":
            self.broker_up = False
            self.stats.broker_errors += 1
            self.stats.reconnects += 1
        if self.metrics:
            self.metrics.infrastructure_retry(component)
            if component == "broker":
                self.metrics.broker_error(type(e).__name__)
                self.metrics.set_broker_up(False)
                self.metrics.reconnect()

    def suspects(self, counts: Mapping[str, int]) -> None:
        """The model-timeout suspects read from the ledger, by level (riskpipe.stream.watchdog)."""
        if self.metrics:
            self.metrics.set_model_hang_suspects(counts)

    def outage_over(self) -> None:
        if self.metrics:
            self.metrics.set_infrastructure_outage(False)

    def committed(self, outcome) -> None:
        s = self.stats
        s.events += len(outcome.messages)
        s.busy_s += outcome.seconds
        s.duplicates += len(outcome.duplicates)
        s.other_models += len(outcome.other_models)
        s.redelivered += len(outcome.redelivered)
        s.earlier.update(outcome.earlier)
        if self.on_batch:
            self.on_batch(len(outcome.messages), outcome.seconds, outcome.certify_seconds)
        m = self.metrics
        now = time.time()
        for d in outcome.decided + outcome.redelivered:
            rec = d.record
            s.decided += 1
            s.decisions[rec["decision"]] += 1
            if rec["certificate"]["abstained"]:
                s.abstained += 1
            if rec["certificate"].get("reason") == MODEL_FAULT:
                s.model_faults += 1
            if m:
                m.decision(rec)
                m.event("decided")
                if d.enqueued:
                    m.end_to_end(rec, max(0.0, now - d.enqueued))
        for dead in outcome.dead:
            s.dlq[dead.reason] += 1
            if m:
                m.dlq(dead.reason)
                m.event("dlq")
        if m:
            for _ in outcome.duplicates:
                m.event("duplicate")
            for _ in outcome.other_models:
                m.event("other_model")
        if self.on_record:
            for d in outcome.decided + outcome.redelivered:
                self.on_record(d.record)
