"""JSON on the stream's hot path: orjson (a well-kept C library, 4-8x faster than the
standard library here) with the standard library's reading of what orjson refuses.

``loads`` reads exactly what ``json.loads`` reads: orjson rejects NaN/Infinity
literals, integers beyond 64 bits and lone surrogates, and those messages are read
again by the standard library, so validation (not the parser) says what is wrong
with them. ``dumps`` writes compact, key-sorted UTF-8 for the output topics; the
ledger's canonical JSON (riskpipe/ledger/chain.py) does not come through here.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(value: bytes | str) -> Any:
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError:
        return json.loads(value)


def dumps(obj: Any) -> bytes:
    """Compact JSON with sorted keys; NaN and infinities are written as null (orjson's
    rule, as JSON has no spelling for them)."""
    return orjson.dumps(obj, option=orjson.OPT_SORT_KEYS)
