"""The stage loop. Read it top to bottom to follow one batch:

  Batcher (poll the Source; close by size or latency)
    ─► handle(): Decider.parse ─► ledger lookup of the ids
                 ─► Decider.decide (triage, Pipeline.process, serialise outputs)
    ─► Guards (stop loudly if a partition is mostly invalid)
    ─► Committer: ledger rows ─► send to the Sink ... (next batch handled meanwhile)
                  ... flush (acks) ─► commit offsets ─► hooks
    ─► Observer: stats, metrics, callbacks

The stage owns the lifecycle (open, close, signals, rebalances, outages) and the order
of side effects; what becomes of each event is the ``Decider``'s, which does no I/O.
Poison isolation (``decider``): whatever an event raises makes *that* event a dead
letter (``internal_error``); the committer applies the same rule to ledger rows. So
data never stops the stage: it exits non-zero only for its configuration (a tripped
guard), an infrastructure outage longer than ``infrastructure_timeout_s``, or a model
call that never returns: past ``model_timeout_s`` the watchdog records the call's events
as suspects and ends the process for a restart, after which they are decided alone and
one that hangs alone is dead-lettered (``watchdog``).

Infrastructure is not data: where the stage touches the ledger or the broker, an
exception that ``infra.infrastructure_component`` calls infrastructure is never an
event's dead letter. It goes up to ``run``, which pauses consumption (the source goes
back to its committed offsets; nothing is polled), retries with bounded exponential
backoff and jitter, and reads the batch again when the component answers.

At-least-once: see ``committer`` for the order of side effects and the argument,
crash point by crash point.
"""

from __future__ import annotations

import gc
import logging
import signal
import threading
import time
from collections.abc import Callable

from riskpipe.ledger import policy_record
from riskpipe.stream.batcher import Batcher
from riskpipe.stream.committer import Committer, Outcome
from riskpipe.stream.decider import Decider
from riskpipe.stream.guard import Guards, GuardTripped, PartitionGuard  # noqa: F401 - re-exported
from riskpipe.stream.infra import (
    BROKER,
    LEDGER,
    MEMORY,
    InfrastructureUnavailable,
    Outage,
    describe,
    infrastructure_component,
    release_memory,
)
from riskpipe.stream.observer import Observer, Stats
from riskpipe.stream.pipeline import Pipeline
from riskpipe.stream.ports import Message, Sink, Source
from riskpipe.stream.status import Progress
from riskpipe.stream.triage import Accepted, Dead
from riskpipe.stream.watchdog import KIND as SUSPECT_KIND
from riskpipe.stream.watchdog import Suspects, Watchdog
from riskpipe.timestamps import rfc3339_millis

log = logging.getLogger("riskpipe.stream")


