"""Decision identity (issue 19 item 5): a decision is identified by (event id, model,
policy sha256). The same id re-used with anything that decides the outcome changed is
an ``id_conflict``; stages with different policies on one ledger each decide and publish
only their own records; a re-run under a changed policy decides anew and says what was
decided before. On a user's tabular model (wine, skops), not the demo."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest

from riskpipe.app.config import load_config
from riskpipe.app.offline import run_offline
from riskpipe.ledger import open_ledger
from streamkit import consume_all, policy_with, tabular_event, wait_for
from usermodels import tabular_model

CHEAP = {"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01, "max_samples": 200}


@pytest.fixture(scope="module")
def wine(tmp_path_factory):
    """The wine model under two policies (default and strict, both with a cheap certifier)."""
    from riskpipe.app.compose import build_pipeline

    d = tmp_path_factory.mktemp("wine")
    um = tabular_model(d)
    policies = {}
    for base in ("default", "strict"):
        (d / base).mkdir()
        policies[base] = policy_with(d / base, base, certifier=CHEAP)

    def pipeline(base):
        return build_pipeline(load_config(None, models={"wine": um.spec}, references={"wine": str(um.data)},
                                          policy=policies[base]))

    return SimpleNamespace(um=um, X=np.load(um.data)["X"], policies=policies, a=pipeline("default"),
                           b=pipeline("strict"))


def config(**kw):
    return load_config(None, batch={"max_events": 8, "max_wait_ms": 10}, **kw)


def events(wine, n, prefix="e"):
    return [tabular_event(f"{prefix}-{i}", wine.X[i]) for i in range(n)]


def shas(records):
    return {r["policy"]["sha256"] for r in records}


def test_same_id_with_anything_decision_relevant_changed_is_an_id_conflict(tmp_path, wine):
    a = tabular_event("k-0", wine.X[0], prediction=0)
    variants = [
        {**a, "prediction": 1},  # another prediction
        {**a, "upstream_risk": 0.9},  # another upstream risk
        {**a, "context": {"channel": "web"}},  # another context
        {**a, "inputs": [{**a["inputs"][0], "data": [v + 1.0 for v in a["inputs"][0]["data"]]}]},  # another tensor
    ]
    with open_ledger(str(tmp_path / "l.db")) as led:
        res = run_offline([a, a, *variants], tmp_path / "o1", config(), pipeline=wine.a, ledger=led)
        assert res.stats.decided == 1 and res.stats.duplicates == 1 and dict(res.stats.dlq) == {"id_conflict": 4}
        assert all("k-0" in d["headers"]["__riskpipe.errors.message"] for d in res.read("dlq"))
        # a later run (another file, other positions) against the same ledger: the same verdicts
        res = run_offline([*variants, a], tmp_path / "o2", config(), pipeline=wine.a, ledger=led)
        assert res.stats.decided == 0 and res.stats.duplicates == 1 and dict(res.stats.dlq) == {"id_conflict": 4}
        assert led.count("decision") == 1 and led.verify().ok


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_policies_on_one_ledger_each_decide_and_publish_their_own(tmp_path, wine, backend, request):
    target = str(tmp_path / "l.db") if backend == "sqlite" else request.getfixturevalue("pg_url")
    src = tmp_path / "events.jsonl"  # one event file: the same positions for both stages
    src.write_text("".join(json.dumps(e) + "\n" for e in events(wine, 12)))
    sha_a, sha_b = wine.a.policies[0].sha256, wine.b.policies[0].sha256
    assert sha_a != sha_b
    with open_ledger(target) as led:
        ra = run_offline(str(src), tmp_path / "a", config(), pipeline=wine.a, ledger=led)
        rb = run_offline(str(src), tmp_path / "b", config(), pipeline=wine.b, ledger=led)
        # stage B decided every event itself: none of stage A's records re-sent as B's
        assert (rb.stats.decided, rb.stats.redelivered, rb.stats.duplicates) == (12, 0, 0)
        assert shas(rb.read("audit")) == {sha_b} and len(rb.read("audit")) == 12
        assert shas(ra.read("audit")) == {sha_a} and len(ra.read("audit")) == 12
        assert dict(rb.stats.earlier) and sum(rb.stats.earlier.values()) == 12
        assert led.count("decision") == 24 and led.verify().ok
        assert all(shas(led.get_all(f"e-{i}")) == {sha_a, sha_b} for i in range(12))
        # the stage's per-batch look-up returns the same records, in chain order; unknown ids absent
        ids = [f"e-{i}" for i in range(12)] + ["never-seen"]
        assert led.get_all_many(ids) == {i: led.get_all(i) for i in ids[:-1]}
        # stage A again on the same file (a redelivery of the same positions): its own records only
        ra2 = run_offline(str(src), tmp_path / "a2", config(), pipeline=wine.a, ledger=led)
        assert (ra2.stats.decided, ra2.stats.redelivered) == (12, 12)
        assert shas(ra2.read("audit")) == {sha_a}
        assert {r["ts"] for r in ra2.read("audit")} == {r["ts"] for r in ra.read("audit")}
        assert led.count("decision") == 24


def test_rerun_under_a_changed_policy_decides_anew_and_says_so(tmp_path, wine):
    from click.testing import CliRunner

    from riskpipe.cli import cli

    src = tmp_path / "events.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events(wine, 6)))
    ledger = tmp_path / "ledger.db"

    def run(policy, out):
        r = CliRunner().invoke(cli, ["run", "--model", f"wine={wine.um.spec}", "--reference", f"wine={wine.um.data}",
                                     "--policy", wine.policies[policy], "--source", f"jsonl:{src}",
                                     "--sink", f"jsonl:{tmp_path / out}", "--ledger", str(ledger),
                                     "--no-metrics-server"])
        assert r.exit_code == 0, r.output
        return r.output

    first = run("default", "o1")
    assert "decided 6 events, 0 to the DLQ, 0 duplicates skipped" in first and "already decided" not in first
    changed = run("strict", "o2")
    assert "decided 6 events, 0 to the DLQ, 0 duplicates skipped" in changed
    sha_a = wine.a.policies[0].sha256
    line = next(x for x in changed.splitlines() if "already decided under" in x)
    assert line.startswith("6 of the decided events were already decided under policy ") and sha_a[:12] in line
    again = run("strict", "o3")  # the same file again: the same positions, its recorded decisions re-sent
    assert "decided 6 events" in again and "already decided" not in again
    assert "6 of the decided events were already in the ledger under this run's model and policy" in again
    other = tmp_path / "copy.jsonl"  # the same events from another file: identical re-deliveries
    other.write_text(src.read_text())
    src = other
    assert "decided 0 events, 0 to the DLQ, 6 duplicates skipped" in run("strict", "o4")
    with open_ledger(str(ledger)) as led:
        assert led.count("decision") == 12 and led.verify().ok


def test_a_changed_model_is_another_decision(wine):
    """Pure triage: the same event under other model weights is decided anew (and counted)."""
    from riskpipe.stream.io import Message
    from riskpipe.stream.triage import Accepted, classify

    pipe = wine.a
    ev = json.dumps(tabular_event("m-0", wine.X[0])).encode()
    msg = Message(ev, "t", 0, 5)
    from riskpipe.stream.events import parse_event

    event = parse_event(ev, [], pipe.models)
    acc = Accepted.of(msg, event)
    [record] = pipe.process([event], [msg.source()])
    assert classify([acc], {"m-0": [record]}, pipe.scopes).duplicates == []  # its own record: a redelivery
    assert len(classify([acc], {"m-0": [record]}, pipe.scopes).redelivered) == 1
    retrained = {**record, "model": {**record["model"], "sha256": "0" * 64}}
    tri = classify([acc], {"m-0": [retrained]}, pipe.scopes)
    assert tri.accepted == [acc] and sum(tri.earlier.values()) == 1
    conflicting = {**record, "upstream_risk": 0.7}
    tri = classify([acc], {"m-0": [conflicting]}, pipe.scopes)
    assert [d.reason for d in tri.dead] == ["id_conflict"]


@pytest.mark.broker
def test_two_stages_one_topic_one_postgresql_ledger(pg_url, wine):
    """Two stages with different policies read one topic on the real broker into one
    PostgreSQL ledger, one after the other (the second sees the first's records at the
    same positions): each publishes only its own records."""
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import StageThread, produce

    evs = events(wine, 20, "bk")
    with EmbeddedBroker() as b:
        names = {s: {t: f"{s}.{t}" for t in ("decisions", "review", "audit", "dlq")} for s in ("a", "b")}
        b.create_topics(["inferences", *(t for s in names.values() for t in s.values())])
        produce(b.bootstrap, evs)
        for stage, pipe in (("a", wine.a), ("b", wine.b)):
            cfg = load_config(None, bootstrap_servers=b.bootstrap, group_id=f"stage-{stage}",
                              session_timeout_ms=2000, heartbeat_interval_ms=600,
                              batch={"max_events": 8, "max_wait_ms": 10}, topics=names[stage])
            with open_ledger(pg_url) as led, StageThread(cfg, pipeline=pipe, ledger=led):
                assert wait_for(lambda: led.count("decision") >= (20 if stage == "a" else 40), 90)
        got = consume_all(b.bootstrap, [names["a"]["audit"], names["b"]["audit"], names["b"]["decisions"]],
                          expect=60, timeout=30)
    audit_a = [json.loads(m.value) for m in got[names["a"]["audit"]]]
    audit_b = [json.loads(m.value) for m in got[names["b"]["audit"]]]
    assert shas(audit_a) == {wine.a.policies[0].sha256} and len({r["id"] for r in audit_a}) == 20
    assert shas(audit_b) == {wine.b.policies[0].sha256} and len({r["id"] for r in audit_b}) == 20
    assert len(got[names["b"]["decisions"]]) == 20
    with open_ledger(pg_url) as led:
        assert led.count("decision") == 40 and led.verify().ok


def test_a_stage_of_two_models_names_the_model_in_every_public_decision(wine, tmp_path):
    """One event id sent to two models gave two public decisions with the same key and
    nothing saying whose (the shipped policies publish id, ts, decision, policy_version):
    a consumer keeping the latest per key took the benign model's ``allow`` for the
    hostile input's ``review``. With more than one model the public view names it."""
    from riskpipe.app.compose import build_pipeline

    cfg = load_config(None, models={"wine": wine.um.spec, "wine2": wine.um.spec},
                      references={"wine": str(wine.um.data), "wine2": str(wine.um.data)},
                      policy=wine.policies["default"])
    two = build_pipeline(cfg)
    events = [tabular_event("pay-77", wine.X[0]), {**tabular_event("pay-77", wine.X[1]), "model": "wine2"}]
    res = run_offline(events, tmp_path / "out", cfg, pipeline=two)
    public = res.read("decisions")
    assert sorted((p["id"], p["model_name"]) for p in public) == [("pay-77", "wine"), ("pay-77", "wine2")]
    assert all(set(p) == {"id", "ts", "decision", "policy_version", "model_name"} for p in public)
    one = run_offline(events[:1], tmp_path / "one", load_config(None, models={"wine": wine.um.spec},
                      references={"wine": str(wine.um.data)}, policy=wine.policies["default"]), pipeline=wine.a)
    assert "model_name" not in one.read("decisions")[0]  # one model: the policy's fields as they are
