"""A model call that never returns: the watchdog, the suspects it records, and what a
restarted stage does with them.

Python cannot interrupt a call that loops or deadlocks (a model stuck on one input). So
the stage arms a ``Watchdog`` around every certification model call (``Decider``); a
thread of its own notices a call running longer than ``model_timeout_s``, records the
call's events as *suspects*, logs one line naming the model and their positions, and
ends the process with ``EXIT_MODEL_TIMEOUT`` (5) for its supervisor (Kubernetes,
``riskpipe run --workers``) to restart. Nothing of the hung batch was written or
committed, so the restarted stage reads it again, and then (``Suspects``):

* an event at a position recorded from a batch (``BATCH``) is decided alone, in a model
  call of its own: the innocent events of the hung batch are decided as usual;
* an event that hangs alone is recorded ``ALONE`` (confirmed) and the process exits
  again; on the next start it is dead-lettered with reason ``model_timeout`` before any
  model sees it: never decided, never allowed, and the partition goes on.

Where suspects are kept: in the ledger, as rows of kind ``model_timeout`` (hash-chained
like every row; ``ledger verify`` checks them; the report and the facts table read only
decisions and dead letters). The ledger is shared by every replica of a stage, so a
partition moved to another replica after the exit (the group rebalances while the
process is down) finds its suspects there; a file under a state directory would be
seen only by a process on the same volume. The stage reads them when it starts and
after every rebalance (before deciding the next batch). Without a ledger
(``--no-ledger``) nothing is recorded: the exit and the log line still name the
positions, and the same batch hangs again after the restart.

An entry's id is ``topic:partition:offset:sha256[:16]:level``: a message at a position
used before (a re-created topic) is not taken for the suspect that was there.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from riskpipe.metrics import SUSPECT_LEVELS
from riskpipe.stream.ports import Message
from riskpipe.timestamps import rfc3339_millis

log = logging.getLogger("riskpipe.stream")

KIND = "model_timeout"  # ledger kind of a suspect
MODEL_TIMEOUT = "model_timeout"  # dead-letter reason of an event that hung alone
EXIT_MODEL_TIMEOUT = 5  # the process's exit status when the watchdog ends it
BATCH, ALONE = SUSPECT_LEVELS  # hung within a batch of several events / in a call of its own


def _digest(m: Message) -> str:
    return hashlib.sha256(m.value or b"").hexdigest()


def suspect_entries(messages: Sequence[Message], model: str, timeout_s: float) -> list[tuple[str, dict, str]]:
    """Ledger ``(kind, record, entry id)`` items for the events of a call that ran past
    ``timeout_s``: ``ALONE`` for a call of one event, else ``BATCH``."""
    level, ts = ALONE if len(messages) == 1 else BATCH, rfc3339_millis()
    out = []
    for m in messages:
        sha = _digest(m)
        eid = f"{m.topic}:{m.partition}:{m.offset}:{sha[:16]}:{level}"
        rec = {"id": eid, "ts": ts, "level": level, "model": model, "model_timeout_s": timeout_s,
               "source": {"topic": m.topic, "partition": m.partition, "offset": m.offset},
               "digest": {"sha256": sha, "size": len(m.value or b"")}, "events": len(messages)}
        out.append((KIND, rec, eid))
    return out


class Suspects:
    """The suspect positions a stage knows, with the level each was recorded at (``ALONE``
    wins over ``BATCH``). Pure: the stage reads the ledger rows and hands them in."""

    def __init__(self, records: Sequence[dict] = ()):
        self._at: dict[tuple, dict[str, str]] = {}  # (topic, partition, offset) -> payload sha256 -> level
        for r in records:
            src, sha = r.get("source") or {}, (r.get("digest") or {}).get("sha256")
            if not isinstance(sha, str):
                continue
            levels = self._at.setdefault((src.get("topic"), src.get("partition"), src.get("offset")), {})
            if levels.get(sha) != ALONE:
                levels[sha] = r.get("level", BATCH)

    def __len__(self) -> int:
        return sum(len(v) for v in self._at.values())

    def counts(self) -> dict[str, int]:
        """How many suspects of each level."""
        out = {BATCH: 0, ALONE: 0}
        for levels in self._at.values():
            for level in levels.values():
                out[level] = out.get(level, 0) + 1
        return out

    def level(self, m: Message) -> str | None:
        """``ALONE``, ``BATCH`` or None (not a suspect) for message ``m``."""
        levels = self._at.get((m.topic, m.partition, m.offset))
        return levels.get(_digest(m)) if levels else None


class Watchdog:
    """Ends the process when a watched call runs past ``timeout_s``: ``record(entries)``
    stores the suspects (its failure is logged, the exit happens anyway), then
    ``exit(EXIT_MODEL_TIMEOUT)``. ``start`` and ``stop`` run its thread (the stage's
    ``run``); unstarted, ``watching`` only marks the call."""

    def __init__(self, timeout_s: float, record: Callable[[list[tuple[str, dict, str]]], None],
                 exit_process: Callable[[int], object] = os._exit):
        self.timeout_s = timeout_s
        self._record, self._exit = record, exit_process
        self._cond = threading.Condition()
        self._call: tuple[float, str, list[Message]] | None = None
        self._thread: threading.Thread | None = None
        self._stopped = False

    def start(self) -> None:
        with self._cond:
            self._stopped = False
        self._thread = threading.Thread(target=self._run, name="riskpipe-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    @contextmanager
    def watching(self, model: str, messages: list[Message]) -> Iterator[None]:
        """Watch the model call inside the block, for ``messages``' events of ``model``."""
        with self._cond:
            self._call = (time.monotonic(), model, messages)
            self._cond.notify()
        try:
            yield
        finally:
            with self._cond:
                self._call = None

    def _run(self) -> None:
        with self._cond:
            while not self._stopped:
                call = self._call
                if call is None:
                    self._cond.wait()
                    continue
                left = call[0] + self.timeout_s - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                self._fire(*call)
                return

    def _fire(self, since: float, model: str, messages: list[Message]) -> None:
        positions = ", ".join(f"{m.topic}:{m.partition}:{m.offset}" for m in messages[:20])
        more = f" and {len(messages) - 20} more" if len(messages) > 20 else ""
        level = ALONE if len(messages) == 1 else BATCH
        log.error("model %s: a certification call of %d event(s) ran past model_timeout_s %g s (%.0f s); recorded "
                  "as %s suspects (%s): %s%s; exiting %d for a restart", model, len(messages), self.timeout_s,
                  time.monotonic() - since, level,
                  "dead-lettered model_timeout after the restart" if level == ALONE else "each decided alone after "
                  "the restart", positions, more, EXIT_MODEL_TIMEOUT)
        try:
            self._record(suspect_entries(messages, model, self.timeout_s))
        except Exception as e:  # noqa: BLE001 - the exit must happen: the same batch would hang again
            log.error("model %s: could not record the suspects (%s: %s); the same call will hang again after the "
                      "restart", model, type(e).__name__, e)
        for h in logging.getLogger().handlers:
            h.flush()
        sys.stderr.flush()
        self._exit(EXIT_MODEL_TIMEOUT)
