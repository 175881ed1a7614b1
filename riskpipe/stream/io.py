"""Sources and sinks at the edge of the stage: Kafka (kafka-python) and JSON lines.

Each implements ``Source`` or ``Sink`` (``stream/ports.py``: the members the stage
uses and what they promise).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
from pathlib import Path

from kafka import TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CorruptRecordError
from kafka.structs import OffsetAndMetadata

from riskpipe import kafka_clients
from riskpipe.paths import atomic_write
from riskpipe.stream.ports import Message, SinkError, SourceBase

log = logging.getLogger("riskpipe.stream")


# How long a new stage client tries to reach the cluster before it raises (kafka-python's
# default is 30 s): the stage's outage loop owns longer waits (backoff, infrastructure_timeout_s)
BOOTSTRAP_TIMEOUT_MS = 5_000


# ---------------------------------------------------------------- Kafka -------------
def _topic_id(consumer, topic: str):
    """The topic's id (KIP-516) in the consumer's cluster metadata, or None (unknown, or a
    broker that gives none). kafka-python keeps it on its client's cluster object, which
    ``KafkaConsumer`` has no public accessor for."""
    cluster = getattr(getattr(consumer, "_client", None), "cluster", None)
    getter = getattr(cluster, "topic_id", None)
    return getter(topic) if getter is not None else None


class UnreadableRecord(CorruptRecordError):
    """A record the Kafka client cannot decode (a header name that is not UTF-8, which any
    non-Python producer can write; a failed CRC). kafka-python cannot read past it: every
    record of its record batch is lost to this client, and after raising once it fetches
    nothing more of the partition, silently. So it is not skipped (nothing it holds
    would be decided or dead-lettered) and the partition waits: the stage treats it as the
    broker's outage (a KafkaError) that quiet polls do not end (``stalls_source``), so it
    exits past ``infrastructure_timeout_s`` naming the partition and offset, where an
    operator moves the group's offset past it."""

    stalls_source = True  # riskpipe.stream.infra.Outage.stalled

    def __init__(self, message: str, at: tuple[str, int, int] | None = None):
        super().__init__(message)
        self.at = at  # (topic, partition, offset) of the record, when the client says


