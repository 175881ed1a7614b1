"""Open Inference Protocol binary tensors: decoded, decided offline and through the
broker, and every malformed form dead-lettered with its reason and original bytes."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch

from riskpipe.stream.binary import make_binary_event
from riskpipe.stream.errors import EventError
from riskpipe.stream.events import parse_event
from riskpipe.stream.io import JsonlSink, Message
from streamkit import ListSource

BIG = (3, 224, 224)


def _tiny_cnn(shape) -> torch.nn.Module:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(shape[0], 4, 8, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 3)).eval()


@pytest.fixture(scope="module")
def big_spec(tmp_path_factory):
    """A 3x224x224 TorchScript model whose declared value range is [-1, 1]."""
    from synthetic import save_torchscript

    path = tmp_path_factory.mktemp("big") / "big.pt"
    return save_torchscript(_tiny_cnn(BIG), path, BIG) + "&range=-1,1"


@pytest.fixture(scope="module")
def models(demo_model, big_spec):
    from riskpipe.models import load_model

    return {"digits": demo_model, "big": load_model(big_spec)}


def _parse(value, headers, models, **kw):
    return parse_event(value, headers, models, **kw)


def test_each_datatype_decodes_to_the_same_input(models) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(1, 8, 8), dtype=np.uint8)
    x = pixels.astype(np.float32) / 255
    for dt, arr, tol in (("FP32", x, 0.0), ("FP16", x, 1e-3), ("UINT8", pixels, 1e-6)):
        ev = _parse(*make_binary_event(f"e-{dt}", "digits", arr, dt, upstream_risk=0.2), models)
        assert ev.id == f"e-{dt}" and ev.datatype == dt and ev.upstream_risk == 0.2
        assert ev.x.shape == (1, 8, 8) and ev.x.dtype == np.float32
        np.testing.assert_allclose(ev.x, x, atol=tol)


def test_uint8_maps_onto_the_models_declared_range(models) -> None:
    pixels = np.zeros(BIG, np.uint8)
    pixels[0, 0, :3] = (0, 128, 255)
    ev = _parse(*make_binary_event("img", "big", pixels, "UINT8"), models)
    assert ev.x.shape == BIG
    np.testing.assert_allclose(ev.x[0, 0, :3], [-1.0, -1 + 2 * 128 / 255, 1.0], atol=1e-6)
    assert ev.x.min() == -1.0
    # the JSON form means the same thing by UINT8
    obj = {"id": "j", "model": "digits", "inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8",
                                                     "data": [255] * 64}]}
    assert (_parse(json.dumps(obj).encode(), [], models).x == 1.0).all()
    obj["inputs"][0]["data"] = [256] * 64
    with pytest.raises(EventError) as e:
        _parse(json.dumps(obj).encode(), [], models)
    assert e.value.code == "out_of_range"


def _malformed(models) -> dict[str, tuple[bytes, list]]:
    """One message per malformed case, keyed by the case; values are (value, headers)."""
    x = np.full((1, 8, 8), 0.5, np.float32)
    value, headers = make_binary_event("m", "digits", x, "FP32")
    n = int(headers[0][1])
    head = json.loads(value[:n])

    def with_head(mutate, payload=value[n:]):
        h = json.loads(json.dumps(head))
        mutate(h)
        hb = json.dumps(h).encode()
        return hb + payload, [("Inference-Header-Content-Length", str(len(hb)).encode())]

    def param(**kw):
        return lambda h: h["inputs"][0]["parameters"].update(kw)

    return {
        "header_not_integer": (value, [("Inference-Header-Content-Length", b"12a")]),
        "header_beyond_message": (value, [("Inference-Header-Content-Length", str(len(value) + 1).encode())]),
        "header_zero": (value, [("Inference-Header-Content-Length", b"0")]),
        # int() reads these; a reader that wants digits refuses them or splits elsewhere
        "header_spaced": (value, [("Inference-Header-Content-Length", f" {n} ".encode())]),
        "header_signed": (value, [("Inference-Header-Content-Length", f"+{n}".encode())]),
        "header_underscore": (value, [("Inference-Header-Content-Length", f"{n // 10}_{n % 10}".encode())]),
        "header_other_digits": (value, [("Inference-Header-Content-Length",
                                         "".join(chr(0x660 + int(c)) for c in str(n)).encode())]),
        "header_cuts_json": (value, [("Inference-Header-Content-Length", str(n - 3).encode())]),
        "size_negative": with_head(param(binary_data_size=-4)),
        "size_not_integer": with_head(param(binary_data_size="256")),
        "size_beyond_payload": with_head(param(binary_data_size=4096)),
        "sizes_do_not_add_up": with_head(lambda h: None, payload=value[n:] + b"\0\0\0\0"),
        "unknown_datatype": with_head(lambda h: h["inputs"][0].update(datatype="FP64")),
        "integer_datatype": with_head(lambda h: h["inputs"][0].update(datatype="INT32")),
        "shape_vs_bytes": with_head(lambda h: h["inputs"][0].update(shape=[1, 1, 8, 4])),
        "data_and_binary": with_head(lambda h: h["inputs"][0].update(data=[0.0] * 64)),
        "json_too_big_for_json_limit": (json.dumps({"id": "b", "pad": "x" * 3000}).encode(), []),
        "binary_over_binary_limit": make_binary_event("m", "digits", np.zeros((1, 64, 64), np.float32)),
    }


EXPECTED = {
    "header_not_integer": "bad_binary_header", "header_beyond_message": "bad_binary_header",
    "header_zero": "bad_binary_header", "header_cuts_json": "invalid_json",
    "header_spaced": "bad_binary_header", "header_signed": "bad_binary_header",
    "header_underscore": "bad_binary_header", "header_other_digits": "bad_binary_header",
    "size_negative": "binary_size_mismatch", "size_not_integer": "binary_size_mismatch",
    "size_beyond_payload": "binary_size_mismatch", "sizes_do_not_add_up": "binary_size_mismatch",
    "unknown_datatype": "wrong_dtype", "integer_datatype": "wrong_dtype", "shape_vs_bytes": "wrong_shape",
    "data_and_binary": "wrong_type", "json_too_big_for_json_limit": "oversized",
    "binary_over_binary_limit": "oversized",
}
LIMITS = {"max_bytes": 2048, "max_binary_bytes": 8192}


def test_every_malformed_binary_message_has_its_reason(models) -> None:
    cases = _malformed(models)
    assert set(cases) == set(EXPECTED)
    for case, (value, headers) in cases.items():
        with pytest.raises(EventError) as e:
            _parse(value, headers, models, **LIMITS)
        assert e.value.code == EXPECTED[case], (case, str(e.value))
        assert ":" in str(e.value)
    # a binary event is held to the binary limit, not the (smaller) JSON one
    ok = make_binary_event("m", "digits", np.zeros((1, 8, 8), np.float32))
    assert len(ok[0]) > 256 and _parse(*ok, models, max_bytes=1024, max_binary_bytes=8192).id == "m"


def _valid_messages(n_digits: int = 2) -> list[tuple[str, bytes, list]]:
    from streamkit import digits

    X = digits(3 * n_digits)
    out = []
    for k, dt in enumerate(("FP32", "FP16", "UINT8")):
        for i in range(n_digits):
            x = X[k * n_digits + i]
            arr = np.round(x * 255).astype(np.uint8) if dt == "UINT8" else x
            eid = f"{dt}-{i}"
            out.append((eid, *make_binary_event(eid, "digits", arr, dt, upstream_risk=0.1)))
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=BIG, dtype=np.uint8)
    out.append(("img-224", *make_binary_event("img-224", "big", img, "UINT8", upstream_risk=0.1)))
    return out


def _pipeline(big_spec, tmp_path):
    import yaml

    from riskpipe.app.compose import build_pipeline
    from riskpipe.app.config import load_config
    from synthetic import policy_without_context

    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump({"policy": policy_without_context(tmp_path),
                                    "models": {"digits": "demo:digits", "big": big_spec}}))
    return build_pipeline(load_config(str(path)))


def test_offline_stage_decides_binary_events_and_dead_letters_the_rest(tmp_path, models, big_spec) -> None:
    from riskpipe.app.config import load_config
    from riskpipe.stream.stage import Stage

    valid = _valid_messages()
    bad = _malformed(models)
    msgs = [Message(v, "inferences", 0, i, eid.encode(), h) for i, (eid, v, h) in enumerate(valid)]
    msgs += [Message(v, "inferences", 0, 100 + i, case.encode(), h) for i, (case, (v, h)) in enumerate(bad.items())]
    cfg = load_config(None, max_message_bytes=LIMITS["max_bytes"], max_binary_message_bytes=1 << 20,
                      batch={"max_events": 64, "max_wait_ms": 10})
    stage = Stage(cfg, _pipeline(big_spec, tmp_path), lambda r: ListSource(msgs), lambda: JsonlSink(str(tmp_path)))
    stats = stage.run()
    audit = [json.loads(s) for s in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in audit) == sorted(eid for eid, _, _ in valid)
    by_id = {r["id"]: r for r in audit}
    assert by_id["img-224"]["input"]["shape"] == list(BIG) and by_id["img-224"]["input"]["datatype"] == "UINT8"
    assert by_id["img-224"]["decision"] in ("allow", "review", "block")
    assert {by_id[f"{dt}-0"]["input"]["datatype"] for dt in ("FP32", "FP16", "UINT8")} == {"FP32", "FP16", "UINT8"}
    dlq = [json.loads(s) for s in (tmp_path / "dlq.jsonl").read_text().splitlines()]
    # the 1 MiB binary limit here admits binary_over_binary_limit; its 64x64 shape is what is wrong
    expect = {**EXPECTED, "binary_over_binary_limit": "wrong_shape"}
    assert sorted(d["headers"]["__riskpipe.errors.reason"] for d in dlq) == sorted(expect.values())
    assert stats.decided == len(valid) and sum(stats.dlq.values()) == len(bad)
    originals = {v for v, _ in bad.values()}
    kept = {base64.b64decode(d["value_base64"]) if "value_base64" in d else d["value"].encode() for d in dlq}
    assert kept == originals  # every original byte kept, binary ones base64 in the file


@pytest.mark.broker
def test_broker_stage_decides_binary_events_and_dead_letters_the_rest(tmp_path, models, big_spec) -> None:
    from riskpipe.app.config import load_config
    from riskpipe.ledger import Ledger
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import StageThread, consume_all, ledger_ids, produce, wait_for

    valid = _valid_messages(n_digits=3)
    bad = _malformed(models)
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        produce(b.bootstrap, [(v, h) for _, v, h in valid] + list(bad.values()))
        cfg = load_config(None, bootstrap_servers=b.bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=600,
                          max_message_bytes=LIMITS["max_bytes"], max_binary_message_bytes=LIMITS["max_binary_bytes"],
                          batch={"max_events": 64, "max_wait_ms": 20})
        ledger_path = tmp_path / "l.sqlite"
        with Ledger(str(ledger_path)) as led, StageThread(cfg, _pipeline(big_spec, tmp_path), led) as stage:
            total = len(valid) + len(bad)
            assert wait_for(lambda: stage.stats.decided + sum(stage.stats.dlq.values()) >= total, 120)
        out = consume_all(b.bootstrap, ["audit", "dlq"], expect=total)
    want = {eid for eid, _, _ in valid if eid != "img-224"}  # 150 KB: over this test's 8 KiB binary limit
    assert {json.loads(m.value)["id"] for m in out["audit"]} == want
    assert sorted(ledger_ids(str(ledger_path))) == sorted(want)
    reasons = sorted(dict(m.headers)["__riskpipe.errors.reason"].decode() for m in out["dlq"])
    assert reasons == sorted([*EXPECTED.values(), "oversized"])
    assert {m.value for m in out["dlq"]} == {v for v, _ in bad.values()} | {valid[-1][1]}  # original bytes


@pytest.mark.broker
def test_broker_stage_decides_a_224x224_uint8_image(tmp_path, big_spec) -> None:
    from riskpipe.app.config import load_config
    from riskpipe.stream.broker import EmbeddedBroker
    from streamkit import StageThread, consume_all, produce, wait_for

    _, value, headers = _valid_messages(n_digits=0)[-1]
    with EmbeddedBroker() as b:
        b.create_topics(partitions=1)
        produce(b.bootstrap, [(value, headers)])
        cfg = load_config(None, bootstrap_servers=b.bootstrap, session_timeout_ms=2000, heartbeat_interval_ms=600,
                          batch={"max_events": 8, "max_wait_ms": 20})
        with StageThread(cfg, _pipeline(big_spec, tmp_path)) as stage:
            assert wait_for(lambda: stage.stats.decided >= 1, 120)
        out = consume_all(b.bootstrap, ["decisions", "audit"], expect=2)
    rec = json.loads(out["audit"][0].value)
    assert rec["id"] == "img-224" and rec["input"]["shape"] == list(BIG)
    assert json.loads(out["decisions"][0].value)["decision"] == rec["decision"]


def test_the_binary_header_is_a_valid_event_under_the_published_schema() -> None:
    from importlib.resources import files

    import jsonschema

    schema = json.loads(files("riskpipe").joinpath("schemas/inference-event.v1.json").read_text())
    value, headers = make_binary_event("s", "digits", np.zeros((1, 8, 8), np.uint8), "UINT8")
    jsonschema.validate(json.loads(value[:int(headers[0][1])]), schema)
    both = {"id": "s", "model": "digits", "inputs": [{"name": "i", "shape": [1], "datatype": "FP32", "data": [0.0],
                                                      "parameters": {"binary_data_size": 4}}]}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(both, schema)
