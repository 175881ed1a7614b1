"""Poison isolation: whatever one event raises (parse, decide, ledger, emit) sends
that event to the DLQ with reason ``internal_error``; the batch goes on; nothing is
published for an event whose ledger row cannot be written. Run on a user's 3x32x32
TorchScript CNN, not the digits demo."""

import json
import sqlite3
from typing import ClassVar

import numpy as np
import orjson
import pytest

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.ledger import Ledger, LedgerError
from riskpipe.ledger.sqlite import SqliteLedger
from riskpipe.stream.events import make_event
from riskpipe.stream.infra import InfrastructureUnavailable
from riskpipe.stream.io import JsonlSink, JsonlSource, Message
from riskpipe.stream.ports import SourceBase
from riskpipe.stream.stage import Stage
from usermodels import cheap_image_pipeline


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    """A user's 3x32x32 TorchScript CNN under a cheap smoothing policy (few samples)."""
    return cheap_image_pipeline(tmp_path_factory.mktemp("cnn"))


def cnn_events(n, prefix, seed=0):
    rng = np.random.default_rng(seed)
    return [make_event(f"{prefix}-{i}", "cnn", rng.random((3, 32, 32), dtype=np.float32), upstream_risk=0.1)
            for i in range(n)]


def config():
    return load_config(None, batch={"max_events": 8, "max_wait_ms": 10})


def dlq_by_id(res):
    return {json.loads(d["value"])["id"]: d["headers"] for d in res.read("dlq")}


def test_model_failure_dead_letters_only_the_culprit(tmp_path, cnn, monkeypatch):
    original = cnn.process

    def process(events, sources):
        for ev in events:
            if ev.id in ("p-2", "p-5"):
                raise RuntimeError(f"kernel fault on {ev.id}")
        return original(events, sources)

    monkeypatch.setattr(cnn, "process", process)
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline(cnn_events(8, "p"), tmp_path / "out", config(), pipeline=cnn, ledger=led)
        assert led.count("decision") == 6 and led.count("dlq") == 2 and led.verify().ok
        dlq_rows = [e.record for e in led.records(kind="dlq")]
    assert res.stats.decided == 6 and dict(res.stats.dlq) == {"internal_error": 2}
    assert sorted(r["id"] for r in res.read("audit")) == sorted(f"p-{i}" for i in (0, 1, 3, 4, 6, 7))
    dead = dlq_by_id(res)
    assert set(dead) == {"p-2", "p-5"}
    h = dead["p-2"]
    assert h["__riskpipe.errors.reason"] == "internal_error"
    assert h["__riskpipe.errors.exception"] == "RuntimeError"
    assert "decide: RuntimeError: kernel fault on p-2" in h["__riskpipe.errors.message"]
    assert all(r["reason"] == "internal_error" and "RuntimeError" in r["message"] for r in dlq_rows)


def test_a_record_that_cannot_be_serialised_or_recorded_is_that_events_failure(tmp_path, cnn, monkeypatch):
    original = cnn.process

    def process(events, sources):
        recs = original(events, sources)
        for r in recs:
            if r["id"] == "n-1":
                r["event_context"] = {"x": float("nan")}  # JSON cannot carry it: the ledger refuses the row
            if r["id"] == "n-2":
                r["event_context"] = {"x": object()}  # not serialisable at all
        return recs

    monkeypatch.setattr(cnn, "process", process)
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline(cnn_events(4, "n"), tmp_path / "out", config(), pipeline=cnn, ledger=led)
        assert led.count("decision") == 2 and led.get("n-1") is None and led.verify().ok
    for kind in ("decisions", "audit", "review"):
        assert not {"n-1", "n-2"} & {r["id"] for r in res.read(kind)}
    dead = dlq_by_id(res)
    assert dead["n-1"]["__riskpipe.errors.message"].startswith("ledger: LedgerError")
    assert dead["n-2"]["__riskpipe.errors.message"].startswith("emit: ")
    assert dict(res.stats.dlq) == {"internal_error": 2}


class RefusingLedger(SqliteLedger):
    """A ledger that refuses the decision row of some ids (as it would a malformed row)."""
    refuse: ClassVar[set[str]] = set()

    def append_entries(self, entries, inputs=()):
        entries = list(entries)
        for kind, rec, _ in entries:
            if kind == "decision" and rec["id"] in self.refuse:
                raise LedgerError(f"id: refused {rec['id']}")
        return super().append_entries(entries, inputs)


