"""Event validation: every malformed input gets its DLQ reason, nothing else escapes."""

import json
import math
import unicodedata

import jsonschema
import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from riskpipe.stream.errors import EventError
from riskpipe.stream.events import make_event, parse_event

REASONS = {"invalid_json", "not_an_object", "missing_field", "wrong_type", "wrong_dtype", "wrong_shape",
           "non_finite", "out_of_range", "unknown_model", "oversized", "unsupported_cloudevent", "bad_id",
           "bad_time", "duplicate_key"}


@pytest.fixture(scope="module")
def models(demo_model):
    return {"digits": demo_model}


@pytest.fixture(scope="module")
def schema():
    from importlib.resources import files

    return json.loads(files("riskpipe").joinpath("schemas/inference-event.v1.json").read_text())


def good(x=None):
    return make_event("e1", "digits", np.zeros((1, 8, 8), np.float32) if x is None else x, prediction=3,
                      upstream_risk=0.2)


def test_plain_binary_and_structured_cloudevents(models, schema):
    e = good()
    jsonschema.validate(e, schema)
    ev = parse_event(json.dumps(e).encode(), [], models)
    assert ev.id == "e1" and ev.x.shape == (1, 8, 8) and ev.prediction == 3
    headers = [("ce_id", b"ce-9"), ("ce_source", b"/x"), ("ce_type", b"org.kserve.inference.request"),
               ("ce_specversion", b"1.0")]
    body = {k: v for k, v in e.items() if k != "id"}
    ev = parse_event(json.dumps(body).encode(), headers, models)
    assert ev.id == "ce-9" and ev.cloudevent["source"] == "/x"
    structured = {"specversion": "1.0", "id": "ce-10", "source": "/y", "type": "riskpipe.inference.v1",
                  "time": "2026-01-01T00:00:00Z", "data": body}
    ev = parse_event(json.dumps(structured).encode(), [("content-type", b"application/cloudevents+json")], models)
    assert ev.id == "ce-10" and ev.time == "2026-01-01T00:00:00Z"


def _reason(value: bytes, models, headers=(), max_bytes=1 << 20) -> str:
    with pytest.raises(EventError) as e:
        parse_event(value, list(headers), models, max_bytes)
    assert e.value.code in REASONS
    assert ":" in str(e.value)  # names the field
    return e.value.code


def _mut(**changes):
    e = good()
    t = e["inputs"][0]
    for k, v in changes.items():
        if v is None:
            (t if k in t else e).pop(k)
        else:
            (t if k in t else e)[k] = v
    return json.dumps(e).encode()


def test_each_reason(models):
    flat = good()["inputs"][0]["data"]
    assert _reason(b"{not json", models) == "invalid_json"
    assert _reason(b"[1,2]", models) == "not_an_object"
    assert _reason(_mut(model=None), models) == "missing_field"
    assert _reason(_mut(shape=None), models) == "missing_field"
    assert _reason(_mut(datatype="BYTES"), models) == "wrong_dtype"
    assert _reason(_mut(datatype="INT32"), models) == "wrong_dtype"
    assert _reason(_mut(shape=[1, 1, 4, 4]), models) == "wrong_shape"
    assert _reason(_mut(data=flat[:10]), models) == "wrong_shape"
    assert _reason(_mut(data=["a"] * 64), models) == "wrong_type"
    assert _reason(_mut(data=[float("nan")] + flat[1:]), models) == "non_finite"
    assert _reason(_mut(data=[1e400] + flat[1:]).replace(b"Infinity", b"1e400"), models) == "non_finite"
    assert _reason(_mut(data=[-0.5] + flat[1:]), models) == "out_of_range"
    assert _reason(_mut(model="other"), models) == "unknown_model"
    assert _reason(_mut(id=""), models) == "bad_id"
    assert _reason(_mut(prediction=99), models) == "wrong_type"
    for not_an_object in ([], "", 0, False, [1], "x"):  # falsy ones were recorded as {} before
        assert _reason(_mut(context=not_an_object), models) == "wrong_type", not_an_object
    assert _reason(b"x" * 2000, models, max_bytes=1024) == "oversized"
    assert _reason(_mut(), models, [("ce_type", b"evil"), ("ce_specversion", b"1.0")]) == "unsupported_cloudevent"
    assert _reason(_mut(), models, [("ce_type", b"riskpipe.inference.v1"), ("ce_specversion", b"0.3")]) == \
        "unsupported_cloudevent"