class KafkaSource(SourceBase):
    """A consumer-group member on the input topic; manual commits only.

    ``held=True`` joins the group without consuming (``join_early``): every partition the
    group assigns is paused until ``release``, so ``poll`` fetches nothing."""

    def __init__(self, config, on_revoke=None, held: bool = False):
        self.config = config
        self.revoked: set = set()
        self._topic_ids: dict = {}  # TopicPartition -> the topic id its position was read under
        self._recreated: list[tuple[str, int]] = []
        self.on_revoke = on_revoke
        self.held = held
        source = self

        class Listener(ConsumerRebalanceListener):
            # No commit here: kafka-python 3 forbids committing inside a sync listener,
            # and the stage commits synchronously after every flush, so nothing
            # finished is ever left uncommitted when a rebalance starts.
            def on_partitions_revoked(self, revoked):
                source.revoked |= {(tp.topic, tp.partition) for tp in revoked}
                if source.on_revoke:
                    source.on_revoke(revoked)
                log.info("partitions revoked: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in revoked))

            def on_partitions_assigned(self, assigned):
                if source.held:  # before this poll fetches: nothing is read until release()
                    source.consumer.pause(*assigned)
                log.info("partitions assigned: %s", sorted(f"{tp.topic}-{tp.partition}" for tp in assigned))

        self.consumer = kafka_clients.consumer(
            config.kafka(),
            group_id=config.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=config.batch.max_events,
            session_timeout_ms=config.session_timeout_ms,
            heartbeat_interval_ms=config.heartbeat_interval_ms,
            metadata_max_age_ms=config.metadata_max_age_ms,
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
            max_partition_fetch_bytes=max(config.largest_message_bytes * 2, 1 << 20),
        )
        self.consumer.subscribe([config.topics.input], listener=Listener())
        log.info("subscribed to %s as a member of group %s", config.topics.input, config.group_id)

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        try:
            batch = self.consumer.poll(timeout_ms=timeout_ms, max_records=max_records)
        except CorruptRecordError as e:
            raise self._unreadable_record(e) from e
        out = []
        for _tp, recs in batch.items():
            for r in recs:
                out.append(Message(r.value, r.topic, r.partition, r.offset, r.key, list(r.headers or []), r.timestamp))
        self._realign()
        return out

    def _realign(self) -> None:
        """Read a re-created partition from its start.

        A topic deleted and made again, or a broker that lost its data (the embedded
        broker's memory storage), starts the partition's offsets again at 0 under a new
        topic id (KIP-516). A real Kafka broker answers a fetch beyond the new end with
        OFFSET_OUT_OF_RANGE and the consumer resets to the start (``auto_offset_reset``);
        Tansu answers with no records and no error, and kafka-python keeps the old
        position across the group rejoin, so the member waited until the new log grew past
        its old offset and then skipped everything below it: decisions lost. So each
        assigned partition's topic id is kept from when its position was first read; a
        new one means the position belongs to a log that no longer exists, and the
        partition is read from its start. What this member read of the new log already
        is read again and skipped by its event id (the ledger's idempotent append); a
        leader change keeps the topic id, so it never rewinds. Brokers without topic ids
        (metadata before v10) are left to their own out-of-range answer."""
        for tp in self.consumer.assignment():
            now = _topic_id(self.consumer, tp.topic)
            if now is None:
                continue
            before = self._topic_ids.setdefault(tp, now)
            if before != now:
                self._topic_ids[tp] = now
                self.consumer.seek_to_beginning(tp)
                self._recreated.append((tp.topic, tp.partition))
                log.warning("%s-%d was re-created (topic id %s, before %s: the broker lost its data or the topic was "
                            "made again); reading it again from its start, decided events are skipped by id",
                            tp.topic, tp.partition, now, before)

    def recreated(self) -> list[tuple[str, int]]:
        out, self._recreated = self._recreated, []
        return out

    def commit(self, messages: list[Message]) -> None:
        offsets: dict = {}
        for m in messages:
            tp = TopicPartition(m.topic, m.partition)
            if tp not in offsets or m.offset + 1 > offsets[tp].offset:
                offsets[tp] = OffsetAndMetadata(m.offset + 1, "", -1)
        if offsets:
            self.consumer.commit(offsets)

    def _unreadable_record(self, e: CorruptRecordError) -> UnreadableRecord:
        """``UnreadableRecord`` naming the partition and offset kafka-python stopped at (its
        fetcher's partition records: no public accessor)."""
        parts = getattr(getattr(self.consumer, "_fetcher", None), "_next_partition_records", None)
        tp, offset = getattr(parts, "topic_partition", None), getattr(parts, "next_fetch_offset", None)
        if tp is None or not isinstance(offset, int):
            return UnreadableRecord(f"a record the Kafka client cannot decode ({e})")
        return UnreadableRecord(f"{tp.topic}-{tp.partition} offset {offset}: the Kafka client cannot decode this "
                                f"record ({e}); it is neither decided nor skipped, and the partition waits (move the "
                                "group's offset past it to go on)", (tp.topic, tp.partition, offset))

    def rewind(self) -> bool:
        """Every assigned partition back to its last committed offset (its start if none):
        what was polled but not committed is read again (the stage calls this when it
        drops undecided messages during an outage)."""
        for tp in self.consumer.assignment():
            committed = self.consumer.committed(tp)
            if committed is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, committed)
        return True

    @property
    def holds_partitions(self) -> bool:
        """True while the group has assigned this member at least one partition."""
        return bool(self.consumer.assignment())

    def lag(self) -> dict[tuple[str, int], int]:
        """Per-partition lag from highwater() - position() (end_offsets() is wrong on Tansu)."""
        out = {}
        for tp in self.consumer.assignment():
            hw = self.consumer.highwater(tp)
            try:
                pos = self.consumer.position(tp, timeout_ms=100) if hw is not None else None
            except Exception:  # noqa: BLE001 - position unknown during a rebalance
                pos = None
            if hw is not None and pos is not None:
                out[(tp.topic, tp.partition)] = max(0, hw - pos)
        return out

    @property
    def connected(self) -> bool:
        """False while the consumer knows no group coordinator: within a heartbeat of the
        broker going away, though ``poll`` raises nothing and returns no message then."""
        return not kafka_clients.coordinator_unknown(self.consumer)

    def hold_poll(self, timeout_ms: int) -> None:
        """One poll while held: it joins or rejoins the group and keeps this member in it;
        a record it returns all the same is not consumed: its partition goes back to it."""
        for tp, recs in self.consumer.poll(timeout_ms=timeout_ms).items():
            if recs:
                self.consumer.seek(tp, min(r.offset for r in recs))

    def release(self, on_revoke=None) -> None:
        """End the hold: the stage's revoke callback from now on, and the paused partitions resume."""
        self.on_revoke = on_revoke
        self.held = False
        self.consumer.resume(*self.consumer.assignment())

    def close(self) -> None:
        try:
            self.consumer.close(autocommit=False)
        except Exception as e:  # noqa: BLE001
            log.warning("consumer close: %s", e)


