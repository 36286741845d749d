"""``memory-service ingest FILE.jsonl``: load memories through BulkStore, resuming on its own after failures.

One JSON object per line (blank lines are skipped)::

    {"scope": "agent", "scope_id": 1, "key": "...", "value": "...", "memory_type": "fact", "importance": 0.5,
     "tags": ["..."], "metadata": {...}, "embedding": [...], "agent_id": 7, "ttl_seconds": 60}

``scope`` and ``value`` are required; ``expires_at`` (RFC 3339) may replace ``ttl_seconds``; without ``embedding``
the server embeds the value. Each line's sequence number is its line number, so every rejection names a line.

The file is streamed, never read whole: only lines sent but not yet acknowledged are kept, and reading pauses while
``--window`` of them are in flight. When the stream breaks (UNAVAILABLE, a server restart, a dropped connection, a
batch the server cancelled at its statement_timeout: DEADLINE_EXCEEDED or CANCELLED) the client reconnects with
backoff and resends what follows the last acknowledged line; the server's upsert by identity makes the resent
lines that had in fact committed a no-op. Under ``memory-service lease run`` the load is fenced by that lease, so it
stops with ABORTED once another holder takes over.

Exit codes, as every command that talks to a server: 0 every line stored; 1 the server answered no to some of it:
lines rejected (each named on stdout), or the whole load refused (one line on stderr: fence superseded, invalid
request, authentication, permission, a request too large); 2 a bad flag, or the file (or --ca-file) cannot be
read; 69 the server stayed unreachable (or overloaded) for ``--retry-timeout``. Neither 1 is helped by a retry.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import logging
import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import IO, Any

import grpc
from grpc import aio

from memory_service.cli.jsonl import LineError, parse_line
from memory_service.cli.remote import EX_FAILED, EX_UNAVAILABLE, EX_USAGE, add_server_flags
from memory_service.client.bulk import BulkSummary, ResumableBulkStore
from memory_service.config.env import parse_duration
from memory_service.config.settings import Settings
from memory_service.errors import one_line
from memory_service.v1 import memory_pb2, memory_pb2_grpc

log = logging.getLogger(__name__)

EX_REJECTED = EX_FAILED
"""Some lines were rejected (by this client, or by the server): each is named on stdout."""
EX_REFUSED = EX_FAILED
"""The server refused the load as a whole, as every other command's refusal; stderr says why."""


@dataclasses.dataclass
class _Line:
    sequence: int
    item: memory_pb2.BulkItem
    end_offset: int


@dataclasses.dataclass
class _Chunk:
    """What one read from the file produced, up to and including line ``last_line`` (ending at ``end_offset``)."""

    lines: list[_Line]
    errors: list[tuple[int, LineError]]
    read: int
    last_line: int
    end_offset: int


