"""The four UTC text forms riskpipe writes are interfaces: pinned here, to the character."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

from riskpipe import timestamps as ts

T = datetime(2024, 5, 1, 8, 3, 9, 123456, tzinfo=UTC)
ELSEWHERE = T.astimezone(timezone(timedelta(hours=-7)))  # the same instant in another zone


def test_each_form_to_the_character_whatever_the_zone_of_the_datetime():
    for t in (T, ELSEWHERE):
        assert ts.rfc3339_millis(t) == "2024-05-01T08:03:09.123Z"
        assert ts.rfc3339_seconds(t) == "2024-05-01T08:03:09Z"
        assert ts.rfc3339_micros(t) == "2024-05-01T08:03:09.123456Z"
        assert ts.iso_seconds(t) == "2024-05-01T08:03:09+00:00"


def test_epoch_seconds_and_now_are_aware_utc():
    assert ts.from_epoch(T.timestamp()) == T and ts.from_epoch(0).tzinfo is UTC
    before = datetime.now(UTC)
    now = ts.utc_now()
    assert now.tzinfo is UTC and before <= now <= datetime.now(UTC)
    assert datetime.fromisoformat(ts.rfc3339_millis()) - now < timedelta(seconds=5)
