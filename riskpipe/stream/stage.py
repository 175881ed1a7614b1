"""The stage loop. Read it top to bottom to follow one batch:

  Batcher (poll; close by size or latency)
    ─► handle(): parse + validate ─► ledger lookup of the ids ─► triage
                 ─► decide (Pipeline.process) ─► serialise outputs
    ─► Guards (stop loudly if a partition is mostly invalid)
    ─► Committer: ledger rows ─► send ... (next batch handled meanwhile) ... flush (acks)
                  ─► commit offsets ─► hooks
    ─► Observer: stats, metrics, callbacks

Poison isolation is one mechanism: every step of ``handle`` runs per event or, for
the model batch, falls back to one event at a time when the batch fails; whatever
an event raises makes *that* event a dead letter (``internal_error``, exception type
and message in the record and the ``__riskpipe.errors.*`` headers). The committer
applies the same rule to ledger rows. So data never stops the stage: it exits
non-zero only for its configuration (a tripped guard) or infrastructure.

At-least-once: see ``committer`` for the order of side effects and the argument,
crash point by crash point.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time

from riskpipe.stream.batcher import Batcher
from riskpipe.stream.committer import Committer, Decided, Outcome
from riskpipe.stream.events import parse_event
from riskpipe.stream.guard import GuardTripped, Guards, PartitionGuard  # noqa: F401 - re-exported
from riskpipe.stream.io import Message, SinkError
from riskpipe.stream.observer import Observer, Stats  # noqa: F401 - re-exported
from riskpipe.stream.outputs import check_sizes, decision_outputs
from riskpipe.stream.pipeline import Pipeline
from riskpipe.stream.triage import Accepted, Dead, classify, parse_batch

log = logging.getLogger("riskpipe.stream")


class Stage:
    def __init__(self, config, pipeline: Pipeline, make_source, make_sink, ledger=None, metrics=None,
                 on_record=None, on_batch=None, after_commit=None):
        self.config = config
        self.pipeline = pipeline
        self.make_source, self.make_sink = make_source, make_sink
        self.source = self.sink = None
        self.ledger = ledger
        self.batcher = Batcher(config.batch.max_events, config.batch.max_wait_ms)
        self.guards = Guards(config.guard)
        self.committer = Committer(ledger, config.topics.dlq, after_commit)
        self.observer = Observer(metrics, on_record, on_batch)
        self.stopping = threading.Event()
        self.in_flight: Outcome | None = None  # submitted, acks outstanding, offsets not committed

    @property
    def stats(self) -> Stats:
        return self.observer.stats

    # ---- lifecycle -------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            log.info("signal %s: draining in-flight work, then exiting", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def stop(self) -> None:
        self.stopping.set()

    def _open(self) -> None:
        self.sink = self.make_sink()
        self.source = self.make_source(self._on_revoke)
        self.observer.connected()

    def _close(self) -> None:
        for c in (self.source, self.sink):
            if c is not None:
                c.close()
        self.source = self.sink = None

    def _on_revoke(self, revoked) -> None:
        if self.in_flight is not None:
            # No commit inside the rebalance callback (kafka-python 3 forbids it): the
            # batch in flight is left uncommitted; its rows are in the ledger, so the new
            # owner re-sends its stored outputs (committer: "after 1, before 4").
            log.info("rebalance: %d in-flight messages left uncommitted", len(self.in_flight.messages))
            self.in_flight = None
        dropped = self.batcher.drop_partitions({(tp.topic, tp.partition) for tp in revoked})
        self.observer.revoked(revoked)
        if dropped:
            log.info("rebalance: dropped %d unprocessed messages (the new owner re-reads them)", dropped)

    def _holds_partitions(self) -> bool:
        """Does the source hold input now? (a Kafka consumer between assignments does not)"""
        return getattr(self.source, "holds_partitions", True)

    def run(self, idle_exit_s: float | None = None) -> Stats:
        """Consume until stopped (signal, ``stop()``), the source is exhausted (files),
        or nothing arrived for ``idle_exit_s`` seconds *while holding partitions*
        (time spent joining the group or between assignments does not count)."""
        backoff = 0.5
        idle_since = time.monotonic()
        _freeze_startup_heap()
        self.observer.started(self.pipeline)
        self._record_policies()
        while True:
            try:
                if self.source is None:
                    self._open()
                got = self._turn()
                backoff = 0.5
                exhausted = getattr(self.source, "exhausted", False)
                if got or self.batcher.buffer or not self._holds_partitions():
                    idle_since = time.monotonic()
                if self.stopping.is_set() or (exhausted and not self.batcher.buffer):
                    self._flush()
                    self._complete_in_flight()
                    break
                if idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s:
                    self._flush()
                    self._complete_in_flight()
                    break
            except GuardTripped:
                self._close()
                raise
            except Exception as e:  # noqa: BLE001 - broker trouble is retried, never fatal
                if not _is_transport_error(e):
                    self._close()
                    raise
                self.observer.broker_error(e)
                log.warning("broker error (%s: %s); recreating clients in %.1fs", type(e).__name__, e, backoff)
                self.batcher.clear()  # uncommitted: redelivered after reconnect
                self.in_flight = None  # likewise (its rows are in the ledger: outputs re-sent)
                self._close()
                if self.stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, 10.0)
        self._close()
        return self.stats

    # ---- one turn of the loop ----------------------------------------------------------
    def _turn(self) -> int:
        got = self.batcher.poll(self.source, self.stopping.is_set())
        self.observer.polled()
        if self.batcher.ready(getattr(self.source, "exhausted", False), self.stopping.is_set()):
            self._flush()
        else:  # no next batch to overlap with: finish the one in flight now
            self._complete_in_flight()
        self.observer.lag(self.source)
        return got

    def _flush(self) -> None:
        if not self.batcher.buffer or self.source is None:
            return
        self.process_batch(self.batcher.take(), overlap=True)

    def process_batch(self, msgs: list[Message], overlap: bool = False) -> Outcome:
        """handle ─► guard ─► commit ─► observe, for one batch.

        With ``overlap`` the batch is left in flight after its sends: its acks are
        awaited, its offsets committed and it is observed only after the *next* batch
        has been handled, so certifying batch k+1 overlaps the ack wait of batch k
        (the committer's docstring argues why that keeps at-least-once)."""
        t0 = time.perf_counter()
        c0 = self.pipeline.certify_seconds
        outcome = self.handle(msgs)
        outcome.certify_seconds = self.pipeline.certify_seconds - c0
        handled = time.perf_counter()
        self._complete_in_flight()  # batch k: its acks arrived while this one was handled
        t1 = time.perf_counter()
        self.guards.observe(msgs, outcome.dead_positions())
        self.committer.submit(outcome, self.sink)
        outcome.seconds = (handled - t0) + (time.perf_counter() - t1)
        self.in_flight = outcome
        if not overlap:
            self._complete_in_flight()
        return outcome

    def _complete_in_flight(self) -> None:
        """Acks, offsets and observation of the batch in flight, if any."""
        outcome, self.in_flight = self.in_flight, None
        if outcome is None:
            return
        t0 = time.perf_counter()
        self.committer.complete(outcome, self.sink, self.source)
        outcome.seconds += time.perf_counter() - t0  # the wait that was not overlapped
        self.observer.committed(outcome)

    def handle(self, msgs: list[Message]) -> Outcome:
        """Decide ``msgs`` without side effects on the outputs: parse and validate,
        triage against the ledger, decide, serialise. Never raises for data."""
        parsed, dead = parse_batch(msgs, self._parse)
        known, failed = self._lookup(parsed)
        tri = classify([a for a in parsed if id(a) not in failed], known)
        outcome = Outcome(msgs, dead=dead + list(failed.values()) + tri.dead, duplicates=tri.duplicates)
        def outputs(rec):
            return check_sizes(decision_outputs(rec, self.config.topics, self.pipeline.public),
                               getattr(self.sink, "max_message_bytes", None))

        for m, stored in tri.redelivered:
            try:
                outcome.redelivered.append(Decided(m, stored, outputs(stored)))
            except Exception as e:  # noqa: BLE001
                outcome.dead.append(Dead.from_exception(m, e, "emit"))
        for a, rec in self._decide(tri.accepted, outcome.dead):
            try:
                outcome.decided.append(Decided(a.message, rec, outputs(rec), _epoch_ms(a.message.timestamp)))
            except Exception as e:  # noqa: BLE001 - e.g. a value JSON cannot carry
                outcome.dead.append(Dead.from_exception(a.message, e, "emit"))
        return outcome

    def _parse(self, m: Message):
        ev = parse_event(m.value, m.headers, self.pipeline.models, self.config.max_message_bytes,
                         self.config.max_binary_message_bytes)
        self.pipeline.admit(ev)
        return ev

    def _lookup(self, parsed: list[Accepted]) -> tuple[dict[str, dict], dict[int, Dead]]:
        """Stored ledger records of the batch's ids; an id the lookup fails on is that event's failure."""
        known: dict[str, dict] = {}
        failed: dict[int, Dead] = {}
        if self.ledger is None:
            return known, failed
        for a in parsed:
            try:
                rec = self.ledger.get(a.event.id)
            except Exception as e:  # noqa: BLE001
                failed[id(a)] = Dead.from_exception(a.message, e, "ledger lookup")
                continue
            if rec is not None:
                known[a.event.id] = rec
        return known, failed

    def _decide(self, accepted: list[Accepted], dead: list[Dead]) -> list[tuple[Accepted, dict]]:
        """Records for ``accepted``; if the model batch raises, retry one event at a
        time so only the culprit(s) become dead letters (``dead`` is appended to)."""
        if not accepted:
            return []
        try:
            records = self.pipeline.process([a.event for a in accepted], [a.message.source() for a in accepted])
            return list(zip(accepted, records, strict=True))
        except Exception as e:  # noqa: BLE001 - poison isolation
            if len(accepted) == 1:
                dead.append(Dead.from_exception(accepted[0].message, e, "decide"))
                return []
            log.warning("a batch of %d failed to decide (%s: %s); retrying one by one", len(accepted),
                        type(e).__name__, e)
        out = []
        for a in accepted:
            out.extend(self._decide([a], dead))
        return out

    def _record_policies(self) -> None:
        """One ledger ``policy`` row per policy in force."""
        if self.ledger is None:
            return
        from riskpipe.ledger import policy_record
        from riskpipe.stream.pipeline import utc_now

        for p in self.pipeline.policies:
            rec, eid = policy_record(p.name, str(p.version), p.sha256, utc_now(), source=getattr(p, "path", None))
            self.ledger.append(rec, kind="policy", entry_id=eid)


def _epoch_ms(ms: int | None) -> float | None:
    return ms / 1000 if ms and ms > 0 else None


def _freeze_startup_heap() -> None:
    """Move what exists before the loop (torch, numpy, the models, reference sets,
    policies: ~240k objects on the demo) out of the cyclic collector's reach.

    Those objects live as long as the process; without this every full collection
    rescans them (~150 ms on the demo, one per ~2,000 events, ~0.075 ms a message).
    The young generations are collected first so that little garbage is frozen with
    them; ``gc.freeze`` is process-wide and repeated calls only add what is new."""
    gc.collect(1)
    gc.freeze()


def _is_transport_error(e: Exception) -> bool:
    """Broker/transport trouble (retry with fresh clients) vs. a bug (raise)."""
    try:
        from kafka.errors import KafkaError
    except ImportError:  # pragma: no cover
        KafkaError = ()  # noqa: N806
    return isinstance(e, (KafkaError, SinkError, ConnectionError, TimeoutError, OSError)) and not isinstance(
        e, (FileNotFoundError, PermissionError))