class EarlyJoin:
    """A stage's group membership, begun before its pipeline is built (issue 21: a worker
    joins its group while torch and its models load, not after).

    A thread polls a held ``KafkaSource``: every partition the group assigns is paused, so
    nothing is fetched, decided or committed, while the member joins, takes part in
    rebalances and stays in the group (heartbeats; a poll every ``POLL_MS``, well inside
    max.poll.interval). ``take`` hands the source to the stage, which reads from the
    committed offsets as any new owner does. Never taken (the build failed): ``close``
    leaves the group."""

    POLL_MS = 100

    def __init__(self, config):
        self.source = KafkaSource(config, held=True)
        self._taken = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="riskpipe-join", daemon=True)
        self._thread.start()

    def _hold(self) -> None:
        while not self._stop.is_set():
            try:
                self.source.hold_poll(self.POLL_MS)
            except Exception as e:  # noqa: BLE001 - a broker error while held: the stage rides out outages once it runs
                log.warning("joining group %s: %s", self.source.config.group_id, e)
                self._stop.wait(0.5)

    def _end_hold(self) -> None:
        self._stop.set()
        self._thread.join()

    def take(self, on_revoke) -> KafkaSource:
        """The source, no longer held, for the stage (its ``make_source``); the stage closes it."""
        self._end_hold()
        self.source.release(on_revoke)
        self._taken = True
        return self.source

    def close(self) -> None:
        """Leave the group, unless the stage took the source."""
        if not self._taken:
            self._end_hold()
            self.source.close()
            self._taken = True


class KafkaSink:
    """Idempotent producer, acks=all; flush() waits for and checks every ack."""

    def __init__(self, config):
        # the largest record this producer sends; the stage dead-letters an event whose
        # output would be larger (else the send fails on every redelivery: a stuck partition)
        self.max_message_bytes = config.max_output_bytes
        self.producer = kafka_clients.producer(
            config.kafka(),
            acks="all",
            enable_idempotence=True,
            linger_ms=5,
            batch_size=min(1 << 18, self.max_message_bytes),  # full records are KBs each: fewer, larger requests
            max_request_size=self.max_message_bytes,
            retries=5,
            request_timeout_ms=10_000,
            max_block_ms=10_000,
            bootstrap_timeout_ms=BOOTSTRAP_TIMEOUT_MS,
        )
        self.pending: list = []

    def send(self, topic: str, key: bytes | None, value: bytes, headers=None) -> None:
        self.pending.append(self.producer.send(topic, key=key, value=value, headers=headers or []))

    def flush(self, timeout: float = 30.0) -> None:
        self.producer.flush(timeout=timeout)
        pending, self.pending = self.pending, []
        for fut in pending:
            if not fut.is_done:
                raise SinkError("send not acknowledged before the flush timeout")
            if fut.failed():
                raise SinkError(f"send failed: {fut.exception!r}")

    def close(self) -> None:
        try:
            self.producer.close(timeout=5)
        except Exception as e:  # noqa: BLE001
            log.warning("producer close: %s", e)


# ---------------------------------------------------------------- JSON lines --------
class JsonlSource(SourceBase):
    """Each line of a file is one message value; the offset is the 0-based line number.

    With a ``checkpoint`` file the source resumes after the last committed line.
    """

    def __init__(self, path: str, checkpoint: str | None = None):
        self.path = path
        self.topic = f"file:{path}"
        self.checkpoint = checkpoint
        self.f = open(path, "rb")
        self.committed = 0  # the line after the last committed one
        if checkpoint and os.path.exists(checkpoint):
            self.committed = int(Path(checkpoint).read_text().strip() or 0)
        self.rewind()

    def rewind(self) -> bool:
        """Back to the line after the last committed one (see ``KafkaSource.rewind``)."""
        self.f.seek(0)
        self.offset = 0
        while self.offset < self.committed and self.f.readline():
            self.offset += 1
        self.exhausted = False
        return True

    def poll(self, max_records: int, timeout_ms: int) -> list[Message]:
        out: list[Message] = []
        while len(out) < max_records:
            line = self.f.readline()
            if not line:
                self.exhausted = True
                break
            value = line.rstrip(b"\r\n")
            if value.strip():
                out.append(Message(value, self.topic, 0, self.offset))
            self.offset += 1
        return out

    def commit(self, messages: list[Message]) -> None:
        if not messages:
            return
        self.committed = max(self.committed, max(m.offset for m in messages) + 1)
        if self.checkpoint:
            with atomic_write(self.checkpoint, "w") as f:
                f.write(str(self.committed))

    def close(self) -> None:
        self.f.close()


