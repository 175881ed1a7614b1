"""A throwaway PostgreSQL server for tests (Debian ``postgresql``, installed by ``make test``).

The server refuses to run as root, so as root the data directory belongs to the
``postgres`` user and ``initdb``/``pg_ctl`` run through ``runuser -u postgres --``.
It listens on a free port on 127.0.0.1 only (trust authentication: loopback, a
throwaway cluster) and is stopped by ``stop()`` (pg_ctl stop, then the pid).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

PG_BIN = Path(os.environ.get("RISKPIPE_PG_BIN", "/usr/lib/postgresql/15/bin"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    def __init__(self, fsync: bool = False) -> None:
        """``fsync=False`` (tests): faster, not crash-safe; benchmarks pass True."""
        self.fsync = fsync
        missing = [b for b in ("initdb", "pg_ctl", "postgres") if not (PG_BIN / b).is_file()]
        if missing:  # never a silent skip: `make test` installs them
            raise RuntimeError(f"PostgreSQL binaries {', '.join(missing)} not found in {PG_BIN}: "
                               "install Debian's postgresql (make system-packages)")
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="riskpipe-pg-"))
        self.data = self.root / "data"
        self.as_root = os.geteuid() == 0
        self.pid: int | None = None

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [str(PG_BIN / args[0]), *args[1:]]
        if self.as_root:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def start(self) -> PostgresServer:
        if self.as_root:
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  *([] if self.fsync else ["--no-sync"]))
        return self.resume()

    def resume(self) -> PostgresServer:
        """Start the server on its data directory and port (after ``start`` or ``halt``)."""
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                f"-c fsync={'on' if self.fsync else 'off'} -c max_connections=100")
        self._run("pg_ctl", "-D", str(self.data), "-o", opts, "-l", str(self.root / "server.log"), "-w", "-t", "60",
                  "start")
        self.pid = int((self.data / "postmaster.pid").read_text().splitlines()[0])
        return self

    def halt(self, mode: str = "immediate") -> None:
        """Stop the server, keeping its data (an outage: ``resume`` brings it back).
        ``immediate`` drops every connection at once, as a crash or a failover does."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")
        self.pid = None

    def url(self, database: str = "postgres", user: str = "postgres") -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.pid is not None:
            try:
                self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.pid = None
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
