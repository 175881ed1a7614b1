"""The console's two Kafka edges (kafka-python).

* :class:`ReviewTopicFeed` reads full decision records from the trusted ``review`` topic
  into the ledger (idempotent on the event id), committing offsets only after the
  ledger write: at-least-once, and a redelivered record is a no-op. With a scope
  (riskpipe.review.scope) it stores only its stage's records: another stage sharing
  the topic is counted in ``other_stage`` and left out of this ledger.
* :class:`OutcomePublisher` writes verdicts to ``review-outcomes`` (acks=all, key =
  event id) so the stage, the report and anyone else can follow the feedback loop.
"""

from __future__ import annotations

import json
import logging
import threading

from riskpipe import json_text, kafka_clients
from riskpipe.kafka_clients import KafkaSettings
from riskpipe.ledger import Ledger, LedgerError
from riskpipe.review.queue import ReviewError, check_decision_record

log = logging.getLogger("riskpipe.review")


class ReviewTopicFeed:
    """Background thread: ``review`` topic -> ledger (kind ``decision``)."""

    def __init__(self, kafka: KafkaSettings, topic: str, ledger_path: str, *,
                 group_id: str = "riskpipe-review-console",
                 session_timeout_ms: int = 10_000, heartbeat_interval_ms: int = 3_000,
                 scope=None) -> None:
        self.topic = topic
        self.scope = scope
        self.other_stage = 0
        self._noted: set[str] = set()
        self.ledger_path = ledger_path
        self.received = 0
        self.rejected = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._consumer = kafka_clients.consumer(
            kafka,
            topic,
            group_id=group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=session_timeout_ms,
            heartbeat_interval_ms=heartbeat_interval_ms,
        )
        self._thread = threading.Thread(target=self._run, name="riskpipe-review-feed", daemon=True)

    def start(self) -> ReviewTopicFeed:
        self._thread.start()
        return self

    def _run(self) -> None:
        with Ledger(self.ledger_path) as ledger:
            while not self._stop.is_set():
                try:
                    batches = self._consumer.poll(timeout_ms=300)
                except Exception as e:  # noqa: BLE001 - keep serving the ledger's queue while the broker is away
                    self.last_error = f"review topic: {type(e).__name__}: {e}"
                    log.warning("%s", self.last_error)
                    self._stop.wait(1.0)
                    continue
                if not batches:
                    continue
                for messages in batches.values():
                    for msg in messages:
                        self._store(ledger, msg)
                self._consumer.commit()

    def _store(self, ledger: Ledger, msg) -> None:
        where = f"{msg.topic}[{msg.partition}]@{msg.offset}"
        try:
            record = check_decision_record(json_text.loads(msg.value))
            why = self.scope.refuses(record) if self.scope is not None else None
            if why is not None:  # another stage on a shared topic: expected, said once per kind
                self.other_stage += 1
                if why not in self._noted and len(self._noted) < 100:
                    self._noted.add(why)
                    log.info("review topic: not this stage's records, left out: %s", why)
                return
            ledger.append(record, kind="decision")
            self.received += 1
        except (ValueError, TypeError, ReviewError, LedgerError) as e:  # JSONDecodeError is a ValueError
            self.rejected += 1
            self.last_error = f"{where}: skipped: {e}"
            log.warning("%s", self.last_error)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        self._consumer.close()


class OutcomePublisher:
    """Verdicts -> ``review-outcomes``; ``publish`` returns once the broker has them."""

    def __init__(self, kafka: KafkaSettings, topic: str, *, timeout_s: float = 10.0) -> None:
        self.topic = topic
        self.timeout_s = timeout_s
        self._producer = kafka_clients.producer(kafka, acks="all", retries=5)

    def publish(self, verdict: dict) -> None:
        """Send and wait for the acknowledgement; raises on failure."""
        value = json.dumps(verdict, sort_keys=True, ensure_ascii=False).encode("utf-8")
        self._producer.send(self.topic, key=verdict["id"].encode("utf-8"), value=value).get(timeout=self.timeout_s)

    def close(self) -> None:
        self._producer.close(timeout=5)
