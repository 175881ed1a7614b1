"""Pictures and tables of any model's inputs, and class names, for people.

An input of shape (H, W), (1|3, H, W) or (H, W, 1|3) (leading batch axes of 1 dropped)
is drawn as a grey or colour image: scaled from the model's declared value range when
there is one (so a darker pixel means a smaller value on every record), else shown as
is when it lies in [0, 1], else min-max scaled; small images are upscaled with hard
edges. A 1-D input is a tabular row, shown as a table of feature name and value.
"""

from __future__ import annotations

import io
import logging
import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from PIL import Image

from riskpipe.ledger.inputs import InputUnavailable, record_array
from riskpipe.render.figures import data_uri

log = logging.getLogger("riskpipe.render")
TARGET_PIXELS = 224  # displayed size of the longer side; small images are upscaled by a whole factor


@dataclass(frozen=True)
class ModelInfo:
    """What the views know about a model: class names, feature names, value range."""

    labels: tuple[str, ...] | None = None
    feature_names: tuple[str, ...] | None = None
    value_range: tuple[float, float] | None = None


def _spec_range(spec: str) -> tuple[float, float] | None:
    head, _, query = str(spec).partition("?")
    if head.startswith("demo:"):
        return (0.0, 1.0)
    for part in query.split("&"):
        key, _, value = part.partition("=")
        if key == "range":
            try:
                lo, hi = (float(v) for v in value.split(","))
            except ValueError:
                return None
            return (lo, hi) if lo < hi else None
    return None


def _names(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, (list, tuple, np.ndarray)) and len(value):
        return tuple(str(v) for v in value)
    return None


def model_info(entry: Any = None, model: Any = None) -> ModelInfo:
    """ModelInfo from a stage config's ``models:`` entry (a spec string, or a mapping with
    ``spec``, ``labels``, ``feature_names``, ``range``) and, when given, the loaded model
    (its declared ``value_range``, ``meta['feature_names']`` and ``meta['class_names']``, e.g.
    skops' ``feature_names_in_`` and ``classes_``).
    The config entry wins where both say something."""
    e = entry if isinstance(entry, dict) else ({"spec": entry} if isinstance(entry, str) else {})
    if entry is not None and not isinstance(entry, (dict, str)):  # a pydantic ModelConfig
        e = {k: getattr(entry, k, None) for k in ("spec", "labels", "feature_names", "range")}
    rng = e.get("range")
    value_range = None
    if isinstance(rng, (list, tuple)) and len(rng) == 2 and all(isinstance(v, (int, float)) for v in rng):
        value_range = (float(rng[0]), float(rng[1]))
    elif e.get("spec"):
        value_range = _spec_range(e["spec"])
    names, labels = _names(e.get("feature_names")), _names(e.get("labels"))
    if model is not None:
        mr = getattr(model, "value_range", None)
        if value_range is None and mr is not None and np.ndim(mr[0]) == 0 and np.ndim(mr[1]) == 0:
            value_range = (float(mr[0]), float(mr[1]))
        meta = getattr(model, "meta", None) or {}
        names = names or _names(meta.get("feature_names"))
        labels = labels or _names(meta.get("class_names"))
    return ModelInfo(labels=labels, feature_names=names, value_range=value_range)


TABULAR_FILES = (".skops", ".onnx")


def entry_info(entry: Any) -> ModelInfo:
    """``model_info`` of a config entry; a tabular model file (.skops, .onnx) whose entry
    names no features or no classes is loaded for the names it carries itself (skops'
    ``feature_names_in_`` and ``classes_``).
    A file that cannot be loaded here leaves the names unknown (tables show positions)."""
    info = model_info(entry)
    spec = entry if isinstance(entry, str) else (
        entry.get("spec") if isinstance(entry, dict) else getattr(entry, "spec", None))
    if (info.feature_names is not None and info.labels is not None) or not isinstance(spec, str) or \
            not spec.partition("?")[0].lower().endswith(TABULAR_FILES):
        return info

    # lazy: riskpipe.models loads torch; the review console renders without it unless a file needs loading
    from riskpipe.models import ModelError, load_model

    try:
        return model_info(entry, load_model(spec))
    except (ModelError, OSError, ImportError) as e:
        log.warning("model %s not loaded for its feature names: %s", spec, e)
        return info


def class_name(class_id: Any, labels: tuple[str, ...] | list[str] | None) -> str:
    """``"stop (class 0)"`` where labels name the class, else the id as it is."""
    if class_id is None:
        return "n/a"
    if labels and isinstance(class_id, int) and not isinstance(class_id, bool) and 0 <= class_id < len(labels):
        return f"{labels[class_id]} (class {class_id})"
    return str(class_id)


