"""LOG_FORMAT=json (one object per line, an access line per call) and SLOW_CALL_SECONDS (slow calls with their
plan), from a real server process; neither ever writes a memory's text, a query's text or a token."""

from __future__ import annotations

import json
import logging

import grpc
import pytest

from memory_service.v1 import memory_pb2, memory_pb2_grpc
from tests.conftest import start_server, stop_server, test_env
from tests.processes import ServerProcess

TOKEN = "call-log-token-abcdefghijklmnop"
MEMORY_TEXT = "zebra-memory-text-that-must-not-be-logged"
QUERY_TEXT = "okapi-query-text-that-must-not-be-logged"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_json_log_has_an_access_line_per_call_and_slow_calls_with_their_plan(database_url: str) -> None:
    env = test_env(database_url, LOG_FORMAT="json", SLOW_CALL_SECONDS="0", AUTH_TOKENS=TOKEN)
    server = ServerProcess(env)
    try:
        server.wait_serving()
        auth = (("authorization", f"Bearer {TOKEN}"),)
        with grpc.insecure_channel(server.address) as channel:
            stub = memory_pb2_grpc.MemoryServiceStub(channel)
            memory = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_AGENT, scope_id=7, value=MEMORY_TEXT)
            stub.Store(memory_pb2.StoreRequest(memory=memory), metadata=(*auth, ("x-request-id", "req-store-1")))
            stub.Search(
                memory_pb2.SearchRequest(query=QUERY_TEXT, top_k=3),
                metadata=(*auth, ("x-request-id", "req-search-1"), ("traceparent", TRACEPARENT)),
            )
            with pytest.raises(grpc.RpcError):
                stub.Get(memory_pb2.GetRequest(id=987654321), metadata=auth)
            with pytest.raises(grpc.RpcError):
                stub.Get(memory_pb2.GetRequest(id=1))  # no token
    finally:
        server.stop()
    lines = [line for line in server.log if line.strip()]
    entries = [json.loads(line) for line in lines]  # every line is one JSON object
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys()
        assert entry["time"].endswith("Z")
    text = "\n".join(lines)
    assert MEMORY_TEXT not in text and QUERY_TEXT not in text and TOKEN not in text

    access = [e for e in entries if e["logger"] == "memory_service.access"]
    by_method = {e["method"].rsplit("/", 1)[1]: e for e in access if e["method"].startswith("/memory_service")}
    store, search = by_method["Store"], by_method["Search"]
    assert store["request_id"] == "req-store-1" and store["code"] == "OK" and store["level"] == "INFO"
    assert store["principal"].startswith("token:") and isinstance(store["duration"], float)
    assert search["request_id"] == "req-search-1" and search["trace_id"] == TRACE_ID
    gets = [e for e in access if e["method"].endswith("/Get")]
    assert sorted(e["code"] for e in gets) == ["NOT_FOUND", "UNAUTHENTICATED"]
    assert all(e["request_id"] for e in gets)  # made up by the server when the caller sent none
    assert next(e for e in gets if e["code"] == "UNAUTHENTICATED")["principal"] is None

    slow = [e for e in entries if e["logger"] == "memory_service.slow"]
    slow_search = next(e for e in slow if e["method"].endswith("/Search"))
    assert slow_search["level"] == "WARNING" and slow_search["request_id"] == "req-search-1"
    plan = slow_search["plan"]
    assert plan["mode"] == "hybrid" and plan["plan"] == "exact" and plan["exact"] is True
    assert plan["candidates"] >= 1 and plan["hits"] >= 1 and plan["top_k"] == 3 and "probes" in plan


async def test_text_logs_have_no_access_lines_and_only_slower_calls_are_slow(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_server(test_env(database_url, SLOW_CALL_SECONDS="3600"))
    try:
        with caplog.at_level(logging.INFO):
            await running.memory.Search(memory_pb2.SearchRequest(query=QUERY_TEXT))
    finally:
        await stop_server(running)
    names = {record.name for record in caplog.records}
    assert "memory_service.access" not in names and "memory_service.slow" not in names

    running = await start_server(test_env(database_url, SLOW_CALL_SECONDS="0"))
    try:
        with caplog.at_level(logging.INFO):
            await running.memory.Search(memory_pb2.SearchRequest(query=QUERY_TEXT, mode=memory_pb2.SEARCH_MODE_TEXT))
    finally:
        await stop_server(running)
    slow = [r for r in caplog.records if r.name == "memory_service.slow"]
    assert len(slow) == 1
    message = slow[0].getMessage()
    assert "/memory_service.v1.MemoryService/Search" in message and "plan=text" in message
    assert "candidates=" in message and QUERY_TEXT not in message
