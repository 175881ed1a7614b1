"""The stage, the report and the review console on one shared PostgreSQL ledger
(real broker, real PostgreSQL, real processes)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest

from ledger_records import build_ledger
from riskpipe.ledger import open_ledger
from streamkit import produce, ready_with_partitions, run_cli, stop, valid_events, wait_for

pytestmark = pytest.mark.broker


def ledger_ids(url):
    with open_ledger(url) as led:
        return [e.entry_id for e in led.records(kind="decision")]


@pytest.fixture(scope="module")
def signing_key(tmp_path_factory):
    d = tmp_path_factory.mktemp("key")
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(d / "key.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(d / "key.pem"), "-pubout", "-out", str(d / "pub.pem")], check=True)
    return d


def ledger_workers(url: str) -> set[str]:
    with open_ledger(url) as led:
        return {e.record["worker"] for e in led.records(kind="decision")}


def test_two_stages_one_killed_share_one_postgresql_ledger(pg_url, signing_key, tmp_path):
    from riskpipe.stream.broker import EmbeddedBroker

    events = valid_events("pg", 300)
    with EmbeddedBroker() as b:
        b.create_topics(["inferences"], partitions=4)
        b.create_topics()
        b.create_topics(["checkpoints"])
        cfg = tmp_path / "riskpipe.yaml"
        cfg.write_text(f"bootstrap_servers: {b.bootstrap}\nledger: ${{LEDGER_DSN}}\n"
                       "session_timeout_ms: 2000\nheartbeat_interval_ms: 600\nbatch: {max_events: 16}\n"
                       f"checkpoint: {{key_file: {signing_key / 'key.pem'}, every_records: 60, every_seconds: 5}}\n")
        env = {"LEDGER_DSN": pg_url}  # the DSN from the environment, as a Kubernetes Secret provides it
        logs = [tmp_path / f"w{i}.log" for i in range(2)]
        procs = [run_cli(["run", "--config", str(cfg), "--worker-id", f"w{i}", "-v"], env=env,
                         stderr=log.open("w")) for i, log in enumerate(logs)]
        try:
            # both stages are ready and hold partitions before the first event, and both decide
            # some of a first part before the rest arrives (w1 alone could otherwise finish much
            # of the stream while w0's first batch warms up); w0 is killed as the rest arrives
            assert wait_for(lambda: all(ready_with_partitions(log.read_text()) for log in logs), 120)
            produce(b.bootstrap, events[:100])
            assert wait_for(lambda: ledger_workers(pg_url) >= {"w0", "w1"}, 150)
            produce(b.bootstrap, events[100:])
            rc, _ = stop(procs[0], signal.SIGKILL)
            assert rc == -signal.SIGKILL
            assert len(ledger_ids(pg_url)) < 300  # killed mid-stream
            procs[0] = run_cli(["run", "--config", str(cfg), "--worker-id", "w0b"], env=env)
            assert wait_for(lambda: len(ledger_ids(pg_url)) >= 300, 200)
        finally:
            results = [stop(p) for p in procs]
        assert results[1][0] == 0, logs[1].read_text()[-2000:]
        ids = ledger_ids(pg_url)
        assert len(ids) == len(set(ids)) == 300  # every event decided once across both stages
        assert set(ids) == {e["id"] for e in events}
        from streamkit import consume_all

        published = consume_all(b.bootstrap, ["checkpoints"], timeout=3)["checkpoints"]
    with open_ledger(pg_url) as led:
        res = led.verify()
        stored = led.notes()
    assert res.ok and res.count >= 300
    assert ledger_workers(pg_url) >= {"w0", "w1"}
    assert len(stored) >= 3 and {m.value.decode("utf-8") for m in published} <= set(stored)
    assert published, "the stage publishes its checkpoints to the checkpoints topic"
    r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "ledger", "verify", pg_url, "--public-key",
                        str(signing_key / "pub.pem")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("ok:"), r.stdout + r.stderr


def test_report_on_a_postgresql_ledger(pg_url, tmp_path):
    records = build_ledger(str(tmp_path / "same.db"))
    with open_ledger(str(tmp_path / "same.db")) as lite, open_ledger(pg_url) as pg:
        pg.append_entries([(e.kind, e.record, e.entry_id) for e in lite.records()])
    outs = {}
    with_password = pg_url.replace("postgres@", "postgres:n0t-in-reports@")  # trust auth: accepted, unused
    for name, target in (("pg", with_password), ("lite", str(tmp_path / "same.db"))):
        out = tmp_path / f"{name}.json"
        r = subprocess.run([sys.executable, "-m", "riskpipe.cli", "report", "--ledger", target, "--format", "json",
                            "--out", str(out)], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert "n0t-in-reports" not in out.read_text() + r.stdout + r.stderr
        outs[name] = json.loads(out.read_text())
    assert outs["pg"]["integrity"]["ok"] is True
    assert outs["pg"]["integrity"]["verify_command"].startswith("riskpipe ledger verify postgresql://postgres:***@")
    for d in outs.values():
        d["integrity"].pop("verify_command")
    shared = [k for k in outs["lite"] if k not in ("generated", "ledger", "generated_at", "meta")]
    assert len(shared) >= 5
    for key in shared:
        assert outs["pg"][key] == outs["lite"][key], key
    assert records


def test_review_console_on_a_postgresql_ledger(pg_url, tmp_path):
    from riskpipe.metrics import ReviewMetrics
    from riskpipe.review import queue as rq
    from riskpipe.review.app import create_app
    from riskpipe.review.settings import Credentials, ReviewSettings
    from test_review_records import seed_ledger
    from test_review_security import PASSWORD, csrf_token, log_in

    seed_ledger(pg_url)
    seed_ledger(tmp_path / "same.db")
    with open_ledger(pg_url) as pg, open_ledger(str(tmp_path / "same.db")) as lite:
        assert [i.id for i in rq.pending(pg)] == [i.id for i in rq.pending(lite)] == \
            ["evt-urgent", "evt-routine", "evt-audit"]
    app = create_app(ReviewSettings(ledger=pg_url, credentials=Credentials(shared=PASSWORD)), metrics=ReviewMetrics())
    client = app.test_client()
    assert log_in(client, "dana").status_code == 302
    page = client.get("/").get_data(as_text=True)
    assert "evt-urgent" in page and "evt-routine" in page and "evt-done" not in page
    token = csrf_token(client.get("/item/evt-urgent").get_data(as_text=True))
    r = client.post("/verdict/evt-urgent", data={"csrf_token": token, "verdict": "confirmed_manipulated", "note": "pg"})
    assert r.status_code == 302
    with open_ledger(pg_url) as led:
        v = led.get("evt-urgent", kind="verdict")
        assert (v["reviewer"], v["verdict"], v["note"]) == ("dana", "confirmed_manipulated", "pg")
        assert [i.id for i in rq.pending(led)] == ["evt-routine", "evt-audit"]
        assert led.verify().ok
