"""The error of an event that cannot be decided, with its dead-letter reason code.

Its own module so that ``events`` (JSON and the envelope) and ``binary`` (Open
Inference Protocol binary tensors), which ``events`` uses, both raise it without
importing each other.
"""

from __future__ import annotations


class EventError(ValueError):
    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
