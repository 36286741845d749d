"""Timestamps and Durations from the wire, checked against protobuf's valid ranges before anything uses them.

protobuf defines a Timestamp as years 0001 to 9999 with ``nanos`` in [0, 1e9), and a Duration as at most 10,000
years either way with ``nanos`` below 1e9 in magnitude and of the same sign as ``seconds``. The Python runtime
does not enforce either on a received message, and its ``ToDatetime`` raises a plain ValueError (INTERNAL) or
silently accepts a wrong-signed ``nanos``. Every request field goes through here instead, so each bad value is an
InvalidArgument naming its field.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from google.protobuf import duration_pb2, timestamp_pb2

from memory_service.errors import InvalidArgument

TIMESTAMP_MIN_SECONDS = -62_135_596_800
"""0001-01-01T00:00:00Z."""
TIMESTAMP_MAX_SECONDS = 253_402_300_799
"""9999-12-31T23:59:59Z."""
DURATION_MAX_SECONDS = 315_576_000_000
"""About 10,000 years, protobuf's bound for a Duration."""
NANOS_PER_SECOND = 1_000_000_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def check_timestamp_parts(field: str, seconds: int, nanos: int) -> datetime:
    """The UTC datetime a Timestamp names (to the microsecond, as PostgreSQL stores it)."""
    if not TIMESTAMP_MIN_SECONDS <= seconds <= TIMESTAMP_MAX_SECONDS:
        raise InvalidArgument(
            field,
            f"is expected between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z (got seconds={seconds})",
        )
    if not 0 <= nanos < NANOS_PER_SECOND:
        raise InvalidArgument(field, f"is expected to have nanos in 0..999999999 (got {nanos})")
    return _EPOCH + timedelta(seconds=seconds, microseconds=nanos // 1000)


def check_duration_parts(field: str, seconds: int, nanos: int) -> timedelta:
    """The timedelta a Duration names, to the microsecond."""
    if not -DURATION_MAX_SECONDS <= seconds <= DURATION_MAX_SECONDS:
        raise InvalidArgument(
            field, f"is expected within +-{DURATION_MAX_SECONDS} seconds (about 10,000 years; got {seconds})"
        )
    if not -NANOS_PER_SECOND < nanos < NANOS_PER_SECOND:
        raise InvalidArgument(field, f"is expected to have |nanos| below 1000000000 (got {nanos})")
    if (seconds > 0 and nanos < 0) or (seconds < 0 and nanos > 0):
        raise InvalidArgument(
            field, f"is expected to have nanos of the same sign as seconds (got {seconds}s and {nanos}ns)"
        )
    # Rounded away from zero to whole microseconds (PostgreSQL's resolution), so a positive Duration never becomes
    # zero and a TTL is never shortened.
    micros = -(-abs(nanos) // 1000)
    return timedelta(seconds=seconds, microseconds=micros if nanos >= 0 else -micros)


def timestamp(field: str, message: timestamp_pb2.Timestamp) -> datetime:
    return check_timestamp_parts(field, message.seconds, message.nanos)


def duration(field: str, message: duration_pb2.Duration) -> timedelta:
    return check_duration_parts(field, message.seconds, message.nanos)
