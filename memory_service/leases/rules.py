"""What a lease caller may send: names, holder text, TTLs, waits, lease ids and page tokens.

The rules live apart from ``manager.py`` so they read in one place and the manager reads as the lease lifecycle
alone. Every check fails early with ``InvalidArgument`` naming what was expected and what came.
"""

from __future__ import annotations

import dataclasses
import re
import uuid

from memory_service import pagination
from memory_service.config.settings import Settings
from memory_service.errors import InvalidArgument
from memory_service.leases.types import Lease

MAX_NAME_LENGTH = 200
MAX_HOLDER_LENGTH = 200
MAX_REQUEST_ID_LENGTH = 128
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+=-]*")


def check_name(field: str, value: str) -> None:
    if not value:
        raise InvalidArgument(field, "is required")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(field, f"is expected to be at most {MAX_NAME_LENGTH} characters (got {len(value)})")
    if not _NAME.fullmatch(value):
        raise InvalidArgument(
            field,
            f"is expected to start with a letter or digit and use only A-Z a-z 0-9 . _ : / @ + = - (got {value!r})",
        )


def check_text(field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(field, f"is expected to be at most {limit} characters (got {len(value)})")
    if not value.isprintable():
        raise InvalidArgument(field, "is expected to hold printable characters only")


def check_ttl(settings: Settings, ttl: float | None, field: str = "ttl") -> float:
    if ttl is None or ttl <= 0:
        raise InvalidArgument(field, "is required and must be positive")
    if not settings.lease_min_ttl <= ttl <= settings.lease_max_ttl:
        raise InvalidArgument(
            field,
            f"is expected between {settings.lease_min_ttl:g}s and {settings.lease_max_ttl:g}s (got {ttl:g}s)",
        )
    return ttl


def parse_lease_id(lease_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(lease_id)
    except ValueError:
        raise InvalidArgument(
            "lease_id", f"is expected to be a lease id from Acquire (got {lease_id[:64]!r})"
        ) from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class AcquireSpec:
    """What a caller asks for; ``validated`` checks it against the settings."""

    namespace: str
    name: str
    ttl: float | None
    wait: float = 0.0
    request_id: str = ""
    holder: str = ""

    def validated(self, settings: Settings) -> AcquireSpec:
        check_name("namespace", self.namespace)
        check_name("name", self.name)
        check_ttl(settings, self.ttl)
        if not 0 <= self.wait <= settings.lease_max_wait:
            raise InvalidArgument(
                "wait", f"is expected between 0 and {settings.lease_max_wait:g}s (got {self.wait:g}s)"
            )
        check_text("request_id", self.request_id, MAX_REQUEST_ID_LENGTH)
        check_text("holder", self.holder, MAX_HOLDER_LENGTH)
        return self


def encode_page_token(namespace: str, name: str, *, listed: str) -> str:
    """The next page's token after lease (namespace, name) of a List of namespace ``listed`` ("" for all)."""
    return pagination.LEASE_LIST.encode(namespace, name, binding=listed)


def decode_page_token(token: str, *, listed: str) -> tuple[str, str] | None:
    position = pagination.LEASE_LIST.decode(token, binding=listed)
    return None if position is None else (position[0], position[1])


def owner_for(principal: str | None, holder: str) -> str:
    """Who a grant is charged to for quotas: the authenticated caller, or the holder's description when auth is off."""
    return principal if principal is not None else "holder:" + (holder or "anonymous")


def shows_lease_id(lease: Lease, principal: str | None) -> bool:
    """The lease id renews and releases a lease, so with auth on only its owner sees it in Get and List."""
    return principal is None or principal == lease.owner
