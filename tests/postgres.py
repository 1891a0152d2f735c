"""A throwaway PostgreSQL server for tests: Debian's binaries, a cluster in a temporary directory.

PostgreSQL refuses to run as root, so under root (CI) the cluster belongs to the ``postgres``
system user the Debian package creates (or ``nobody`` where there is none) and every server
command runs through ``runuser``. It listens on a free localhost port with ``trust``
authentication, and on a socket in its own directory; durability is off (``fsync=off``): the
cluster lives as long as the test session.

:func:`start_server` fails with the reason (binaries missing, initdb or start-up errors with the
server's log) rather than letting tests skip: ``make test`` installs PostgreSQL first
(``scripts/install-postgres.sh``).
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

from tests.app_process import free_port

SUPERUSER = "mipha"
INSTALL_HINT = "run scripts/install-postgres.sh (make test does) to install Debian's postgresql package"
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "max_connections": "300",  # replica and app tests open several engines at once
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "shared_buffers": "64MB",
    "log_min_messages": "warning",
}


class PostgresUnavailable(RuntimeError):
    """The test server could not be started; the message says why and what to do."""


@dataclass(frozen=True)
class PostgresServer:
    """A running test cluster: its superuser, port and directories."""

    bin_dir: Path
    root: Path
    port: int
    run_as: str | None
    """The system user that owns the cluster when the tests run as root, else None."""

    @property
    def data_dir(self) -> Path:
        return self.root / "cluster"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres", *, driver: str = "postgresql+psycopg") -> str:
        """A SQLAlchemy URL (``driver="postgresql"`` for a libpq one) for ``database``."""
        return f"{driver}://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres") -> psycopg.Connection:
        """An autocommit connection (CREATE/DROP DATABASE need one)."""
        return psycopg.connect(self.url(database, driver="postgresql"), autocommit=True)

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """A new database (a copy of ``template`` when given); returns its SQLAlchemy URL."""
        statement = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            statement += sql.SQL(" TEMPLATE {}").format(sql.Identifier(template))
        with self.connect() as connection:
            connection.execute(statement)
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop ``name``, ending any connection a test left open to it."""
        with self.connect() as connection:
            connection.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def stop(self) -> None:
        """Stop the server (immediate shutdown: nothing in it is kept) and remove its directory."""
        if self.data_dir.is_dir():
            self._run("pg_ctl", "stop", "-D", str(self.data_dir), "-m", "immediate", "-w", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no server log)"

    def _run(self, program: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / program), *args]
        if self.run_as is not None:
            command = ["runuser", "-u", self.run_as, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and result.returncode != 0:
            raise PostgresUnavailable(
                f"{program} failed (exit {result.returncode}): {result.stderr.strip() or result.stdout.strip()}\n"
                f"server log:\n{self.log_tail()}"
            )
        return result


def start_server() -> PostgresServer:
    """initdb a cluster in a fresh temporary directory and start it; raises PostgresUnavailable."""
    bin_dir = find_bin_dir()
    run_as = _cluster_owner()
    root = Path(tempfile.mkdtemp(prefix="mipha-pg-"))
    server = PostgresServer(bin_dir=bin_dir, root=root, port=free_port(), run_as=run_as)
    try:
        if run_as is not None:
            owner = pwd.getpwnam(run_as)
            os.chown(root, owner.pw_uid, owner.pw_gid)
        server._run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                    "-E", "UTF8", "--locale=C")
        options = " ".join(f"-c {name}={value}" for name, value in
                           {**SERVER_SETTINGS, "port": server.port, "unix_socket_directories": root}.items())
        server._run("pg_ctl", "start", "-D", str(server.data_dir), "-l", str(server.log_file), "-w", "-t", "60",
                    "-o", options)
    except BaseException:
        server.stop()
        raise
    return server


def find_bin_dir() -> Path:
    """The newest of Debian's /usr/lib/postgresql/<version>/bin, else the one on PATH."""
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if found:
        newest = max(found, key=lambda path: [int(part) for part in re.findall(r"\d+", path)])
        return Path(newest).parent
    on_path = shutil.which("initdb")
    if on_path is not None:
        return Path(on_path).resolve().parent
    raise PostgresUnavailable(f"PostgreSQL's server programs (initdb, pg_ctl) were not found: {INSTALL_HINT}.")


def _cluster_owner() -> str | None:
    """Who runs the server: None (this user) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("runuser") is None:
            raise PostgresUnavailable("the tests run as root and `runuser` (util-linux) is missing to start "
                                      "PostgreSQL as an unprivileged user")
        return name
    raise PostgresUnavailable("the tests run as root and there is neither a `postgres` nor a `nobody` user "
                              f"to run PostgreSQL as: {INSTALL_HINT}")
