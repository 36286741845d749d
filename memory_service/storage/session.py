"""Session settings on pooled connections: what each connection was given, and the statements that change it.

Searches set scan settings and every call its access (tenant grants) as session settings, sent only when they
differ from what the connection already has, so a call of the same shape as the last costs no round trip for them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import asyncpg

from memory_service.storage.access import ACCESS_SETTINGS, access_part

_SETTING_NAME = re.compile(r"^[a-z_]+(\.[a-z_]+)?$")
_SETTING_VALUE = re.compile(r"^[A-Za-z0-9_.,:*-]+$")

_ISOLATION = {
    "read_committed": "",
    "repeatable_read": " ISOLATION LEVEL REPEATABLE READ",
    "serializable": " ISOLATION LEVEL SERIALIZABLE",
}


def begin_statement(settings: Mapping[str, str], *, readonly: bool = False, isolation: str = "read_committed") -> str:
    """``BEGIN; SET LOCAL ...`` as one simple query. Settings come from code, never from a client, and are
    checked against a strict pattern all the same, since simple queries cannot carry parameters."""
    parts = [f"BEGIN{_ISOLATION[isolation]}{' READ ONLY' if readonly else ''}"]
    for name, value in settings.items():
        if not _SETTING_NAME.match(name) or not _SETTING_VALUE.match(value):
            raise ValueError(f"refusing to SET LOCAL {name!r} = {value!r}")
        parts.append(f"SET LOCAL {name} = '{value}'")
    return "; ".join(parts)


def session_statement(current: Mapping[str, str] | None, wanted: Mapping[str, str]) -> str:
    """The simple query that turns a connection's session settings from ``current`` into ``wanted``.

    ``current`` None means not known (a change was interrupted): everything is reset first. Settings that
    ``current`` has and ``wanted`` lacks are reset to the server default. Names and values come from code, never
    from a client, and are checked against a strict pattern all the same (simple queries carry no parameters)."""
    parts = ["RESET ALL"] if current is None else []
    known = current or {}
    parts.extend(f"RESET {name}" for name in known if name not in wanted)
    for name, value in wanted.items():
        if not _SETTING_NAME.match(name) or not _SETTING_VALUE.match(value):
            raise ValueError(f"refusing to SET {name!r} = {value!r}")
        if known.get(name) != value:
            parts.append(f"SET {name} = '{value}'")
    return "; ".join(parts)


class SessionSettings:
    """The session settings the service gave one pooled connection; ``values`` None while not known."""

    def __init__(self) -> None:
        self.values: dict[str, str] | None = {}


class PooledConnection(asyncpg.Connection):  # type: ignore[misc]
    """A pooled connection that remembers its session settings, so a search sends ``SET`` only when they change.

    The pool's reset sends nothing (``reset_connection``), so session settings outlive the call that made them."""

    __slots__ = ("session_settings",)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.session_settings = SessionSettings()

    async def close(self, *, timeout: float | None = None) -> None:
        """Close politely, or drop the connection where its socket is already gone.

        The pool closes a connection it has expired from a task nobody awaits: a peer that went away (a terminated
        backend, a restarted server) would otherwise surface as an asyncio "Task exception was never retrieved"
        error in the log. ``Connection.close`` has aborted the transport by the time it raises, so nothing leaks."""
        try:
            await super().close(timeout=timeout)
        except (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.ConnectionDoesNotExistError):
            self.terminate()


async def use_session_settings(conn: asyncpg.Connection, wanted: Mapping[str, str]) -> None:
    """Give ``conn`` exactly the session settings ``wanted`` (among those the service sets), in at most one trip."""
    state = _session_state(conn)
    if conn.is_in_transaction():
        # A rollback would undo the SET behind the connection's back.
        raise RuntimeError("session settings are set outside a transaction")
    if state.values == wanted:
        return
    statement = session_statement(state.values, wanted)
    # Unknown until the server confirms: a cancelled SET may or may not have been applied.
    state.values = None
    await conn.execute(statement)
    state.values = dict(wanted)


def _is_planner_setting(name: str) -> bool:
    """``enable_*`` settings change the plan of every statement, not just the index scan that wanted them."""
    return name.startswith("enable_")


def _session_state(conn: asyncpg.Connection) -> SessionSettings:
    state = getattr(conn, "session_settings", None)  # through the pool's proxy
    if not isinstance(state, SessionSettings):
        raise TypeError(f"expected a connection of Database's pool (a PooledConnection), got {type(conn).__name__}")
    return state


async def use_access(conn: asyncpg.Connection, access: Mapping[str, str]) -> None:
    """Give ``conn`` the session settings of ``access`` and drop planner settings a search left on it, in at most one
    round trip (none when it already has them); scan settings such as ``ivfflat.probes`` affect only index scans and
    stay. ``enable_*`` settings change the plan of every statement, not just the index scan that wanted them."""
    state = _session_state(conn)
    known = state.values
    if known is not None and access_part(known) == access and not any(map(_is_planner_setting, known)):
        return
    kept = {k: v for k, v in (known or {}).items() if not _is_planner_setting(k) and k not in ACCESS_SETTINGS}
    await use_session_settings(conn, {**kept, **access})


async def access_for_transaction(conn: asyncpg.Connection, access: Mapping[str, str]) -> dict[str, str]:
    """What a transaction must ``SET LOCAL`` to run with ``access``; a connection whose session runs with another
    call's access is switched first (one round trip: calls of the same access reuse it at no cost)."""
    state = _session_state(conn)
    known = state.values
    if known is not None and not access_part(known):
        if any(map(_is_planner_setting, known)):
            await use_access(conn, {})
        return dict(access)  # folded into BEGIN: nothing of it outlives the transaction
    await use_access(conn, access)
    return {}


async def reset_connection(conn: asyncpg.Connection) -> None:
    """Roll back a transaction left open (after a cancelled call); otherwise send nothing.

    asyncpg's default reset sends ``pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL`` on every release:
    a round trip per call for state this service never creates. It changes settings with SET LOCAL, or with SET
    only through ``settings_connection`` (which tracks them per connection, and whose every caller that depends on
    them states all of its own, so they may stay); takes advisory locks only at transaction level; and keeps
    cursors and LISTEN off pooled connections (the migration runner and the index builder use connections of their
    own). Whatever a transaction did ends with it.
    """
    if conn.is_in_transaction():
        await conn.execute("ROLLBACK")