def test_nothing_is_published_for_an_event_whose_ledger_row_fails(tmp_path, cnn):
    led = RefusingLedger(str(tmp_path / "l.sqlite"))
    led.refuse = {"r-3"}
    try:
        res = run_offline(cnn_events(6, "r"), tmp_path / "out", config(), pipeline=cnn, ledger=led)
        assert led.count("decision") == 5 and led.count("dlq") == 1 and led.verify().ok
    finally:
        led.close()
    for kind in ("decisions", "audit", "review"):
        assert "r-3" not in {r["id"] for r in res.read(kind)}
    assert len(res.read("decisions")) == 5
    msg = dlq_by_id(res)["r-3"]["__riskpipe.errors.message"]
    assert msg.startswith("ledger: LedgerError")


class BrokenLedger(SqliteLedger):
    def append_entries(self, entries, inputs=()):
        entries = list(entries)
        if any(kind != "policy" for kind, _, _ in entries):
            raise sqlite3.OperationalError("disk I/O error")
        return super().append_entries(entries, inputs)


def test_a_broken_ledger_stops_the_stage_before_anything_is_sent(tmp_path, cnn):
    """A disk I/O error is the ledger's, not the events': retried (no event dead-lettered),
    then, past infrastructure_timeout_s, the stage stops with nothing sent or committed."""
    led = BrokenLedger(str(tmp_path / "l.sqlite"))
    cfg = config()
    cfg.infrastructure_timeout_s = 0.5
    try:
        with pytest.raises(InfrastructureUnavailable, match=r"^ledger unavailable for .*disk I/O error") as e:
            run_offline(cnn_events(5, "b") + [{"id": "junk"}], tmp_path / "out", cfg, pipeline=cnn, ledger=led)
        assert isinstance(e.value.__cause__, sqlite3.OperationalError)
        assert led.count("dlq") == 0 and led.count("decision") == 0
    finally:
        led.close()
    for kind in ("decisions", "audit", "review", "dlq"):
        p = tmp_path / "out" / f"{kind}.jsonl"
        assert not p.exists() or p.read_text() == ""


def test_redelivery_after_a_crash_between_ledger_and_commit_resends_outputs(tmp_path, cnn):
    src = tmp_path / "in.jsonl"
    evs = cnn_events(5, "c")
    src.write_text("".join(json.dumps(e) + "\n" for e in evs))
    cfg = config()
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        stage = Stage(cfg, cnn, lambda r: JsonlSource(str(src)), lambda: JsonlSink(str(tmp_path / "o1")), ledger=led)
        source = JsonlSource(str(src))
        outcome = stage.handle(source.poll(100, 10))
        stage.committer.write_ledger(outcome, led)  # ... and the process dies before sending anything
        source.close()
        assert led.count("decision") == 5
        res = run_offline(str(src), tmp_path / "o2", cfg, pipeline=cnn, ledger=led)
        assert led.count("decision") == 5 and led.verify().ok
    assert res.stats.decided == 5 and res.stats.redelivered == 5 and res.stats.duplicates == 0
    stored = {r["id"]: r for r in (d.record for d in outcome.decided)}
    audit = {r["id"]: r for r in res.read("audit")}
    assert audit.keys() == stored.keys()
    assert audit["c-0"]["ts"] == stored["c-0"]["ts"]  # the recorded decision, not a new one
    assert len(res.read("decisions")) == 5


def test_id_conflict_and_identical_redelivery(tmp_path, cnn):
    a, b = cnn_events(2, "k")
    conflicting = {**b, "id": a["id"]}
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline([a, a, conflicting], tmp_path / "o1", config(), pipeline=cnn, ledger=led)
        assert res.stats.decided == 1 and res.stats.duplicates == 1 and dict(res.stats.dlq) == {"id_conflict": 1}
        h = res.read("dlq")[0]["headers"]
        assert h["__riskpipe.errors.reason"] == "id_conflict" and "k-0" in h["__riskpipe.errors.message"]
        # a later run (another file: other positions) against the same ledger
        res = run_offline([conflicting, a], tmp_path / "o2", config(), pipeline=cnn, ledger=led)
        assert res.stats.decided == 0 and res.stats.duplicates == 1 and dict(res.stats.dlq) == {"id_conflict": 1}
        assert led.count("decision") == 1 and led.verify().ok


class SimTime:
    """Simulated seconds for the stage module's ``time``: only a poll moves it."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    perf_counter = monotonic


class SlowJoinSource(SourceBase):
    """A source whose group assignment arrives only after ``join_s`` (simulated) seconds;
    each poll waits out its whole timeout, as an idle broker's does."""

    def __init__(self, clock: SimTime, join_s: float):
        self.clock = clock
        self.t0 = clock.now
        self.join_s = join_s
        self.polls = 0

    @property
    def holds_partitions(self) -> bool:
        return self.clock.now - self.t0 >= self.join_s

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        self.polls += 1
        self.clock.now += timeout_ms / 1000
        return []

    def commit(self, messages: list[Message]) -> None:
        pass

    def close(self) -> None:
        pass


