"""``riskpipe run``: the streaming stage (Kafka, or JSON-lines files offline)."""

from __future__ import annotations

import click

from riskpipe.cli.params import Endpoint, FiniteFloat


@click.command()
@click.option("--config", "config_path", default=None, help="Stage config YAML (deploy/riskpipe.yaml).")
@click.option("--bootstrap-servers", default=None, help="Kafka bootstrap servers (host:port,...).")
@click.option("--source", default=None, type=Endpoint(),
              help="jsonl:PATH to read events from a file instead of Kafka (kafka: the default).")
@click.option("--sink", default=None, type=Endpoint(),
              help="jsonl:DIR to write outputs to files instead of Kafka (kafka: the default).")
@click.option("--policy", default=None, help="Policy YAML (default policies/default.yaml).")
@click.option("--model", "models", multiple=True, help="NAME=SPEC, repeatable (default digits=demo:digits).")
@click.option("--reference", "references", multiple=True,
              help="NAME=PATH, repeatable: the model's reference set (.npz with X and optional y).")
@click.option("--group-id", default=None)
@click.option("--input-topic", default=None)
@click.option("--metrics-port", type=int, default=None,
              help="Serve /metrics and /healthz on PORT (address: metrics_addr, default 127.0.0.1).")
@click.option("--ledger", default=None, help="Ledger path (default: ledger.sqlite in the data directory).")
@click.option("--no-ledger", is_flag=True, help="Do not write a ledger (use `riskpipe ledger ingest`).")
@click.option("--max-events", type=int, default=None, help="Micro-batch size.")
@click.option("--max-wait-ms", type=int, default=None, help="Micro-batch latency budget.")
@click.option("--device", default=None)
@click.option("--certify-batch-size", type=click.IntRange(min=1), default=None,
              help="Noise samples per model call for every model (default: probed per model at start-up, cached).")
@click.option("--create-topics", is_flag=True, default=None, help="Create missing topics (embedded broker).")
@click.option("--session-timeout-ms", type=int, default=None,
              help="Consumer-group session timeout (default: 10000, 2000 on the embedded broker).")
@click.option("--heartbeat-interval-ms", type=int, default=None,
              help="Consumer-group heartbeat interval (default: 3000, 500 on the embedded broker).")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True,
              help="Worker processes in one consumer group.")
@click.option("--worker-id", default=None)
@click.option("--idle-exit", type=FiniteFloat(0, closed=True), default=None,
              help="Exit after this many seconds without input.")
@click.option("--no-metrics-server", is_flag=True, hidden=True)
@click.option("-v", "--verbose", count=True)
def run(**options):
    """Run the stage: validate, certify, score and route every inference event."""
    from riskpipe.cli import run_impl  # lazy: the body's imports (torch, kafka, ...) stay off --help

    run_impl.run(**options)
