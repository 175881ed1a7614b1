"""The fast canonical JSON (orjson) decides exactly as the standard library's reference
(``json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)``, docs/records.md): the chain walk's check on every text (canonical
records, records with the float forms orjson writes differently, edited texts) and
``canonical_json`` on every value (same text, or refused where the reference raises)."""

import dataclasses
import enum
import json
import math
import random
import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from ledger_records import decision_record
from riskpipe.ledger import LedgerError, canonical_json, entry_hash
from riskpipe.ledger.chain import ChainWalk, _orjson_own_form, _own_form_seqs, decision_scope, read_canonical


def reference_json(value):
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def reference(text):
    try:
        record = json.loads(text)
    except ValueError:
        return None, "not JSON"
    try:
        return record, None if reference_json(record) == text else "not canonical"
    except ValueError:  # NaN or Infinity
        return record, "not canonical"


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


_FORM_TEXTS = ['{"r":0.00001}', '{"r":-0.00002}', '[0.00001]', '0.00001', '{"r":1e-6}', '1e-7', '{"a":[1.5e-9]}',
               '{"t":"12:00:10.000000Z"}', '{"n":"rule-e-x"}', '{"r":1e-10}', '{"r":10.00001}', '{"r":1.00001}',
               '{"s":"x0.0000"}', '{"s":".0.00001"}', '{"r":1e-05}', 'e-5', '5e-', '-0.00001', '"\\n0.00001"', '']


def test_a_batch_is_scanned_for_orjson_forms_as_each_text_is():
    """The walk scans a batch's texts joined: the same texts are flagged as text by text,
    wherever a form sits (a text's first or last bytes next to its neighbours' included),
    as bytes or as str, and a flagged record is decided by the reference."""
    rng = random.Random(20261203)
    plain = canonical_json(decision_record(1))
    for _ in range(300):
        texts = [rng.choice(_FORM_TEXTS + [plain] * 4) for _ in range(rng.randrange(1, 9))]
        if rng.random() < 0.5:  # the forms glued to a neighbour's first or last bytes
            texts = [t + rng.choice(["", "0", "9", ".", "e", "-"]) if rng.random() < 0.3 else t for t in texts]
        want = {seq for seq, t in enumerate(texts, 1) if _orjson_own_form(t.encode())}
        for stored in (texts, [t.encode() for t in texts], [t if i % 2 else t.encode() for i, t in enumerate(texts)]):
            assert _own_form_seqs([(seq, None, None, None, t) for seq, t in enumerate(stored, 1)]) == want, texts
    # an orjson-form record (hash and all else intact) is refused by the walk, as by read_canonical
    rows, prev = [], "0" * 64
    for seq, text in enumerate([plain, '{"r":1e-6,"ts":null}', plain], 1):
        stored = entry_hash(prev, "decision", f"e{seq}", text)
        rows.append((seq, "decision", f"e{seq}", json.loads(text)["ts"], text.encode(), prev, stored,
                     decision_scope("decision", json.loads(text))))
        prev = stored
    walk = ChainWalk()
    walk.feed(rows)
    assert walk.bad == (2, "row 2: stored record is not canonical JSON (edited)")


def written_like_the_reference(value):
    """``canonical_json(value)`` is the reference's text, or LedgerError where the reference raises."""
    try:
        want = reference_json(value)
    except (TypeError, ValueError, RecursionError):
        want = None
    if want is None:
        try:
            got = canonical_json(value)
        except LedgerError:
            return
        raise AssertionError(f"{value!r}: the reference refuses it, canonical_json wrote {got!r}")
    assert canonical_json(value) == want, value


class _Str(str):
    pass


class _Int(int):
    def __repr__(self):
        return "_Int()"


class _Dict(dict):
    pass


class _Color(enum.Enum):
    RED = 1


class _Level(enum.IntEnum):
    HIGH = 3


class _Mode(enum.StrEnum):
    DECIDE = "decide"


@dataclasses.dataclass
class _Point:
    x: int


_FLOATS = [1e-5, 1e-05, 2.5e-05, 3.2e-6, 7e-7, 1.5e-8, 9.9e-9, 1e-9, 1e-10, 1e-4, 0.0001, 1e15, 1e16, 1e17, 1e22,
           1.7976931348623157e308, 2.2250738585072014e-308, 5e-324, 1e-320, -0.0, 0.0, 0.1, 1 / 3, 123456789.125]
