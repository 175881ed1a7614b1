"""UTC time: the clock and the four text forms riskpipe writes.

Each form is an interface — stored in ledger records and tables, printed in reports,
manifests and ``ledger head --json``, compared by readers and tests — so none of them
changes; what is shared is the one code path that makes each. All take an aware
datetime (another zone is converted to UTC) and, where it makes sense, default to now.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_now() -> datetime:
    """Now, as an aware UTC datetime."""
    return datetime.now(UTC)


def from_epoch(seconds: float) -> datetime:
    """Seconds since the epoch as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)


def rfc3339_millis(dt: datetime | None = None) -> str:
    """``2024-05-01T12:00:00.123Z``: the ``ts`` of records the stage and the review
    console write (decisions, audit, policy, DLQ, verdicts) and Kafka source times."""
    return (dt or utc_now()).astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def rfc3339_seconds(dt: datetime | None = None) -> str:
    """``2024-05-01T12:00:00Z``: report and evidence-bundle times, ``ledger head --json``,
    review deadlines, benchmark results."""
    return (dt or utc_now()).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def rfc3339_micros(dt: datetime) -> str:
    """``2024-05-01T12:00:00.123456Z``: the ``ts`` of ledger entries ingested from Kafka
    (``riskpipe ledger ingest``), from the message timestamp."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def iso_seconds(dt: datetime | None = None) -> str:
    """``2024-05-01T12:00:00+00:00``: when a ledger stored an input (``inputs.ts``)
    or applied a schema step (``schema_version.applied_at``)."""
    return (dt or utc_now()).astimezone(UTC).isoformat(timespec="seconds")
