"""Parse and validate one raw inference message. Every failure is an ``EventError``
with a stable reason code (the DLQ header) and a message naming the field.

Accepted envelopes (see riskpipe/schemas/inference-event.v1.json):
* CloudEvents binary mode: ``ce_id``, ``ce_source``, ``ce_type``, ``ce_specversion``
  headers, the event object as the value;
* CloudEvents structured mode: content-type ``application/cloudevents+json``, the
  event object under ``data``;
* a plain JSON object.

The tensor travels as a JSON list (``data``) or, for large inputs, in the Open
Inference Protocol binary form (riskpipe/stream/binary.py). UINT8 tensors are
8-bit images: value v maps to lo + (hi - lo) * v / 255 in the model's value range.
"""

from __future__ import annotations

import json
import math
import re
import unicodedata
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from riskpipe.json_text import repeated_name
from riskpipe.models.validate import InputError, check_inputs
from riskpipe.stream import binary, codec
from riskpipe.stream.errors import EventError
from riskpipe.stream.trace import trace_context

CE_TYPES = ("riskpipe.inference.v1", "org.kserve.inference.request", "inference.request")
DATATYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8, "INT16": np.int16,
             "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8}
FLOAT_TYPES = ("FP32", "FP64", "FP16")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


@dataclass
class Event:
    id: str
    model: str
    x: np.ndarray  # (*input_shape) float32
    datatype: str
    prediction: int | None = None
    upstream_risk: Any = None
    context: dict = field(default_factory=dict)
    time: str | None = None
    cloudevent: dict | None = None
    trace: dict | None = None  # W3C trace context of the message (riskpipe/stream/trace.py)
    raw: np.ndarray | None = None  # a UINT8 tensor as sent (records keep it UINT8: riskpipe/ledger/inputs.py)


def _headers(headers) -> dict[str, str]:
    """Header name (lower-cased) -> text, read once per event. A header the stage reads
    (``ce_*``, ``content-type``, the binary form's length) that comes more than once is
    refused: Kafka keeps every copy, and which one a reader takes (first, last) is up to
    it. Any other header's copies are combined in order, separated by commas, as HTTP
    combines a repeated field (RFC 9110, section 5.3): two ``tracestate`` copies are one
    list, as W3C Trace Context asks, and two ``traceparent`` copies are no valid
    traceparent, so the trace context is ignored rather than one copy picked."""
    out: dict[str, str] = {}
    for k, v in headers or ():
        name = k.lower()
        try:
            text = v.decode("utf-8") if isinstance(v, bytes | bytearray) else str(v)
        except UnicodeDecodeError:
            text = ""
        if name in out:
            if name.startswith("ce_") or name in ("content-type", binary.HEADER):
                raise EventError("duplicate_key", f"headers: {name[:80]!r} comes more than once; readers disagree "
                                                  "on which one counts, so the event is not read at all")
            text = f"{out[name]},{text}"
        out[name] = text
    return out


def _path(parts) -> str:
    out = ""
    for p in parts:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "value"


# arrays and objects inside one another in an event (beyond the tensor's flat data): the
# hot path's JSON writer (orjson) stops at 254 levels and the standard library's raises
# RecursionError near 1,000, where a few KB of "[[[[" in ``context`` stopped the stage
MAX_DEPTH = 32


def _too_deep(where: str) -> EventError:
    return EventError("invalid_json", f"{where}: arrays and objects nested more than {MAX_DEPTH} levels deep; "
                                      "an event is read to that depth")


def _members(obj: dict) -> Iterator[tuple[tuple, Any]]:
    """(path, value) of every value in the event, the event itself first, but the numbers of
    the tensor's ``data``; EventError ``invalid_json`` for an array or object nested deeper
    than MAX_DEPTH, before anything is done with it (``check_depth``'s rule)."""
    stack: list = [((), obj)]
    while stack:
        path, v = stack.pop()
        container = isinstance(v, dict | list)
        if container and len(path) > MAX_DEPTH:
            raise _too_deep(f"{_path(path[:3])}...")
        yield path, v
        if isinstance(v, dict):
            stack.extend((path + (k,), child) for k, child in v.items())
        elif isinstance(v, list) and not (len(path) == 3 and path[0] == "inputs" and path[2] == "data"):
            stack.extend((path + (i,), child) for i, child in enumerate(v))


