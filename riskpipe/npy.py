"""Reading .npy / .npz files without trusting their headers.

An .npy header declares the array's shape and dtype, and numpy allocates that much
before it reads the data: a 200-byte file whose header says (40_000_000_000,) float32
asks for 160 GB (a MemoryError traceback, or the machine swapping). So every array is
checked first with ``numpy.lib.format``'s own header reader: the declared size must be
exactly what the file (or the .npz member, uncompressed) holds after its header, no
object dtype, and at most ``max_bytes`` (half of this machine's memory by default).
Errors are ``ValueError``s naming the file, the member and the reason.
"""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import numpy as np
from numpy.lib import format as npformat


def memory_limit() -> int:
    """Half of the physical memory: no single array read may need more."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not Linux
        return 8 << 30


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n >= 1e8 else f"{n} bytes"


def check_header(f, data_bytes_after_header, where: str, max_bytes: int) -> None:
    """Read the .npy header from ``f`` (positioned at the start) and check it against
    ``data_bytes_after_header(header_length)``; ValueError naming ``where``."""
    try:
        version = npformat.read_magic(f)
        # 3.0 differs from 2.0 only in utf-8 field names, which do not change the item size
        read = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0,
                (3, 0): npformat.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"unknown format version {version}")
        shape, _fortran, dtype = read(f)
    except (ValueError, SyntaxError, UnicodeDecodeError, EOFError) as e:
        raise ValueError(f"{where}: not a readable .npy file ({e})") from None
    if dtype.hasobject:
        raise ValueError(f"{where}: dtype {dtype} holds Python objects; only plain arrays are read")
    declared = math.prod(shape) * dtype.itemsize
    if declared > max_bytes:
        raise ValueError(f"{where}: header declares shape {shape} of {dtype} = {_gb(declared)}, over the "
                         f"{_gb(max_bytes)} limit (half of this machine's memory); refused before reading")
    held = data_bytes_after_header(f.tell())
    if declared != held:
        raise ValueError(f"{where}: header declares shape {shape} of {dtype} = {_gb(declared)} but the file holds "
                         f"{_gb(held)} of data; refused before reading")


def check_file(path: str | Path, max_bytes: int | None = None) -> None:
    """Check every array of the .npy or .npz file at ``path`` before numpy reads it."""
    limit = memory_limit() if max_bytes is None else max_bytes
    path = Path(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            total = 0
            for info in zf.infolist():
                if not info.filename.endswith(".npy"):
                    continue
                with zf.open(info) as f:
                    check_header(f, lambda n, info=info: info.file_size - n, f"{path}: member {info.filename}",
                                 limit - total)
                total += info.file_size
        return
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        check_header(f, lambda n: size - n, str(path), limit)


def load_npz(path: str | Path, max_bytes: int | None = None):
    """``np.load(path, allow_pickle=False)`` of an .npz archive of named arrays, after
    ``check_file``: ValueError for a single .npy array, which every caller would otherwise
    meet as a TypeError (``with`` on an ndarray) or a missing ``files``."""
    check_file(path, max_bytes)
    z = np.load(path, allow_pickle=False)
    if not isinstance(z, np.lib.npyio.NpzFile):
        raise ValueError(f"{path}: a single .npy array, not an .npz archive of named arrays (np.savez(path, X=..., "
                         "y=...))")
    return z
