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

from riskpipe import json_text
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
    rows: list[np.ndarray] = []
    try:
        with open(p, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json_text.loads(line)
                except json.JSONDecodeError as e:
                    fail(f"input {path}:{lineno}: invalid JSON ({e.msg})")
                try:
                    rows.extend(_json_inputs(line, obj))
                except ValueError as e:
                    fail(f"input {path}:{lineno}: {e}")
    except UnicodeDecodeError:
        fail(f"input {path}: not UTF-8 text (use .npy or JSON lines)")
    if not rows:
        fail(f"input {path}: no inputs")
    try:
        return np.stack(rows)
    except ValueError:
        fail(f"input {path}: inputs have different shapes")


def _json_inputs(text: str, obj: object) -> np.ndarray:
    """One JSON line's inputs, as a batch: an array or an object with ``data`` is one input;
    an Open Inference Protocol event (the stage's own event format) holds as many as the
    first dimension of its first tensor's ``shape`` (``[1, *input shape]`` for one input).
    ValueError naming the field and the reason."""
    import numpy as np  # lazy: as in read_inputs

    if (why := json_text.repeated_name(text, obj)) is not None:
        raise ValueError(why)
    shape = None
    if isinstance(obj, dict):
        if "inputs" in obj:
            tensors = obj["inputs"]
            if not isinstance(tensors, list) or not tensors or not isinstance(tensors[0], dict):
                raise ValueError("inputs: expected a non-empty list of tensor objects (Open Inference Protocol)")
            for key in ("data", "shape"):
                if key not in tensors[0]:
                    raise ValueError(f"inputs[0].{key}: required field is missing")
            field, data, shape = "inputs[0].data", tensors[0]["data"], tensors[0]["shape"]
            if not isinstance(shape, list) or not all(type(d) is int for d in shape):
                raise ValueError(f"inputs[0].shape: expected a list of integers, got {json.dumps(shape)[:80]}")
        elif "data" in obj:
            field, data = "data", obj["data"]
        else:
            raise ValueError("object has neither 'inputs' nor 'data'")
    else:
        field, data = "value", obj
    try:
        a = np.asarray(data, dtype=float)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"{field}: expected an array of numbers ({e})") from None
    if shape is None:
        return a[None]
    try:
        a = a.reshape(shape)
    except ValueError as e:
        raise ValueError(f"inputs[0].shape: {e}") from None
    if a.ndim < 2:
        raise ValueError(f"inputs[0].shape: {shape}: expected [batch, *input shape]")
    return a


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