def check_depth(obj: dict) -> None:
    """EventError ``invalid_json`` if an array or object in the event (the event object at
    depth 0) lies deeper than MAX_DEPTH; the tensors' ``data`` is not walked (numbers only,
    checked against the model). Containers only, a depth counter, no paths: this runs for
    every event the fast parser read."""
    containers = (dict, list)
    for key, value in obj.items():
        if value.__class__ not in containers:
            continue
        stack = [(value, 1)]
        if key == "inputs" and isinstance(value, list):  # each tensor's members but its data
            stack = [(c, 3) for t in value if isinstance(t, dict)
                     for k, c in t.items() if k != "data" and c.__class__ in containers]
            stack += [(t, 2) for t in value if isinstance(t, list)]
        while stack:
            v, depth = stack.pop()
            if depth > MAX_DEPTH:
                raise _too_deep(str(key))
            children = v.values() if isinstance(v, dict) else v
            stack.extend((c, depth + 1) for c in children if c.__class__ in containers)


def check_values(obj: dict) -> None:
    """Every number anywhere in the event is bounded and finite, every string valid
    Unicode, nothing nested deeper than MAX_DEPTH. Two places are left to their own
    checks: the tensor ``data`` (numbers only, checked against the model's input spec)
    and ``upstream_risk`` (a non-finite risk is the policy's business: default value,
    flagged ``non_finite``)."""
    for path, v in _members(obj):
        if isinstance(v, codec.OversizedInt):
            raise EventError("out_of_range", f"{_path(path)}: an integer of {v.digits} digits "
                                             "(too large for a double) is not accepted")
        if isinstance(v, float):
            if not math.isfinite(v) and path != ("upstream_risk",):
                raise EventError("non_finite", f"{_path(path)}: NaN or infinity is not accepted")
        elif isinstance(v, str):
            _check_text(v, path)
        elif isinstance(v, dict):
            for k in v:
                _check_text(k, path + (k,), " (a key)")


