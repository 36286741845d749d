"""The one codec of page tokens and cursors: List (live and as-of), History, lease List and Watch all use it.

A token is opaque to clients: URL-safe base64 of ``[format, kind, position, binding fingerprint]`` as JSON, followed
by a checksum. Decoding refuses, as ``InvalidArgument`` naming the request's field, anything this codec did not
issue for that request: a token that does not parse, whose checksum does not match (edited or truncated), of
another kind (a History token given to List), bound to another request (another filter, memory, namespace or
as-of time), or whose position is out of range for its kind (a version past int4, a negative id). So nothing a
client sends as a token reaches SQL unchecked, and none can turn into INTERNAL.

The checksum is not a secret: it detects corruption and edits, not a forger who recomputes it. A token carries
only a position in an order the caller may page through anyway, and every position is range-checked, so a forged
one can start a page elsewhere, never reach data the request could not.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
from typing import Any

from memory_service.errors import InvalidArgument
from memory_service.models import MemoryFilter

_FORMAT = 2
_CHECKSUM_BYTES = 8
_SALT = b"memory-service page token\x00"
_MAX_TOKEN_CHARS = 2048
"""Longer than any token issued (the longest position is two lease names of at most 200 characters)."""

INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Int:
    """A position part that is an integer in ``[low, high]``."""

    low: int
    high: int

    def check(self, value: Any) -> bool:
        return type(value) is int and self.low <= value <= self.high


@dataclasses.dataclass(frozen=True)
class Text:
    """A position part that is a string of at most ``max_chars`` characters."""

    max_chars: int

    def check(self, value: Any) -> bool:
        return isinstance(value, str) and len(value) <= self.max_chars


Part = Int | Text


@dataclasses.dataclass(frozen=True)
class TokenKind:
    """One paginated request's tokens: what the position holds, and the request field that carries them."""

    name: str
    field: str
    position: tuple[Part, ...]

    def encode(self, *position: int | str, binding: str = "") -> str:
        """A token for ``position``, valid only with a request whose binding (filter, memory, ...) is ``binding``."""
        if len(position) != len(self.position) or not all(
            part.check(value) for part, value in zip(self.position, position, strict=True)
        ):
            raise ValueError(f"{self.name} token position out of range: {position!r}")
        payload = json.dumps([_FORMAT, self.name, list(position), _fingerprint(binding)], separators=(",", ":"))
        raw = payload.encode()
        return base64.urlsafe_b64encode(raw + _checksum(raw)).decode().rstrip("=")

    def decode(self, token: str, *, binding: str = "") -> tuple[Any, ...] | None:
        """The position ``token`` names; None for "" (the first page)."""
        if not token:
            return None
        raw = _payload(token)
        if raw is None:
            raise self._refuse("is not a token this service issued")
        try:
            fmt, kind, position, fingerprint = json.loads(raw)
        except (ValueError, TypeError):
            raise self._refuse("is not a token this service issued") from None
        if fmt != _FORMAT or kind != self.name:
            raise self._refuse("is not a token this service issued for this request")
        if fingerprint != _fingerprint(binding):
            raise self._refuse("was issued for a different request (another filter, memory, namespace or as_of)")
        if (
            not isinstance(position, list)
            or len(position) != len(self.position)
            or not all(part.check(value) for part, value in zip(self.position, position, strict=True))
        ):
            raise self._refuse("names a position out of range")
        return tuple(position)

    def _refuse(self, reason: str) -> InvalidArgument:
        return InvalidArgument(self.field, f"{reason}; pass the {self.field} of a previous answer unchanged")


def _checksum(raw: bytes) -> bytes:
    return hashlib.sha256(_SALT + raw).digest()[:_CHECKSUM_BYTES]


def _payload(token: str) -> bytes | None:
    """The token's payload when it is well-formed base64 with a matching checksum."""
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    try:
        data = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        return None
    raw, checksum = data[:-_CHECKSUM_BYTES], data[-_CHECKSUM_BYTES:]
    if len(data) <= _CHECKSUM_BYTES or checksum != _checksum(raw):
        return None
    return raw


def filter_binding(memory_filter: MemoryFilter, *extra: str) -> str:
    """A binding that ties a token to a filter (and ``extra``, such as an as-of time)."""
    return json.dumps([dataclasses.asdict(memory_filter), *extra], sort_keys=True, default=str)


def _fingerprint(binding: str) -> str:
    return hashlib.sha256(binding.encode("utf-8", "surrogatepass")).hexdigest()[:16] if binding else ""


MEMORY_LIST = TokenKind("list", "page_token", (Int(0, INT64_MAX),))
"""List (live): the last memory id of the page."""
MEMORY_LIST_AS_OF = TokenKind("list_as_of", "page_token", (Int(0, INT64_MAX),))
"""List with as_of: the last memory id of the page; bound to the filter and the time."""
HISTORY = TokenKind("history", "page_token", (Int(1, INT32_MAX),))
"""History: the version the next page starts below (versions are int4)."""
LEASE_LIST = TokenKind("leases", "page_token", (Text(200), Text(200)))
"""Lease List: the (namespace, name) of the page's last lease; bound to the namespace asked for."""
WATCH = TokenKind("watch", "after", (Int(0, INT64_MAX),))
"""Watch: the change-log position of the last change delivered. Not bound to the filter: a client may resume with
another one."""
