"""matplotlib on the Agg backend (no display), figures saved as byte-identical PNG on
every run (no timestamp or software metadata), for inline ``<img>`` tags or files."""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def pyplot():
    """``matplotlib.pyplot`` with the Agg backend selected."""
    return plt


def png(fig, dpi: int = 110) -> bytes:
    """The figure as PNG bytes (tight bounding box, no metadata); closes the figure."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    finally:
        plt.close(fig)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{b64(data)}"