@dataclass(frozen=True)
class InputView:
    """How to show one input: an image (``data_uri``, ``width`` x ``height`` pixels as
    drawn), a table (``rows`` of feature name and value), or neither, with ``note``
    saying what is shown or why nothing is."""

    kind: str  # "image" | "table" | "none"
    note: str
    data_uri: str | None = None
    width: int = 0
    height: int = 0
    rows: tuple[tuple[str, str], ...] = ()


def _none(note: str) -> InputView:
    return InputView("none", note)


def _image_array(a: np.ndarray) -> np.ndarray | None:
    """(H, W) or (H, W, 3) from 2-D/3-D ``a`` (channels first or last), else None."""
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) and min(a.shape[:2]) >= 2:
        return a
    return None


def _scaled(a: np.ndarray, shape, value_range) -> tuple[np.ndarray, str]:
    kind = "grey levels" if a.ndim == 2 else "colour"
    if value_range is not None:
        lo, hi = value_range
        return np.clip((a - lo) / (hi - lo), 0,
                       1), f"shape {list(shape)}, the model's range [{lo:g}, {hi:g}] shown as {kind}"
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return a, f"shape {list(shape)}, values in [0, 1] shown as {kind} (black 0, white 1)"
    return ((a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)), \
        f"shape {list(shape)}, values in [{lo:g}, {hi:g}] min-max scaled to {kind} (no declared range)"


def image_png(a: np.ndarray) -> tuple[bytes, int, int]:
    """PNG bytes of an (H, W) or (H, W, 3) array in [0, 1], upscaled by a whole factor
    towards ``TARGET_PIXELS`` (nearest neighbour: every input value stays one flat block)."""
    img = Image.fromarray(np.clip(np.rint(a * 255.0), 0, 255).astype(np.uint8))
    scale = max(1, TARGET_PIXELS // max(img.size))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue(), img.width, img.height


def _table(a: np.ndarray, shape, names) -> InputView:
    note = f"tabular input, {a.size} features"
    if names is not None and len(names) != a.size:
        note += f" (the {len(names)} configured feature names do not match; positions shown)"
        names = None
    if names is None:
        names = tuple(f"x[{i}]" for i in range(a.size))
        if not note.endswith("shown)"):
            note += " (no feature names configured: positions shown)"
    return InputView("table", note, rows=tuple((str(n), f"{v:.6g}") for n, v in zip(names, a.tolist())))


def input_view(data: Any, shape: Any, info: ModelInfo | None = None) -> InputView:
    """The view of flat ``data`` with ``shape`` (as an Open Inference Protocol tensor carries them)."""
    info = info or ModelInfo()
    if data is None:
        return _none("the input is not on this record (the stage stores only its digest unless "
                     "review_include_input is on)")
    if not isinstance(shape, (list, tuple)) or not shape or not all(
            isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return _none(f"input.shape: not a list of positive integers ({shape!r})")
    try:
        a = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        return _none("input.data: not a list of numbers")
    if a.size != math.prod(shape) or a.ndim not in (1, len(shape)):
        return _none(f"input.data: {a.size} values do not fill shape {list(shape)}")
    if not np.all(np.isfinite(a)):
        return _none("input.data: contains NaN or infinity")
    a = a.reshape(tuple(shape))
    while a.ndim > 1 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        return _table(a, shape, info.feature_names)
    img = _image_array(a)
    if img is None:
        return _none(f"shape {list(shape)} is neither an image nor a feature row (not drawn)")
    scaled, note = _scaled(img, shape, info.value_range)
    png_bytes, w, h = image_png(scaled)
    return InputView("image", note, data_uri(png_bytes), w, h)


def record_view(record: dict, info: ModelInfo | None = None, fetch=None) -> InputView:
    """The view of a decision record's ``input`` (docs/records.md: inline ``data``, or a
    ``tensor`` inline in base64 or stored in the ledger; ``fetch`` is the ledger's
    ``get_input``). A UINT8 tensor is drawn on its own 0..255 scale."""

    raw = record.get("input")
    inp = raw if isinstance(raw, dict) else {}
    try:
        data = record_array(inp, fetch)
    except InputUnavailable as e:
        return _none(str(e))
    if data is not None and data.dtype == np.uint8:
        info = replace(info or ModelInfo(), value_range=(0.0, 255.0))
    return input_view(data, inp.get("shape"), info)
