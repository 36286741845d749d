"""LeaseService over gRPC: converts messages, calls the lease manager, converts back."""

from __future__ import annotations

from memory_service.runtime import Runtime
from memory_service.v1 import lease_pb2_grpc


class LeaseServicer(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
