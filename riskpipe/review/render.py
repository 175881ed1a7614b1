"""What the item page shows: the input as an image, controls split by framework."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image

TARGET_PIXELS = 224  # displayed size of the longer side; small inputs are upscaled with hard edges
NIST_FUNCTIONS = ("GOVERN", "MAP", "MEASURE", "MANAGE")


@dataclass(frozen=True)
class InputView:
    """Either a PNG data URI of the input or the reason it is not drawn."""

    data_uri: str | None
    note: str


def image_array(data, shape) -> tuple[np.ndarray | None, str]:
    """(H, W) or (H, W, 3) array in [0, 1] when ``data`` with ``shape`` is an image.

    Images are 2-D, or 3-D with 1 or 3 channels first or last (a leading batch axis of 1
    is dropped). Values in [0, 1] are shown as they are; anything else is min-max scaled,
    and the note says so.
    """
    if data is None:
        return None, "the input is not on this record (the stage stores only its digest unless review_include_input is on)"
    if not isinstance(shape, list) or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
        return None, f"input.shape: not a list of positive integers ({shape!r})"
    try:
        a = np.asarray(data, dtype=np.float64)
    except (TypeError, ValueError):
        return None, "input.data: not a list of numbers"
    if a.ndim != 1 or a.size != math.prod(shape):
        return None, f"input.data: {a.size} values do not fill shape {shape}"
    if not np.all(np.isfinite(a)):
        return None, "input.data: contains NaN or infinity"
    a = a.reshape(shape)
    while a.ndim > 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] == 3)) or min(a.shape[:2]) < 2:
        return None, f"shape {shape} is not an image (not drawn)"
    lo, hi = float(a.min()), float(a.max())
    if lo >= 0.0 and hi <= 1.0:
        return a, f"shape {shape}, values in [0, 1] shown as grey levels (black 0, white 1)"
    scaled = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return scaled, f"shape {shape}, values in [{lo:g}, {hi:g}] scaled to grey levels"


def input_view(record: dict) -> InputView:
    inp = record.get("input") if isinstance(record.get("input"), dict) else {}
    arr, note = image_array(inp.get("data"), inp.get("shape"))
    if arr is None:
        return InputView(None, note)
    pixels = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)  # uint8 (H, W) -> "L", (H, W, 3) -> "RGB"
    scale = max(1, TARGET_PIXELS // max(img.size))
    img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return InputView("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii"), note)


def split_controls(controls) -> tuple[list[str], list[str]]:
    """(NIST AI RMF subcategory ids, other references such as ISO/IEC 27001 Annex A)."""
    nist, other = [], []
    for c in controls if isinstance(controls, list) else []:
        (nist if str(c).upper().startswith(NIST_FUNCTIONS) else other).append(str(c))
    return nist, other
