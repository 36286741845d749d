"""``memory-service lease``: hold a lease from a shell, like flock(1) for a fleet of machines.

``lease run NAME -- COMMAND`` acquires the lease (waiting if asked), runs COMMAND with the lease's fencing token in
its environment, renews in the background through unary calls (so any server instance behind a load balancer will
do), stops COMMAND if the lease is lost, releases at the end, and exits with COMMAND's exit code.

Exit codes of its own: 1 (``-E``) the lease is held by another; 2 a usage error; 69 the server could not be
reached (for ``--retry-timeout``, default 30s, or until ``--wait`` ran out); 125 the server refused the request
(PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT such as a bad namespace or TTL, RESOURCE_EXHAUSTED ...): a
fault to fix, not a lease someone else holds, as ``timeout`` and ``env`` answer 125 when they fail themselves; 126
COMMAND cannot be executed; 127 COMMAND was not found. ``lease list`` exits 0, 1 (the server refused), 2 or 69.

The lease counts as lost when a renewal answers ABORTED, or when none has succeeded for the TTL minus a margin,
measured on this machine's monotonic clock from the moment the last successful request was *sent*: the server
cannot have started the TTL earlier than that, so this side always gives up first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import grpc
from google.protobuf import duration_pb2
from grpc import aio

from memory_service.cli.remote import EX_FAILED, EX_UNAVAILABLE, EX_USAGE, OneLineParser, add_server_flags, read_ca
from memory_service.config.env import parse_duration
from memory_service.config.settings import Settings
from memory_service.errors import one_line
from memory_service.v1 import lease_pb2, lease_pb2_grpc

EX_CONFLICT = 1
"""Exit code when the lease is held by someone else, as flock(1) answers."""
EX_REFUSED = 125
"""The server refused the Acquire (not UNAVAILABLE, not held by another): distinct from a usage error, a lease held
elsewhere and (but for a COMMAND that exits 125 itself) COMMAND's own exit code; as timeout(1) and env(1) answer."""
EX_NOT_FOUND = 127
"""COMMAND was not found, as flock(1) and the shell answer."""
EX_CANNOT_EXECUTE = 126
"""COMMAND was found but could not be executed (not executable, a directory, a bad interpreter)."""
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
_MAX_WAIT_PER_CALL = 30.0


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a duration such as 30s, 250ms or 5m (got {text!r})") from None


def _client_flags(parser: argparse.ArgumentParser) -> None:
    add_server_flags(parser)


def _run_options(run: argparse.ArgumentParser) -> None:
    _client_flags(run)
    run.add_argument("--namespace", default="default", help="lease namespace (default: default)")
    run.add_argument("--ttl", type=_duration, default=30.0, help="lease TTL (default 30s); renewed every TTL/3")
    group = run.add_mutually_exclusive_group()
    group.add_argument("--wait", type=_duration, help="give up after this long (default: wait forever)")
    group.add_argument("-n", "--no-wait", action="store_true", help="give up at once if the lease is held")
    run.add_argument("--holder", default=f"{socket.gethostname()}:{os.getpid()}", help="how contenders see you")
    run.add_argument(
        "-E", "--conflict-exit-code", type=int, default=EX_CONFLICT, help="exit code when the lease is not acquired"
    )
    run.add_argument(
        "--retry-timeout",
        type=_duration,
        default=30.0,
        help="give up (exit 69) when the server stays unreachable this long, even without --wait (default 30s)",
    )
    run.add_argument(
        "--kill-after", type=_duration, default=10.0, help="SIGKILL this long after SIGTERM when the lease is lost"
    )


def _split_command(args: argparse.Namespace) -> list[str]:
    """Apply the options written after NAME, and return the command after ``--``.

    argparse hands everything after the first positional to a REMAINDER argument, so options that follow NAME (as
    in ``lease run NAME --ttl 5s -- COMMAND``) are parsed here.
    """
    rest = list(args.command)
    if rest[:1] == ["--"]:
        return rest[1:]
    if not rest or not rest[0].startswith("-") or "--" not in rest:
        return rest  # no options after NAME (argparse may already have dropped the "--")
    split = rest.index("--")
    options = OneLineParser(prog="memory-service lease run NAME", add_help=False)
    _run_options(options)
    defaults = {action.dest: getattr(args, action.dest) for action in options._actions}
    options.set_defaults(**defaults)
    options.parse_args(rest[:split], namespace=args)
    return rest[split + 1 :]


