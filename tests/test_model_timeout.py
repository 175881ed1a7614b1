"""A model call that never returns (riskpipe.stream.watchdog).

Before: a model stuck on one input hung the stage for ever; the liveness probe restarted
the pod onto the same uncommitted batch, which hung again: no decision for the partition,
ever, and no reason given. Now the watchdog ends the process past ``model_timeout_s``
(exit 5) with the call's events recorded as suspects in the ledger; after a restart they
are decided alone, and the one that hangs alone is dead-lettered ``model_timeout``."""

from __future__ import annotations

import json
import os
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from riskpipe.app.config import ConfigError, load_config
from riskpipe.ledger import Ledger
from riskpipe.metrics import StageMetrics
from riskpipe.stream.broker import EmbeddedBroker
from riskpipe.stream.events import make_event
from riskpipe.stream.ports import Message
from riskpipe.stream.watchdog import ALONE, BATCH, EXIT_MODEL_TIMEOUT, KIND, Suspects, Watchdog, suspect_entries
from streamkit import consume_all, produce, ready_with_partitions, run_cli, stage_args, stop, wait_for
from usermodels import fault_inputs, fault_policy

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 2.0


def test_model_timeout_s_is_checked_and_the_liveness_probe_waits_past_it():
    """/healthz lets the loop go ``model_timeout_s`` + 60 s without a poll (at least the usual
    300 s), so a hung call meets the watchdog, which names its events, before the probe."""
    assert load_config(None).model_timeout_s == 240 and load_config(None).liveness_stall_s == 300
    assert load_config(None, model_timeout_s=600).liveness_stall_s == 660
    for bad in (0, -1, "soon"):
        with pytest.raises(ConfigError, match="model_timeout_s"):
            load_config(None, model_timeout_s=bad)
    metrics = StageMetrics()
    metrics.last_poll.set(time.time() - 400)  # a certification call running for 400 s
    for stall, status in ((300.0, 503), (load_config(None, model_timeout_s=600).liveness_stall_s, 200)):
        server = metrics.serve(0, stall)
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
                got = r.status
        except urllib.error.HTTPError as e:
            got = e.code
        finally:
            server.shutdown()
        assert got == status, stall


def test_the_watchdog_records_the_calls_events_and_exits_only_past_the_timeout():
    msgs = [Message(f"v{i}".encode(), "in", 0, 10 + i) for i in range(3)]
    recorded, exits = [], []
    fired = threading.Event()
    dog = Watchdog(0.3, recorded.extend, lambda code: (exits.append(code), fired.set()))
    dog.start()
    try:
        with dog.watching("m", msgs):
            time.sleep(0.1)  # returns in time: nothing
        assert not recorded and not exits
        with dog.watching("m", msgs):
            assert fired.wait(5)
    finally:
        dog.stop()
    assert exits == [EXIT_MODEL_TIMEOUT]
    assert [(k, r["level"], r["source"]["offset"]) for k, r, _ in recorded] == [(KIND, BATCH, 10 + i) for i in range(3)]
    alone = suspect_entries(msgs[1:2], "m", 0.3)
    s = Suspects([r for _, r, _ in recorded] + [r for _, r, _ in alone])
    assert [s.level(m) for m in msgs] == [BATCH, ALONE, BATCH]
    assert s.level(Message(b"another payload", "in", 0, 11)) is None  # a position used again: not the suspect


