"""Ack-wait overlap: batch k's acks are awaited while batch k+1 is certified, and an
offset moves only after every output of its batch is acknowledged and in the ledger."""

from __future__ import annotations

import inspect
import json
import re
import time

import numpy as np
import pytest
import yaml

from riskpipe.stream.io import Message
from streamkit import ListSource, LoggingSink


@pytest.fixture(scope="module")
def cnn_pipeline(tmp_path_factory):
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from synthetic import cifar_cnn, policy_without_context, save_torchscript

    tmp = tmp_path_factory.mktemp("cnn")
    spec = save_torchscript(cifar_cnn(), tmp / "cnn.pt", (3, 32, 32)) + "&range=0,1"
    (tmp / "stage.yaml").write_text(yaml.safe_dump({"policy": policy_without_context(tmp),
                                                     "models": {"cnn": {"spec": spec, "certify_batch_size": 64}}}))
    return build_pipeline(load_config(str(tmp / "stage.yaml")))


def six_events() -> list[Message]:
    from riskpipe.stream.binary import make_binary_event

    rng = np.random.default_rng(0)
    msgs = []
    for i in range(6):
        value, headers = make_binary_event(f"e{i}", "cnn", rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), "UINT8")
        msgs.append(Message(value, "in", 0, i, f"e{i}".encode(), headers))
    return msgs


class RowCheckingSink(LoggingSink):
    """Logs each send with whether its event's decision row was in the ledger then."""

    def __init__(self, log, ledger):
        super().__init__(log)
        self.ledger = ledger

    def send(self, topic: str, key: bytes | None, value: bytes, headers: list | None = None) -> None:
        k = key.decode() if key else None
        self.log.append(("send", topic, k, k is not None and self.ledger.get(k) is not None))


def run_stage(tmp_path, pipeline, log, ledger_class, msgs=None):
    from riskpipe.app.config import load_config
    from riskpipe.stream.stage import Stage

    real = pipeline.process

    def process(events, sources):
        log.append(("certify", tuple(e.id for e in events)))
        return real(events, sources)

    pipeline.process = process
    try:
        with ledger_class(str(tmp_path / "l.sqlite")) as led:
            rows = lambda: {e.entry_id for e in led.records(kind="decision")}  # noqa: E731
            cfg = load_config(None, batch={"max_events": 2, "max_wait_ms": 0})
            stage = Stage(cfg, pipeline, lambda r: ListSource(msgs or six_events(), log),
                          lambda: RowCheckingSink(log, led), ledger=led)
            committed_rows = []
            stage.committer.after_commit.append(lambda o: committed_rows.append(rows()))
            stats = stage.run()
    finally:
        pipeline.process = real
    return stats, committed_rows


def test_certification_of_the_next_batch_runs_before_the_ack_wait(tmp_path, cnn_pipeline) -> None:
    from riskpipe.ledger import Ledger

    log: list = []
    stats, committed_rows = run_stage(tmp_path, cnn_pipeline, log, Ledger)
    assert stats.decided == 6
    # certify 1, (send 1 on the writer thread), certify 2, flush, commit 1, (send 2), certify 3, ...
    main_thread = [e for e in log if e[0] != "send"]
    squeezed = [e[0] for i, e in enumerate(main_thread) if i == 0 or e[0] != main_thread[i - 1][0]]
    assert squeezed == ["certify", "flush", "commit", "certify", "flush", "commit", "flush", "commit"], squeezed
    assert [e for e in log if e[0] in ("certify", "commit")] == [
        ("certify", ("e0", "e1")), ("certify", ("e2", "e3")), ("commit", (0, 1)),
        ("certify", ("e4", "e5")), ("commit", (2, 3)), ("commit", (4, 5))]
    for k, (first, last) in enumerate(((0, 1), (2, 3), (4, 5))):  # every send of k before k's flush and commit
        sends = [i for i, e in enumerate(log) if e[0] == "send" and e[2] in (f"e{first}", f"e{last}")]
        commit = log.index(("commit", (first, last)))
        flush = max(i for i, e in enumerate(log[:commit]) if e[0] == "flush")
        assert sends and max(sends) < flush < commit, (k, log)
    # nothing was sent before its decision row was written; committed offsets' rows all stored
    assert all(e[3] for e in log if e[0] == "send" and e[1] != "dlq"), log
    assert committed_rows[0] >= {"e0", "e1"} and committed_rows[-1] == {f"e{i}" for i in range(6)}


