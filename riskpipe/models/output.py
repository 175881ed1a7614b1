"""The model output contract, checked on every forward pass.

A model is a black box that can break: a TorchScript or ONNX file that returns NaN or
±inf logits, fewer rows than inputs, an extra axis, integers or a tuple. Before this
check such an output was read as a vote (``argmax`` of a NaN row is class 0), so a
broken model got certificates and ``allow``. Now every forward pass of every
certification family, the batch-size probe and the start-up checks go through
``Model.scores`` / ``Model.classes`` (riskpipe.models.base), which call
``check_output``; a row that breaks the contract is *bad*, and whatever was computed
from a bad row is a ``model_fault`` (an uncertified certificate,
``riskpipe.certify.certificate.MODEL_FAULT``), never a verdict.

The contract for a batch of ``n`` inputs and ``C`` classes:

* logits or scores: a floating-point array of shape ``(n, C)``, every value finite;
* class ids (predict-function models such as scikit-learn's ``predict``): an integer
  array of shape ``(n,)`` with every id in ``[0, C)``.

* a row's output is its own: it does not depend on the other rows of the call
  (checked at start-up, ``row_dependence``: the certifiers pack the noise of several
  events into one call, so batch statistics in ``forward`` let one event's input decide
  another event's certificate).

A row with a non-finite value (or an id out of range) is bad on its own; an output of
the wrong type, shape or dtype cannot be attributed to rows, so every row is bad.

Two readings happen before this check, in the loader: a binary model with one output is
read as two scores only when its spec says how (``?binary=logit|probability``: C = 2),
and a scikit-learn label that is none of the estimator's ``classes_`` becomes id -1, so
it is bad here rather than the class it sorts beside. A model of fewer than two classes
never exists (``Model.__post_init__``): argmax over one column agrees with itself on
every input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Checked:
    """A checked forward pass: ``values`` (logits (n, C) or class ids (n,)), with every
    bad row zeroed so callers can go on computing; ``bad`` (n,) bool; ``reason`` says
    what the first violation was (None when every row is good)."""

    values: torch.Tensor
    bad: torch.Tensor
    reason: str | None

    @property
    def any_bad(self) -> bool:
        return self.reason is not None


class BadOutput(str):
    """What a predict wrapper returns instead of an output it knows breaks the contract
    (a scikit-learn ``predict`` giving one label per output of a multi-output model):
    the reason, and every row of the batch is bad."""


def _as_tensor(out, device) -> torch.Tensor | str:
    if isinstance(out, BadOutput):
        return str(out)
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(out)).to(device) if out.dtype.kind in "biuf" else \
            f"output dtype {out.dtype} is not numeric"
    return f"output is a {type(out).__name__}, not a tensor or array"


def _all_bad(n: int, num_classes: int, logits: bool, device, reason: str) -> Checked:
    shape = (n, num_classes) if logits else (n,)
    dtype = torch.float32 if logits else torch.int64
    return Checked(torch.zeros(shape, dtype=dtype, device=device), torch.ones(n, dtype=torch.bool, device=device),
                   reason)


def check_output(out, n: int, num_classes: int, device="cpu") -> Checked:
    """``out`` of a forward pass over ``n`` inputs, checked against the contract above.

    A float output must be logits ``(n, C)``; an integer output class ids ``(n,)``.
    ``values`` comes back as float logits or int64 ids accordingly."""
    t = _as_tensor(out, device)
    if isinstance(t, str):
        return _all_bad(n, num_classes, True, device, t)
    shape = tuple(t.shape)
    if t.is_floating_point():
        if shape != (n, num_classes):
            return _all_bad(n, num_classes, True, t.device,
                            f"output shape {shape}, expected ({n}, {num_classes}) logits")
        if math.isfinite(float(t.sum())):  # a NaN or inf anywhere makes the sum NaN or inf: one op, one read
            return Checked(t, torch.zeros(n, dtype=torch.bool, device=t.device), None)
        bad = ~torch.isfinite(t).all(dim=1)  # or a finite batch whose sum overflowed: found good row by row
        if not bool(bad.any()):
            return Checked(t, bad, None)
        kinds = [k for k, hit in (("NaN", torch.isnan(t).any()), ("inf", torch.isinf(t).any())) if bool(hit)]
        return Checked(t.masked_fill(bad[:, None], 0.0), bad,
                       f"output has non-finite values ({', '.join(kinds)}) in {int(bad.sum())} of {n} rows")
    if t.dtype in (torch.bool, torch.complex64, torch.complex128) or t.is_complex():
        return _all_bad(n, num_classes, True, t.device, f"output dtype {t.dtype} is neither float logits nor int ids")
    if shape != (n,):
        why = (f"integer output of shape {shape}: class ids must be ({n},), and ({n}, {num_classes}) logits must be "
               "floating point" if shape == (n, num_classes) else
               f"output shape {shape}, expected ({n},) class ids or ({n}, {num_classes}) logits")
        return _all_bad(n, num_classes, False, t.device, why)
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= num_classes)
    if not bool(bad.any()):
        return Checked(t, bad, None)
    return Checked(t.masked_fill(bad, 0), bad, f"class ids outside [0, {num_classes}) in {int(bad.sum())} of {n} rows")


# how far a row's logits may move between a batch and the row alone (float summation order
# differs with the batch size), relative to 1 + the largest logit magnitude; half-precision
# logits get 16 units of their own rounding (float16: 0.016, bfloat16: 0.125)
ROW_TOLERANCE = 1e-3


def row_dependence(together: torch.Tensor, alone: list[torch.Tensor]) -> str | None:
    """Why the output of a batch (``together``: checked logits or ids) is not the outputs
    of its rows given one at a time (``alone``, in order), or None when it is, within
    ``ROW_TOLERANCE`` for logits and exactly for class ids."""
    single = torch.cat([a.to(together.device) for a in alone])
    if single.shape != together.shape or single.is_floating_point() != together.is_floating_point():
        return (f"the output of a batch (shape {tuple(together.shape)}) is not its rows' outputs given alone "
                f"(shape {tuple(single.shape)})")
    if together.is_floating_point():
        a, b = together.double(), single.double()
        diff = (a - b).abs().amax(dim=tuple(range(1, a.ndim)))
        scale = 1.0 + float(torch.maximum(a.abs().max(), b.abs().max()))
        tolerance = max(ROW_TOLERANCE, 16 * torch.finfo(together.dtype).eps, 16 * torch.finfo(single.dtype).eps)
        moved = diff > tolerance * scale
        what = f"logits move by up to {float(diff.max()):.3g}"
    else:
        moved = together != single
        what = "class ids change"
    if not bool(moved.any()):
        return None
    return (f"the output of a row depends on the other rows of its batch ({what} between the batch and its "
            f"rows given alone, in {int(moved.sum())} of {len(moved)} rows: batch statistics in forward?); "
            "riskpipe packs several events' inputs into one model call, so one event would decide another's "
            "certificate")