class Progress:
    """A one-line bar on a terminal; otherwise a log line every ``interval`` seconds."""

    def __init__(self, stream: IO[str], total_bytes: int | None, *, enabled: bool, interval: float = 10.0) -> None:
        self._stream = stream
        self._total = total_bytes
        self._tty = enabled and stream.isatty()
        self._enabled = enabled
        self._interval = 0.2 if self._tty else interval
        self._started = time.monotonic()
        self._shown = 0.0

    def show(self, rows: int, offset: int, *, force: bool = False, note: str = "") -> None:
        now = time.monotonic()
        if not self._enabled or (not force and now - self._shown < self._interval):
            return
        self._shown = now
        elapsed = max(now - self._started, 1e-6)
        parts = [f"{rows:,} rows", f"{rows / elapsed:,.0f} rows/s"]
        if self._total:
            fraction = min(offset / self._total, 1.0)
            eta = (self._total - offset) * elapsed / offset if offset else None
            bar = "#" * int(fraction * 30)
            parts.insert(0, f"[{bar:<30}] {fraction:6.1%}")
            parts.append("ETA " + (time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "--:--:--"))
        if note:
            parts.append(note)
        text = "  ".join(parts)
        if self._tty:
            self._stream.write("\r\033[K" + text)
        else:
            self._stream.write(f"memory-service ingest: {text}\n")
        self._stream.flush()

    def note(self, text: str, rows: int, offset: int) -> None:
        """A message that must not be lost in the bar: on a terminal it rides along, otherwise it is a line."""
        if self._tty:
            self.show(rows, offset, force=True, note=text)
        else:
            self._stream.write(f"memory-service ingest: {text}\n")
            self._stream.flush()

    def close(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


class Refused(Exception):
    """The server refused the load; resending cannot help."""


class Loader:
    """Streams ``source`` through BulkStore with the client's resumable engine; each line's sequence is its number.

    The engine keeps the unacknowledged lines; beside them this keeps only their end offsets, for the progress bar.
    """

    def __init__(
        self,
        stub: memory_pb2_grpc.MemoryServiceStub,
        source: IO[bytes],
        *,
        batch_size: int = 500,
        window: int = 10_000,
        metadata: tuple[tuple[str, str], ...] = (),
        fence: memory_pb2.Fence | None = None,
        retry_timeout: float = 300.0,
        progress: Progress | None = None,
    ) -> None:
        self.lines = 0
        self._source = source
        self._batch_size = batch_size
        self._progress = progress
        self._pending: collections.deque[tuple[int, int]] = collections.deque()  # (line, end offset), not durable
        self._eof = False
        self._line_no = 0  # the reader thread's position
        self._read_offset = 0
        self._taken_line = 0  # the last line the event loop took from the reader
        self._taken_offset = 0
        self._durable_offset = 0
        self._engine = ResumableBulkStore(
            stub,
            self._items(),
            batch_size=batch_size,
            window=window,
            metadata=metadata,
            fence=fence,
            retry_timeout=retry_timeout,
            on_ack=self._acknowledged,
            on_retry=self._retrying,
        )

    @property
    def summary(self) -> BulkSummary:
        """Outcomes by line; malformed lines are counted as rejected here, never sent."""
        return self._engine.summary

    async def run(self) -> BulkSummary:
        """Raises Refused, or TimeoutError when the server stays unreachable for ``retry_timeout``."""
        try:
            summary = await self._engine.run()
        except grpc.RpcError as error:
            raise Refused(f"{error.code().name}: {error.details()}") from None
        self._show(force=True)
        return summary

    @property
    def durable_line(self) -> int:
        """Every line up to this one is stored or rejected."""
        return self._pending[0][0] - 1 if self._pending else self._taken_line

    async def _items(self) -> AsyncIterator[memory_pb2.BulkItem]:
        """The file's valid lines; reads run in a worker thread so that the event loop keeps acknowledging."""
        while not self._eof:
            chunk = await asyncio.to_thread(self._read, self._batch_size)
            self._taken_line, self._taken_offset = chunk.last_line, chunk.end_offset
            self.lines += chunk.read
            for line_no, error in chunk.errors:
                self.summary.reject(line_no, error.field, error.reason)
            if not self._pending:
                self._durable_offset = self._taken_offset
            for line in chunk.lines:
                self._pending.append((line.sequence, line.end_offset))
                yield line.item

    def _acknowledged(self, ack: memory_pb2.BulkStoreAck) -> None:
        while self._pending and self._pending[0][0] <= ack.durable_sequence:
            self._durable_offset = self._pending.popleft()[1]
        if not self._pending:
            self._durable_offset = self._taken_offset
        self._show()

    def _retrying(self, why: str, delay: float) -> None:
        if self._progress is not None:
            note = f"stream broken ({why}); resuming after line {self.durable_line} in {delay:.1f}s"
            self._progress.note(note, self.summary.done, self._durable_offset)

    def _read(self, count: int) -> _Chunk:
        """Up to ``count`` valid lines and the malformed ones met on the way (counted here, never sent).

        Runs in a worker thread and alone moves the file position, so the event loop keeps acknowledging.
        """
        lines: list[_Line] = []
        errors: list[tuple[int, LineError]] = []
        read = 0
        while len(lines) < count:
            raw = self._source.readline()
            if not raw:
                self._eof = True
                break
            read += 1
            self._line_no += 1
            self._read_offset += len(raw)
            if not raw.strip():
                continue
            try:
                memory = parse_line(raw)
            except LineError as error:
                errors.append((self._line_no, error))
                continue
            item = memory_pb2.BulkItem(sequence=self._line_no, memory=memory)
            lines.append(_Line(self._line_no, item, self._read_offset))
        return _Chunk(lines, errors, read, self._line_no, self._read_offset)

    def _show(self, *, force: bool = False, note: str = "") -> None:
        if self._progress is not None:
            self._progress.show(self.summary.done, self._durable_offset, force=force, note=note)


def register(commands: Any) -> None:
    """Add ``ingest`` to the CLI's subcommands."""
    env = os.environ
    parser = commands.add_parser(
        "ingest",
        help="bulk-load a JSON-lines file of memories (resumes on its own)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("file", help="JSON-lines file, or - for stdin")
    add_server_flags(parser)
    parser.add_argument("--batch-size", type=_positive, default=500, help="lines per request (default 500)")
    parser.add_argument(
        "--window", type=_positive, default=10_000, help="most lines in flight unacknowledged (default 10000)"
    )
    parser.add_argument(
        "--retry-timeout",
        type=parse_duration,
        default=300.0,
        help="give up when the server stays unreachable this long (default 5m)",
    )
    parser.add_argument("--fence-namespace", default=env.get("MEMORY_SERVICE_LEASE_NAMESPACE", "default"))
    parser.add_argument("--fence-name", default=env.get("MEMORY_SERVICE_LEASE_NAME"), help="fence with this lease")
    parser.add_argument("--fence-token", type=int, default=env.get("MEMORY_SERVICE_LEASE_TOKEN"), help="its token")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    parser.set_defaults(run=_ingest, client=True)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer (got {text})")
    return value


def _ingest(settings: Settings, args: argparse.Namespace) -> int:
    try:
        ca = Path(args.ca_file).read_bytes() if args.ca_file else None
        source: IO[bytes] = sys.stdin.buffer if args.file == "-" else open(args.file, "rb")  # noqa: SIM115
    except OSError as exc:
        print(f"memory-service ingest: cannot read {exc.filename}: {exc.strerror}", file=sys.stderr)
        return EX_USAGE
    with source:
        return asyncio.run(_load(args, source, ca))


async def _load(args: argparse.Namespace, source: IO[bytes], ca: bytes | None) -> int:
    options = [("grpc.keepalive_time_ms", 30_000)]
    if ca is not None:
        channel = aio.secure_channel(args.address, grpc.ssl_channel_credentials(ca), options=options)
    else:
        channel = aio.insecure_channel(args.address, options=options)
    fence = None
    if args.fence_name and args.fence_token is not None:
        fence = memory_pb2.Fence(namespace=args.fence_namespace, name=args.fence_name, fencing_token=args.fence_token)
    status = os.fstat(source.fileno())
    progress = Progress(sys.stderr, status.st_size if stat.S_ISREG(status.st_mode) else None, enabled=not args.quiet)
    loader = Loader(
        memory_pb2_grpc.MemoryServiceStub(channel),
        source,
        batch_size=args.batch_size,
        window=args.window,
        metadata=(("authorization", f"Bearer {args.token}"),) if args.token else (),
        fence=fence,
        retry_timeout=args.retry_timeout,
        progress=progress,
    )
    started = time.monotonic()
    code = 0
    try:
        summary = await loader.run()
    except Refused as exc:
        summary, code = loader.summary, EX_REFUSED
        print(f"memory-service ingest: the server refused the load: {one_line(str(exc))}", file=sys.stderr)
    except TimeoutError as exc:
        summary, code = loader.summary, EX_UNAVAILABLE
        print(f"memory-service ingest: {exc}", file=sys.stderr)
    finally:
        progress.close()
        await channel.close()
    elapsed = time.monotonic() - started
    print(
        f"{args.file}: {loader.lines:,} lines; created {summary.created:,}, updated {summary.updated:,}, "
        f"unchanged {summary.unchanged:,}, rejected {summary.rejected:,}"
        f"{f', superseded {summary.superseded:,}' if summary.superseded else ''} "
        f"({elapsed:.1f}s, {summary.done / max(elapsed, 1e-6):,.0f} rows/s)"
    )
    if code:
        print(f"stopped after line {loader.durable_line}; lines up to it are stored or rejected")
    for line, reason in sorted(summary.rejections.items()):
        print(f"  line {line}: {reason}")
    if summary.rejected > len(summary.rejections):
        print(f"  ... and {summary.rejected - len(summary.rejections):,} more rejected lines")
    return code or (EX_REJECTED if summary.rejected else 0)
