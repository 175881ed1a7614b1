"""Memory exhausted while a model certifies (riskpipe.stream.decider, .infra).

The machine's memory is infrastructure: when the model cannot certify an input it
certified before either (``Pipeline.healthy``), the stage pauses and decides the batch
again (it used to dead-letter every event of it as ``internal_error``), and past
``infrastructure_timeout_s`` stops with nothing committed. A shortage that passes is
ridden out with no pause. But an input that runs out of memory where a known-good one
does not is that input's dead letter, as is any other error a model raises for one
input (a TimeoutError or OSError of the model is not the broker's): no event can stop
the stage. On a user's factory model, through the offline stage with a SQLite ledger."""

from __future__ import annotations

import json

import pytest
import torch

from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.ledger import Ledger
from riskpipe.metrics import StageMetrics
from riskpipe.stream.events import make_event
from riskpipe.stream.infra import MEMORY, InfrastructureUnavailable, infrastructure_component, out_of_memory
from usermodels import MEMORY_FAULTS, fault_inputs, fault_policy


@pytest.mark.parametrize("exc,oom", [
    (MemoryError(), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 1.2 GB)"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 4294967296 bytes"), True),
    (RuntimeError("the model blew up"), False),
    (ValueError("out of memory"), False),  # only torch's RuntimeError says it in words
    (TimeoutError("feature store timed out"), False),  # a model's own: not the broker's on this path
])
def test_out_of_memory_is_told_from_the_models_own_errors(exc, oom):
    assert out_of_memory(exc) is oom
    assert (infrastructure_component(exc) == MEMORY) is oom
    try:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("certify failed") from inner
    except RuntimeError as outer:
        assert out_of_memory(outer) is oom  # found through the cause chain
    try:
        try:
            raise exc
        except (MemoryError, RuntimeError, ValueError, TimeoutError):
            raise RuntimeError("handling it failed") from None
    except RuntimeError as handled:
        assert not out_of_memory(handled)  # an error raised while handling one is not it


