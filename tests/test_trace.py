"""W3C trace context: an input's traceparent reaches every output and the ledger."""

from __future__ import annotations

import json

import numpy as np
import pytest

from riskpipe.stream.trace import trace_context, trace_headers

TP = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_valid_traceparent_and_tracestate_are_taken() -> None:
    assert trace_context({"traceparent": TP, "tracestate": "rojo=00f067aa0ba902b7"}) == {
        "traceparent": TP, "tracestate": "rojo=00f067aa0ba902b7"}
    assert trace_context({"traceparent": TP}) == {"traceparent": TP}
    # a future version may append fields: its known fields are carried as version 00, the rest is not
    future = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra"
    assert trace_context({"traceparent": future}) == {"traceparent": "00" + future[2:55]}
    assert trace_headers({"trace": {"traceparent": TP}}) == [("traceparent", TP.encode())]
    assert trace_headers({"trace": None}) == []


@pytest.mark.parametrize("bad", [
    "", "garbage", TP.upper(), TP.replace("00-", "ff-", 1), TP + "-x",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
    TP + "\n", TP + "\x00", TP + "\r\nx-injected: 1", TP + "0",           # nothing may follow version 00
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",            # a higher version: "-" or the end
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-\x00" + "a" * 300_000,
    "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
])
def test_invalid_traceparent_is_ignored_with_its_tracestate(bad) -> None:
    assert trace_context({"traceparent": bad, "tracestate": "a=b"}) is None


def test_tracestate_follows_the_w3c_grammar_and_bounds() -> None:
    def state(value):
        return (trace_context({"traceparent": TP, "tracestate": value}) or {}).get("tracestate")

    assert state("rojo=00f067aa0ba902b7, congo=t61rcWkgMzE") == "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"
    assert state("a=1,,  ,b=2") == "a=1,b=2"  # empty list-members are allowed
    assert state("tenant1@vendor=x,k_-*/9=v") == "tenant1@vendor=x,k_-*/9=v"
    members = [f"k{i}=v" for i in range(32)]
    assert state(",".join(members)) == ",".join(members)
    for bad in (",".join(members + ["k32=v"]),  # 33 members
                "Upper=1", "9key=1", "a=1,a=2", "a", "a=", "a=b c=", "a=x\x00", "a=1\r\nb=2", "a=x=y,", "a=,",
                "a=" + "v" * 257, "k" * 257 + "=1", "a@" + "s" * 15 + "=1", "\x00" * 300_000):
        assert state(bad) is None, bad
    # over 512 characters: whole members go, those over 128 characters first, then from the end
    long = "big=" + "x" * 200
    kept = [f"m{i:02d}=" + "y" * 20 for i in range(20)]  # 20 x 24 + 19 commas = 499 characters
    assert state(",".join(kept[:10] + [long] + kept[10:])) == ",".join(kept)
    many = [f"m{i:02d}=" + "y" * 60 for i in range(12)]  # 64 characters each
    assert state(",".join(many)) == ",".join(many[:7])  # 7 x 64 + 6 = 454 <= 512 < 519


def test_repeated_trace_headers_are_combined_as_http_combines_them(demo_model) -> None:
    """Kafka keeps every copy of a header. Two ``tracestate`` copies are one list (W3C Trace
    Context); two ``traceparent`` copies, even equal ones, are no valid traceparent: the
    event is decided without a trace rather than with one copy picked (the last, before)."""
    from riskpipe.stream.events import make_event, parse_event

    models = {"digits": demo_model}
    body = json.dumps(make_event("e1", "digits", np.zeros((1, 8, 8), np.float32))).encode()
    other = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"

    def trace(*headers):
        return parse_event(body, list(headers), models).trace

    assert trace(("traceparent", TP.encode()), ("tracestate", b"a=1"), ("TraceState", b"b=2")) == {
        "traceparent": TP, "tracestate": "a=1,b=2"}
    assert trace(("traceparent", TP.encode()), ("tracestate", b"a=1"), ("tracestate", b"a=2")) == {
        "traceparent": TP}  # one list with the key twice: invalid, dropped whole as before
    for copies in ((TP, other), (other, TP), (TP, TP)):
        assert trace(*(("traceparent", c.encode()) for c in copies), ("tracestate", b"a=1")) is None, copies
    assert trace(("traceparent", TP.encode())) == {"traceparent": TP}


@pytest.mark.broker
def test_traceparent_reaches_decisions_review_audit_dlq_and_the_ledger(tmp_path) -> None:
    import yaml

    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from riskpipe.ledger import Ledger
    from riskpipe.stream.binary import make_binary_event
    from riskpipe.stream.broker import EmbeddedBroker
    from riskpipe.stream.events import make_event
    from streamkit import StageThread, consume_all, digits, produce, wait_for
    from synthetic import cifar_cnn, policy_without_context, save_torchscript

    cnn = save_torchscript(cifar_cnn(), tmp_path / "cnn.pt", (3, 32, 32)) + "&range=0,1"
    cfg_path = tmp_path / "stage.yaml"
    cfg_path.write_text(yaml.safe_dump({"policy": policy_without_context(tmp_path),
                                        "models": {"digits": "demo:digits", "cnn": cnn}}))
    rng = np.random.default_rng(0)
    traces = {f"t{i}": f"00-{i + 1:032x}-{i + 7:016x}-01" for i in range(6)}
    msgs = []
    for i, x in enumerate(digits(3)):
        eid = f"t{i}"
        risk = 1.0 if i == 1 else 0.0  # t1: routed to review by its upstream risk
        msgs.append((json.dumps(make_event(eid, "digits", x, upstream_risk=risk)).encode(),
                     [("traceparent", traces[eid].encode()), ("tracestate", b"vendor=1")]))
    for i in range(3, 6):  # the CNN, binary UINT8 form
        eid = f"t{i}"
        value, headers = make_binary_event(eid, "cnn", rng.integers(0, 256, (3, 32, 32), dtype=np.uint8), "UINT8")
        msgs.append((value, headers + [("traceparent", traces[eid].encode())]))
    msgs.append((json.dumps(make_event("plain", "digits", digits(1)[0])).encode(), []))
    msgs.append((b"{not json", [("traceparent", b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01")]))
    ledger_path = tmp_path / "l.sqlite"
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        produce(b.bootstrap, msgs)
        cfg = load_config(str(cfg_path), bootstrap_servers=b.bootstrap, session_timeout_ms=2000,
                          heartbeat_interval_ms=600)
        with Ledger(str(ledger_path)) as led, StageThread(cfg, build_pipeline(cfg), led) as stage:
            assert wait_for(lambda: stage.stats.decided + sum(stage.stats.dlq.values()) >= 8, 120)
        out = consume_all(b.bootstrap, ["decisions", "audit", "review", "dlq"], expect=7 + 7 + 1)
    for topic in ("decisions", "audit", "review"):
        for m in out[topic]:
            eid, h = m.key.decode(), dict(m.headers)
            if eid == "plain":
                assert "traceparent" not in h
                continue
            assert h["traceparent"].decode() == traces[eid], (topic, eid)
            assert (h.get("tracestate") == b"vendor=1") == (eid in ("t0", "t1", "t2"))
    assert len(out["decisions"]) == len(out["audit"]) == 7 and out["review"]
    (dlq,) = out["dlq"]
    assert dict(dlq.headers)["traceparent"] == b"00-" + b"a" * 32 + b"-" + b"b" * 16 + b"-01"
    with Ledger(str(ledger_path)) as led:
        for eid, tp in traces.items():
            assert led.get(eid)["trace"]["traceparent"] == tp
        assert led.get("plain")["trace"] is None
