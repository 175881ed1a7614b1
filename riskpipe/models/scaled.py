"""Per-feature scale for tabular models: certify g(z) = f(s * z) on z = x / s.

Raw tabular features live in different units (age in years, income in dollars), so an
isotropic l2 ball in raw units means nothing. With a positive scale s (one value per
feature, e.g. the standard deviation of the reference set) every certifier works on
the rescaled input z = x / s and the wrapped model g(z) = f(s * z), which classifies
exactly like f on the raw input. Hence, without any change to a certifier:

* smoothing noise N(0, sigma^2 I) on z is N(0, sigma^2 diag(s^2)) on x;
* a radius r certified for g at z covers every raw change delta with
  ||delta / s||_2 <= r (the scaled l2 norm), since g(z + delta / s) = f(x + delta);
* Theorem 2 conversion uses d = the number of features (the dimension of z), and
  context distances are measured between z's (reference X / s), in the same norm.

One wrapper serves torch modules (a fixed diagonal layer in front, so interval and
Lipschitz bounds see it too), predict-function models (ONNX, skops) and tree
ensembles (thresholds divided by s, so the ``trees`` certificate sees g). Memory is
O(d): the diagonal is kept as a vector, and the standard deviations of ``standardize``
are accumulated over row chunks.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from riskpipe.models.base import Model
from riskpipe.models.layers import Scale


def _unscale_layer(s: np.ndarray) -> nn.Module:
    """x = s * z as a layer: ``Scale``, an elementwise multiply that the interval-bound and
    Lipschitz certifiers handle as the diagonal linear map it is (so a ``module:factory``
    Sequential stays certifiable by every family)."""
    return Scale(torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32)))


def standardize_scale(X: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Per-feature standard deviation of a reference set X (N, *shape); a feature that
    is constant there gets scale 1 (it cannot be standardized, and 0 would divide).

    Accumulated over chunks of rows (Chan et al.'s pairwise update of mean and squared
    deviations, in float64), so memory is O(d) beyond X itself."""
    n = len(X)
    flat = np.asarray(X).reshape(n, -1)
    mean = np.zeros(flat.shape[1])
    m2 = np.zeros(flat.shape[1])
    seen = 0
    for start in range(0, n, chunk):
        block = flat[start:start + chunk].astype(np.float64)
        k = len(block)
        b_mean = block.mean(axis=0)
        b_m2 = ((block - b_mean) ** 2).sum(axis=0)
        delta = b_mean - mean
        total = seen + k
        mean += delta * (k / total)
        m2 += b_m2 + delta ** 2 * (seen * k / total)
        seen = total
    s = np.sqrt(m2 / max(seen, 1))
    return np.where(s > 0, s, 1.0)


def scaled_model(model: Model, scale, describe: str) -> Model:
    """g(z) = f(scale * z) with its input spec in z units. ``scale`` has one positive
    value per feature (flattened input); ``describe`` says where it came from
    (e.g. ``standardize(reference)``) and goes into ``meta['scale']``."""
    s = np.asarray(scale, dtype=np.float32).reshape(model.input_shape)
    if not (np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("scale: every value must be finite and > 0")
    module = None
    if model.module is not None:
        module = nn.Sequential(_unscale_layer(s), model.module).eval().to(model.device)
    predict = None
    if model._predict_fn is not None:
        raw_predict = model._predict_fn

        def predict(z: np.ndarray) -> np.ndarray:
            return raw_predict(np.asarray(z, dtype=np.float32) * s)

    scores = None
    if model._scores_fn is not None:
        raw_scores = model._scores_fn

        def scores(z: np.ndarray) -> np.ndarray:
            return raw_scores(np.asarray(z, dtype=np.float32) * s)

    value_range = None
    if model.value_range is not None:
        lo, hi = (np.broadcast_to(np.asarray(v, dtype=np.float32), model.input_shape) / s for v in model.value_range)
        value_range = (lo, hi)
    return Model(spec=model.spec, input_shape=tuple(model.input_shape), num_classes=model.num_classes,
                 sha256=model.sha256, value_range=value_range, dtype=model.dtype, module=module,
                 device=model.device, _predict_fn=predict, default_reference=model.default_reference,
                 meta={**model.meta, "scale": describe, "scale_values": s.ravel().tolist()},
                 trees=None if model.trees is None else model.trees.scaled(s), _scores_fn=scores)
