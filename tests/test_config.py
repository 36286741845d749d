"""Configuration: defaults, overrides, and one clear line for every bad value."""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from memory_service.client import MemoryClient
from memory_service.config.cores import available_cores, cpu_quota
from memory_service.config.env import parse_duration
from memory_service.config.settings import Settings
from memory_service.errors import ConfigError


def test_defaults_without_environment() -> None:
    settings = Settings.from_env({})
    assert settings.database_url is None
    assert settings.embedded_database
    assert (settings.database_pool_min, settings.database_pool_max) == (4, 20)
    assert (settings.grpc_port, settings.metrics_port) == (50051, 9464)
    assert settings.embedding_provider == "hash"


def test_the_readme_states_the_defaults_the_settings_have() -> None:
    # Each default is written once, on its Settings field; the README's configuration table repeats them for
    # readers, so each value it states, given as the variable, must configure what leaving it unset does.
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    defaults = Settings.from_env({})
    literal = re.compile(r"^([\d.]+ ?(KiB|MiB|[smh])?|true|false|INFO|ivfflat|hnsw|0\.0\.0\.0)$")
    checked = []
    for names_cell, values_cell in re.findall(r"^\| (`[A-Z_]+`(?: / `[A-Z_]+`)*) \| ([^|]+) \|", readme, re.M):
        names = re.findall(r"`([A-Z_]+)`", names_cell)
        values = [value.strip().strip("`") for value in values_cell.split(" / ")]
        if len(values) != len(names):
            continue
        for name, stated in zip(names, values, strict=True):
            if not literal.match(stated):
                continue  # "unset", "calibrated", a provider-dependent default: not a value to configure
            value = stated
            for unit, factor in (("KiB", 1024), ("MiB", 1024 * 1024)):
                if stated.endswith(unit):
                    value = str(int(stated.removesuffix(unit)) * factor)
            assert Settings.from_env({name: value}) == defaults, (name, stated)
            checked.append(name)
    assert len(checked) >= 40, checked


