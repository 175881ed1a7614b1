"""What the stage sends: the serialised outputs of one decision and of one dead letter.

Serialisation happens per event, before anything is written or sent, so an event
whose record cannot be serialised is that event's failure (``internal_error``),
never the batch's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

from riskpipe.stream import codec
from riskpipe.stream.ports import Message
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


OUTPUT_TOO_LARGE = "output_too_large"
# Kafka record-batch framing (61 bytes) and per-record varints, generously: an output of
# ``output_size`` <= max_output_bytes is a batch a broker with message.max.bytes ==
# max_output_bytes (+12, Kafka's log overhead) accepts
RECORD_OVERHEAD = 512
MAX_ERROR_TEXT = 2000  # characters of an error message in a DLQ header


class OutputTooLarge(ValueError):
    """An output larger than ``max_output_bytes``: that event's dead letter (``output_too_large``)."""


def output_size(key: bytes | None, value: bytes | None, headers) -> int:
    """Bytes an output occupies in a Kafka record batch (an upper bound)."""
    return (len(key or b"") + len(value or b"") + RECORD_OVERHEAD
            + sum(len(k.encode() if isinstance(k, str) else k) + len(v or b"") + 10 for k, v in headers or ()))


def check_sizes(outputs: list[Output], limit: int) -> list[Output]:
    """``outputs``, or OutputTooLarge naming the first one larger than ``limit`` bytes."""
    for o in outputs:
        size = output_size(o.key, o.value, o.headers)
        if size > limit:
            raise OutputTooLarge(f"{o.topic} output of {size} bytes exceeds max_output_bytes {limit}")
    return outputs


def dead_letter_output(m: Message, reason: str, text: str, dlq_topic: str, exception: str | None = None,
                       limit: int | None = None) -> Output:
    """The original bytes and headers plus ``__riskpipe.errors.*`` (Kafka Connect's convention).

    Bounded by ``limit`` (max_output_bytes), so a dead letter can always be sent: when
    the original would not fit, the payload is left out (``__riskpipe.errors.payload``:
    ``omitted``, with ``payload_sha256`` and ``payload_bytes`` naming it; the source
    topic, partition and offset headers locate the original), and if even that is too
    large, the original headers too (``__riskpipe.errors.headers``: ``omitted``)."""
    value = m.value if m.value is not None else b""
    if len(text) > MAX_ERROR_TEXT:
        text = text[:MAX_ERROR_TEXT] + f"... ({len(text) - MAX_ERROR_TEXT} characters more)"
    errors = [
        ("__riskpipe.errors.reason", reason.encode()),
        ("__riskpipe.errors.message", text.encode("utf-8", "backslashreplace")),
        ("__riskpipe.errors.topic", m.topic.encode("utf-8", "backslashreplace")),
        ("__riskpipe.errors.partition", str(m.partition).encode()),
        ("__riskpipe.errors.offset", str(m.offset).encode()),
    ]
    if exception:
        errors.append(("__riskpipe.errors.exception", exception.encode()))
    original = list(m.headers or [])
    key = m.key
    if limit is not None and output_size(key, value, original + errors) > limit:
        errors += [("__riskpipe.errors.payload", b"omitted"),
                   ("__riskpipe.errors.payload_sha256", hashlib.sha256(value).hexdigest().encode()),
                   ("__riskpipe.errors.payload_bytes", str(len(value)).encode())]
        value = b""
        if output_size(key, value, original + errors) > limit:
            original = []
            errors.append(("__riskpipe.errors.headers", b"omitted"))
        if output_size(key, value, original + errors) > limit:
            key = None  # a key of up to the input limit: the payload digest still names the message
    return Output(dlq_topic, key, value, original + errors)
