"""``riskpipe demo``: the whole product on one machine in under two minutes.

Starts the embedded broker, prepares the demo model, streams the digits test split,
PGD-attacked digits and one malformed event per dead-letter reason a producer can
cause, runs the stage (metrics and the review console served meanwhile), and ends
with a summary, a compliance report and the paths of everything written.

It sits on the entry floor beside the CLI (tests/test_architecture.py, ``FLOORS``), not
in riskpipe/app/: it drives the review console and the compliance report, which read
the app's config, so inside app/ it would make app and review/report import each other.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from riskpipe import kafka_clients
from riskpipe.app.compose import build_stage
from riskpipe.app.config import load_config
from riskpipe.attacks import pgd
from riskpipe.ledger import Ledger
from riskpipe.metrics import StageMetrics
from riskpipe.models import load_model
from riskpipe.models.digits import load_split
from riskpipe.report import write_report
from riskpipe.review import serve_background
from riskpipe.stream.binary import make_binary_event
from riskpipe.stream.broker import EmbeddedBroker
from riskpipe.stream.events import make_event


@dataclass
class DemoEvents:
    messages: list = field(default_factory=list)  # (key, value bytes, headers)
    clean: int = 0
    attacked: int = 0
    malformed: dict = field(default_factory=dict)


def malformed_events(x: np.ndarray, max_bytes: int, taken: dict) -> list[tuple[str, str | None, bytes, list]]:
    """One event per DLQ reason a producer can cause, each as (reason it must get, key,
    value, headers). ``taken`` is a valid event sent before these: the ``id_conflict``
    one reuses its id (and key, so it lands on the same partition, after it) with
    another input.

    ``output_too_large`` is an event the stage accepts (just under ``max_bytes``) whose
    full record, which echoes its context, cannot fit the output limit.

    Not here: ``off_grid`` (only a policy with the sound sampler has a grid; the demo's
    is Gaussian), ``internal_error`` (a fault of the stage, not of the input) and
    ``model_timeout`` (a model that never returns on an input: the demo's always does)."""

    good = make_event("bad-0", "digits", x)
    flat = good["inputs"][0]["data"]

    def ev(**changes):
        e = json.loads(json.dumps(good))
        t = e["inputs"][0]
        for k, v in changes.items():
            (t if k in t else e)[k] = v
        return json.dumps(e).encode()

    # a valid event just under the event limit whose free-form context every full record
    # echoes: decided, but its audit record exceeds max_output_bytes (the same limit by default)
    pad = max_bytes - len(ev(id="bad-big-record", context={"note": ""})) - 256
    big_record = ev(id="bad-big-record", context={"note": "x" * pad})
    binary, binary_headers = make_binary_event("bad-bin", "digits", x)
    head_length = binary_headers[0][1]
    conflict = json.loads(json.dumps(taken))
    conflict["inputs"][0]["data"] = [round(1.0 - v, 4) for v in conflict["inputs"][0]["data"]]
    return [
        ("invalid_json", None, b'{"id": "bad-json", "model": "digits", "inputs": [', []),
        ("not_an_object", None, b'["bad-array", "digits"]', []),
        ("missing_field", None, json.dumps({"id": "bad-missing", "model": "digits"}).encode(), []),
        ("wrong_type", None, ev(data=["0.5"] + flat[1:]), []),
        ("wrong_dtype", None, ev(datatype="BYTES"), []),
        ("wrong_shape", None, ev(shape=[1, 1, 4, 4], data=flat[:16]), []),
        ("non_finite", None, ev(data=[float("nan")] + flat[1:]), []),
        ("out_of_range", None, ev(data=[7.0] + flat[1:]), []),
        ("unknown_model", None, ev(model="resnet-9000"), []),
        ("oversized", None, b'{"id": "big", "pad": "' + b"x" * (max_bytes + 10) + b'"}', []),
        ("output_too_large", None, big_record, []),
        ("unsupported_cloudevent", None, ev(), [("ce_id", b"bad-ce"), ("ce_source", b"/demo"),
                                                ("ce_type", b"com.example.unknown"), ("ce_specversion", b"1.0")]),
        ("bad_id", None, ev(id="bad\nid"), []),
        ("bad_time", None, ev(time="yesterday at noon"), []),
        # the tensor twice: readers that keep the first name would see one input, the stage another
        ("duplicate_key", None, ev(id="bad-dup").replace(b'"datatype"', b'"data": ' + json.dumps(
            [round(1.0 - v, 4) for v in flat]).encode() + b', "datatype"'), []),
        # Open Inference Protocol binary form: a header length that is not a number, and
        # four stray bytes after the tensor the sizes account for
        ("bad_binary_header", None, binary, [("Inference-Header-Content-Length", b"0x" + head_length)]),
        ("binary_size_mismatch", None, binary + b"\0\0\0\0", binary_headers),
        ("id_conflict", taken["id"], json.dumps(conflict).encode(), []),
    ]


def build_events(model, n_clean: int | None, n_attacked: int, attack_eps: float, max_bytes: int,
                 seed: int = 0) -> DemoEvents:
    X, y = load_split("test")
    if n_clean is not None:
        X, y = X[:n_clean], y[:n_clean]
    out = DemoEvents()
    rng = np.random.default_rng(seed)
    for i, (x, label) in enumerate(zip(X, y)):
        e = make_event(f"digit-{i}", "digits", x, prediction=int(model.predict(x[None])[0]),
                       upstream_risk=float(np.round(rng.beta(1, 12), 4)), context={"label": int(label)})
        headers = []
        if i % 4 == 0:  # a quarter as CloudEvents binary mode, like a KServe/Knative producer
            headers = [("ce_id", e["id"].encode()), ("ce_source", b"/demo/digits"),
                       ("ce_type", b"org.kserve.inference.request"), ("ce_specversion", b"1.0"),
                       ("content-type", b"application/json")]
        out.messages.append((e["id"], json.dumps(e).encode(), headers))
        out.clean += 1
    idx = rng.choice(len(X), size=min(n_attacked, len(X)), replace=False)
    Xa = pgd(model.module, X[idx], y[idx], attack_eps, norm="l2", steps=20, seed=seed)
    for j, (i, xa) in enumerate(zip(idx, Xa)):
        e = make_event(f"pgd-{j}", "digits", xa, prediction=int(model.predict(xa[None])[0]),
                       upstream_risk=float(np.round(rng.beta(1, 12), 4)),
                       context={"label": int(y[i]), "attack": f"pgd-l2-{attack_eps:g}"})
        out.messages.append((e["id"], json.dumps(e).encode(), []))
        out.attacked += 1
    first = json.loads(out.messages[0][1])
    malformed = malformed_events(X[0], max_bytes, first)
    for code, _key, _value, _headers in malformed:
        out.malformed[code] = out.malformed.get(code, 0) + 1
    shuffled = [(key, value, headers) for code, key, value, headers in malformed if code != "id_conflict"]
    shuffled += out.messages
    order = rng.permutation(len(shuffled))
    # the id_conflict event goes last: after the event whose id it reuses (same key, same partition)
    out.messages = [shuffled[k] for k in order] + [(key, value, headers) for code, key, value, headers
                                                    in malformed if code == "id_conflict"]
    return out


def run_demo(out_dir: Path, ledger_path: Path, n_clean: int | None = None, n_attacked: int = 120,
             attack_eps: float = 1.0, metrics_port: int = 0, console: bool = True, keep_serving: bool = False,
             echo=print, progress: bool = True) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    summary: dict = {"paths": {}}
    with EmbeddedBroker(log_path=str(out_dir / "broker.log")) as broker:
        echo(f"embedded Kafka broker (Tansu) on {broker.bootstrap}")
        config = load_config(None, bootstrap_servers=broker.bootstrap, ledger=str(ledger_path), create_topics=True,
                             session_timeout_ms=2000, heartbeat_interval_ms=600, group_id="riskpipe-demo",
                             batch={"max_events": 256, "max_wait_ms": 50})
        broker.create_topics([config.topics.input], partitions=2)
        broker.create_topics()
        echo("preparing the demo model (trained once, then cached) ...")
        model = load_model("demo:digits")
        events = build_events(model, n_clean, n_attacked, attack_eps, config.max_message_bytes)
        total = len(events.messages)
        metrics = StageMetrics()
        server = metrics.serve(metrics_port, config.liveness_stall_s)
        echo(f"metrics on {server.url}")

        ledger = Ledger(str(ledger_path))
        bar = tqdm(total=total, unit="event", desc="deciding", disable=not progress)
        stage_box = {}
        finished = threading.Event()
        stage = build_stage(config, metrics=metrics, ledger=ledger)
        console_srv = None
        try:
            if console:
                password = secrets.token_urlsafe(12)
                console_srv = serve_background(str(ledger_path), password=password, kafka=config.kafka())
                echo(f"review console on {console_srv.url}  (password: {password})")
            stage_box["stage"] = stage

            def target():
                try:
                    stage_box["stats"] = stage.run()
                except BaseException as e:  # noqa: BLE001 - reported below
                    stage_box["error"] = e
                finally:
                    finished.set()

            th = threading.Thread(target=target, name="riskpipe-stage", daemon=True)
            th.start()
            producer = kafka_clients.producer(config.kafka(), acks="all", linger_ms=5,
                                              max_request_size=config.max_message_bytes * 4)
            t0 = time.perf_counter()
            for key, value, headers in events.messages:
                producer.send(config.topics.input, key=key.encode() if key else None, value=value, headers=headers)
            producer.flush()
            producer.close()
            while not finished.is_set():
                dlq = sum(stage.stats.dlq.values())
                bar.n = stage.stats.decided + dlq
                bar.refresh()
                if stage.stats.decided + dlq + stage.stats.duplicates >= total:
                    break
                time.sleep(0.1)
            elapsed = time.perf_counter() - t0
            stage.stop()
            th.join(timeout=30)
            bar.close()
            if "error" in stage_box:
                raise stage_box["error"]
            stats = stage.stats
            summary.update(_summarise(ledger, stats, events, elapsed))

            report = out_dir / "report.html"
            write_report(str(ledger_path), str(report), "html")
            summary["paths"].update({"ledger": str(ledger_path), "report": str(report),
                                     "broker log": str(out_dir / "broker.log")})
            if keep_serving and console_srv is not None:
                echo(f"review console still on {console_srv.url}; Ctrl-C to stop")
                try:
                    while True:
                        time.sleep(1)
                except KeyboardInterrupt:
                    pass
        finally:
            if console_srv is not None:
                console_srv.stop()
            server.shutdown()
            ledger.close()
    summary["total_s"] = time.perf_counter() - t_start
    return summary


def _summarise(ledger, stats, events: DemoEvents, elapsed: float) -> dict:
    decided = {"allow": 0, "review": 0, "block": 0}
    attacked = {"events": 0, "fooled_base_model": 0, "certified": 0, "certified_wrong_class": 0,
                "allowed_wrong_class": 0}
    abstained = 0
    for entry in ledger.records(kind="decision"):
        r = entry.record
        decided[r["decision"]] = decided.get(r["decision"], 0) + 1
        cert = r["certificate"]
        abstained += bool(cert["abstained"])
        ctx = r.get("event_context") or {}
        if ctx.get("attack"):
            attacked["events"] += 1
            label = ctx.get("label")
            if r.get("prediction") is not None and r["prediction"] != label:
                attacked["fooled_base_model"] += 1
            certified = bool(cert.get("certified")) if cert.get("certified") is not None else not cert["abstained"]
            if certified:
                attacked["certified"] += 1
                if cert.get("predicted_class") != label:
                    attacked["certified_wrong_class"] += 1
                    if r["decision"] == "allow":
                        attacked["allowed_wrong_class"] += 1
    return {
        "events": events.clean + events.attacked + sum(events.malformed.values()),
        "clean": events.clean, "attacked": events.attacked,
        "decided": stats.decided, "duplicates": stats.duplicates,
        "decisions": decided, "abstained": abstained,
        "attacks": attacked,
        "dlq": dict(stats.dlq), "dlq_expected": events.malformed,
        "elapsed_s": elapsed, "decisions_per_s": stats.decided / elapsed if elapsed > 0 else 0.0,
    }


def format_summary(s: dict) -> str:
    rows = [
        ("events produced", f"{s['events']}  ({s['clean']} clean digits, {s['attacked']} PGD-attacked, "
                            f"{sum(s['dlq_expected'].values())} malformed)"),
        ("decisions",
         f"{s['decided']}  (allow {s['decisions'].get('allow', 0)}, review {s['decisions'].get('review', 0)}, "
                      f"block {s['decisions'].get('block', 0)})"),
        ("abstentions (no certificate)", str(s["abstained"])),
        ("attacked inputs that fooled the base model",
         f"{s['attacks']['fooled_base_model']} of {s['attacks']['events']}"),
        ("attacked inputs certified anyway", f"{s['attacks']['certified']}  "
                                             f"({s['attacks']['certified_wrong_class']} certified for a WRONG class: "
                                             "Theorem 1 — a certificate does not mean clean)"),
        ("dead letters", ", ".join(f"{k} {v}" for k, v in sorted(s["dlq"].items())) or "none"),
        ("throughput", f"{s['decisions_per_s']:.0f} decisions/s end to end over {s['elapsed_s']:.1f}s"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "riskpipe demo summary", "=" * 21]
    lines += [f"{k:<{width}}  {v}" for k, v in rows]
    lines += ["", "written:"] + [f"  {k:<11} {v}" for k, v in s["paths"].items()]
    lines += ["", "scope: radii are l2 under Gaussian smoothing (sigma=0.25), alpha=0.001, threat model l2 "
                  "epsilon=0.25 (policies/default.yaml); they say nothing about whether an input is clean."]
    return "\n".join(lines)
