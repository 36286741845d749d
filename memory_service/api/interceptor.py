"""Wraps every RPC handler: authentication, domain-error translation, and metrics.

One wrapper rather than three interceptors, because the order matters and is easy to get wrong: metrics must see
the final status code, which exists only after errors are translated, and an unauthenticated call must still be
counted.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from grpc import aio

from memory_service import errors
from memory_service.api import details
from memory_service.api.call_log import CallObserver
from memory_service.api.status import status_for
from memory_service.metrics import Metrics
from memory_service.tenants import types as tenancy
from memory_service.tenants.rate import RateLimiter
from memory_service.tenants.tokens import Tokens
from memory_service.tenants.types import Access, Permission

log = logging.getLogger(__name__)

# Services anyone may call: load balancers and grpcurl need them before they have credentials.
OPEN_SERVICES = frozenset(
    {
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
        "grpc.reflection.v1.ServerReflection",
    }
)

current_principal: contextvars.ContextVar[str | None] = contextvars.ContextVar("current_principal", default=None)
"""The authenticated caller of the running RPC (a token's name, ``token:<fingerprint>`` for AUTH_TOKENS), or None
when auth is off."""

# The permission each MemoryService method needs. A method missing here needs admin: a new RPC is closed to scoped
# tokens until someone decides what it reads or writes. LeaseService methods need a lease namespace, checked by
# the lease manager against the namespace each call names.
METHOD_PERMISSIONS: dict[str, Permission] = {
    "Get": Permission.READ,
    "List": Permission.READ,
    "Search": Permission.READ,
    "History": Permission.READ,
    "Watch": Permission.READ,
    "Stats": Permission.READ,
    "Store": Permission.WRITE,
    "BulkStore": Permission.WRITE,
    "Delete": Permission.WRITE,
    "Embed": Permission.WRITE,
    "Erase": Permission.ERASE,
}
LEASE_SERVICE = "memory_service.v1.LeaseService"


class Authenticator:
    """Resolves the ``authorization: Bearer <token>`` of a call to its access: the tokens of AUTH_TOKENS (full
    access, compared in constant time) or of the tokens table; then checks the method's permission and the token's
    rate. With no token anywhere, auth is off and every call has full access."""

    def __init__(self, tokens: Tokens, rate: RateLimiter | None = None) -> None:
        self._tokens = tokens
        self._rate = rate or RateLimiter()

    async def access(self, metadata: tuple[tuple[str, str | bytes], ...] | None) -> Access:
        """The access of the presented token; UNAUTHENTICATED when auth is on and it is no live token."""
        presented = b""
        for key, value in metadata or ():
            if key == "authorization":
                raw = value.encode() if isinstance(value, str) else value
                scheme, _, token = raw.partition(b" ")
                if scheme.lower() == b"bearer":
                    presented = token.strip()
        return await self._tokens.resolve(presented)

    def admit(self, access: Access, service: str, method: str) -> None:
        """Spend one call of the token's rate and check that it may call this method at all."""
        if access.rate is not None and access.principal is not None:
            self._rate.take(access.principal, access.rate)
        if service == LEASE_SERVICE:
            if not access.lease_namespaces and Permission.ADMIN not in access.permissions:
                raise errors.PermissionDenied(f"{method} needs a token granted a lease namespace (--lease NAMESPACE)")
        elif not access.allows(METHOD_PERMISSIONS.get(method, Permission.ADMIN)):
            needed = METHOD_PERMISSIONS.get(method, Permission.ADMIN)
            raise errors.PermissionDenied(f"{method} needs a token with the {needed.value} permission")


class ServiceInterceptor(aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, metrics: Metrics, authenticator: Authenticator, observer: CallObserver | None = None) -> None:
        self._metrics = metrics
        self._auth = authenticator
        self._observer = observer if observer is not None and observer.active else None
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, _, name = method.lstrip("/").rpartition("/")
        call = _Call(self._metrics, self._auth, service, name, handler, observer=self._observer)
        factory, behavior = _HANDLER_KINDS[(handler.request_streaming, handler.response_streaming)]
        original = getattr(handler, behavior)
        # Streaming handlers come in two shapes: async generators that yield responses, and coroutines that
        # call context.write (grpc's own health servicer). Each needs a wrapper of the same shape.
        wrapped = call.wrap_stream(original) if inspect.isasyncgenfunction(original) else call.wrap_unary(original)
        result = factory(
            wrapped,
            request_deserializer=_tolerant(handler.request_deserializer),
            response_serializer=handler.response_serializer,
        )
        # Handlers are fixed per method once the server starts, so each is wrapped once, not on every call.
        self._wrapped[method] = result
        return result


def rpc_kind(request_streaming: bool, response_streaming: bool) -> str:
    """The ``grpc_type`` label of a method, by which sides stream."""
    return {
        (False, False): "unary",
        (False, True): "server_stream",
        (True, False): "client_stream",
        (True, True): "bidi_stream",
    }[(request_streaming, response_streaming)]


def method_labels(services: Iterable[ServiceDescriptor]) -> list[tuple[str, str, str]]:
    """The call metrics' labels of every method of ``services``, as the interceptor labels their calls."""
    return [
        (rpc_kind(m.client_streaming, m.server_streaming), service.full_name, m.name)
        for service in services
        for m in service.methods
    ]


_HANDLER_KINDS: dict[tuple[bool, bool], tuple[Callable[..., grpc.RpcMethodHandler], str]] = {
    (False, False): (grpc.unary_unary_rpc_method_handler, "unary_unary"),
    (False, True): (grpc.unary_stream_rpc_method_handler, "unary_stream"),
    (True, False): (grpc.stream_unary_rpc_method_handler, "stream_unary"),
    (True, True): (grpc.stream_stream_rpc_method_handler, "stream_stream"),
}


class _Undecodable:
    """Stands in for a request that would not parse, so the call can end with INVALID_ARGUMENT.

    A deserializer that raises makes grpc answer UNKNOWN, which a client cannot act on.
    """

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserialize is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserialize(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    return parse


def _checked(request: Any) -> Any:
    if isinstance(request, _Undecodable):
        raise errors.InvalidArgument("", f"the request is not a valid message: {request.reason}")
    return request


async def _checked_stream(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        yield _checked(request)


class _Call:
    """Everything the wrapper needs to know about one method."""

    def __init__(
        self,
        metrics: Metrics,
        auth: Authenticator,
        service: str,
        method: str,
        handler: grpc.RpcMethodHandler,
        *,
        observer: CallObserver | None = None,
    ) -> None:
        self.labels = (rpc_kind(handler.request_streaming, handler.response_streaming), service, method)
        self.metrics = metrics
        self._check: Callable[[Any], Any] = _checked_stream if handler.request_streaming else _checked
        self._started = metrics.grpc_started.labels(*self.labels)
        self._latency = metrics.grpc_latency.labels(*self.labels)
        self._handled: dict[grpc.StatusCode, Any] = {}
        """The ``grpc_handled`` child of each status code this method has ended with (looked up once, not per call)."""
        self.auth = auth if service not in OPEN_SERVICES else None
        self.observer = observer
        self.name = f"/{service}/{method}"

    async def _authenticate(self, context: aio.ServicerContext) -> None:
        """Resolve the call's access once; everything the call does from here on runs with it."""
        if self.auth is None:
            return
        access = await self.auth.access(context.invocation_metadata())
        tenancy.CURRENT.set(access)
        current_principal.set(access.principal)
        self.auth.admit(access, self.labels[1], self.labels[2])

    def _finish(self, started: float, code: grpc.StatusCode, watch: Any, exc: BaseException | None) -> None:
        seconds = time.perf_counter() - started
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self.metrics.grpc_handled.labels(*self.labels, code.name)
        handled.inc()
        self._latency.observe(seconds)
        principal = tenancy.CURRENT.get().principal
        if principal is not None:
            self.metrics.token_calls.labels(principal, code.name).inc()
            if isinstance(exc, errors.QuotaExceeded):
                self.metrics.token_quota_refusals.labels(principal, exc.quota).inc()
        if watch is not None:
            watch.end(code, seconds, current_principal.get())

    def wrap_unary(self, behavior: Callable[[Any, aio.ServicerContext], Awaitable[Any]]) -> Any:
        async def unary(request: Any, context: aio.ServicerContext) -> Any:
            self._started.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            watch = None if self.observer is None else self.observer.begin(self.name, context)
            failure: BaseException | None = None
            try:
                await self._authenticate(context)
                return await behavior(self._check(request), context)
            except BaseException as exc:
                failure = exc
                code = _status_of(exc, context)
                await _abort_unless_final(exc, code, context)
                raise
            finally:
                self._finish(started, code, watch, failure)

        return unary

    def wrap_stream(self, behavior: Callable[[Any, aio.ServicerContext], AsyncIterator[Any]]) -> Any:
        async def stream(request: Any, context: aio.ServicerContext) -> AsyncIterator[Any]:
            self._started.inc()
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            watch = None if self.observer is None else self.observer.begin(self.name, context)
            failure: BaseException | None = None
            try:
                await self._authenticate(context)
                async for response in behavior(self._check(request), context):
                    yield response
            except BaseException as exc:
                failure = exc
                code = _status_of(exc, context)
                await _abort_unless_final(exc, code, context)
                raise
            finally:
                self._finish(started, code, watch, failure)

        return stream


def _status_of(exc: BaseException, context: aio.ServicerContext) -> grpc.StatusCode:
    """The status this exception ends the call with."""
    if isinstance(exc, aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        # The client cancelled, or its deadline passed; grpc reports the status itself.
        remaining = context.time_remaining()
        expired = remaining is not None and remaining <= 0
        return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED
    if isinstance(exc, errors.MemoryServiceError):
        return status_for(exc)
    if isinstance(exc, NotImplementedError):
        return grpc.StatusCode.UNIMPLEMENTED
    return grpc.StatusCode.INTERNAL


async def _abort_unless_final(exc: BaseException, code: grpc.StatusCode, context: aio.ServicerContext) -> None:
    """End the call with ``code`` and a message a client can read; never a traceback, never UNKNOWN.

    Aborts and cancellations already carry their status and pass through unchanged.
    """
    if isinstance(exc, aio.AbortError | asyncio.CancelledError | GeneratorExit):
        return
    if isinstance(exc, errors.InvalidArgument) and exc.field:
        message = str(exc)
        await context.abort(code, message, trailing_metadata=details.bad_request(exc, message))
    if isinstance(exc, errors.QuotaExceeded):
        message = str(exc)
        await context.abort(code, message, trailing_metadata=details.quota_failure(exc, message))
    if isinstance(exc, errors.MemoryServiceError) and code is not grpc.StatusCode.INTERNAL:
        message = str(exc)
    elif isinstance(exc, NotImplementedError):
        message = "this method is not implemented yet"
    else:
        reference = uuid.uuid4().hex[:12]
        principal = tenancy.CURRENT.get().principal or "-"  # a token's name, never its secret
        log.error("internal error (ref %s, principal %s)", reference, principal, exc_info=exc)
        message = f"internal error; the server log has the details (ref {reference})"
    await context.abort(code, message)
