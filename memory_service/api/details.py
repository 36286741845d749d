"""Rich error details (``google.rpc.Status`` in the ``grpc-status-details-bin`` trailer) for clients in any language.

The message text names the field too, but only for people; ``google.rpc.BadRequest`` field violations are what
the gRPC ecosystem's clients read (``grpc_status.rpc_status.from_call`` in Python, ``status.FromError`` in Go).
"""

from __future__ import annotations

# Imported as modules, not ``from google.rpc import``: mypy does not resolve the names of that namespace package.
import google.rpc.code_pb2 as code_pb2  # noqa: PLR0402
import google.rpc.error_details_pb2 as error_details_pb2  # noqa: PLR0402
import google.rpc.status_pb2 as status_pb2  # noqa: PLR0402
from google.protobuf import any_pb2
from grpc_status import rpc_status

from memory_service.errors import InvalidArgument, QuotaExceeded

Metadata = tuple[tuple[str, str | bytes], ...]


def bad_request(error: InvalidArgument, message: str) -> Metadata:
    """Trailing metadata carrying a BadRequest with a violation per field the error names; ``message`` must be the
    call's details text."""
    violations = [
        error_details_pb2.BadRequest.FieldViolation(field=field, description=error.message)
        for field in (error.field, *error.also)
    ]
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
    status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message=message, details=[detail])
    metadata: Metadata = rpc_status.to_status(status).trailing_metadata
    return metadata


def quota_failure(error: QuotaExceeded, message: str) -> Metadata:
    """Trailing metadata carrying a QuotaFailure naming the quota; ``message`` must be the call's details text."""
    description = f"{error.quota}: {error.description}"
    violation = error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=description)
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.QuotaFailure(violations=[violation]))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail])
    metadata: Metadata = rpc_status.to_status(status).trailing_metadata
    return metadata