def test_upstream_risk_is_not_a_reason_to_reject(models):
    """A malformed upstream risk is the policy's business (default + flag), not the DLQ's."""
    ev = parse_event(_mut(upstream_risk="high"), [], models)
    assert ev.upstream_risk == "high"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=6), children, max_size=5),
    max_leaves=8,
)


@st.composite
def malformed(draw):
    """Events that are wrong in one or more generated ways."""
    kind = draw(st.sampled_from(["bytes", "json", "mutate", "headers"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200)), []
    if kind == "json":
        return json.dumps(draw(json_values)).encode(), []
    e = good()
    t = e["inputs"][0]
    for _ in range(draw(st.integers(1, 3))):
        target = draw(st.sampled_from(["id", "model", "inputs", "shape", "datatype", "data", "prediction",
                                       "context", "time", "elem"]))
        if target == "elem" and isinstance(t.get("data"), list) and len(t["data"]) == 64:
            i = draw(st.integers(0, 63))
            t["data"][i] = draw(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=3),
                                          st.none(), st.booleans(), st.integers(-5, 5)))
        elif target == "elem":
            continue
        elif target in t:
            t[target] = draw(json_values)
        else:
            e[target] = draw(json_values)
    value = json.dumps(e).encode()
    headers = []
    if kind == "headers":
        headers = [("ce_type", draw(st.text(max_size=10)).encode()),
                   ("ce_specversion", draw(st.sampled_from([b"1.0", b"0.3", b""])))]
    return value, headers