def test_idle_exit_counts_only_while_holding_partitions(tmp_path, cnn, monkeypatch):
    import riskpipe.stream.stage as stage_mod

    clock = SimTime()
    monkeypatch.setattr(stage_mod, "time", clock)  # the stage's idle clock, driven by the polls below
    cfg = load_config(None, batch={"max_events": 8, "max_wait_ms": 50})
    for join_s, least in ((1.5, 2.0), (0.0, 0.5)):  # joining time never counts as idle
        sources = []
        stage = Stage(cfg, cnn, lambda r: sources.append(SlowJoinSource(clock, join_s)) or sources[-1],
                      lambda: JsonlSink(str(tmp_path / "o")))
        t0 = clock.now
        stage.run(idle_exit_s=0.5)
        elapsed = clock.now - t0
        assert least <= elapsed <= least + 0.1 + 1e-9, (join_s, elapsed)  # within two 50 ms polls
        assert sources[0].polls >= round(least / 0.05)


def test_handle_has_no_side_effects_and_isolates_parse_failures(cnn, monkeypatch):
    import riskpipe.stream.decider as decider_mod

    real = decider_mod.parse_event

    def parse(value, *a, **kw):
        if b"explode" in (value or b""):
            raise KeyError("surprise")
        return real(value, *a, **kw)

    monkeypatch.setattr(decider_mod, "parse_event", parse)
    evs = cnn_events(3, "h")
    msgs = [Message(json.dumps(e).encode(), "t", 0, i) for i, e in enumerate(evs)]
    msgs.append(Message(b'{"explode": 1}', "t", 0, 3))

    class NoSink:
        def send(self, topic, key, value, headers=None):
            raise AssertionError("handle must not send")

        def flush(self, timeout=30.0):
            raise AssertionError("handle must not flush")

        def close(self):
            pass

    stage = Stage(config(), cnn, None, None)
    stage.sink = NoSink()
    out = stage.handle(msgs)
    assert [d.record["id"] for d in out.decided] == ["h-0", "h-1", "h-2"]
    assert [(d.reason, d.exception) for d in out.dead] == [("internal_error", "KeyError")]


def test_an_output_larger_than_max_output_bytes_is_that_events_failure(tmp_path, cnn):
    evs = cnn_events(3, "z")
    evs[1]["context"] = {"notes": "x" * 200_000}  # carried into the full record: too large to send
    cfg = load_config(None, batch={"max_events": 8, "max_wait_ms": 10}, max_output_bytes=150_000)
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        stage = Stage(cfg, cnn, lambda r: JsonlSource(str(_jsonl(tmp_path, evs))),
                      lambda: JsonlSink(str(tmp_path / "out")), ledger=led)
        stats = stage.run()
        assert led.count("decision") == 2 and led.get("z-1") is None and led.verify().ok
    assert stats.decided == 2 and dict(stats.dlq) == {"output_too_large": 1}
    dlq = [json.loads(line) for line in (tmp_path / "out" / "dlq.jsonl").read_text().splitlines()]
    assert "exceeds max_output_bytes 150000" in dlq[0]["headers"]["__riskpipe.errors.message"]
    # the 200 kB original does not fit the DLQ either: left out, named by digest and size
    assert dlq[0]["headers"]["__riskpipe.errors.payload"] == "omitted" and dlq[0]["value"] == ""


def _jsonl(tmp_path, evs):
    p = tmp_path / "in.jsonl"
    p.write_text("".join(json.dumps(e) + "\n" for e in evs))
    return p


def test_run_command_survives_every_poison_class_of_the_issue(tmp_path):
    """The five inputs that used to stop ``riskpipe run`` (and an unchecked time, string
    tensor data) among valid events: exit 0, each valid event decided, each poison dead-lettered."""
    import subprocess
    import sys

    from streamkit import digits

    x = digits(3)
    ok = [make_event(f"ok-{i}", "digits", x[i]) for i in range(3)]
    bad_data = make_event("strs", "digits", x[0])
    bad_data["inputs"][0]["data"][0] = "0.5"
    lines = [json.dumps(ok[0]),
             json.dumps(make_event("ctl\n", "digits", x[0])),
             json.dumps(make_event("SURR", "digits", x[0])).replace("SURR", "sur\\ud800"),
             json.dumps(make_event("nan-risk", "digits", x[1], upstream_risk=float("nan"))),
             json.dumps(make_event("nan-ctx", "digits", x[1], context={"k": float("nan")})),
             json.dumps(make_event("big", "digits", x[1], prediction=0)).replace('"prediction": 0',
                                                                                '"prediction": ' + "9" * 5000),
             json.dumps(make_event("when", "digits", x[2], time="not a time")),
             json.dumps(bad_data),
             json.dumps(ok[1]), json.dumps(ok[2])]
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--source", f"jsonl:{src}", "--sink",
                        f"jsonl:{out}", "--ledger", str(tmp_path / "l.sqlite")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decided 4 events, 6 to the DLQ" in r.stderr
    reasons = sorted(json.loads(line)["headers"]["__riskpipe.errors.reason"]
                     for line in (out / "dlq.jsonl").read_text().splitlines())
    assert reasons == ["bad_id", "bad_id", "bad_time", "non_finite", "out_of_range", "wrong_type"]
    nan_risk = next(json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()
                    if json.loads(line)["id"] == "nan-risk")
    assert nan_risk["signals"]["upstream_risk"]["flagged"] and nan_risk["signals"]["upstream_risk"]["reason"] == \
        "non_finite"


