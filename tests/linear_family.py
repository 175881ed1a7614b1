"""A certification family that is not part of riskpipe: exact radii of a linear classifier.

tests/test_families.py adds it to the registry (``register(LINEAR)``, what one entry in
riskpipe/certify/families.py would be) and shows that the policy schema, the factory, the
composition root, the CLI, compare and the conformance suite take it with no other edit.

For f(x) = W x + b with predicted class y, the class cannot change within the distance
to the nearest decision boundary: r = min_j (z_y - z_j) / ||w_y - w_j||_q, q the dual of
the certified norm (l2 -> l2, linf -> l1); exact on the unbounded input space, so sound
on any value range.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from riskpipe.certify.certificate import Certificate
from riskpipe.certify.families import Family, Param
from riskpipe.certify.protocol import CertifierBase
from riskpipe.models.base import Model, sha256_state_dict

DUAL = {"l2": 2, "linf": 1}
SLACK = 1e-5  # relative: the model's float32 forward may land on either side of a float64 boundary


@dataclass
class LinearMargin(CertifierBase):
    """Exact l2 or l_inf radii of a model that is one linear layer; abstains when the logit
    margin is at most ``min_margin``."""

    model: object
    norm: str = "l2"
    min_margin: float = 0.0

    method = "linear"
    modes = ("certify",)

    def __post_init__(self) -> None:
        if self.norm not in DUAL:
            raise ValueError(f"norm: linear certifies {' or '.join(DUAL)}, not {self.norm!r}")
        if not (math.isfinite(self.min_margin) and self.min_margin >= 0):
            raise ValueError(f"min_margin: must be a finite number >= 0, got {self.min_margin}")
        module = getattr(self.model, "module", None)
        tensors = list(module.state_dict().values()) if module is not None else []
        if len(tensors) != 2 or tensors[0].dim() != 2 or tensors[1].dim() != 1:
            raise ValueError(f"model: {getattr(self.model, 'spec', self.model)} is not one linear layer")
        self._W = tensors[0].double().cpu().numpy()
        self._b = tensors[1].double().cpu().numpy()
        probe = np.random.default_rng(0).random((4, self._W.shape[1]))  # a ReLU after it would change this
        with torch.no_grad():
            out = module(torch.as_tensor(probe, dtype=torch.float32).reshape((4, *self.model.input_shape)))
        if not np.allclose(out.double().numpy(), probe @ self._W.T + self._b, rtol=1e-4, atol=1e-4):
            raise ValueError(f"model: {self.model.spec} is not one linear layer (its output is not W x + b)")

    def certify_batch(self, X, seeds: Sequence[int]) -> list[Certificate]:
        t0 = time.perf_counter()
        x = np.asarray(X, dtype=np.float64).reshape(len(X), -1)
        if len(seeds) != len(x):
            raise ValueError(f"seeds: need one per input ({len(x)}), got {len(seeds)}")
        z = x @ self._W.T + self._b
        out = []
        ms = (time.perf_counter() - t0) * 1e3 / max(len(x), 1)
        for i, zi in enumerate(z):
            y = int(zi.argmax())
            others = [j for j in range(len(zi)) if j != y]
            margin = min(zi[y] - zi[j] for j in others)
            r = min((zi[y] - zi[j]) / np.linalg.norm(self._W[y] - self._W[j], DUAL[self.norm]) for j in others)
            abstain = not margin > self.min_margin
            out.append(Certificate(
                method=self.method, mode="bound", norm=self.norm, radius=0.0 if abstain else float(r) * (1 - SLACK),
                abstained=abstain, predicted_class=None if abstain else y, n_samples=1, elapsed_ms=ms,
                seed=int(seeds[i]), certified=not abstain, reason="margin_below_min" if abstain else None,
                input_dim=x.shape[1], extra={"margin": float(margin)}))
        return out


def _scope(c, norm: str) -> str:
    return f"{norm} radius to the nearest decision boundary of a linear classifier: exact; no sampler"


LINEAR = Family(
    "linear", "linear_family:LinearMargin", ("l2", "linf"), _scope,
    params=(Param("min_margin", float, 0.0, ge=0.0, exclusive=True),),
    parallelism="One matrix product per batch, parallel over inputs.",
)


def linear_model(d: int = 6, k: int = 3, seed: int = 0) -> Model:
    """A seeded linear classifier on [0, 1]^d (not the demo model)."""
    torch.manual_seed(seed)
    module = nn.Sequential(nn.Linear(d, k)).eval()
    return Model(spec=f"test:linear{d}x{k}", input_shape=(d,), num_classes=k, sha256=sha256_state_dict(module),
                 module=module, value_range=(0.0, 1.0))
