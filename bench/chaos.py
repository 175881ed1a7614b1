"""Chaos run (issue 19, item 9): mixed traffic through the embedded broker onto PostgreSQL
while the stage is killed with SIGKILL, PostgreSQL is restarted, the broker is restarted
and a model returns NaN in episodes; then every event is checked.

Traffic (seeded): valid events for three models — the digits demo, a user's tabular
skops model (wine) and a TorchScript model (``flaky``, 13 wine features) that returns NaN
logits for inputs whose proline lies in a narrow window inside the data's support (a gap
no clean row comes near, see ``trigger_value``) — malformed
events (not JSON, a missing field, an unknown model, a wrong shape), exact re-sends of
earlier events, and NaN episodes (bursts of sentinel events for ``flaky``).

Chaos, in this order with ``seconds / 8`` of traffic between actions (after each one the
run waits until the stage decides again): a NaN episode, SIGKILL of the stage process
(restarted at once), a NaN episode, a PostgreSQL stop in immediate mode (every
connection dropped) for a few seconds, a broker restart, a NaN episode, a second
SIGKILL, a NaN episode. Tansu's storage here is memory: a restart loses every record, so the
producer pauses and the run waits until everything produced is decided (and harvests
the outputs published so far) before the restart; the stage's clients still see the
broker vanish and come back with empty topics.

Checks, at the end (``checks`` in the JSON; all must hold):

* every valid event decided exactly once (one ledger decision per event id), a re-sent
  duplicate never decided twice;
* every malformed event dead-lettered (a ledger ``dlq`` row with its payload's sha256)
  with its reason, never ``internal_error``;
* nothing faulty allowed: no event of a NaN episode decided ``allow``; its certificate
  is uncertified with reason ``model_fault``;
* no published record differs from its ledger row (audit: the whole record; decisions:
  the public fields), and every decided event was published;
* the ledger verifies; the stage exits 0 at the end.

    PYTHONPATH=$PWD .venv/bin/python bench/chaos.py --seconds 240 --rate 30
writes bench/results/chaos.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

TRIGGER_FEATURE, TRIGGER_WINDOW = 12, 0.75  # proline (raw units, hundreds to ~1700); smoothing sigma 0.25
TOPICS = ["inferences", "decisions", "review", "audit", "dlq"]
OUTPUTS = ["decisions", "audit", "dlq"]
MALFORMED = ("invalid_json", "missing_field", "unknown_model", "wrong_shape")


# ---------------------------------------------------------------- models ----------------
def trigger_value(X) -> float:
    """The middle of the widest gap between the data's proline values (in its middle
    range): inputs there are inside the data's support, yet no clean row comes near."""
    import numpy as np

    p = np.unique(X[:, TRIGGER_FEATURE])
    p = p[(p > np.quantile(p, 0.2)) & (p < np.quantile(p, 0.8))]
    i = int(np.argmax(np.diff(p)))
    return float((p[i] + p[i + 1]) / 2)


def nan_rows(X, trigger: float):
    """Clean rows nearest the trigger gap, moved into it: events the flaky model breaks on."""
    import numpy as np

    order = np.argsort(np.abs(X[:, TRIGGER_FEATURE] - trigger))[:6]
    rows = X[order].copy()
    rows[:, TRIGGER_FEATURE] = trigger
    return rows


