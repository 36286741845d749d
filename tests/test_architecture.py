"""The layering of docs/architecture.md, checked on the imports themselves (parsed, not executed).

api -> domain -> storage: transport converts and calls the domain, the domain calls storage, storage imports only
the shared foundation and the domain's value types. No import cycles, in the package or in ``bench/``, counting the
package ``__init__`` each import runs and the imports inside functions (a circle deferred to call time is still a
circle). A failure names the import that goes against the layers.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "memory_service"
BENCH = PACKAGE.parent / "bench"

# Each top-level part of the package and the layer it belongs to.
LAYERS: dict[str, str] = {
    "__init__": "foundation",
    "errors": "foundation",
    "models": "foundation",
    "config": "foundation",
    "metrics": "foundation",
    "pagination": "foundation",
    "observability": "foundation",
    "v1": "wire",
    "storage": "storage",
    "memories": "domain",
    "search": "domain",
    "embeddings": "domain",
    "leases": "domain",
    "history": "domain",
    "generations": "domain",
    "tenants": "domain",
    "app": "composition",
    "api": "api",
    "client": "client",
    "cli": "cli",
    "__main__": "cli",
}

# Which layers each layer may import. The domain's value modules (``<package>.types``) count as foundation.
MAY_IMPORT: dict[str, set[str]] = {
    "foundation": {"foundation"},
    "wire": {"wire"},
    "storage": {"foundation", "storage"},
    "domain": {"foundation", "storage", "domain"},
    "api": {"foundation", "wire", "domain", "api"},
    "composition": {"foundation", "storage", "domain", "api", "wire", "composition"},
    "client": {"foundation", "wire", "client"},
    "cli": set(LAYERS.values()),
}

# Third-party modules that belong to one floor only.
DRIVER = {"asyncpg", "pgvector"}
TRANSPORT = {"grpc", "grpc_health", "grpc_reflection", "google"}
DRIVER_LAYERS = {"storage"}
TRANSPORT_LAYERS = {"api", "composition", "client", "cli", "wire"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    """The package's modules (generated code aside) and the benchmarks', which are checked for cycles only."""
    package = [p for p in sorted(PACKAGE.rglob("*.py")) if "v1" not in p.relative_to(PACKAGE).parts]
    return {_module_name(p): p for p in [*package, *sorted(BENCH.rglob("*.py"))]}


MODULES = _modules()


def _resolve(name: str) -> str:
    """The module an imported name refers to: itself if it is a module, else the module that defines it."""
    while name not in MODULES and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


def _imports(module: str, path: Path) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks still say what a module depends on
            top_level.update(id(child) for child in node.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno, id(node) in top_level) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found += [(f"{base}.{alias.name}", node.lineno, id(node) in top_level) for alias in node.names]
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 3 and parts[-1] == "types" and LAYERS.get(parts[1]) == "domain":
        return "foundation"  # value types of a domain package import nothing of the service
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_part_of_the_package_has_a_layer() -> None:
    tops = {module.split(".")[1] for module in MODULES if module.startswith("memory_service.")}
    assert tops <= set(LAYERS), f"add {sorted(tops - set(LAYERS))} to LAYERS and to docs/architecture.md"


def test_imports_follow_the_layers() -> None:
    wrong = []
    for module, path in MODULES.items():
        if module.split(".")[0] == "bench":
            continue
        layer = _layer(module)
        for name, line, _ in _imports(module, path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            root = name.split(".")[0]
            if root == "bench":
                wrong.append(f"{where}: the service never imports the benchmarks ({name})")
            elif root == "memory_service":
                target = _resolve(name)
                if target.startswith("memory_service.v1") or name.startswith("memory_service.v1"):
                    target_layer = "wire"
                else:
                    target_layer = _layer(target)
                if target_layer not in MAY_IMPORT[layer]:
                    wrong.append(f"{where}: {layer} module {module} imports {target_layer} {name}")
            elif root in DRIVER and layer not in DRIVER_LAYERS:
                wrong.append(f"{where}: only storage may import the driver ({name})")
            elif root in TRANSPORT and layer not in TRANSPORT_LAYERS:
                wrong.append(f"{where}: {layer} module {module} imports the transport ({name})")
    assert not wrong, "imports against the layers (docs/architecture.md):\n" + "\n".join(wrong)


def _graph() -> dict[str, set[str]]:
    """Import edges, at module level or inside a function, plus the edge to the package ``__init__`` every import
    of a submodule runs."""
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for module, path in MODULES.items():
        for name, _, _ in _imports(module, path):
            if not name.startswith(("memory_service.", "bench.")) or name.startswith("memory_service.v1"):
                continue
            target = _resolve(name)
            parents = target.split(".")
            for depth in range(2, len(parts := parents) + 1):
                candidate = ".".join(parts[:depth])
                if candidate != module and candidate in MODULES and not module.startswith(candidate + "."):
                    graph[module].add(candidate)
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("storage/bad.py", "from memory_service.leases.manager import LeaseManager\n"),
        ("api/bad.py", "from memory_service.storage import memories_sql\n"),
        ("memories/bad.py", "import grpc\n"),
    ],
)
def test_the_rules_catch_a_wrong_import(source: str, message: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The checks above are able to fail: each of these imports is reported."""
    path = PACKAGE / source
    module = _module_name(path)
    monkeypatch.setitem(MODULES, module, path)
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return message if self == path else real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(AssertionError, match="bad"):
        test_imports_follow_the_layers()


@pytest.mark.parametrize(
    ("source", "message", "named"),
    [
        (
            "memory_service/leases/types.py",
            "from memory_service.leases.manager import LeaseManager\n",
            r"leases\.types",
        ),
        (
            "memory_service/client/wire.py",
            "def f():\n    from memory_service.client.memory_client import MemoryClient\n",
            r"client\.wire",
        ),
        ("bench/corpus.py", "def f():\n    from bench.datasets import corpus\n", r"bench\.corpus"),
    ],
)
def test_a_cycle_is_reported(source: str, message: str, named: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """At module level, inside a function, and among the benchmarks."""
    path = PACKAGE.parent / source
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return message if self == path else real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(AssertionError, match=named):
        test_no_import_cycles()


def test_modules_stay_small() -> None:
    """Typical module sizes in the projects this one follows are 100 to 400 lines (STYLE.md)."""
    package = {m: p for m, p in MODULES.items() if m.split(".")[0] == "memory_service"}
    long = {m: n for m, p in package.items() if (n := len(p.read_text().splitlines())) > 420}
    assert not long, f"modules past ~400 lines: {long}"


def test_the_openai_sdk_is_imported_only_when_its_provider_is_used() -> None:
    """It costs about half a second at start-up, so `memory-service --help` and hash-embedder servers skip it."""
    code = (
        "import sys, memory_service.app.server, memory_service.cli.main, memory_service.embeddings; "
        "sys.exit('openai' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
