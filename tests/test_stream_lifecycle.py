"""Lifecycle: ``riskpipe broker`` never leaves Tansu running after it dies (SIGKILL
included); ``riskpipe run --idle-exit`` counts idle time only while it holds partitions."""

import signal
import socket
import subprocess
import sys
import time

import pytest

from streamkit import alive, children

pytestmark = pytest.mark.broker


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


def test_idle_exit_waits_for_the_group_assignment(tmp_path):
    """Joining the group takes about half the session timeout on Tansu (~4 s here), longer
    than the idle limit (1.5 s): a stage counting from start-up would exit having decided
    nothing. It decides every event, then exits after 1.5 s without new ones."""
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import ledger_ids, produce, valid_events

    with EmbeddedBroker() as b:
        b.create_topics()
        produce(b.bootstrap, valid_events("idle", 6))
        ledger = str(tmp_path / "l.sqlite")
        r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--bootstrap-servers", b.bootstrap,
                            "--ledger", ledger, "--session-timeout-ms", "8000", "--heartbeat-interval-ms", "1000",
                            "--idle-exit", "1.5"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decided 6 events" in r.stderr
    assert len(ledger_ids(ledger)) == 6
