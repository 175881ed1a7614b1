"""`riskpipe run --workers N`: a worker killed with SIGKILL mid-stream (the OOM killer)."""

from __future__ import annotations

import json
import os
import signal
import subprocess

import numpy as np
import pytest

from riskpipe.stream.broker import EmbeddedBroker
from streamkit import consume_all, ledger_ids, policy_with, produce, run_cli, stage_args, stop, tabular_event, wait_for
from usermodels import tabular_model

pytestmark = pytest.mark.broker


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


def test_a_worker_killed_with_sigkill_is_reported_and_started_again_and_nothing_is_lost(tmp_path):
    um = tabular_model(tmp_path)
    policy = policy_with(tmp_path, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                              "max_samples": 200})
    X = np.load(um.data)["X"]
    events = [tabular_event(f"k-{i}", X[i % len(X)]) for i in range(120)]
    ledger = str(tmp_path / "l.db")
    log = tmp_path / "run.log"
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=4)
        b.create_topics()
        p = run_cli(stage_args(b.bootstrap, ledger, "--workers", "2", "--model", f"wine={um.spec}", "--reference",
                               f"wine={um.data}", "--policy", policy, "--max-events", "4", "-v"),
                    stderr=log.open("w"))
        try:
            assert wait_for(lambda: log.read_text().count("ready: ") >= 2, 180), log.read_text()[-2000:]
            produce(b.bootstrap, events[:60])
            assert wait_for(lambda: len(ledger_ids(ledger)) >= 20, 120)
            victim = _children(p.pid)[0]
            os.kill(victim, signal.SIGKILL)
            produce(b.bootstrap, events[60:])
            assert wait_for(lambda: "was killed by SIGKILL; starting it again" in log.read_text(), 30)
            # started again: two workers again, and it reads events once more
            assert wait_for(lambda: len(_children(p.pid)) == 2 and victim not in _children(p.pid), 30)
            assert wait_for(lambda: log.read_text().count("ready: ") >= 3, 180)
            assert wait_for(lambda: len(ledger_ids(ledger)) >= 120, 180)
        finally:
            rc, _ = stop(p, timeout=90)
        assert rc == 0, log.read_text()[-3000:]  # SIGTERM: both workers drained and exited 0
        ids = ledger_ids(ledger)
        assert len(ids) == len(set(ids)) == 120  # each decided once
        out = consume_all(b.bootstrap, ["decisions"], expect=120)
        assert {json.loads(m.value)["id"] for m in out["decisions"]} == {e["id"] for e in events}
    assert "Traceback" not in log.read_text()
