"""Reading a secret from a file (a password, a session key, the stage's noise key):
its first line, stripped, with an error that names the setting and the file and
never the content."""

from __future__ import annotations

from riskpipe.paths import read_text
from riskpipe.redaction import register_secret


def read_secret_file(path: str, what: str, error: type[Exception] = ValueError) -> str:
    """First line of the secret file ``path``, stripped and masked in every output from
    now on (riskpipe.redaction); ``error(message)`` for a missing, unreadable or empty file."""
    text = read_text(path, what, error)
    line = text.splitlines()[0].strip() if text.strip() else ""
    if not line:
        raise error(f"{what} {path}: file is empty")
    register_secret(line)
    return line