def test_the_ledger_write_overlaps_the_next_batchs_certification(tmp_path, cnn_pipeline) -> None:
    """Batch k's ledger transaction waits (on the writer thread) until batch k+1 has been
    certified: that can finish only if the stage certifies while k's rows are written.
    Without the overlap the wait times out and the test fails."""
    from riskpipe.ledger.sqlite import SqliteLedger

    log: list = []
    waited: list[bool] = []

    class SlowLedger(SqliteLedger):
        def append_entries(self, entries, inputs=()):
            entries = list(entries)
            ids = [r["id"] for k, r, _ in entries if k == "decision"]
            if ids and ids[-1] != "e5":  # not the last batch: there is a next one to overlap with
                nxt = (f"e{int(ids[-1][1:]) + 1}", f"e{int(ids[-1][1:]) + 2}")
                deadline = time.monotonic() + 30
                while ("certify", nxt) not in log and time.monotonic() < deadline:
                    time.sleep(0.01)
                waited.append(("certify", nxt) in log)
            return super().append_entries(entries, inputs)

    stats, committed_rows = run_stage(tmp_path, cnn_pipeline, log, SlowLedger)
    assert stats.decided == 6 and waited == [True, True]
    assert all(e[3] for e in log if e[0] == "send"), log  # still: no output before its row
    assert committed_rows[-1] == {f"e{i}" for i in range(6)}


def test_an_id_repeated_while_its_row_is_being_written_is_a_duplicate(tmp_path, cnn_pipeline) -> None:
    """Batch 2 repeats an id of batch 1 while batch 1's rows are still being written (the
    writer waits for batch 2's certification): triage counts it from the batch in
    flight, so it is skipped as a duplicate, not decided and published twice."""
    from riskpipe.ledger.sqlite import SqliteLedger

    e = six_events()
    again = Message(e[1].value, "in", 0, 2, e[1].key, e[1].headers)  # e1 re-delivered at another offset
    msgs = [e[0], e[1], again, Message(e[3].value, "in", 0, 3, e[3].key, e[3].headers)]
    log: list = []

    class SlowLedger(SqliteLedger):
        def append_entries(self, entries, inputs=()):
            entries = list(entries)
            if any(k == "decision" and r["id"] == "e1" for k, r, _ in entries):
                deadline = time.monotonic() + 30
                while not any(x[0] == "certify" and "e3" in x[1] for x in log) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return super().append_entries(entries, inputs)

    stats, committed_rows = run_stage(tmp_path, cnn_pipeline, log, SlowLedger, msgs)
    assert [x for x in log if x[0] == "certify"] == [("certify", ("e0", "e1")), ("certify", ("e3",))]
    assert stats.decided == 3 and stats.duplicates == 1 and not stats.dlq
    assert committed_rows[-1] == {"e0", "e1", "e3"}
    assert sorted(x[2] for x in log if x[0] == "send" and x[1] == "audit") == ["e0", "e1", "e3"]


def test_an_id_reused_under_one_of_two_models_of_the_batch_in_flight_is_a_conflict(tmp_path, cnn_pipeline) -> None:
    """Batch 1 decides id e1 under two models; batch 2 re-uses e1 under the first model
    with another tensor while batch 1's rows are still being written. Triage must see both
    of e1's records in flight: the re-use is an ``id_conflict``. It used to see only the
    last one (one record per id), so e1 was decided and published (``allow``) again, and its
    ledger row was skipped as already there: a published decision with no row of its own."""
    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.ledger.sqlite import SqliteLedger
    from riskpipe.stream.binary import make_binary_event
    from synthetic import policy_without_context

    spec = cnn_pipeline.entries["cnn"].model.spec
    policy = policy_without_context(tmp_path)
    (tmp_path / "two.yaml").write_text(yaml.safe_dump({"policy": policy, "models": {
        "cnn": {"spec": spec, "certify_batch_size": 64}, "twin": {"spec": spec, "certify_batch_size": 64}}}))
    pipeline = build_pipeline(load_config(str(tmp_path / "two.yaml")))
    rng = np.random.default_rng(1)
    x1, x2, x3 = (rng.integers(0, 256, (3, 32, 32), dtype=np.uint8) for _ in range(3))
    msgs = []
    for i, (eid, model, x) in enumerate([("e1", "cnn", x1), ("e1", "twin", x1), ("e1", "cnn", x2), ("e3", "cnn", x3)]):
        value, headers = make_binary_event(eid, model, x, "UINT8")
        msgs.append(Message(value, "in", 0, i, eid.encode(), headers))
    log: list = []

    class SlowLedger(SqliteLedger):
        def append_entries(self, entries, inputs=()):
            entries = list(entries)
            if any(k == "decision" and r["model"]["name"] == "twin" for k, r, _ in entries):
                deadline = time.monotonic() + 30
                while not any(x[0] == "certify" and "e3" in x[1] for x in log) and time.monotonic() < deadline:
                    time.sleep(0.01)
            return super().append_entries(entries, inputs)

    stats, _ = run_stage(tmp_path, pipeline, log, SlowLedger, msgs)
    assert [x for x in log if x[0] == "certify"] == [("certify", ("e1", "e1")), ("certify", ("e3",))]
    assert stats.decided == 3 and dict(stats.dlq) == {"id_conflict": 1}
    with SqliteLedger(str(tmp_path / "l.sqlite")) as led:
        rows = [(r.entry_id, r.record["model"]["name"]) for r in led.records(kind="decision")]
    assert sorted(rows) == [("e1", "cnn"), ("e1", "twin"), ("e3", "cnn")]
    assert sorted(x[2] for x in log if x[0] == "send" and x[1] == "audit") == ["e1", "e1", "e3"]