def test_a_stage_on_a_file_exits_5_until_the_event_that_hangs_alone_is_dead_lettered(tmp_path, target):
    """The offline stage (a file source: positions ``file:PATH``) restarted as a supervisor
    would: the batch hangs (exit 5), the poison hangs alone (exit 5), then it is
    dead-lettered and every other event decided once. On SQLite and on PostgreSQL (the
    ledger replicas share): the watchdog records on a connection of its own."""
    healthy, bad = fault_inputs(6, 1)
    events = [make_event(f"ok-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(healthy)]
    events[2:2] = [make_event("poison", "m", bad[0], upstream_risk=0.1)]
    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events))
    config = tmp_path / "riskpipe.yaml"
    config.write_text(f"model_timeout_s: {TIMEOUT_S}\n")
    ledger = target
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    args = ["run", "--config", str(config), "--model", "m=usermodels:hanging_model?shape=4", "--policy",
            fault_policy(tmp_path), "--source", f"jsonl:{src}", "--sink", f"jsonl:{tmp_path / 'out'}", "--ledger",
            ledger, "--max-events", "8"]
    codes, errs = [], []
    for _ in range(4):
        p = run_cli(args, env=env)
        try:
            _, err = p.communicate(timeout=120)
        finally:
            stop(p)
        codes.append(p.returncode)
        errs.append(err)
        if p.returncode != EXIT_MODEL_TIMEOUT:
            break
    assert codes == [EXIT_MODEL_TIMEOUT, EXIT_MODEL_TIMEOUT, 0], errs
    assert "recorded as batch suspects" in errs[0] and f"file:{src}:0:2" in errs[0]
    assert "recorded as alone suspects" in errs[1] and f"file:{src}:0:2;" in errs[1]
    with Ledger(ledger) as led:
        decided = [e.record["id"] for e in led.records(kind="decision")]
        dead = [e.record for e in led.records(kind="dlq")]
        assert led.verify().ok
    assert sorted(decided) == sorted(e["id"] for e in events if e["id"] != "poison")
    assert [(d["reason"], d["source"]["offset"]) for d in dead] == [("model_timeout", 2)]
    assert "Traceback" not in "".join(errs)


