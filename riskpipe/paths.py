"""Where riskpipe keeps per-user files: model cache and data directory.

``RISKPIPE_CACHE_DIR`` and ``RISKPIPE_DATA_DIR`` override the defaults
(``$XDG_CACHE_HOME/riskpipe`` and ``$XDG_DATA_HOME/riskpipe``).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("RISKPIPE_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "riskpipe"
    )
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def data_dir() -> Path:
    root = os.environ.get("RISKPIPE_DATA_DIR") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "riskpipe"
    )
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p