@settings(max_examples=10_000, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(malformed())
def test_fuzz_validator_never_raises_anything_else(models, case):
    value, headers = case
    try:
        ev = parse_event(value, headers, models, max_bytes=4096)
    except EventError as e:
        assert e.code in REASONS and str(e)
        return
    # whatever got through is a valid event for the model
    assert ev.x.shape == (1, 8, 8) and np.isfinite(ev.x).all() and ev.x.min() >= 0 and ev.x.max() <= 1
    assert isinstance(ev.id, str) and ev.id


def _raw(e: dict) -> bytes:
    return json.dumps(e).encode()


def test_ids_are_unicode_text_without_control_characters(models):
    for bad in ("a\nb", "tab\there", "nul\x00", "del\x7f", "c1\x85",
                "evt-7\u202e1-tve", "evt\u200b-7", "\ufeffevt-7", "evt-7\u2066", "evt-\U000e0041",
                "evt\u2028-7", "evt\u2029-7"):
        assert _reason(_mut(id=bad), models) == "bad_id"  # control, invisible format and line separator characters
    # a lone surrogate can only arrive as a JSON escape
    assert _reason(_mut(id="PLACEHOLDER").replace(b"PLACEHOLDER", b"\\ud800"), models) == "bad_id"
    assert parse_event(_mut(id="ünïcødé-✓"), [], models).id == "ünïcødé-✓"


def test_an_id_spelled_otherwise_than_its_composed_form_is_refused(models):
    """"café" as "cafe" + U+0301 shows as the composed "café" but is another string: a
    re-sent event under it was a new event, not a duplicate or an id conflict, and two
    review items showed one id. Ids are refused unless in Unicode NFC, naming the form."""
    composed = "evt-café-한"
    decomposed = unicodedata.normalize("NFD", composed)
    assert decomposed != composed
    with pytest.raises(EventError, match=r"id: .*is not in Unicode NFC form.*'evt-caf\\\\xe9-\\\\ud55c'") as e:
        parse_event(_mut(id=decomposed), [], models)
    assert e.value.code == "bad_id"
    assert parse_event(_mut(id=composed), [], models).id == composed


def test_every_number_is_bounded_and_finite(models):
    huge = "9" * 5000  # beyond Python's 4,300-digit int() limit
    for field in ("prediction", "context"):
        value = _mut(**{field: 0}).replace(f'"{field}": 0'.encode(), f'"{field}": {huge}'.encode())
        assert _reason(value, models) == "out_of_range"
    nested = _mut(context={"a": [1, {"b": 7}]}).replace(b'{"b": 7}', f'{{"b": {huge}}}'.encode())
    with pytest.raises(EventError, match=r"context\.a\[1\]\.b: an integer of 5000 digits"):
        parse_event(nested, [], models)
    data = _mut(data=[0] * 64).replace(b"[0, 0", f"[{huge}, 0".encode(), 1)
    assert _reason(data, models) == "out_of_range"
    for const in (b"NaN", b"Infinity", b"-Infinity"):
        ctx = _mut(context={"score": 0}).replace(b'"score": 0', b'"score": ' + const)
        with pytest.raises(EventError, match=r"context\.score: NaN or infinity") as e:
            parse_event(ctx, [], models)
        assert e.value.code == "non_finite"
    assert _reason(_mut(context={"k": 0}).replace(b'"k"', b'"\\udfff"'), models) == "invalid_json"


def test_non_finite_upstream_risk_is_flagged_by_the_policy_not_rejected(models):
    from riskpipe.app.config import default_policy_path
    from riskpipe.policy import load_policy

    policy = load_policy(default_policy_path())
    for const in (b"NaN", b"Infinity"):
        ev = parse_event(_mut(upstream_risk=0.5).replace(b'"upstream_risk": 0.5', b'"upstream_risk": ' + const),
                         [], models)
        assert not math.isfinite(ev.upstream_risk)
        from riskpipe.policy.signals import upstream_risk

        s = upstream_risk(policy.signals.upstream_risk, ev.upstream_risk)
        assert s["flagged"] and s["reason"] == "non_finite"
        json.dumps(s, allow_nan=False)


def test_tensor_data_holds_json_numbers_only(models):
    flat = good()["inputs"][0]["data"]
    for bad in ("0.5", True, None, [0.5]):
        with pytest.raises(EventError, match=r"inputs\[0\]\.data: every element must be a JSON number") as e:
            parse_event(_mut(data=[bad] + flat[1:]), [], models)
        assert e.value.code == "wrong_type"
    assert parse_event(_mut(data=[1] + flat[1:]), [], models).x.ravel()[0] == 1.0


def test_time_is_rfc3339(models):
    for ok in ("2026-01-01T00:00:00Z", "2026-01-01t00:00:00.123+02:00", "2026-12-31 23:59:59-05:30"):
        assert parse_event(_mut(time=ok), [], models).time == ok
    for bad in ("not a time", "2026-01-01", "2026-13-01T00:00:00Z", "2026-01-01T25:00:00Z", "1767225600", 5):
        assert _reason(_mut(time=bad), models) == "bad_time"


def test_only_what_orjson_reads_skips_the_value_walk():
    """parse_event skips check_values for what orjson read (``clean``); everything
    orjson refuses goes to the standard library and is walked."""
    from riskpipe.stream import codec

    assert codec.loads_checked(b'{"a": [1.5, "t", {"k": 2}]}') == ({"a": [1.5, "t", {"k": 2}]}, True)
    for raw in (b'{"a": NaN}', b'{"a": Infinity}', b'{"a": 1e400}', b'{"a": "\\ud800"}', b'{"\\udc00": 1}',
                b'{"a": ' + b"9" * 400 + b"}"):
        assert codec.loads_checked(raw)[1] is False, raw


def test_both_json_readers_agree_on_long_integers():
    """orjson reads an integer beyond 64 bits as a double; the standard library's
    fallback (taken when a message holds NaN, say) must read it the same way, and an
    integer no double holds is out_of_range on either path."""
    from riskpipe.stream import codec

    long_int = "1234567890123456789012345"  # 25 digits
    fast, clean = codec.loads_checked(b'{"a": ' + long_int.encode() + b"}")
    slow, unclean = codec.loads_checked(b'{"a": ' + long_int.encode() + b', "b": NaN}')
    assert clean and not unclean
    assert fast["a"] == slow["a"] == float(long_int) and type(slow["a"]) is float
    assert codec.loads(b'{"a": 12345678901234567890}')["a"] == 12345678901234567890  # 20 digits: exact
    huge, _ = codec.loads_checked(b'{"a": ' + b"9" * 400 + b"}")
    assert isinstance(huge["a"], codec.OversizedInt) and huge["a"].digits == 400


# ---- a name given twice ----------------------------------------------------------------------
def _dup_message(models, raw: bytes, headers=()) -> str:
    with pytest.raises(EventError) as e:
        parse_event(raw, list(headers), models)
    assert e.value.code == "duplicate_key", e.value
    return str(e.value)


def test_a_member_name_given_twice_is_refused_wherever_it_is(models):
    """Readers differ on a name given twice (Python's keep the last, others the first or
    refuse), so an event with one could be certified as one tensor and served as another:
    none is read, however the name is escaped, at any depth, with equal values too."""
    e = good()
    data = json.dumps(e["inputs"][0]["data"]).encode()
    bad = json.dumps([0.0] * 63 + [0.9]).encode()
    body = json.dumps(e).encode()
    cases = {
        "id": body.replace(b'{"id": "e1"', b'{"id": "e1", "id": "e2"'),
        "id ": body.replace(b'{"id": "e1"', b'{"id": "e1", "\\u0069d": "e2"'),  # "id", escaped
        "data": body.replace(b'"data": ' + data, b'"data": ' + data + b', "data": ' + bad),
        "k": _mut(context={"k": 1}).replace(b'{"k": 1}', b'{"k": 1, "k": 1}'),  # the same value: still refused
        "prediction": body.replace(b'"prediction": 3', b'"prediction": 3,\n  "prediction" :  4'),
    }
    for key, raw in cases.items():
        assert raw != body, key
        message = _dup_message(models, raw)
        assert f"{key.strip()!r} appears twice" in message and message.startswith("value:"), message
    structured = {"specversion": "1.0", "id": "ce-1", "source": "/s", "type": "riskpipe.inference.v1", "data": e}
    raw = json.dumps(structured).encode().replace(b'"specversion": "1.0"', b'"specversion": "1.0", "id": "ce-0"')
    assert "'id' appears twice" in _dup_message(models, raw, [("content-type", b"application/cloudevents+json")])


def test_text_that_only_looks_like_a_name_is_not_a_duplicate(models):
    """Quotes, colons and backslashes inside strings (keys and values) are string content,
    never names: no false alarm."""
    tricky = {"note": '"id": "x", "data": [1]', "a\\": "b\\", 'q"': ':"', "\\": {"\\\\": "\\"},
              "list": [{"id": 1}, {"id": 2}, ["id", "id"]], "id:": "id"}
    ev = parse_event(json.dumps({**good(), "context": tricky}).encode(), [], models)
    assert ev.context == tricky
    compact = json.dumps({**good(), "context": tricky}, separators=(",", ":")).encode()
    assert parse_event(compact, [], models).context == tricky


def test_a_header_the_stage_reads_given_twice_is_refused(models):
    body = json.dumps({k: v for k, v in good().items() if k != "id"}).encode()
    ce = [("ce_id", b"ce-9"), ("ce_source", b"/x"), ("ce_type", b"riskpipe.inference.v1"), ("ce_specversion", b"1.0")]
    assert parse_event(body, ce + [("x-app", b"1"), ("x-app", b"2")], models).id == "ce-9"  # not read: no matter
    for extra in (("ce_id", b"ce-8"), ("CE_ID", b"ce-9"), ("ce_type", b"riskpipe.inference.v1")):
        message = _dup_message(models, body, ce + [extra])
        assert message.startswith("headers:") and repr(extra[0].lower()) in message, message
    plain = json.dumps(good()).encode()
    assert "'content-type'" in _dup_message(models, plain, [("content-type", b"application/json")] * 2)


json_text_pairs = st.recursive(
    st.none() | st.integers(-5, 5) | st.text(alphabet='ab"\\:{}[], \u00e9', max_size=4),
    lambda inner: st.lists(inner, max_size=3)
    | st.lists(st.tuples(st.text(alphabet='ab"\\: ', max_size=2), inner), max_size=4).map(lambda p: ("obj", p)),
    max_leaves=10,
)


def _write(v, escape: bool) -> str:
    """JSON text of ``v``, where ("obj", [(name, value), ...]) is an object written with every
    pair (names may repeat) and names are written ASCII-escaped (``\u00e9``) when ``escape``."""
    if isinstance(v, tuple):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=escape)} :{_write(x, escape)}" for k, x in v[1]) + "}"
    if isinstance(v, list):
        return "[" + ",".join(_write(x, escape) for x in v) + "]"
    return json.dumps(v, ensure_ascii=escape)


