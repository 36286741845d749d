"""The project's one error tree.

Domain and storage code raise these. Two tables translate at the boundaries, one each: driver exceptions to these
classes (``memory_service.storage.database.DRIVER_ERRORS``), and these classes to gRPC status codes
(``memory_service.api.status``). Start-up code turns ``StartupError`` into a one-line message and exit code.

    MemoryServiceError
    ├── InvalidArgument          bad input; names the field              -> INVALID_ARGUMENT
    ├── NotFound                                                         -> NOT_FOUND
    ├── FailedPrecondition       e.g. wrong embedding dimension           -> FAILED_PRECONDITION
    ├── Aborted                  re-read and retry                        -> ABORTED
    │   ├── LeaseLost            renew of an expired or superseded lease
    │   ├── FenceRejected        a write whose lease has a newer holder
    │   ├── DatabaseConflict     serialization failure or deadlock
    │   └── GenerationChanged    the embedding model changed under a statement
    ├── ResourceExhausted        quotas, overload, oversize               -> RESOURCE_EXHAUSTED
    │   ├── DatabaseResourcesExhausted  disk full, out of memory: writes refused
    │   └── QuotaExceeded        a token's quota; names it                  (+ google.rpc.QuotaFailure)
    ├── Unauthenticated          no valid bearer token                    -> UNAUTHENTICATED
    ├── PermissionDenied         outside the token's grants; names field  -> PERMISSION_DENIED
    ├── Unavailable              retryable: database or provider down     -> UNAVAILABLE
    │   ├── DatabaseUnavailable
    │   ├── DatabaseReadOnly     the database accepts no writes (read-only, standby)
    │   └── EmbeddingUnavailable
    ├── DeadlineExceeded         the call's deadline cancelled the work   -> DEADLINE_EXCEEDED
    ├── Internal                 a bug: a dependency was misused; logged  -> INTERNAL
    └── StartupError             the service cannot start; printed as one line
        ├── ConfigError          a bad environment value or flag
        ├── MigrationError       an applied migration changed, or a migration failed
        └── EmbeddingConfigMismatch  the database stores another model or dimension
"""

from __future__ import annotations


def one_line(text: str) -> str:
    """``text`` with every run of whitespace, line breaks included, as one space: how an error reaches an operator's
    terminal or log line, whatever a dependency's message quoted in it holds."""
    return " ".join(text.split())


class MemoryServiceError(Exception):
    """Root of every error the service raises on purpose."""


class InvalidArgument(MemoryServiceError):
    """The request is malformed; ``field`` is the path of the offending field in the request message ("" when the
    request as a whole is at fault, such as bytes that do not parse). ``also``: more fields the same fault is about,
    such as the other members of a choice none of which is set (BadRequest names each; a oneof's own name is not a
    path a client can look up)."""

    def __init__(self, field: str, message: str, *, also: tuple[str, ...] = ()) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        self.also = also


class NotFound(MemoryServiceError):
    """What the request names does not exist (or is not live)."""


class FailedPrecondition(MemoryServiceError):
    """The system is not in a state where the request can run, e.g. bound to another embedding model."""


class Aborted(MemoryServiceError):
    """The operation lost a race; the caller may re-read and retry."""


class LeaseLost(Aborted):
    """The lease expired or passed to a newer holder; the caller must stop and re-acquire."""


class FenceRejected(Aborted):
    """A write named a lease token that a newer grant has superseded."""


class DatabaseConflict(Aborted):
    """PostgreSQL rolled the transaction back (serialization failure or deadlock); nothing of it was written."""


class GenerationChanged(Aborted):
    """A statement named an embedding generation that a cut-over, rollback or finish has replaced; nothing of it
    was written. The service re-reads the generation and runs it again; a client that sees it may retry."""


class ResourceExhausted(MemoryServiceError):
    """A quota, a size limit or the server's capacity was reached."""


class DatabaseResourcesExhausted(ResourceExhausted):
    """PostgreSQL refused the work for want of disk, memory or another resource (SQLSTATE class 53); nothing of it
    was written. Retrying at once does not help: an operator must free the resource."""


class QuotaExceeded(ResourceExhausted):
    """A token's quota refused the call; ``subject`` and ``description`` fill ``google.rpc.QuotaFailure``."""

    def __init__(self, *, subject: str, quota: str, description: str) -> None:
        super().__init__(f"quota exceeded for {subject}: {quota}: {description}")
        self.subject = subject
        self.quota = quota
        """``rate`` or ``max_memories``."""
        self.description = description


class PermissionDenied(MemoryServiceError):
    """The caller's token does not grant this; ``field`` names the request field when one is to blame."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message


class Unauthenticated(MemoryServiceError):
    """The call carries no bearer token that the server accepts."""

    def __init__(self, message: str = "a valid bearer token is required in the authorization metadata") -> None:
        super().__init__(message)


class Unavailable(MemoryServiceError):
    """Retryable: a dependency could not be reached or answered ambiguously."""


class DatabaseUnavailable(Unavailable):
    """PostgreSQL could not be reached, dropped the connection, or did not answer in time."""


class DatabaseReadOnly(Unavailable):
    """PostgreSQL refused a write because the transaction is read-only (SQLSTATE 25006: default_transaction_read_only,
    a standby); nothing was written, and the write can be retried once the database accepts writes again."""


WRITES_REFUSED = (DatabaseReadOnly, DatabaseResourcesExhausted)
"""The errors of a database that is up but refuses writes: logged once per episode, not once per call."""


class EmbeddingUnavailable(Unavailable):
    """The embedding provider could not be reached or failed transiently."""


class DeadlineExceeded(MemoryServiceError):
    """The call's deadline (or a statement timeout) passed and the work was cancelled."""


class Internal(MemoryServiceError):
    """A bug in the service, such as a driver misused; answered as INTERNAL and logged with a reference."""


class StartupError(MemoryServiceError):
    """The service cannot start; ``str(error)`` is the one line an operator sees."""


class ConfigError(StartupError):
    """An environment variable or flag has a value the service cannot use."""


class MigrationError(StartupError):
    """A migration failed, or an applied migration's file has changed since."""


class EmbeddingConfigMismatch(StartupError):
    """The database is bound to another embedding model or dimension than the one configured."""