def test_the_default_port_is_spelled_only_by_settings() -> None:
    # The client's default address, the commands' --address and the serve --help text all derive from the
    # Settings field; a second spelling would drift the day the default changes. Docstrings (examples) aside.
    package = Path(__file__).parent.parent / "memory_service"
    port = Settings.grpc_port
    spelled = []
    for path in sorted(package.rglob("*.py")):
        if "v1" in path.parts or path.name == "settings.py":
            continue
        tree = ast.parse(path.read_text())
        docstrings = {
            id(node.body[0].value)
            for node in ast.walk(tree)
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
            and isinstance(node.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and id(node) not in docstrings and str(port) in str(node.value):
                spelled.append(f"{path.name}:{node.lineno}")
    assert spelled == []
    assert inspect.signature(MemoryClient).parameters["address"].default == f"localhost:{port}"


def test_openai_key_selects_openai_provider() -> None:
    settings = Settings.from_env({"OPENAI_API_KEY": "sk-test"})
    assert settings.embedding_provider == "openai"
    assert settings.embedding_model == "text-embedding-3-small"
    assert "sk-test" not in repr(settings)


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"GRPC_PORT": "abc"}, "GRPC_PORT is expected to be an integer from 0 to 65535 (got 'abc')"),
        ({"GRPC_PORT": "70000"}, "GRPC_PORT"),
        ({"DATABASE_POOL_MIN": "0"}, "DATABASE_POOL_MIN is expected to be an integer >= 1 (got '0')"),
        (
            {"DATABASE_POOL_MIN": "8", "DATABASE_POOL_MAX": "2"},
            "DATABASE_POOL_MAX is expected to be at least DATABASE_POOL_MIN (got 2 < 8)",
        ),
        (
            {"EMBEDDING_PROVIDER": "bert"},
            "EMBEDDING_PROVIDER is expected to be one of hash, openai, local (got 'bert')",
        ),
        ({"SHUTDOWN_GRACE": "soon"}, "SHUTDOWN_GRACE is expected to be a positive duration"),
        ({"MIGRATE_ON_START": "maybe"}, "MIGRATE_ON_START is expected to be true or false (got 'maybe')"),
        ({"EMBEDDING_PROVIDER": "openai"}, "EMBEDDING_PROVIDER=openai is expected with OPENAI_API_KEY"),
        ({"TLS_CERT_FILE": "/nonexistent.pem"}, "TLS_CERT_FILE and TLS_KEY_FILE are expected together"),
        ({"AUTH_TOKENS": "short"}, "AUTH_TOKENS is expected to hold comma-separated tokens"),
        ({"SEARCH_RECALL_BUDGET": "0"}, "SEARCH_RECALL_BUDGET is expected to be a number from 0.001 to 1 (got '0')"),
    ],
)
def test_bad_values_name_the_variable(env: dict[str, str], fragment: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(("text", "seconds"), [("30", 30.0), ("30s", 30.0), ("250ms", 0.25), ("5m", 300.0)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_cli_prints_one_line_and_exits_2_on_bad_value() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "serve"],
        env={"GRPC_PORT": "not-a-port", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        check=False,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["memory-service: error: GRPC_PORT is expected to be an integer from 0 to 65535 (got 'not-a-port')"]


def test_cli_help_lists_commands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0
    for command in ("serve", "migrate"):
        assert command in result.stdout


def test_client_commands_ignore_the_servers_variables() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "search", "tea", "--address", "127.0.0.1:1"],
        env={"GRPC_PORT": "not-a-port", "DATABASE_POOL_MIN": "0", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 69
    assert "GRPC_PORT" not in result.stderr and "DATABASE_POOL_MIN" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("memory-service: search failed: UNAVAILABLE")


def _serve_fails(env: dict[str, str], tmp_path: Path) -> str:
    """Run ``serve`` as a user would and return its one stderr line, after checking exit code 2 and no traceback."""
    base = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": "0",
        "METRICS_PORT": "off",
        "LOG_LEVEL": "WARNING",
    }
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "serve"],
        env={**base, **env},
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("memory-service: error: ")
    return lines[0]


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        (
            {"DATABASE_URL": "postgresql://me:hunter2@127.0.0.1:abc/db"},
            ["DATABASE_URL is expected to be a URL", "port 'abc'", "me:***@"],
        ),
        ({"DATABASE_URL": "mysql://me@127.0.0.1/db"}, ["DATABASE_URL", "scheme must be postgresql"]),
        (
            {"DATABASE_URL": "postgresql://127.0.0.1:1/db", "DATABASE_READ_URL": "redis://127.0.0.1/0"},
            ["DATABASE_READ_URL", "scheme must be postgresql"],
        ),
        ({"AUTH_TOKENS": ","}, ["AUTH_TOKENS is expected to hold comma-separated tokens of at least 16", "no token"]),
        ({"AUTH_TOKENS": " , ,"}, ["AUTH_TOKENS", "unset it to turn auth off"]),
        ({"OPENAI_BASE_URL": "ftp://x"}, ["OPENAI_BASE_URL is expected to be an http:// or https:// URL"]),
        ({"OPENAI_BASE_URL": "localhost:11434"}, ["OPENAI_BASE_URL"]),
    ],
)
def test_bad_settings_stop_serve_with_one_line(env: dict[str, str], fragments: list[str], tmp_path: Path) -> None:
    line = _serve_fails(env, tmp_path)
    for fragment in fragments:
        assert fragment in line
    assert "hunter2" not in line


def test_unreachable_database_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as listener:  # a port nothing listens on: bound, never listening, closed before use
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    line = _serve_fails({"DATABASE_URL": f"postgresql://me:hunter2@127.0.0.1:{port}/db"}, tmp_path)
    assert "cannot connect to the database named by DATABASE_URL" in line
    assert f"me:***@127.0.0.1:{port}/db" in line and "hunter2" not in line


