"""Per-call observation beyond metrics: the JSON access log, the slow-call log, and the RPC's trace span.

Built only when one of them is on; the interceptor then calls ``begin`` and ``end`` around each call, and does
nothing more than a ``None`` check otherwise. What is logged or traced: method, code, duration, request and trace
ids, the principal (a token's fingerprint, never the token), and for a slow search its plan: never a memory's or a
query's text.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import grpc
from grpc import aio

from memory_service.observability.calls import CallNote, current_call
from memory_service.observability.logs import ACCESS_LOGGER
from memory_service.observability.tracing import Tracing

access_log = logging.getLogger(ACCESS_LOGGER)
slow_log = logging.getLogger("memory_service.slow")

_REQUEST_ID_CHARS = 128


class CallObserver:
    """What to do around each call: log it (JSON mode), log it when slow, trace it."""

    def __init__(self, *, access_log: bool, slow_call_seconds: float | None, tracing: Tracing | None) -> None:
        self.access_log = access_log
        self.slow_call_seconds = slow_call_seconds
        self.tracing = tracing

    @property
    def active(self) -> bool:
        return self.access_log or self.slow_call_seconds is not None or self.tracing is not None

    def begin(self, method: str, context: aio.ServicerContext) -> _Watch:
        metadata = context.invocation_metadata() or ()
        request_id = trace_parent = None
        for key, value in metadata:
            if key == "x-request-id" and isinstance(value, str):
                request_id = value[:_REQUEST_ID_CHARS]
            elif key == "traceparent" and isinstance(value, str):
                trace_parent = value
        note = CallNote(method=method, request_id=request_id or os.urandom(8).hex())
        call_span = span_token = None
        if self.tracing is not None:
            call_span, span_token = self.tracing.start_call(method, metadata)
            note.trace_id = self.tracing.trace_id(call_span)
        elif trace_parent is not None:
            note.trace_id = _trace_id_of(trace_parent)
        return _Watch(self, note, current_call.set(note), call_span, span_token)


class _Watch:
    __slots__ = ("_note_token", "_observer", "_span", "_span_token", "note")

    def __init__(self, observer: CallObserver, note: CallNote, note_token: Any, span: Any, span_token: Any) -> None:
        self._observer = observer
        self.note = note
        self._note_token = note_token
        self._span = span
        self._span_token = span_token

    def end(self, code: grpc.StatusCode, seconds: float, principal: str | None) -> None:
        observer = self._observer
        note = self.note
        note.principal = principal
        try:
            if observer.access_log:
                access_log.info(
                    f"{note.method} {code.name}", extra={"fields": {"code": code.name, "duration": round(seconds, 6)}}
                )
            slow = observer.slow_call_seconds
            if slow is not None and seconds >= slow:
                plan = note.plan or {}
                slow_log.warning(
                    "slow call: %s took %.3fs (%s)%s",
                    note.method,
                    seconds,
                    code.name,
                    "".join(f" {key}={value}" for key, value in plan.items()),
                    extra={"fields": {"code": code.name, "duration": round(seconds, 6), "plan": plan}},
                )
            if observer.tracing is not None:
                attributes = {f"memory.search.{key}": value for key, value in (note.plan or {}).items()}
                attributes["memory.request_id"] = note.request_id
                if principal is not None:
                    attributes["memory.principal"] = principal
                observer.tracing.end_call(self._span, self._span_token, code, attributes)
        finally:
            # A stream closed from another context (at garbage collection) cannot reset: its context is gone anyway.
            with contextlib.suppress(ValueError):
                current_call.reset(self._note_token)


def _trace_id_of(trace_parent: str) -> str | None:
    """The trace id of a W3C ``traceparent`` (``00-<32 hex>-<16 hex>-<2 hex>``), or None when malformed."""
    parts = trace_parent.strip().split("-")
    if len(parts) == 4 and len(parts[1]) == 32 and all(c in "0123456789abcdef" for c in parts[1]):
        return parts[1] if parts[1] != "0" * 32 else None
    return None
