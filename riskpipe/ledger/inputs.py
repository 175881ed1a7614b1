"""Inputs in decision records: small ones inline, large ones stored once in the ledger.

Every record's ``input`` carries ``sha256`` (the input digest: sha256 of the tensor as
the model saw it, float32, C order), ``shape`` and ``datatype`` (as the event sent it).
When the stage includes the input itself (routed or sampled for review, with
``review_include_input`` on) it adds exactly one of:

* ``data``: the values as a JSON list — only for tensors of at most ``INLINE_VALUES``
  values that are not UINT8 (a tabular row stays readable);
* ``tensor``: the raw tensor, ``{"datatype": "UINT8" | "FP32", "byte_order": "little"}``
  plus either ``"ref": "ledger:inputs/<sha256>"`` (stored once in the ledger's
  ``inputs`` table, keyed by the input digest; the stage's default whenever it has a
  ledger) or ``"base64"`` (the row-major bytes inline, when there is no ledger).
  A UINT8 event's tensor stays UINT8 (one byte per value, as sent); every other
  datatype is stored as the float32 values the model saw.

A 3x224x224 UINT8 image is then a reference of ~100 bytes in the record (150 KB once
in the ledger, or 200 KB of base64 without one) instead of 2.9 MB of JSON floats.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from riskpipe.ledger.conn import Row

INLINE_VALUES = 1024
REF_PREFIX = "ledger:inputs/"
DTYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype("u1"), "FP32": np.dtype("<f4")}
Fetch = Callable[[str], "StoredInput | None"]  # the ledger's ``get_input``


def input_digest(x: np.ndarray) -> str:
    """The input digest: sha256 of the tensor as float32, C order."""
    return hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest()


@dataclass(frozen=True)
class StoredInput:
    """One tensor as the ledger's ``inputs`` table holds it."""

    sha256: str
    datatype: str  # a key of DTYPES
    shape: tuple[int, ...]
    data: bytes  # little-endian, row-major

    def array(self) -> np.ndarray:
        """The tensor; ValueError if the bytes do not hold it or, for FP32 (the values the model
        saw), do not hash to its digest: the row was altered. A UINT8 tensor's digest is of the
        values the model's range made of it, which the ledger does not hold."""
        dt = DTYPES.get(self.datatype)
        if dt is None or len(self.data) != math.prod(self.shape) * dt.itemsize:
            raise ValueError(f"stored input {self.sha256}: {len(self.data)} bytes do not hold "
                             f"{self.datatype} of shape {list(self.shape)}")
        a = np.frombuffer(self.data, dtype=dt).reshape(self.shape)
        if self.datatype == "FP32" and input_digest(a) != self.sha256:
            raise ValueError(f"stored input {self.sha256}: the stored tensor does not match its digest "
                             "(the ledger's inputs table was altered)")
        return a

    def row(self, ts: str) -> Row:
        return (self.sha256, self.datatype, json.dumps(list(self.shape)), self.data, ts)


def stored_input(x: np.ndarray, raw: np.ndarray | None, digest: str | None = None) -> StoredInput:
    """The tensor to keep for input ``x`` (float32, as the model saw it): ``raw`` when the
    event sent UINT8 (the bytes as sent), else ``x`` as float32."""
    a = (np.ascontiguousarray(raw, dtype=DTYPES["UINT8"]) if raw is not None
         else np.ascontiguousarray(x, dtype=DTYPES["FP32"]))
    return StoredInput(digest or input_digest(x), "UINT8" if raw is not None else "FP32", tuple(a.shape), a.tobytes())


