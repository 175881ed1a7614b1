"""Memory exhausted while a model certifies is infrastructure, not data
(riskpipe.stream.infra): the stage pauses and decides the batch again, never
dead-letters its events (which poison isolation did, as ``internal_error``), and past
``infrastructure_timeout_s`` stops with nothing committed. On a user's factory model
whose forward raises torch's out-of-memory error, through the offline stage with a
SQLite ledger."""

from __future__ import annotations

import pytest
import torch

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.ledger import Ledger
from riskpipe.metrics import StageMetrics
from riskpipe.stream.events import make_event
from riskpipe.stream.infra import MEMORY, InfrastructureUnavailable, infrastructure_component
from usermodels import MEMORY_FAULTS, fault_inputs, fault_policy

SPEC = "usermodels:short_of_memory_model?shape=4"


@pytest.mark.parametrize("exc,component", [
    (MemoryError(), MEMORY),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), MEMORY),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), MEMORY),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 4294967296 bytes"), MEMORY),
    (RuntimeError("the model blew up"), None),  # the model's own fault: the event's dead letter, as before
    (ValueError("out of memory"), None),  # only torch's RuntimeError says it in words
])
def test_out_of_memory_is_infrastructure(exc, component):
    assert infrastructure_component(exc) == component
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("certify failed") from inner
    except RuntimeError as outer:
        assert infrastructure_component(outer) == component  # found through the cause chain too


def _run(tmp_path, faults: int, timeout_s: float):
    healthy, _ = fault_inputs(6, 0)
    events = [make_event(f"ok-{i}", "short", x, upstream_risk=0.1) for i, x in enumerate(healthy)]
    config = load_config(None, models={"short": SPEC}, policy=fault_policy(tmp_path),
                         infrastructure_timeout_s=timeout_s)
    metrics = StageMetrics()
    ledger = Ledger(str(tmp_path / "ledger.db"))
    MEMORY_FAULTS["left"] = 0
    from riskpipe.app.compose import build_pipeline

    pipeline = build_pipeline(config)  # the start-up forward check runs before the faults are armed
    MEMORY_FAULTS["left"] = faults
    try:
        res = run_offline(events, tmp_path / "out", config, pipeline=pipeline, ledger=ledger, metrics=metrics)
        return res, ledger, metrics
    finally:
        MEMORY_FAULTS["left"] = 0


def test_a_short_memory_outage_pauses_and_decides_every_event_once(tmp_path):
    res, ledger, metrics = _run(tmp_path, faults=2, timeout_s=60)
    assert res.stats.decided == 6 and not res.stats.dlq and not res.read("dlq")
    assert res.stats.infrastructure_retries[MEMORY] == 2
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for m in metrics.registry.collect() for s in m.samples}
    assert samples[("riskpipe_infrastructure_retries_total", (("component", "memory"),))] == 2
    assert samples[("riskpipe_infrastructure_outage", ())] == 0  # over once the batch committed
    with ledger:
        assert ledger.count("decision") == 6 and ledger.count("dlq") == 0
    assert sorted(r["id"] for r in res.read("audit")) == [f"ok-{i}" for i in range(6)]


def test_memory_short_past_the_timeout_stops_the_stage_with_nothing_committed(tmp_path):
    with pytest.raises(InfrastructureUnavailable, match=r"memory unavailable for .*infrastructure_timeout_s 1"):
        _run(tmp_path, faults=10**9, timeout_s=1)
    with Ledger(str(tmp_path / "ledger.db")) as ledger:
        assert ledger.count("decision") == 0 and ledger.count("dlq") == 0  # no event blamed, none decided
    out = tmp_path / "out"
    assert not any(p.read_text().strip() for p in out.glob("*.jsonl"))
