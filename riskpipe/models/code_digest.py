"""What a ``module:factory`` model's sha256 covers besides its weights: its code.

A factory model computes with the Python code of the factory's package and of the
packages its layer classes come from. Its weights alone would give one sha256 to two
models whose code differs (a normalisation added to ``forward``, another activation),
so the decisions of one would pass as the other's: a stored decision skipped as
"already decided", a receipt or a report grouping both, a replay that runs the new code
against the old records. The digest covers every source file (``.py``, a sourceless
``.pyc``, compiled extensions; symlinked directories followed) of each of those packages
(the outermost regular package holding the module: a namespace package's portions can
come from anywhere on the path), in path order, so it is the same in every process that
has the same files installed. A package with no file to read (a zip import, a module made
at run time) is refused. torch's own code is left out: its version is part of the
environment, not of the model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from collections.abc import Iterable
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import torch

SOURCE_SUFFIXES = (".py", ".pyc", *EXTENSION_SUFFIXES)  # .pyc: a sourceless package's, outside __pycache__
NOT_MODEL_CODE = frozenset({"torch", "builtins"})
MAX_FILES = 20_000  # scipy, among the largest, has about 1,100


def code_roots(factory, module: torch.nn.Module, spec_module: str) -> list[str]:
    """The packages whose code the model runs: the one of ``spec_module`` (the module the
    spec names) and those of the factory (a ``functools.partial`` unwrapped) and of each
    layer class of ``module``, torch's excepted. Each is the outermost *regular* package
    holding the module (one with an ``__init__``; a namespace package's portions may come
    from anywhere on the path, so they are skipped), or the module itself."""
    while isinstance(factory, functools.partial):
        factory = factory.func
    names = {spec_module, getattr(factory, "__module__", None) or ""} | {type(m).__module__ for m in module.modules()}
    return sorted({_root(n) for n in names if n and n.split(".")[0] not in NOT_MODEL_CODE})


def _spec(name: str):
    try:
        return importlib.util.find_spec(name)
    except (ValueError, ImportError):  # a module made at run time: sys.modules holds it without a spec
        return None


def _root(name: str) -> str:
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        spec = _spec(".".join(parts[:i]))
        if spec is None or spec.origin not in (None, "namespace"):  # the first regular package or module
            return ".".join(parts[:i])
    return name


def _files(root: str) -> list[tuple[str, Path]]:
    """(name relative to the root, path) of every source file of ``root``, in name order;
    ValueError when there is none to read (a zip import, a module made at run time)."""
    spec = _spec(root)
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise ValueError(f"{root}: has no source file, so its code cannot be identified")
    origin = Path(spec.origin)
    if not spec.submodule_search_locations:  # a single-file module
        return [(origin.name, origin)]
    top = origin.parent
    out, seen = [], set()
    for d, dirs, files in os.walk(top, followlinks=True, onerror=_raise):
        dirs.sort()  # directories in name order: of two links to one directory, the first name counts
        real = os.path.realpath(d)
        if real in seen or "__pycache__" in Path(d).parts:  # a symlink loop; compiled caches
            dirs[:] = []
            continue
        seen.add(real)
        out += [(Path(d, f).relative_to(top).as_posix(), Path(d, f)) for f in files if f.endswith(SOURCE_SUFFIXES)]
        if len(out) > MAX_FILES:  # e.g. a link to /usr inside the package
            raise ValueError(f"{root}: more than {MAX_FILES} source files under {top} (a link out of the package?), "
                             "too many to identify its code")
    return sorted(out)


def _raise(e: OSError) -> None:
    """A directory the walk cannot read: an error, not a digest that depends on who runs it."""
    raise e


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
