"""A throwaway PostgreSQL server for tests: ``initdb`` in a temp dir, ``pg_ctl`` start, unix socket only.

Never the system's cluster: the server listens on no TCP address, only on a socket in its own
temp dir, runs as an unprivileged user (``postgres`` when the package made it, else ``nobody``)
when the tests run as root, and is stopped and removed by :meth:`PostgresServer.stop`.
Durability is off (``fsync``, ``full_page_writes``): a test database need not survive a crash.

The fixtures ``postgres_server`` (session) and ``postgres_url`` (a fresh database per test) in
``cube_core.testing.pytest_plugin`` use it.
"""

from __future__ import annotations

import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import quote

SERVER_ROOT = Path("/usr/lib/postgresql")  # Debian: /usr/lib/postgresql/<version>/bin, not on PATH
SUPERUSER = "cube"


class PostgresMissingError(RuntimeError):
    """The PostgreSQL server programs are not installed."""


def server_program(name: str) -> str:
    """Path of the server program ``name`` (``initdb``, ``pg_ctl``) of the newest PostgreSQL here."""
    def version(path: Path) -> int:
        return int(path.parts[-3]) if path.parts[-3].isdigit() else 0

    found = sorted(SERVER_ROOT.glob(f"*/bin/{name}"), key=version)
    if found:
        return str(found[-1])
    on_path = shutil.which(name)
    if on_path:
        return on_path
    raise PostgresMissingError(
        f"PostgreSQL's {name} is neither in {SERVER_ROOT}/<version>/bin nor on PATH: the tests of the "
        "PostgreSQL state store need a real server; install it with `bash scripts/install-host.sh` "
        "(Debian's postgresql package, named in scripts/apt-packages.txt)")


class PostgresServer:
    """One server in a temp dir; :meth:`start`, then :meth:`create_database` per test, :meth:`stop`."""

    def __init__(self) -> None:
        self.dir: Path | None = None
        self._names = itertools.count(1)
        self._as_user: list[str] = []

    @property
    def socket_dir(self) -> Path:
        assert self.dir is not None, "start() first"
        return self.dir

    def url(self, dbname: str = "postgres") -> str:
        """``postgresql://cube@/<db>?host=<socket dir>``: libpq's URL form of a unix socket."""
        return f"postgresql://{SUPERUSER}@/{dbname}?host={quote(str(self.socket_dir), safe='')}"

    def _run(self, argv: list[str]) -> None:
        assert self.dir is not None
        out = subprocess.run([*self._as_user, *argv], cwd=self.dir, capture_output=True, text=True, timeout=60)
        if out.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise RuntimeError(f"{Path(argv[0]).name} failed ({out.returncode}): {out.stderr.strip()}\n{tail}")

    def start(self) -> None:
        initdb, pg_ctl = server_program("initdb"), server_program("pg_ctl")
        self.dir = Path(tempfile.mkdtemp(prefix="cube-pg-"))  # short: a socket path has ~107 bytes
        if os.geteuid() == 0:  # initdb refuses root: run the server as an unprivileged user
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                user = pwd.getpwnam("nobody")
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
        data = self.dir / "data"
        try:
            self._run([initdb, "-D", str(data), "-U", SUPERUSER, "--auth=trust", "--no-sync",
                       "--encoding=UTF8", "--locale=C.UTF-8"])
            options = (f"-c listen_addresses='' -c unix_socket_directories='{self.dir}' -c fsync=off "
                       "-c synchronous_commit=off -c full_page_writes=off -c max_connections=100")
            self._run([pg_ctl, "-D", str(data), "-l", str(self.dir / "server.log"), "-o", options,
                       "-w", "-t", "30", "start"])
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (if it runs) and remove its directory."""
        if self.dir is None:
            return
        try:
            if (self.dir / "data" / "postmaster.pid").exists():
                self._run([server_program("pg_ctl"), "-D", str(self.dir / "data"), "-m", "immediate", "-w",
                           "stop"])
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def create_database(self) -> str:
        """A new, empty database; its URL."""
        import psycopg

        name = f"test_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop the database of ``url``, disconnecting whoever still uses it."""
        import psycopg

        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