@pytest.mark.parametrize("other", ["another event", "the same event"])
def test_a_decision_another_stage_wrote_first_is_never_published(tmp_path, cnn_pipeline, other) -> None:
    """Two stages on one ledger decide id e1 under the same model and policy at once (the id
    on two partitions, or two replicas): the second one's look-up found nothing, and its row
    is skipped as already there. It used to publish its own decision anyway, one with no
    ledger row (for another event: an allow the audit trail does not hold). The stored row
    stands: a differing event is an id_conflict dead letter, the same event a duplicate."""
    import copy

    from riskpipe.ledger.sqlite import SqliteLedger

    log: list = []

    class FirstWriterElsewhere(SqliteLedger):
        """Before this stage's batch with e1, the other stage's record of e1 lands."""

        def append_entries(self, entries, inputs=()):
            entries = list(entries)
            mine = next((r for k, r, _ in entries if k == "decision" and r["id"] == "e1"), None)
            if mine is not None and not self.get_all("e1"):
                theirs = copy.deepcopy(mine)
                theirs["worker"] = "the-other-stage"
                if other == "another event":
                    theirs["input"]["sha256"] = "0" * 64
                    theirs["decision"] = "allow"
                super().append_entries([("decision", theirs, None)])
            return super().append_entries(entries, inputs)

    stats, _ = run_stage(tmp_path, cnn_pipeline, log, FirstWriterElsewhere)
    with SqliteLedger(str(tmp_path / "l.sqlite")) as led:
        e1 = led.get_all("e1")
        dlq = [e.record for e in led.records(kind="dlq")]
        assert led.verify().ok
    assert len(e1) == 1 and e1[0]["worker"] == "the-other-stage"  # the decision of record
    assert not [x for x in log if x[0] == "send" and x[2] == "e1" and x[1] != "dlq"], "published without its row"
    if other == "another event":
        assert stats.decided == 5 and dict(stats.dlq) == {"id_conflict": 1}
        assert len(dlq) == 1 and dlq[0]["reason"] == "id_conflict" and "another writer" in dlq[0]["message"]
        assert [x[2] for x in log if x[0] == "send" and x[1] == "dlq"] == ["e1"]
    else:
        assert stats.decided == 5 and stats.duplicates == 1 and not stats.dlq and not dlq
    assert sorted(x[2] for x in log if x[0] == "send" and x[1] == "audit") == ["e0", "e2", "e3", "e4", "e5"]


@pytest.mark.broker
def test_kill_9_with_batches_in_flight_loses_no_output(tmp_path) -> None:
    """SIGKILL while outputs are sent but unacknowledged (the overlap keeps a batch in
    that state during every certification): after a restart every event has exactly
    one ledger row and at least one audit and decisions message."""
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import consume_all, kill_9_then_finish, ledger_ids, produce, valid_events

    with EmbeddedBroker() as b:
        b.create_topics()
        events = valid_events("k", 200)
        ledger = str(tmp_path / "l.sqlite")
        produce(b.bootstrap, events)
        kill_9_then_finish(b.bootstrap, ledger, total=200, kill_after=40, max_events=8)
        ids = ledger_ids(ledger)
        assert len(ids) == len(set(ids)) == 200
        out = consume_all(b.bootstrap, ["audit", "decisions"], expect=400, timeout=60)
    want = {e["id"] for e in events}
    assert {m.key.decode() for m in out["audit"]} == want
    assert {m.key.decode() for m in out["decisions"]} == want
    assert all(json.loads(m.value)["id"] == m.key.decode() for m in out["audit"])