@pytest.mark.broker
def test_riskpipe_run_workers_starts_a_worker_that_exits_5_again(tmp_path):
    """With --workers the parent is the supervisor: a worker whose model call timed out is
    started again (not left dead, which ran the group a worker short until every worker
    had hung); the poison ends as its dead letter and every other event is decided once."""
    healthy, bad = fault_inputs(6, 1)
    events = [make_event(f"ok-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(healthy)]
    events[2:2] = [make_event("poison", "m", bad[0], upstream_risk=0.1)]
    config = tmp_path / "riskpipe.yaml"
    config.write_text(f"model_timeout_s: {TIMEOUT_S}\n")
    ledger = str(tmp_path / "ledger.db")
    log = tmp_path / "run.log"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    with EmbeddedBroker() as b:
        b.create_topics()
        p = run_cli(stage_args(b.bootstrap, ledger, "--config", str(config), "--workers", "2", "--model",
                               "m=usermodels:hanging_model?shape=4", "--policy", fault_policy(tmp_path),
                               "--max-events", "8", "--max-wait-ms", "500", "-v"),
                    env=env, stdout=open(os.devnull, "w"), stderr=log.open("w"))
        try:
            assert wait_for(lambda: log.read_text().count("ready: ") >= 2, 180), log.read_text()[-3000:]
            produce(b.bootstrap, events)

            def done() -> bool:
                with Ledger(ledger) as led:
                    decided = {e.record["id"] for e in led.records(kind="decision")}
                    dead = [e.record["reason"] for e in led.records(kind="dlq")]
                return decided >= {e["id"] for e in events if e["id"] != "poison"} and dead == ["model_timeout"]

            assert wait_for(done, 240), log.read_text()[-3000:]
            assert p.poll() is None  # the parent runs on
            # every worker started again is up before the stop (one still loading dies of SIGTERM: 143)
            assert wait_for(lambda: (t := log.read_text()).count("ready: ") >= 2 + t.count("starting it again"), 180)
        finally:
            rc, _ = stop(p, timeout=90)
        text = log.read_text()
        assert rc == 0, text[-3000:]
        assert text.count("exited: its model call timed out; starting it again") >= 2, text[-3000:]
        with Ledger(ledger) as led:
            decided = [e.record["id"] for e in led.records(kind="decision")]
        assert sorted(decided) == sorted(e["id"] for e in events if e["id"] != "poison")  # each once


def _supervise(args, env, log: Path, done, exits: list[tuple[int, float]], limit: int = 4):
    """Run the stage as a supervisor would: start it again whenever it exits 5, until
    ``done()``; ``exits`` gets (status, when) of each exit. Returns the running process."""
    for _ in range(limit):
        p = run_cli(args, env=env, stdout=open(os.devnull, "w"), stderr=log.open("a"))
        if not wait_for(lambda p=p: p.poll() is not None or done(), 240):
            stop(p, timeout=30)
            pytest.fail(f"neither exited nor done: {log.read_text()[-3000:]}")
        if p.poll() is None:
            return p
        exits.append((p.returncode, time.monotonic()))
        assert p.returncode == EXIT_MODEL_TIMEOUT, log.read_text()[-3000:]
    pytest.fail(f"still exiting after {limit} starts: {log.read_text()[-3000:]}")


@pytest.mark.broker
def test_a_model_call_that_never_returns_exits_5_and_its_event_is_dead_lettered_after_restarts(tmp_path):
    healthy, bad = fault_inputs(9, 1)
    events = [make_event(f"ok-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(healthy[:6])]
    events[3:3] = [make_event("poison", "m", bad[0], upstream_risk=0.1)]
    later = [make_event(f"later-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(healthy[6:])]
    config = tmp_path / "riskpipe.yaml"
    config.write_text(f"model_timeout_s: {TIMEOUT_S}\n")
    ledger = str(tmp_path / "ledger.db")
    log = tmp_path / "run.log"
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}

    def rows(kind: str) -> list[dict]:
        with Ledger(ledger) as led:
            return [e.record for e in led.records(kind=kind)]

    def decided_ids() -> list[str]:
        return [r["id"] for r in rows("decision")]

    def done() -> bool:
        if not Path(ledger).exists():
            return False
        return (set(decided_ids()) >= {e["id"] for e in events if e["id"] != "poison"}
                and any(r["reason"] == "model_timeout" for r in rows("dlq")))

    with EmbeddedBroker() as b:
        b.create_topics()
        args = stage_args(b.bootstrap, ledger, "--config", str(config), "--model", "m=usermodels:hanging_model?shape=4",
                          "--policy", fault_policy(tmp_path), "--max-events", "8", "--max-wait-ms", "500",
                          "--metrics-port", "0", "-v")
        first = run_cli(args, env=env, stdout=open(os.devnull, "w"), stderr=log.open("a"))
        try:
            assert wait_for(lambda: ready_with_partitions(log.read_text()) or first.poll() is not None, 180), \
                log.read_text()[-3000:]
            produced = time.monotonic()
            produce(b.bootstrap, events)
            first.wait(timeout=60)
        finally:
            stop(first, timeout=30)
        waited = time.monotonic() - produced
        assert first.returncode == EXIT_MODEL_TIMEOUT, log.read_text()[-3000:]
        assert waited < TIMEOUT_S + 15, waited  # the batch, the model call's 2 s, the exit
        text = log.read_text()
        line = next(ln for ln in text.splitlines() if "ran past model_timeout_s" in ln)
        assert "model m:" in line and "inferences:0:3" in line and f"exiting {EXIT_MODEL_TIMEOUT}" in line
        assert float(re.search(r"\((\d+) s\)", line).group(1)) < TIMEOUT_S + 2  # noticed when due
        assert any(r["source"]["offset"] == 3 for r in rows(KIND))  # the poison's position recorded
        assert not decided_ids() or "poison" not in decided_ids()

        exits: list[tuple[int, float]] = []
        p = _supervise(args, env, log, done, exits)
        try:
            # the poison hung alone once (a second exit 5) before it was dead-lettered
            assert any(r["level"] == ALONE and r["source"]["offset"] == 3 for r in rows(KIND))
            assert len(exits) >= 1
            produce(b.bootstrap, later)  # the stage runs on
            assert wait_for(lambda: set(decided_ids()) >= {e["id"] for e in later}, 120), log.read_text()[-3000:]
            url = re.findall(r"metrics on (http://\S+)", log.read_text())[-1]
            with urllib.request.urlopen(url, timeout=10) as r:
                scrape = r.read().decode()
            assert 'riskpipe_model_hang_suspects{level="alone"} 1.0' in scrape
            assert 'riskpipe_model_hang_suspects{level="batch"} ' in scrape  # the innocent ones, decided alone
            assert 'riskpipe_dlq_messages_total{reason="model_timeout"} 1.0' in scrape
        finally:
            rc, _ = stop(p, timeout=60)
        assert rc == 0, log.read_text()[-3000:]
        ids = decided_ids()
        assert sorted(ids) == sorted(e["id"] for e in events + later if e["id"] != "poison")  # each decided once
        dead = [r for r in rows("dlq") if r["reason"] == "model_timeout"]
        assert [(r["source"]["offset"]) for r in dead] == [3]
        out = consume_all(b.bootstrap, ["decisions", "dlq"], expect=len(ids) + 1)
        assert "poison" not in {json.loads(m.value)["id"] for m in out["decisions"]}  # never allowed, never decided
        assert [dict(m.headers).get("__riskpipe.errors.reason") for m in out["dlq"]] == [b"model_timeout"]
    assert "Traceback" not in log.read_text()
    with Ledger(ledger) as led:
        assert led.verify().ok  # the suspect rows are chained like every row
