"""One redaction function for everything riskpipe prints, logs or raises that can hold a
secret: a DSN, a URL with credentials, a ``password=`` keyword, or a secret value the
process knows (registered when it is read from the config, a DSN or a secret file).

``redact(text)`` is that function. ``install()`` (called once by the ``riskpipe``
command) routes the process's stdout, stderr and every log record through it, so a
summary, an error line, a log line or even a traceback cannot carry a password; code
that builds a message for others to show (errors, reports) calls ``redact`` itself.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from urllib.parse import quote, unquote

MASK = "***"
# scheme://user:password@host — the password may itself hold "@" (unencoded): the match
# runs to the last "@" before whitespace, so nothing of the password is left behind
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/?#@]*):[^\s]*@")
# libpq keyword and URL query forms: password=..., password='...', ?password=...&
_KEYWORD = re.compile(r"(?i)\b((?:ssl)?pass(?:word|wd)|pwd|sasl_plain_password|ssl_password)(\s*[=:]\s*)"
                      r"('(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"|[^\s&,;)]+)")
# a PEM private key (a signing key given where a path belongs, e.g. through ${VAR}), to its
# END line or, cut short, to the end of the text; line breaks may have become spaces
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S)
_MIN_SECRET = 4  # shorter values would mask ordinary text

_secrets: set[str] = set()
_lock = threading.Lock()


def register_secret(value: str | None) -> None:
    """Mask ``value`` (and its URL-encoded and -decoded forms) wherever it appears from now on."""
    if not isinstance(value, str) or len(value) < _MIN_SECRET:
        return
    with _lock:
        _secrets.update(v for v in (value, quote(value, safe=""), unquote(value)) if len(v) >= _MIN_SECRET)


def redact(text) -> str:
    """``text`` with every password it holds replaced by ``***``."""
    s = str(text)
    if "PRIVATE KEY-----" in s:
        s = _PRIVATE_KEY.sub(f"[private key {MASK}]", s)
    if "@" in s:
        s = _URL_USERINFO.sub(rf"\1:{MASK}@", s)
    if "=" in s or ":" in s:
        s = _KEYWORD.sub(rf"\1\2{MASK}", s)
    if _secrets:
        for secret in sorted(_secrets, key=len, reverse=True):
            if secret in s:
                s = s.replace(secret, MASK)
    return s


class RedactingStream:
    """A text stream that writes ``redact(text)`` to the stream it wraps; everything else
    (encoding, errors, fileno, isatty, ...) is the wrapped stream's."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # a text stream, as click and logging expect
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        self._stream.write(redact(text))
        return len(text)

    def flush(self) -> None:
        self._stream.flush()

    def __getattr__(self, name):  # encoding, buffer, fileno, isatty, ...
        return getattr(self._stream, name)


class RedactingRecord(logging.LogRecord):
    """A log record whose message (arguments included) is redacted."""

    def getMessage(self) -> str:  # logging's name
        return redact(super().getMessage())


def install() -> None:
    """Redact this process's stdout, stderr and log records (idempotent). Log handlers
    made afterwards write to the redacting streams; every record's message is redacted
    by the record factory, whichever handler formats it."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, RedactingStream):
            setattr(sys, name, RedactingStream(stream))
    if logging.getLogRecordFactory() is not RedactingRecord:
        logging.setLogRecordFactory(RedactingRecord)
