"""Helpers for stage tests against the real embedded broker."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
from kafka import KafkaConsumer, KafkaProducer

from riskpipe.stream.events import make_event
from riskpipe.stream.ports import Message, SourceBase

FAST_GROUP = {"session_timeout_ms": 2000, "heartbeat_interval_ms": 600}


def digits(n: int, offset: int = 0) -> np.ndarray:
    from riskpipe.models.digits import load_split

    X, _ = load_split("test")
    return X[offset: offset + n]


def produce(bootstrap: str, events: list, topic: str = "inferences", max_request_size: int = 1 << 20) -> None:
    """events: dicts (valid JSON events) or (value bytes, headers) tuples."""
    p = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5, max_request_size=max_request_size)
    for e in events:
        if isinstance(e, dict):
            p.send(topic, key=e["id"].encode(), value=json.dumps(e).encode())
        else:
            value, headers = e
            p.send(topic, value=value, headers=headers)
    p.flush()
    p.close()


def valid_events(prefix: str, n: int, offset: int = 0) -> list[dict]:
    return [make_event(f"{prefix}-{i}", "digits", x, upstream_risk=0.1) for i, x in enumerate(digits(n, offset))]


def consume_all(bootstrap: str, topics, expect: int | None = None, timeout: float = 30.0) -> dict[str, list]:
    """Every record on ``topics`` (from the beginning), waiting until ``expect`` arrived."""
    c = KafkaConsumer(*topics, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                      enable_auto_commit=False, group_id=None)
    out: dict[str, list] = {t: [] for t in topics}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for tp, recs in c.poll(timeout_ms=300).items():
                out[tp.topic].extend(recs)
            if expect is not None and sum(len(v) for v in out.values()) >= expect:
                # one more short poll to catch anything beyond the expected count
                for tp, recs in c.poll(timeout_ms=500).items():
                    out[tp.topic].extend(recs)
                break
    finally:
        c.close()
    return out


def run_cli(args, env=None, **kw) -> subprocess.Popen:
    kw = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw}
    return subprocess.Popen([sys.executable, "-m", "riskpipe.cli", *args], env={**os.environ, **(env or {})},
                            text=True, **kw)


def stage_args(bootstrap: str, ledger: str, *extra) -> list[str]:
    return ["run", "--bootstrap-servers", bootstrap, "--ledger", ledger, "--session-timeout-ms", "2000",
            "--heartbeat-interval-ms", "600", *extra]


def ledger_ids(path: str, kind: str = "decision") -> list[str]:
    from riskpipe.ledger import Ledger

    with Ledger(path) as led:
        return [e.entry_id for e in led.records(kind=kind)]


def ready_with_partitions(log_text: str) -> bool:
    """Whether a ``riskpipe run`` log shows its pipeline built and partitions assigned: a
    worker joins its group before it builds its pipeline (riskpipe.stream.io.EarlyJoin), so
    "partitions assigned" alone does not mean it decides anything yet."""
    return "partitions assigned: ['" in log_text and "riskpipe.status: ready: " in log_text


def children(pid: int) -> list[int]:
    """The process ids of ``pid``'s children (every thread's)."""
    out = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            out += [int(c) for c in f.read().split()]
    return out


def alive(pid: int) -> bool:
    """Running (a zombie waiting for a reaper that never comes counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def wait_for(pred, timeout: float = 60.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 30.0) -> tuple[int, str]:
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, err


class StageThread:
    """The stage in this process, on a thread (faster than a subprocess for tests)."""

    def __init__(self, config, pipeline=None, ledger=None, metrics=None):
        from riskpipe.app.compose import build_stage

        self.stage = build_stage(config, pipeline=pipeline, ledger=ledger, metrics=metrics)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        try:
            self.stage.run()
        except BaseException as e:  # noqa: BLE001
            self.error = e

    def __enter__(self):
        self.thread.start()
        return self.stage

    def __exit__(self, *exc):
        self.stage.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def policy_with(directory, base: str = "default", **changes) -> str:
    """A copy of a shipped policy with top-level sections replaced (e.g. a cheaper certifier)."""
    import yaml

    from riskpipe.app.config import default_policy_path

    src = os.path.join(os.path.dirname(default_policy_path()), f"{base}.yaml")
    with open(src, encoding="utf-8") as f:
        data = yaml.safe_load(f)
    data.update(changes)
    path = os.path.join(str(directory), f"{base}-variant.yaml")
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f)
    return path


def poisoned_tabular_pipeline(directory, poison_prefix: str = "poison"):
    """A user's tabular skops model (wine, 13 raw features) under a cheap smoothing policy,
    whose model raises for events whose id starts with ``poison_prefix`` (a poison event
    the validator cannot see). Returns (pipeline, the reference rows)."""
    from usermodels import cheap_pipeline, tabular_model

    um = tabular_model(directory)
    pipe = cheap_pipeline(directory, "wine", um)
    real = pipe.process

    def process(events, sources):
        for ev in events:
            if ev.id.startswith(poison_prefix):
                raise ArithmeticError(f"model blew up on {ev.id}")
        return real(events, sources)

    pipe.process = process
    return pipe, np.load(um.data)["X"]


def tabular_event(eid: str, x, **extra) -> dict:
    return {"id": eid, "model": "wine", "inputs": [{"name": "x", "shape": [1, len(x)], "datatype": "FP32",
                                                    "data": [float(v) for v in x]}], "upstream_risk": 0.2, **extra}


class ListSource(SourceBase):
    """Messages from memory (no broker), ``max_records`` per poll; commits are recorded."""

    def __init__(self, msgs, log: list | None = None):
        self.msgs, self.exhausted, self.log = list(msgs), False, log

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        out, self.msgs = self.msgs[:max_records], self.msgs[max_records:]
        self.exhausted = not self.msgs
        return out

    def commit(self, messages: list[Message]) -> None:
        if self.log is not None:
            self.log.append(("commit", tuple(m.offset for m in messages)))

    def close(self) -> None:
        pass


class LoggingSink:
    """Outputs to memory: ``log`` gets ("send", topic, key) per send and ("flush",) per flush."""

    def __init__(self, log: list):
        self.log = log

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None:
        self.log.append(("send", topic, key.decode() if key else None))

    def flush(self, timeout: float = 30.0) -> None:
        self.log.append(("flush",))

    def close(self) -> None:
        pass


def kill_9_then_finish(bootstrap: str, ledger: str, total: int, kill_after: int, max_events: int) -> None:
    """Run the stage CLI, SIGKILL it once ``kill_after`` ledger rows exist (and before
    ``total``), restart it and let it decide the rest; it must then stop cleanly."""
    p = run_cli(stage_args(bootstrap, ledger, "--max-events", str(max_events)))
    assert wait_for(lambda: len(ledger_ids(ledger)) >= kill_after, 120)
    rc, _ = stop(p, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert len(ledger_ids(ledger)) < total
    p = run_cli(stage_args(bootstrap, ledger))
    try:
        assert wait_for(lambda: len(ledger_ids(ledger)) >= total, 150)
    finally:
        rc, err = stop(p)
    assert rc == 0, err[-2000:]
