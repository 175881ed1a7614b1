"""Run stage workers: what ``riskpipe run`` does once the config is validated
(the stage itself is built by riskpipe.app.compose)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from riskpipe.app.compose import build_stage, open_ledger
from riskpipe.metrics import mark_worker_dead, serve
from riskpipe.paths import data_dir
from riskpipe.stream.io import fresh_outputs

log = logging.getLogger("riskpipe.stream")


def default_ledger_path() -> str:
    return str(data_dir() / "ledger.sqlite")


def run_stage(config, source: str | None = None, sink: str | None = None, metrics=None, idle_exit_s=None,
              install_signals: bool = True, on_record=None, pipeline=None):
    """Run one stage worker until stopped; returns its Stats. Everything is built by
    the composition root (riskpipe.app.compose) from ``config``."""

    if sink and sink.startswith("jsonl:"):  # a fresh run replaces earlier output files

        t = config.topics
        fresh_outputs(sink[len("jsonl:"):], [t.decisions, t.review, t.audit, t.dlq])
    ledger = open_ledger(config)
    try:
        stage = build_stage(config, source=source, sink=sink, pipeline=pipeline, ledger=ledger, metrics=metrics,
                            on_record=on_record)
        if install_signals:
            stage.install_signal_handlers()
        return stage.run(idle_exit_s=idle_exit_s)
    finally:
        if ledger is not None:
            ledger.close()


def run_workers(n: int, argv: list[str], metrics_port: int | None, metrics_addr: str = "127.0.0.1") -> int:
    """Start ``n`` worker processes of ``riskpipe run`` in one consumer group and serve
    their aggregated metrics (prometheus_client multiprocess mode) from this process."""

    mp_dir = tempfile.mkdtemp(prefix="riskpipe-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir}
    procs = [subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "run", *argv, "--workers", "1",
                               "--worker-id", f"w{i}", "--no-metrics-server"], env=env) for i in range(n)]
    server = None
    if metrics_port is not None:
        server = serve(metrics_port, metrics_addr)
        log.info("metrics of %d workers on %s", n, server.url)

    def forward(signum, frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(0.2)

        for p in procs:
            mark_worker_dead(p.pid)
            rc = rc or p.returncode
    finally:
        if server:
            server.shutdown()
    return rc
