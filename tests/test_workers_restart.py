"""`riskpipe run --workers N`: a worker killed with SIGKILL mid-stream (the OOM killer)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from riskpipe.stream.broker import EmbeddedBroker
from streamkit import (
    alive,
    children,
    consume_all,
    ledger_ids,
    policy_with,
    produce,
    run_cli,
    stage_args,
    stop,
    tabular_event,
    wait_for,
)
from usermodels import tabular_model

pytestmark = pytest.mark.broker


def _wine_stage(tmp_path, prefix: str, n: int):
    """A user's tabular model, a cheap smoothing policy and ``n`` events for it."""
    um = tabular_model(tmp_path)
    policy = policy_with(tmp_path, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                              "max_samples": 200})
    X = np.load(um.data)["X"]
    return um, policy, [tabular_event(f"{prefix}-{i}", X[i % len(X)]) for i in range(n)]


def test_a_worker_killed_with_sigkill_is_reported_and_started_again_and_nothing_is_lost(tmp_path):
    um, policy, events = _wine_stage(tmp_path, "k", 120)
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
            victim = children(p.pid)[0]
            os.kill(victim, signal.SIGKILL)
            produce(b.bootstrap, events[60:])
            assert wait_for(lambda: "was killed by SIGKILL; starting it again" in log.read_text(), 30)
            # started again: two workers again, and it reads events once more
            assert wait_for(lambda: len(children(p.pid)) == 2 and victim not in children(p.pid), 30)
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


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_the_workers_of_a_parent_killed_with_sigkill_stop_cleanly_with_it(tmp_path):
    """A SIGKILLed parent (OOM killer, kill -9) left its workers running as orphans,
    consuming beside the workers of a parent started in its place. Now each worker is
    sent SIGTERM by the kernel when its parent ends and stops as it does on SIGTERM:
    every event it took decided once, committed; a new run decides the rest, nothing twice."""
    um, policy, events = _wine_stage(tmp_path, "o", 80)
    ledger = str(tmp_path / "l.db")
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=4)
        b.create_topics()
        args = stage_args(b.bootstrap, ledger, "--workers", "2", "--model", f"wine={um.spec}", "--reference",
                          f"wine={um.data}", "--policy", policy, "--max-events", "4", "-v")
        log = tmp_path / "run.log"
        p = run_cli(args, stderr=log.open("w"))
        workers: list[int] = []
        try:
            assert wait_for(lambda: log.read_text().count("ready: ") >= 2, 180), log.read_text()[-2000:]
            workers = children(p.pid)
            assert len(workers) == 2
            produce(b.bootstrap, events[:40])
            assert wait_for(lambda: len(ledger_ids(ledger)) >= 8, 120)
            p.kill()  # SIGKILL: the parent cannot forward anything
            p.wait(timeout=10)
            assert wait_for(lambda: not any(alive(w) for w in workers), 60), [w for w in workers if alive(w)]
        finally:
            stop(p)
            for w in workers:  # orphans, if they outlived it (by pid: they are no longer its children)
                if alive(w):
                    os.kill(w, signal.SIGKILL)
        # a new run in the parent's place decides the rest; nothing is decided twice. It reads
        # as a group of its own, from the start: on Tansu a member joining the group the killed
        # workers had just left was once never assigned a partition (no decision in 180 s, a
        # broker quirk, not the stage's); read from the start, every event the workers decided
        # is found in the ledger as the same message and only its outputs are sent again
        produce(b.bootstrap, events[40:])
        log2 = tmp_path / "run2.log"
        p2 = run_cli(stage_args(b.bootstrap, ledger, "--model", f"wine={um.spec}", "--reference", f"wine={um.data}",
                                "--policy", policy, "--max-events", "4", "--group-id", "riskpipe-after", "-v"),
                     stderr=log2.open("w"))
        try:
            assert wait_for(lambda: len(set(ledger_ids(ledger))) >= 80, 180), log2.read_text()[-2000:]
        finally:
            rc, _ = stop(p2, timeout=90)
        assert rc == 0
        ids = ledger_ids(ledger)
        assert len(ids) == len(set(ids)) == 80
