"""`memory-service history ID` and `memory-service watch`: a memory's versions, and the change stream as JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from memory_service.config import Settings

# sysexits.h: the service could not be reached.
EX_UNAVAILABLE = 69


def _client_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("MEMORY_SERVICE_ADDRESS", "localhost:50051"))


def register(commands: Any) -> None:
    history = commands.add_parser("history", help="print every version of a memory, newest first, as JSON lines")
    history.add_argument("id", type=int, help="the memory's id")
    _client_flags(history)
    history.set_defaults(run=_history, client=True)

    watch = commands.add_parser(
        "watch", help="print changes as they commit, one JSON line each; resume with --after CURSOR"
    )
    watch.add_argument("--after", default="", help="the cursor of the last change seen; unset: the oldest kept")
    watch.add_argument("--scope", help="only this scope, e.g. agent or agent:42")
    watch.add_argument("--memory", action="store_true", help="include the memory as each change left it")
    _client_flags(watch)
    watch.set_defaults(run=_watch, client=True)


def _line(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


def _failed(what: str, error: grpc.RpcError) -> int:
    print(f"memory-service: {what} failed: {error.code().name}: {error.details()}", file=sys.stderr)
    return EX_UNAVAILABLE if error.code() is grpc.StatusCode.UNAVAILABLE else 1


def _history(settings: Settings, args: argparse.Namespace) -> int:
    from memory_service.client import MemoryClient

    async def run() -> int:
        async with MemoryClient(args.address, token=os.environ.get("MEMORY_SERVICE_TOKEN")) as client:
            try:
                versions = await client.history(args.id)
            except grpc.RpcError as error:
                return _failed("history", error)
        for version in versions:
            print(_line(version))
        return 0

    return asyncio.run(run())


def _watch(settings: Settings, args: argparse.Namespace) -> int:
    from memory_service.client import MemoryClient

    scope, _, scope_id = (args.scope or "").partition(":")

    async def run() -> int:
        async with MemoryClient(args.address, token=os.environ.get("MEMORY_SERVICE_TOKEN")) as client:
            stream = client.watch(
                after=args.after,
                scope=scope or None,
                scope_id=int(scope_id) if scope_id else None,
                include_memory=args.memory,
            )
            try:
                async for change in stream:
                    print(_line(change), flush=True)
            except grpc.RpcError as error:
                return _failed("watch", error)
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
