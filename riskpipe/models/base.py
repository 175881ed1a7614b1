"""The loaded-model interface every certifier and the stream stage rely on."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from riskpipe.models.output import Checked, check_output, row_dependence
from riskpipe.models.validate import check_inputs


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message names the spec and the reason."""


# How a binary model with one output is read (loader option ``?binary=``): the score of
# class 0 beside the output, which is class 1's (riskpipe.models.layers.BinaryScores).
BINARY_THRESHOLDS = {"logit": 0.0, "probability": 0.5}
BINARY_HINT = ("for a binary model with one output (torch, ONNX) add ?binary=logit (class 1 where the logit is > 0) "
               "or ?binary=probability (class 1 where the probability is > 0.5) to the spec")


class ShapeUnknown(ModelError):
    """The model file records no input shape (a plain TorchScript file) and the spec gives none."""


class ModelFault(ModelError):
    """A forward pass whose output broke the contract (riskpipe.models.output) where no
    per-input certificate can carry it (start-up checks, ``predict``)."""

    def __init__(self, spec: str, reason: str):
        super().__init__(f"model {spec}: {reason}")
        self.spec, self.reason = spec, reason


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sha256_state_dict(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's message on one line: TorchScript errors carry the script's traceback
    before the error itself, so the last line is the one that says what went wrong. Callers
    name the type before it, so that line's own ``RuntimeError: `` is dropped (it read
    ``raised RuntimeError: RuntimeError: ...``)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    text = lines[-1] if len(lines) > 1 and any("Traceback" in ln for ln in lines) else lines[0]
    text = text.removeprefix(f"{type(e).__name__}: ") or text
    return text if len(text) <= limit else text[:limit] + "..."


