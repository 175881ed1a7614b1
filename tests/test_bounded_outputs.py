"""Bounded outputs (issue 19 item 6): every output fits ``max_output_bytes``; large inputs
are stored once in the ledger by digest; an output that cannot fit is that event's
dead letter (``output_too_large``) and the partition goes on."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from riskpipe.ledger import open_ledger
from riskpipe.ledger.inputs import input_fields, record_array
from riskpipe.stream.binary import make_binary_event
from riskpipe.stream.errors import EventError
from riskpipe.stream.events import parse_event
from riskpipe.stream.io import KafkaSink, Message
from riskpipe.stream.outputs import dead_letter_output, output_size

IMAGE = (3, 224, 224)
KAFKA_MESSAGE_MAX_BYTES = 1_048_588  # Apache Kafka's default message.max.bytes


class BrokerLimitSink(KafkaSink):
    """The stage's Kafka sink with a producer that refuses what a broker at Kafka's
    default ``message.max.bytes`` refuses (Tansu enforces no limit)."""

    def __init__(self, config):
        from riskpipe import kafka_clients

        super().__init__(config)
        self.producer.close(timeout=5)
        self.producer = kafka_clients.producer(config.kafka(), acks="all", enable_idempotence=True, linger_ms=5,
                                               max_request_size=KAFKA_MESSAGE_MAX_BYTES, retries=5,
                                               request_timeout_ms=10_000, max_block_ms=10_000)


@pytest.fixture(scope="module")
def image_spec(tmp_path_factory):
    """A tiny 3x224x224 TorchScript CNN (not the demo), inputs declared in [0, 1]."""
    from synthetic import save_torchscript

    torch.manual_seed(0)
    nn = torch.nn
    net = nn.Sequential(nn.Conv2d(3, 4, 16, stride=16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                        nn.Linear(4, 3)).eval()
    return save_torchscript(net, tmp_path_factory.mktemp("img") / "img.pt", IMAGE) + "&range=0,1"


def _image(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=IMAGE, dtype=np.uint8)


def _stage_config(tmp_path, image_spec, **kw):
    import yaml

    from riskpipe.app.config import load_config
    from synthetic import policy_without_context

    # too few samples to certify anything: every input is uncertified and routed to review,
    # so its full record (with the input) goes to the review and audit topics
    policy = policy_without_context(tmp_path)
    pol = yaml.safe_load(open(policy))
    pol["certifier"]["max_samples"] = 200
    with open(policy, "w") as f:
        yaml.safe_dump(pol, f)
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"policy": policy, "models": {"img": image_spec},
                                    "ledger": str(tmp_path / "ledger.sqlite"), **kw}))
    return load_config(str(path))


def test_a_uint8_image_is_stored_once_and_records_carry_its_digest(tmp_path) -> None:
    img = _image()
    x = img.astype(np.float32) / 255
    inline, none = input_fields(x, "UINT8", img, include=True, store=False)
    ref, stored = input_fields(x, "UINT8", img, include=True, store=True)
    assert none is None and stored is not None and stored.datatype == "UINT8" and len(stored.data) == img.size
    assert inline["tensor"]["datatype"] == "UINT8" and len(inline["tensor"]["base64"]) < 210_000  # 4/3 of 150 KB
    assert ref["tensor"]["ref"] == f"ledger:inputs/{ref['sha256']}" and len(json.dumps(ref)) < 400
    assert np.array_equal(record_array(inline), img)
    with open_ledger(tmp_path / "l.sqlite") as led:
        for i in range(3):  # three records, one stored tensor
            led.append_entries([("decision", {"id": f"e{i}", "ts": "2026-01-01T00:00:00Z", "input": ref}, None)],
                               [stored])
        assert np.array_equal(record_array(ref, led.get_input), img)
        with led._conn() as db:
            assert db.execute("SELECT COUNT(*) FROM inputs").fetchone()[0] == 1


def test_inputs_are_stored_on_postgresql_too(pg_url) -> None:
    img = _image(2)
    ref, stored = input_fields(img.astype(np.float32) / 255, "UINT8", img, include=True, store=True)
    with open_ledger(pg_url) as led:
        assert led.schema_version >= 5
        led.append_entries([("decision", {"id": "pg-img", "ts": "2026-01-01T00:00:00Z", "input": ref}, None)], [stored])
        assert np.array_equal(record_array(ref, led.get_input), img)
        with pytest.raises(Exception, match="append-only"), led._write() as db:
            db.execute("DELETE FROM inputs")


def test_a_stored_fp32_tensor_that_does_not_match_its_digest_is_refused(tmp_path) -> None:
    from riskpipe.ledger.inputs import InputUnavailable, StoredInput

    x = np.linspace(0, 1, 2000, dtype=np.float32).reshape(1, 2000)
    ref, stored = input_fields(x, "FP32", None, include=True, store=True)
    forged = StoredInput(stored.sha256, "FP32", stored.shape, np.ascontiguousarray(x[:, ::-1]).tobytes())
    with pytest.raises(InputUnavailable, match="does not match"):
        record_array(ref, lambda sha: forged)


def test_a_dead_letter_never_exceeds_the_output_limit() -> None:
    limit = 64 * 1024
    big = Message(b"x" * 500_000, "inferences", 3, 17, key=b"k", headers=[("h", b"v" * 100_000)])
    out = dead_letter_output(big, "oversized", "value: too big " * 1000, "dlq", limit=limit)
    h = dict(out.headers)
    assert output_size(out.key, out.value, out.headers) <= limit
    assert out.value == b"" and h["__riskpipe.errors.payload"] == b"omitted"
    assert h["__riskpipe.errors.payload_bytes"] == b"500000" and len(h["__riskpipe.errors.payload_sha256"]) == 64
    assert h["__riskpipe.errors.headers"] == b"omitted" and "h" not in h  # the 100 KB header did not fit either
    assert (h["__riskpipe.errors.partition"], h["__riskpipe.errors.offset"]) == (b"3", b"17")
    small = dead_letter_output(Message(b"{}", "inferences", 0, 1), "invalid_json", "x", "dlq", limit=limit)
    assert small.value == b"{}" and "__riskpipe.errors.payload" not in dict(small.headers)


def test_the_binary_header_does_not_lift_the_json_limit(image_spec) -> None:
    from riskpipe.models import load_model

    models = {"img": load_model(image_spec)}
    value, headers = make_binary_event("b", "img", _image(), "UINT8", context={"pad": "x" * 200_000})
    with pytest.raises(EventError, match="JSON part") as e:
        parse_event(value, headers, models, max_bytes=100_000, max_binary_bytes=16 << 20)
    assert e.value.code == "oversized"
    # a plain JSON event of 2 MB with the header claiming it all as JSON: refused the same way
    body = json.dumps({"id": "j", "model": "img", "context": {"pad": "x" * (2 << 20)},
                       "inputs": [{"name": "i", "shape": [1, *IMAGE], "datatype": "UINT8", "data": [0]}]}).encode()
    with pytest.raises(EventError, match="JSON part"):
        parse_event(body, [("Inference-Header-Content-Length", str(len(body)).encode())], models)
    ev = parse_event(value, headers, models, max_bytes=1 << 20)  # under the JSON limit: decoded
    assert ev.raw is not None and ev.raw.dtype == np.uint8


def test_broker_stage_bounds_every_output_and_dead_letters_what_cannot_fit(tmp_path, image_spec) -> None:
    """A 224x224x3 UINT8 image routed to review through the real broker, with a producer
    that refuses what Kafka's default message.max.bytes refuses: its records carry a
    reference, the input comes back from the ledger by digest; an event whose output cannot
    fit is dead-lettered (output_too_large, never allowed) and the partition goes on."""
    from riskpipe.app.compose import build_pipeline, source_factory
    from riskpipe.render import record_view
    from riskpipe.stream.broker import EmbeddedBroker
    from riskpipe.stream.stage import Stage
    from streamkit import consume_all, produce, wait_for

    img = _image()
    msgs = [make_binary_event("img-1", "img", img, "UINT8", upstream_risk=0.9)]
    # a JSON event under the 1 MiB input limit whose full record cannot fit in 1 MiB
    fat = {"id": "fat", "model": "img", "upstream_risk": 0.0, "context": {"note": "y" * 1_045_000},
           "inputs": [{"name": "i", "shape": [1, *IMAGE], "datatype": "UINT8",
                       "parameters": {"binary_data_size": img.size}}]}
    head = json.dumps(fat, separators=(",", ":")).encode()
    msgs.append((head + img.tobytes(), [("Inference-Header-Content-Length", str(len(head)).encode())]))
    msgs.append(make_binary_event("img-2", "img", _image(3), "UINT8", upstream_risk=0.9))
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        produce(b.bootstrap, msgs, max_request_size=16 << 20)  # the input topic takes binary events
        cfg = _stage_config(tmp_path, image_spec, bootstrap_servers=b.bootstrap, session_timeout_ms=2000,
                            heartbeat_interval_ms=600, batch={"max_events": 1, "max_wait_ms": 20})
        led = open_ledger(cfg.ledger)
        stage = Stage(cfg, build_pipeline(cfg), source_factory(cfg, None, None, None), lambda: BrokerLimitSink(cfg),
                      ledger=led)
        import threading

        t = threading.Thread(target=stage.run, kwargs={"idle_exit_s": 3.0}, daemon=True)
        t.start()
        assert wait_for(lambda: stage.stats.decided + sum(stage.stats.dlq.values()) >= 3, 240)
        stage.stop()
        t.join(60)
        assert not t.is_alive()
        out = consume_all(b.bootstrap, ["decisions", "audit", "review", "dlq"], expect=7)
    for topic, recs in out.items():
        for r in recs:
            assert output_size(r.key, r.value, r.headers) <= cfg.max_output_bytes, topic
    audit = {r.key.decode(): json.loads(r.value) for r in out["audit"]}
    decided = {r.key.decode(): json.loads(r.value)["decision"] for r in out["decisions"]}
    assert set(audit) == set(decided) == {"img-1", "img-2"}  # the partition went on past "fat"
    assert "fat" not in decided  # never allowed, never decided
    (dead,) = out["dlq"]
    assert dict(dead.headers)["__riskpipe.errors.reason"] == b"output_too_large"
    assert {r.key.decode() for r in out["review"]} == {"img-1", "img-2"}
    rec = audit["img-1"]
    assert rec["review"]["routed"] and rec["input"]["datatype"] == "UINT8" and "data" not in rec["input"]
    assert len(out["audit"][0].value) < 20_000  # was 2.88 MB of JSON floats
    assert np.array_equal(record_array(rec["input"], led.get_input), img)  # by digest, from the ledger
    view = record_view(rec, None, led.get_input)  # what the review console draws
    assert view.kind == "image" and view.width >= 224
    assert [e.record["reason"] for e in led.records("dlq")] == ["output_too_large"]
    led.close()
    assert 'id="input-image"' in _console_page(cfg.ledger, "/item/img-1")  # the console draws it from the ledger


def _console_page(ledger: str, path: str) -> str:
    """``path`` of the review console on ``ledger``, logged in over HTTP."""
    import http.client
    import re
    from urllib.parse import urlencode, urlsplit

    from riskpipe.review import serve_background

    server = serve_background(ledger, "127.0.0.1", 0, "a long review passphrase", metrics=None)
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=30)
    try:
        conn.request("GET", "/login")
        r = conn.getresponse()
        html = r.read().decode()
        cookie = r.getheader("Set-Cookie").split(";", 1)[0]
        token = re.search(r'name="csrf_token" type="hidden" value="([^"]+)"', html).group(1)
        conn.request("POST", "/login", body=urlencode({"csrf_token": token, "username": "alice",
                                                       "password": "a long review passphrase"}),
                     headers={"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
        r = conn.getresponse()
        r.read()
        assert r.status == 302
        cookie = (r.getheader("Set-Cookie") or cookie).split(";", 1)[0]
        conn.request("GET", path, headers={"Cookie": cookie})
        r = conn.getresponse()
        return r.read().decode()
    finally:
        conn.close()
        server.stop()


def test_ledger_input_command_returns_the_stored_tensor_by_digest(tmp_path) -> None:
    import subprocess
    import sys

    img = _image(4)
    ref, stored = input_fields(img.astype(np.float32) / 255, "UINT8", img, include=True, store=True)
    path = str(tmp_path / "l.sqlite")
    with open_ledger(path) as led:
        led.append_entries([("decision", {"id": "e", "ts": "2026-01-01T00:00:00Z", "input": ref}, None)], [stored])
    out = tmp_path / "x.npy"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "input", path, ref["sha256"], "--out",
                        str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    back = np.load(out)
    assert back.dtype == np.uint8 and np.array_equal(back, img)
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "input", path, "0" * 64],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "no stored input" in r.stderr and "Traceback" not in r.stderr


def test_ledger_input_refuses_an_fp32_tensor_that_does_not_match_its_digest(tmp_path) -> None:
    """An auditor fetching evidence by digest: the review console and the report checked a
    stored FP32 tensor against its digest, ``ledger input`` printed whatever the row held.
    The check is now the stored tensor's own (``StoredInput.array``), so every reader has it."""
    import subprocess
    import sys

    from riskpipe.ledger.inputs import StoredInput

    x = np.linspace(0, 1, 2000, dtype=np.float32).reshape(1, 2000)
    ref, stored = input_fields(x, "FP32", None, include=True, store=True)
    forged = StoredInput(stored.sha256, "FP32", stored.shape, np.ascontiguousarray(x[:, ::-1]).tobytes())
    path = str(tmp_path / "l.sqlite")
    with open_ledger(path) as led:
        led.append_entries([("decision", {"id": "e", "ts": "2026-01-01T00:00:00Z", "input": ref}, None)], [forged])
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "input", path, ref["sha256"]],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "does not match its digest" in r.stderr and "Traceback" not in r.stderr
    assert r.stdout == ""


def test_an_ingested_dead_letter_without_its_payload_keeps_the_payloads_digest() -> None:
    import hashlib
    from types import SimpleNamespace

    from riskpipe.cli.ledger_impl import message_entries

    payload = b"z" * 300_000
    out = dead_letter_output(Message(payload, "inferences", 1, 9), "output_too_large", "emit: too big", "dlq",
                             limit=64 * 1024)
    msg = SimpleNamespace(topic="dlq", partition=0, offset=5, timestamp=0, value=out.value, headers=out.headers)
    [(kind, rec, eid)] = message_entries(msg, "dlq")
    sha = hashlib.sha256(payload).hexdigest()
    assert kind == "dlq" and rec["reason"] == "output_too_large" and rec["digest"] == {"sha256": sha, "size": 300_000}
    assert eid == f"inferences:1:9:{sha[:16]}"  # the entry the stage wrote itself: ingest adds no second one
