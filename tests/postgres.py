"""A real PostgreSQL server for tests: Debian's packages, on a free loopback port, data in a temp dir.

``initdb`` and ``postgres`` refuse to run as root. Tests run as root in CI, so then both run as an
unprivileged user (Debian's ``postgres``, made by the package), and the data directory is a fresh
directory in the system temp dir owned by that user (pytest's temp dirs are private to root). Otherwise
they run as the current user.

The cluster has one role, ``lakehouse``, with a password: TCP connections on 127.0.0.1 need it
(scram-sha-256), so tests can check that the password never shows in a server's log or error. It runs
with ``fsync=off``: a test cluster need not survive a power cut, and commits are ~10x faster.

Typical use::

    pg = PostgreSQL().start()
    try:
        uri = pg.create_database("catalog")  # postgresql+psycopg://lakehouse:...@127.0.0.1:PORT/catalog
    finally:
        pg.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from tests.seaweedfs import _die_with_parent_hook, free_port

ROLE = "lakehouse"
#: Debian's postgresql package makes this user; the cluster runs as it when the tests run as root.
SYSTEM_USER = "postgres"
LOG_NAME = "postgres.log"

_RUNNING: set[PostgreSQL] = set()


def _stop_all() -> None:
    """Stop every cluster this interpreter started and did not stop (atexit hook)."""
    for server in list(_RUNNING):
        server.stop()


atexit.register(_stop_all)


class PostgreSQLUnavailable(RuntimeError):
    """No PostgreSQL binaries (Debian: ``apt-get install postgresql``)."""


def bin_dir() -> Path:
    """The newest ``/usr/lib/postgresql/<version>/bin`` holding ``initdb`` (Debian keeps them off PATH)."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).parent
    raise PostgreSQLUnavailable("PostgreSQL is not installed (initdb not found); apt-get install postgresql")


class PostgreSQL:
    """One PostgreSQL cluster for tests; :meth:`stop` ends it by its pid and deletes its files."""

    def __init__(self) -> None:
        self.password = secrets.token_urlsafe(18)
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._log: object = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(SYSTEM_USER)
            self._user: dict[str, object] = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
            self._owner: tuple[int, int] | None = (entry.pw_uid, entry.pw_gid)
        else:
            self._user, self._owner = {}, None

    # -- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> PostgreSQL:
        """initdb a fresh cluster, start it on a free port and wait until it accepts connections."""
        binaries = bin_dir()
        self.dir = Path(tempfile.mkdtemp(prefix="lakehouse-pg-"))
        if self._owner is not None:
            os.chown(self.dir, *self._owner)
        data, sockets = self.dir / "data", self.dir / "sockets"
        password_file = self.dir / "password"
        password_file.write_text(self.password + "\n")
        sockets.mkdir()
        for path in (password_file, sockets):
            if self._owner is not None:
                os.chown(path, *self._owner)
        self._run(
            [
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                ROLE,
                f"--pwfile={password_file}",
                "--auth-host=scram-sha-256",
                "--auth-local=trust",
                "--encoding=UTF8",
                "--no-sync",
            ]
        )
        password_file.unlink()
        self.port = free_port()
        self._log = open(self.dir / LOG_NAME, "ab")  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [
                str(binaries / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-k",
                str(sockets),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
                "-c",
                "max_connections=200",
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent_hook(),  # runs after the switch of user: PDEATHSIG stays set
            **self._user,  # type: ignore[arg-type]
        )
        _RUNNING.add(self)
        self._wait_ready(timeout)
        return self

    def _run(self, command: list[str]) -> None:
        result = subprocess.run(command, capture_output=True, text=True, check=False, **self._user)  # type: ignore[call-overload]
        if result.returncode != 0:
            raise RuntimeError(f"{Path(command[0]).name} failed:\n{result.stdout}\n{result.stderr}")

    def _wait_ready(self, timeout: float) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"postgres exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                psycopg.connect(self.dsn("postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"postgres did not start:\n{self.log_tail()}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) by pid, SIGKILL if it lingers; then delete the cluster's files."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            os.kill(process.pid, signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(10)
        if self._log is not None:
            self._log.close()  # type: ignore[attr-defined]
            self._log = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        _RUNNING.discard(self)

    def __enter__(self) -> PostgreSQL:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 40) -> str:
        if self.dir is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join((self.dir / LOG_NAME).read_text(errors="replace").splitlines()[-lines:])
        return ""

    # -- databases -------------------------------------------------------------------------------
    def dsn(self, database: str) -> str:
        """A libpq connection string of ``database`` (TCP, with the password)."""
        return f"host=127.0.0.1 port={self.port} user={ROLE} password={self.password} dbname={database}"

    def uri(self, database: str) -> str:
        """The SQLAlchemy URI of ``database``, as ``--catalog-uri`` takes it."""
        return f"postgresql+psycopg://{ROLE}:{self.password}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """Create an empty database; returns its SQLAlchemy URI."""
        import psycopg

        with psycopg.connect(self.dsn("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.uri(name)
