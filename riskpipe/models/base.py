"""The loaded-model interface every certifier and the stream stage rely on."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch


class ModelError(ValueError):
    """A model spec that cannot be loaded; the message names the spec and the reason."""


class ShapeUnknown(ModelError):
    """The model file records no input shape (a plain TorchScript file) and the spec gives none."""


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
    bound-based certifiers need. ``sha256`` identifies the content (weights), so
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

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    def to(self, device: str) -> Model:
        self.device = str(device)
        if self.module is not None:
            self.module.to(self.device)
        return self

    def predict_torch(self, batch: torch.Tensor) -> torch.Tensor:
        """Class ids (int64 tensor on the batch's device) for a float32 batch."""
        if self.module is not None:
            with torch.inference_mode():
                return self.module(batch).argmax(dim=1)
        ids = self._predict_fn(batch.detach().cpu().numpy())
        return torch.as_tensor(np.asarray(ids, dtype=np.int64), device=batch.device)

    def predict(self, batch: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class ids as a numpy array."""
        t = torch.as_tensor(np.asarray(batch, dtype=np.float32) if not isinstance(batch, torch.Tensor) else batch)
        t = t.to(device=self.device, dtype=torch.float32)
        return self.predict_torch(t).cpu().numpy()

    def check_batch(self, batch: np.ndarray) -> None:
        """Raise ValueError naming the problem if ``batch`` does not fit the input spec."""
        from riskpipe.models.validate import check_inputs

        check_inputs(batch, self)
