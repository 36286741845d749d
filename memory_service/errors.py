"""The project's one error tree.

Domain and storage code raise these; the gRPC layer maps each class to a status code in one table
(``memory_service.api.status``), and start-up code turns ``StartupError`` into a one-line message and exit code.

    MemoryServiceError
    ├── InvalidArgument          bad input; names the field         -> INVALID_ARGUMENT
    ├── NotFound                                                    -> NOT_FOUND
    ├── FailedPrecondition       e.g. wrong embedding dimension      -> FAILED_PRECONDITION
    ├── Aborted                                                     -> ABORTED
    │   ├── LeaseLost            renew of an expired or superseded lease
    │   └── FenceRejected        a write whose lease has a newer holder
    ├── ResourceExhausted        quotas, overload, oversize          -> RESOURCE_EXHAUSTED
    ├── Unavailable              retryable: database or provider down -> UNAVAILABLE
    │   ├── DatabaseUnavailable
    │   └── EmbeddingUnavailable
    ├── DeadlineExceeded         the call's deadline cancelled the work -> DEADLINE_EXCEEDED
    └── StartupError             the service cannot start; printed as one line
        ├── ConfigError          a bad environment value or flag
        ├── MigrationError       an applied migration changed, or a migration failed
        └── EmbeddingConfigMismatch  the database stores another model or dimension
"""

from __future__ import annotations


class MemoryServiceError(Exception):
    """Root of every error the service raises on purpose."""


class InvalidArgument(MemoryServiceError):
    """The request is malformed; ``field`` names the offending field in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NotFound(MemoryServiceError):
    pass


class FailedPrecondition(MemoryServiceError):
    pass


class Aborted(MemoryServiceError):
    pass


class LeaseLost(Aborted):
    """The lease expired or passed to a newer holder; the caller must stop and re-acquire."""


class FenceRejected(Aborted):
    """A write named a lease token that a newer grant has superseded."""


class ResourceExhausted(MemoryServiceError):
    pass


class Unavailable(MemoryServiceError):
    """Retryable: a dependency could not be reached or answered ambiguously."""


class DatabaseUnavailable(Unavailable):
    pass


class EmbeddingUnavailable(Unavailable):
    pass


class DeadlineExceeded(MemoryServiceError):
    pass


class StartupError(MemoryServiceError):
    """The service cannot start; ``str(error)`` is the one line an operator sees."""


class ConfigError(StartupError):
    pass


class MigrationError(StartupError):
    pass


class EmbeddingConfigMismatch(StartupError):
    pass