def _has_duplicate(v) -> bool:
    if isinstance(v, tuple):
        names = [k for k, _ in v[1]]
        return len(names) != len(set(names)) or any(_has_duplicate(x) for _, x in v[1])
    return isinstance(v, list) and any(_has_duplicate(x) for x in v)


@settings(max_examples=3000, deadline=None, derandomize=True, database=None, phases=[Phase.generate])
@given(json_text_pairs, st.booleans())
def test_duplicate_key_is_exact(value, escape):
    """codec.duplicate_key against the written pairs: a name repeated in some object (as
    written, before any reader dropped one) is found, and nothing else is."""
    import orjson

    from riskpipe.json_text import duplicate_key

    text = _write(value, escape).encode()
    found = duplicate_key(text, orjson.loads(text))
    assert (found is not None) == _has_duplicate(value), (text, found)


def test_an_id_or_time_given_twice_differently_by_a_cloudevent_is_refused(models):
    """A CloudEvents reader files the event under the envelope's id, riskpipe would decide it
    under the event's: the decision and its look-up would name two events. The same value
    given in both places is one identity and is read."""
    body = {**good(), "time": "2026-01-01T00:00:00Z"}
    binary_ce = [("ce_source", b"/x"), ("ce_type", b"riskpipe.inference.v1"), ("ce_specversion", b"1.0")]
    for name, code, other in (("id", "bad_id", "e2"), ("time", "bad_time", "2026-01-01T00:00:01Z")):
        with pytest.raises(EventError) as e:
            parse_event(json.dumps(body).encode(), [*binary_ce, (f"ce_{name}", other.encode())], models)
        assert e.value.code == code and str(e.value).startswith(f"{name}:") and f"ce_{name} header" in str(e.value)
        structured = {"specversion": "1.0", name: other, "source": "/y", "type": "riskpipe.inference.v1",
                      "data": body}
        with pytest.raises(EventError) as e:
            parse_event(json.dumps(structured).encode(), [("content-type", b"application/cloudevents+json")], models)
        assert e.value.code == code and repr(other) in str(e.value) and "envelope" in str(e.value)
    same = [*binary_ce, ("ce_id", b"e1"), ("ce_time", b"2026-01-01T00:00:00Z")]
    ev = parse_event(json.dumps(body).encode(), same, models)
    assert ev.id == "e1" and ev.time == "2026-01-01T00:00:00Z"
    structured = {"specversion": "1.0", "id": "e1", "source": "/y", "type": "riskpipe.inference.v1", "data": body}
    assert parse_event(json.dumps(structured).encode(), [], models).id == "e1"


