"""riskpipe.json_text.loads: every text that is not JSON is a ValueError, nesting included."""

from __future__ import annotations

import json

import pytest

from riskpipe.json_text import loads


@pytest.mark.parametrize("text", ["[" * 100_000, "[" * 100_000 + "]" * 100_000, '{"a":' * 50_000 + "1" + "}" * 50_000])
def test_nesting_too_deep_for_the_standard_library_is_a_json_error(text):
    with pytest.raises(RecursionError):  # what the standard library itself raises
        json.loads(text)
    for t in (text, text.encode()):
        with pytest.raises(json.JSONDecodeError, match="nested too deeply"):
            loads(t)


def test_json_reads_as_the_standard_library_reads_it():
    text = '{"a": [1, 2.5, "x", null, true, {"b": NaN}], "c": 12345678901234567890123}'
    assert repr(loads(text)) == repr(json.loads(text)) == repr(loads(text.encode()))
    with pytest.raises(json.JSONDecodeError):
        loads("{not json")
    with pytest.raises(ValueError):
        loads(b"\xff")
