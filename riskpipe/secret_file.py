"""Reading a secret from a file (a password, a session key, the stage's noise key):
its first line, stripped, with an error that names the setting and the file and
never the content."""

from __future__ import annotations

from riskpipe.paths import read_text
from riskpipe.redaction import register_secret


def read_secret_file(path: str, what: str, error: type[Exception] = ValueError) -> str:
    """First line of the secret file ``path``, stripped and masked in every output from
    now on (riskpipe.redaction); ``error(message)`` for a missing, unreadable or empty file."""
    text = read_text(path, what, error).lstrip("\ufeff")  # a byte-order mark is no part of the secret
    line = text.splitlines()[0].strip() if text.strip() else ""
    if not line:
        raise error(f"{what} {path}: file is empty")
    register_secret(line)
    return line


PLACEHOLDERS = ("change-me", "changeme", "change_me")
MIN_DISTINCT = 8


def weak_secret(text: str, min_length: int) -> str | None:
    """Why ``text`` is no key to rely on (too short, an example's ``change-me`` placeholder,
    or fewer than 8 distinct characters, such as 32 spaces), or None."""
    if len(text) < min_length:
        return f"must be at least {min_length} characters, has {len(text)}"
    if any(p in text.lower() for p in PLACEHOLDERS):
        return "is an example's placeholder (change-me...): make one with `openssl rand -hex 32`"
    if len(set(text)) < MIN_DISTINCT:
        return (f"has {len(set(text))} distinct characters, fewer than {MIN_DISTINCT}: make one with "
                "`openssl rand -hex 32`")
    return None
