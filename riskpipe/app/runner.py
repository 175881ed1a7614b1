"""Run stage workers: what ``riskpipe run`` does once the config is validated
(the stage itself is built by riskpipe.app.compose).

Start-up order (issue 21: a group of workers forms in seconds, not after every worker has
loaded torch): a Kafka stage joins its consumer group first, holding its partitions
paused (``riskpipe.stream.io.EarlyJoin``), then imports the composition root and builds
the pipeline; it reads its first event only once the pipeline is ready. ``run_workers``
starts the workers at once: it builds nothing itself, so this module imports no torch.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

from riskpipe.metrics import mark_worker_dead, serve
from riskpipe.paths import data_dir
from riskpipe.stream.broker import create_topics
from riskpipe.stream.io import EarlyJoin, fresh_outputs

log = logging.getLogger("riskpipe.stream")


def default_ledger_path() -> str:
    return str(data_dir() / "ledger.sqlite")


def run_stage(config, source: str | None = None, sink: str | None = None, metrics=None, idle_exit_s=None,
              install_signals: bool = True, on_record=None, pipeline=None):
    """Run one stage worker until stopped; returns its Stats. Everything is built by
    the composition root (riskpipe.app.compose) from ``config``."""

    if sink and sink.startswith("jsonl:"):  # a fresh run replaces earlier output files
        fresh_outputs(sink[len("jsonl:"):], config.topics.outputs)
    joined = join_early(config) if source is None and pipeline is None else None
    ledger = None
    try:
        # lazy: torch, the models and reference sets load here, while the consumer joins its group (module docstring)
        from riskpipe.app.compose import build_stage, open_ledger

        ledger = open_ledger(config)
        stage = build_stage(config, source=source, sink=sink, pipeline=pipeline, ledger=ledger, metrics=metrics,
                            on_record=on_record, joined=joined)
        if install_signals:
            stage.install_signal_handlers()
        return stage.run(idle_exit_s=idle_exit_s)
    finally:
        if joined is not None:
            joined.close()  # leaves the group when the stage never took the source (a start-up error)
        if ledger is not None:
            ledger.close()


def join_early(config) -> EarlyJoin | None:
    """The Kafka source, joining its group now (held: nothing is read before the stage
    runs); None when the broker cannot be reached yet: the stage then opens its source
    itself and rides out the outage as it does at any time."""
    try:
        if config.create_topics:  # as riskpipe.app.compose.source_factory: topics first
            create_topics(config.kafka(), config.topics.all)
        return EarlyJoin(config)
    except Exception as e:  # noqa: BLE001 - joining early is only a head start; the stage handles the broker
        log.info("could not join group %s before building the pipeline: %s", config.group_id, e)
        return None


def run_workers(n: int, argv: list[str], metrics_port: int | None, metrics_addr: str = "127.0.0.1") -> int:
    """Start ``n`` worker processes of ``riskpipe run`` in one consumer group and serve
    their aggregated metrics (prometheus_client multiprocess mode) from this process.
    Their stderr comes through this process's (``_relay``)."""

    mp_dir = tempfile.mkdtemp(prefix="riskpipe-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir}
    procs = [subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "run", *argv, "--workers", "1",
                               "--worker-id", f"w{i}", "--no-metrics-server"], env=env, stderr=subprocess.PIPE,
                              text=True, errors="replace") for i in range(n)]
    errors: set[str] = set()
    lock = threading.Lock()
    relays = [threading.Thread(target=_relay, args=(p.stderr, errors, lock), daemon=True) for p in procs]
    for t in relays:
        t.start()
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
        for t in relays:
            t.join(timeout=5)
        if server:
            server.shutdown()
    return rc


def _relay(stream, errors: set[str], lock: threading.Lock) -> None:
    """A worker's stderr, line by line, to this process's. Each worker builds its own
    pipeline, so a configuration the build refuses (a model entry, a reference set) fails
    every worker alike: an error line (``riskpipe: error: ...``) is printed once."""
    for line in stream:
        with lock:
            if line.startswith("riskpipe: error: "):
                if line in errors:
                    continue
                errors.add(line)
            sys.stderr.write(line)
            sys.stderr.flush()
