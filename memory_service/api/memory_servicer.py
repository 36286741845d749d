"""MemoryService over gRPC: converts messages, calls the domain, converts back."""

from __future__ import annotations

from memory_service.runtime import Runtime
from memory_service.v1 import memory_pb2_grpc


class MemoryServicer(memory_pb2_grpc.MemoryServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
