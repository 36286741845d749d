"""The server's contract surface: health, reflection, metrics, status codes for unknown methods."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memory_service.v1 import lease_pb2, memory_pb2
from tests.conftest import RunningServer, code_of


async def test_health_is_serving_for_every_service(server: RunningServer) -> None:
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in ("", "memory_service.v1.MemoryService", "memory_service.v1.LeaseService"):
        response = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert response.status == health_pb2.HealthCheckResponse.SERVING


async def test_reflection_lists_both_services(server: RunningServer) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    call = stub.ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {
        "memory_service.v1.MemoryService",
        "memory_service.v1.LeaseService",
        "grpc.health.v1.Health",
    } <= names


async def test_metrics_count_calls_by_method_and_code(server: RunningServer) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        await server.memory.Get(memory_pb2.GetRequest(id=123456789))
    assert code_of(caught.value) == grpc.StatusCode.NOT_FOUND

    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    assert 'grpc_server_started_total{grpc_method="Get",grpc_service="memory_service.v1.MemoryService"' in body
    handled = [
        line
        for line in body.splitlines()
        if line.startswith("grpc_server_handled_total") and 'grpc_method="Get"' in line
    ]
    not_found = [line for line in handled if 'grpc_code="NOT_FOUND"' in line]
    assert len(not_found) == 1 and not_found[0].endswith(" 1.0"), handled
    assert "grpc_server_handling_seconds_bucket" in body
    assert "memory_db_pool_connections" in body


async def test_every_method_has_its_call_series_before_its_first_call(server: RunningServer) -> None:
    """operations.md: label values known in advance are exported at zero from the start. The call series of a
    method appeared only with its first call, so an idle instance's call panels and rules read "no data"."""
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    for service in (
        memory_pb2.DESCRIPTOR.services_by_name["MemoryService"],
        lease_pb2.DESCRIPTOR.services_by_name["LeaseService"],
    ):
        for method in service.methods:
            labels = f'grpc_method="{method.name}",grpc_service="{service.full_name}"'
            for series in (
                f"grpc_server_started_total{{{labels}",
                f'grpc_server_handled_total{{grpc_code="OK",{labels}',
                f"grpc_server_handling_seconds_count{{{labels}",
            ):
                assert series in body, series


async def test_metrics_cover_search_and_embeddings(server: RunningServer) -> None:
    request = memory_pb2.StoreRequest(memory=memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value="metrics"))
    await server.memory.Store(request)
    await server.memory.Store(request)
    await server.memory.Search(memory_pb2.SearchRequest(query="metrics"))
    await server.memory.Embed(memory_pb2.EmbedRequest(texts=["metrics"]))
    registry = server.server.metrics.registry
    assert registry.get_sample_value("memory_search_seconds_count", {"mode": "hybrid", "plan": "exact"}) == 1
    assert registry.get_sample_value("memory_searches_total", {"mode": "hybrid", "plan": "exact"}) == 1
    assert registry.get_sample_value("memory_search_short_results_total", {"mode": "hybrid"}) == 0
    assert registry.get_sample_value("memory_embedding_texts_total", {"provider": "hash"}) == 2  # value and query
    assert registry.get_sample_value("memory_embedding_cache_hits_total") == 1  # Embed of a stored text
    handled = {"grpc_type": "unary", "grpc_service": "memory_service.v1.MemoryService", "grpc_method": "Store"}
    assert registry.get_sample_value("grpc_server_handled_total", {**handled, "grpc_code": "OK"}) == 2
