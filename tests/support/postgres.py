"""A throwaway PostgreSQL cluster for the hub's database tests (the server from Debian's `postgresql`).

    with postgres_cluster() as cluster:
        url = cluster.create_database()   # postgresql+asyncpg://postgres@127.0.0.1:PORT/xiaozhi_...

initdb into a fresh temporary directory, a server on 127.0.0.1 (free port; its unix socket in that
directory; fsync off: nothing here must survive a crash), stopped and removed afterwards, whatever
happened. initdb refuses root, so as root everything runs as the `postgres` system user.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Iterator

START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    pass


def postgres_bindir() -> Path:
    """The server binaries: `pg_config --bindir` (when it belongs to a server), else /usr/lib/postgresql/*/bin."""
    candidates: list[Path] = []
    if shutil.which("pg_config"):
        try:
            out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=False)
            if out.returncode == 0 and out.stdout.strip():
                candidates.append(Path(out.stdout.strip()))
        except (OSError, subprocess.SubprocessError):
            pass
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    candidates += [Path(p) for p in versions]
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "pg_isready", "psql", "postgres")):
            return bindir
    raise PostgresUnavailable(
        "no PostgreSQL server found (tried `pg_config --bindir` and /usr/lib/postgresql/*/bin): "
        "the hub's PostgreSQL tests need it; install the Debian package `postgresql` (scripts/setup.sh does)"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, bindir: Path, root: Path, port: int, as_user: list[str]) -> None:
        self.bindir, self.root, self.port, self._as_user = bindir, root, port, as_user
        self.data = root / "data"
        self.log = root / "server.log"
        self.user = "postgres"

    def run(self, tool: str, *args: str, timeout: float = START_TIMEOUT_S) -> subprocess.CompletedProcess:
        """Run a PostgreSQL tool (as the cluster's owner); raises with its output when it fails."""
        cmd = [*self._as_user, str(self.bindir / tool), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=self.root, check=False)
        if done.returncode != 0:
            log = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
            raise PostgresUnavailable(
                f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stdout}{done.stderr}\nserver log:\n{log}"
            )
        return done

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{self.user}@127.0.0.1:{self.port}/{database}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self.run(
            "psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", str(self.root), "-p", str(self.port),
            "-U", self.user, "-d", database, "-At", "-c", sql,
        ).stdout

    def create_database(self, name: str | None = None) -> str:
        """A new empty database (unique name unless given); its SQLAlchemy async URL."""
        name = name or f"xiaozhi_{uuid.uuid4().hex[:12]}"
        self.psql(f'CREATE DATABASE "{name}"')
        return self.url(name)


@contextmanager
def postgres_cluster() -> Iterator[Cluster]:
    bindir = postgres_bindir()
    as_root = os.geteuid() == 0
    # Short path: the unix socket's path must fit in 107 bytes. /tmp, so `postgres` can reach it as root.
    root = Path(tempfile.mkdtemp(prefix="xiaozhi-pg-", dir="/tmp" if as_root else None))
    as_user: list[str] = []
    if as_root:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root, ignore_errors=True)
            raise PostgresUnavailable("running as root, but there is no `postgres` system user to run initdb as")
        os.chown(root, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    cluster = Cluster(bindir, root, _free_port(), as_user)
    started = False
    try:
        cluster.run(
            "initdb", "-D", str(cluster.data), "-U", cluster.user, "--auth=trust", "--encoding=UTF8",
            "--locale=C.UTF-8", "--no-sync",
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {cluster.port} -c unix_socket_directories={root} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
            # Not UTC, as on a server in the agency's own zone: the hub must not depend on the session time zone.
            "-c timezone=Asia/Shanghai"
        )
        started = True  # from here on, stop it even if start reports a failure
        cluster.run("pg_ctl", "start", "-D", str(cluster.data), "-l", str(cluster.log), "-w",
                    "-t", str(START_TIMEOUT_S), "-o", options)
        cluster.run("pg_isready", "-h", "127.0.0.1", "-p", str(cluster.port), "-t", str(START_TIMEOUT_S))
        yield cluster
    finally:
        if started:
            try:
                cluster.run("pg_ctl", "stop", "-D", str(cluster.data), "-m", "immediate", "-w")
            except (PostgresUnavailable, subprocess.SubprocessError):
                pass
        shutil.rmtree(root, ignore_errors=True)
