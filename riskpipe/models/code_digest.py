"""What a ``module:factory`` model's sha256 covers besides its weights: its code.

A factory model computes with the Python code of the factory's package and of the
packages its layer classes come from. Its weights alone would give one sha256 to two
models whose code differs (a normalisation added to ``forward``, another activation),
so the decisions of one would pass as the other's: a stored decision skipped as
"already decided", a receipt or a report grouping both, a replay that runs the new code
against the old records. The digest covers every source file (``.py`` and compiled
extensions) under each of those top-level packages, in path order, so it is the same in
every process that has the same files installed. torch's own code is left out: its
version is part of the environment, not of the model.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

SOURCE_SUFFIXES = (".py", *EXTENSION_SUFFIXES)
NOT_MODEL_CODE = frozenset({"torch", "builtins"})


def code_roots(factory, module: torch.nn.Module) -> list[str]:
    """The top-level packages (or single-file modules) the factory and each layer class of
    ``module`` are defined in, torch excepted."""
    names = {getattr(factory, "__module__", None) or ""} | {type(m).__module__ for m in module.modules()}
    return sorted({n.split(".")[0] for n in names if n} - NOT_MODEL_CODE)


def _files(root: str) -> list[tuple[str, Path]]:
    """(name relative to the root, path) of every source file of ``root``, in name order."""
    try:
        spec = importlib.util.find_spec(root)
    except ValueError:  # a module made at run time: sys.modules holds it without a spec
        spec = None
    if spec is None:
        raise ValueError(f"{root}: has no source file, so its code cannot be identified")
    dirs = list(spec.submodule_search_locations or [])
    if not dirs:  # a single-file module
        if not spec.origin or not Path(spec.origin).is_file():
            raise ValueError(f"{root}: has no source file, so its code cannot be identified")
        return [(Path(spec.origin).name, Path(spec.origin))]
    return sorted((p.relative_to(d).as_posix(), p) for d in map(Path, dirs) for p in d.rglob("*")
                  if p.is_file() and p.name.endswith(SOURCE_SUFFIXES) and "__pycache__" not in p.parts)


def code_sha256(roots: Iterable[str]) -> str:
    """sha256 over every source file of ``roots``: its root, its name within the root and
    its bytes. ValueError for a root with no source to read."""
    h = hashlib.sha256()
    for root in roots:
        for name, p in _files(root):
            data = p.read_bytes()
            h.update(f"{root}/{name}\x00{len(data)}\x00".encode())
            h.update(data)
    return h.hexdigest()
