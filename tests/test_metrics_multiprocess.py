"""Several worker processes (`riskpipe run --workers N`): one aggregated scrape.

Workers are real processes with PROMETHEUS_MULTIPROC_DIR set before they import
prometheus_client, as the runner must start them; this process plays the parent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from riskpipe import metrics
from riskpipe.app.config import LIVENESS_STALL_S

WORKER = textwrap.dedent("""
    import os, sys
    from types import SimpleNamespace
    from riskpipe.metrics import StageMetrics
    def policy(version, sha):
        return SimpleNamespace(name="default", version=version, sha256=sha,
                               certifier=SimpleNamespace(method="smoothing"),
                               threat_model=SimpleNamespace(norm="l2"))
    i = int(sys.argv[1])
    m = StageMetrics()
    for _ in range(i + 1):
        m.event("decided")
    m.set_lag("inferences", i, 10 * (i + 1))
    m.set_broker_up(i == 0)          # worker 1 lost its broker
    m.last_poll.set(1000.0 + i)      # worker 0 polled longest ago
    m.declare({"digits": policy("1", "a" * 64)})
    if i == 1:
        m.declare({"digits": policy("2", "b" * 64)})
    print(os.getpid())
""")


def _samples(text: bytes) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def _run_workers(directory: Path, n: int) -> list[int]:
    env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(directory))
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    pids = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        pids.append(int(out))
    return pids


def test_workers_aggregate_into_one_scrape(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    pids = _run_workers(tmp_path, 2)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    s = _samples(metrics.expose())
    assert s[("riskpipe_events_total", (("outcome", "decided"),))] == 3  # 1 + 2
    assert s[("riskpipe_consumer_lag_messages", (("partition", "0"), ("topic", "inferences")))] == 10
    assert s[("riskpipe_consumer_lag_messages", (("partition", "1"), ("topic", "inferences")))] == 20
    assert s[("riskpipe_broker_up", ())] == 0             # one worker down is enough
    assert s[("riskpipe_last_poll_timestamp_seconds", ())] == 1000.0  # the stalest worker
    policy = {dict(k[1])["version"]: v for k, v in s.items() if k[0] == "riskpipe_policy_info"}
    assert policy == {"1": 1.0, "2": 1.0}                 # the mismatch alert sees both
    # worker 0 exits: its live gauges go, the counters it added stay
    metrics.mark_worker_dead(pids[0])
    s = _samples(metrics.expose())
    assert s[("riskpipe_events_total", (("outcome", "decided"),))] == 3
    assert s[("riskpipe_last_poll_timestamp_seconds", ())] == 1001.0
    assert ("riskpipe_consumer_lag_messages",
            (("partition", "0"), ("topic", "inferences"))) not in s
    policy = {dict(k[1])["version"]: v for k, v in s.items() if k[0] == "riskpipe_policy_info"}
    assert policy == {"1": 0.0, "2": 1.0}


def test_parent_serves_all_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import urllib.request

    _run_workers(tmp_path, 2)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    server = metrics.serve(0, LIVENESS_STALL_S)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5).read()
    finally:
        server.shutdown()
    assert _samples(body)[("riskpipe_events_total", (("outcome", "decided"),))] == 3


def test_env_set_after_import_is_refused(tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    with pytest.raises(RuntimeError, match="PROMETHEUS_MULTIPROC_DIR"):
        metrics.StageMetrics()
