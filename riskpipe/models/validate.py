"""Input checks against a model's spec; every error names the field and the reason."""

from __future__ import annotations

import numpy as np


class InputError(ValueError):
    """Input that does not fit the model spec. ``code`` is a stable reason code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


def check_inputs(batch: np.ndarray, model) -> np.ndarray:
    """Return ``batch`` as float32 of shape (B, *input_shape), or raise InputError."""
    a = np.asarray(batch)
    shape = tuple(model.input_shape)
    if a.dtype.kind not in "fiu":
        raise InputError("wrong_dtype", f"inputs: dtype {a.dtype} is not numeric")
    if a.shape[1:] != shape:
        if a.ndim >= 1 and a.size and a[0].size == int(np.prod(shape)) and a.ndim == 2:
            a = a.reshape((len(a),) + shape)
        else:
            raise InputError(
                "wrong_shape", f"inputs: shape {a.shape[1:]} per input, model {model.spec} expects {shape}"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        given, a = a, a.astype(np.float32, copy=False)  # values beyond float32 become inf: caught below
    bad = ~np.isfinite(a)
    if bad.any():
        i, j = (int(v) for v in np.argwhere(bad.reshape(len(a), -1))[0])
        v = given.reshape(len(a), -1)[i, j]
        if np.isfinite(v):  # e.g. 1e39 sent as FP64: finite as sent, inf in the model's float32
            raise InputError("non_finite", f"inputs[{i}]: value {float(v):g} lies beyond float32 (|x| <= 3.4e38), "
                                           "the type the model takes")
        raise InputError("non_finite", f"inputs[{i}]: contains NaN or inf")
    if model.value_range is None:  # nothing declared: finiteness is all we can check
        return a
    lo, hi = (np.asarray(v, dtype=np.float32).reshape(-1) for v in model.value_range)
    flat = a.reshape(len(a), -1)
    out = (flat < lo) | (flat > hi)  # lo/hi: one value, or one per feature
    if out.any():
        i, j = (int(v) for v in np.argwhere(out)[0])
        lo_j, hi_j = float(lo[j % len(lo)]), float(hi[j % len(hi)])
        where = "values" if len(lo) == 1 else f"feature {j}"
        raise InputError(
            "out_of_range",
            f"inputs[{i}]: {where} must lie in [{lo_j:g}, {hi_j:g}], got {float(flat[i, j]):g}",
        )
    return a
