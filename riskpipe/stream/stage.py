"""The stage loop. Read it top to bottom to follow one message:

  poll ─► buffer ─► (size or latency budget) ─► handle():
      1 validate    parse_event; bad input -> DLQ output with its reason code
      2 dedupe      an id already in the ledger (or twice in the batch) is skipped
      3-4 decide    Pipeline.process: certify, context, policy (one model batch)
      5-6 emit      decisions (public view), audit (full), review (full, if routed)
  ─► sink.flush() (every output acknowledged) ─► ledger ─► metrics ─► source.commit()

At-least-once: offsets are committed only after the flush, so a crash redelivers;
redelivered ids are found in the ledger and skipped, and certificates are seeded
from (id, policy), so a re-decided event yields the same record.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

from riskpipe.stream import codec
from riskpipe.stream.events import EventError, parse_event
from riskpipe.stream.io import Message, SinkError
from riskpipe.stream.pipeline import Pipeline, utc_now

log = logging.getLogger("riskpipe.stream")


class GuardTripped(RuntimeError):
    """Too much of a partition's traffic is invalid: most likely a misconfiguration."""


@dataclass
class PartitionGuard:
    max_ratio: float
    max_consecutive: int
    window: int
    consecutive: int = 0
    recent: deque = field(default_factory=deque)

    def observe(self, invalid: bool, where: str) -> None:
        self.consecutive = self.consecutive + 1 if invalid else 0
        self.recent.append(invalid)
        if len(self.recent) > self.window:
            self.recent.popleft()
        if self.consecutive >= self.max_consecutive:
            raise GuardTripped(f"{where}: {self.consecutive} consecutive invalid messages "
                               f"(limit {self.max_consecutive}); check producers and the model registry")
        if len(self.recent) == self.window and sum(self.recent) / self.window > self.max_ratio:
            raise GuardTripped(f"{where}: {sum(self.recent)} of the last {self.window} messages invalid "
                               f"(limit ratio {self.max_ratio:g}); check producers and the model registry")


@dataclass
class Stats:
    events: int = 0
    decided: int = 0
    duplicates: int = 0
    dlq: dict = field(default_factory=lambda: defaultdict(int))
    decisions: dict = field(default_factory=lambda: defaultdict(int))
    abstained: int = 0
    broker_errors: int = 0
    reconnects: int = 0
    started: float = field(default_factory=time.monotonic)
    busy_s: float = 0.0


