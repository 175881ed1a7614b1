"""Ack-wait overlap: batch k's acks are awaited while batch k+1 is certified, and an
offset moves only after every output of its batch is acknowledged and in the ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from riskpipe.stream.io import Message
from streamkit import ListSource


class LoggingSink:
    def __init__(self, log):
        self.log = log

    def send(self, topic, key, value, headers=None):
        self.log.append(("send", topic, key.decode() if key else None))

    def flush(self, timeout=30.0):
        self.log.append(("flush",))

    def close(self):
        pass


@pytest.fixture(scope="module")
def cnn_pipeline(tmp_path_factory):
    from riskpipe.compose import build_pipeline
    from riskpipe.stream.config import load_config
    from synthetic import cifar_cnn, policy_without_context, save_torchscript

    tmp = tmp_path_factory.mktemp("cnn")
    spec = save_torchscript(cifar_cnn(), tmp / "cnn.pt", (3, 32, 32)) + "&range=0,1"
    (tmp / "stage.yaml").write_text(yaml.safe_dump({"policy": policy_without_context(tmp),
                                                     "models": {"cnn": {"spec": spec, "certify_batch_size": 64}}}))
    return build_pipeline(load_config(str(tmp / "stage.yaml")))


def test_certification_of_the_next_batch_runs_before_the_ack_wait(tmp_path, cnn_pipeline) -> None:
    from riskpipe.ledger import Ledger
    from riskpipe.stream.binary import make_binary_event
    from riskpipe.stream.config import load_config
    from riskpipe.stream.stage import Stage

    rng = np.random.default_rng(0)
    msgs = []
    for i in range(6):
        value, headers = make_binary_event(f"e{i}", "cnn", rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), "UINT8")
        msgs.append(Message(value, "in", 0, i, f"e{i}".encode(), headers))
    log: list = []
    real = cnn_pipeline.process

    def process(events, sources):
        log.append(("certify", tuple(e.id for e in events)))
        return real(events, sources)

    cnn_pipeline.process = process
    try:
        with Ledger(str(tmp_path / "l.sqlite")) as led:
            rows = lambda: {e.entry_id for e in led.records(kind="decision")}  # noqa: E731
            cfg = load_config(None, batch={"max_events": 2, "max_wait_ms": 0})
            stage = Stage(cfg, cnn_pipeline, lambda r: ListSource(msgs, log), lambda: LoggingSink(log), ledger=led)
            committed_rows = []
            stage.committer.after_commit.append(lambda o: committed_rows.append(rows()))
            stats = stage.run()
    finally:
        cnn_pipeline.process = real
    assert stats.decided == 6
    coarse = [e[0] if e[0] != "send" else "send" for e in log]
    squeezed = [c for i, c in enumerate(coarse) if i == 0 or c != coarse[i - 1]]
    # certify 1, send 1, certify 2 (acks of 1 in flight), flush, commit 1, send 2, certify 3, ...
    assert squeezed == ["certify", "send", "certify", "flush", "commit", "send", "certify", "flush", "commit",
                        "send", "flush", "commit"], squeezed
    assert [e for e in log if e[0] in ("certify", "commit")] == [
        ("certify", ("e0", "e1")), ("certify", ("e2", "e3")), ("commit", (0, 1)),
        ("certify", ("e4", "e5")), ("commit", (2, 3)), ("commit", (4, 5))]
    # every committed offset's decision row was in the ledger before its outputs were sent
    assert committed_rows[0] >= {"e0", "e1"} and committed_rows[-1] == {f"e{i}" for i in range(6)}


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
