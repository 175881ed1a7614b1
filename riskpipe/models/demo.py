"""Demo models on the digits data, trained deterministically and cached per user.

``demo:digits`` is a small CNN trained with Gaussian noise augmentation, the base
classifier randomized smoothing expects (Cohen et al. 2019 train with the noise
they certify with). Training takes a few seconds on 2 CPU cores; the weights are
cached under ``cache_dir()/models`` keyed by the recipe and the training code (a
refactor that reorders float operations gives other weights), so every later load
is a file read.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from riskpipe.models import robust_training as robust
from riskpipe.models.digits import INPUT_SHAPE, NUM_CLASSES, load_split
from riskpipe.paths import atomic_write, cache_dir

RECIPE_VERSION = 1
TRAIN_THREADS = 2  # intra-op threads while training; weights are bit-identical only for the same count


def digits_cnn(width: int = 8) -> nn.Sequential:
    """Two conv layers and two linear layers; width 8 has about 30k parameters."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 100),
        nn.ReLU(),
        nn.Linear(100, NUM_CLASSES),
    )


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a demo model's weights."""

    name: str
    width: int = 8
    sigma: float = 0.25
    epochs: int = 60
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    trainer: str = "noise"

    def key(self, code: str = "") -> str:
        """Cache key of the recipe; ``code`` is the training-code fingerprint (``code_fingerprint``)."""
        blob = json.dumps({**asdict(self), "v": RECIPE_VERSION, "torch": torch.__version__.split("+")[0],
                           "code": code}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _riskpipe_functions(fn, seen: set) -> None:
    """``fn`` and every riskpipe function it names (globals, module attributes, nested code), recursively."""
    if fn in seen or not getattr(fn, "__module__", "").startswith("riskpipe"):
        return
    seen.add(fn)
    names, codes = set(), [fn.__code__]
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes += [c for c in code.co_consts if inspect.iscode(c)]
    for name in names:
        obj = fn.__globals__.get(name)
        targets = [obj] if inspect.isfunction(obj) else []
        if inspect.ismodule(obj) and obj.__name__.startswith("riskpipe"):
            targets = [getattr(obj, n) for n in names if inspect.isfunction(getattr(obj, n, None))]
        for t in targets:
            _riskpipe_functions(t, seen)


def code_fingerprint(*fns) -> str:
    """sha256 of the source files of the riskpipe code ``fns`` run (training loop, losses, data).

    Training is bit-reproducible for a fixed code version, but a refactor that only
    reorders float operations (e.g. in the IBP margins the loss uses) yields other
    weights; keying the cache on the code retrains instead of serving stale weights."""
    seen: set = set()
    for fn in fns:
        _riskpipe_functions(fn, seen)
    sources = {inspect.getsourcefile(f) for f in seen} | {sys.modules[f.__module__].__file__ for f in seen}
    files = sorted(f for f in sources if f is not None)  # riskpipe's own functions: always from a file
    h = hashlib.sha256()
    for f in files:
        h.update(Path(f).read_bytes())
    return h.hexdigest()[:16]


def train_noise(model: nn.Module, recipe: Recipe) -> None:
    """Adam on cross-entropy with Gaussian noise added to every training image."""
    X, y = load_split("train")
    Xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=recipe.epochs)
    model.train()
    for _ in range(recipe.epochs):
        perm = torch.randperm(len(Xt), generator=g)
        for i in range(0, len(Xt), recipe.batch_size):
            idx = perm[i : i + recipe.batch_size]
            xb = Xt[idx]
            if recipe.sigma > 0:
                xb = xb + recipe.sigma * torch.randn(xb.shape, generator=g)
            loss = nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    model.eval()


# name -> (recipe, architecture factory, trainer). Other demo variants register here.
DEMOS: dict[str, tuple[Recipe, Callable[[], nn.Module], Callable[..., None]]] = {
    "digits": (Recipe("digits"), lambda: digits_cnn(8), train_noise),
    "digits-ibp": (Recipe("digits-ibp", width=8, sigma=0.0, epochs=25, trainer=robust.IBP.tag()),
                   lambda: robust.ibp_cnn(8), robust.train_ibp),
    "digits-lipschitz": (Recipe("digits-lipschitz", width=robust.LIPSCHITZ.hidden, sigma=0.0, epochs=30,
                                trainer=robust.LIPSCHITZ.tag()), robust.lipschitz_mlp, robust.train_lipschitz),
}


def register_demo(recipe: Recipe, factory: Callable[[], nn.Module], trainer: Callable[..., None]) -> None:
    DEMOS[recipe.name] = (recipe, factory, trainer)


def build_demo(name: str, *, sigma: float | None = None, retrain: bool = False) -> nn.Module:
    """The trained demo module ``name`` (eval mode), from the cache or trained now."""
    if name not in DEMOS:
        raise KeyError(name)
    recipe, factory, trainer = DEMOS[name]
    if sigma is not None:
        recipe = Recipe(**{**asdict(recipe), "sigma": float(sigma)})
    path = cache_dir() / "models" / f"{recipe.name}-{recipe.key(code_fingerprint(factory, trainer))}.pt"
    module = factory()
    if path.exists() and not retrain:
        module.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
        module.eval()
        return module
    torch.manual_seed(recipe.seed)
    module = factory()  # re-created after seeding so initial weights are deterministic
    threads = torch.get_num_threads()
    torch.set_num_threads(TRAIN_THREADS)  # fixed, not min(caller's, 2): the split decides the reduction order
    try:
        trainer(module, recipe)
    finally:
        torch.set_num_threads(threads)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        torch.save(module.state_dict(), f)
    module.eval()
    return module


def accuracy(module: nn.Module, X: np.ndarray, y: np.ndarray, sigma: float = 0.0, seed: int = 0) -> float:
    with torch.inference_mode():
        x = torch.from_numpy(X)
        if sigma > 0:
            x = x + sigma * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
        return float((module(x).argmax(1).numpy() == y).mean())


__all__ = ["DEMOS", "INPUT_SHAPE", "NUM_CLASSES", "Recipe", "accuracy", "build_demo", "digits_cnn", "register_demo"]
