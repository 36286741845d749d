"""The bare floor's leases: Acquire and Release as the service's lease SQL and nothing else.

``bench.floor`` serves them beside its memory calls. Each is one call of ``storage.leases_sql`` on a plain asyncpg
pool, over the same protos as the service: no validation, authentication, quota, metrics, logging or interceptor.
What a gRPC service on this machine cannot beat for the same answers; ``bench.leases`` measures the service against
it in the same run.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import asyncpg
from grpc import aio

from memory_service.leases.manager import lock_key, owner_key
from memory_service.storage import leases_sql
from memory_service.v1 import lease_pb2, lease_pb2_grpc


class BareLeases(lease_pb2_grpc.LeaseServiceServicer):
    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool

    async def Acquire(
        self, request: lease_pb2.AcquireRequest, context: aio.ServicerContext
    ) -> lease_pb2.AcquireResponse:
        owner = "bare:" + request.holder
        async with self._pool.acquire() as conn:
            result = await leases_sql.acquire(
                conn,
                namespace=request.namespace,
                name=request.name,
                lock_key=lock_key(request.namespace, request.name),
                owner_key=owner_key(owner),
                lease_id=uuid.uuid4(),
                holder=request.holder,
                owner=owner,
                ttl=timedelta(seconds=request.ttl.seconds),
                quota=1000,
                request_id=None,
            )
        if result.lease is None:
            return lease_pb2.AcquireResponse(acquired=False)
        lease = lease_pb2.Lease(
            namespace=result.lease.namespace,
            name=result.lease.name,
            lease_id=str(result.lease.lease_id),
            holder=result.lease.holder,
            fencing_token=result.lease.fencing_token,
        )
        lease.expires_at.FromDatetime(result.lease.expires_at)
        return lease_pb2.AcquireResponse(acquired=True, lease=lease)

    async def Release(
        self, request: lease_pb2.ReleaseRequest, context: aio.ServicerContext
    ) -> lease_pb2.ReleaseResponse:
        async with self._pool.acquire() as conn:
            released = await leases_sql.release(conn, uuid.UUID(request.lease_id))
        return lease_pb2.ReleaseResponse(released=released is not None)