class Stage:
    def __init__(self, config, pipeline: Pipeline, make_source: Callable[[Callable], Source],
                 make_sink: Callable[[], Sink], ledger=None, metrics=None, on_record=None, on_batch=None,
                 after_commit=None):
        self.config = config
        self.pipeline = pipeline
        self.make_source, self.make_sink = make_source, make_sink
        self.source: Source | None = None
        self.sink: Sink | None = None
        self.ledger = ledger
        self.batcher = Batcher(config.batch.max_events, config.batch.max_wait_ms)
        self.guards = Guards(config.guard)
        self.committer = Committer(ledger, config.topics.dlq, after_commit, config.max_output_bytes)
        self.watchdog = Watchdog(config.model_timeout_s, self._record_suspects)
        self.decider = Decider.for_config(pipeline, config, self.watchdog)
        self._suspects_read = False  # read from the ledger before the next batch (at start, after a rebalance)
        pipeline.store_inputs = ledger is not None  # large inputs: once in the ledger, referenced by records
        self.observer = Observer(metrics, on_record, on_batch,
                                 progress=Progress(config.progress_interval_s))
        self.stopping = threading.Event()
        self.in_flight: Outcome | None = None  # submitted, acks outstanding, offsets not committed
        self.outage: Outage | None = None  # the ledger or broker outage being ridden out
        self._policies_recorded = False

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
        self.committer.drain(self.in_flight)  # no write or send of it runs on behind the close
        for c in (self.source, self.sink):
            if c is not None:
                c.close()
        self.source = self.sink = None

    def _clients(self) -> tuple[Source, Sink]:
        """The open source and sink: the loop uses them only between ``_open`` and ``_close``."""
        if self.source is None or self.sink is None:
            raise RuntimeError("the stage's source and sink are not open")
        return self.source, self.sink

    def _on_revoke(self, revoked) -> None:
        if self.in_flight is not None:
            # No commit inside the rebalance callback (kafka-python 3 forbids it): the
            # batch in flight is left uncommitted; its rows are in the ledger, so the new
            # owner re-sends its stored outputs (committer: "after 1, before 4").
            log.info("rebalance: %d in-flight messages left uncommitted", len(self.in_flight.messages))
            self.committer.drain(self.in_flight)
            self.in_flight = None
        self._suspects_read = False  # partitions may come from a replica whose model call timed out
        dropped = self.batcher.drop_partitions({(tp.topic, tp.partition) for tp in revoked})
        self.observer.revoked(revoked)
        if dropped:
            log.info("rebalance: dropped %d unprocessed messages (the new owner re-reads them)", dropped)

    def run(self, idle_exit_s: float | None = None) -> Stats:
        """Consume until stopped (signal, ``stop()``), the source is exhausted (files),
        or nothing arrived for ``idle_exit_s`` seconds *while holding partitions*
        (time spent joining the group, between assignments or in an outage does not count).

        A ledger or broker outage is ridden out (``_outage``); one longer than
        ``infrastructure_timeout_s`` raises ``InfrastructureUnavailable``."""
        self.watchdog.start()
        try:
            return self._run(idle_exit_s)
        finally:
            self.watchdog.stop()
            self.committer.close()  # the ledger writer thread and its connection

    def _run(self, idle_exit_s: float | None) -> Stats:
        idle_since = time.monotonic()
        _freeze_startup_heap()
        self.observer.started(self.pipeline)
        while True:
            stalled: tuple[str, Exception] | None = None
            try:
                self._recover()
                got = self._turn()
                self._progress()
                source, _ = self._clients()
                if got or self.batcher.buffer or not source.holds_partitions:
                    idle_since = time.monotonic()
                if self.stopping.is_set() or (source.exhausted and not self.batcher.buffer) or (
                        idle_exit_s is not None and time.monotonic() - idle_since > idle_exit_s):
                    self._flush()
                    self._complete_in_flight()
                    self.committer.run_named_hooks("finish")  # e.g. sign the last rows (a checkpoint)
                    break
                if not self.batcher.buffer and self.in_flight is None and self.outage is None:
                    self.committer.run_named_hooks("idle")  # e.g. a checkpoint due by time
            except GuardTripped:
                self._close()
                raise
            except Exception as e:  # infrastructure is retried, anything else raised
                component = infrastructure_component(e)
                if component is None:
                    self._close()
                    raise
                if getattr(e, "stalls_source", False):
                    stalled = (component, e)  # handled below, outside this handler (_decide_read)
                elif self._outage(component, e):
                    break
                else:
                    idle_since = time.monotonic()  # an outage is not idleness
            if stalled is not None:
                self._decide_read()
                if self._outage(*stalled):
                    break
                idle_since = time.monotonic()
        self._close()
        self.observer.finished()
        return self.stats

    # ---- outages ---------------------------------------------------------------------
    def _decide_read(self) -> None:
        """Before pausing at input the source cannot read (``stalls_source``): decide and
        commit what it read before it, so that moving the group's offset past that record
        skips nothing else. If the infrastructure fails here, the outage reads them again
        as usual; anything else (a tripped guard, a bug) stops the stage as anywhere in the
        loop. Called outside the loop's exception handler, so that what is raised here is
        not taken for the outage it was raised during (``infra._chain`` follows contexts)."""
        try:
            self._flush()
            self._complete_in_flight()
        except GuardTripped:
            self._close()
            raise
        except Exception as e:
            if infrastructure_component(e) is None:
                self._close()
                raise
            log.warning("could not decide the %d messages read before the unreadable record (%s: %s)",
                        len(self.batcher.buffer), type(e).__name__, e)

    def _recover(self) -> None:
        """Before a turn: during a ledger outage, probe the ledger; record the policies
        once; (re)open the clients. Each raises while its component is unavailable."""
        if self.outage is not None and self.outage.component == LEDGER and self.ledger is not None:
            self.ledger.ping()
        if not self._policies_recorded:
            self._record_policies()
            self._policies_recorded = True
        if self.source is None:
            self._open()

    def _progress(self) -> None:
        """After a turn without an exception: with nothing undecided held and the source not
        stopped at input it cannot read, the outage is over (so is it once a batch
        commits: ``_complete_in_flight``), unless its error stalls the source
        (``Outage.stalled``): a partition stopped at a record the client cannot decode
        polls without error between its errors, and ending the outage there restarted its
        clock every second: the partition waited for ever and the stage never exited."""
        if not self.batcher.buffer and self.in_flight is None and not (self.outage and self.outage.stalled):
            self._end_outage()

    def _end_outage(self) -> None:
        if self.outage is not None:
            log.warning("%s available again after %.1f s (%d retries)", self.outage.component,
                        time.monotonic() - self.outage.since, self.outage.retries)
            self.outage = None
            self.observer.outage_over()

    def _outage(self, component: str, e: Exception) -> bool:
        """Pause for ``component``: drop everything uncommitted, return the source to its
        committed offsets (or close the clients), wait with backoff. True if stopping.

        Nothing uncommitted is lost: the buffer and the batch in flight are read again
        from the committed offsets (a batch whose ledger rows were written has its
        outputs re-sent from the ledger; see ``committer``)."""
        now = time.monotonic()
        if self.outage is None:
            self.outage = Outage(component, now)
        else:
            self.outage.component = component
        if getattr(e, "stalls_source", False):
            self.outage.stalled, self.outage.stalled_at = True, getattr(e, "at", None)
        self.observer.infrastructure_error(component, e)
        waited, timeout = now - self.outage.since, self.config.infrastructure_timeout_s
        self.batcher.clear()
        self.committer.drain(self.in_flight)
        self.in_flight = None
        if component == BROKER or not self._rewind():
            self._close()
        if component == MEMORY:
            release_memory()
        if waited > timeout:
            self._close()
            raise InfrastructureUnavailable(component, waited, timeout, e) from e
        delay = self.outage.next_delay(timeout - waited)
        log.warning("%s unavailable (%s); consumption paused, retry %d in %.2f s (%.1f s of %g s)", component,
                    describe(e), self.outage.retries, delay, waited, timeout)
        return self.stopping.wait(delay)

    def _rewind(self) -> bool:
        """Return the open source to its committed offsets; False if it cannot (then the
        clients are closed and re-opened, which starts from the committed offsets too)."""
        if self.source is None:  # it failed to open
            return False
        try:
            return self.source.rewind()
        except Exception as e:  # noqa: BLE001 - e.g. the broker is down as well
            log.warning("cannot rewind the source (%s: %s); re-opening the clients", type(e).__name__, e)
            return False

    # ---- one turn of the loop ----------------------------------------------------------
    def _turn(self) -> int:
        source, _ = self._clients()
        got = self.batcher.poll(source, self.stopping.is_set())
        self.observer.polled()
        if recreated := source.recreated():
            self.observer.recreated(recreated)
        if self.batcher.ready(source.exhausted, self.stopping.is_set()):
            self._flush()
        elif not self.batcher.buffer or self._in_flight_written():
            # no next batch forming (or nothing left to wait for): finish the one in flight
            # now; while a next batch forms and the ledger still writes this one, poll on
            self._complete_in_flight()
        self.observer.lag(source)
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
        self.committer.submit(outcome, self._clients()[1])
        outcome.seconds = (handled - t0) + (time.perf_counter() - t1)
        self.in_flight = outcome
        if not overlap:
            self._complete_in_flight()
        return outcome

    def _in_flight_written(self) -> bool:
        """Whether the batch in flight (if any) is past steps 1-2 (ledger rows, sends)."""
        o = self.in_flight
        return o is None or o.written is None or o.written.done()

    def _complete_in_flight(self) -> None:
        """Acks, offsets and observation of the batch in flight, if any."""
        outcome, self.in_flight = self.in_flight, None
        if outcome is None:
            return
        source, sink = self._clients()
        t0 = time.perf_counter()
        self.committer.acknowledge(outcome, sink, source)
        outcome.seconds += time.perf_counter() - t0  # the wait that was not overlapped
        if self.outage is None or self.outage.passed(outcome.messages):
            self._end_outage()  # a batch decided, recorded, acknowledged and committed
        self.observer.committed(outcome)
        self.committer.run_hooks(outcome)

    def handle(self, msgs: list[Message]) -> Outcome:
        """Decide ``msgs`` without side effects on the outputs: parse and validate, look the
        ids up in the ledger, then triage, decide and serialise (``Decider``). Never raises
        for data; an unavailable ledger raises (the batch waits)."""
        parsed = self.decider.parse(msgs)
        known, failed = self._lookup(parsed.accepted)
        return self.decider.decide(msgs, [a for a in parsed.accepted if id(a) not in failed], known,
                                   [*parsed.dead, *failed.values()], parsed.skipped)

    def _lookup(self, parsed: list[Accepted]) -> tuple[dict[str, list[dict]], dict[int, Dead]]:
        """Stored decisions of the batch's ids (under any model and policy), in one look-up
        per batch; if that fails for a data reason, id by id, and an id the look-up fails
        on is that event's failure. An unavailable ledger raises (the batch waits)."""
        known: dict[str, list[dict]] = {}
        failed: dict[int, Dead] = {}
        if self.ledger is None or not parsed:
            return known, failed
        self._read_suspects()
        try:
            known = self.ledger.get_all_many([a.event.id for a in parsed])
        except Exception as e:  # find the culprit id, below
            if infrastructure_component(e):
                raise
            for a in parsed:
                try:
                    recs = self.ledger.get_all(a.event.id)
                except Exception as e:
                    if infrastructure_component(e):
                        raise
                    failed[id(a)] = Dead.from_exception(a.message, e, "ledger lookup")
                    continue
                if recs:
                    known[a.event.id] = recs
        pending = self.in_flight.pending if self.in_flight is not None else {}  # rows being written now
        for a in parsed:
            for rec in pending.get(a.event.id, ()):
                if rec not in known.get(a.event.id, []):
                    known[a.event.id] = [*known.get(a.event.id, []), rec]
        return known, failed

    def _read_suspects(self) -> None:
        """The suspect positions (``watchdog``: few, one per event of a call that hung),
        from the ledger, once after the start and after each rebalance. All of them: a
        file source's positions are ``file:PATH``, not the input topic's."""
        if not self._suspects_read and self.ledger is not None:
            rows = self.ledger.entries_with_prefix("", SUSPECT_KIND)
            self.decider.suspects = Suspects([e.record for e in rows])
            self._suspects_read = True
            self.observer.suspects(self.decider.suspects.counts())
            if rows:
                log.warning("%d positions whose model call ran past model_timeout_s: decided alone, or "
                            "dead-lettered (model_timeout) if they hung alone", len(self.decider.suspects))

    def _record_suspects(self, entries: list[tuple[str, dict, str]]) -> None:
        """The watchdog's suspects, appended on a connection of their own (the stage's is
        held by the thread stuck in the model call)."""
        if self.ledger is None:
            raise RuntimeError("no ledger (--no-ledger): nowhere to record them")
        ledger = self.ledger.another_connection()
        try:
            ledger.append_entries(entries)
        finally:
            ledger.close()

    def _record_policies(self) -> None:
        """One ledger ``policy`` row per policy in force."""
        if self.ledger is None:
            return
        for p, source in self.pipeline.policy_sources:
            rec, eid = policy_record(p.name, str(p.version), p.sha256, rfc3339_millis(), source=source)
            self.ledger.append(rec, kind="policy", entry_id=eid)


def _freeze_startup_heap() -> None:
    """Move what exists before the loop (torch, numpy, the models, reference sets,
    policies: ~240k objects on the demo) out of the cyclic collector's reach.

    Those objects live as long as the process; without this every full collection
    rescans them (~150 ms on the demo, one per ~2,000 events, ~0.075 ms a message).
    The young generations are collected first so that little garbage is frozen with
    them; ``gc.freeze`` is process-wide and repeated calls only add what is new."""
    gc.collect(1)
    gc.freeze()

