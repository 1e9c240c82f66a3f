"""A throwaway PostgreSQL server for tests: Debian's `postgresql` binaries, `initdb` into a
temporary folder, a free port on 127.0.0.1, password authentication; stopped at the end.

PostgreSQL refuses to run as root (CI runs as root), so there the server runs as `nobody`
through `runuser`, in a folder that user owns.

    with PostgresServer.start() as pg:
        url = pg.create_database("t1")   # postgresql://plugin@127.0.0.1:PORT/t1
        os.environ[PASSWORD_ENV] = pg.password
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.dcmtk_peer import free_port

USER = "plugin"
PASSWORD_ENV = "MAMMO_TEST_PG_PASSWORD"


def postgres_bindir() -> Path | None:
    """The newest installed server's binaries (Debian keeps them off PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4])
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def require_postgres() -> Path:
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not found: install Debian's postgresql package")
    return bindir


@dataclass
class PostgresServer:
    folder: Path
    port: int
    password: str
    bindir: Path

    @classmethod
    def start(cls) -> PostgresServer:
        bindir = require_postgres()
        # Not tempfile's default folder: a listener in this process may have pointed it at
        # its spool; and `nobody` must be able to reach the folder.
        folder = Path(tempfile.mkdtemp(prefix="mammo-pg-", dir=os.environ.get("TMPDIR", "/tmp")))
        folder.chmod(0o755)
        password = os.urandom(12).hex()
        (folder / "pw").write_text(password)
        server = cls(folder, free_port(), password, bindir)
        if os.geteuid() == 0:
            shutil.chown(folder, "nobody")
            shutil.chown(folder / "pw", "nobody")
        server._run(
            "initdb",
            "-D",
            str(folder / "data"),
            "-U",
            USER,
            f"--pwfile={folder / 'pw'}",
            "--auth=scram-sha-256",
            "--encoding=UTF8",
            "--no-instructions",
        )
        options = (
            f"-p {server.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories='' "
            "-c max_connections=100 -c shared_buffers=32MB"
        )
        server._run(
            "pg_ctl", "-D", str(folder / "data"), "-l", str(folder / "log"), "-o", options,
            "-w", "-t", "60", "start",
        )  # fmt: skip
        return server

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bindir / tool), *args]
        if os.geteuid() == 0:
            command = ["runuser", "-u", "nobody", "--", *command]
        done = subprocess.run(command, capture_output=True, text=True, cwd=self.folder, timeout=120)
        if done.returncode != 0:
            log = (self.folder / "log").read_text() if (self.folder / "log").exists() else ""
            raise RuntimeError(f"{tool} failed:\n{done.stdout}\n{done.stderr}\n{log[-3000:]}")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), password=self.password, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.folder / "data"), "-m", "fast", "stop")
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
