"""The Python client: ``MemoryClient`` over the generated stubs, with deadlines and retries of UNAVAILABLE.

``memory_client`` holds the client itself, ``wire`` the enum names and message builders, ``channel`` the channel
options, ``bulk`` the resumable BulkStore engine, ``hold`` the Hold stream as an ``async with`` block and
``history`` the calls for history and changes.
"""

from memory_service.client.bulk import BulkSummary
from memory_service.client.channel import DEFAULT_ADDRESS, open_channel
from memory_service.client.hold import HeldLease, NotAcquired
from memory_service.client.memory_client import MemoryClient
from memory_service.client.wire import (
    MEMORY_TYPES,
    SCOPES,
    SEARCH_MODES,
    memory_input,
    memory_type_value,
    mode_value,
    scope_filter,
    scope_value,
)

__all__ = [
    "DEFAULT_ADDRESS",
    "MEMORY_TYPES",
    "SCOPES",
    "SEARCH_MODES",
    "BulkSummary",
    "HeldLease",
    "MemoryClient",
    "NotAcquired",
    "memory_input",
    "memory_type_value",
    "mode_value",
    "open_channel",
    "scope_filter",
    "scope_value",
]
