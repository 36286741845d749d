"""Local embedding throughput: the ONNX provider in-process and through the service's Embed RPC.

    python -m bench.embeddings --model ../shared/models/all-MiniLM-L6-v2

Short texts are 12 words of plain English, long ones 200 words (past the model's 256-token limit once tokenised,
so they are truncated). Each row is texts per second over ``--texts`` distinct texts (none cached), with the
model's inference threads at 1 and 2; "Embed RPC" adds the service around it (gRPC, the embedding cache lookup
and insert) with EMBEDDING_THREADS=2, and the hash embedder is there for scale.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
from grpc import aio

from bench.harness import ServerProcess, database_server, fresh_database, print_table
from memory_service.embeddings.hashing import HashEmbedder
from memory_service.embeddings.local_provider import LocalEmbedder
from memory_service.v1 import memory_pb2, memory_pb2_grpc

_SAMPLE = (
    "the agent remembers that our deployment pipeline runs every tuesday and the database team owns the schema "
    "while support prefers short answers about billing questions from customers in europe and asia during summer"
)
_WORDS = _SAMPLE.split(" ")


def texts(count: int, words: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(rng.choice(_WORDS, size=words)) for i in range(count)]


def per_second(embed: object, batch: list[str], size: int) -> float:
    started = time.perf_counter()
    for i in range(0, len(batch), size):
        embed(batch[i : i + size])  # type: ignore[operator]
    return len(batch) / (time.perf_counter() - started)


async def via_rpc(model: str, short: list[str], long: list[str]) -> tuple[float, float]:
    with database_server() as server_dsn:
        async with fresh_database(server_dsn) as dsn:
            env = {"DATABASE_URL": dsn, "EMBEDDING_PROVIDER": "local", "EMBEDDING_MODEL_PATH": model}
            process = ServerProcess(env)
            try:
                process.wait_ready()
                async with aio.insecure_channel(process.address) as channel:
                    stub = memory_pb2_grpc.MemoryServiceStub(channel)
                    await stub.Embed(memory_pb2.EmbedRequest(texts=["warm up"]))
                    rates = []
                    for batch in (short, long):
                        started = time.perf_counter()
                        for i in range(0, len(batch), 64):
                            await stub.Embed(memory_pb2.EmbedRequest(texts=batch[i : i + 64]))
                        rates.append(len(batch) / (time.perf_counter() - started))
                    return rates[0], rates[1]
            finally:
                process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("../shared/models/all-MiniLM-L6-v2"))
    parser.add_argument("--texts", type=int, default=256)
    args = parser.parse_args()
    short, long = texts(args.texts, 12, seed=1), texts(args.texts // 4, 200, seed=2)
    rows: list[list[object]] = []
    for threads in (1, 2):
        embedder = LocalEmbedder(model="local", directory=args.model, dimension=384, threads=threads)
        embedder.embed_now(short[:32])  # warm up
        rows.append(
            [
                f"local, {threads} thread(s), batch 64",
                per_second(embedder.embed_now, short, 64),
                per_second(embedder.embed_now, long, 64),
            ]
        )
    hashing = HashEmbedder(model="hash", dimension=384)
    rows.append(["hash embedder", per_second(hashing.embed_now, short, 64), per_second(hashing.embed_now, long, 64)])
    rpc_short, rpc_long = asyncio.run(
        via_rpc(args.model, texts(args.texts, 12, seed=3), texts(args.texts // 4, 200, seed=4))
    )
    rows.append(["Embed RPC, local, 2 threads", rpc_short, rpc_long])
    print_table(["path", "short texts/s", "long texts/s"], rows)


if __name__ == "__main__":
    main()
