"""Triage: sort a batch of raw messages into accepted events, dead letters,
duplicates, id conflicts and redeliveries. Pure: no I/O. The stage looks up the
ids it needs in the ledger and hands the stored records in as ``known``.

Poison isolation starts here: *any* exception while parsing one message (not only
the ``EventError`` of a foreseen defect) turns that message into a dead letter with
reason ``internal_error``, carrying the exception's type and message, and the rest
of the batch goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from riskpipe.stream.events import Event, EventError
from riskpipe.stream.io import Message
from riskpipe.stream.pipeline import input_digest

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


@dataclass
class Triaged:
    accepted: list[Accepted] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    duplicates: list[Message] = field(default_factory=list)
    # redeliveries of a message whose record is in the ledger: (message, stored record)
    redelivered: list[tuple[Message, dict]] = field(default_factory=list)


def parse_batch(msgs: list[Message], parse: Callable[[Message], Event]) -> tuple[list[Accepted], list[Dead]]:
    """Parse every message on its own; one message's failure never touches another's."""
    ok, dead = [], []
    for m in msgs:
        try:
            ev = parse(m)
            ok.append(Accepted(m, ev, input_digest(ev.x)))
        except EventError as e:
            dead.append(Dead(m, e.code, str(e)))
        except Exception as e:  # noqa: BLE001 - poison isolation: any failure is this message's
            dead.append(Dead.from_exception(m, e, "parse"))
    return ok, dead


def same_position(record: dict, m: Message) -> bool:
    """Is ``record`` the decision of this very message (same topic, partition, offset)?"""
    src = record.get("source") or {}
    return (src.get("topic"), src.get("partition"), src.get("offset")) == (m.topic, m.partition, m.offset)


def classify(parsed: list[Accepted], known: Mapping[str, dict]) -> Triaged:
    """Split parsed events by their id against the batch so far and the ledger (``known``).

    * id new: accepted;
    * id seen before (earlier in the batch or in the ledger) with a different input
      digest: dead letter ``id_conflict`` (the id is an idempotency key, not a name);
    * id in the ledger as the record of this very message (same topic, partition,
      offset): a redelivery after a crash between the ledger write and the offset
      commit; its stored outputs are sent again (see ``committer``);
    * otherwise an identical re-delivery: skipped.
    """
    out = Triaged()
    first: dict[str, str] = {}
    for a in parsed:
        eid = a.event.id
        stored = known.get(eid)
        seen = first.get(eid) or ((stored.get("input") or {}).get("sha256") if stored else None)
        if seen is None:
            first[eid] = a.digest
            out.accepted.append(a)
        elif seen != a.digest:
            out.dead.append(Dead(a.message, ID_CONFLICT,
                                 f"id: {eid!r} was already used for a different input (sha256 {seen[:12]}...)"))
        elif eid not in first and stored is not None and same_position(stored, a.message):
            first[eid] = a.digest
            out.redelivered.append((a.message, stored))
        else:
            out.duplicates.append(a.message)
    return out