def register(commands: Any) -> None:
    """Add ``lease run`` and ``lease list`` to the CLI's subcommands."""
    lease = commands.add_parser("lease", help="hold a lease while a command runs; list leases")
    sub = lease.add_subparsers(dest="lease_command", required=True, metavar="LEASE_COMMAND")

    run = sub.add_parser(
        "run",
        help="run COMMAND while holding lease NAME (like flock for a fleet)",
        usage="memory-service lease run NAME [options] -- COMMAND [ARG...]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("name", help="the lease name")
    _run_options(run)
    run.add_argument("command", nargs=argparse.REMAINDER, help="[options] -- COMMAND [ARG...]")
    run.set_defaults(run=_run, client=True)

    listing = sub.add_parser("list", help="list live leases")
    _client_flags(listing)
    listing.add_argument("--namespace", default="", help="only this namespace (default: all)")
    listing.set_defaults(run=_list, client=True)


class _Client:
    def __init__(self, args: argparse.Namespace) -> None:
        ca = read_ca(args)
        if ca is not None:
            credentials = grpc.ssl_channel_credentials(ca)
            self.channel = aio.secure_channel(args.address, credentials)
        else:
            self.channel = aio.insecure_channel(args.address)
        self.stub = lease_pb2_grpc.LeaseServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {args.token}"),) if args.token else ()


def _seconds(value: float) -> duration_pb2.Duration:
    message = duration_pb2.Duration()
    message.FromNanoseconds(int(value * 1e9))
    return message


def _say(message: str) -> None:
    print(f"memory-service lease: {one_line(message)}", file=sys.stderr, flush=True)


def _run(settings: Settings, args: argparse.Namespace) -> int:
    command = _split_command(args)
    if not command:
        _say("a command is required: lease run NAME [options] -- COMMAND [ARG...]")
        return EX_USAGE
    return asyncio.run(_LeaseRun(args, command).main())


class _LeaseRun:
    def __init__(self, args: argparse.Namespace, command: Sequence[str]) -> None:
        self.args = args
        self.command = list(command)
        self.ttl: float = args.ttl
        self.margin = min(self.ttl / 10, 1.0)
        self.lost = asyncio.Event()
        self.valid_until = 0.0

    async def main(self) -> int:
        client = _Client(self.args)
        try:
            lease = await self._acquire(client)
            if isinstance(lease, int):
                return lease
            try:
                return await self._supervise(client, lease)
            finally:
                await self._release(client, lease)
        finally:
            await client.channel.close()

    async def _acquire(self, client: _Client) -> lease_pb2.Lease | int:
        """The lease, or the exit code to end with. One request id for every attempt: a retry is never a 2nd grant."""
        args = self.args
        wait = 0.0 if args.no_wait else args.wait
        give_up = None if wait is None else time.monotonic() + wait
        # Waiting for a lease that is held may take forever; waiting for a server that does not answer may not.
        unreachable_since: float | None = None
        request_id = uuid.uuid4().hex
        backoff = 0.1
        while True:
            left = _MAX_WAIT_PER_CALL if give_up is None else max(give_up - time.monotonic(), 0.0)
            chunk = min(left, _MAX_WAIT_PER_CALL)
            request = lease_pb2.AcquireRequest(
                namespace=args.namespace,
                name=args.name,
                ttl=_seconds(self.ttl),
                wait=_seconds(chunk),
                request_id=request_id,
                holder=args.holder,
            )
            sent = time.monotonic()
            try:
                response = await client.stub.Acquire(request, timeout=chunk + 10, metadata=client.metadata)
            except grpc.RpcError as exc:
                now = time.monotonic()
                unreachable_since = now if unreachable_since is None else unreachable_since
                out_of_time = give_up is not None and now >= give_up
                if exc.code() not in _RETRYABLE or out_of_time or now - unreachable_since >= args.retry_timeout:
                    _say(f"cannot acquire {args.namespace}/{args.name}: {exc.code().name}: {exc.details()}")
                    return EX_UNAVAILABLE if exc.code() in _RETRYABLE else EX_REFUSED
                if backoff == 0.1:
                    _say(f"{args.address} answers {exc.code().name}; retrying with the same request id")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            unreachable_since = None
            if response.acquired:
                self.valid_until = sent + self.ttl
                lease: lease_pb2.Lease = response.lease
                return lease
            if give_up is not None and time.monotonic() >= give_up:
                holder = response.current_holder
                _say(f"{args.namespace}/{args.name} is held by {holder.holder!r} (token {holder.fencing_token})")
                return int(args.conflict_exit_code)

    async def _supervise(self, client: _Client, lease: lease_pb2.Lease) -> int:
        env = {
            **os.environ,
            "MEMORY_SERVICE_LEASE_NAMESPACE": lease.namespace,
            "MEMORY_SERVICE_LEASE_NAME": lease.name,
            "MEMORY_SERVICE_LEASE_TOKEN": str(lease.fencing_token),
        }
        # Its own process group, so a lost lease stops the whole command, not just a wrapping shell; unless it
        # needs the terminal, which only the foreground group may read.
        own_group = not sys.stdin.isatty()
        try:
            process = await asyncio.create_subprocess_exec(
                *self.command, env=env, process_group=0 if own_group else None
            )
        except FileNotFoundError:
            _say(f"{self.command[0]}: command not found")
            return EX_NOT_FOUND
        except OSError as exc:  # not executable, a directory, a bad interpreter line
            _say(f"{self.command[0]}: cannot execute: {exc.strerror or exc}")
            return EX_CANNOT_EXECUTE

        def send(signum: int) -> None:
            with contextlib.suppress(ProcessLookupError):
                if own_group:
                    os.killpg(process.pid, signum)
                else:
                    process.send_signal(signum)

        loop = asyncio.get_running_loop()
        forwarded = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        for signum in forwarded:
            loop.add_signal_handler(signum, send, signum)
        renewer = asyncio.create_task(self._renew(client, lease))
        exited = asyncio.create_task(process.wait())
        lost = asyncio.create_task(self.lost.wait())
        try:
            await asyncio.wait({exited, lost}, return_when=asyncio.FIRST_COMPLETED)
            if not exited.done():
                send(signal.SIGTERM)
                try:
                    await asyncio.wait_for(asyncio.shield(exited), self.args.kill_after)
                except TimeoutError:
                    send(signal.SIGKILL)
            code = await exited
        finally:
            for task in (renewer, lost):
                task.cancel()
            await asyncio.gather(renewer, lost, return_exceptions=True)
            for signum in forwarded:
                loop.remove_signal_handler(signum)
        return 128 - code if code < 0 else code

    async def _renew(self, client: _Client, lease: lease_pb2.Lease) -> None:
        retry = min(self.ttl / 10, 1.0)
        next_at = time.monotonic() + self.ttl / 3
        while True:
            await asyncio.sleep(max(next_at - time.monotonic(), 0))
            give_up = self.valid_until - self.margin
            sent = time.monotonic()
            if sent >= give_up:
                self._lose("no renewal succeeded within the TTL")
                return
            try:
                await client.stub.Renew(
                    lease_pb2.RenewRequest(lease_id=lease.lease_id), timeout=give_up - sent, metadata=client.metadata
                )
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE:
                    self._lose(f"{exc.code().name}: {exc.details()}")
                    return
                next_at = time.monotonic() + retry
                continue
            self.valid_until = sent + self.ttl
            next_at = sent + self.ttl / 3

    def _lose(self, why: str) -> None:
        _say(f"lease {self.args.namespace}/{self.args.name} lost ({why}); stopping the command")
        self.lost.set()

    async def _release(self, client: _Client, lease: lease_pb2.Lease) -> None:
        if self.lost.is_set():
            return
        request = lease_pb2.ReleaseRequest(lease_id=lease.lease_id)
        for attempt in range(3):
            try:
                await client.stub.Release(request, timeout=5, metadata=client.metadata)
                return
            except grpc.RpcError as exc:
                if exc.code() not in _RETRYABLE or attempt == 2:
                    _say(f"could not release the lease ({exc.code().name}); it ends at its TTL")
                    return
                await asyncio.sleep(0.2 * (attempt + 1))


def _list(settings: Settings, args: argparse.Namespace) -> int:
    return asyncio.run(_list_async(args))


async def _list_async(args: argparse.Namespace) -> int:
    client = _Client(args)
    namespace = args.namespace
    rows: list[tuple[str, ...]] = [("NAMESPACE", "NAME", "HOLDER", "TOKEN", "EXPIRES")]
    token = ""
    try:
        while True:
            request = lease_pb2.ListLeasesRequest(namespace=namespace, page_size=500, page_token=token)
            page = await client.stub.List(request, timeout=30, metadata=client.metadata)
            for lease in page.leases:
                expires = lease.expires_at.ToDatetime().isoformat(timespec="seconds") + "Z"
                rows.append((lease.namespace, lease.name, lease.holder, str(lease.fencing_token), expires))
            token = page.next_page_token
            if not token:
                break
    except grpc.RpcError as exc:
        _say(f"cannot list leases: {exc.code().name}: {exc.details()}")
        return EX_UNAVAILABLE if exc.code() in _RETRYABLE else EX_FAILED
    finally:
        await client.channel.close()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0
