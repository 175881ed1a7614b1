"""The stage in offline mode (JSON lines in, JSON lines out): same code path as Kafka."""

import json
import subprocess
import sys

import pytest

from riskpipe.app.config import ConfigError, load_config
from riskpipe.app.offline import run_offline
from riskpipe.stream.events import make_event
from streamkit import digits


@pytest.fixture(scope="module")
def pipeline():
    from riskpipe.app.compose import build_pipeline

    return build_pipeline(load_config(None))


def events(n, prefix="o"):
    return [make_event(f"{prefix}-{i}", "digits", x, upstream_risk=0.05, prediction=1) for i, x in enumerate(digits(n))]


def test_offline_outputs_and_record_contract(tmp_path, pipeline):
    from riskpipe.ledger import Ledger

    evs = events(30) + [{"id": "bad", "model": "digits"}]
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        res = run_offline(evs, tmp_path / "out", load_config(None), pipeline=pipeline, ledger=led)
        assert led.count("decision") == 30 and led.count("dlq") == 1 and led.count("policy") == 1
        assert led.verify().ok
    assert res.stats.decided == 30 and dict(res.stats.dlq) == {"missing_field": 1}
    audit = res.read("audit")
    assert [r["id"] for r in audit] == [e["id"] for e in evs[:30]]
    r = audit[0]
    for key in ("id", "ts", "model", "policy", "certificate", "context", "signals", "score", "decision", "reasons",
                "controls", "review", "explanation", "scope", "input", "source", "worker"):
        assert key in r, key
    assert r["policy"]["sha256"] and r["policy"]["version"]
    c = r["certificate"]
    assert c["method"] == "smoothing" and c["mode"] == "decide" and c["threat_norm"] == "l2"
    assert c["radius_threat"] == pytest.approx(c["radius"])  # l2 policy: no conversion
    assert len(r["input"]["sha256"]) == 64
    for rec in audit:  # every event says prediction=1: the record says whether the certificate agrees
        cls = rec["certificate"]["predicted_class"]
        assert rec["prediction_agrees"] == (None if cls is None else cls == 1)
        if rec["prediction_agrees"] is False:
            assert rec["decision"] == "review" and "prediction_mismatch" in rec["reasons"]
    for d in res.read("decisions"):
        assert set(d) <= {"id", "ts", "decision", "policy_version"}
    dlq = res.read("dlq")[0]
    assert dlq["headers"]["__riskpipe.errors.reason"] == "missing_field"
    assert json.loads(dlq["value"]) == {"id": "bad", "model": "digits"}


def test_seeded_certificates_are_reproducible(tmp_path, pipeline):
    evs = events(8, "rep")
    a = run_offline(evs, tmp_path / "a", load_config(None), pipeline=pipeline).read("audit")
    b = run_offline(evs, tmp_path / "b", load_config(None), pipeline=pipeline).read("audit")
    strip = lambda r: {k: v for k, v in r["certificate"].items() if k != "elapsed_ms"}  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b]
    assert [r["decision"] for r in a] == [r["decision"] for r in b]


def test_outputs_follow_the_configured_topic_names(tmp_path, pipeline):
    """A config that renames the topics gets its files under those names, a rerun replaces
    them, and ``read`` finds them by kind (it read ``audit.jsonl`` whatever the topic was)."""
    topics = {"decisions": "risk-decisions", "review": "risk-review", "audit": "risk-audit", "dlq": "risk-dlq"}
    config = load_config(None, topics=topics)
    evs = events(6, "named") + [{"id": "bad", "model": "digits"}]
    for _ in range(2):
        res = run_offline(evs, tmp_path / "out", config, pipeline=pipeline)
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert {"risk-audit.jsonl", "risk-decisions.jsonl", "risk-dlq.jsonl"} <= set(files), files
    assert not any(p in files for p in ("audit.jsonl", "decisions.jsonl", "dlq.jsonl"))
    assert [r["id"] for r in res.read("audit")] == [e["id"] for e in evs[:6]]  # replaced, not appended
    assert len(res.read("decisions")) == 6 and len(res.read("dlq")) == 1
    assert len(res.read("review")) == sum(r["decision"] == "review" for r in res.read("audit"))
    with pytest.raises(ValueError, match="'checkpoints' is not one of decisions, review, audit, dlq"):
        res.read("checkpoints")


def test_second_run_over_same_ledger_decides_nothing_twice(tmp_path, pipeline):
    from riskpipe.ledger import Ledger

    evs = events(12, "dup")
    with Ledger(str(tmp_path / "l.sqlite")) as led:
        run_offline(evs, tmp_path / "o1", load_config(None), pipeline=pipeline, ledger=led)
        res = run_offline(evs, tmp_path / "o2", load_config(None), pipeline=pipeline, ledger=led)
        assert res.stats.decided == 0 and res.stats.duplicates == 12 and led.count("decision") == 12


def test_upstream_risk_malformed_is_flagged_not_dropped(tmp_path, pipeline):
    ev = make_event("ur", "digits", digits(1)[0], upstream_risk="very high")
    r = run_offline([ev], tmp_path / "o", load_config(None), pipeline=pipeline).read("audit")[0]
    assert r["signals"]["upstream_risk"]["flagged"] is True


