"""Regenerate memory_service/v1 from protos/ with the pinned grpcio-tools and mypy-protobuf.

Run ``python scripts/gen_protos.py``; ``tests/test_generated_code.py`` fails when the committed code drifts.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"
PACKAGE = "memory_service/v1"


def _plugin(name: str) -> str:
    """mypy-protobuf's plugins sit beside this interpreter, which need not be on PATH (a venv used unactivated)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found: install the dev extra (pip install -e '.[dev]')")
    return found


def generate(out_dir: Path) -> list[Path]:
    """Write the generated modules for every proto under protos/ into out_dir and return their paths."""
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / PACKAGE).glob("*.proto"))
    include = Path(protoc.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
        f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
        f"-I{PROTO_ROOT}",
        f"-I{include}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")
    return sorted((out_dir / PACKAGE).glob("*_pb2*.py*"))


def main() -> int:
    target = ROOT / PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        for generated in generate(Path(tmp)):
            (target / generated.name).write_bytes(generated.read_bytes())
            print(f"wrote {(target / generated.name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
