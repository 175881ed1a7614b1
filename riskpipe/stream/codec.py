"""JSON on the stream's hot path: orjson (a well-kept C library, 4-8x faster than the
standard library here) with the standard library's reading of what orjson refuses.

``loads`` reads exactly what ``json.loads`` reads: orjson rejects NaN/Infinity
literals, numbers no double can hold and lone surrogates, and those messages are read
again by the standard library, so validation (not the parser) says what is wrong
with them. Both readers turn an integer literal beyond 64 bits into a double (orjson
does so itself); one too large even for a double becomes an ``OversizedInt``
(validation reports it as ``out_of_range``) instead of raising. Both keep the last of
a member name given twice in one object, as many readers do but not all (some keep the
first, some refuse): ``riskpipe.json_text.duplicate_key`` finds such names, so the
stage certifies only events every reader reads alike (I-JSON, RFC 7493: names unique).
``dumps`` writes compact, key-sorted UTF-8 for the output topics; the ledger's
canonical JSON (riskpipe/ledger/chain.py) does not come through here.
"""

from __future__ import annotations

import json
import math
from typing import Any

import orjson

MAX_INT_DIGITS = 20  # int64 and uint64 fit; longer integer literals are read as doubles, as orjson does


class OversizedInt:
    """An integer literal too large for a double, kept unconverted (Python refuses
    int() beyond 4,300 digits, and nothing needs such a number):
    validation reports it as ``out_of_range`` at its field."""

    __slots__ = ("digits",)

    def __init__(self, text: str):
        self.digits = len(text.lstrip("-"))


def _bounded_int(text: str):
    """What orjson makes of an integer literal, so both readers agree: exact up to
    ``MAX_INT_DIGITS`` digits, a (finite) double beyond that, and ``OversizedInt`` when
    not even a double holds it (more than ~309 digits)."""
    if len(text) <= MAX_INT_DIGITS:
        return int(text)
    f = float(text)
    return f if math.isfinite(f) else OversizedInt(text)


def loads(value: bytes | str) -> Any:
    return loads_checked(value)[0]


def loads_checked(value: bytes | str) -> tuple[Any, bool]:
    """(object, clean). ``clean`` when orjson read it: orjson refuses NaN/Infinity,
    numbers that overflow a double and lone surrogates, so such an object holds only
    finite numbers, integers that are no ``OversizedInt`` and valid Unicode text, and
    validation need not walk it again (riskpipe.stream.events.check_values)."""
    try:
        return orjson.loads(value), True
    except orjson.JSONDecodeError:  # bounded: a 5,000-digit integer must not raise (int() stops at 4,300)
        return json.loads(value, parse_int=_bounded_int), False


def dumps(obj: Any) -> bytes:
    """Compact JSON with sorted keys; NaN and infinities are written as null (orjson's
    rule, as JSON has no spelling for them)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