_TEXTS = ["", "a", "é", "\u2028", "\u2029", "\x00", "\x1f", "\x7f", "\t\n\r\b\f", '"\\/', "\ufeff", "\U0001f600",
          "\ud800", "x\udfffy", "12:00:10.000000Z", "rule-e-5", "0.00001", "null", "NaN"]


def _scalar(rng):
    kind = rng.randrange(12)
    if kind == 0:
        return rng.choice(_FLOATS) * rng.choice([1, -1])
    if kind == 1:  # any magnitude, subnormals included
        return rng.choice([1, -1]) * rng.random() * 10.0 ** rng.randint(-325, 308)
    if kind == 2:
        return rng.choice([0, 1, -1, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -2**63, -2**63 - 1, 10**30,
                           rng.randint(-2**70, 2**70)])
    if kind == 3:
        return "".join(rng.choice(_TEXTS) + chr(rng.randrange(0x30000)) * rng.randrange(2) for _ in range(3))
    if kind == 4:
        return rng.choice([None, True, False])
    if kind == 5 and rng.random() < 0.2:  # values the reference refuses or writes its own way
        return rng.choice([math.nan, math.inf, -math.inf, _Str("s"), _Int(5), _Dict(a=1), _Color.RED, _Level.HIGH,
                           _Mode.DECIDE, uuid.UUID(int=7), datetime(2024, 5, 1, tzinfo=UTC), _Point(1), (1, 2.5),
                           b"bytes", {1: 2}, {None: 1}, {2.5: "x"}])
    return rng.random() * rng.choice([1, 1e-6, 1e20])


def _value(rng, depth=0):
    if depth < 4 and rng.random() < 0.35:
        if rng.random() < 0.5:
            return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
        return {rng.choice(_TEXTS) + str(rng.randrange(50)): _value(rng, depth + 1) for _ in range(rng.randrange(5))}
    return _scalar(rng)


def test_canonical_json_writes_the_reference_text_on_seeded_random_records():
    rng = random.Random(20261203)
    for _ in range(20000):
        written_like_the_reference({"id": "x", "v": _value(rng)})


def test_canonical_json_writes_decision_records_like_the_reference():
    for i in range(200):
        rec = decision_record(i, radius=[0.6, 1e-5, 3e-7, 0.0][i % 4], abstained=i % 7 == 0)
        assert canonical_json(rec) == reference_json(rec)


def test_canonical_json_refuses_what_the_reference_refuses():
    """orjson would write NaN and Infinity as null, a UUID, Enum or datetime as text: the
    ledger refuses them (fail closed), as the reference does."""
    rec = decision_record(1)
    for bad in (math.nan, math.inf, -math.inf, uuid.UUID(int=1), _Color.RED, datetime(2024, 5, 1), _Point(1)):
        for where in ({**rec, "score": bad}, {**rec, "certificate": {**rec["certificate"], "bound": [1.0, bad]}}):
            try:
                canonical_json(where)
            except LedgerError:
                continue
            raise AssertionError(f"{bad!r} was written")
    assert canonical_json({"a": _Level.HIGH, "b": _Mode.DECIDE, "c": (1, 2)}) == '{"a":3,"b":"decide","c":[1,2]}'
    assert canonical_json({"n": 2**64}) == '{"n":18446744073709551616}'
    assert canonical_json({"r": 1e-05}) == '{"r":1e-05}'


@given(values | st.sampled_from([math.nan, math.inf, -math.inf]))
def test_canonical_json_agrees_with_the_reference(value):
    written_like_the_reference({"v": value})


def test_check_chain_still_takes_rows_without_their_scope_column():
    """``check_chain`` (riskpipe.ledger's API) walks seven-column rows as documented; the
    scope column the stored-ledger walk checks is optional there."""
    from riskpipe.ledger import check_chain

    rows, prev = [], "0" * 64
    for seq in (1, 2):
        text = canonical_json({"id": f"e{seq}", "ts": None})
        stored = entry_hash(prev, "decision", f"e{seq}", text)
        rows.append((seq, "decision", f"e{seq}", None, text, prev, stored))
        prev = stored
    n, head, bad, _, _ = check_chain(rows)
    assert (n, head, bad) == (2, prev, None)
