"""SERVER_PROCESSES: several server processes on one port, so every core serves calls.

One Python process runs its event loop on one core, and grpc.aio, protobuf and the driver all run there. So
``serve`` starts ``SERVER_PROCESSES`` workers (default: the cores), each a complete server with its own event loop
and its own pool (``DATABASE_POOL_*`` per worker), sharing nothing but PostgreSQL; they listen on the same port
with SO_REUSEPORT and the kernel spreads new connections over them. The parent only supervises:

* **port**: it reserves ``GRPC_PORT`` (or, for 0, a free port) with a socket of its own bound with SO_REUSEPORT, so
  every worker binds the same port and a log line names it;
* **embedded PostgreSQL**: it starts it before the workers and stops it after the last one (they share it);
* **start-up**: the first worker starts alone and says when it serves (a byte on a pipe); only then do the others
  start, so migrations run once and a start-up failure is one line, the first worker's, with its exit code;
* **metrics**: each worker serves its own ``/metrics`` on ``METRICS_PORT + i`` (worker i from 0; 0 picks a free
  port each). Their counters are separate, so Prometheus scrapes every worker and sums them;
* **background work** (index care, purge, text statistics, history retention) runs in every worker, as in several
  instances: advisory locks let one do each job at a time. Each worker calibrates on the searches it served;
* **signals**: SIGTERM or SIGINT is forwarded to every worker, which drains as a single server does; the parent
  exits when all have, 0 if every one did. A worker that dies on its own takes the others down (exit 1), so the
  orchestrator restarts the whole; a parent that dies closes the workers' stdin, and they shut down.

Settings reach a worker pickled on its stdin, so command-line flags count as they do for a single process.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Coroutine
from types import FrameType
from typing import Any

from memory_service.app.ports import reserve_port
from memory_service.config.settings import Settings
from memory_service.errors import StartupError, one_line
from memory_service.observability import logs
from memory_service.storage.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)

_LENGTH = struct.Struct(">I")
_STOP_TIMEOUT_EXTRA = 15.0
"""Seconds past SHUTDOWN_GRACE a worker gets to exit after SIGTERM before it is killed."""


def serve(settings: Settings) -> int:
    """Serve until SIGTERM or SIGINT: in this process when SERVER_PROCESSES is 1, else through workers."""
    from memory_service.app.server import serve as serve_here

    if settings.server_processes <= 1:
        return run_loop(serve_here(settings))
    return _Supervisor(settings).run()


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """``asyncio.run`` on uvloop where it is installed (Linux and macOS): the loop that grpc.aio's completion
    events and every asyncpg round trip go through, a large share of each call's cost (bench.overhead)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


class _Supervisor:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def run(self) -> int:
        settings = self.settings
        embedded = EmbeddedPostgres(settings.data_dir) if settings.embedded_database else None
        if embedded is not None:
            embedded.start()
        holder = None
        previous = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            holder = reserve_port(settings.grpc_host, settings.grpc_port)
            port = int(holder.getsockname()[1])
            log.info("starting %d server processes on port %d", settings.server_processes, port)
            # The first worker starts alone (migrations, the start-up checks), so a start-up failure is reported
            # once, by it, and the others find the schema ready.
            ready, told = os.pipe()
            try:
                self.workers.append(self._spawn(0, port, ready_fd=told))
            finally:
                os.close(told)
            if not self._started(ready) and not self.stopping:
                code = self.workers[0].wait()
                return code if code else 1
            for index in range(1, settings.server_processes):
                self.workers.append(self._spawn(index, port))
            return self._supervise()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self._stop_all()
            if holder is not None:
                holder.close()
            if embedded is not None:
                embedded.stop()

    def _spawn(self, index: int, port: int, *, ready_fd: int | None = None) -> subprocess.Popen[bytes]:
        """Start worker ``index``; it writes one byte to ``ready_fd`` once it serves (the pipe ends if it fails)."""
        metrics_port = self.settings.metrics_port
        if metrics_port:
            metrics_port += index
        worker_settings = dataclasses.replace(
            self.settings, grpc_port=port, metrics_port=metrics_port, server_processes=1
        )
        process = subprocess.Popen(
            [sys.executable, "-c", "from memory_service.app.processes import worker; worker()"],
            stdin=subprocess.PIPE,
            pass_fds=() if ready_fd is None else (ready_fd,),
            # A terminal's Ctrl-C reaches the parent only; it forwards SIGTERM, so each worker drains once.
            start_new_session=True,
        )
        assert process.stdin is not None
        payload = pickle.dumps((worker_settings, index, ready_fd))
        process.stdin.write(_LENGTH.pack(len(payload)) + payload)
        process.stdin.flush()  # stdin stays open: its end tells the worker that the parent is gone
        return process

    def _started(self, ready: int) -> bool:
        """Wait until a worker serves (True), or exits or a signal asks to stop first (False)."""
        try:
            while not self.stopping:
                readable, _, _ = select.select([ready], [], [], 0.1)
                if readable:
                    return os.read(ready, 1) == b"1"
            return False
        finally:
            os.close(ready)

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        if not self.stopping:
            log.info("shutdown requested: stopping %d server processes", len(self.workers))
        self.stopping = True
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def _supervise(self) -> int:
        while True:
            codes = [p.poll() for p in self.workers]
            if self.stopping:
                if all(code is not None for code in codes):
                    # A worker still starting when SIGTERM came had no handler yet and ended by the signal: asked
                    # to stop, it stopped.
                    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1
            elif any(code is not None for code in codes):
                failed = next(i for i, code in enumerate(codes) if code is not None)
                log.error("server process %d exited (code %s): stopping the others", failed, codes[failed])
                return 2 if codes[failed] == 2 else 1
            time.sleep(0.1)

    def _stop_all(self) -> None:
        for process in self.workers:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.settings.shutdown_grace + _STOP_TIMEOUT_EXTRA
        for process in self.workers:
            try:
                process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("server process %d did not stop in time: killing it", process.pid)
                process.kill()
                process.wait()
            if process.stdin is not None:
                process.stdin.close()


def worker() -> None:
    """A worker's entry point: settings from stdin, then one server on the shared port until SIGTERM or until
    the parent is gone (stdin closes)."""
    from memory_service.app.server import serve as serve_here

    fd = sys.stdin.fileno()
    (size,) = _LENGTH.unpack(_read_exactly(fd, _LENGTH.size))
    settings, index, ready = pickle.loads(_read_exactly(fd, size))
    logs.configure(settings.log_level, settings.log_format)
    log.info("server process %d (pid %d)", index, os.getpid())

    async def serving(server: object) -> None:
        os.write(ready, b"1")
        os.close(ready)

    try:
        code = run_loop(
            serve_here(settings, on_ready=None if ready is None else serving, reuse_port=True, parent_gone=fd)
        )
    except StartupError as exc:
        print(f"memory-service: error: {one_line(str(exc))}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def _read_exactly(fd: int, size: int) -> bytes:
    """``size`` bytes from the pipe, which stays open after them (so no read to the end)."""
    data = bytearray()
    while len(data) < size:
        chunk = os.read(fd, size - len(data))
        if not chunk:
            raise SystemExit("memory-service: error: the parent process went away before sending the settings")
        data.extend(chunk)
    return bytes(data)
