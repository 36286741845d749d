"""How a call's access reaches PostgreSQL: the settings a scoped call's connection runs with (the calls role and
what migration 0011's policies and quota trigger read), and the quota error that trigger raises."""

from __future__ import annotations

from collections.abc import Mapping

from memory_service.errors import QuotaExceeded
from memory_service.tenants.types import Access

ACCESS_SETTINGS = (
    "role",
    "memory.grants",
    "memory.grant_kinds",
    "memory.grant_ids",
    "memory.grant_every_id",
    "memory.principal",
    "memory.max_memories",
)
"""The settings that carry a call's access to PostgreSQL."""

QUOTA_SQLSTATE = "MS429"
"""Raised by migration 0011's count trigger when a write would take a token's scopes past its memory quota."""


def access_settings(access: Access) -> dict[str, str]:
    """The settings a connection needs for ``access``: none for full access without a quota."""
    values: dict[str, str] = {}
    if access.scoped:
        values["role"] = access.calls_role
        values.update(access.policy_settings())
    if access.scoped or access.max_memories is not None:
        values["memory.grants"] = access.grants_setting()
        values["memory.principal"] = access.principal or ""
    if access.max_memories is not None:
        values["memory.max_memories"] = str(access.max_memories)
    return values


def access_part(values: Mapping[str, str] | None) -> dict[str, str] | None:
    """The access settings among a connection's session settings (None while they are not known)."""
    return None if values is None else {k: v for k, v in values.items() if k in ACCESS_SETTINGS}


def quota_exceeded(access: Access) -> QuotaExceeded:
    return QuotaExceeded(
        subject=f"token:{access.principal}",
        quota="max_memories",
        description=f"the token's scopes may hold at most {access.max_memories} memories",
    )
