"""The note of the running call: who made it, which request it is, and what plan its search chose.

The interceptor creates a note per call only when something reads it (the JSON access log, the slow-call log,
tracing); the domain adds its plan through ``note_plan``, which costs one context-variable read when nobody does.
"""

from __future__ import annotations

import contextvars
import dataclasses
from typing import Any


@dataclasses.dataclass(slots=True)
class CallNote:
    method: str
    request_id: str
    trace_id: str | None = None
    principal: str | None = None
    plan: dict[str, Any] | None = None
    """What the call's search did (plan, probes, candidates): never its text."""


current_call: contextvars.ContextVar[CallNote | None] = contextvars.ContextVar("current_call", default=None)


def note_plan(**plan: Any) -> None:
    """Record how the running call's search ran, for the slow-call log and its trace span."""
    note = current_call.get()
    if note is not None:
        note.plan = plan
