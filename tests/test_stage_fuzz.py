"""Stage-level fuzz: generated batches mixing valid events with every poison class go
through the offline mode and through ``Stage.process_batch`` (handle -> commit). The
invariant: every input is decided exactly once, skipped as an identical re-delivery,
or dead-lettered with a reason (the expected one for its class); the stage never
raises; the ledger verifies and holds each decision once. On a user's tabular
scikit-learn model (skops, 13 raw features), not the digits demo."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.ledger import Ledger
from riskpipe.stream.io import JsonlSink, Message
from riskpipe.stream.stage import Stage
from streamkit import ListSource, poisoned_tabular_pipeline
from streamkit import tabular_event as event

HUGE = "7" * 5000  # beyond Python's 4,300-digit int() limit
POISON = "poison"  # ids with this prefix make the model raise
# class -> what must become of it ("decided", "duplicate" or a DLQ reason)
EXPECTED = {
    "valid": "decided", "nan_risk": "decided", "duplicate": "duplicate", "conflict": "id_conflict",
    "ctrl_id": "bad_id", "surrogate_id": "bad_id", "huge_int": "out_of_range", "nan_context": "non_finite",
    "string_data": "wrong_type", "bad_time": "bad_time", "poison": "internal_error", "garbage": "invalid_json",
}


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    return poisoned_tabular_pipeline(tmp_path_factory.mktemp("wine"), POISON)


@st.composite
def batches(draw):
    """A list of (class, raw bytes) in stream order; ids are unique per class instance."""
    n = draw(st.integers(3, 9))
    out, valid = [], []
    for i in range(n):
        kind = draw(st.sampled_from(sorted(EXPECTED)))
        row = draw(st.integers(0, 57))
        if kind in ("duplicate", "conflict") and not valid:
            kind = "valid"
        if kind == "valid":
            e = event(f"v{i}", ROWS[row])
            valid.append(e)
            value = json.dumps(e)
        elif kind == "duplicate":
            value = json.dumps(draw(st.sampled_from(valid)))
        elif kind == "conflict":
            e = draw(st.sampled_from(valid))
            value = json.dumps({**e, "inputs": [{**e["inputs"][0], "data": [v + 1.0 for v in e["inputs"][0]["data"]]}]})
        elif kind == "nan_risk":
            value = json.dumps(event(f"n{i}", ROWS[row], upstream_risk=draw(st.sampled_from(
                [float("nan"), float("inf"), float("-inf")]))))
        elif kind == "ctrl_id":
            value = json.dumps(event(f"c{i}" + draw(st.sampled_from(["\n", "\t", "\x00", "\x7f", "\x9b"])), ROWS[row]))
        elif kind == "surrogate_id":
            value = json.dumps(event("SURR", ROWS[row])).replace("SURR", f"s{i}\\ud800")
        elif kind == "huge_int":
            where = draw(st.sampled_from(["prediction", "context"]))
            value = json.dumps(event(f"h{i}", ROWS[row], **{where: 0})).replace(f'"{where}": 0', f'"{where}": {HUGE}')
        elif kind == "nan_context":
            value = json.dumps(event(f"x{i}", ROWS[row], context={"a": [1, {"b": float("nan")}]}))
        elif kind == "string_data":
            e = event(f"t{i}", ROWS[row])
            e["inputs"][0]["data"][draw(st.integers(0, 12))] = "0.5"
            value = json.dumps(e)
        elif kind == "bad_time":
            value = json.dumps(event(f"b{i}", ROWS[row], time=draw(st.sampled_from(
                ["not a time", "2026-02-30T00:00:00Z", "yesterday", "2026-01-01"]))))
        elif kind == "poison":
            value = json.dumps(event(f"{POISON}{i}", ROWS[row]))
        else:
            value = draw(st.sampled_from(['{"id": "g", ', "\x00\x01", "[1, 2", "nul"]))
        out.append((kind, value.encode("utf-8", "surrogatepass")))
    return out


ROWS: np.ndarray = np.zeros((58, 13), np.float32)  # filled from the fixture before generation


def check(kinds, decided_ids, dlq_reasons, duplicates, ledger_path):
    """``dlq_reasons``: offset -> reason; ``decided_ids``: ids of decided records, in output order."""
    assert len(decided_ids) == len(set(decided_ids)), "an event was decided twice"
    n_decided = n_dup = 0
    for off, kind in enumerate(kinds):
        want = EXPECTED[kind]
        if want == "decided":
            n_decided += 1
        elif want == "duplicate":
            n_dup += 1
        else:
            assert dlq_reasons.get(off) == want, (off, kind, dlq_reasons.get(off))
    assert len(decided_ids) == n_decided and duplicates == n_dup
    assert len(dlq_reasons) == len(kinds) - n_decided - n_dup
    with Ledger(str(ledger_path)) as led:
        assert led.verify().ok
        ids = [e.entry_id for e in led.records(kind="decision")]
        assert sorted(ids) == sorted(decided_ids) and led.count("dlq") == len(dlq_reasons)


FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None, phases=[Phase.generate],
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                       HealthCheck.data_too_large])
GUARD_OFF = {"max_invalid_ratio": 1.0, "max_consecutive_invalid": 1000, "window": 1000}


@FUZZ
@given(batch=batches())
def test_offline_mode_decides_or_dead_letters_every_input(wine, batch):
    pipe, _ = wine
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in.jsonl"
        src.write_bytes(b"".join(value + b"\n" for _, value in batch))
        with Ledger(str(Path(tmp) / "l.sqlite")) as led:
            res = run_offline(str(src), Path(tmp) / "out", load_config(None, guard=GUARD_OFF,
                                                                      batch={"max_events": 4, "max_wait_ms": 5}),
                              pipeline=pipe, ledger=led)
        dlq = {int(d["headers"]["__riskpipe.errors.offset"]): d["headers"]["__riskpipe.errors.reason"]
               for d in res.read("dlq")}
        audit = [r["id"] for r in res.read("audit")]
        assert len(res.read("decisions")) == len(audit)
        check([k for k, _ in batch], audit, dlq, res.stats.duplicates, Path(tmp) / "l.sqlite")


@FUZZ
@given(batch=batches())
def test_stage_process_batch_decides_or_dead_letters_every_input(wine, batch):
    pipe, _ = wine
    with tempfile.TemporaryDirectory() as tmp:
        with Ledger(str(Path(tmp) / "l.sqlite")) as led:
            stage = Stage(load_config(None, guard=GUARD_OFF), pipe, None, None, ledger=led)
            stage.sink = JsonlSink(tmp)
            commits: list = []
            stage.source = ListSource([], commits)
            msgs = [Message(value, "fuzz", 0, off) for off, (_, value) in enumerate(batch)]
            out = stage.process_batch(msgs)
            stage.sink.close()
            assert commits == [("commit", tuple(range(len(batch))))]  # the whole batch committed
        dlq = {d.message.offset: d.reason for d in out.dead}
        check([k for k, _ in batch], [d.record["id"] for d in out.decided], dlq, len(out.duplicates),
              Path(tmp) / "l.sqlite")
        for d in out.dead:
            if d.reason == "internal_error":
                assert d.exception == "ArithmeticError" and "model blew up" in d.text


@pytest.fixture(scope="module", autouse=True)
def _rows(wine):
    ROWS[:] = wine[1][:58]
