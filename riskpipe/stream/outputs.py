"""What the stage sends: the serialised outputs of one decision and of one dead letter.

Serialisation happens per event, before anything is written or sent, so an event
whose record cannot be serialised is that event's failure (``internal_error``),
never the batch's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from riskpipe.stream import codec
from riskpipe.stream.io import Message
from riskpipe.stream.trace import trace_headers


@dataclass
class Output:
    topic: str
    key: bytes | None
    value: bytes
    headers: list | None = None


def trusted_view(record: dict) -> dict:
    """The full record as the trusted topics and the ledger carry it (no ``_`` keys)."""
    return {k: v for k, v in record.items() if not k.startswith("_")}


def decision_outputs(record: dict, topics, public_view: Callable[[dict], dict]) -> list[Output]:
    """decisions (public view), audit (full), review (full, when routed or sampled).

    A record that cannot be serialised raises here, for this event alone. (A
    non-finite number would be written as null here, but the ledger's canonical JSON
    refuses it, and the committer then publishes nothing for the event.)"""
    key = record["id"].encode()
    full = codec.dumps(trusted_view(record))
    headers = trace_headers(record)  # the input's W3C trace context, on every output
    out = [Output(topics.decisions, key, codec.dumps(public_view(record)), headers),
           Output(topics.audit, key, full, headers)]
    review = record.get("review") or {}
    if review.get("routed") or review.get("audit_sample"):
        out.append(Output(topics.review, key, full, headers))
    return out


RECORD_OVERHEAD = 1024  # key, headers and Kafka record framing, generously


def check_sizes(outputs: list[Output], limit: int | None) -> list[Output]:
    """``outputs``, or ValueError if one is larger than the sink takes (``limit`` bytes)."""
    if limit is not None:
        for o in outputs:
            size = len(o.value) + len(o.key or b"") + RECORD_OVERHEAD
            if size > limit:
                raise ValueError(f"{o.topic} output of {size} bytes exceeds the sink's limit of {limit}")
    return outputs


def dead_letter_output(m: Message, reason: str, text: str, dlq_topic: str, exception: str | None = None) -> Output:
    """The original bytes and headers plus ``__riskpipe.errors.*`` (Kafka Connect's convention)."""
    headers = list(m.headers or []) + [
        ("__riskpipe.errors.reason", reason.encode()),
        ("__riskpipe.errors.message", text.encode("utf-8", "backslashreplace")),
        ("__riskpipe.errors.topic", m.topic.encode("utf-8", "backslashreplace")),
        ("__riskpipe.errors.partition", str(m.partition).encode()),
        ("__riskpipe.errors.offset", str(m.offset).encode()),
    ]
    if exception:
        headers.append(("__riskpipe.errors.exception", exception.encode()))
    return Output(dlq_topic, m.key, m.value if m.value is not None else b"", headers)
