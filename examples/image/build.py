"""Regenerate the image example: a TorchScript CNN on synthetic 3x32x32 shape images.

No real image set ships offline, so the data are drawn here, deterministically: a
coloured shape (circle, square, triangle, cross; random size, position, rotation and
colour) over a 32x32 crop of one of scikit-learn's two bundled photographs
(``load_sample_images``), 8-bit pixel values k / 255 in [0, 1]. The CNN is trained with Gaussian noise
augmentation at the sigma its policy certifies with (Cohen et al. 2019 train the base
classifier with the noise they smooth with).

Writes, next to this file: ``model.pt`` (TorchScript), ``reference.npz`` (X float32
(N, 3, 32, 32), y int64: held-out clean images for the context index). Seeded, with a
fixed thread count, so a rerun on the same torch version gives the same reference set
and the same weights (the TorchScript zip also holds a random serialization id).

    python examples/image/build.py        # about 30 s on one core
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

HERE = Path(__file__).resolve().parent
LABELS = ["circle", "square", "triangle", "cross"]
SIZE = 32
SIGMA = 0.25  # must equal certifier.sigma in policy.yaml
LEVELS = 255  # 8-bit pixels: must equal certifier.grid_levels in policy.yaml
SEED = 0
THREADS = 1  # small batches: one thread is fastest, and weights are bit-identical only for a fixed count
N_TRAIN, N_REFERENCE = 4000, 160


def _backgrounds() -> list[np.ndarray]:
    """The two bundled photographs, shrunk 4x (their texture at a 32x32 scale), in [0, 1]."""
    from sklearn.datasets import load_sample_images

    out = []
    for img in load_sample_images().images:
        h, w = (img.shape[0] // 4) * 4, (img.shape[1] // 4) * 4
        small = img[:h, :w].reshape(h // 4, 4, w // 4, 4, 3).mean(axis=(1, 3)) / 255.0
        out.append(small.astype(np.float32))
    return out


def _mask(kind: int, rng: np.random.Generator) -> np.ndarray:
    """Boolean (32, 32) mask of one shape with random centre, size and rotation."""
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    cx, cy = rng.uniform(11, 21, size=2)
    r = rng.uniform(7, 11)
    a = rng.uniform(0, 2 * np.pi)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    if kind == 0:  # circle
        return u**2 + v**2 <= r**2
    if kind == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == 2:  # equilateral triangle: three half-planes at distance r/2 from the centre
        angles = a + np.array([np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3])
        m = np.ones_like(u, dtype=bool)
        for t in angles - a:
            m &= u * np.cos(t) + v * np.sin(t) <= r / 2
        return m
    arm = 0.3 * r  # cross
    return ((np.abs(u) <= arm) & (np.abs(v) <= r)) | ((np.abs(v) <= arm) & (np.abs(u) <= r))


def make_images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` images (N, 3, 32, 32) float32 on the 8-bit grid k / 255 and balanced labels (N,) int64."""
    rng = np.random.default_rng(seed)
    backgrounds = _backgrounds()
    y = np.arange(n) % len(LABELS)
    rng.shuffle(y)
    X = np.empty((n, 3, SIZE, SIZE), np.float32)
    for i, kind in enumerate(y):
        bg = backgrounds[rng.integers(len(backgrounds))]
        top, left = rng.integers(0, bg.shape[0] - SIZE), rng.integers(0, bg.shape[1] - SIZE)
        crop = bg[top:top + SIZE, left:left + SIZE]
        crop = 0.5 + rng.uniform(0.3, 0.7) * (crop - crop.mean())  # damped texture around mid-grey
        # a random hue whose brightness stands 0.35-0.5 away from the background's, so the shape stays visible
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        gap = rng.uniform(0.35, 0.5) * (1 if crop.mean() < 0.5 else -1)
        colour = np.clip(colour - colour.mean() + crop.mean() + gap, 0, 1)
        m = _mask(int(kind), rng)[..., None]
        X[i] = np.clip(np.where(m, colour, crop), 0, 1).transpose(2, 0, 1)
    return quantise(X), y.astype(np.int64)


def quantise(X: np.ndarray) -> np.ndarray:
    """8-bit pixels, k / 255 as float32 (what a camera or a UINT8 tensor delivers): the
    grid the policy's sound sampler certifies on."""
    return (np.round(X * LEVELS) / np.float32(LEVELS)).astype(np.float32)


def shapes_cnn(width: int = 16) -> nn.Sequential:
    """2x2 average pooling (halves the noise's std for free), three convolutions, two linear
    layers: about 90k parameters, 0.8 MMAC per image."""
    return nn.Sequential(
        nn.AvgPool2d(2),
        nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * width * 16, 64), nn.ReLU(),
        nn.Linear(64, len(LABELS)),
    )


def train(X: np.ndarray, y: np.ndarray, epochs: int = 20, batch_size: int = 64, lr: float = 5e-3) -> nn.Sequential:
    """Cross-entropy on x + N(0, SIGMA^2 I): the base classifier randomized smoothing needs."""
    torch.manual_seed(SEED)
    g = torch.Generator().manual_seed(SEED)
    model = shapes_cnn()
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    steps = epochs * -(-len(Xt) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), batch_size):
            idx = perm[i:i + batch_size]
            xb = Xt[idx] + SIGMA * torch.randn(Xt[idx].shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def noisy_accuracy(model: nn.Module, X: np.ndarray, y: np.ndarray, sigma: float, seed: int = 1) -> float:
    g = torch.Generator().manual_seed(seed)
    x = torch.from_numpy(X)
    with torch.inference_mode():
        pred = model(x + sigma * torch.randn(x.shape, generator=g)).argmax(1).numpy()
    return float((pred == y).mean())


def main(out: Path = HERE) -> None:
    torch.set_num_threads(THREADS)
    X, y = make_images(N_TRAIN + N_REFERENCE, SEED)
    Xtr, ytr, Xref, yref = X[:N_TRAIN], y[:N_TRAIN], X[N_TRAIN:], y[N_TRAIN:]
    model = train(Xtr, ytr)
    clean, noisy = noisy_accuracy(model, Xref, yref, 0.0), noisy_accuracy(model, Xref, yref, SIGMA)
    scripted = torch.jit.script(model)
    scripted.save(str(out / "model.pt"))
    np.savez_compressed(out / "reference.npz", X=Xref, y=yref)
    print(f"model.pt, reference.npz ({len(Xref)} images) written to {out}; "
          f"reference accuracy clean {clean:.3f}, under N(0, {SIGMA}^2) noise {noisy:.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