def test_a_forming_batch_is_polled_while_the_ledger_writes_the_one_in_flight(tmp_path, cnn_pipeline) -> None:
    """Messages arrive one per poll and batches close by size: while batch 2 forms, the
    stage keeps polling instead of blocking on batch 1's ledger write (which here waits
    until batch 2's last message has been polled; blocking would time it out). The
    committer records the writer's ledger time and the stage thread's wait for it."""
    from riskpipe.app.config import load_config
    from riskpipe.ledger.sqlite import SqliteLedger
    from riskpipe.stream.stage import Stage

    log: list = []
    slow: list[tuple[bool, float]] = []

    class OnePerPoll(ListSource):
        def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
            out = super().poll(1, timeout_ms)
            log.extend(("poll", m.offset) for m in out)
            return out

    class SlowLedger(SqliteLedger):
        def append_entries(self, entries, inputs=()):
            entries = list(entries)
            if any(k == "decision" and r["id"] == "e1" for k, r, _ in entries):
                t0 = deadline = time.monotonic()
                deadline += 10
                while ("poll", 3) not in log and time.monotonic() < deadline:
                    time.sleep(0.01)
                slow.append((("poll", 3) in log, time.monotonic() - t0))
            return super().append_entries(entries, inputs)

    outcomes: list = []
    with SlowLedger(str(tmp_path / "l.sqlite")) as led:
        cfg = load_config(None, batch={"max_events": 2, "max_wait_ms": 60_000})
        stage = Stage(cfg, cnn_pipeline, lambda r: OnePerPoll(six_events(), log), lambda: LoggingSink(log),
                      ledger=led, after_commit=[outcomes.append])
        stats = stage.run()
        stored = {e.entry_id for e in led.records(kind="decision")}
    assert stats.decided == 6 and stored == {f"e{i}" for i in range(6)}
    assert [x[0] for x in slow] == [True], slow
    assert [x[1] for x in log if x[0] == "commit"] == [(0, 1), (2, 3), (4, 5)]
    assert [len(o.messages) for o in outcomes] == [2, 2, 2]
    assert outcomes[0].ledger_seconds >= slow[0][1] and all(o.ledger_seconds > 0 for o in outcomes)
    assert all(o.waited >= 0 for o in outcomes)


def test_postgresql_plain_inserts_go_through_copy() -> None:
    """The facts rows and tree nodes (plain inserts) are sent as COPY on PostgreSQL; the
    entries insert, which skips duplicates (ON CONFLICT), is not."""
    from riskpipe.ledger import facts, tree
    from riskpipe.ledger.postgres import _PLAIN_INSERT

    assert _PLAIN_INSERT.fullmatch(facts._INSERT)
    nodes = re.findall(r'"(INSERT INTO tree_nodes [^"]*)"', inspect.getsource(tree))
    assert nodes and all(_PLAIN_INSERT.fullmatch(s) for s in nodes)
    assert not _PLAIN_INSERT.fullmatch(facts._ADD_COUNTS.format(values="(?,?,?,?,?,?),(?,?,?,?,?,?)"))
    assert not _PLAIN_INSERT.fullmatch("INSERT INTO entries (kind, entry_id, ts, record, scope) VALUES (?,?,?,?,?) "
                                       "ON CONFLICT (kind, entry_id, scope) DO NOTHING")


def test_the_writer_thread_opens_its_connection_and_a_failure_is_step_1s(tmp_path) -> None:
    """The ledger writer's own connection is opened on the writer thread (the stage thread
    does not wait for it in ``submit``). If it cannot be opened, ``complete`` raises the
    outage for that batch: nothing sent, no offset committed; the next batch opens it."""
    import threading

    from riskpipe.ledger import LedgerUnavailable, open_ledger
    from riskpipe.stream.committer import Committer, Decided, Outcome
    from riskpipe.stream.outputs import Output
    from streamkit import ListSource

    opened_on: list[str] = []
    fail = [True]

    with open_ledger(tmp_path / "l.sqlite") as led:
        real = led.another_connection

        def another_connection():
            opened_on.append(threading.current_thread().name)
            if fail[0]:
                raise LedgerUnavailable("ledger: cannot connect (test)")
            return real()

        led.another_connection = another_connection  # type: ignore[method-assign]
        committer = Committer(led, "dlq")
        log: list = []
        sink, source = LoggingSink(log), ListSource([], log)

        def batch(i: int) -> Outcome:
            m = Message(b"{}", "in", 0, i, f"e{i}".encode())
            rec = {"id": f"e{i}", "ts": "2024-05-01T08:00:00Z", "decision": "allow"}
            return Outcome([m], decided=[Decided(m, rec, [Output("decisions", f"e{i}".encode(), b"{}")])])

        first = batch(0)
        committer.submit(first, sink)
        with pytest.raises(LedgerUnavailable):
            committer.complete(first, sink, source)
        assert log == [] and led.get("e0") is None  # nothing sent, no offset committed
        fail[0] = False
        second = batch(1)
        committer.submit(second, sink)
        committer.complete(second, sink, source)
        committer.close()
        assert log == [("send", "decisions", "e1"), ("flush",), ("commit", (1,))] and led.get("e1") is not None
    assert opened_on and all(name.startswith("riskpipe-ledger-writer") for name in opened_on)
