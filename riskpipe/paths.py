"""Where riskpipe keeps per-user files (model cache and data directory), how it
writes a file that others may be reading (``atomic_write``), and how a command checks
the directory it will write a report into before the work that makes the report
(``check_out_dir``).

``RISKPIPE_CACHE_DIR`` and ``RISKPIPE_DATA_DIR`` override the defaults
(``$XDG_CACHE_HOME/riskpipe`` and ``$XDG_DATA_HOME/riskpipe``).
"""

from __future__ import annotations

import errno
import itertools
import os
import secrets
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any


def _user_dir(override: str, xdg: str, fallback: str) -> Path:
    root = os.environ.get(override) or os.path.join(os.environ.get(xdg) or os.path.expanduser(fallback), "riskpipe")
    p = Path(root)
    p.mkdir(parents=True, exist_ok=True)
    return p


def cache_dir() -> Path:
    return _user_dir("RISKPIPE_CACHE_DIR", "XDG_CACHE_HOME", "~/.cache")


def data_dir() -> Path:
    return _user_dir("RISKPIPE_DATA_DIR", "XDG_DATA_HOME", "~/.local/share")


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """A new file beside ``path`` to write (``mode`` "wb" or "w"); on a clean exit it is
    flushed, fsynced and renamed over ``path`` (``os.replace``), so a reader, another
    process filling the same cache, or a crash sees the old file or the whole new one,
    never a part. On an error the temporary file is removed and ``path`` is untouched.

    The temporary name is unique per process and call, and the file is created like
    ``open`` creates one (permissions from the umask). The parent must exist. Hand-written:
    the library that did this (``atomicwrites``) is archived."""
    if mode not in ("wb", "w"):
        raise ValueError(f"mode: 'wb' or 'w', got {mode!r}")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    f = open(tmp, mode.replace("w", "x"), encoding=encoding)  # x: never someone else's file
    try:
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


MAX_TEXT_FILE = 16 << 20  # a config, a policy, a key, published checkpoints: far below this


def read_small_bytes(path: str | os.PathLike, limit: int = MAX_TEXT_FILE) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them, as they are (no
    newline translation). OSError for anything else (a FIFO or a device: opened without
    blocking and refused, never read; a larger file: refused before it is all in memory).
    ``/dev/zero`` given as a policy read forever."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit >> 20} MiB")
    return data


def read_small_text(path: str | os.PathLike, limit: int = MAX_TEXT_FILE) -> str:
    """The UTF-8 text of ``read_small_bytes(path, limit)``; UnicodeDecodeError for bytes
    that are not UTF-8."""
    return read_small_bytes(path, limit).decode("utf-8")


def read_text(path: str | os.PathLike, what: str, error: type[Exception] = ValueError) -> str:
    """A UTF-8 text file the user named with ``what`` (a flag or config key); ``error``
    naming both for a file that cannot be read or is not UTF-8 text."""
    try:
        return read_small_text(path)
    except OSError as e:
        raise error(f"{what} {path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise error(f"{what} {path}: not UTF-8 text") from None


class OutDirError(ValueError):
    """A report directory that cannot take the report: the message names it and says why."""


def _entries(root: Path) -> Iterator[str]:
    """Every file under ``root`` (and every link to a directory, which is not entered), as a
    path relative to it with ``/``; the top level first."""
    for dirpath, dirnames, filenames in os.walk(root):
        links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(filenames) + links:
            yield Path(dirpath, name).relative_to(root).as_posix()


def _writable(directory: Path) -> None:
    """OSError unless a file can be made in ``directory`` (a probe, not ``os.access``:
    a read-only file system, or root's rights, are what the probe finds)."""
    with tempfile.TemporaryFile(dir=directory):
        pass


def check_out_dir(path: str | os.PathLike, owned: Callable[[str], bool], what: str) -> Path:
    """Check ``path`` can take ``what`` (a report: "an earlier riskpipe evaluate report")
    before the work that makes it, rather than fail after it: a directory that exists or can
    be made there, files can be written in, and that holds nothing but files for which
    ``owned`` (a path relative to it, with ``/``) is true, which the report may replace.
    OutDirError naming ``path`` and the reason; the directory is made when the report is
    written."""
    out = Path(path)
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise OutDirError(f"{out}: exists and is not a directory")
        where = out
    else:
        where = out.parent
        while not (where.exists() or where.is_symlink()):
            where = where.parent
        if not where.is_dir():
            raise OutDirError(f"{out}: cannot be made: {where} is not a directory")
    try:
        _writable(where)
    except OSError as e:
        raise OutDirError(f"{out}: cannot write in {where} ({e.strerror or e})") from None
    if where is out:
        foreign = list(itertools.islice((rel for rel in _entries(out) if not owned(rel)), 4))
        if foreign:
            listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
            raise OutDirError(f"{out}: holds files that are not {what} ({listed}); give a new or empty "
                              "directory, or move them")
    return out


def remove_stale(out: Path, written: Iterable[Path], report_file: Callable[[str], bool]) -> list[Path]:
    """Remove the files of an earlier report under ``out`` (``report_file`` of the path
    relative to it) that this one did not write again: a figure of a policy no longer
    evaluated, a format not asked for this time. A report directory holds one run's report,
    never a mix of two. Returns the paths removed."""
    keep = {Path(p).relative_to(out).as_posix() for p in written}
    removed = []
    for rel in list(_entries(out)):
        if report_file(rel) and rel not in keep:
            (out / rel).unlink()
            removed.append(out / rel)
    return removed
