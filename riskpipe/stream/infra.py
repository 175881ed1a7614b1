"""Infrastructure is not data: the one classifier of exceptions, and the stage's backoff.

An exception raised while the stage talks to its ledger or its broker is either an
*infrastructure* fault (the server is down, restarting, locked, unreachable) or a
*data* fault (this event's row or output cannot be written: e.g. a value the ledger's
canonical JSON refuses). Only a data fault may become the event's dead letter; an
infrastructure fault pauses the stage (``Stage.run``): nothing of the batch is sent,
no offset moves, and the batch is read again once the component answers.

:func:`infrastructure_component` is the one place that tells them apart; every
caller that touches the ledger or the broker asks it (stage look-ups, the committer's
ledger write, the stage loop) instead of keeping its own list of exception types.
"""

from __future__ import annotations

import gc
import random
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

from riskpipe.ledger import redact
from riskpipe.ledger.chain import LedgerUnavailable
from riskpipe.stream.ports import SinkError

LEDGER, BROKER, MEMORY = "ledger", "broker", "memory"
COMPONENTS = (LEDGER, BROKER, MEMORY)
# what torch says when an allocation fails (CUDA, MPS, the CPU allocator) without raising
# its OutOfMemoryError type
_TORCH_OOM = ("out of memory", "can't allocate memory")
_ORT_OOM = ("out of memory", "failed to allocate memory", "bad_alloc")

# SQLite errors that say "the file is busy or the disk failed", not "this row is bad"
_SQLITE_TRANSIENT = ("database is locked", "database table is locked", "disk i/o error", "unable to open database",
                     "database or disk is full", "attempt to write a readonly database", "locking protocol")
# the same by SQLite's primary result code (Python 3.11+ ``sqlite_errorcode``, extended codes
# carry it in their low byte): BUSY, LOCKED, READONLY, IOERR, FULL, CANTOPEN, PROTOCOL
_SQLITE_TRANSIENT_CODES = frozenset({5, 6, 8, 10, 13, 14, 15})
# PostgreSQL SQLSTATEs (prefixes) that say "the server or the session is not available for
# writing", whatever Python class psycopg gives them: 25P03 (idle-in-transaction timeout)
# and 25006 (a read-only transaction: a standby after a failover, default_transaction_read_only)
# are InternalError, and the server closes the connection after 25P03. Class 08 connection
# exception, 53 insufficient resources (disk full, out of memory, too many connections),
# 57P operator intervention (admin/crash shutdown, cannot connect now, idle session
# timeout), 57014 query cancelled (statement timeout), 58 system error (I/O), 55P03 lock
# not available, 40001/40P01 serialization failure and deadlock (the transaction is
# rolled back and may simply be run again), 25P04 transaction timeout.
_PG_INFRA_SQLSTATES = ("08", "53", "57P", "57014", "58", "55P03", "40001", "40P01", "25P03", "25P04", "25006")

# Backoff between retries: BASE_S doubling up to CAP_S, "equal jitter" (half the delay
# fixed, half uniform) so workers that failed together do not retry together.
BASE_S, CAP_S = 0.2, 5.0


def infrastructure_component(exc: BaseException) -> str | None:
    """``"ledger"``, ``"broker"`` or ``"memory"`` if ``exc`` (or an exception it was raised
    from) says that component is unavailable; None if it is anything else (data or a bug).

    * ledger: :class:`~riskpipe.ledger.chain.LedgerUnavailable` (cannot connect),
      psycopg ``OperationalError`` / ``InterfaceError`` (connection lost, server
      shutting down, lock or statement timeout, disk full), any psycopg error by its
      SQLSTATE (``_PG_INFRA_SQLSTATES``: the idle-in-transaction timeout 25P03 and the
      read-only transaction 25006 of a standby are InternalError) or whose connection is
      no longer OK; SQLite ``database is locked`` / ``disk I/O error`` / ``unable to open
      database file`` / ``attempt to write a readonly database`` / ``locking protocol``
      (by result code where Python gives it);
    * broker: any kafka-python ``KafkaError``, ``SinkError`` (sends not acknowledged),
      ``ConnectionError``/``TimeoutError`` and other ``OSError`` of the transport (not a
      missing file or a permission, which are configuration);
    * memory: ``MemoryError`` and torch's out-of-memory errors (``torch.OutOfMemoryError``,
      a RuntimeError saying "out of memory" or "can't allocate memory"). The decider
      raises one (rather than dead-letter the event) only when the model cannot certify
      an input it has certified before either (``Pipeline.healthy``): then the machine or
      the GPU is short of memory, and the batch is tried again later. An input that runs
      out of memory while a known-good one does not is that input's dead letter, so no
      event can stop the stage.
    """
    psycopg = sys.modules.get("psycopg")  # not imported: no psycopg error can exist
    kafka_errors = sys.modules.get("kafka.errors")
    for e in _chain(exc):
        if _out_of_memory(e):
            return MEMORY
        if isinstance(e, LedgerUnavailable):
            return LEDGER
        if psycopg is not None and isinstance(e, psycopg.Error) and _postgres_unavailable(psycopg, e):
            return LEDGER
        if isinstance(e, sqlite3.Error) and _sqlite_unavailable(e):
            return LEDGER
        if kafka_errors is not None and isinstance(e, kafka_errors.KafkaError):
            return BROKER
        if isinstance(e, SinkError):
            return BROKER
        if isinstance(e, OSError) and not isinstance(e, (FileNotFoundError, PermissionError, IsADirectoryError)):
            return BROKER
    return None


