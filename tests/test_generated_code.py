"""The committed protobuf modules are exactly what scripts/gen_protos.py generates from protos/."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_code_matches_protos(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fresh = module.generate(tmp_path)
    assert fresh, "protoc generated nothing"
    committed_dir = ROOT / "memory_service" / "v1"
    committed = sorted(p.name for p in committed_dir.glob("*_pb2*.py*"))
    assert committed == sorted(p.name for p in fresh)
    stale = [p.name for p in fresh if (committed_dir / p.name).read_bytes() != p.read_bytes()]
    assert not stale, f"run `python scripts/gen_protos.py`: {stale} differ from protos/"
