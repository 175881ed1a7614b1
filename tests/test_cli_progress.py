"""Long commands show progress on a terminal and stay quiet when stderr is not one (a pipe,
a file, CI): certify and compare draw a bar over their inputs, ledger verify and report a
ticking line for the step that reports no progress of its own."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import numpy as np

from ledger_records import build_ledger


def _on_a_terminal(args: list[str], timeout: float = 240.0) -> tuple[int, str]:
    """Run ``riskpipe ARGS`` with stderr on a pseudo-terminal; (exit code, what the terminal saw)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=slave, stdin=subprocess.DEVNULL)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            seen += chunk
        elif proc.poll() is not None:
            break
    os.close(master)
    return proc.wait(timeout=30), seen.decode("utf-8", "replace")


def _piped(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "riskpipe.cli", *args], capture_output=True, text=True, timeout=240)


def test_ledger_verify_ticks_on_a_terminal_only(tmp_path):
    build_ledger(tmp_path / "l.db", n=2000)
    from riskpipe.ledger import Ledger

    with Ledger(tmp_path / "l.db") as led:
        rows = led.count()
    code, tty = _on_a_terminal(["ledger", "verify", str(tmp_path / "l.db")])
    assert code == 0 and f"verifying {rows:,} rows of /" in tty, tty
    piped = _piped(["ledger", "verify", str(tmp_path / "l.db")])
    assert piped.returncode == 0 and piped.stderr == "" and piped.stdout.startswith(f"ok: {rows} rows")


def test_certify_draws_a_bar_on_a_terminal_only(tmp_path):
    X = np.random.default_rng(0).random((6, 1, 8, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", X)
    args = ["certify", "--input", str(tmp_path / "x.npy"), "--mode", "decide", "--max-samples", "500",
            "--output", str(tmp_path / "out.jsonl")]
    code, tty = _on_a_terminal(args)
    assert code == 0 and "certify (smoothing, decide)" in tty and "6/6" in tty, tty
    piped = _piped(args)
    assert piped.returncode == 0 and piped.stderr == ""


def test_compare_counts_every_input_each_family_certifies():
    from riskpipe.compare import CompareConfig, run_compare

    counted: dict[str, list[int]] = {}

    class Bar:
        def __init__(self, total, desc):
            self.desc = desc
            counted[desc] = [total, 0]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return None

        def update(self, n):
            counted[self.desc][1] += n

    cfg = CompareConfig(models=("demo:digits-ibp",), limit=12, n_samples=50, n0=8, timing_inputs=1,
                        batch_sizes=(1,), widths=(4,), pgd_steps=2)
    run_compare(cfg, bar=Bar)
    assert counted == {"smoothing": [12, 12], "ibp": [12, 12], "lipschitz": [12, 12]}
