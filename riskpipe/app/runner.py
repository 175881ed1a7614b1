"""Run stage workers: what ``riskpipe run`` does once the config is validated
(the stage itself is built by riskpipe.app.compose).

Start-up order (issue 21: a group of workers forms in seconds, not after every worker has
loaded torch): a Kafka stage joins its consumer group first, holding its partitions
paused (``riskpipe.stream.io.EarlyJoin``), then imports the composition root and builds
the pipeline; it reads its first event only once the pipeline is ready. ``run_workers``
starts the workers at once: it builds nothing itself, so this module imports no torch.
"""

from __future__ import annotations

import ctypes
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
from riskpipe.stream.watchdog import EXIT_MODEL_TIMEOUT

log = logging.getLogger("riskpipe.stream")


def default_ledger_path() -> str:
    return str(data_dir() / "ledger.sqlite")


def run_stage(config, source: str | None = None, sink: str | None = None, metrics=None, idle_exit_s=None,
              install_signals: bool = True, on_record=None, pipeline=None):
    """Run one stage worker until stopped; returns its Stats. Everything is built by
    the composition root (riskpipe.app.compose) from ``config``."""

    if sink and sink.startswith("jsonl:"):  # a fresh run replaces earlier output files
        fresh_outputs(sink[len("jsonl:"):], config.topics.outputs)
    joined = join_early(config, sink) if source is None and pipeline is None else None
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


def join_early(config, sink: str | None = None) -> EarlyJoin | None:
    """The Kafka source, joining its group now (held: nothing is read before the stage
    runs); None when the broker cannot be reached yet: the stage then opens its source
    itself and rides out the outage as it does at any time."""
    try:
        if config.create_topics:  # as riskpipe.app.compose.source_factory: topics first
            create_topics(config.kafka(), config.topics_to_create(sink))
        return EarlyJoin(config)
    except Exception as e:  # noqa: BLE001 - joining early is only a head start; the stage handles the broker
        log.info("could not join group %s before building the pipeline: %s", config.group_id, e)
        return None


PARENT_ENV = "RISKPIPE_WORKERS_PARENT"  # set by run_workers for its workers: the parent's pid


def die_with_parent() -> None:
    """In a worker of ``run --workers N`` (``PARENT_ENV`` set): have the kernel send this
    process SIGTERM when its parent ends, however it ends (Linux ``PR_SET_PDEATHSIG``), so
    the worker stops cleanly (its batch finished, committed, the ledger's rows signed).

    Why: the parent forwards SIGTERM and SIGINT, but a parent that is SIGKILLed (the OOM
    killer, ``kill -9``, a container runtime's timeout) left its workers running as
    orphans: supervised by no one, their metrics served by no one, and consuming beside
    the workers of the parent started in its place. Elsewhere than Linux nothing is set."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None or not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    if ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
        log.warning("this worker will not stop with its parent (prctl: %s)", os.strerror(ctypes.get_errno()))
        return
    if os.getppid() != int(parent):  # the parent ended before the setting took: stop as it would have
        os.kill(os.getpid(), signal.SIGTERM)


# a worker killed by a signal the parent did not send (the kernel's OOM killer, an
# operator's kill -9) is started again, at most this many times per worker id
WORKER_RESTARTS = 5


def run_workers(n: int, argv: list[str], metrics_port: int | None, stall_seconds: float,
                metrics_addr: str = "127.0.0.1") -> int:
    """Start ``n`` worker processes of ``riskpipe run`` in one consumer group and serve
    their aggregated metrics (prometheus_client multiprocess mode) from this process.
    Their stderr comes through this process's (``_relay``).

    A worker killed by a signal this process did not forward (SIGKILL from the OOM
    killer) is reported at once, its live gauges dropped, and started again under its
    id (``WORKER_RESTARTS`` times at most); its batch in flight was never committed, so
    the group reads it again. Before, the group went on one worker short with nothing
    said, the dead worker's frozen gauges (its partitions' lag, its last poll) stayed in
    every scrape, and the exit status was 247. A worker that exits (a configuration
    error, a tripped guard, an outage past its timeout) is not restarted. Exit status:
    the first non-zero one, 128 + N for a worker ended by signal N. A parent that is
    killed takes its workers with it (``die_with_parent``): they stop cleanly."""

    mp_dir = tempfile.mkdtemp(prefix="riskpipe-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir, PARENT_ENV: str(os.getpid())}
    errors: set[str] = set()
    lock = threading.Lock()
    relays: list[threading.Thread] = []

    def start(i: int) -> subprocess.Popen:
        p = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "run", *argv, "--workers", "1",
                              "--worker-id", f"w{i}", "--no-metrics-server"], env=env, stderr=subprocess.PIPE,
                             text=True, errors="replace")
        t = threading.Thread(target=_relay, args=(p.stderr, errors, lock), daemon=True)
        t.start()
        relays.append(t)
        return p

    procs = [start(i) for i in range(n)]
    restarts = [0] * n
    server = None
    if metrics_port is not None:
        server = serve(metrics_port, stall_seconds, metrics_addr)
        log.info("metrics of %d workers on %s", n, server.url)
    stopping = threading.Event()

    def forward(signum, frame):
        stopping.set()
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    rc = 0
    running = set(range(n))
    try:
        while running:
            time.sleep(0.2)
            for i in sorted(running):
                p = procs[i]
                if p.poll() is None:
                    continue
                mark_worker_dead(p.pid)  # its live gauges go now, not when the whole group ends
                code = p.returncode
                if (code < 0 or code == EXIT_MODEL_TIMEOUT) and not stopping.is_set() and \
                        restarts[i] < WORKER_RESTARTS:
                    restarts[i] += 1
                    why = ("exited: its model call timed out" if code == EXIT_MODEL_TIMEOUT
                           else f"was killed by {_signal_name(-code)}")
                    log.error("worker w%d (pid %d) %s; starting it again (restart %d of %d): the group reads its "
                              "uncommitted batch again", i, p.pid, why, restarts[i], WORKER_RESTARTS)
                    procs[i] = start(i)
                    continue
                if code < 0:  # a worker that exits non-zero has said why itself (one line, relayed)
                    log.error("worker w%d (pid %d) ended: killed by %s", i, p.pid, _signal_name(-code))
                running.discard(i)
                rc = rc or (128 - code if code < 0 else code)
    finally:
        for t in relays:
            t.join(timeout=5)
        if server:
            server.shutdown()
    return rc


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


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