def _run(tmp_path, spec: str, faults: int, timeout_s: float, poisoned: int = 0):
    healthy, bad = fault_inputs(6, poisoned)
    events = [make_event(f"ok-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(healthy)]
    events[2:2] = [make_event(f"bad-{i}", "m", x, upstream_risk=0.1) for i, x in enumerate(bad)]
    config = load_config(None, models={"m": spec}, policy=fault_policy(tmp_path), infrastructure_timeout_s=timeout_s)
    metrics = StageMetrics()
    ledger = Ledger(str(tmp_path / "ledger.db"))
    MEMORY_FAULTS["left"] = 0
    pipeline = build_pipeline(config)  # its start-up forward check runs before the faults are armed
    MEMORY_FAULTS["left"] = faults
    try:
        res = run_offline(events, tmp_path / "out", config, pipeline=pipeline, ledger=ledger, metrics=metrics)
        return res, ledger, metrics
    finally:
        MEMORY_FAULTS["left"] = 0


def _retries(metrics) -> float:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect()
            for s in m.samples}.get(("riskpipe_infrastructure_retries_total", (("component", "memory"),)), 0.0)


@pytest.mark.parametrize("faults,pauses", [(2, 0), (3, 1), (8, 2)])
def test_a_memory_shortage_that_passes_decides_every_event_once(tmp_path, faults, pauses):
    """2: the batch and its first event fail, the known-good input certifies, the event's
    second try too: no pause. 3 and more: the known-good input fails as well, so the stage
    pauses and decides the batch again once memory is back."""
    res, ledger, metrics = _run(tmp_path, "usermodels:short_of_memory_model?shape=4", faults, timeout_s=60)
    assert res.stats.decided == 6 and not res.stats.dlq and not res.read("dlq")
    assert res.stats.infrastructure_retries[MEMORY] == pauses == _retries(metrics)
    with ledger:
        assert ledger.count("decision") == 6 and ledger.count("dlq") == 0
    assert sorted(r["id"] for r in res.read("audit")) == [f"ok-{i}" for i in range(6)]


def test_memory_short_past_the_timeout_stops_the_stage_with_nothing_committed(tmp_path):
    with pytest.raises(InfrastructureUnavailable, match=r"memory unavailable for .*infrastructure_timeout_s 1"):
        _run(tmp_path, "usermodels:short_of_memory_model?shape=4", faults=10**9, timeout_s=1)
    with Ledger(str(tmp_path / "ledger.db")) as ledger:
        assert ledger.count("decision") == 0 and ledger.count("dlq") == 0  # no event blamed, none decided
    assert not any(p.read_text().strip() for p in (tmp_path / "out").glob("*.jsonl"))


@pytest.mark.parametrize("kind,error", [("oom", "OutOfMemoryError"), ("timeout", "TimeoutError"),
                                        ("oserror", "OSError")])
def test_an_input_that_makes_the_model_fail_is_its_own_dead_letter_and_the_stage_goes_on(tmp_path, kind, error):
    res, ledger, _ = _run(tmp_path, f"usermodels:poisoned_{kind}_model?shape=4", faults=0, timeout_s=5, poisoned=2)
    assert res.stats.decided == 6 and not res.stats.infrastructure_retries[MEMORY]
    dead = [(json.loads(d["value"])["id"], d["headers"]["__riskpipe.errors.reason"],
             d["headers"]["__riskpipe.errors.message"]) for d in res.read("dlq")]
    assert sorted((key, reason) for key, reason, _ in dead) == [("bad-0", "internal_error"),
                                                                ("bad-1", "internal_error")]
    assert all(error in message for _, _, message in dead)
    assert all(r["decision"] == "allow" for r in res.read("audit"))  # the healthy ones, decided as usual
    with ledger:
        assert ledger.count("decision") == 6 and ledger.count("dlq") == 2


class _ScriptedPipeline:
    """What the decider asks of a pipeline, scripted: ``process`` raises out of memory while
    ``short`` says so (one entry per call), ``healthy`` answers from ``probes``."""

    def __init__(self, short: list[bool], probes: list[bool]):
        self.short, self.probes, self.calls = list(short), list(probes), []

    def process(self, events, sources):
        self.calls.append("process")
        if self.short.pop(0):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [{"id": ev.id} for ev in events]

    def healthy(self, name):
        self.calls.append("healthy")
        return self.probes.pop(0)


def _one_event():
    from types import SimpleNamespace

    from riskpipe.stream.triage import Accepted

    message = SimpleNamespace(source=lambda: {"topic": "t", "partition": 0, "offset": 0, "timestamp": None},
                              topic="t", partition=0, offset=0)
    return Accepted(message, SimpleNamespace(id="e-1", model="m"), "0" * 64, "1" * 64)


@pytest.mark.parametrize("short,probes,outcome", [
    ([True, False], [True], "decided"),  # a shortage that passed: the second try decides it
    ([True, True], [True, True], "dead"),  # fails again while the known-good input certifies twice: the input's
    ([True], [False], "pause"),  # the known-good input fails too: the machine's
    ([True, True], [True, False], "pause"),  # it let go for one check and came back: still the machine's
])
def test_an_events_out_of_memory_is_its_own_only_when_a_known_good_input_certifies_around_it(short, probes, outcome):
    from riskpipe.stream.decider import Decider

    pipeline = _ScriptedPipeline(short, probes)
    decider = Decider(pipeline, None, max_message_bytes=1 << 20, max_binary_message_bytes=1 << 20,
                      max_output_bytes=1 << 20)
    dead: list = []
    if outcome == "pause":
        with pytest.raises(torch.OutOfMemoryError):
            decider._records([_one_event()], dead)
        assert not dead
    else:
        got = decider._records([_one_event()], dead)
        assert (len(got), len(dead)) == ((1, 0) if outcome == "decided" else (0, 1))
    assert not pipeline.short and not pipeline.probes  # every scripted step was taken, no more