def flaky_model(tmp: Path, X, y, trigger: float) -> str:
    """A TorchScript logistic model on the 13 wine features that returns NaN logits for
    every row whose proline lies within ``TRIGGER_WINDOW`` of ``trigger`` — a model broken
    for some inputs inside the data's support (so only the output contract, not the
    support signal, can keep them from being allowed)."""
    import torch

    torch.manual_seed(0)
    mu, sd = X.mean(0), X.std(0) + 1e-6

    window = TRIGGER_WINDOW

    class Flaky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.mu = torch.nn.Parameter(torch.as_tensor(mu), requires_grad=False)
            self.sd = torch.nn.Parameter(torch.as_tensor(sd), requires_grad=False)
            self.lin = torch.nn.Linear(13, 3)
            self.trigger = float(trigger)
            self.window = float(window)

        def forward(self, x):
            out = self.lin((x - self.mu) / self.sd)
            broken = ((x[:, 12] - self.trigger).abs() < self.window).unsqueeze(1)
            return torch.where(broken, torch.full_like(out, float("nan")), out)

    net = Flaky()
    opt = torch.optim.Adam(net.lin.parameters(), lr=0.05)
    xt, yt = torch.as_tensor(X), torch.as_tensor(y)
    for _ in range(200):
        loss = torch.nn.functional.cross_entropy(net(xt), yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    path = tmp / "flaky.pt"
    torch.jit.script(net).save(str(path))
    return f"{path}?shape=13"


@dataclass
class Setup:
    config: Path
    digits: object
    wine: object
    nan: object  # inputs the flaky model returns NaN for


def load_wine_X():
    from sklearn.datasets import load_wine

    return load_wine().data.astype("float32")


def write_setup(tmp: Path, bootstrap: str, dsn: str) -> Setup:
    import numpy as np

    from streamkit import digits, policy_with
    from usermodels import tabular_model

    um = tabular_model(tmp)
    data = np.load(um.data)
    trigger = trigger_value(np.concatenate([data["X"], load_wine_X()]))
    flaky = flaky_model(tmp, data["X"], data["y"], trigger)
    policy = policy_with(tmp, certifier={"method": "smoothing", "mode": "decide", "sigma": 0.25, "alpha": 0.01,
                                         "max_samples": 200})
    cfg = tmp / "chaos.yaml"
    cfg.write_text(
        f"bootstrap_servers: {bootstrap}\nledger: {dsn}\ngroup_id: chaos\npolicy: {policy}\n"
        "create_topics: true\nmetadata_max_age_ms: 1000\nsession_timeout_ms: 2000\nheartbeat_interval_ms: 600\n"
        "batch: {max_events: 32, max_wait_ms: 50}\ninfrastructure_timeout_s: 120\ncertify_batch_size: 200\n"
        "models:\n  digits: demo:digits\n"
        f"  wine: {{spec: {um.spec}, reference: {um.data}}}\n"
        f"  flaky: {{spec: '{flaky}', reference: {um.data}}}\n")
    return Setup(cfg, digits(200), data["X"], nan_rows(data["X"], trigger))


# ---------------------------------------------------------------- traffic ---------------
@dataclass
class Sent:
    kind: str  # valid | nan | duplicate | one of MALFORMED
    event_id: str | None
    sha256: str


@dataclass
class Traffic:
    """Produces the mixed traffic on a thread at ``rate`` events/s; ``paused`` holds it."""

    bootstrap: str
    setup: Setup
    rate: float
    seed: int = 0
    sent: list[Sent] = field(default_factory=list)
    nan_until: float = 0.0
    paused: threading.Event = field(default_factory=threading.Event)
    idle: threading.Event = field(default_factory=threading.Event)  # set while paused and flushed
    stopping: threading.Event = field(default_factory=threading.Event)
    errors: int = 0
    last_error: str = ""
    producers: int = 0  # producers made (a failed send replaces the producer)
    producer: Any = None  # the one in use (a KafkaProducer), on the traffic thread

    def __post_init__(self):
        self.rng = random.Random(self.seed)
        self.valid: list[tuple[bytes, bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _message(self, i: int) -> tuple[bytes | None, bytes, Sent]:
        from riskpipe.stream.events import make_event
        from streamkit import tabular_event

        r = self.rng.random()
        if time.monotonic() < self.nan_until:
            ev = tabular_event(f"nan-{i}", self.setup.nan[i % len(self.setup.nan)], model="flaky")
            kind = "nan"
        elif r < 0.08 and self.valid:
            key, value = self.rng.choice(self.valid)  # an exact re-send: skipped, never decided twice
            return key, value, Sent("duplicate", key.decode(), hashlib.sha256(value).hexdigest())
        elif r < 0.18:
            kind = MALFORMED[i % len(MALFORMED)]
            value = {
                "invalid_json": b"chaos-%d {" % i,
                "missing_field": json.dumps({"id": f"bad-{i}", "model": "wine"}).encode(),
                "unknown_model": json.dumps({"id": f"bad-{i}", "model": "nosuch", "inputs": [
                    {"name": "x", "shape": [1, 13], "datatype": "FP32", "data": [1.0] * 13}]}).encode(),
                "wrong_shape": json.dumps({"id": f"bad-{i}", "model": "digits", "inputs": [
                    {"name": "x", "shape": [1, 63], "datatype": "FP32", "data": [0.5] * 63}]}).encode(),
            }[kind]
            return None, value, Sent(kind, None, hashlib.sha256(value).hexdigest())
        elif r < 0.55:
            ev = make_event(f"dig-{i}", "digits", self.setup.digits[i % len(self.setup.digits)], upstream_risk=0.1)
            kind = "valid"
        elif r < 0.8:
            ev = tabular_event(f"wine-{i}", self.setup.wine[i % len(self.setup.wine)])
            kind = "valid"
        else:
            ev = tabular_event(f"flaky-{i}", self.setup.wine[i % len(self.setup.wine)], model="flaky")
            kind = "valid"
        key, value = ev["id"].encode(), json.dumps(ev).encode()
        self.valid.append((key, value))
        return key, value, Sent(kind, ev["id"], hashlib.sha256(value).hexdigest())

    def _producer(self):
        from kafka import KafkaProducer

        while not self.stopping.is_set():
            try:
                producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5, retries=5)
                self.producers += 1
                return producer
            except Exception:  # noqa: BLE001 - broker restarting
                time.sleep(0.5)
        return None

    def _drop_producer(self, flush: bool) -> None:
        if self.producer is not None:
            if flush:
                self.producer.flush()
            self.producer.close(timeout=None if flush else 0)
            self.producer = None

    def _run(self):
        self.producer, i, i0, t0 = self._producer(), 0, 0, time.monotonic()
        while not self.stopping.is_set():
            if self.paused.is_set():
                self._drop_producer(flush=True)
                self.idle.set()
                time.sleep(0.05)
                continue
            if self.producer is None:
                self.producer = self._producer()
                t0, i0 = time.monotonic(), i
                continue  # stopping may have been set while the broker was away
            self.idle.clear()
            key, value, sent = self._message(i)
            try:
                self.producer.send("inferences", key=key, value=value).get(timeout=30)
                self.sent.append(sent)
                i += 1
            except Exception as e:  # noqa: BLE001 - not acknowledged: counted, not expected anywhere
                # A fresh producer for the next send: kafka-python's idempotent producer stays
                # in a fatal state for good once its InitProducerId fails (Tansu answers
                # UnknownError now and then just after a restart), and every later send fails.
                self.errors += 1
                self.last_error = repr(e)[:200]
                self._drop_producer(flush=False)
                time.sleep(0.2)
                continue
            ahead = (i - i0) / self.rate - (time.monotonic() - t0)
            if ahead > 0:
                time.sleep(ahead)
        self._drop_producer(flush=True)

    def pause(self, timeout: float = 60) -> None:
        self.paused.set()
        self.idle.clear()
        if not self.idle.wait(timeout):
            raise RuntimeError("producer did not pause")

    def resume(self) -> None:
        self.paused.clear()


# ---------------------------------------------------------------- the stage -------------
class StageProcess:
    """``riskpipe run --config`` in a subprocess (stderr to a log), restartable."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.proc: subprocess.Popen | None = None
        self.kills = 0

    def start(self) -> None:
        with open(self.log, "ab") as f:
            self.proc = subprocess.Popen([sys.executable, "-m", "riskpipe.cli", "run", "--config", str(self.config)],
                                         stdout=subprocess.DEVNULL, stderr=f, env=dict(os.environ))

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self.kills += 1
        self.start()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


# ---------------------------------------------------------------- checking --------------
def ledger_state(dsn: str) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(decision records by event id, dlq records by payload sha256)."""
    from riskpipe.ledger import open_ledger

    decided: dict[str, list[dict]] = {}
    dead: dict[str, list[dict]] = {}
    with open_ledger(dsn) as led:
        for e in led.records(kind="decision"):
            decided.setdefault(e.record["id"], []).append(e.record)
        for e in led.records(kind="dlq"):
            dead.setdefault(e.record["digest"]["sha256"], []).append(e.record)
    return decided, dead


def wait_started(dsn: str, stage: StageProcess, timeout: float = 300) -> None:
    """Until the stage has recorded its policies (it is past start-up and consuming)."""
    from riskpipe.ledger import open_ledger

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stage.proc.poll() is not None:
            raise RuntimeError(f"stage exited with {stage.proc.returncode} at start-up: see {stage.log}")
        try:
            with open_ledger(dsn) as led:
                if led.count("policy"):
                    return
        except Exception:  # noqa: BLE001 - the ledger's tables are created by the stage
            pass
        time.sleep(0.5)
    raise RuntimeError("stage did not start")


def wait_progress(dsn: str, traffic: Traffic, timeout: float = 300) -> float:
    """Seconds until the ledger holds more decisions than now (the stage is back at work)."""
    t0 = time.monotonic()
    before = None
    while time.monotonic() - t0 < timeout:
        try:
            n = sum(len(v) for v in ledger_state(dsn)[0].values())
            if before is None:
                before = n
            elif n > before:
                return round(time.monotonic() - t0, 1)
        except Exception:  # noqa: BLE001 - PostgreSQL restarting
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the stage made no progress within {timeout:g} s (traffic: {len(traffic.sent)} sent, "
                       f"{traffic.errors} failed sends, {traffic.producers} producers, last error "
                       f"{traffic.last_error or 'none'})")


def accounted(sent: list[Sent], decided: dict, dead: dict) -> bool:
    return all((s.event_id in decided) if s.kind in ("valid", "nan", "duplicate") else (s.sha256 in dead)
               for s in sent)


def wait_drained(traffic: Traffic, dsn: str, timeout: float) -> float:
    """Seconds until everything sent so far is in the ledger (decided or dead-lettered)."""
    t0 = time.monotonic()
    sent = list(traffic.sent)
    while time.monotonic() - t0 < timeout:
        try:
            if accounted(sent, *ledger_state(dsn)):
                return time.monotonic() - t0
        except Exception:  # noqa: BLE001 - PostgreSQL restarting
            pass
        time.sleep(1.0)
    raise RuntimeError(f"not drained within {timeout:g} s")


def harvest(bootstrap: str, into: dict[str, list]) -> None:
    from streamkit import consume_all

    for topic, recs in consume_all(bootstrap, OUTPUTS, timeout=6).items():
        into[topic].extend(recs)


def check(traffic: Traffic, dsn: str, published: dict[str, list]) -> tuple[dict, dict]:
    from riskpipe.ledger import open_ledger

    decided, dead = ledger_state(dsn)
    with open_ledger(dsn) as led:
        verify = led.verify()
        rows = led.count()
    sent = traffic.sent
    valid_ids = {s.event_id for s in sent if s.kind in ("valid", "nan")}
    nan_ids = {s.event_id for s in sent if s.kind == "nan"}
    malformed = [s for s in sent if s.kind in MALFORMED]
    outcomes = Counter(recs[0]["decision"] for recs in decided.values())
    dlq_reasons = Counter(r["reason"] for recs in dead.values() for r in recs)
    faulty_allowed = sorted(i for i in nan_ids if i in decided and decided[i][0]["decision"] == "allow")
    faulty_certified = sorted(i for i in nan_ids if i in decided and not decided[i][0]["certificate"]["abstained"])
    nan_reasons = Counter(decided[i][0]["certificate"].get("reason") for i in nan_ids if i in decided)
    audit_mismatch = public_mismatch = 0
    for m in published["audit"]:
        rec = json.loads(m.value)
        audit_mismatch += rec != (decided.get(rec["id"]) or [None])[0]
    for m in published["decisions"]:
        pub = json.loads(m.value)
        row = (decided.get(pub["id"]) or [None])[0]
        public_mismatch += row is None or pub.get("decision") != row["decision"] or any(
            pub[k] != row[k] for k in pub if k in row)
    published_ids = {json.loads(m.value)["id"] for m in published["decisions"]}
    checks = {
        "every_valid_event_decided": valid_ids <= set(decided),
        "decided_once": all(len(v) == 1 for v in decided.values()),
        "nothing_decided_that_was_not_sent": set(decided) <= valid_ids,
        "every_malformed_event_dead_lettered_with_its_reason": all(
            s.sha256 in dead and dead[s.sha256][0]["reason"] == s.kind for s in malformed),
        "no_internal_error": dlq_reasons.get("internal_error", 0) == 0,
        "nothing_faulty_allowed": not faulty_allowed,
        "faulty_never_certified": not faulty_certified,
        "faulty_reason_is_model_fault": all(decided[i][0]["certificate"].get("reason") == "model_fault"
                                            for i in nan_ids if i in decided),
        "published_audit_equals_ledger": audit_mismatch == 0,
        "published_decisions_agree_with_ledger": public_mismatch == 0,
        "every_decision_published": set(decided) <= published_ids,
        "ledger_verifies": bool(verify.ok),
    }
    figures = {
        "events_sent": len(sent),
        "events_by_kind": dict(Counter(s.kind for s in sent)),
        "unacknowledged_sends": traffic.errors,
        "decided": len(decided),
        "decisions": dict(outcomes),
        "dlq_by_reason": dict(dlq_reasons),
        "nan_events": len(nan_ids),
        "nan_events_by_certificate_reason": {str(k): v for k, v in nan_reasons.items()},
        "nan_events_allowed": len(faulty_allowed),
        "published": {t: len(v) for t, v in published.items()},
        "published_audit_mismatches": audit_mismatch,
        "published_decision_mismatches": public_mismatch,
        "ledger_rows": rows,
    }
    return checks, figures


# ---------------------------------------------------------------- the run ---------------
def run_chaos(workdir: Path, seconds: float = 240.0, rate: float = 30.0, seed: int = 0) -> dict:
    from pgserver import PostgresServer
    from riskpipe.stream.broker import EmbeddedBroker

    workdir = Path(workdir)
    log = workdir / "stage.log"
    published: dict[str, list] = {t: [] for t in OUTPUTS}
    chaos: list[dict] = []
    t_setup = time.monotonic()
    with PostgresServer() as pg, EmbeddedBroker() as broker:
        broker.create_topics(TOPICS)
        dsn = pg.create_database("chaos")
        setup = write_setup(workdir, broker.bootstrap, dsn)
        stage = StageProcess(setup.config, log)
        stage.start()
        wait_started(dsn, stage)
        startup_s = time.monotonic() - t_setup
        t_start = time.monotonic()
        traffic = Traffic(broker.bootstrap, setup, rate, seed)
        traffic.thread.start()

        def note(what: str, **kw) -> None:
            chaos.append({"t_s": round(time.monotonic() - t_start, 1), "what": what, **kw})

        def nan_episode(length_s: float) -> None:
            traffic.nan_until = time.monotonic() + length_s
            note("nan_episode", seconds=length_s)

        step = seconds / 8  # traffic between chaos actions
        episode = max(1.0, seconds / 40)

        def sigkill_between_nan_episodes() -> None:
            """NaN traffic, SIGKILL the stage and wait until it (restarted) makes progress, NaN traffic again."""
            nan_episode(episode)
            time.sleep(step)
            stage.kill9()
            note("stage_sigkill")
            note("stage_back", waited_s=wait_progress(dsn, traffic))
            nan_episode(episode)
            time.sleep(step)

        try:
            time.sleep(step)
            sigkill_between_nan_episodes()
            pg.halt()
            note("postgresql_stop")
            time.sleep(min(5.0, max(2.0, seconds / 40)))
            pg.resume()
            note("postgresql_start")
            note("stage_progress", waited_s=wait_progress(dsn, traffic))
            time.sleep(step)
            traffic.pause()
            drained = wait_drained(traffic, dsn, 240)
            harvest(broker.bootstrap, published)
            broker.restart()
            broker.create_topics(TOPICS)
            note("broker_restart", drained_s=round(drained, 1))
            traffic.resume()
            note("stage_progress", waited_s=wait_progress(dsn, traffic))
            sigkill_between_nan_episodes()
            traffic.pause()
            note("traffic_stopped")
            drained = wait_drained(traffic, dsn, 300)
            note("drained", seconds=round(drained, 1))
            harvest(broker.bootstrap, published)
        finally:
            traffic.stopping.set()
            traffic.paused.clear()
            traffic.thread.join(timeout=60)
            rc = stage.stop()
        checks, figures = check(traffic, dsn, published)
    checks["stage_exit_0"] = rc == 0
    text = log.read_text(errors="replace")
    figures.update({
        "duration_s": round(time.monotonic() - t_start, 1),
        "setup_s": round(startup_s, 1),
        "traffic_seconds": seconds,
        "rate_events_per_s": rate,
        "restarts": {"stage_sigkill": stage.kills, "postgresql": sum(c["what"] == "postgresql_stop" for c in chaos),
                     "broker": sum(c["what"] == "broker_restart" for c in chaos)},
        "nan_episodes": sum(c["what"] == "nan_episode" for c in chaos),
        "stage_log_outage_lines": {c: text.count(f"{c} unavailable (") for c in ("ledger", "broker")},
        # input partitions the stage found re-created after the broker restart and read again from their start
        "stage_log_partitions_recreated": text.count(" was re-created (topic id "),
        "stage_log_tracebacks": text.count("Traceback"),
        "stage_exit_code": rc,
    })
    return {"ok": all(checks.values()), "checks": checks, "figures": figures, "timeline": chaos, "code": _code()}


def _code() -> str:
    """The commit the run measured (``+dirty`` with uncommitted changes)."""
    root = HERE.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "") if head else "unknown"


def main() -> int:
    from common import write_results

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=240.0, help="traffic duration (chaos at fixed fractions)")
    ap.add_argument("--rate", type=float, default=30.0, help="events per second")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="riskpipe-chaos-") as tmp:
        result = run_chaos(Path(tmp), args.seconds, args.rate, args.seed)
    path = write_results("chaos", result)
    print(json.dumps({"ok": result["ok"], "checks": result["checks"], "figures": result["figures"]}, indent=2))
    print(f"wrote {path}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