class Stage:
    def __init__(self, config, pipeline: Pipeline, make_source, make_sink, ledger=None, metrics=None,
                 on_record=None, on_batch=None):
        self.config = config
        self.pipeline = pipeline
        self.make_source, self.make_sink = make_source, make_sink
        self.source = self.sink = None
        self.ledger = ledger
        self.metrics = metrics
        self.on_record = on_record
        self.on_batch = on_batch  # (messages, seconds, certify seconds) per flushed batch
        self.stats = Stats()
        self.guards: dict = {}
        self.buffer: list[Message] = []
        self.stopping = threading.Event()

    # ---- lifecycle -------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        def handler(signum, frame):
            log.info("signal %s: draining in-flight work, then exiting", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def _open(self) -> None:
        self.sink = self.make_sink()
        self.source = self.make_source(self._on_revoke)

    def _close(self) -> None:
        for c in (self.source, self.sink):
            if c is not None:
                c.close()
        self.source = self.sink = None

    def _on_revoke(self, revoked) -> None:
        gone = {(tp.topic, tp.partition) for tp in revoked}
        before = len(self.buffer)
        self.buffer = [m for m in self.buffer if (m.topic, m.partition) not in gone]
        if self.metrics:
            for tp in revoked:
                self.metrics.drop_lag(tp.topic, tp.partition)
        if before != len(self.buffer):
            log.info("rebalance: dropped %d unprocessed messages (the new owner re-reads them)", before - len(self.buffer))

    def run(self, idle_exit_s: float | None = None) -> Stats:
        """Consume until stopped (signal, ``stop()``), the source is exhausted (files),
        or nothing arrived for ``idle_exit_s`` seconds."""
        backoff = 0.5
        last_data = time.monotonic()
        if self.metrics:
            self.metrics.set_policies([(p.name, str(p.version), p.sha256) for p in self.pipeline.policies])
        self._record_policies()
        while True:
            try:
                if self.source is None:
                    self._open()
                    if self.metrics:
                        self.metrics.set_broker_up(True)
                self._loop_once()
                backoff = 0.5
                if self.buffer:
                    last_data = time.monotonic()
                if self.stopping.is_set() or (getattr(self.source, "exhausted", False) and not self.buffer):
                    self._flush()
                    break
                if idle_exit_s is not None and time.monotonic() - last_data > idle_exit_s:
                    self._flush()
                    break
            except GuardTripped:
                self._close()
                raise
            except Exception as e:  # noqa: BLE001 - broker trouble is retried, never fatal
                if not _is_transport_error(e):
                    self._close()
                    raise
                self.stats.broker_errors += 1
                self.stats.reconnects += 1
                log.warning("broker error (%s: %s); recreating clients in %.1fs", type(e).__name__, e, backoff)
                if self.metrics:
                    self.metrics.broker_error(type(e).__name__)
                    self.metrics.set_broker_up(False)
                    self.metrics.reconnect()
                self.buffer = []  # uncommitted: redelivered after reconnect
                self._close()
                if self.stopping.wait(backoff):
                    break
                backoff = min(backoff * 2, 10.0)
        self._close()
        return self.stats

    def stop(self) -> None:
        self.stopping.set()

    # ---- one turn of the loop ----------------------------------------------------------
    def _loop_once(self) -> None:
        b = self.config.batch
        room = b.max_events - len(self.buffer)
        if room > 0 and not self.stopping.is_set():
            wait = b.max_wait_ms if not self.buffer else max(1, b.max_wait_ms - int((time.monotonic() - self._first) * 1000))
            msgs = self.source.poll(room, wait)
            if self.metrics:
                self.metrics.poll()
            if msgs and not self.buffer:
                self._first = time.monotonic()
            self.buffer.extend(msgs)
        if self.buffer and (len(self.buffer) >= b.max_events
                            or (time.monotonic() - self._first) * 1000 >= b.max_wait_ms
                            or getattr(self.source, "exhausted", False) or self.stopping.is_set()):
            self._flush()
        if self.metrics and hasattr(self.source, "lag"):
            for (topic, part), lag in self.source.lag().items():
                self.metrics.set_lag(topic, part, lag)

    _first = 0.0

    def _flush(self) -> None:
        if not self.buffer or self.source is None:
            return
        msgs, self.buffer = self.buffer, []
        t0 = time.perf_counter()
        c0 = self.pipeline.certify_seconds
        records, dead = self.handle(msgs)
        self.sink.flush()  # every output acknowledged, or SinkError -> retried
        if self.ledger is not None:
            if records:
                self.ledger.append_many(records, kind="decision")
            for rec, eid in dead:
                self.ledger.append(rec, kind="dlq", entry_id=eid)
        self.source.commit(msgs)
        self.stats.busy_s += time.perf_counter() - t0
        if self.on_batch:
            self.on_batch(len(msgs), time.perf_counter() - t0, self.pipeline.certify_seconds - c0)
        # counted only now: a batch that failed to flush is redelivered and counted then
        for rec in records:
            self._count(rec)
        for rec, _ in dead:
            self.stats.dlq[rec["reason"]] += 1
            if self.metrics:
                self.metrics.dlq(rec["reason"])
                self.metrics.event("dlq")
        if self.metrics:
            now = time.time()
            for r in records:
                self.metrics.decision(r)
                self.metrics.event("decided")
                src_ts = r.get("_enqueued")
                if src_ts:
                    self.metrics.end_to_end(max(0.0, now - src_ts))
        for r in records:
            r.pop("_enqueued", None)
            if self.on_record:
                self.on_record(r)

    def handle(self, msgs: list[Message]):
        """Validate, dedupe, decide and send every output of ``msgs``; returns
        (full records, dead-letter ledger entries). Nothing here raises on bad data."""
        from riskpipe.ledger import dlq_record

        topics = self.config.topics
        valid, sources, dead = [], [], []
        seen: set[str] = set()
        for m in msgs:
            self.stats.events += 1
            where = f"{m.topic}[{m.partition}]"
            guard = self.guards.setdefault(where, PartitionGuard(self.config.guard.max_invalid_ratio,
                                                                   self.config.guard.max_consecutive_invalid,
                                                                   self.config.guard.window))
            try:
                ev = parse_event(m.value, m.headers, self.pipeline.models, self.config.max_message_bytes,
                                 self.config.max_binary_message_bytes)
                self.pipeline.admit(ev)
            except EventError as e:
                self._dead_letter(m, e.code, str(e))
                rec, eid = dlq_record(e.code, m.value or b"", utc_now(), topic=m.topic, partition=m.partition,
                                      offset=m.offset, message=str(e))
                dead.append((rec, eid))
                guard.observe(True, where)
                continue
            guard.observe(False, where)
            if ev.id in seen or (self.ledger is not None and self.ledger.get(ev.id) is not None):
                self.stats.duplicates += 1
                if self.metrics:
                    self.metrics.event("duplicate")
                continue
            seen.add(ev.id)
            valid.append(ev)
            src = m.source()
            sources.append(src)
        records = self.pipeline.process(valid, sources) if valid else []
        for ev, rec, m_ts in zip(valid, records, sources, strict=True):
            self._emit(ev.id, rec)
            rec["_enqueued"] = _epoch(m_ts.get("timestamp"))
        return records, dead

    def _emit(self, event_id: str, rec: dict) -> None:
        t = self.config.topics
        key = event_id.encode()
        full = codec.dumps({k: v for k, v in rec.items() if not k.startswith("_")})
        self.sink.send(t.decisions, key, codec.dumps(self.pipeline.public(rec)))
        self.sink.send(t.audit, key, full)
        if rec["review"].get("routed") or rec["review"].get("audit_sample"):
            self.sink.send(t.review, key, full)

    def _dead_letter(self, m: Message, code: str, message: str) -> None:
        headers = list(m.headers or []) + [
            ("__riskpipe.errors.reason", code.encode()),
            ("__riskpipe.errors.message", message.encode()),
            ("__riskpipe.errors.topic", m.topic.encode()),
            ("__riskpipe.errors.partition", str(m.partition).encode()),
            ("__riskpipe.errors.offset", str(m.offset).encode()),
        ]
        self.sink.send(self.config.topics.dlq, m.key, m.value if m.value is not None else b"", headers)

    def _count(self, rec: dict) -> None:
        self.stats.decided += 1
        self.stats.decisions[rec["decision"]] += 1
        cert = rec["certificate"]
        if cert["abstained"]:
            self.stats.abstained += 1

    def _record_policies(self) -> None:
        """One ledger ``policy`` row per policy in force."""
        if self.ledger is None:
            return
        from riskpipe.ledger import policy_record

        for p in self.pipeline.policies:
            rec, eid = policy_record(p.name, str(p.version), p.sha256, utc_now(), source=getattr(p, "path", None))
            self.ledger.append(rec, kind="policy", entry_id=eid)


def _epoch(ts: str | None) -> float | None:
    if not ts:
        return None
    from datetime import datetime

    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _is_transport_error(e: Exception) -> bool:
    """Broker/transport trouble (retry with fresh clients) vs. a bug (raise)."""
    try:
        from kafka.errors import KafkaError
    except ImportError:  # pragma: no cover
        KafkaError = ()  # noqa: N806
    return isinstance(e, (KafkaError, SinkError, ConnectionError, TimeoutError, OSError)) and not isinstance(
        e, (FileNotFoundError, PermissionError))
