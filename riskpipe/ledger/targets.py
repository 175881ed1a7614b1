"""Which ledger backend a target names: a file path or ``sqlite:///PATH`` (SQLite), a
``postgresql://`` URL or a libpq keyword DSN (PostgreSQL); anything else is refused.

Only names the backend; ``riskpipe.ledger.store.backend_for`` maps the name to the
backend class. Kept apart from the classes so that parsing a target needs no backend.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from riskpipe.ledger.chain import LedgerError
from riskpipe.redaction import redact, register_secret

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# libpq connection keywords (https://www.postgresql.org/docs/current/libpq-connect.html)
_LIBPQ_KEYWORDS = frozenset("""host hostaddr port dbname user password passfile channel_binding connect_timeout
    client_encoding options application_name fallback_application_name keepalives keepalives_idle
    keepalives_interval keepalives_count tcp_user_timeout replication gssencmode sslmode requiressl
    sslcompression sslcert sslkey sslpassword sslcertmode sslrootcert sslcrl sslcrldir sslsni
    requirepeer ssl_min_protocol_version ssl_max_protocol_version krbsrvname gsslib gssdelegation
    service target_session_attrs load_balance_hosts""".split())
_KEYWORD_PAIR = re.compile(r"\s*([A-Za-z_]+)\s*=\s*(?:'(?:[^'\\]|\\.)*'|[^\s']+)")


def _keyword_dsn(target: str) -> list[str] | None:
    """The keywords of a libpq keyword DSN (``host=db dbname=x password=...``), or None
    when ``target`` is not one. A string that starts as one (a ``keyword=value`` pair) but
    does not parse on (an unquoted value holding a space) is a LedgerError: never a file
    name, and never echoed, since what follows ``password=`` cannot be told apart."""
    keys: list[str] = []
    pos = 0
    while pos < len(target.rstrip()):
        m = _KEYWORD_PAIR.match(target, pos)
        if m is None:
            if not keys:
                return None
            tail = re.search(r"(?i)\bpassword\s*=\s*", target)
            if tail:  # the rest of the string may all be the password: masked wherever it appears,
                rest = target[tail.end():].strip()  # whole and word by word
                for secret in (rest, *rest.split()):
                    register_secret(secret)
            raise LedgerError(f"ledger: a keyword DSN ({' '.join(k + '=...' for k in keys)} ...) that does not parse"
                              f" after its {len(keys)} keyword(s): put a value holding a space or a quote in"
                              " single quotes, or use sqlite:///PATH for a file whose name holds '='")
        keys.append(m.group(1).lower())
        pos = m.end()
    return keys or None


def _register_dsn_password(target: str) -> None:
    try:
        password = urlsplit(target).password
    except ValueError:  # not a URL urlsplit takes ("Invalid IPv6 URL"): the password is what
        # lies between the user name's ':' and the last '@', masked all the same
        userinfo = target.split("://", 1)[-1].rsplit("@", 1)
        password = userinfo[0].partition(":")[2] if len(userinfo) == 2 else None
    if password:  # libpq ends the userinfo at the first "@": mask every run of the password's pieces too
        pieces = password.split("@")
        for i in range(len(pieces)):
            for j in range(i + 1, len(pieces) + 1):
                register_secret("@".join(pieces[i:j]))
    for m in re.finditer(r"(?i)\bpassword\s*=\s*('(?:[^'\\]|\\.)*'|[^\s&]+)", target):
        v = m.group(1)
        register_secret(v[1:-1].replace("\\'", "'").replace("\\\\", "\\") if v.startswith("'") else v)


def backend_name(target: Any) -> str:
    """The backend (``sqlite`` or ``postgresql``) for ``target``; LedgerError (one line)
    for an unknown scheme.

    PostgreSQL takes a URL (``postgresql://USER:PASSWORD@HOST/DB``) or a libpq keyword
    DSN (``host=HOST dbname=DB user=USER password=...``); a keyword string with an
    unknown keyword is refused rather than taken for a file name. Either way the
    password is registered for redaction (riskpipe.redaction)."""
    if isinstance(target, Path):
        return "sqlite"
    if not isinstance(target, str) or not target.strip():
        raise LedgerError("ledger: expected a file path, a postgresql:// URL or a keyword DSN, got "
                          f"{redact(repr(target))}")
    m = _SCHEME.match(target)
    scheme = m.group(1).lower() if m else None
    if scheme is None:
        keys = _keyword_dsn(target)
        if keys is not None:
            _register_dsn_password(target)
            unknown = sorted(set(keys) - _LIBPQ_KEYWORDS)
            if unknown:
                raise LedgerError(f"ledger {redact(target)}: not a PostgreSQL keyword DSN (unknown keyword "
                                  f"{', '.join(unknown)}); use postgresql://USER@HOST/DB or host=... dbname=..., "
                                  "or sqlite:///PATH for a file whose name holds '='")
            return "postgresql"
        if "${" in target:
            raise LedgerError(f"ledger {redact(target)}: holds an unexpanded ${{VAR}} (set the variable)")
    if scheme in ("postgresql", "postgres"):
        _register_dsn_password(target)
        try:
            password = urlsplit(target).password
        except ValueError as e:  # e.g. an unencoded '[' or ']' in the password: "Invalid IPv6 URL"
            raise LedgerError(f"ledger {redact(target)}: not a valid URL ({e}); percent-encode any of "
                              "@ : / ? # [ ] % in the user name and password") from None
        if "@" in (password or ""):
            raise LedgerError(f"ledger {redact(target)}: the password holds an unencoded '@', which ends it for "
                              "PostgreSQL (the rest would be taken for the host); percent-encode it as %40")
        return "postgresql"
    if scheme in (None, "sqlite"):
        return "sqlite"
    raise LedgerError(f"ledger {redact(target)}: unknown scheme {scheme!r} "
                      "(use a file path, sqlite:///PATH or postgresql://USER@HOST/DB)")
