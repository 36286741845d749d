"""Input rules every entry point applies, each failure an InvalidArgument naming the field.

These are domain rules, not wire rules: PostgreSQL text cannot hold NUL, a zero vector has no cosine, and so on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np

from memory_service.errors import InvalidArgument
from memory_service.models import Vector

MAX_KEY_CHARS = 200
MAX_TAGS = 64
MAX_TAG_CHARS = 100
MAX_METADATA_BYTES = 64 * 1024
MAX_METADATA_DEPTH = 20
"""Objects and lists nested in a memory's metadata, the outermost object counted. Protobuf parsers stop at 100
nested messages, and a Struct spends three on each object (Struct, map entry, Value): a Store 32 objects deep parsed,
and then every Search and History that returned it failed in the client, one message deeper."""
MAX_SCOPES = 100
MAX_ID = 2**63 - 1
LATEST_EXPIRY = datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
"""The latest ``expires_at`` the service stores: PostgreSQL goes further, but neither the driver's datetimes nor
protobuf's Timestamps do, so a later row could never be read back."""
# pgvector computes a cosine's lengths and dot product in float32. In these bounds the largest element's square
# (at least the squared length over 16,000 dimensions, pgvector's most) is a normal float32, so the sum cannot
# underflow to zero, and no sum, square or dot product with another valid vector reaches float32's 3.4e38.
MIN_SQUARED_LENGTH = 1e-30
MAX_SQUARED_LENGTH = 1e30
TTL_CLOCK_MARGIN = timedelta(days=1)
"""A TTL is added to the database's clock, not this instance's: the bound keeps a day's skew in hand."""