def test_a_message_two_cloudevents_readers_would_read_differently_is_refused(models):
    """``ce_*`` headers made riskpipe read binary mode (the top-level object) although the
    content type said structured mode, which CloudEvents readers follow (they read
    ``data``); and a headerless object with specversion/type/data was read from ``data``
    while a plain-JSON reader (the model server) took its top-level model and inputs. An
    attacker put a benign tensor where riskpipe looked and a hostile one where the other
    reader did: allowed. Both are refused; a clean message of each mode is read."""
    body = good()
    data = {k: v for k, v in body.items() if k != "id"}
    binary_ce = [("ce_id", b"e1"), ("ce_source", b"/x"), ("ce_type", b"riskpipe.inference.v1"),
                 ("ce_specversion", b"1.0")]
    envelope = {"specversion": "1.0", "id": "e1", "source": "/y", "type": "riskpipe.inference.v1", "data": data}
    structured = [("content-type", b"application/cloudevents+json")]
    for value, headers, field in ((json.dumps(body), [*binary_ce, *structured], "headers:"),
                                  (json.dumps(body), [*binary_ce, ("content-type", b"Application/CloudEvents+JSON")],
                                   "headers:"),  # media types are case-insensitive
                                  (json.dumps(envelope), [("content-type", b"application/cloudevents+avro")],
                                   "content-type:"),
                                  (json.dumps({**envelope, **data}), [], "value:"),
                                  (json.dumps({**envelope, "inputs": data["inputs"]}), structured, "value:")):
        with pytest.raises(EventError) as e:
            parse_event(value.encode(), headers, models)
        assert e.value.code == "unsupported_cloudevent" and str(e.value).startswith(field), str(e.value)
    assert parse_event(json.dumps(data).encode(), binary_ce, models).id == "e1"
    assert parse_event(json.dumps(envelope).encode(), structured, models).id == "e1"
    assert parse_event(json.dumps(envelope).encode(), [], models).id == "e1"


