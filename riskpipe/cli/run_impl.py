"""The body of ``riskpipe run``, imported when the command runs (its options: riskpipe/cli/run_cmd.py)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager

import click

from riskpipe.app.config import ConfigError, load_config
from riskpipe.app.runner import default_ledger_path, die_with_parent, run_stage, run_workers
from riskpipe.cli.common import fail
from riskpipe.ledger import LedgerError
from riskpipe.metrics import StageMetrics
from riskpipe.policy import PolicyError
from riskpipe.redaction import redact
from riskpipe.stream.guard import GuardTripped
from riskpipe.stream.infra import InfrastructureUnavailable


@contextmanager
def startup_errors(config_path: str | None):
    """A policy, model entry, reference set or ledger that cannot be used ends the
    command with one line naming it (never a traceback; the composition root reports a
    reference set's ContextError as the ConfigError of its key)."""

    try:
        yield
    except PolicyError as e:
        fail(f"policy: {e}")
    except LedgerError as e:  # e.g. an unknown scheme, an unreachable PostgreSQL server
        fail(str(e))
    except ConfigError as e:
        fail(f"{config_path or 'config'}: {e}")


def run(config_path, bootstrap_servers, source, sink, policy, models, references, group_id, input_topic, metrics_port,
        ledger, no_ledger, max_events, max_wait_ms, device, certify_batch_size, create_topics, session_timeout_ms,
        heartbeat_interval_ms, workers, worker_id, idle_exit, no_metrics_server, verbose):
    _configure_logging(worker_id, verbose)
    die_with_parent()
    config = _stage_config(config_path, models, references, max_events, max_wait_ms, input_topic, certify_batch_size,
                           bootstrap_servers=bootstrap_servers, policy=policy, group_id=group_id,
                           metrics_port=metrics_port, device=device, create_topics=create_topics, worker_id=worker_id,
                           session_timeout_ms=session_timeout_ms, heartbeat_interval_ms=heartbeat_interval_ms)
    config = _with_ledger(config, ledger, no_ledger)
    if workers > 1:
        _run_workers(config, workers)
    stats = _run_one(config, config_path, source, sink, idle_exit, serve_metrics=not no_metrics_server)
    _summary(stats, config.ledger)


def _configure_logging(worker_id: str | None, verbose: int) -> None:
    # a worker of `--workers N` shares its parent's stderr: its lines carry its id
    who = f" [{worker_id.replace('%', '%%')}]" if worker_id else ""
    logging.basicConfig(level=logging.WARNING - 10 * min(verbose, 2),
                        format=f"%(asctime)s %(levelname)s{who} %(name)s: %(message)s")
    # kafka-python logs every reconnect attempt at ERROR; the stage reports broker trouble itself
    logging.getLogger("kafka").setLevel(logging.DEBUG if verbose >= 3 else logging.CRITICAL)
    # start-up facts per model and the periodic progress line, without -v (riskpipe.stream.status)
    logging.getLogger("riskpipe.status").setLevel(logging.INFO)


def _pairs(option: str, values, what: str) -> dict[str, str] | None:
    """``NAME=VALUE`` options as a mapping (None when none is given)."""
    out = {}
    for m in values:
        name, sep, value = m.partition("=")
        if not sep or not name or not value:
            fail(f"{option} {m!r}: expected NAME={what}")
        out[name] = value
    return out or None


def _stage_config(config_path, models, references, max_events, max_wait_ms, input_topic, certify_batch_size, **given):
    """The config file with the command line's values over it (``given``: the options that
    ``load_config`` takes as they are); --certify-batch-size wins over every config value."""

    model_map = _pairs("--model", models, "SPEC")
    reference_map = _pairs("--reference", references, "PATH")
    batch = {k: v for k, v in {"max_events": max_events, "max_wait_ms": max_wait_ms}.items() if v is not None}
    try:
        config = load_config(config_path, models=model_map, references=reference_map, batch=batch or None,
                             topics={"input": input_topic} if input_topic else None, **given)
    except ConfigError as e:
        fail(str(e))
    if certify_batch_size is not None:
        config = config.model_copy(update={
            "certify_batch_size": certify_batch_size,
            "models": {n: m.model_copy(update={"certify_batch_size": certify_batch_size})
                       for n, m in config.models.items()}})
    return config


def _with_ledger(config, ledger: str | None, no_ledger: bool):
    """--no-ledger, else --ledger, else the config's, else the data directory's default."""

    if no_ledger:
        return config.model_copy(update={"ledger": None})
    if not config.ledger:
        return config.model_copy(update={"ledger": ledger or default_ledger_path()})
    if ledger:
        return config.model_copy(update={"ledger": ledger})
    return config


def _worker_argv(argv: list[str]) -> list[str]:
    """This command's arguments for each worker: without --workers N / --metrics-port P
    (the parent owns them)."""
    i, cleaned = 0, []
    while i < len(argv):
        if argv[i] in ("--workers", "--metrics-port"):
            i += 2
            continue
        if argv[i].startswith(("--workers=", "--metrics-port=")):
            i += 1
            continue
        cleaned.append(argv[i])
        i += 1
    return cleaned


def _run_workers(config, workers: int) -> None:
    """Start ``workers`` processes of this command in one consumer group; exits with their
    status. The config is validated (``_stage_config`` failed fast on a bad file, field or
    value); the pipeline is the workers' to build, each while it joins the group
    (riskpipe.app.runner), so the parent never loads torch."""

    sys.exit(run_workers(workers, _worker_argv(sys.argv[2:]), config.metrics_port, config.liveness_stall_s,
                         config.metrics_addr))


def _run_one(config, config_path: str | None, source: str | None, sink: str | None, idle_exit: float | None,
             serve_metrics: bool):
    """The stage in this process, with its /metrics server when a port is configured; its stats."""

    server = None
    with startup_errors(config_path):
        metrics = StageMetrics()
        if config.metrics_port is not None and serve_metrics:
            server = metrics.serve(config.metrics_port, config.liveness_stall_s, config.metrics_addr)
            click.echo(f"metrics on {server.url}", err=True)

        try:
            return run_stage(config, source, sink, metrics=metrics, idle_exit_s=idle_exit)
        except GuardTripped as e:
            fail(f"DLQ guard tripped, stage stopped: {e}", code=3)
        except InfrastructureUnavailable as e:
            fail(str(e), code=4)
        finally:
            if server:
                server.shutdown()


def _summary(stats, ledger: str | None) -> None:
    """The closing lines on stderr: what was decided, and what was not decided anew."""
    where = f"ledger {redact(ledger)}" if ledger else "no ledger"
    click.echo(f"decided {stats.decided} events, {sum(stats.dlq.values())} to the DLQ, "
               f"{stats.duplicates} duplicates skipped; {where}", err=True)
    if stats.other_models:
        click.echo(f"{stats.other_models} events of models other stages serve (other_models) skipped", err=True)
    if stats.redelivered:
        click.echo(f"{stats.redelivered} of the decided events were already in the ledger under this run's model and "
                   "policy at the same source position: their recorded decisions were re-sent", err=True)
    for label, n in sorted(stats.earlier.items()):
        click.echo(f"{n} of the decided events were already decided under {label}; "
                   "decided anew under this run's model and policy", err=True)
    if stats.model_faults:
        click.echo(f"{stats.model_faults} of them model faults: the model's output broke its contract, so they were "
                   "not certified (reason model_fault, never allowed)", err=True)
