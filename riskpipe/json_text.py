"""Reading JSON text that riskpipe did not write (a Kafka message, a file a user hands in).

* :func:`loads`: ``json.loads`` whose every refusal is a ValueError. The standard library
  raises RecursionError for arrays or objects nested some thousand deep, which a reader
  catching bad JSON as ValueError does not catch: one such message stopped
  ``ledger ingest`` and the review console's feed, one such file gave a traceback.
* :func:`duplicate_key` (and :func:`repeated_name`, the sentence that refuses it): member
  names given twice in one object. RFC 8259 leaves such a
  text's meaning open: Python's readers (orjson, the standard library) keep the last copy,
  others keep the first or refuse the text. Wherever riskpipe acts on JSON that someone
  else may read too (an inference event served by a model server, a verdict, a receipt
  shown to an auditor) a name given twice is refused, so every reader reads the same thing
  (I-JSON, RFC 7493: names unique).
"""

from __future__ import annotations

import json
import re
from typing import Any


def loads(text: str | bytes | bytearray) -> Any:
    """``json.loads(text)``; too deep a nesting (a RecursionError) and an integer beyond
    Python's 4,300-digit conversion limit (a bare ValueError) are a ``json.JSONDecodeError``
    like any other text that is not JSON, which every reader of user files catches."""
    doc = text if isinstance(text, str) else ""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", doc, 0) from None
    except ValueError as e:  # "Exceeds the limit (4300 digits) for integer string conversion"
        raise json.JSONDecodeError(str(e).split(";")[0], doc, 0) from None


def jsonl_lines(text: str) -> list[str]:
    """The lines of JSON-lines text: split at "\n" only (a "\r" before it is JSON
    whitespace). ``str.splitlines`` also splits at U+2028, U+2029, U+0085 and other
    characters a JSON string may hold unescaped (orjson writes them as they are), so one
    record with one in its id or context made the whole file unreadable to every reader."""
    return text.split("\n")


def _zero(_text: str) -> int:
    """Numbers are not needed to find names (and a 5,000-digit integer must not raise)."""
    return 0


# Every JSON string in order, and whether a colon follows it (then it is a member name).
# Outside strings JSON has no quotes, so scanning from one string's end to the next quote
# never starts inside a string: the matches are exactly the text's strings.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"(\s*:)?')


def _names_in(obj: Any) -> int:
    """How many member names the parsed ``obj`` kept (the sizes of all its objects)."""
    n, stack = 0, [obj]
    while stack:
        v = stack.pop()
        if type(v) is dict:
            n += len(v)
            v = v.values()
        kinds = set(map(type, v))  # one C-speed pass: a list of numbers (a tensor's data) holds no names
        if dict in kinds or list in kinds:
            stack.extend(c for c in v if type(c) is dict or type(c) is list)
    return n


def duplicate_key(text: bytes | str, obj: Any) -> str | None:
    """The first member name given twice in one object of the JSON ``text`` (parsed as
    ``obj``), else None. Exact: the text's member names are counted (``_STRING``) against
    those the parser kept, in one pass each; only a text that has more is read again,
    with the standard library, to name the key (however it was escaped: ``"\\u0069d"`` is
    ``"id"``). ``text`` may be ``str`` (read as its UTF-8)."""
    if type(obj) is not dict and type(obj) is not list:
        return None
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogatepass")
    strings = _STRING.findall(text)  # per string: its colon, or b"" for a value
    if len(strings) - strings.count(b"") == _names_in(obj):
        return None

    def pairs(items: list[tuple[str, Any]]) -> dict:
        seen: dict = {}
        for k, v in items:
            if k in seen:
                raise _Duplicate(k)
            seen[k] = v
        return seen

    try:
        json.loads(text, object_pairs_hook=pairs, parse_int=_zero, parse_float=_zero, parse_constant=_zero)
    except _Duplicate as d:
        return d.key
    return None


def repeated_name(text: bytes | str, obj: Any) -> str | None:
    """Why ``text`` (parsed as ``obj``) is refused when it gives a member name twice in one
    object (``duplicate_key``), in the words every reader of it uses; None when it does not."""
    key = duplicate_key(text, obj)
    if key is None:
        return None
    return f"the member name {key[:80]!r} appears twice in one object; readers disagree on which one counts"


class _Duplicate(Exception):
    def __init__(self, key: str) -> None:
        self.key = key
