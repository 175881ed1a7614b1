"""Where riskpipe keeps per-user files: model cache and data directory.

``RISKPIPE_CACHE_DIR`` and ``RISKPIPE_DATA_DIR`` override the defaults
(``$XDG_CACHE_HOME/riskpipe`` and ``$XDG_DATA_HOME/riskpipe``).
"""

from __future__ import annotations

import os
from pathlib import Path


def _user_dir(override: str, xdg: str, fallback: str) -> Path:
    root = os.environ.get(override) or os.path.join(os.environ.get(xdg) or os.path.expanduser(fallback), "riskpipe")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    return _user_dir("RISKPIPE_CACHE_DIR", "XDG_CACHE_HOME", "~/.cache")


def data_dir() -> Path:
    return _user_dir("RISKPIPE_DATA_DIR", "XDG_DATA_HOME", "~/.local/share")