def test_wrong_password_or_missing_database_is_one_line(server_dsn: str, tmp_path: Path) -> None:
    missing = server_dsn.replace("/postgres?", "/no_such_database?", 1)
    if missing == server_dsn:
        missing = server_dsn.rsplit("/", 1)[0] + "/no_such_database"
    line = _serve_fails({"DATABASE_URL": missing}, tmp_path)
    assert "cannot connect to the database named by DATABASE_URL" in line
    assert "no_such_database" in line


def test_read_replica_that_cannot_be_reached_is_one_line(database_url: str, tmp_path: Path) -> None:
    line = _serve_fails({"DATABASE_URL": database_url, "DATABASE_READ_URL": "postgresql://127.0.0.1:1/db"}, tmp_path)
    assert "cannot connect to the database named by DATABASE_READ_URL" in line


def test_unwritable_data_dir_is_one_line(tmp_path: Path) -> None:
    # A path under a regular file cannot be created, by root either (the tests may run as root).
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = _serve_fails({"MEMORY_SERVICE_DATA_DIR": str(blocker / "data")}, tmp_path)
    assert "MEMORY_SERVICE_DATA_DIR is expected to name a directory this user can create and write" in line
    assert str(blocker / "data") in line


def test_migrate_reports_an_unreachable_database_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "memory_service", "migrate", "--database-url", "postgresql://127.0.0.1:1/db"],
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LOG_LEVEL": "WARNING"},
        capture_output=True,
        check=False,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("memory-service: error: cannot connect to the database named by DATABASE_URL")


def test_history_settings() -> None:
    settings = Settings.from_env({})
    assert settings.history_versions
    assert settings.history_retention == 30 * 86400.0
    assert settings.watch_poll_interval == 1.0
    custom = Settings.from_env({"HISTORY_VERSIONS": "off", "HISTORY_RETENTION": "48h", "WATCH_POLL_INTERVAL": "250ms"})
    assert (custom.history_versions, custom.history_retention, custom.watch_poll_interval) == (False, 172800.0, 0.25)
    with pytest.raises(ConfigError, match="HISTORY_RETENTION is expected to be a positive duration"):
        Settings.from_env({"HISTORY_RETENTION": "0"})


def test_the_default_server_processes_are_the_cores_a_container_may_use(tmp_path: Path) -> None:
    """A CPU quota anywhere along the process's cgroup path bounds the default, v2 and v1 alike, rounded up."""
    v2 = tmp_path / "v2"
    for directory, limit in (("", "max 100000"), ("pod", "150000 100000"), ("pod/box", "max 100000")):
        (v2 / directory).mkdir(parents=True, exist_ok=True)
        (v2 / directory / "cpu.max").write_text(limit + "\n")
    (tmp_path / "v2-cgroup").write_text("0::/pod/box\n")
    assert cpu_quota(v2, tmp_path / "v2-cgroup") == 1.5
    assert available_cores(v2, tmp_path / "v2-cgroup") == min(2, os.cpu_count() or 1)

    v1 = tmp_path / "v1" / "cpu,cpuacct" / "docker" / "box"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    (tmp_path / "v1-cgroup").write_text("5:memory:/docker/box\n4:cpu,cpuacct:/docker/box\n")
    assert cpu_quota(tmp_path / "v1", tmp_path / "v1-cgroup") == 1.0
    assert available_cores(tmp_path / "v1", tmp_path / "v1-cgroup") == 1

    (v1 / "cpu.cfs_quota_us").write_text("-1\n")  # no limit
    assert cpu_quota(tmp_path / "v1", tmp_path / "v1-cgroup") is None
    assert cpu_quota(tmp_path / "none", tmp_path / "missing") is None


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_a_process_pinned_to_one_cpu_defaults_to_one_server_process() -> None:
    probe = "from memory_service.config.settings import Settings; print(Settings.from_env({}).server_processes)"
    pinned = subprocess.run(
        ["taskset", "-c", "0", sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert pinned.stdout.strip() == "1"
    assert Settings.from_env({"SERVER_PROCESSES": "3"}).server_processes == 3
