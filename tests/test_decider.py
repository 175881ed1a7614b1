"""The Decider on its own: messages in, decisions out, with no broker and no ledger.
On users' models, not the demo: a scikit-learn model (skops, wine, 13 raw features) and
a tiny TorchScript linear model whose output breaks for some inputs (fail closed)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from riskpipe.app.compose import build_pipeline
from riskpipe.app.config import load_config
from riskpipe.certify.certificate import MODEL_FAULT
from riskpipe.stream import codec
from riskpipe.stream.decider import Decider
from riskpipe.stream.events import make_event
from riskpipe.stream.outputs import OUTPUT_TOO_LARGE
from riskpipe.stream.ports import Message
from streamkit import tabular_event
from usermodels import cheap_pipeline, fault_inputs, fault_policy, faulty_model, tabular_model

TOPICS = load_config(None).topics


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wine")
    um = tabular_model(tmp)
    return cheap_pipeline(tmp, "wine", um), np.load(um.data)["X"]


def messages(events: list, first_offset: int = 0) -> list[Message]:
    """Events (dicts, or raw bytes) as messages of partition 0 of topic ``in``."""
    return [Message(e if isinstance(e, bytes) else json.dumps(e).encode(), "in", 0, first_offset + i,
                    timestamp=1_767_225_600_000) for i, e in enumerate(events)]


def decide(decider: Decider, msgs: list[Message], known: dict | None = None):
    parsed, dead, skipped = decider.parse(msgs)
    return decider.decide(msgs, parsed, known or {}, dead, skipped)


def test_wine_events_are_decided_with_their_records_and_outputs(wine):
    pipeline, X = wine
    decider = Decider.for_config(pipeline, load_config(None))
    msgs = messages([tabular_event(f"w-{i}", X[i]) for i in range(3)] + [b"{not json"])
    out = decide(decider, msgs)

    assert out.messages == msgs and not out.duplicates and not out.redelivered
    assert [(d.message.offset, d.reason) for d in out.dead] == [(3, "invalid_json")]
    assert [d.record["id"] for d in out.decided] == ["w-0", "w-1", "w-2"]
    policy = pipeline.entries["wine"].policy
    for d, m in zip(out.decided, msgs, strict=False):
        rec = d.record
        assert d.message is m and d.enqueued == 1_767_225_600.0
        assert rec["model"]["name"] == "wine" and rec["policy"]["sha256"] == policy.sha256
        assert rec["decision"] in ("allow", "review", "block") and rec["certificate"]["method"] == "smoothing"
        assert rec["source"] == {"topic": "in", "partition": 0, "offset": m.offset}
        by_topic = {o.topic: codec.loads(o.value) for o in d.outputs}
        assert by_topic[TOPICS.audit]["id"] == rec["id"] and by_topic[TOPICS.audit]["score"] == rec["score"]
        public = by_topic[TOPICS.decisions]
        assert public["decision"] == rec["decision"] and "certificate" not in public  # nothing locates the boundary
        assert (TOPICS.review in by_topic) == bool(rec["review"]["routed"] or rec["review"]["audit_sample"])
        assert all(o.key == rec["id"].encode() for o in d.outputs)

    again = decide(decider, msgs)  # certificates are seeded from (id, policy): the same decisions
    strip = lambda rec: {**rec["certificate"], "elapsed_ms": None}  # noqa: E731
    assert [(d.record["decision"], d.record["score"], strip(d.record)) for d in again.decided] == \
        [(d.record["decision"], d.record["score"], strip(d.record)) for d in out.decided]


def test_stored_decisions_make_redeliveries_duplicates_and_conflicts(wine):
    pipeline, X = wine
    decider = Decider.for_config(pipeline, load_config(None))
    first = decide(decider, messages([tabular_event("k", X[0])], first_offset=7))
    stored = first.decided[0].record

    msgs = messages([tabular_event("k", X[0])], first_offset=7)  # the very message again (a crash before its commit)
    msgs += messages([tabular_event("k", X[0]), tabular_event("k", X[1])], first_offset=8)
    out = decide(decider, msgs, known={"k": [stored]})
    assert not out.decided
    assert [(d.message.offset, d.record) for d in out.redelivered] == [(7, stored)]
    assert [o.value for o in out.redelivered[0].outputs] == [o.value for o in first.decided[0].outputs]
    assert [m.offset for m in out.duplicates] == [8]
    assert [(d.message.offset, d.reason) for d in out.dead] == [(9, "id_conflict")]


def test_a_model_that_raises_for_one_event_dead_letters_only_that_event(wine, monkeypatch):
    pipeline, X = wine
    real, calls = pipeline.process, []

    def process(events, sources):
        calls.append(len(events))
        if any(ev.id == "bad" for ev in events):
            raise ArithmeticError("model blew up")
        return real(events, sources)

    monkeypatch.setattr(pipeline, "process", process)
    decider = Decider.for_config(pipeline, load_config(None))
    out = decide(decider, messages([tabular_event(eid, X[i]) for i, eid in enumerate(["a", "bad", "c"])]))
    assert calls == [3, 1, 1, 1]  # the batch, then one at a time
    assert [d.record["id"] for d in out.decided] == ["a", "c"]
    assert [(d.message.offset, d.reason, d.exception) for d in out.dead] == [(1, "internal_error", "ArithmeticError")]
    assert out.dead[0].text.startswith("decide: ArithmeticError")


def test_an_output_larger_than_the_limit_is_that_events_dead_letter(wine):
    pipeline, X = wine
    decider = Decider(pipeline, TOPICS, max_message_bytes=1 << 20, max_binary_message_bytes=16 << 20,
                      max_output_bytes=8192)
    out = decide(decider, messages([tabular_event("small", X[0]),
                                    tabular_event("fat", X[1], context={"note": "x" * 20_000})]))
    assert [d.record["id"] for d in out.decided] == ["small"]
    assert [(d.message.offset, d.reason) for d in out.dead] == [(1, OUTPUT_TOO_LARGE)]


def test_a_torch_model_fault_is_never_allowed(tmp_path):
    """A linear TorchScript model (logits 5 * x[1:4]) whose logits are NaN for inputs with
    a first feature above 2.5: those are uncertified (model_fault) and routed to review."""
    config = load_config(None, models={"faulty": faulty_model(tmp_path, "nan")}, policy=fault_policy(tmp_path))
    decider = Decider.for_config(build_pipeline(config), config)
    healthy, broken = fault_inputs(3, 2)
    events = [make_event(f"ok-{i}", "faulty", x, upstream_risk=0.0) for i, x in enumerate(healthy)]
    events += [make_event(f"bad-{i}", "faulty", x, upstream_risk=0.0) for i, x in enumerate(broken)]
    out = decide(decider, messages(events))
    records = {d.record["id"]: d for d in out.decided}
    assert len(records) == 5 and not out.dead
    for i in range(3):
        assert records[f"ok-{i}"].record["decision"] == "allow"
    for i in range(2):
        d = records[f"bad-{i}"]
        cert = d.record["certificate"]
        assert cert["reason"] == MODEL_FAULT and cert["abstained"]
        assert d.record["decision"] != "allow" and MODEL_FAULT in d.record["reasons"]
        assert d.record["review"]["routed"]
        assert codec.loads(next(o.value for o in d.outputs if o.topic == TOPICS.decisions))["decision"] != "allow"


def test_events_of_models_other_stages_serve_are_skipped_not_dead_lettered(wine, tmp_path):
    """Stages written by ``riskpipe init`` serve one model each; pointed at one inference
    topic (as the README suggests), each read the others' events. Those were ``unknown_model``
    dead letters, and the DLQ guard stopped the stage (exit 3) once they were most of the
    traffic: a stage serving 5% of a shared topic stopped after 1,000 events, with 729 dead
    letters. Listed under ``other_models``, they are skipped: committed, counted, neither
    decided nor dead-lettered nor seen by the guard; a name listed nowhere is still a dead letter."""
    from riskpipe.app.config import ConfigError
    from riskpipe.stream.stage import GuardTripped, Stage
    from streamkit import ListSource, LoggingSink

    pipeline, X = wine
    other = [{**tabular_event(f"o-{i}", X[0]), "model": "fraud"} for i in range(20)]
    events = [tabular_event("w-0", X[0]), *other, tabular_event("w-1", X[1]), {**other[0], "model": "frуud"}]
    guard = {"window": 10, "max_consecutive_invalid": 5, "max_invalid_ratio": 0.5}

    def run(**cfg):
        log: list = []
        stage = Stage(load_config(None, batch={"max_events": 8, "max_wait_ms": 0}, guard=guard, **cfg), pipeline,
                      lambda r: ListSource(messages(events), log), lambda: LoggingSink(log))
        return stage.run(), log

    with pytest.raises(GuardTripped):  # without the key: another stage's traffic is invalid traffic
        run()
    stats, log = run(other_models=["fraud"])
    assert stats.decided == 2 and stats.other_models == 20 and dict(stats.dlq) == {"unknown_model": 1}
    commits = [o for e in log if e[0] == "commit" for o in e[1]]
    assert commits == list(range(len(events)))  # skipped events are committed with the rest
    sent = [e for e in log if e[0] == "send"]
    assert {k for _, t, k in sent if t != "dlq"} == {"w-0", "w-1"} and [t for _, t, _ in sent].count("dlq") == 1
    decider = Decider.for_config(pipeline, load_config(None, other_models=["fraud"]))
    out = decide(decider, messages([{"model": "fraud"}, {"id": "x", "model": ["fraud"], "inputs": []}]))
    assert len(out.other_models) == 1 and [d.reason for d in out.dead] == ["wrong_type"]  # checked before any field
    with pytest.raises(ConfigError, match="other_models: wine is served by this stage"):
        load_config(None, models={"wine": "demo:digits"}, other_models=["wine"])


def test_an_input_that_leaves_float32_once_scaled_is_a_named_dead_letter(tmp_path):
    """Certifiers see x / s (``scale: standardize``). A finite raw value of 3e38 divided by
    a feature's scale below 1 is inf there: the context index raised on it, and the event
    was an ``internal_error`` dead letter saying only "Input contains infinity"."""
    from streamkit import policy_with

    um = tabular_model(tmp_path)
    policy = policy_with(tmp_path, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                              "max_samples": 200})
    (tmp_path / "stage.yaml").write_text(json.dumps({"policy": policy, "models": {"wine": {
        "spec": um.spec, "reference": str(um.data), "scale": "standardize"}}}))
    pipeline, X = build_pipeline(load_config(str(tmp_path / "stage.yaml"))), np.load(um.data)["X"]
    s = pipeline.entries["wine"].scale.reshape(-1)
    j = int(np.argmin(s))
    assert s[j] < 1
    x = X[0].astype(np.float64).copy()
    x[j] = 3e38
    out = decide(Decider.for_config(pipeline, load_config(None)), messages([tabular_event("w-big", x)]))
    assert not out.decided and [d.reason for d in out.dead] == ["non_finite"]
    assert f"feature {j} divided by its scale" in out.dead[0].text and "models.wine.scale" in out.dead[0].text
