"""The service's half of tenant isolation: every rule that narrows or refuses a call by its grants, in one place.

Each check reads the running call's ``Access`` (``tenants.types.CURRENT``, set by the interceptor once per call).
PostgreSQL's row-level security applies the same grants again below (``storage.database`` runs scoped calls as the
calls role), so a rule forgotten here still leaks nothing; these checks make the answers precise: a filter naming an
ungranted scope is PERMISSION_DENIED naming the field, an id outside the grants is NOT_FOUND exactly as a missing
one, and a narrowed filter lets PostgreSQL plan with the scope index.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

from memory_service.errors import NotFound, PermissionDenied
from memory_service.models import MemoryFilter, Scope, ScopeRef
from memory_service.tenants.types import CURRENT, FULL_ACCESS, Access, Permission, current


def require(permission: Permission, what: str) -> Access:
    """The call's access, when it holds ``permission``; PERMISSION_DENIED otherwise."""
    access = current()
    if not access.allows(permission):
        raise PermissionDenied(f"{what} needs a token with the {permission.value} permission")
    return access


def narrow(memory_filter: MemoryFilter, field: str = "filter") -> MemoryFilter:
    """``memory_filter`` within the call's grants: no scope named means every granted scope; a scope named outside
    them is PERMISSION_DENIED naming it (``filter.scopes[1]``)."""
    access = current()
    if access.every_scope:
        return memory_filter
    if not memory_filter.scopes:
        granted = tuple(ScopeRef(scope=g.scope, scope_id=g.scope_id) for g in access.scopes if g.scope is not None)
        return dataclasses.replace(memory_filter, scopes=granted)
    for index, ref in enumerate(memory_filter.scopes):
        if not access.covers(ref.scope, ref.scope_id):
            raise PermissionDenied(_outside(ref.scope, ref.scope_id), field=f"{field}.scopes[{index}]")
    return memory_filter


def check_scope(scope: Scope, scope_id: int | None, field: str) -> None:
    """A write into one scope (every id of the kind when ``scope_id`` is None): PERMISSION_DENIED naming ``field``
    when the call's grants do not cover it."""
    if not current().covers(scope, scope_id):
        raise PermissionDenied(_outside(scope, scope_id), field=field)


def scoped() -> bool:
    """Whether the call sees only some scopes (and runs under row-level security)."""
    return not current().every_scope


def sees(scope: Scope, scope_id: int) -> bool:
    return current().covers(scope, scope_id)


def check_visible(scope: Scope, scope_id: int, missing: str) -> None:
    """An id the call read: NOT_FOUND with the message a missing id gets (``missing``) when it is not granted."""
    if not sees(scope, scope_id):
        raise NotFound(missing)


def check_namespace(namespace: str, field: str = "namespace") -> None:
    """A lease call in ``namespace``: PERMISSION_DENIED unless the token was granted it (``--lease NS``)."""
    access = current()
    if not access.allows_namespace(namespace):
        raise PermissionDenied(f"lease namespace {namespace!r} is not granted to this token", field=field)


def every_namespace() -> bool:
    return current().allows_namespace("*")


def allows_namespace(namespace: str) -> bool:
    return current().allows_namespace(namespace)


@contextlib.contextmanager
def maintenance() -> Iterator[None]:
    """Work the service does for itself during a call (binding the embedding model): full access, as the owner."""
    token = CURRENT.set(FULL_ACCESS)
    try:
        yield
    finally:
        CURRENT.reset(token)


def server_wide() -> bool:
    """Whether the call may see what spans every tenant (server-wide Stats, other tenants' counts)."""
    return Permission.ADMIN in current().permissions


def _outside(scope: Scope, scope_id: int | None) -> str:
    named = scope.value if scope_id is None else f"{scope.value}:{scope_id}"
    return f"scope {named} is outside this token's grants"