def check_text(field: str, value: str, *, max_bytes: int, allow_empty: bool = False) -> str:
    if not allow_empty and not value.strip():
        raise InvalidArgument(field, "must not be empty")
    _check_no_nul(field, value)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise InvalidArgument(field, f"is {size} bytes; the limit is {max_bytes}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(field, "must be valid UTF-8 (it contains a lone surrogate)") from None
    return value


def check_texts(field: str, texts: Sequence[str], *, max_texts: int, max_bytes: int) -> list[str]:
    """Texts to embed: one to ``max_texts`` of them, each a valid text (``field[i]`` names the bad one)."""
    if not texts:
        raise InvalidArgument(field, "must hold at least one text")
    if len(texts) > max_texts:
        raise InvalidArgument(field, f"holds {len(texts)} texts; the limit is {max_texts}")
    return [check_text(f"{field}[{i}]", text, max_bytes=max_bytes) for i, text in enumerate(texts)]


def check_key(field: str, key: str) -> str:
    if len(key) > MAX_KEY_CHARS:
        raise InvalidArgument(field, f"is {len(key)} characters; the limit is {MAX_KEY_CHARS}")
    if key and not key.strip():
        raise InvalidArgument(field, "must not be only whitespace")
    _check_no_nul(field, key)
    return key


def check_vector(field: str, values: Sequence[float], dimension: int) -> Vector:
    if len(values) != dimension:
        raise InvalidArgument(field, f"has {len(values)} dimensions; this database stores {dimension}")
    vector = np.asarray(values, dtype=np.float32)
    # One reduction answers for a valid vector: the squared length is in range only when every element is finite
    # and the vector is neither zero nor so short or long that single precision loses it. In float64, where no
    # float32 square overflows or underflows (and so nothing warns). Only a vector it does not clear gets the
    # checks below, which name what is wrong.
    wide = vector.astype(np.float64)
    square_sum = float(wide @ wide)
    if MIN_SQUARED_LENGTH <= square_sum <= MAX_SQUARED_LENGTH:
        return vector
    if not np.isfinite(vector).all():
        raise InvalidArgument(field, "must contain only finite numbers (no NaN or infinity)")
    if not vector.any():
        raise InvalidArgument(field, "must not be all zeros (a zero vector has no direction to compare)")
    raise InvalidArgument(
        field,
        f"must have a length between {math.sqrt(MIN_SQUARED_LENGTH):g} and {math.sqrt(MAX_SQUARED_LENGTH):g} "
        f"(it has {math.sqrt(square_sum):.3g}): pgvector sums squares in single precision, where a shorter vector's "
        "length is zero and a longer one's infinite, and its cosine distances come out NaN or wrong",
    )


def check_fraction(field: str, value: float) -> float:
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise InvalidArgument(field, f"must be between 0 and 1 (got {value})")
    return value


def check_non_negative(field: str, value: float) -> float:
    if not math.isfinite(value) or value < 0:
        raise InvalidArgument(field, f"must be a finite number >= 0 (got {value})")
    return value


def check_id(field: str, value: int, *, allow_zero: bool = False) -> int:
    if value < 0 or (value == 0 and not allow_zero) or value > MAX_ID:
        raise InvalidArgument(field, f"must be a positive id (got {value})")
    return value


def check_tags(field: str, tags: Sequence[str]) -> tuple[str, ...]:
    if len(tags) > MAX_TAGS:
        raise InvalidArgument(field, f"has {len(tags)} tags; the limit is {MAX_TAGS}")
    for index, tag in enumerate(tags):
        if not tag.strip() or len(tag) > MAX_TAG_CHARS:
            raise InvalidArgument(f"{field}[{index}]", f"must be 1 to {MAX_TAG_CHARS} characters")
        _check_no_nul(f"{field}[{index}]", tag)
    return tuple(dict.fromkeys(tags))


def check_metadata(field: str, metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(metadata, allow_nan=False)
    except ValueError:
        raise InvalidArgument(field, "must not contain NaN or infinite numbers") from None
    if "\\u0000" in encoded:  # perhaps only an escaped backslash before "u0000": the walk tells
        _check_shape(field, metadata, nul=True)
    if len(encoded) > MAX_METADATA_BYTES:
        raise InvalidArgument(field, f"is {len(encoded)} bytes as JSON; the limit is {MAX_METADATA_BYTES}")
    if encoded.count("{") + encoded.count("[") > MAX_METADATA_DEPTH:  # else it cannot nest that deep
        _check_shape(field, metadata, nul=False)
    return metadata


def _check_shape(field: str, metadata: dict[str, Any], *, nul: bool) -> None:
    """Refuse metadata nested deeper than MAX_METADATA_DEPTH, and (``nul``) metadata with a NUL character in a key
    or a string, which PostgreSQL's jsonb cannot store."""
    pending: list[tuple[object, int]] = [(metadata, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            if depth > MAX_METADATA_DEPTH:
                raise InvalidArgument(field, f"nests objects and lists more than {MAX_METADATA_DEPTH} deep")
            if isinstance(item, dict):
                if nul and any("\x00" in key for key in item):
                    raise InvalidArgument(field, "must not contain NUL characters")
                pending.extend((inner, depth + 1) for inner in item.values())
            else:
                pending.extend((inner, depth + 1) for inner in item)
        elif nul and isinstance(item, str) and "\x00" in item:
            raise InvalidArgument(field, "must not contain NUL characters")


def check_ttl(field: str, ttl: timedelta, *, now: datetime | None = None) -> float:
    """A memory's TTL in seconds: positive, and ending no later than LATEST_EXPIRY."""
    if ttl <= timedelta(0):
        raise InvalidArgument(field, f"must be positive (got {ttl.total_seconds():g}s)")
    longest = LATEST_EXPIRY - TTL_CLOCK_MARGIN - (now or datetime.now(UTC))
    if ttl > longest:
        raise InvalidArgument(
            field,
            f"would expire after 9999-12-31, the latest expiry that can be stored "
            f"(got {ttl.total_seconds():.0f}s; at most {longest.total_seconds():.0f}s today)",
        )
    return ttl.total_seconds()


def check_limit(field: str, value: int, *, default: int, maximum: int) -> int:
    """0 means the default; above ``maximum`` means the maximum, as the proto's "capped by the server" promises (a
    client cannot know the cap, so refusing would fail a request that has a sensible answer). Negatives are refused."""
    if value == 0:
        return default
    if value < 0:
        raise InvalidArgument(field, f"must be a positive number, or 0 for the default {default} (got {value})")
    return min(value, maximum)


def _check_no_nul(field: str, value: str) -> None:
    if "\x00" in value:
        raise InvalidArgument(field, "must not contain NUL characters (PostgreSQL text cannot store them)")
