"""Open Inference Protocol binary tensors on Kafka (the layout Triton and KServe use
over HTTP, "binary tensor data extension").

A message is a JSON header followed by the raw tensor bytes: little-endian,
row-major, no padding, one block per input in the order of ``inputs``. The JSON
header's length in bytes is the ``Inference-Header-Content-Length`` Kafka header;
each binary input carries ``parameters.binary_data_size`` (its block's size in
bytes) instead of ``data``. A 3x224x224 image travels as 150 KB (UINT8) or 602 KB
(FP32) instead of megabytes of JSON text.

``split`` cuts the message in two, ``attach`` decodes each input's block into a
numpy array in place of ``data``; everything else (shape against the model,
value range) is checked by the same validation as the JSON form. Every malformed
message raises ``EventError`` with a reason code:

* ``bad_binary_header``: the header length is not a non-negative integer or runs
  past the end of the message;
* ``binary_size_mismatch``: a ``binary_data_size`` is missing, not a non-negative
  integer, or the sizes do not add up to the bytes after the header;
* ``wrong_dtype``: a datatype without a binary decoding here (FP32, FP16, UINT8);
* ``wrong_shape``: a block's size is not the shape's element count times the
  datatype's width.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np

from riskpipe.stream.errors import EventError

_LENGTH = re.compile(r"[0-9]{1,12}")
HEADER = "inference-header-content-length"  # Kafka header names are matched lower-cased
DTYPES: dict[str, np.dtype[Any]] = {"FP32": np.dtype("<f4"), "FP16": np.dtype("<f2"), "UINT8": np.dtype("u1")}


def _error(code: str, message: str) -> Exception:
    return EventError(code, message)


def split(value: bytes, header_length: str) -> tuple[bytes, memoryview]:
    """(JSON header bytes, tensor bytes) of a binary message."""
    if not _LENGTH.fullmatch(header_length):  # int() also takes " 12 ", "+12", "1_2" and other scripts' digits,
        # which another reader of the message refuses or splits elsewhere
        raise _error("bad_binary_header", f"Inference-Header-Content-Length: {header_length[:40]!r} is not "
                                          "a decimal integer (ASCII digits only)")
    n = int(header_length)
    if not 0 < n <= len(value):
        raise _error("bad_binary_header", f"Inference-Header-Content-Length: {n} is outside the message "
                                          f"of {len(value)} bytes")
    view = memoryview(value)
    return bytes(view[:n]), view[n:]


def attach(obj: dict, payload: memoryview) -> dict:
    """``obj`` with each binary input's ``data`` decoded from ``payload`` (a copy;
    ``obj`` is not changed). Inputs without ``binary_data_size`` keep their JSON data."""
    inputs = obj.get("inputs")
    if not isinstance(inputs, list):
        return obj  # validation names the field
    out, offset = [], 0
    for i, t in enumerate(inputs):
        params = t.get("parameters") if isinstance(t, dict) else None
        if not isinstance(params, dict) or "binary_data_size" not in params:
            out.append(t)
            continue
        where = f"inputs[{i}]"
        size = params["binary_data_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise _error("binary_size_mismatch", f"{where}.parameters.binary_data_size: must be a "
                                                 f"non-negative integer, got {size!r}")
        if offset + size > len(payload):
            raise _error("binary_size_mismatch", f"{where}.parameters.binary_data_size: {size} bytes at offset "
                                                 f"{offset} run past the {len(payload)} bytes after the header")
        if "data" in t:
            raise _error("wrong_type", f"{where}.data: must be absent when binary_data_size is given")
        dt = t.get("datatype")
        if dt not in DTYPES:
            raise _error("wrong_dtype", f"{where}.datatype: {dt!r} has no binary decoding here "
                                        f"(use one of {', '.join(DTYPES)})")
        shape = t.get("shape")
        if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 1
                                                  for s in shape):
            raise _error("wrong_type", f"{where}.shape: must be a list of positive integers")
        need = math.prod(shape) * DTYPES[dt].itemsize
        if size != need:
            raise _error("wrong_shape", f"{where}.parameters.binary_data_size: {size} bytes, shape {shape} of "
                                        f"{dt} needs {need}")
        data = np.frombuffer(payload, dtype=DTYPES[dt], count=math.prod(shape), offset=offset)
        out.append({**t, "data": data})
        offset += size
    if offset != len(payload):
        raise _error("binary_size_mismatch", f"inputs: binary_data_size values add up to {offset} bytes, "
                                             f"{len(payload)} bytes follow the header")
    return {**obj, "inputs": out}


def make_binary_event(event_id: str, model: str, x: np.ndarray, datatype: str = "FP32",
                      **extra) -> tuple[bytes, list[tuple[str, bytes]]]:
    """An inference event for ``x`` in the binary form: (message value, Kafka headers).
    ``x`` is cast to ``datatype`` (UINT8: pass the 0..255 pixel values)."""

    a = np.ascontiguousarray(x, dtype=DTYPES[datatype])
    head = json.dumps({"id": event_id, "model": model, **extra, "inputs": [
        {"name": "input", "shape": [1, *a.shape], "datatype": datatype,
         "parameters": {"binary_data_size": a.nbytes}}]}, separators=(",", ":")).encode()
    return head + a.tobytes(), [("Inference-Header-Content-Length", str(len(head)).encode())]
