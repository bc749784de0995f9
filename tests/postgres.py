"""A throw-away PostgreSQL cluster for the store's tests: Debian's server binaries (`apt-get install postgresql`),
`initdb` into a temporary folder and `pg_ctl start` on a Unix socket there (no TCP port is opened). As root, the
server runs as the `postgres` user the package creates (PostgreSQL refuses to run as root)."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PORT = 5433  # only names the socket file: nothing listens on TCP


def server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if found:
        return Path(found[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class Cluster:
    def __init__(self) -> None:
        self.bin = server_binaries()
        if self.bin is None:
            raise FileNotFoundError("PostgreSQL server binaries are missing (apt-get install postgresql)")
        try:
            import psycopg2  # noqa: F401
        except ImportError as error:
            raise FileNotFoundError("the psycopg2 driver is missing (pip install psycopg2-binary)") from error
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError as error:
                raise FileNotFoundError("running as root and there is no postgres user to run the server") from error
        self.root = Path(tempfile.mkdtemp(prefix="pg-explorer-"))
        self.data, self.socket = self.root / "data", self.root / "socket"
        self.socket.mkdir()
        if self.user is not None:
            for path in (self.root, self.socket):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._names = itertools.count()
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "server.log"), "-w", "-o",
                  f"-k {self.socket} -c listen_addresses='' -p {PORT} -F", "start")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bin / program), *args]
        if self.user is not None:
            command = ["runuser", "-u", "postgres", "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg2://postgres@/{database}?host={self.socket}&port={PORT}"

    def new_database(self) -> str:
        """A fresh, empty database's URL."""
        from sqlalchemy import create_engine, text

        name = f"explorer_{os.getpid()}_{next(self._names)}"
        engine = create_engine(self.url(), isolation_level="AUTOCOMMIT")
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
