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
        a = a.astype(np.float32, copy=False)  # values beyond float32 become inf: caught below
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.argwhere(bad.reshape(len(a), -1).any(axis=1))[0][0])
        raise InputError("non_finite", f"inputs[{i}]: contains NaN or inf")
    lo, hi = model.value_range
    out = (a < lo) | (a > hi)
    if out.any():
        i = int(np.argwhere(out.reshape(len(a), -1).any(axis=1))[0][0])
        raise InputError(
            "out_of_range",
            f"inputs[{i}]: values must lie in [{lo:g}, {hi:g}], got min {a[i].min():g} max {a[i].max():g}",
        )
    return a