def input_fields(x: np.ndarray, datatype: str, raw: np.ndarray | None, include: bool, store: bool
                 ) -> tuple[dict[str, Any], StoredInput | None]:
    """A record's ``input`` object and the tensor the ledger must store for it (or None).

    ``include``: carry the input itself (else digest, shape and datatype only);
    ``store``: a ledger will hold large inputs (else they are inlined as base64)."""
    digest = input_digest(x)
    inp: dict[str, Any] = {"sha256": digest, "shape": list(x.shape), "datatype": datatype}
    if not include:
        return inp, None
    if raw is None and x.size <= INLINE_VALUES:
        inp["data"] = np.asarray(x, dtype=np.float32).ravel().tolist()
        return inp, None
    s = stored_input(x, raw, digest)
    tensor: dict[str, Any] = {"datatype": s.datatype, "byte_order": "little"}
    if store:
        tensor["ref"] = REF_PREFIX + digest
    else:
        tensor["base64"] = base64.b64encode(s.data).decode("ascii")
    inp["tensor"] = tensor
    return inp, (s if store else None)


class InputUnavailable(ValueError):
    """The record's input cannot be read back; the message says why."""


def record_array(inp: Any, fetch: Fetch | None = None) -> np.ndarray | None:
    """The tensor of a record's ``input`` (shaped, values as stored: UINT8 stays uint8),
    or None when the record carries no input. ``fetch(sha256) -> StoredInput | None``
    reads a referenced input (the ledger's ``get_input``). InputUnavailable for a
    reference that cannot be resolved or an inline tensor that does not decode."""
    if not isinstance(inp, dict):
        return None
    shape = inp.get("shape")
    if inp.get("data") is not None:
        try:
            return np.asarray(inp["data"], dtype=np.float64)
        except (TypeError, ValueError):
            raise InputUnavailable("input.data: not a list of numbers") from None
    t = inp.get("tensor")
    if not isinstance(t, dict):
        return None
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        raise InputUnavailable(f"input.shape: not a list of positive integers ({shape!r})")
    if isinstance(t.get("ref"), str):
        sha = t["ref"].removeprefix(REF_PREFIX)
        if sha != inp.get("sha256"):
            raise InputUnavailable(f"input.tensor.ref: {t['ref'][:80]!r} does not name this input's digest")
        if fetch is None:
            raise InputUnavailable(f"input.tensor.ref: stored in the ledger ({t['ref']}); no ledger to read it from")
        s = fetch(sha)
        if s is None:
            raise InputUnavailable(f"input.tensor.ref: {t['ref']} is not in this ledger")
        try:
            return s.array().reshape(shape)
        except ValueError as e:
            raise InputUnavailable(str(e)) from None
    datatype = t.get("datatype")
    dt = DTYPES.get(datatype) if isinstance(datatype, str) else None
    if dt is None or not isinstance(t.get("base64"), str):
        raise InputUnavailable("input.tensor: needs a datatype (UINT8 or FP32) and base64 or ref")
    try:
        raw = base64.b64decode(t["base64"], validate=True)
    except ValueError:
        raise InputUnavailable("input.tensor.base64: not valid base64") from None
    if len(raw) != math.prod(shape) * dt.itemsize:
        raise InputUnavailable(f"input.tensor.base64: {len(raw)} bytes do not hold {t['datatype']} of shape {shape}")
    return np.frombuffer(raw, dtype=dt).reshape(shape)


def inline_copy(inp: dict[str, Any], fetch: Fetch | None = None) -> dict[str, Any]:
    """``inp`` ({shape, data} or {shape, tensor}) with a stored tensor read through ``fetch``
    and carried inline (base64); a reference that cannot be read stays as it is."""
    out = {k: inp.get(k) for k in ("sha256", "shape", "datatype", "data", "tensor") if inp.get(k) is not None}
    t = out.get("tensor")
    if isinstance(t, dict) and "ref" in t:
        try:
            a = record_array(inp, fetch)
        except InputUnavailable:
            return out
        out["tensor"] = {"datatype": t.get("datatype"), "byte_order": "little",
                         "base64": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode("ascii")}
    return out


def table_statements(blob_type: str) -> list[str]:
    """The ``inputs`` table (schema 5): one row per input digest, written once."""
    return [f"""CREATE TABLE IF NOT EXISTS inputs (
            sha256   TEXT PRIMARY KEY,
            datatype TEXT NOT NULL,
            shape    TEXT NOT NULL,
            data     {blob_type} NOT NULL,
            ts       TEXT NOT NULL)"""]
