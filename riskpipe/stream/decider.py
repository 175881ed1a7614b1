"""The decider: a batch of messages in, its decisions and dead letters out, without I/O.

  parse  ─► each message parsed and validated against its model (events.parse_event),
            and admitted by that model's certifier (Pipeline.admit); an event of a model
            another stage serves (config ``other_models``) is skipped, never a dead letter
  decide ─► triage against the stored decisions of the ids (triage.classify)
         ─► certify, contextualise, score, build records (Pipeline.process: the model,
            certifier and policy of each event's model)
         ─► serialise each record's outputs (outputs.decision_outputs, size-checked)

No broker, no ledger, no files: the stage reads the stored decisions of the batch's ids
between ``parse`` and ``decide`` and hands them in as ``known``; the committer writes
and sends the ``Outcome`` this returns.

Poison isolation: every step runs per event or, for the model batch, falls back to one
event at a time when the batch raises; whatever an event raises makes *that* event a
dead letter (``internal_error``, exception type and message in the record), and the
rest of the batch goes on. So data never makes ``decide`` raise. Memory exhausted
while one event certifies is that event's only if the model still certifies an input it
certified before (``Pipeline.healthy``); otherwise ``decide`` raises it, and the stage
pauses and decides the batch again (riskpipe.stream.infra).

A model call that never returns cannot be isolated so: each call runs under the stage's
``watchdog``, which ends the process past ``model_timeout_s``; events at positions it
recorded (``suspects``) are then decided alone, and one that hung alone is dead-lettered
(``model_timeout``) before any model sees it (riskpipe.stream.watchdog).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from contextlib import nullcontext

from riskpipe.ledger.inputs import REF_PREFIX, stored_input
from riskpipe.stream.committer import Decided, Outcome
from riskpipe.stream.events import Event, parse_event
from riskpipe.stream.infra import out_of_memory, release_memory
from riskpipe.stream.outputs import OUTPUT_TOO_LARGE, Output, OutputTooLarge, check_sizes, decision_outputs
from riskpipe.stream.pipeline import Pipeline
from riskpipe.stream.ports import Message
from riskpipe.stream.triage import Accepted, Dead, Parsed, classify, parse_batch
from riskpipe.stream.watchdog import ALONE, BATCH, MODEL_TIMEOUT, Suspects, Watchdog

log = logging.getLogger("riskpipe.stream")


class Decider:
    """Decides batches with ``pipeline`` (its models, certifiers and policies); ``topics``
    names the outputs; the limits are the config's ``max_message_bytes``,
    ``max_binary_message_bytes`` and ``max_output_bytes``; ``watchdog`` (the stage's)
    watches each certification call and ends the process past ``model_timeout_s``."""

    def __init__(self, pipeline: Pipeline, topics, *, max_message_bytes: int, max_binary_message_bytes: int,
                 max_output_bytes: int, other_models: Collection[str] = (), watchdog: Watchdog | None = None):
        self.pipeline = pipeline
        self.topics = topics
        self.max_message_bytes = max_message_bytes
        self.max_binary_message_bytes = max_binary_message_bytes
        self.max_output_bytes = max_output_bytes
        self.other_models = frozenset(other_models)  # served by other stages on the input topic: skipped
        self.suspects = Suspects()  # positions whose model call timed out (the stage reads them from its ledger)
        self.watchdog = watchdog

    @classmethod
    def for_config(cls, pipeline: Pipeline, config, watchdog: Watchdog | None = None) -> Decider:
        """A decider with the topics and size limits of the stage's ``config``."""
        return cls(pipeline, config.topics, max_message_bytes=config.max_message_bytes,
                   max_binary_message_bytes=config.max_binary_message_bytes,
                   max_output_bytes=config.max_output_bytes, other_models=config.other_models, watchdog=watchdog)

    def parse(self, msgs: list[Message]) -> Parsed:
        """Every message parsed and validated on its own: accepted events, dead letters
        and skipped messages (events of ``other_models``)."""
        return parse_batch(msgs, self._parse_one)

    def decide(self, msgs: list[Message], parsed: list[Accepted], known: Mapping[str, list[dict]],
               dead: list[Dead] | None = None, skipped: list[Message] | None = None) -> Outcome:
        """The outcome of the batch ``msgs``: ``parsed`` triaged against ``known`` (every
        stored decision of each id, under any model and policy), the accepted ones decided,
        every decision's outputs serialised. ``dead``: the batch's dead letters so far;
        ``skipped``: its events of models other stages serve."""
        tri = classify(parsed, known, self.pipeline.scopes)
        outcome = Outcome(msgs, dead=[*(dead or []), *tri.dead], duplicates=tri.duplicates, earlier=tri.earlier,
                          other_models=list(skipped or []))
        for m, stored in tri.redelivered:  # decided before the crash: its stored outputs again
            self._emit(outcome, outcome.redelivered, m, lambda: Decided(m, stored, self.outputs(stored)))
        for a, rec in self._suspect_records(tri.accepted, outcome.dead):
            self._emit(outcome, outcome.decided, a.message,
                       lambda: Decided(a.message, rec, self.outputs(rec), _epoch_s(a.message.timestamp),
                                       _stored_inputs(a.event, rec)))
        return outcome

    def outputs(self, record: dict) -> list[Output]:
        """``record``'s outputs (public decision, audit, review), each within ``max_output_bytes``."""
        return check_sizes(decision_outputs(record, self.topics, self.pipeline.public), self.max_output_bytes)

    def _parse_one(self, m: Message) -> Event:
        ev = parse_event(m.value, m.headers, self.pipeline.models, self.max_message_bytes,
                         self.max_binary_message_bytes, self.other_models)
        self.pipeline.admit(ev)
        return ev

    def _suspect_records(self, accepted: list[Accepted], dead: list[Dead]) -> list[tuple[Accepted, dict]]:
        """``_records`` of ``accepted``, where an event at a suspect position is decided in a
        model call of its own (``BATCH``) or dead-lettered ``model_timeout`` (``ALONE``: it
        hung alone before), and the rest together, as usual."""
        if not len(self.suspects):
            return self._records(accepted, dead)
        level = {id(a): self.suspects.level(a.message) for a in accepted}
        for a in accepted:
            if level[id(a)] == ALONE:
                m = a.message
                dead.append(Dead(m, MODEL_TIMEOUT, f"decide: model {a.event.model}: a certification call of this event "
                                                   f"alone ran past model_timeout_s before (position {m.topic}:"
                                                   f"{m.partition}:{m.offset}); never decided"))
        alone = [r for a in accepted if level[id(a)] == BATCH for r in self._records([a], dead)]
        return [*self._records([a for a in accepted if level[id(a)] is None], dead), *alone]

    def _records(self, accepted: list[Accepted], dead: list[Dead]) -> list[tuple[Accepted, dict]]:
        """Records for ``accepted``; if the model batch raises, retry one event at a
        time so only the culprit(s) become dead letters (``dead`` is appended to).

        An event that runs out of memory on its own is tried once more after memory is
        released, if the model still certifies an input it certified before
        (``Pipeline.healthy``); if it cannot, the exception goes up (the machine is short
        of memory: the stage pauses). A second failure is the event's dead letter only if
        the known-good input certifies after it too: a shortage that let go for one check
        and came back is still the machine's."""
        if not accepted:
            return []
        try:
            return self._process(accepted)
        except Exception as e:  # poison isolation
            if len(accepted) > 1:
                log.warning("a batch of %d failed to decide (%s: %s); retrying one by one", len(accepted),
                            type(e).__name__, e)
                return [r for a in accepted for r in self._records([a], dead)]
            if out_of_memory(e):
                model = accepted[0].event.model
                if self._machine_short(model):
                    raise  # a known-good input fails too: the machine's memory, not this event
                try:
                    return self._process(accepted)
                except Exception as again:  # out of memory where the known-good input is not: this input's
                    if out_of_memory(again) and self._machine_short(model):
                        raise again from None  # the shortage is back: the machine's, not this event's
                    e = again
            dead.append(Dead.from_exception(accepted[0].message, e, "decide"))
            return []

    def _machine_short(self, model: str) -> bool:
        """After an out-of-memory: memory released, does ``model`` fail to certify an input
        it certified before (``Pipeline.healthy``: False, or None when it has none)?"""
        release_memory()
        return not self.pipeline.healthy(model)

    def _process(self, accepted: list[Accepted]) -> list[tuple[Accepted, dict]]:
        model = ", ".join(sorted({a.event.model for a in accepted}))
        with (self.watchdog.watching(model, [a.message for a in accepted]) if self.watchdog else nullcontext()):
            records = self.pipeline.process([a.event for a in accepted], [a.message.source() for a in accepted])
        return list(zip(accepted, records, strict=True))

    @staticmethod
    def _emit(outcome: Outcome, into: list[Decided], m: Message, make: Callable[[], Decided]) -> None:
        """``make()`` appended to ``into``, or, if building its outputs fails, ``m`` a dead letter."""
        try:
            into.append(make())
        except OutputTooLarge as e:  # never sent, never allowed: that event's dead letter
            outcome.dead.append(Dead(m, OUTPUT_TOO_LARGE, f"emit: {e}"))
        except Exception as e:  # noqa: BLE001 - e.g. a value JSON cannot carry
            outcome.dead.append(Dead.from_exception(m, e, "emit"))


def _stored_inputs(ev: Event, record: dict) -> list:
    """The tensor the ledger must hold for ``record`` (its input is a reference), if any."""
    inp = record.get("input") or {}
    if str((inp.get("tensor") or {}).get("ref", "")).startswith(REF_PREFIX):
        return [stored_input(ev.x, ev.raw, inp["sha256"])]
    return []


def _epoch_s(ms: int | None) -> float | None:
    """A source timestamp (ms since the epoch; 0 or None: unknown) in seconds."""
    return ms / 1000 if ms and ms > 0 else None
