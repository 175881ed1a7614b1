"""The demo data set: scikit-learn's 8x8 digits, as float32 images in [0, 1]."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from riskpipe.paths import atomic_write, cache_dir

INPUT_SHAPE = (1, 8, 8)
NUM_CLASSES = 10


@lru_cache(maxsize=1)
def _split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32).reshape(-1, *INPUT_SHAPE)
    y = d.target.astype(np.int64)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    return {"train": (Xtr, ytr), "test": (Xte, yte)}


def load_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) for ``train`` or ``test``: X float32 (N, 1, 8, 8) in [0, 1], y int64."""
    parts = _split()
    if split not in parts:
        raise ValueError(f"split: {split!r} is not one of {sorted(parts)}")
    X, y = parts[split]
    return X.copy(), y.copy()


def reference_file() -> Path:
    """The demo models' default reference set (the TRAIN split) as a .npz with X and
    y, written once under cache_dir()/data: the same kind of file a user supplies."""

    path = Path(cache_dir()) / "data" / "digits-train.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        X, y = load_split("train")
        with atomic_write(path) as f:
            np.savez(f, X=X, y=y)
    return path