class JsonlSink:
    """Writes ``DIR/<topic>.jsonl``; DLQ lines carry the original value and headers.

    Appends, like a topic; ``fresh_outputs(DIR, topics)`` clears a directory first
    (the runner does that once per run, so a re-run does not duplicate lines).

    Whole lines only: lines are held here and written at ``flush`` (or once 1 MiB is
    held); a write that fails (the disk full, a file size limit) cuts every file back to
    where the last flush left it, drops what was held (nothing since was acknowledged:
    the stage's outage sends the batch again) and raises, so a resume appends whole lines
    after whole lines, and a batch that failed in one file is not kept in another. A file found
    ending in a torn line (a process killed mid-write) is cut back to its last complete
    line when opened. ``close`` never raises for a write that fails: it is called while
    the stage handles an outage (a full disk used to raise again there and stop the stage
    with the configuration error's exit code).
    """

    HOLD = 1 << 20

    def __init__(self, directory: str):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.files: dict[str, int] = {}  # topic -> file descriptor (O_APPEND)
        self._held: dict[str, bytearray] = {}
        self._good: dict[str, int] = {}  # topic -> length of the file up to its last complete line

    def _open(self, topic: str) -> None:
        path = self.dir / f"{topic}.jsonl"
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        try:
            good = _last_complete_line(path)
            if good < os.fstat(fd).st_size:
                log.warning("%s ends in a torn line (a write cut short); cut back to its last complete line", path)
                os.ftruncate(fd, good)
        except BaseException:
            os.close(fd)
            raise
        self.files[topic], self._held[topic], self._good[topic] = fd, bytearray(), good

    def send(self, topic: str, key: bytes | None, value: bytes, headers=None) -> None:
        if topic not in self.files:
            self._open(topic)
        if headers and any(k.startswith("__riskpipe.errors.") for k, _ in headers):
            # dead letters: keep the raw bytes and the error headers together (other
            # headers, e.g. trace context, are in the record a file line carries)
            obj: dict[str, object] = {
                "headers": {k: (v.decode("utf-8", "replace") if isinstance(v, bytes) else v) for k, v in headers}}
            try:
                obj["value"] = value.decode("utf-8") if value is not None else None
            except UnicodeDecodeError:  # binary tensors, broken text: the exact bytes, base64
                obj["value_base64"] = base64.b64encode(value).decode("ascii")
            value = json.dumps(obj, sort_keys=True).encode()
        held = self._held[topic]
        held += value + b"\n"
        if len(held) >= self.HOLD:
            try:
                self._write(topic)
            except OSError:
                self._roll_back()
                raise

    def _write(self, topic: str) -> None:
        fd, held = self.files[topic], self._held[topic]
        view = memoryview(held)
        try:
            done = 0
            while done < len(held):
                done += os.write(fd, view[done:])
        finally:
            view.release()
            held.clear()

    def _roll_back(self) -> None:
        """Cut every file back to where the last flush left it (whole lines) and drop what
        is held: nothing since that flush was acknowledged, the stage sends it again."""
        for topic, fd in self.files.items():
            self._held[topic].clear()
            try:
                os.ftruncate(fd, self._good[topic])
            except OSError as e:
                log.warning("%s: cannot cut back to its last complete line (%s)", self.dir / f"{topic}.jsonl", e)

    def flush(self, timeout: float = 30.0) -> None:
        try:
            for topic, fd in self.files.items():
                self._write(topic)
                os.fsync(fd)
        except OSError:
            self._roll_back()
            raise
        for topic, fd in self.files.items():
            self._good[topic] = os.fstat(fd).st_size

    def close(self) -> None:
        """Flush and close; a flush that fails is logged (the files end where the last
        flush left them), never raised."""
        try:
            self.flush()
        except OSError as e:
            log.warning("%s: lines not written on close (%s); the files end at the last flush, whole lines",
                        self.dir, e)
        finally:
            for fd in self.files.values():
                os.close(fd)
            self.files, self._held, self._good = {}, {}, {}


def _last_complete_line(path: Path, block: int = 1 << 16) -> int:
    """The length of ``path`` up to and including its last newline (0 if it has none)."""
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
        pos = end
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            if pos == end and chunk.endswith(b"\n"):
                return end
            i = chunk.rfind(b"\n")
            if i >= 0:
                return start + i + 1
            pos = start
        return 0


def fresh_outputs(directory: str | Path, topics) -> None:
    """Remove earlier outputs ``DIR/<topic>.jsonl`` before a new offline run."""
    for t in topics:
        (Path(directory) / f"{t}.jsonl").unlink(missing_ok=True)
