"""A small local HTTP server that speaks the OpenAI embeddings API, for testing the real `openai` client.

It answers ``POST /v1/embeddings`` with deterministic vectors (seeded by each text's hash), records every request,
and can be told to fail the next requests with given status codes (429, 500, ...).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np


def fake_vector(text: str, dimension: int) -> np.ndarray:
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    vector = np.random.default_rng(seed).normal(size=dimension).astype(np.float32)
    return vector / np.linalg.norm(vector)


class FakeOpenAI:
    def __init__(self, *, dimension: int = 384) -> None:
        self.dimension = dimension
        self.requests: list[dict[str, Any]] = []
        self.failures: deque[int] = deque()
        self.zero_for: set[str] = set()
        """Texts answered with a zero vector, as a misbehaving server might."""
        self.authorization: list[str | None] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:
                return

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake._lock:
                    fake.requests.append(body)
                    fake.authorization.append(self.headers.get("Authorization"))
                    status = fake.failures.popleft() if fake.failures else 200
                if self.path.rstrip("/") != "/v1/embeddings":
                    self._reply(404, {"error": {"message": "not found", "type": "invalid_request_error"}})
                elif status != 200:
                    self._reply(status, {"error": {"message": f"injected {status}", "type": "server_error"}})
                else:
                    self._reply(200, fake.respond(body))

            def _reply(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def respond(self, body: dict[str, Any]) -> dict[str, Any]:
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimension = body.get("dimensions") or self.dimension
        data = []
        for index, text in enumerate(texts):
            vector = np.zeros(dimension, np.float32) if text in self.zero_for else fake_vector(text, dimension)
            if body.get("encoding_format") == "base64":
                embedding: Any = base64.b64encode(vector.astype("<f4").tobytes()).decode()
            else:
                embedding = vector.tolist()
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(t.split()) for t in texts)
        return {
            "object": "list",
            "data": data,
            "model": body["model"],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def fail_next(self, *statuses: int) -> None:
        with self._lock:
            self.failures.extend(statuses)

    def texts_embedded(self) -> int:
        return sum(len(r["input"]) for r in self.requests)

    def __enter__(self) -> FakeOpenAI:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
