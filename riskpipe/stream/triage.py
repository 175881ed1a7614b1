"""Triage: sort a batch of raw messages into accepted events, dead letters,
duplicates, id conflicts and redeliveries. Pure: no I/O. The stage looks up the
ids it needs in the ledger and hands the stored records in as ``known``.

Poison isolation starts here: *any* exception while parsing one message (not only
the ``EventError`` of a foreseen defect) turns that message into a dead letter with
reason ``internal_error``, carrying the exception's type and message, and the rest
of the batch goes on.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import NamedTuple

from riskpipe.ledger.chain import decision_scope
from riskpipe.ledger.inputs import input_digest
from riskpipe.stream.errors import EventError
from riskpipe.stream.events import Event, OtherModel
from riskpipe.stream.pipeline import event_digest, record_digest
from riskpipe.stream.ports import Message

INTERNAL_ERROR = "internal_error"
ID_CONFLICT = "id_conflict"


def printable(text: str) -> str:
    """``text`` as it can be written anywhere (UTF-8 bytes, JSON, SQL): lone
    surrogates and other unencodable characters become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass
class Dead:
    """A message that goes to the dead-letter topic (and the ledger, kind ``dlq``)."""
    message: Message
    reason: str
    text: str
    exception: str | None = None  # exception type name, for ``internal_error``

    def __post_init__(self):
        self.text = printable(self.text)

    @classmethod
    def from_exception(cls, message: Message, exc: BaseException, where: str) -> Dead:
        name = type(exc).__name__
        return cls(message, INTERNAL_ERROR, f"{where}: {name}: {exc}", exception=name)


@dataclass
class Accepted:
    message: Message
    event: Event
    digest: str  # sha256 of the input tensor, as the record's ``input.sha256``
    conflict_digest: str  # pipeline.event_digest: everything in the event that decides its outcome

    @classmethod
    def of(cls, message: Message, ev: Event) -> Accepted:
        """Both digests, made while the message is parsed (``parse_batch``): a value they
        cannot be made of is that message's dead letter, never its batch's (``classify``,
        which uses them, runs over the whole batch)."""
        digest = input_digest(ev.x)
        return cls(message, ev, digest, event_digest(digest, ev.model, ev.prediction, ev.upstream_risk, ev.context))


@dataclass
class Triaged:
    accepted: list[Accepted] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    duplicates: list[Message] = field(default_factory=list)
    # redeliveries of a message whose record is in the ledger: (message, stored record)
    redelivered: list[tuple[Message, dict]] = field(default_factory=list)
    # accepted events the ledger holds decisions of under another model or policy:
    # how many, by ``decided_under`` label (they are decided anew under this stage's)
    earlier: Counter = field(default_factory=Counter)


class Parsed(NamedTuple):
    """A batch parsed: events to decide, dead letters, and messages skipped (events of
    models other stages serve: committed and counted, neither decided nor dead-lettered)."""
    accepted: list[Accepted]
    dead: list[Dead]
    skipped: list[Message]


def parse_batch(msgs: list[Message], parse: Callable[[Message], Event]) -> Parsed:
    """Parse every message on its own; one message's failure never touches another's."""
    out = Parsed([], [], [])
    for m in msgs:
        try:
            out.accepted.append(Accepted.of(m, parse(m)))
        except OtherModel:
            out.skipped.append(m)
        except EventError as e:
            out.dead.append(Dead(m, e.code, str(e)))
        except Exception as e:  # noqa: BLE001 - poison isolation: any failure is this message's
            out.dead.append(Dead.from_exception(m, e, "parse"))
    return out


def same_position(record: dict, m: Message) -> bool:
    """Is ``record`` the decision of this very message (same topic, partition, offset)?"""
    src = record.get("source") or {}
    return (src.get("topic"), src.get("partition"), src.get("offset")) == (m.topic, m.partition, m.offset)


def decided_under(record: dict) -> str:
    """The model and policy a stored decision was made under, as the run summary names them."""
    p, m = record.get("policy") or {}, record.get("model") or {}
    return (f"policy {p.get('name')} v{p.get('version')} (sha256 {str(p.get('sha256'))[:12]}), "
            f"model {m.get('name')} (sha256 {str(m.get('sha256'))[:12]})")


def classify(parsed: list[Accepted], known: Mapping[str, list[dict]], scopes: Mapping[str, str]) -> Triaged:
    """Split parsed events against the batch so far and the ledger (``known``: every stored
    decision of each id, under any model and policy).

    A decision is identified by (event id, model, policy sha256): ``scopes`` gives each
    model's scope (``ledger.chain.decision_scope``) under this stage's policy, and only
    stored decisions of the same scope count as this event's. Against those:

    * none: accepted (decided anew; decisions of the id under another model or policy
      are only counted, in ``earlier``);
    * one with a different conflict digest (tensor, model, prediction, upstream risk,
      context: everything that decides the outcome; ``pipeline.event_digest``): dead
      letter ``id_conflict`` -- the id is an idempotency key, not a name;
    * the record of this very message (same topic, partition, offset): a redelivery
      after a crash between the ledger write and the offset commit; its stored outputs
      are sent again (see ``committer``);
    * otherwise an identical re-delivery: skipped.
    """
    out = Triaged()
    first: dict[tuple[str, str], str] = {}
    for a in parsed:
        eid = a.event.id
        key = (eid, scopes[a.event.model])
        stored_all = known.get(eid) or []
        stored = next((r for r in reversed(stored_all) if decision_scope("decision", r) == key[1]), None)
        digest = a.conflict_digest
        seen = first.get(key) or (record_digest(stored) if stored is not None else None)
        if seen is None:
            first[key] = digest
            out.accepted.append(a)
            for label in {decided_under(r) for r in stored_all}:
                out.earlier[label] += 1
        elif seen != digest:
            out.dead.append(Dead(a.message, ID_CONFLICT,
                                 f"id: {eid!r} was already decided under this model and policy for a different event "
                                 f"(tensor, prediction, upstream risk or context differ; digest {seen[:12]}...)"))
        elif key not in first and stored is not None and same_position(stored, a.message):
            first[key] = digest
            out.redelivered.append((a.message, stored))
        else:
            out.duplicates.append(a.message)
    return out
