"""The committer: the one place that orders a batch's side effects.

Per batch, strictly in this order (Quix Streams' checkpoint, Arroyo's submit/join):

1. **ledger** — every decision row and every dead-letter row, in one transaction.
   A decision row the ledger skips as already there was written by another stage
   between this batch's look-up and its write; the stored row stands and this decision
   is not published (``settle_raced``: ``id_conflict`` or a duplicate).
   If that transaction fails for a *data* reason, each decision row is tried on its
   own: a row the ledger refuses turns its event into a dead letter
   (``internal_error``, stage ``ledger``) and nothing is published for it. If it
   fails for an *infrastructure* reason (``riskpipe.stream.infra`` decides which:
   the ledger is down, restarting, locked), the exception goes up at once — no row
   of the batch is blamed on its event, nothing of the batch has been sent, and no
   offset moves; the stage pauses and reads the batch again when the ledger is back.
   If even dead-letter rows cannot be written, the ledger itself is broken: the
   exception goes up likewise.
2. **send** — every output: decisions (public), audit and review (trusted), DLQ.
3. **flush** — returns only when every send is acknowledged (``SinkError``
   otherwise: the stage recreates its clients and the batch is redelivered).
4. **commit** — the batch's offsets.
5. **after-commit hooks** — ``after_commit`` callables ``hook(outcome)``, run once
   the offsets are committed (e.g. a periodic signed ledger checkpoint). A hook
   that raises for an infrastructure reason pauses the stage like any outage (the
   batch is committed already); any other exception stops it (it is the stage's
   own machinery, not data). A hook may also have ``idle()``, called at turns where
   the stage holds nothing (no batch forming or in flight, no outage), and
   ``finish()``, called once when the stage stops cleanly: the same rules.

Why nothing is lost or published unrecorded, crash point by crash point:

* before 1 completes: nothing written, nothing sent, offsets unmoved; the batch is
  redelivered and decided afresh (certificates are seeded from (id, policy) under the
  stage's noise key, so the record is the same while the key is; a new random key after
  a restart draws new noise, which no one has seen: nothing of the first was kept);
* after 1, before 4 (during send or flush, or after the flush): the ledger holds the
  rows, outputs may be partly sent, offsets unmoved. The batch is redelivered; triage
  finds each id in the ledger *as the record of the very same message* (same topic,
  partition and offset) and sends that stored record's outputs again — so an output
  that was never acknowledged is sent now. Outputs are keyed by event id: at least
  once, consumers dedupe by key. Dead-letter rows already in the ledger are skipped
  (same entry id) and the DLQ message is sent again;
* after 4: done. An id met again at another offset is a producer's re-delivery
  (skipped) or a conflicting re-use of the id (``id_conflict``).

An infrastructure outage is the first two cases without the crash: the stage drops
what it holds uncommitted (its buffer and the batch in flight), returns its source to
the last committed offsets and waits with backoff. An outage during 1 (or during the
id look-ups before it) is "before 1 completes": no row is written, so no event is
dead-lettered for it, and the batch is decided afresh. An outage during 2-3 (broker)
or after 1 of the batch in flight is "after 1, before 4": rows stored, offsets unmoved,
outputs re-sent from the ledger. The outage never reaches 4 for a batch whose step 1
or 3 failed, because 4 runs only after both returned: so no offset moves past an
undecided event, however long the outage. Past ``infrastructure_timeout_s`` the stage
exits non-zero from the same state: nothing further committed.

Overlap: the stage loop calls ``submit`` for batch k, which hands steps 1-2 to the
committer's one writer thread (its own ledger connection, ``Ledger.another_connection``)
and returns at once; it calls ``complete`` (wait for 1-2, then 3-5) only after it has
handled (certified) batch k+1, or at a turn where no batch k+1 is forming (nothing
buffered) or 1-2 of k are done; while k+1 forms and the writer is still on k, the stage
polls on rather than wait. So the ledger's transaction and commit wait (SQLite's
fsync, PostgreSQL's round trips and WAL flush) and the broker's acks for k all happen
while k+1 is read and certified. The invariant holds for each batch in flight:

* ledger rows, then outputs: 1 and 2 run in that order on the one writer thread, so
  nothing of k is sent unless k's transaction committed; a row the ledger refuses is
  dead-lettered before the sends, as without the overlap;
* outputs, then acks, then offsets: 3 starts only after the writer has finished 1-2
  for k (``complete`` waits for it and re-raises what it raised), and 4 only after 3;
  a ledger outage in 1 therefore surfaces in ``complete``, before any offset of k
  moves, and is handled as any outage "before 1 completes" (nothing of k was sent);
* no offset past an undecided event: batches are submitted to one thread and
  completed in submission order, and k+1 is submitted only after k completed, so at
  most one batch's 1-2 runs at a time and offsets move in order;
* a crash loses at most the uncommitted offsets of k and k+1: redelivered, found in
  the ledger (outputs re-sent) or decided afresh, as in the crash points above.

While k's rows are being written, k+1's id look-ups may not see them yet; the stage
adds the records of the batch in flight to what the ledger returned (``pending``), so
an id repeated across two consecutive batches is triaged (duplicate or
``id_conflict``) exactly as if k's rows were already stored. A batch dropped in flight
(an outage, a rebalance) is first waited for (``drain``), so no write or send of it
runs on behind the recovery.

Outputs are built before the committer (so a serialisation failure is one event's,
see ``stream/outputs.py``); periodic checkpoints belong in ``after_commit``.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from riskpipe.ledger import dlq_record
from riskpipe.ledger.chain import canonical_json, decision_scope
from riskpipe.stream.infra import infrastructure_component
from riskpipe.stream.outputs import Output, dead_letter_output
from riskpipe.stream.pipeline import record_digest
from riskpipe.stream.ports import Message, Sink, Source
from riskpipe.stream.triage import ID_CONFLICT, Dead
from riskpipe.timestamps import rfc3339_millis

log = logging.getLogger("riskpipe.stream")


@dataclass
class Decided:
    message: Message
    record: dict
    outputs: list[Output]
    enqueued: float | None = None  # source timestamp (epoch seconds), for end-to-end latency
    inputs: list = field(default_factory=list)  # tensors the record references (ledger ``inputs`` table)


@dataclass
class Outcome:
    """Everything one batch produced; what the committer writes and the observer counts."""
    messages: list[Message]
    decided: list[Decided] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    duplicates: list[Message] = field(default_factory=list)
    other_models: list[Message] = field(default_factory=list)  # events of models other stages serve: skipped
    redelivered: list[Decided] = field(default_factory=list)  # outputs re-sent from the ledger
    earlier: Counter = field(default_factory=Counter)  # decided before under another model/policy (triage)
    seconds: float = 0.0
    certify_seconds: float = 0.0
    written: Future | None = None  # steps 1-2 on the writer thread (``Committer.submit``)
    pending: dict[str, list[dict]] = field(default_factory=dict)  # id -> records (one per model), until written
    ledger_seconds: float = 0.0  # step 1, on the writer thread
    waited: float = 0.0  # the stage thread's wait for steps 1-2: what the overlap did not hide

    def dead_positions(self) -> set[tuple[str, int, int]]:
        return {(d.message.topic, d.message.partition, d.message.offset) for d in self.dead}


def dlq_entry(d: Dead) -> tuple[dict, str]:
    m = d.message
    return dlq_record(d.reason, m.value or b"", rfc3339_millis(), topic=m.topic, partition=m.partition, offset=m.offset,
                      message=d.text)


class Committer:
    def __init__(self, ledger, dlq_topic: str, after_commit: list[Callable[[Outcome], None]] | None = None,
                 max_output_bytes: int | None = None):
        self.ledger = ledger
        self.dlq_topic = dlq_topic
        self.max_output_bytes = max_output_bytes
        self.after_commit: list[Callable[[Outcome], None]] = list(after_commit or [])
        self._writer: ThreadPoolExecutor | None = None
        self._writer_ledger = None  # the ledger on the writer thread's own connection

    def commit(self, outcome: Outcome, sink: Sink, source: Source) -> Outcome:
        self.submit(outcome, sink)
        return self.complete(outcome, sink, source)

    def submit(self, outcome: Outcome, sink: Sink) -> None:
        """Steps 1-2 handed to the writer thread: ledger rows, then every send. The
        transaction, its commit and the acks complete while the stage handles the next
        batch; ``complete`` waits for them."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="riskpipe-ledger-writer")
        outcome.pending = {}
        for d in outcome.decided:  # every record of an id: one id may be decided under several models
            if isinstance(d.record.get("id"), str):
                outcome.pending.setdefault(d.record["id"], []).append(d.record)
        outcome.written = self._writer.submit(self._write_and_send, outcome, sink)

    def _write_and_send(self, outcome: Outcome, sink: Sink) -> None:
        t0 = time.perf_counter()
        if self.ledger is not None and self._writer_ledger is None:
            # opened here, on the writer thread, not in ``submit``: the stage thread does not
            # wait for the connection (a server round trip or two); failing, it is step 1's
            # failure (``complete`` raises it, nothing of the batch written or sent)
            self._writer_ledger = self.ledger.another_connection()
        self.write_ledger(outcome, self._writer_ledger)
        outcome.ledger_seconds = time.perf_counter() - t0
        for d in outcome.decided + outcome.redelivered:
            for o in d.outputs:
                sink.send(o.topic, o.key, o.value, o.headers)
        for dead in outcome.dead:
            o = dead_letter_output(dead.message, dead.reason, dead.text, self.dlq_topic, dead.exception,
                                   self.max_output_bytes)
            sink.send(o.topic, o.key, o.value, o.headers)

    def complete(self, outcome: Outcome, sink: Sink, source: Source) -> Outcome:
        """Steps 3-5 for a submitted batch: wait for every ack, then commit its offsets,
        then the hooks. Batches are completed in the order they were submitted."""
        self.acknowledge(outcome, sink, source)
        self.run_hooks(outcome)
        return outcome

    def acknowledge(self, outcome: Outcome, sink: Sink, source: Source) -> None:
        """Steps 3-4, once 1-2 are done (what they raised is raised here): every ack,
        then the batch's offsets."""
        if outcome.written is not None:
            t0 = time.perf_counter()
            try:
                outcome.written.result()
            finally:
                outcome.waited = time.perf_counter() - t0
        sink.flush()
        source.commit(outcome.messages)

    @staticmethod
    def drain(outcome: Outcome | None) -> None:
        """Wait for a batch dropped in flight to finish 1-2 (its offsets stay uncommitted;
        what it raised does not matter: the batch is read again)."""
        if outcome is not None and outcome.written is not None:
            try:
                outcome.written.result()
            except Exception:  # noqa: BLE001 - the batch is redelivered whatever happened
                pass

    def close(self) -> None:
        """Stop the writer thread and close its ledger connection (re-opened on the next submit)."""
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
        if self._writer_ledger is not None:
            self._writer_ledger.close()
            self._writer_ledger = None

    def run_hooks(self, outcome: Outcome) -> None:
        """Step 5, for a committed batch."""
        for hook in self.after_commit:
            hook(outcome)

    def run_named_hooks(self, name: str) -> None:
        """``idle`` or ``finish`` of each hook that has it (see step 5)."""
        for hook in self.after_commit:
            if (call := getattr(hook, name, None)) is not None:
                call()

    @staticmethod
    def settle_raced(outcome: Outcome, ledger) -> None:
        """Decisions whose row the ledger skipped as already there: another stage on the same
        ledger decided the id under the same model and policy between this batch's look-up
        and its write (one id on two partitions, two replicas). The stored row is the
        decision of record, so this one is never published: an ``id_conflict`` dead letter
        when it was made for another event, else a duplicate. Rare (only when the append
        wrote fewer rows than it was given), so the look-up costs the hot path nothing."""
        stored = ledger.get_all_many([d.record["id"] for d in outcome.decided])
        kept, conflicts = [], []
        for d in outcome.decided:
            scope = decision_scope("decision", d.record)
            theirs = next((r for r in stored.get(d.record["id"], []) if decision_scope("decision", r) == scope), None)
            if theirs is None or canonical_json(theirs) == canonical_json(d.record):
                kept.append(d)
            elif record_digest(theirs) != record_digest(d.record):
                conflicts.append(Dead(d.message, ID_CONFLICT, (
                    f"id: {d.record['id']!r} was decided under this model and policy for a different event by another "
                    f"writer of this ledger while this stage decided it (digest {record_digest(theirs)[:12]}...)")))
            else:
                outcome.duplicates.append(d.message)
        if len(kept) < len(outcome.decided):
            log.warning("%d decision(s) of this batch were written by another stage first; not published "
                        "(%d id_conflict)", len(outcome.decided) - len(kept), len(conflicts))
        outcome.decided = kept
        if conflicts:
            ledger.append_entries([("dlq", *dlq_entry(d)) for d in conflicts])
            outcome.dead.extend(conflicts)

    def write_ledger(self, outcome: Outcome, ledger) -> None:
        """Step 1 on ``ledger``; moves events whose decision row it refuses to ``outcome.dead``."""
        if ledger is None:
            return
        rows = [("decision", d.record, None) for d in outcome.decided]
        dead = [("dlq", *dlq_entry(d)) for d in outcome.dead]
        try:
            written = ledger.append_entries(rows + dead, [s for d in outcome.decided for s in d.inputs])
        except Exception as e:  # find the culprit row by row, below
            if infrastructure_component(e):
                raise  # the ledger is unavailable: no row is the culprit
            log.warning("ledger refused a batch (%s: %s); writing row by row", type(e).__name__, e)
        else:
            if written < len(rows) + len(dead):  # a row was there already: a dead letter re-sent, or a race
                self.settle_raced(outcome, ledger)
            return
        kept, raced = [], False
        for d in outcome.decided:
            try:
                raced |= ledger.append_entries([("decision", d.record, None)], d.inputs) == 0
                kept.append(d)
            except Exception as e:  # this event's row: its event is dead-lettered
                if infrastructure_component(e):
                    raise
                outcome.dead.append(Dead.from_exception(d.message, e, "ledger"))
        outcome.decided = kept
        # If these cannot be written either, the ledger is down: raise, nothing was sent.
        ledger.append_entries([("dlq", *dlq_entry(d)) for d in outcome.dead])
        if raced:
            self.settle_raced(outcome, ledger)