def _check_text(text: str, path: tuple, what: str = "") -> None:
    """The field's path is formatted only for an error (this runs for every key)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError("invalid_json", f"{_path(path)}{what}: string is not valid Unicode (lone surrogate)") from None


def check_time(ts) -> str:
    """``time`` must be an RFC 3339 timestamp (``2026-01-01T00:00:00Z``)."""
    if not isinstance(ts, str) or not _RFC3339.fullmatch(ts):
        raise EventError("bad_time", f"time: {str(ts)[:40]!r} is not an RFC 3339 timestamp (e.g. 2026-01-01T00:00:00Z)")
    try:
        datetime.fromisoformat(ts.upper().replace("Z", "+00:00").replace(" ", "T"))
    except ValueError as e:
        raise EventError("bad_time", f"time: {ts!r} is not a valid date and time ({e})") from None
    return ts


def _envelope(value: bytes | None, h: dict[str, str], max_bytes: int,
              max_binary_bytes: int) -> tuple[dict, dict | None, bool]:
    """Return (event object, cloudevent attributes or None, clean: see
    codec.loads_checked; header values added to the object are decoded UTF-8 text,
    so they keep it clean) of a message whose headers ``h`` are read (``_headers``). A
    message with an ``Inference-Header-Content-Length`` header is the binary tensor form
    (binary.py), limited to ``max_binary_bytes``; a JSON message to ``max_bytes``."""
    if value is None:
        raise EventError("invalid_json", "value: empty message (tombstone)")
    payload = None
    limit = max_binary_bytes if binary.HEADER in h else max_bytes
    if len(value) > limit:
        raise EventError("oversized", f"value: {len(value)} bytes exceeds the limit of {limit}")
    if binary.HEADER in h:
        value, payload = binary.split(value, h[binary.HEADER])
        if len(value) > max_bytes:  # the header lifts the limit for tensor bytes only, never for JSON
            raise EventError("oversized", f"value: the JSON part of {len(value)} bytes exceeds the JSON limit "
                                          f"of {max_bytes} (only binary tensor data may use the binary limit)")
    try:
        obj, clean = codec.loads_checked(value)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise EventError("invalid_json", f"value: not valid UTF-8 JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise EventError("not_an_object", f"value: expected a JSON object, got {type(obj).__name__}")
    if (why := repeated_name(value, obj)) is not None:
        raise EventError("duplicate_key", f"value: {why}, so the event is not read at all")
    ce = None
    binary_mode = "ce_type" in h or "ce_specversion" in h
    content_type = h.get("content-type", "").strip().lower()  # media types are case-insensitive
    structured = content_type.startswith("application/cloudevents")  # the Kafka binding: structured mode
    if structured and not content_type.startswith("application/cloudevents+json"):
        raise EventError("unsupported_cloudevent", f"content-type: {content_type[:60]!r}: a structured CloudEvent "
                                                   "in another format than JSON (application/cloudevents+json)")
    if binary_mode and structured:
        raise EventError("unsupported_cloudevent", "headers: ce_* headers (binary mode) and content-type "
                                                   "application/cloudevents+json (structured mode) on one message: "
                                                   "readers differ on which envelope holds the event")
    if binary_mode:
        ce = {k[3:]: v for k, v in h.items() if k.startswith("ce_")}
    elif structured or ("specversion" in obj and "type" in obj and "data" in obj):
        if outside := sorted(k for k in ("model", "inputs") if k in obj):
            # a plain-JSON reader (the model server) takes these, a CloudEvents reader data's
            raise EventError("unsupported_cloudevent", f"value: a structured CloudEvent with {', '.join(outside)} "
                                                       "beside data: the event belongs in data only")
        ce = {k: obj[k] for k in ("id", "source", "type", "specversion", "time") if k in obj}
        obj = obj.get("data")
        if not isinstance(obj, dict):
            raise EventError("not_an_object", "data: structured CloudEvent must carry a JSON object in data")
    if ce is not None:
        if ce.get("specversion") != "1.0":
            raise EventError("unsupported_cloudevent", f"specversion: {ce.get('specversion')!r} is not 1.0")
        if ce.get("type") not in CE_TYPES:
            raise EventError("unsupported_cloudevent", f"type: {ce.get('type')!r} is not one of {', '.join(CE_TYPES)}")
        for name, code in (("id", "bad_id"), ("time", "bad_time")):
            if name not in obj and ce.get(name):
                obj = {**obj, name: ce[name]}
            elif name in obj and name in ce and obj[name] != ce[name]:
                # a CloudEvents reader takes the envelope's, riskpipe read the event's: one
                # event under two identities (the decision filed under the one, looked up under the other)
                raise EventError(code, f"{name}: the event's {name} {obj[name]!r:.80} differs from the CloudEvent's "
                                       f"{ce[name]!r:.80} ({f'the ce_{name} header' if binary_mode else 'the envelope'}"
                                       f"); give one, or the same in both")
    if payload is not None:
        obj = binary.attach(obj, payload)
    return obj, ce, clean


class OtherModel(Exception):
    """An event of a model another stage serves on this input topic (config
    ``other_models``): not this stage's to decide, and no fault, so not an ``EventError``
    (never a dead letter): ``triage.parse_batch`` counts it as skipped."""

    def __init__(self, model: str):
        super().__init__(f"model: {model!r} is served by another stage (other_models)")
        self.model = model


def _check_shown_id(eid: str) -> None:
    """A non-ASCII id must show as itself alone: bidi overrides, zero-width and other
    invisible format characters, line and paragraph separators (an id that shows as
    another one, or breaks its line in the review console, a report, a log), and a
    spelling other than Unicode NFC ("e" + U+0301 for "\u00e9", which shows as the
    composed one: a re-sent event under it would be a new event, not a duplicate or an
    id conflict) make it no identifier."""
    def shown(s: str) -> str:
        return repr(s.encode("unicode_escape").decode("ascii"))

    if (fmt := next((c for c in eid if unicodedata.category(c) in ("Cf", "Zl", "Zp")), None)) is not None:
        raise EventError("bad_id", f"id: {shown(eid)} contains the invisible format or separator character "
                                   f"U+{ord(fmt):04X}")
    try:
        eid.encode("utf-8")
    except UnicodeEncodeError:
        raise EventError("bad_id", "id: is not valid Unicode text (lone surrogate)") from None
    if not unicodedata.is_normalized("NFC", eid):
        raise EventError("bad_id", f"id: {shown(eid)} is not in Unicode NFC form: it shows as "
                                   f"{shown(unicodedata.normalize('NFC', eid))}, another string; send ids in NFC")


def validate_event(obj: dict, models: dict, values_checked: bool = False, other_models: Collection[str] = ()) -> Event:
    """Check ``obj`` against the contract and the named model's input spec.
    ``values_checked``: the parser already guarantees what check_values checks.
    ``other_models``: models other stages serve; an event naming one raises OtherModel
    before anything else of it is checked (that stage validates its own events)."""
    if isinstance(name := obj.get("model"), str) and name in other_models:
        raise OtherModel(name)
    for f in ("id", "model", "inputs"):
        if f not in obj:
            raise EventError("missing_field", f"{f}: required field is missing")
    eid = obj["id"]
    if not isinstance(eid, str) or not eid or len(eid) > 256:
        raise EventError("bad_id", "id: must be a non-empty string of at most 256 characters")
    if _CONTROL.search(eid):
        raise EventError("bad_id", f"id: {eid!r} contains a control character")
    if not eid.isascii():  # ASCII holds none of what follows
        _check_shown_id(eid)
    if not values_checked:
        check_values(obj)
    else:  # the parser took care of the values, not of their depth
        check_depth(obj)
    name = obj["model"]
    if not isinstance(name, str):
        raise EventError("wrong_type", "model: must be a string")
    if name not in models:
        raise EventError("unknown_model", f"model: {name!r} is not registered (known: {', '.join(sorted(models))})")
    model = models[name]
    inputs = obj["inputs"]
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise EventError("wrong_type", "inputs: must be a list with exactly one tensor object")
    t = inputs[0]
    for f in ("shape", "datatype", "data"):
        if f not in t:
            raise EventError("missing_field", f"inputs[0].{f}: required field is missing")
    dt = t["datatype"]
    if not isinstance(dt, str) or dt not in DATATYPES:
        raise EventError("wrong_dtype", f"inputs[0].datatype: {dt!r} is not an Open Inference Protocol numeric type")
    if dt not in FLOAT_TYPES and dt != "UINT8" and model.dtype.startswith("float"):
        raise EventError("wrong_dtype", f"inputs[0].datatype: model {name} expects floating point, got {dt}")
    shape, data = t["shape"], t["data"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in shape):
        raise EventError("wrong_type", "inputs[0].shape: must be a list of positive integers")
    if not isinstance(data, list | np.ndarray):
        raise EventError("wrong_type", "inputs[0].data: must be a flat list of numbers")
    expected = tuple(model.input_shape)
    dims = tuple(shape[1:]) if len(shape) == len(expected) + 1 and shape[0] == 1 else tuple(shape)
    if dims != expected:
        raise EventError("wrong_shape", f"inputs[0].shape: {shape} does not match model {name} input {list(expected)}")
    if len(data) != math.prod(expected):
        raise EventError("wrong_shape",
                         f"inputs[0].data: {len(data)} values, shape {shape} needs {math.prod(expected)}")
    if isinstance(data, np.ndarray):  # decoded from the binary form: typed already
        arr = data
    else:
        kinds = set(map(type, data))
        if codec.OversizedInt in kinds:
            raise EventError("out_of_range", "inputs[0].data: an integer too large for a double")
        if not kinds <= {int, float}:  # no strings ("0.5"), booleans, null or nested lists
            bad = sorted(k.__name__ for k in kinds - {int, float})
            raise EventError("wrong_type",
                             f"inputs[0].data: every element must be a JSON number, found {', '.join(bad)}")
        try:
            arr = np.array(data, dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise EventError("wrong_type", "inputs[0].data: every element must be a number") from None
        if dt in FLOAT_TYPES:  # the declared precision, as a model server reads the numbers (FP16:
            with np.errstate(over="ignore"):  # 70000 is inf there, 0.1 is 0.0999755859375)
                arr = arr.astype(DATATYPES[dt]).astype(np.float64)
    raw = None
    if dt == "UINT8" and model.dtype.startswith("float"):
        mapped = _from_uint8(arr.reshape(expected), model)  # checks the values are integers in [0, 255]
        raw, arr = arr.reshape(expected).astype(np.uint8), mapped
    try:
        x = check_inputs(arr.reshape((1,) + expected), model)[0]
    except InputError as e:
        raise EventError(e.code, str(e).replace("inputs[0]", "inputs[0].data")) from None
    pred = class_id(obj.get("prediction"), model)
    ctx = obj.get("context")
    ctx = {} if ctx is None else ctx
    if not isinstance(ctx, dict):
        raise EventError("wrong_type", "context: must be an object")
    ts = obj.get("time")
    if ts is not None:
        check_time(ts)
    return Event(id=eid, model=name, x=x, datatype=dt, prediction=pred, upstream_risk=obj.get("upstream_risk"),
                 context=ctx, time=ts, raw=raw)


def _from_uint8(arr: np.ndarray, model) -> np.ndarray:
    """8-bit values (shaped like the input) onto the model's declared value range:
    lo + (hi - lo) * v / 255, per feature where the range is per feature."""
    if model.value_range is None:
        raise EventError("wrong_dtype", f"inputs[0].datatype: UINT8 needs a declared value range to map onto; "
                                        f"model {model.spec} declares none (send FP32 or declare its range)")
    if arr.dtype != np.uint8 and ((arr < 0) | (arr > 255) | (arr != np.round(arr))).any():
        raise EventError("out_of_range", "inputs[0].data: UINT8 values must be integers in [0, 255]")
    lo, hi = (np.asarray(v, dtype=np.float32) for v in model.value_range)
    return lo + (hi - lo) * (arr.astype(np.float32) / np.float32(255.0))


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _numbers_mislead(names: list[str]) -> bool:
    """Would a number read as a class id name another class than the label it spells?
    True when any label reads as a number other than its own index (``["1", "2", "3"]``,
    ``["1", "2", "unknown"]``)."""
    return any((v := _number(n)) is not None and v != i for i, n in enumerate(names))


def class_id(pred: Any, model: Any) -> int | None:
    """The class id an event's ``prediction`` names: a class id in [0, C), or, for a model
    that labels its classes (scikit-learn's ``classes_``, ``meta['class_names']``), one of
    those labels as a string. A model with a label that is a number other than its index
    (classes 1, 2, 3) takes only the label: its producer most likely sent ``predict()``'s label,
    and read as a class id, label 1 would be class 2, so a disagreement could read as
    agreement. EventError ``wrong_type`` otherwise, naming what the model takes."""
    if pred is None:
        return None
    meta = getattr(model, "meta", None) or {}
    if meta.get("class_labels_unknown"):
        raise EventError("wrong_type", "prediction: the model's file does not say which label each class is (its "
                                       "label output does not follow its score columns), so no prediction can be "
                                       "read as a class; leave it null")
    names = meta.get("class_names")
    names = [str(n) for n in names] if isinstance(names, list | tuple) else None
    shown = None if names is None else (names if len(names) <= 8 else [*names[:8], "..."])
    if isinstance(pred, str):
        if names is not None and pred in names:
            return names.index(pred)
        takes = f"one of its labels {shown}" if names is not None else f"a class id in [0, {model.num_classes})"
        raise EventError("wrong_type", f"prediction: {pred[:64]!r} is no class of the model: give {takes} or null")
    if isinstance(pred, int) and not isinstance(pred, bool):
        if names is not None and _numbers_mislead(names):
            raise EventError("wrong_type", f"prediction: the model labels its classes {shown}, so the number "
                                           f"{pred} could be a label or a class id; give the label as a string "
                                           f"(e.g. {names[-1]!r}) or null")
        if 0 <= pred < model.num_classes:
            return pred
    raise EventError("wrong_type", f"prediction: must be a class id in [0, {model.num_classes})"
                                   + (f", one of the labels {shown} as a string" if names is not None else "")
                                   + " or null")


def parse_event(value: bytes | None, headers, models: dict, max_bytes: int = 1 << 20,
                max_binary_bytes: int = 16 << 20, other_models: Collection[str] = ()) -> Event:
    h = _headers(headers)
    obj, ce, clean = _envelope(value, h, max_bytes, max_binary_bytes)
    try:
        ev = validate_event(obj, models, values_checked=clean, other_models=other_models)
    except EventError:
        raise
    except (TypeError, ValueError, OverflowError, KeyError, AttributeError) as e:
        # A shape of input the checks above did not foresee: still a clean DLQ reason.
        raise EventError("wrong_type", f"event: malformed ({type(e).__name__}: {e})") from None
    ev.cloudevent = ce
    ev.trace = trace_context(h)
    return ev


def make_event(event_id: str, model: str, x: np.ndarray, **extra) -> dict:
    """An inference event object (Open Inference Protocol v2 tensor) for ``x``."""
    x = np.asarray(x, dtype=np.float32)
    return {"id": event_id, "model": model,
            "inputs": [{"name": "input", "shape": [1, *x.shape], "datatype": "FP32", "data": x.ravel().tolist()}],
            **extra}
