"""Wire a stage to Kafka or files, with the ledger and metrics: what ``riskpipe run`` does."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time

from riskpipe.stream.io import JsonlSink, JsonlSource, KafkaSink, KafkaSource

log = logging.getLogger("riskpipe.stream")


def default_ledger_path() -> str:
    from riskpipe.paths import data_dir

    return str(data_dir() / "ledger.sqlite")


def open_ledger(path: str | None):
    if not path:
        return None
    from riskpipe.ledger import Ledger

    return Ledger(path)


def make_stage(config, source: str | None = None, sink: str | None = None, metrics=None, on_record=None,
               pipeline=None, ledger=None):
    """A Stage on Kafka (default) or JSON-lines files (``jsonl:PATH`` / ``jsonl:DIR``)."""
    from riskpipe.stream.offline import build_stage

    if source and source.startswith("jsonl:"):
        path = source[len("jsonl:"):]

        def make_source(on_revoke):
            return JsonlSource(path)
    else:
        from riskpipe.stream.checksum import check_kafka_crc32c

        check_kafka_crc32c(metrics)

        def make_source(on_revoke):
            if config.create_topics:  # after a broker restart (memory storage) topics are gone
                from riskpipe.stream.broker import create_topics

                t = config.topics
                create_topics(config.kafka(), [t.input, t.decisions, t.review, t.audit, t.dlq])
            return KafkaSource(config, on_revoke=on_revoke)

    if sink and sink.startswith("jsonl:"):
        from riskpipe.stream.io import fresh_outputs

        directory = sink[len("jsonl:"):]
        t = config.topics
        fresh_outputs(directory, [t.decisions, t.review, t.audit, t.dlq])

        def make_sink():
            return JsonlSink(directory)
    else:
        def make_sink():
            return KafkaSink(config)

    return build_stage(config, make_source, make_sink, ledger=ledger, metrics=metrics, on_record=on_record,
                       pipeline=pipeline)


def run_stage(config, source: str | None = None, sink: str | None = None, metrics=None, idle_exit_s=None,
              install_signals: bool = True, on_record=None, pipeline=None):
    """Run one stage worker until stopped; returns its Stats."""
    ledger = open_ledger(config.ledger)
    try:
        stage = make_stage(config, source, sink, metrics, on_record, pipeline, ledger)
        if install_signals:
            stage.install_signal_handlers()
        return stage.run(idle_exit_s=idle_exit_s)
    finally:
        if ledger is not None:
            ledger.close()


def run_workers(n: int, argv: list[str], metrics_port: int | None, metrics_addr: str = "127.0.0.1") -> int:
    """Start ``n`` worker processes of ``riskpipe run`` in one consumer group and serve
    their aggregated metrics (prometheus_client multiprocess mode) from this process."""
    import tempfile

    mp_dir = tempfile.mkdtemp(prefix="riskpipe-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = mp_dir
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": mp_dir}
    procs = [subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "run", *argv, "--workers", "1",
                               "--worker-id", f"w{i}", "--no-metrics-server"], env=env) for i in range(n)]
    server = None
    if metrics_port is not None:
        from riskpipe.metrics import serve

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
        from riskpipe.metrics import mark_worker_dead

        for p in procs:
            mark_worker_dead(p.pid)
            rc = rc or p.returncode
    finally:
        if server:
            server.shutdown()
    return rc