def test_run_command_offline_and_config_errors(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(json.dumps(e) for e in events(5, "cli")) + "\n{broken\n")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--source", f"jsonl:{src}", "--sink",
                        f"jsonl:{out}", "--ledger", str(tmp_path / "l.sqlite")], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "decided 5 events, 1 to the DLQ" in r.stderr
    assert len((out / "audit.jsonl").read_text().splitlines()) == 5
    bad = tmp_path / "c.yaml"
    bad.write_text("batch: {max_events: 0}\n")
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(bad)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode != 0 and "batch.max_events" in r.stderr and "Traceback" not in r.stderr


def test_config_expands_environment_and_rejects_unknown_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("KAFKA_PASS", "s3cret")
    f = tmp_path / "c.yaml"
    f.write_text("sasl_plain_password: ${KAFKA_PASS}\nsasl_plain_username: u\nsecurity_protocol: SASL_SSL\n"
                 "sasl_mechanism: PLAIN\n")
    cfg = load_config(str(f))
    assert cfg.kafka().client_options()["sasl_plain_password"] == "s3cret"
    f.write_text("bootstrap_server: x\n")
    with pytest.raises(ConfigError, match="bootstrap_server"):
        load_config(str(f))


_FSIZE_LIMITED = r"""
import json, os, resource, signal, sys
from riskpipe.stream.io import JsonlSink
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, like a full disk
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
out = sys.argv[1]
sink = JsonlSink(out)
for i in range(3):
    sink.send("audit", None, json.dumps({"id": f"a-{i}"}).encode())
    sink.send("decisions", None, json.dumps({"id": f"a-{i}"}).encode())
sink.flush()
resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(f"{out}/audit.jsonl") + 100, hard))
sink.send("decisions", None, json.dumps({"id": "b-0"}).encode())
sink.send("audit", None, json.dumps({"id": "b-0", "pad": "x" * 5000}).encode())
try:
    sink.flush()
except OSError as e:
    print("flush failed", e.errno)
sink.close()  # must not raise: the stage calls it while it handles the outage
print("closed")
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
sink = JsonlSink(out)  # the stage resumes
sink.send("audit", None, json.dumps({"id": "b-0"}).encode())
sink.send("decisions", None, json.dumps({"id": "b-0"}).encode())
sink.close()
"""


def test_a_failed_sink_flush_leaves_whole_lines_and_close_does_not_raise(tmp_path):
    """A flush that fails (the disk full; here a file size limit: EFBIG) cuts every output
    file back to where the last flush left it and close() does not raise; the resumed sink
    appends whole lines. Before, close() flushed again and raised inside the stage's outage
    handler (exit 2), and audit.jsonl kept a torn JSON record."""
    import errno

    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", _FSIZE_LIMITED, str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert f"flush failed {errno.EFBIG}" in r.stdout and "closed" in r.stdout, r.stdout + r.stderr
    for name in ("audit.jsonl", "decisions.jsonl"):
        raw = (out / name).read_bytes()
        assert raw.endswith(b"\n")
        ids = [json.loads(line)["id"] for line in raw.splitlines()]
        assert ids == ["a-0", "a-1", "a-2", "b-0"], (name, ids)  # b-0's failed flush kept in neither file


def test_a_sink_file_ending_in_a_torn_line_is_cut_back_before_appending(tmp_path):
    from riskpipe.stream.io import JsonlSink

    (tmp_path / "audit.jsonl").write_bytes(b'{"id": "a-0"}\n{"id": "a-1", "cert')
    sink = JsonlSink(str(tmp_path))
    sink.send("audit", None, b'{"id": "a-1"}')
    sink.close()
    assert (tmp_path / "audit.jsonl").read_bytes() == b'{"id": "a-0"}\n{"id": "a-1"}\n'


def test_a_full_disk_under_the_offline_sink_pauses_then_exits_4_with_whole_lines(tmp_path, pg_url):
    """The output files hit a file size limit mid-run (EFBIG, as a full disk gives ENOSPC):
    the sink is the unavailable component, the stage retries, and past
    infrastructure_timeout_s exits 4 in one line (it stopped with exit 2, the config
    error's code, raised again by close() inside the outage handler), every output file
    ending in whole lines that agree on the events they hold."""
    import resource
    import signal

    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(e) + "\n" for e in events(40, "full")))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"ledger: {pg_url}\ninfrastructure_timeout_s: 2\nbatch: {{max_events: 8}}\n")
    out = tmp_path / "out"

    def limit():  # the ledger is PostgreSQL, a process of its own: only the outputs hit it
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(cfg), "--source", f"jsonl:{src}",
                        "--sink", f"jsonl:{out}"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
    assert r.returncode == 4, r.stderr[-3000:]
    assert "riskpipe: error: broker unavailable for" in r.stderr and "infrastructure_timeout_s 2" in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    held = {}
    for name in ("audit.jsonl", "decisions.jsonl"):
        raw = (out / name).read_bytes()
        assert raw == b"" or raw.endswith(b"\n"), name
        held[name] = [json.loads(line)["id"] for line in raw.splitlines()]
    assert held["audit.jsonl"] and held["audit.jsonl"] == held["decisions.jsonl"], held
    assert len(held["audit.jsonl"]) < 40