def _postgres_unavailable(psycopg, e) -> bool:
    """A psycopg error says the server or the connection is unavailable: by its SQLSTATE
    (not its Python class: the server's FATAL 25P03 is an InternalError), a connection
    that is broken or closed, or an Operational/Interface error without a SQLSTATE."""
    if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)):
        return True
    state = getattr(e, "sqlstate", None) or ""
    if state.startswith(_PG_INFRA_SQLSTATES):
        return True
    pgconn = getattr(e, "pgconn", None)
    return pgconn is not None and pgconn.status != psycopg.pq.ConnStatus.OK


def _sqlite_unavailable(e: sqlite3.Error) -> bool:
    code = getattr(e, "sqlite_errorcode", None)
    if isinstance(code, int) and code & 0xFF in _SQLITE_TRANSIENT_CODES:
        return True
    return isinstance(e, sqlite3.OperationalError) and any(s in str(e).lower() for s in _SQLITE_TRANSIENT)


def out_of_memory(exc: BaseException) -> bool:
    """Did ``exc``, or an exception it was raised from (``raise ... from``), say that memory
    ran out? The model path asks this alone (riskpipe.stream.decider): an ``OSError`` or a
    ``TimeoutError`` a model raises is the model's, not the broker's."""
    e: BaseException | None = exc
    for _ in range(8):
        if e is None:
            return False
        if _out_of_memory(e):
            return True
        e = e.__cause__
    return False


def _out_of_memory(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    torch = sys.modules.get("torch")
    oom = getattr(torch, "OutOfMemoryError", None) if torch is not None else None
    if oom is not None and isinstance(e, oom):
        return True
    text = str(e).lower()
    if type(e) is RuntimeError and any(s in text for s in _TORCH_OOM):
        return True
    # ONNX Runtime raises its own types (RuntimeException, Fail), not RuntimeError
    return type(e).__module__.startswith("onnxruntime") and any(s in text for s in _ORT_OOM)


def release_memory() -> None:
    """After running out of memory: collect what the failed work left, and hand torch's
    cached GPU blocks back, so a retry starts from what the process really holds."""
    gc.collect()
    torch = sys.modules.get("torch")  # the models' library; not imported here for this
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _chain(exc: BaseException | None, limit: int = 8) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen and len(seen) < limit:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def describe(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an infrastructure error on one line, redacted, the message cut
    at ``limit``. kafka-python's errors begin their own message with their type's name,
    so it is not repeated (it read ``KafkaTimeoutError: KafkaTimeoutError: ...``)."""
    name = type(e).__name__
    text = " ".join(str(e).split())
    text = "" if text == name else text.removeprefix(f"{name}: ")
    return f"{name}: {redact(text)[:limit]}" if text else name


class InfrastructureUnavailable(RuntimeError):
    """A component stayed unavailable past ``infrastructure_timeout_s``; the stage
    stopped without committing anything it had not decided and recorded."""

    def __init__(self, component: str, seconds: float, timeout_s: float, cause: BaseException):
        self.component = component
        super().__init__(f"{component} unavailable for {seconds:.1f} s (infrastructure_timeout_s {timeout_s:g}): "
                         f"{describe(cause)}; stopped without committing undecided events")


@dataclass
class Outage:
    """One outage: when it began, how often the stage retried, the next backoff delay."""

    component: str
    since: float  # time.monotonic()
    retries: int = 0
    # its last error stalls the source (``stalls_source``: io.UnreadableRecord), at (topic,
    # partition, offset) or at an unknown place (None): quiet polls do not end it, nor do
    # batches of other partitions; only a committed message of that partition past it does
    # (riskpipe.stream.stage.Stage)
    stalled: bool = False
    stalled_at: tuple[str, int, int] | None = None

    def passed(self, messages: list) -> bool:
        """Do ``messages`` (a committed batch) show the stalled partition read past its record?"""
        if not self.stalled or self.stalled_at is None:
            return not self.stalled
        topic, partition, offset = self.stalled_at
        return any(m.topic == topic and m.partition == partition and m.offset > offset for m in messages)
    rng: random.Random = field(default_factory=random.Random)

    def next_delay(self, left_s: float) -> float:
        """Bounded exponential backoff with equal jitter: in [d/2, d], d = min(CAP_S, BASE_S * 2^retries),
        and at most just past the ``left_s`` seconds left of the timeout (the last retry comes after it)."""
        d = min(CAP_S, BASE_S * 2 ** min(self.retries, 16))
        self.retries += 1
        return min(d / 2 + self.rng.uniform(0, d / 2), left_s + 0.05)
