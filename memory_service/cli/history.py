"""`memory-service history ID` and `memory-service watch`: a memory's versions, and the change stream as JSON lines."""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import grpc
from google.protobuf import json_format

from memory_service.cli.ops import _scope
from memory_service.cli.remote import add_server_flags, failed, read_ca
from memory_service.config.settings import Settings


def register(commands: Any) -> None:
    history = commands.add_parser("history", help="print every version of a memory, newest first, as JSON lines")
    history.add_argument("id", type=int, help="the memory's id")
    add_server_flags(history)
    history.set_defaults(run=_history)

    watch = commands.add_parser(
        "watch", help="print changes as they commit, one JSON line each; resume with --after CURSOR"
    )
    watch.add_argument("--after", default="", help="the cursor of the last change seen; unset: the oldest kept")
    watch.add_argument("--scope", type=_scope, help="only this scope, e.g. agent or agent:42")
    watch.add_argument("--memory", action="store_true", help="include the memory as each change left it")
    add_server_flags(watch)
    watch.set_defaults(run=_watch)


def _line(message: Any) -> str:
    return json.dumps(json_format.MessageToDict(message, preserving_proto_field_name=True), sort_keys=True)


def _client(args: argparse.Namespace) -> Any:
    from memory_service.client import MemoryClient

    return MemoryClient(args.address, token=args.token, root_certificates=read_ca(args), attempts=2)


def _history(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> int:
        async with _client(args) as client:
            try:
                versions = await client.history(args.id)
            except grpc.RpcError as error:
                return failed("history", error)
        for version in versions:
            print(_line(version))
        return 0

    return asyncio.run(run())


def _watch(settings: Settings, args: argparse.Namespace) -> int:
    scope, scope_id = args.scope or (None, None)

    async def run() -> int:
        async with _client(args) as client:
            stream = client.watch(after=args.after, scope=scope, scope_id=scope_id, include_memory=args.memory)
            try:
                async for change in stream:
                    print(_line(change), flush=True)
            except grpc.RpcError as error:
                return failed("watch", error)
        return 0

    try:
        return asyncio.run(run())
    except KeyboardInterrupt:
        return 130
