"""W3C Trace Context (https://www.w3.org/TR/trace-context/): the ``traceparent`` and
``tracestate`` headers of an input event travel to every output the stage writes for
it, and the decision record keeps them, so a pipeline's tracing follows an event
through the stage (and an auditor can join a ledger row to its trace).

Both headers come from whoever produced the event, and whatever is carried is copied
to every output (the public decisions topic included), so only what the
specification allows is carried, bounded:

* ``traceparent``: exactly ``version-traceid-parentid-flags`` in lower-case hex
  (55 characters for version 00, nothing after the flags); version ``ff`` and all-zero
  trace or parent ids are invalid. A higher version may append ``-...`` after the
  flags (the specification's forward compatibility); its known fields are parsed and
  carried on as version 00 (the only version riskpipe knows how to send), the
  unknown rest is not copied. Anything else is ignored, as the specification tells a
  receiver to do (the event is still decided; it never goes to the DLQ for this).
* ``tracestate`` (only with a valid ``traceparent``): a list of at most 32
  ``key=value`` members with the specification's key and value grammar and no
  duplicate keys, else it is dropped whole; over 512 characters, whole members are
  dropped (those over 128 characters first, then from the end) as the
  specification suggests.

A header given more than once reaches ``trace_context`` combined (``events._headers``:
copies joined by commas, as HTTP combines a repeated field): the copies of
``tracestate`` make one list, and two copies of ``traceparent`` make no valid one.
"""

from __future__ import annotations

import re

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
TRACESTATE_MAX_MEMBERS = 32
TRACESTATE_MAX_CHARS = 512
_LONG_MEMBER = 128

_HEX = "[0-9a-f]"
# version-traceid-parentid-flags, then end of string (version 00) or "-..." (a higher version)
_PARENT = re.compile(rf"({_HEX}{{2}})-({_HEX}{{32}})-({_HEX}{{16}})-({_HEX}{{2}})(-[\x21-\x7e]*)?")
_KEY_CHARS = r"[a-z0-9_\-*/]"
_KEY = re.compile(rf"[a-z]{_KEY_CHARS}{{0,255}}|[a-z0-9]{_KEY_CHARS}{{0,240}}@[a-z]{_KEY_CHARS}{{0,13}}")
_VALUE = re.compile(r"[\x20-\x2b\x2d-\x3c\x3e-\x7e]{0,255}[\x21-\x2b\x2d-\x3c\x3e-\x7e]")
_OWS = " \t"


def parse_traceparent(value: str) -> str | None:
    """The version-00 ``traceparent`` to carry for ``value``, or None when it is invalid."""
    m = _PARENT.fullmatch(value.strip(_OWS))
    if not m:
        return None
    version, trace_id, parent_id, flags, rest = m.groups()
    if version == "ff" or (version == "00" and rest is not None):
        return None
    if trace_id == "0" * 32 or parent_id == "0" * 16:
        return None
    return f"00-{trace_id}-{parent_id}-{flags}"


def parse_tracestate(value: str) -> str | None:
    """``value`` as a valid, bounded ``tracestate`` (members joined by ","), or None."""
    if len(value) > 64 * TRACESTATE_MAX_CHARS:  # far beyond 32 members of the longest form: not worth parsing
        return None
    members = [m.strip(_OWS) for m in value.split(",")]
    members = [m for m in members if m]  # empty list-members are allowed and dropped
    if not members or len(members) > TRACESTATE_MAX_MEMBERS:
        return None
    keys = set()
    for m in members:
        key, sep, val = m.partition("=")
        if not sep or not _KEY.fullmatch(key) or not _VALUE.fullmatch(val) or key in keys:
            return None
        keys.add(key)
    for too_long in (lambda m: len(m) > _LONG_MEMBER, lambda m: True):
        i = len(members) - 1
        while len(",".join(members)) > TRACESTATE_MAX_CHARS and i >= 0:
            if too_long(members[i]):
                del members[i]
            i -= 1
    return ",".join(members) or None


def trace_context(headers: dict[str, str]) -> dict[str, str] | None:
    """{traceparent, tracestate?} from lower-cased message headers, or None."""
    parent = parse_traceparent(headers.get(TRACEPARENT) or "")
    if parent is None:
        return None
    out = {TRACEPARENT: parent}
    state = parse_tracestate(headers.get(TRACESTATE) or "")
    if state:
        out[TRACESTATE] = state
    return out


def trace_headers(record: dict) -> list[tuple[str, bytes]]:
    """The Kafka headers that carry a record's trace context onwards."""
    trace = record.get("trace") or {}
    return [(k, trace[k].encode()) for k in (TRACEPARENT, TRACESTATE) if trace.get(k)]
