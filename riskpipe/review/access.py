"""Who may use the review console: the failed-login throttle and the sessions the server
keeps open. Plain thread-safe state, no Flask: ``riskpipe.review.auth`` applies it."""

from __future__ import annotations

import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field

MAX_FAILURES = 5
LOCKOUT_SECONDS = 300.0
# failed guesses at the shared password, from any address under any name, before it is
# locked for everyone: the limit per credential (a guesser spreading tries over names
# and addresses meets it); higher than MAX_FAILURES because every reviewer shares it
SHARED_MAX_FAILURES = 20
SWEEP_KEYS = 4096  # past this many keys, a failure first drops the entries whose failures all expired
SHARED_CREDENTIAL = "credential:shared"


@dataclass
class LoginThrottle:
    """Failed logins per key (a client address, a reviewer name) in a sliding window.

    The console locks out an address *and* a reviewer name: per address alone, an
    attacker spreading guesses at one name over many addresses is never slowed. The
    price: anyone can lock a reviewer out for ``LOCKOUT_SECONDS`` by failing five
    times under their name; that is the lesser harm for a console behind a login.
    A guess at the shared password (a name that is not a configured user) also counts
    against the credential itself (``SHARED_CREDENTIAL``, ``SHARED_MAX_FAILURES``), so
    spreading guesses over many names and addresses does not escape the limit either.
    """

    failures: defaultdict[str, deque[float]] = field(default_factory=lambda: defaultdict(deque))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def locked(self, *keys: str) -> bool:
        """Whether any key is locked out; a look-up stores nothing (it used to keep an empty
        entry for every name and address it was asked about, refused attempts included)."""
        with self.lock:
            hit = False
            for key in keys:
                q = self.failures.get(key)
                if q is None:
                    continue
                self._expire(key, q, time.monotonic())
                hit = hit or len(q) >= (SHARED_MAX_FAILURES if key == SHARED_CREDENTIAL else MAX_FAILURES)
            return hit

    def fail(self, *keys: str) -> None:
        with self.lock:
            now = time.monotonic()
            if len(self.failures) >= SWEEP_KEYS:  # keep only failures inside the window
                for key, q in list(self.failures.items()):
                    self._expire(key, q, now)
            for key in keys:
                self.failures[key].append(now)

    def _expire(self, key: str, q: deque[float], now: float) -> None:
        while q and now - q[0] > LOCKOUT_SECONDS:
            q.popleft()
        if not q:
            del self.failures[key]

    def clear(self, *keys: str) -> None:
        with self.lock:
            for key in keys:
                self.failures.pop(key, None)


@dataclass
class SessionRegistry:
    """Sessions the server considers open. The cookie is signed, so without this a
    copied cookie would keep working after logout until it expired; with it, logout
    (and a console restart) ends the session on the server: an old cookie names a
    session id that is no longer here."""

    lifetime_s: float
    open_: dict[str, tuple[str, float]] = field(default_factory=dict)  # sid -> (reviewer, expiry)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, reviewer: str) -> str:
        sid = secrets.token_urlsafe(32)
        with self.lock:
            now = time.monotonic()
            self.open_ = {k: v for k, v in self.open_.items() if v[1] > now}
            self.open_[sid] = (reviewer, now + self.lifetime_s)
        return sid

    def valid(self, sid: object, reviewer: object) -> bool:
        with self.lock:
            hit = self.open_.get(sid) if isinstance(sid, str) else None
            return hit is not None and hit[0] == reviewer and hit[1] > time.monotonic()

    def end(self, sid: object) -> None:
        with self.lock:
            if isinstance(sid, str):
                self.open_.pop(sid, None)
