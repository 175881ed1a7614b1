"""``riskpipe broker`` never leaves Tansu running after it dies, SIGKILL included."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.broker


def children(pid: int) -> list[int]:
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_sigkill_of_riskpipe_broker_takes_tansu_down():
    p = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "broker", "--no-topics"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("bootstrap: 127.0.0.1:"), line
        port = int(line.split(":")[-1])
        tansu = [c for c in children(p.pid) if "tansu" in open(f"/proc/{c}/cmdline").read()]
        assert len(tansu) == 1 and alive(tansu[0]) and not port_free(port)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and (alive(tansu[0]) or not port_free(port)):
            time.sleep(0.1)
        assert not alive(tansu[0]), "Tansu outlived riskpipe broker"
        assert port_free(port)
    finally:
        if p.poll() is None:
            p.kill()