def test_a_json_tensor_is_read_at_its_declared_precision(models):
    """FP16 numbers were certified as given (float32): a model server reads them at half
    precision, so the certified input was not the one the model saw. Now the numbers are
    rounded to the declared datatype first."""
    x = np.full((1, 8, 8), 0.1, np.float32)
    ev = json.loads(json.dumps(make_event("h", "digits", x)))
    ev["inputs"][0]["datatype"] = "FP16"
    got = parse_event(json.dumps(ev).encode(), [], models).x
    assert np.all(got == np.float32(np.float16(0.1))) and np.float32(np.float16(0.1)) != np.float32(0.1)


@pytest.mark.parametrize("slow_path", [False, True])
def test_the_depth_an_event_is_read_to_counts_arrays_and_objects(models, slow_path):
    """``context`` is an object at depth 1: 31 arrays inside its member reach depth 32, the
    limit; 32 are refused, whether or not the innermost array holds a value, and alike on
    the fast reader's path and the standard library's (a NaN literal takes the event there)."""
    def event(arrays: int, inner: str) -> bytes:
        text = json.dumps({**good(), "context": {"a": "X"}, "upstream_risk": 0.2})
        text = text.replace('"X"', "[" * arrays + inner + "]" * arrays)
        return (text.replace('"upstream_risk": 0.2', '"upstream_risk": NaN') if slow_path else text).encode()

    for inner in ("", "0.5"):
        assert parse_event(event(31, inner), [], models).context["a"] is not None
        assert _reason(event(32, inner), models) == "invalid_json"


def test_a_finite_value_beyond_float32_is_named_not_called_nan_or_inf(models):
    """1e39 sent as FP64 is finite as sent; the model takes float32, where it is inf. The
    dead letter said "contains NaN or inf", naming neither the value nor the reason."""
    e = make_event("big", "digits", np.zeros((1, 8, 8), np.float32))
    e["inputs"][0].update(datatype="FP64", data=[1e39] + [0.0] * 63)
    with pytest.raises(EventError, match=r"inputs\[0\]\.data: value 1e\+39 lies beyond float32") as err:
        parse_event(json.dumps(e).encode(), [], models)
    assert err.value.code == "non_finite"