def _with(event: dict, field: str, depth: int) -> str:
    """``event`` as JSON text with an array nested ``depth`` deep as ``field`` (``context``:
    as its member ``a``), written as text: json.dumps itself stops near 1,000 levels."""
    value = {"a": "X"} if field == "context" else "X"
    return json.dumps({**event, field: value}).replace('"X"', "[" * depth + "0.5" + "]" * depth)


def test_an_event_nested_too_deeply_is_its_own_dead_letter_and_the_batch_goes_on(tmp_path, cnn):
    """A ~6 KB event with ``context`` (or ``upstream_risk``) nested some thousand deep made
    the id-conflict digest raise RecursionError in triage, which runs over the whole batch:
    the stage stopped with a traceback, the batch's other events undecided (and on Kafka
    again at every restart). Such an event is ``invalid_json`` at parse now, and a digest
    that still cannot be made is its own ``internal_error``."""
    events = cnn_events(6, "d")
    lines = [json.dumps(e) for e in events]
    lines[1] = _with(events[1], "context", 1000)
    lines[3] = _with(events[3], "upstream_risk", 990)
    lines[4] = _with(events[4], "context", 29)  # 31 levels with the event's and context's: read
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(lines) + "\n")
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline(str(source), tmp_path / "out", config(), pipeline=cnn, ledger=led)
    dead = {orjson.loads(d["value"])["id"]: d["headers"] for d in res.read("dlq")}  # json stops near 1,000 levels
    assert set(dead) == {"d-1", "d-3"} and res.stats.decided == 4
    assert all(h["__riskpipe.errors.reason"] == "invalid_json" for h in dead.values())
    assert "nested more than 32 levels deep" in dead["d-1"]["__riskpipe.errors.message"]


def test_a_digest_that_cannot_be_made_is_that_events_failure(tmp_path, cnn, monkeypatch):
    from riskpipe.stream import triage

    original = triage.event_digest

    def event_digest(input_sha256, model, prediction, upstream_risk, context):
        if context == {"poison": True}:
            raise RecursionError("maximum recursion depth exceeded")
        return original(input_sha256, model, prediction, upstream_risk, context)

    monkeypatch.setattr(triage, "event_digest", event_digest)
    events = cnn_events(4, "g")
    events[2]["context"] = {"poison": True}
    res = run_offline(events, tmp_path / "out", config(), pipeline=cnn)
    assert set(dlq_by_id(res)) == {"g-2"} and res.stats.decided == 3
    assert dlq_by_id(res)["g-2"]["__riskpipe.errors.exception"] == "RecursionError"


def test_a_line_separator_inside_a_record_leaves_its_jsonl_file_readable(tmp_path, cnn):
    """orjson writes U+2028 and U+2029 inside strings as they are (JSON allows it), and the
    readers split files with str.splitlines(), which splits there too: one event with one
    in its context made the audit file unreadable to ``riskpipe policy diff``/``explain``
    and to OfflineResult.read. Readers split JSON lines at '\\n' only."""
    from riskpipe.cli.policy_impl import _read_json_records

    events = cnn_events(3, "s")
    events[1]["context"] = {"note": "a\u2028b\u2029c\u0085d"}
    res = run_offline(events, tmp_path / "out", config(), pipeline=cnn)
    audit = res.read("audit")
    assert [r["id"] for r in audit] == ["s-0", "s-1", "s-2"]
    assert audit[1]["event_context"] == {"note": "a\u2028b\u2029c\u0085d"}
    path = tmp_path / "out" / "audit.jsonl"
    assert "\u2028" in path.read_text(encoding="utf-8")  # written as it is
    assert [r["id"] for r in _read_json_records(str(path))] == ["s-0", "s-1", "s-2"]
