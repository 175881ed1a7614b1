"""Helpers shared by subcommands: one-line errors, input files."""

from __future__ import annotations

import json
import shutil
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click
from tqdm import tqdm

from riskpipe.redaction import redact

if TYPE_CHECKING:

    import numpy as np


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``riskpipe: error: message`` on stderr and exit non-zero (no traceback, no secret)."""

    click.echo(f"riskpipe: error: {redact(message)}", err=True)
    sys.exit(code)


def on_terminal() -> bool:
    """Progress is drawn only for a person at a terminal: quiet in pipes, files and CI logs."""
    return sys.stderr.isatty()


def _size() -> dict:
    """tqdm's ncols/nrows from the terminal; 100 x 24 when it reports 0 (a terminal that never
    set its size, e.g. under `script`), where tqdm would draw nothing."""

    cols, rows = shutil.get_terminal_size((100, 24))
    return {"ncols": cols or 100, "nrows": rows or 24}


def progress_bar(total: int | None, desc: str, unit: str = "input"):
    """A tqdm bar on stderr, disabled when stderr is not a terminal. The finished bar stays
    on the terminal (its final count, e.g. 6/6, is drawn at close however fast the work was)."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not on_terminal(), file=sys.stderr, leave=True,
                **_size())


class working:
    """``with working("verifying 1,204,113 rows"):`` a ticking elapsed-time line on a terminal
    for a step that reports no progress of its own; nothing when stderr is not a terminal."""

    def __init__(self, desc: str, interval_s: float = 0.5) -> None:
        self.desc, self.interval_s = desc, interval_s
        self._thread: threading.Thread | None = None

    def __enter__(self) -> working:
        if on_terminal():
            self._bar = tqdm(total=None, desc=self.desc, bar_format="{desc} ({elapsed})", file=sys.stderr,
                             leave=False, **_size())
            self._stop = threading.Event()

            def tick() -> None:
                while not self._stop.wait(self.interval_s):
                    self._bar.refresh()

            self._thread = threading.Thread(target=tick, name="riskpipe-working", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=2)
            self._bar.close()


def read_inputs(path: str) -> np.ndarray:
    """Inputs from a .npy file or JSON lines (one array, or an object with ``data``
    or Open Inference Protocol ``inputs``, per line)."""
    # lazy: every command imports this module; numpy loads only for those that read inputs
    import numpy as np

    p = Path(path)
    if not p.is_file():
        fail(f"input {path}: file not found")
    if p.suffix == ".npy":
        from riskpipe import npy  # lazy: as numpy above

        try:
            npy.check_file(p)
        except (ValueError, OSError) as e:
            fail(f"input {e}" if str(e).startswith(str(p)) else f"input {path}: {e}")
        try:
            a = np.load(p, allow_pickle=False)
        except Exception as e:  # noqa: BLE001 - any unreadable file is a user error
            fail(f"input {path}: not a readable .npy file ({type(e).__name__})")
        return a
    rows = []
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"input {path}:{lineno}: invalid JSON ({e.msg})")
                if isinstance(obj, dict):
                    if obj.get("inputs"):
                        t = obj["inputs"][0]
                        obj = np.asarray(t.get("data"), dtype=float).reshape(t.get("shape", [-1]))
                    elif "data" in obj:
                        obj = obj["data"]
                    else:
                        fail(f"input {path}:{lineno}: object has neither 'inputs' nor 'data'")
                rows.append(np.asarray(obj, dtype=float))
    except UnicodeDecodeError:
        fail(f"input {path}: not UTF-8 text (use .npy or JSON lines)")
    except ValueError as e:
        fail(f"input {path}: {e}")
    if not rows:
        fail(f"input {path}: no inputs")
    try:
        return np.stack(rows)
    except ValueError:
        fail(f"input {path}: inputs have different shapes")


def public_key_option(help: str, required: bool = False):
    """``--public-key`` as every command that checks ledger signatures takes it: Ed25519
    PEM files, repeatable (key rotation); read them with ``read_public_keys``."""
    return click.option("--public-key", "public_keys", multiple=True, required=required,
                        type=click.Path(dir_okay=False), help=help)


def read_public_keys(paths: tuple[str, ...]) -> list:
    """The keys ``--public-key`` names; one line and exit 2 on one that cannot be read."""
    # lazy: every command imports this module; the ledger package loads only for those that check signatures
    from riskpipe.ledger import LedgerError
    from riskpipe.ledger.checkpoint import load_public_key

    try:
        return [load_public_key(k) for k in paths]
    except LedgerError as e:
        fail(str(e))
