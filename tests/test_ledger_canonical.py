"""The chain walk's fast canonical-JSON check (orjson) decides exactly as the standard
library's reference (``canonical_json``) on every text: canonical records, records
with the float forms orjson writes differently, and edited texts."""

import json
import math

from hypothesis import given
from hypothesis import strategies as st

from ledger_records import decision_record
from riskpipe.ledger import canonical_json
from riskpipe.ledger.chain import _orjson_own_form, read_canonical


def reference(text):
    try:
        record = json.loads(text)
    except ValueError:
        return None, "not JSON"
    return record, None if canonical_json(record) == text else "not canonical"


def agree(text):
    ref_record, ref_problem = reference(text)
    for stored in (text, text.encode("utf-8", "surrogatepass")):  # verify reads the stored bytes
        fast_record, fast_problem = read_canonical(stored)
        assert (fast_problem is None) == (ref_problem is None), (text, fast_problem, ref_problem)
        if ref_problem is None:
            assert fast_record == ref_record


floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [1e-5, 3.2e-6, 7e-7, 1.5e-8, 9.9e-9, 1e-4, 1e-10, 1e16, 1e-300, 5e-324, -0.0, 0.0001, 2.5e-05])
scalars = st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70) | floats | st.text(max_size=8)
values = st.recursive(scalars,
                      lambda inner: (st.lists(inner, max_size=4)
                                     | st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                      max_leaves=12)


@given(values)
def test_canonical_texts_are_accepted_like_the_reference(value):
    agree(canonical_json(value))


@given(values)
def test_orjson_own_forms_and_other_serialisations_are_judged_by_the_reference(value):
    import orjson

    try:
        agree(orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode())
    except TypeError:  # integers beyond 64 bits: orjson cannot write them
        pass
    agree(json.dumps(value, sort_keys=True))  # spaces after separators: never canonical
    agree(json.dumps(value, sort_keys=True, separators=(",", ":")))  # ASCII escapes of non-ASCII: not canonical


def test_float_forms_where_orjson_and_the_standard_library_differ():
    for x in (1e-5, 2.5e-05, 7e-07, 1.5e-8, 9.99e-9, 1e-9):
        good = canonical_json({"r": x})
        assert read_canonical(good) == ({"r": x}, None)
        edited = good.replace(repr(x), format(x, ".20f").rstrip("0"))  # the same value written without exponent
        assert math.isclose(json.loads(edited)["r"], x) and edited != good
        assert read_canonical(edited)[1] == "stored record is not canonical JSON (edited)"
    assert read_canonical('{"r":1e-6}')[1] == "stored record is not canonical JSON (edited)"  # orjson's form


def test_edits_that_keep_the_json_valid_are_not_canonical():
    good = canonical_json(decision_record(7))
    assert read_canonical(good)[1] is None
    for edited in (good.replace('"decision":', '"decision": ', 1),  # whitespace
                   good[:-1] + ',"decision":"allow"}',  # duplicate key: parsers may disagree on its value
                   good.replace('"score":0.1', '"score":1E-1', 1),
                   good.replace('"score":0.1', '"score":0.10', 1)):
        assert edited != good
        assert read_canonical(edited)[1] == "stored record is not canonical JSON (edited)"
    assert read_canonical(good[:-1])[1] == "stored record is not JSON (edited)"
    assert read_canonical('{"a":NaN}')[1] is not None


def test_times_in_strings_keep_their_record_on_the_fast_path():
    """Only a number can be one of orjson's own forms: a time such as 12:00:10.000000Z in a
    string does not send its record to the standard library (a tenth of the benchmark's)."""
    rec = {**decision_record(3), "ts": "2024-05-01T12:00:10.000000Z", "note": "rule-e-x"}
    assert not _orjson_own_form(canonical_json(rec).encode())
    for text in ('{"r":0.00001}', '{"r":-0.00002}', '[0.00001]', '0.00001', '{"r":1e-6}'):
        assert _orjson_own_form(text.encode()), text
