"""The container files, checked without a Docker engine: the image's HEALTHCHECK asks the configured port."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from tests.conftest import RunningServer

ROOT = Path(__file__).resolve().parents[1]


def healthcheck_command() -> list[str]:
    line = next(line for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("HEALTHCHECK"))
    command = re.sub(r"^HEALTHCHECK( --\S+)* CMD ", "", line)
    argv = shlex.split(command)
    assert argv[0] == "python"
    return [sys.executable, *argv[1:]]


def run_healthcheck(port: int) -> int:
    env = {**os.environ, "GRPC_PORT": str(port)}
    return subprocess.run(healthcheck_command(), env=env, capture_output=True, timeout=30, check=False).returncode


async def test_healthcheck_asks_the_configured_grpc_port(server: RunningServer) -> None:
    assert await asyncio.to_thread(run_healthcheck, server.server.port) == 0
    await server.server.health.enter_graceful_shutdown()  # NOT_SERVING is unhealthy
    assert await asyncio.to_thread(run_healthcheck, server.server.port) != 0


def test_compose_publishes_on_loopback_and_requires_a_token() -> None:
    compose = (ROOT / "docker-compose.yml").read_text()
    ports = re.findall(r'^\s*- "([^"]+)"$', compose, flags=re.MULTILINE)
    assert ports and all(p.startswith("127.0.0.1:") for p in ports), ports
    assert "AUTH_TOKENS: ${MEMORY_SERVICE_TOKEN:?" in compose


def test_dockerignore_keeps_the_build_context_small() -> None:
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"  # allow-list: .venv, .git and caches never reach the build
    copied = set(re.findall(r"^COPY (?!--from)(.+) \S+$", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE))
    needed = {name for line in copied for name in line.split()}
    assert needed == {"pyproject.toml", "README.md", "memory_service", "migrations"}
    assert {f"!{name}" if "." in name else f"!{name}/" for name in needed} <= set(rules)
