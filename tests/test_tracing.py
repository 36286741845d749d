"""OpenTelemetry traces, exported over OTLP/HTTP to a real receiver this test starts (it decodes the protobuf the
way a collector does): a Search's span tree, its parent from the caller's traceparent, and no text in any span."""

from __future__ import annotations

import gzip
import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from memory_service.observability import tracing
from memory_service.v1 import memory_pb2
from tests.conftest import start_server, stop_server, test_env

MEMORY_TEXT = "pelican-memory-text-for-tracing"
QUERY_TEXT = "pelican tracing question"
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_SPAN = "b7ad6b7169203331"
TOKEN = "tracing-token-abcdefghijklmnopq"


class _Receiver(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.spans: list[Any] = []
        self.paths: list[str] = []
        self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        request = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        with self.server.lock:
            self.server.paths.append(self.path)
            for resource_spans in request.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    self.server.spans.extend(scope_spans.spans)
        reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _attributes(span: Any) -> dict[str, Any]:
    values = {}
    for attribute in span.attributes:
        value = attribute.value
        values[attribute.key] = getattr(value, value.WhichOneof("value"))
    return values


async def test_a_search_is_one_span_with_embedding_sql_and_fusion_children(
    receiver: _Receiver, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_SERVICE_NAME", "memory-service-under-test")
    env = test_env(
        database_url, OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{receiver.server_port}", AUTH_TOKENS=TOKEN
    )
    running = await start_server(env)
    auth = ("authorization", f"Bearer {TOKEN}")
    try:
        memory = memory_pb2.MemoryInput(scope=memory_pb2.SCOPE_GLOBAL, value=MEMORY_TEXT)
        await running.memory.Store(memory_pb2.StoreRequest(memory=memory), metadata=(auth,))
        traceparent = f"00-{TRACE_ID}-{PARENT_SPAN}-01"
        await running.memory.Search(
            memory_pb2.SearchRequest(query=QUERY_TEXT, top_k=5), metadata=(auth, ("traceparent", traceparent))
        )
    finally:
        await stop_server(running)  # flushes the batch of spans
    assert tracing._tracer is None  # tracing is off again once the server stopped
    assert receiver.paths and all(path == "/v1/traces" for path in receiver.paths)

    spans = receiver.spans
    searches = [s for s in spans if s.name == "memory_service.v1.MemoryService/Search"]
    assert len(searches) == 1
    search = searches[0]
    assert search.trace_id.hex() == TRACE_ID and search.parent_span_id.hex() == PARENT_SPAN
    assert search.kind == search.SPAN_KIND_SERVER
    attributes = _attributes(search)
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.method"] == "Search"
    assert attributes["rpc.grpc.status_code"] == 0
    assert attributes["memory.search.plan"] == "exact" and attributes["memory.search.candidates"] >= 1
    assert attributes["memory.principal"].startswith("token:")

    children = [s for s in spans if s.parent_span_id == search.span_id]
    names = [s.name for s in children]
    assert "embedding" in names and "fusion" in names
    sql = [s for s in children if s.name.startswith("SQL ")]
    assert sql, names
    assert all(s.trace_id == search.trace_id for s in children)
    assert all(search.start_time_unix_nano <= s.start_time_unix_nano for s in children)
    assert all(_attributes(s)["db.system"] == "postgresql" for s in sql)
    embedding = next(s for s in children if s.name == "embedding")
    assert _attributes(embedding) == {"provider": "hash", "texts": 1}

    stores = [s for s in spans if s.name == "memory_service.v1.MemoryService/Store"]
    assert len(stores) == 1 and stores[0].trace_id != search.trace_id  # no traceparent: a trace of its own
    assert any(s.parent_span_id == stores[0].span_id and s.name.startswith("SQL ") for s in spans)

    for span in spans:
        for value in _attributes(span).values():
            text = str(value)
            assert MEMORY_TEXT not in text and QUERY_TEXT not in text and TOKEN not in text, span.name


async def test_tracing_is_off_without_an_endpoint(database_url: str) -> None:
    running = await start_server(test_env(database_url))
    try:
        assert running.server.tracing is None and tracing._tracer is None
        assert tracing.span("anything") is tracing.span("else")  # one shared no-op
    finally:
        await stop_server(running)


def test_opentelemetry_is_imported_only_when_tracing_is_on() -> None:
    code = "import sys, memory_service.app.server, memory_service.cli.main; sys.exit('opentelemetry' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