def range_tensors(value_range, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """A declared value range as (lo, hi) tensors for ``Tensor.clamp``: scalars or per
    feature (shaped like the input); -inf/inf when nothing is declared (None)."""
    if value_range is None:
        return torch.tensor(-float("inf"), device=device), torch.tensor(float("inf"), device=device)
    lo, hi = (torch.as_tensor(np.asarray(v, dtype=np.float32), device=device) for v in value_range)
    return lo, hi


@dataclass
class Model:
    """A classifier with its input spec.

    ``predict`` maps a batch of shape ``(B, *input_shape)`` to class ids. Torch
    models also expose ``module`` (eval mode, float32 batch -> logits), which the
    bound-based certifiers need; other models a ``_predict_fn`` (numpy batch -> logits
    (B, C) or class ids (B,)). Forward passes go through ``scores``/``classes``,
    which check the output contract (riskpipe.models.output). ``sha256`` identifies the content (weights), so
    caches and ledger records can name the exact model version.

    ``value_range`` is the declared range of every input value: ``(lo, hi)`` scalars,
    or arrays broadcastable to ``input_shape`` (per feature); None when nothing is
    declared (inputs are then only checked for finiteness). ``default_reference`` is
    a reference .npz the model ships with (the demo models' training split).
    ``trees`` holds a tree ensemble's flat node arrays (extracted once at load time),
    which the ``trees`` certificate and the tree attack read.
    """

    spec: str
    input_shape: tuple[int, ...]
    num_classes: int
    sha256: str
    value_range: tuple[Any, Any] | None = None
    dtype: str = "float32"
    module: torch.nn.Module | None = None
    device: str = "cpu"
    _predict_fn: Any = field(default=None, repr=False)
    default_reference: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    trees: Any = field(default=None, repr=False)  # TreeEnsemble (riskpipe.models.trees) of a tree model
    _scores_fn: Any = field(default=None, repr=False)  # batch -> (B, classes) scores, where the format has them

    def __post_init__(self) -> None:
        """A classifier of fewer than two classes certifies nothing: argmax over one score
        is the same class for every input, so every input would get the largest radius.
        That is what a binary model with one output (a logit or a probability) looks like
        when read as (n, C) scores, so it is refused, with the option that reads it."""
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                or self.num_classes < 2:
            raise ModelError(f"model {self.spec}: {self.num_classes!r} class(es): a classifier needs scores for at "
                             f"least 2 classes; {BINARY_HINT}")

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def to(self, device: str) -> Model:
        self.device = str(device)
        if self.module is not None:
            self.module.to(self.device)
        return self

    def scores(self, batch: torch.Tensor, scratch: bool = False) -> Checked:
        """The torch module's logits (n, C) for a float32 batch, checked against the
        output contract (riskpipe.models.output): bad rows are marked, not trusted.

        A model may write into its input (an in-place normalisation such as
        ``x.sub_(mean)``, scikit-learn's ``copy=False``), and the caller's batch is often
        memory it goes on using: an event's input, the reference set the context index
        is built from. So the model gets a copy, unless the caller passes ``scratch``
        for a batch it throws away after the call (smoothing's noise buffers: no copy
        on the hot path)."""
        if self.module is None:
            raise ModelError(f"model {self.spec}: no torch module to compute scores with")
        with torch.inference_mode():
            out = self.module(batch if scratch else batch.clone())
        return check_output(out, len(batch), self.num_classes, batch.device)

    def classes(self, batch: torch.Tensor, scratch: bool = False) -> Checked:
        """Class ids (int64, on the batch's device) for a float32 batch, checked.

        Every forward pass of every certifier goes through here or ``scores``, so one
        check covers them all; a predict function may return logits (n, C) or ids (n,).
        ``scratch`` as in ``scores``: otherwise the model gets a copy of the batch."""
        c = self._outputs(batch, scratch)
        return Checked(c.values.argmax(dim=1), c.bad, c.reason) if c.values.ndim == 2 else c

    def _outputs(self, batch: torch.Tensor, scratch: bool = False) -> Checked:
        """The checked output as the model gives it: logits (n, C) or class ids (n,)."""
        if self.module is not None:
            return self.scores(batch, scratch)
        rows = batch.detach().cpu().numpy()
        return check_output(self._predict_fn(rows if scratch else rows.copy()), len(batch), self.num_classes,
                            batch.device)

    def predict_torch(self, batch: torch.Tensor, scratch: bool = False) -> torch.Tensor:
        """Class ids (int64 tensor on the batch's device) for a float32 batch; raises
        ModelFault when the output breaks the contract (no id is made up for a bad row).
        ``scratch`` as in ``scores``."""
        c = self.classes(batch, scratch)
        if c.any_bad:
            raise ModelFault(self.spec, str(c.reason))
        return c.values

    def check_forward(self, X: np.ndarray) -> None:
        """Raise ModelFault (one line naming the model) unless a forward pass over the
        probe inputs ``X`` keeps the output contract; an exception the model raises is
        reported the same way. Run at start-up, before anything is certified.

        Each probe input is also given alone: its output must be the one it got in the
        batch (``riskpipe.models.output.row_dependence``). Certifiers pack the noise of
        several events into one model call, so a model whose rows see one another (batch
        statistics in ``forward``) let one event's input decide another's certificate."""
        batch = torch.as_tensor(np.asarray(X, dtype=np.float32), device=self.device)
        try:
            c = self._outputs(batch)
            alone = [self._outputs(batch[i:i + 1]) for i in range(len(batch))] if len(batch) > 1 else []
        except Exception as e:  # noqa: BLE001 - whatever the user's model raises is its fault
            raise ModelFault(self.spec, f"forward pass raised {type(e).__name__}: {one_line(e)}") from None
        if c.any_bad:
            raise ModelFault(self.spec, f"{c.reason} on {len(X)} start-up probe inputs")
        bad = next((a for a in alone if a.any_bad), None)
        if bad is not None:
            raise ModelFault(self.spec, f"{bad.reason} on a start-up probe input given alone")
        if alone and (why := row_dependence(c.values, [a.values for a in alone])) is not None:
            raise ModelFault(self.spec, f"{why} on {len(X)} start-up probe inputs")

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class ids as a numpy array."""
        t = torch.as_tensor(np.asarray(batch, dtype=np.float32) if not isinstance(batch, torch.Tensor) else batch)
        t = t.to(device=self.device, dtype=torch.float32)
        return self.predict_torch(t).cpu().numpy()

    def class_scores(self, batch: np.ndarray) -> np.ndarray | None:
        """(B, classes) class scores (logits, probabilities or margins; argmax is the class)
        of a model without a torch module whose format exposes them (ONNX, scikit-learn's
        predict_proba, boosters' margins), else None. A score-based attack reads them."""
        if self._scores_fn is None:
            return None
        return np.asarray(self._scores_fn(np.array(batch, dtype=np.float32)), dtype=np.float64)  # a copy (scores)

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise ValueError naming the problem if ``batch`` does not fit the input spec."""

        check_inputs(batch, self)
