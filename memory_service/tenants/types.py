"""What a call may do: its principal, scope grants, permissions and quotas. No gRPC, no SQL.

The interceptor resolves a call's ``Access`` once and sets it in ``CURRENT``; the domain narrows and checks through
``memory_service.tenants.guard``, and ``storage.database`` hands the call only connections that run as the calls role
with these grants set, so PostgreSQL's row-level security narrows the same way (docs/security.md).
"""

from __future__ import annotations

import contextvars
import dataclasses
import enum
import re

from memory_service.models import Scope

CALLS_ROLE = "memory_calls"
"""The role calls of tokens granted scopes of one kind run as: no login, no BYPASSRLS (migration 0011; checked at
start-up). Its policies compare the scope kind by equality, so PostgreSQL keeps its ordered scoped index scans."""
CALLS_ROLE_KINDS = "memory_calls_kinds"
"""The role calls of tokens granted scopes of several kinds run as."""
CALLS_ROLES = (CALLS_ROLE, CALLS_ROLE_KINDS)

TOKEN_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,62}$")
"""What a token name may be: it is recorded as the principal in history and logs, and set as a setting value."""


class Permission(enum.StrEnum):
    READ = "read"
    """Get, List, Search, History, as-of reads, Watch and Stats (of the granted scopes)."""
    WRITE = "write"
    """Store, BulkStore, Delete and Embed."""
    ERASE = "erase"
    """Erase, in the granted scopes."""
    ADMIN = "admin"
    """Everything, in every scope, including server-wide Stats and every lease namespace."""


@dataclasses.dataclass(frozen=True, order=True)
class ScopeGrant:
    """``agent:7`` (one id), ``project:*`` (every id of a kind, ``scope_id`` None) or ``*`` (``scope`` None)."""

    scope: Scope | None
    scope_id: int | None = None

    @classmethod
    def parse(cls, text: str) -> ScopeGrant:
        """``SCOPE[:ID]``, ``SCOPE:*`` or ``*``; raises ValueError saying what was expected."""
        text = text.strip()
        if text == "*":
            return cls(None)
        name, colon, number = text.partition(":")
        try:
            scope = Scope(name.lower())
        except ValueError:
            kinds = ", ".join(s.value for s in Scope)
            raise ValueError(f"unknown scope {name!r} in {text!r}; expected one of {kinds}, or *") from None
        if not colon or number == "*":
            if scope is Scope.GLOBAL:
                return cls(scope, 0)
            if not colon:
                raise ValueError(f"{text!r} names no id: write {name}:ID for one id or {name}:* for every one")
            return cls(scope)
        if not number.isdigit() or len(number) > 18:
            raise ValueError(f"the scope id in {text!r} must be a non-negative integer or *")
        scope_id = int(number)
        if scope is Scope.GLOBAL and scope_id != 0:
            raise ValueError(f"the global scope has only id 0 (got {text!r})")
        return cls(scope, scope_id)

    def __str__(self) -> str:
        if self.scope is None:
            return "*"
        return f"{self.scope.value}:{'*' if self.scope_id is None else self.scope_id}"

    def covers(self, scope: Scope, scope_id: int | None) -> bool:
        """Whether every memory of ``scope`` (with ``scope_id``, or of any id when None) is in this grant."""
        if self.scope is None:
            return True
        if self.scope is not scope:
            return False
        return self.scope_id is None or self.scope_id == scope_id


EVERY_SCOPE = (ScopeGrant(None),)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Access:
    """A call's principal and what it may do."""

    principal: str | None
    """Recorded in history and logs: a token's name, ``token:<fingerprint>`` for AUTH_TOKENS, None with auth off."""
    scopes: tuple[ScopeGrant, ...] = EVERY_SCOPE
    permissions: frozenset[Permission] = frozenset(Permission)
    lease_namespaces: tuple[str, ...] = ("*",)
    """Lease namespaces this caller may use; ``*`` every one."""
    max_memories: int | None = None
    """The most memories the granted scopes may hold after one of this caller's writes."""
    rate: float | None = None
    """Calls per second (per instance)."""

    @property
    def every_scope(self) -> bool:
        return any(grant.scope is None for grant in self.scopes)

    @property
    def scoped(self) -> bool:
        """Whether the calls run as the calls role with row-level security narrowing them: unless every scope is
        granted (full access, admin, ``*``), when PostgreSQL has nothing to hide from them."""
        return not self.every_scope and Permission.ADMIN not in self.permissions

    @property
    def calls_role(self) -> str:
        """The role a scoped call runs as, by how many scope kinds its grants span."""
        return CALLS_ROLE if len({grant.scope for grant in self.scopes}) == 1 else CALLS_ROLE_KINDS

    def allows(self, permission: Permission) -> bool:
        return Permission.ADMIN in self.permissions or permission in self.permissions

    def covers(self, scope: Scope, scope_id: int | None) -> bool:
        return any(grant.covers(scope, scope_id) for grant in self.scopes)

    def allows_namespace(self, namespace: str) -> bool:
        granted = self.lease_namespaces
        return Permission.ADMIN in self.permissions or "*" in granted or namespace in granted

    def grants_setting(self) -> str:
        """The grants as the policies read them from ``memory.grants``: ``,agent:7,project:*,``."""
        return "," + ",".join(str(grant) for grant in self.scopes) + ","

    def policy_settings(self) -> dict[str, str]:
        """What the row-level security policies of migration 0011 read, for a scoped call: the grants, and the
        same taken apart for index conditions (the kinds; the ids of the grants naming one, -1 for none; whether a
        grant covers a kind whole)."""
        kinds = sorted({g.scope.value for g in self.scopes if g.scope is not None})
        ids = sorted({g.scope_id for g in self.scopes if g.scope is not None and g.scope_id is not None})
        return {
            "memory.grants": self.grants_setting(),
            "memory.grant_kinds": ",".join(kinds),
            "memory.grant_ids": ",".join(map(str, ids)) or "-1",
            "memory.grant_every_id": "on" if any(g.scope_id is None for g in self.scopes) else "off",
        }


FULL_ACCESS = Access(principal=None)
"""Auth off, maintenance, and the tokens of AUTH_TOKENS: everything."""

CURRENT: contextvars.ContextVar[Access] = contextvars.ContextVar("memory_service_access", default=FULL_ACCESS)
"""The running call's access. Work outside calls (start-up, background maintenance) has full access; the
interceptor sets it at the start of every call of MemoryService and LeaseService."""


def current() -> Access:
    return CURRENT.get()
