"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` and
``tracestate`` headers of an input event travel to every output the stage writes for
it, and the decision record keeps them, so a pipeline's tracing follows an event
through the stage (and an auditor can join a ledger row to its trace).

A ``traceparent`` that is not valid version-00 syntax is ignored, as the
specification tells a receiver to do (it never sends an event to the DLQ), and
``tracestate`` is only carried with a valid ``traceparent``.
"""

from __future__ import annotations

import re

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# version-traceid-parentid-flags; a future version may append fields after the flags
_PARENT = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$")


def trace_context(headers: dict[str, str]) -> dict[str, str] | None:
    """{traceparent, tracestate?} from lower-cased message headers, or None."""
    tp = (headers.get(TRACEPARENT) or "").strip()
    m = _PARENT.match(tp)
    if not m:
        return None
    version, trace_id, parent_id, _, rest = m.groups()
    if version == "ff" or (version == "00" and rest) or set(trace_id) == {"0"} or set(parent_id) == {"0"}:
        return None
    out = {TRACEPARENT: tp}
    state = (headers.get(TRACESTATE) or "").strip()
    if state:
        out[TRACESTATE] = state[:512]  # the specification's limit
    return out


def trace_headers(record: dict) -> list[tuple[str, bytes]]:
    """The Kafka headers that carry a record's trace context onwards."""
    trace = record.get("trace") or {}
    return [(k, trace[k].encode()) for k in (TRACEPARENT, TRACESTATE) if trace.get(k)]
