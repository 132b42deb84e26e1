"""Shared fixtures: a real server process on a free loopback port, over real storage.

Storage is parametrised: ``storage_root`` is a local directory (``local``) or a fresh prefix in a bucket of
a session-wide SeaweedFS S3 server (``s3``). A :class:`ServerProcess` on an S3 root gets that server's
endpoint and credentials, and a per-root local state directory, in its environment by itself, so tests
start servers the same way on both roots. ``data_files`` and ``root_listing`` look at either backend.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.postgres import PostgreSQL
from tests.seaweedfs import SeaweedFS

READY = re.compile(r"ready at (grpc(?:\+tls)?://127\.0\.0\.1:\d+)")
#: The HTTP port's address on the ready line (``ready at grpc://..., http http://..., root ...``).
HTTP_READY = re.compile(r"ready at \S+, http (https?://127\.0\.0\.1:\d+),")
START_TIMEOUT = 60
STORAGE_KINDS = ["local", "s3"]
#: A local root whose Iceberg catalog is a database on the session's PostgreSQL (not SQLite): modules that
#: test catalog behaviour add it to :data:`STORAGE_KINDS` (:data:`CATALOG_KINDS`).
POSTGRES_CATALOG = "local+postgres"
CATALOG_KINDS = [*STORAGE_KINDS, POSTGRES_CATALOG]
BUCKET = "lakehouse-test"


# -- S3 roots --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class S3Root:
    """An ``s3://bucket/prefix`` root on a SeaweedFS server, with the local state directory of its catalog."""

    url: str
    s3: SeaweedFS
    state_dir: Path

    @property
    def bucket(self) -> str:
        return urlparse(self.url).netloc

    @property
    def prefix(self) -> str:
        return urlparse(self.url).path.strip("/")

    def env(self) -> dict[str, str]:
        """What a server (or the CLI) needs to use this root."""
        return {**self.s3.env(self.url), "LAKEHOUSE_STATE_DIR": str(self.state_dir)}

    def objects(self) -> dict[str, int]:
        """``s3://`` URL -> size of every object under the root."""
        client = self.s3.boto3_client()
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        ):
            for item in page.get("Contents", ()):
                found[f"s3://{self.bucket}/{item['Key']}"] = int(item["Size"])
        return found

    def files(self) -> dict[str, int]:
        """Like :meth:`objects`, without directory markers (empty objects named ``.../``)."""
        return {url: size for url, size in self.objects().items() if not url.endswith("/")}

    def pending_uploads(self) -> set[str]:
        """``s3://`` URLs of the multipart uploads in progress (or abandoned) under the root."""
        client = self.s3.boto3_client()
        found: set[str] = set()
        pages = client.get_paginator("list_multipart_uploads").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        for page in pages:
            found.update(f"s3://{self.bucket}/{item['Key']}" for item in page.get("Uploads", ()))
        return found


_S3_ROOTS: dict[str, S3Root] = {}
_ROOT_NUMBERS = itertools.count()


def register_s3_root(s3: SeaweedFS, state_dir: Path, label: str = "root", bucket: str = BUCKET) -> S3Root:
    """A fresh, unique ``s3://bucket/<label>-<n>-<hex>`` root on ``s3`` (the bucket must exist)."""
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:60] or "root"
    url = f"s3://{bucket}/{slug}-{next(_ROOT_NUMBERS)}-{uuid.uuid4().hex[:8]}"
    root = S3Root(url, s3, state_dir)
    _S3_ROOTS[url] = root
    return root


def s3_root(root: str) -> S3Root:
    """The registered S3 root ``root`` (made by :func:`register_s3_root`)."""
    try:
        return _S3_ROOTS[root.rstrip("/")]
    except KeyError:
        raise AssertionError(f"{root!r} is not an S3 root made by the test fixtures") from None


def is_s3(root: str) -> bool:
    """Whether ``root`` is an S3 URL."""
    return root.startswith("s3://")


#: Root -> the catalog URI of a root whose catalog is not the default SQLite file.
_CATALOGS: dict[str, str] = {}


def register_catalog(root: str, uri: str) -> None:
    """Servers and CLI commands on ``root`` use the catalog ``uri`` (passed in the environment, where no
    ``ps`` shows its password)."""
    _CATALOGS[root.rstrip("/")] = uri


def storage_env(root: str) -> dict[str, str]:
    """The environment a server or CLI needs for ``root`` (empty for a local root on SQLite)."""
    env = s3_root(root).env() if is_s3(root) else {}
    catalog = _CATALOGS.get(root.rstrip("/"))
    return {**env, "LAKEHOUSE_CATALOG_URI": catalog} if catalog else env


def root_forms(root: str) -> list[str]:
    """Every spelling of the server's private locations that must never reach a client."""
    if is_s3(root):
        entry = s3_root(root)
        forms = [entry.url, f"{entry.bucket}/{entry.prefix}", str(entry.state_dir)]
    else:
        forms = [root, Path(root).resolve().as_posix()]
    password = urlparse(_CATALOGS.get(root.rstrip("/"), "")).password
    return [*forms, password] if password else forms


def stored_files(root: str) -> dict[str, int]:
    """Address -> size of every file under ``root``: local paths, or ``s3://`` URLs (no directory markers)."""
    if is_s3(root):
        return s3_root(root).files()
    for _ in range(10):  # the server may delete a directory while it is walked: walk again
        try:
            return {str(path): path.stat().st_size for path in Path(root).rglob("*") if path.is_file()}
        except FileNotFoundError:
            time.sleep(0.05)
    raise RuntimeError(f"files under {root} kept changing while listed")


#: The facts ``describe_dataset`` gives other engines: where a table is stored. No other result names a path.
LOCATION_KEYS = ("location", "metadata_location")


def without_locations(value: object) -> object:
    """A JSON result without the facts that say where a table is stored."""
    if isinstance(value, dict):
        return {key: item for key, item in value.items() if key not in LOCATION_KEYS}
    return value


def assert_no_root(server: ServerProcess, value: object) -> None:
    """No server path appears in a JSON result (but where ``describe_dataset`` says a table is)."""
    text = json.dumps(without_locations(value))
    for form in root_forms(server.root):
        assert form not in text, text
    assert "file://" not in text and "s3://" not in text, text


def data_files(root: str) -> set[str]:
    """Every Parquet data file under a root, by address (local path or ``s3://`` URL)."""
    return {address for address in stored_files(root) if address.endswith(".parquet")}


def pending_uploads(root: str) -> set[str]:
    """Files still being written that storage does not list yet: S3 multipart uploads (none locally)."""
    return s3_root(root).pending_uploads() if is_s3(root) else set()


def written_files(root: str) -> set[str]:
    """Parquet data files under a root, including those still being uploaded (see :func:`pending_uploads`).

    On S3 an object appears only when its upload completes; until then it is a multipart upload, which
    costs storage too and must be aborted when an ingest fails.
    """
    return data_files(root) | {url for url in pending_uploads(root) if url.endswith(".parquet")}


def root_listing(root: str) -> set[str]:
    """Everything under a root, relative to it: files on both backends, plus directories (``d/``) locally."""
    if is_s3(root):
        base = s3_root(root).url + "/"
        return {address.removeprefix(base) for address in s3_root(root).objects()}
    return {
        path.relative_to(root).as_posix() + ("/" if path.is_dir() else "") for path in Path(root).rglob("*")
    }


def wait_until(condition: Callable[[], object], timeout: float = 15.0, interval: float = 0.1) -> bool:
    """Poll ``condition`` until it is true or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return bool(condition())


# -- server processes ------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A ``flight-lakehouse serve`` child process and a Flight client connected to it.

    The environment is ours, then what the root needs (:func:`storage_env`), then ``env``. ``tls_root``
    (PEM) is what :attr:`client` trusts, for a server started with ``--tls-cert``.
    """

    root: str
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    tls_root: bytes | None = None
    process: subprocess.Popen[str] | None = None
    location: str = ""
    #: The HTTP port's base URL ("" when it is off)
    http_url: str = ""
    log_lines: list[str] = field(default_factory=list)
    _client: flight.FlightClient | None = None

    def start(self) -> ServerProcess:
        """Start the server and wait for its ready line."""
        command = [
            sys.executable,
            "-m",
            "flight_lakehouse",
            "serve",
            "--root",
            self.root,
            "--port",
            "0",
            "--http-port",  # a free one: the default 8816 would collide between parallel servers
            "0",
            *self.extra_args,
        ]
        self.location = self.http_url = ""
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **storage_env(self.root), **self.env},
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.process, ready), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.location:
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log_lines[-30:]))
        self._client = None
        return self

    def _pump(self, process: subprocess.Popen[str], ready: threading.Event) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self.log_lines.append(line.rstrip())
            match = READY.search(line)
            if match:
                http = HTTP_READY.search(line)
                self.http_url = http.group(1) if http else ""
                self.location = match.group(1)
                ready.set()
        ready.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def client(self) -> flight.FlightClient:
        """A Flight client for this server (reconnected after a restart)."""
        if self._client is None:
            tls = {"tls_root_certs": self.tls_root} if self.tls_root else {}
            self._client = flight.connect(self.location, **tls)
        return self._client

    def action(self, name: str, body: dict | None = None) -> object:
        """Run an action and decode its JSON result."""
        results = list(self.client.do_action(flight.Action(name, json.dumps(body or {}).encode())))
        return json.loads(results[0].body.to_pybytes())

    def put(self, dataset: str | None, table: pa.Table, batch_rows: int = 50_000, **options: object) -> dict:
        """DoPut ``table`` (a path descriptor when no options are given); returns the PutResult JSON."""
        if options or dataset is None:
            command = {"ingest": {"dataset": dataset, **options}}
            descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        else:
            descriptor = flight.FlightDescriptor.for_path(dataset)
        writer, reader = self.client.do_put(descriptor, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
            writer.done_writing()
            result = reader.read()
        return json.loads(result.to_pybytes())

    def sql(self, query: str) -> pa.Table:
        """Run SQL through DoGet and read the whole (small, in tests) result."""
        return self.client.do_get(flight.Ticket(json.dumps({"sql": query}).encode())).read_all()

    def ticket(self, body: dict) -> pa.Table:
        """DoGet any JSON ticket."""
        return self.client.do_get(flight.Ticket(json.dumps(body).encode())).read_all()

    def stop(self) -> int | None:
        """SIGTERM by pid, wait, and return the exit code."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL by pid."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(30)

    def restart(self) -> ServerProcess:
        """Stop and start again on the same root."""
        self.stop()
        return self.start()


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One SeaweedFS S3 server for the session (started on first use), with the bucket ``lakehouse-test``.

    Tests that stop or break S3 start their own instance instead.
    """
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs") / "data") as s3:
        yield s3


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgreSQL]:
    """One PostgreSQL server for the session (started on first use); tests make a database each."""
    with PostgreSQL() as server:
        yield server


def postgres_catalog(request: pytest.FixtureRequest) -> str:
    """The URI of a fresh, empty database on the session's PostgreSQL."""
    server: PostgreSQL = request.getfixturevalue("postgres")
    return server.create_database(f"catalog_{uuid.uuid4().hex[:12]}")


def make_root(request: pytest.FixtureRequest, kind: str, base: Path, label: str) -> str:
    """A fresh data root of ``kind``: ``base/lakehouse`` (with its catalog on PostgreSQL for
    :data:`POSTGRES_CATALOG`), or a unique prefix in the session bucket."""
    if kind == "local":
        return str(base / "lakehouse")
    if kind == POSTGRES_CATALOG:
        root = str(base / "lakehouse")
        register_catalog(root, postgres_catalog(request))
        return root
    if kind == "s3":
        s3: SeaweedFS = request.getfixturevalue("seaweedfs")
        return register_s3_root(s3, base / "state", label).url
    raise ValueError(f"unknown storage kind {kind!r}")


@pytest.fixture(params=STORAGE_KINDS)
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The data root of a test server (parametrised over the storage backends)."""
    return make_root(request, request.param, tmp_path, request.node.name)


@contextlib.contextmanager
def running_server(root: str, *extra_args: str) -> Iterator[ServerProcess]:
    """A server on ``root`` for the duration of the block, stopped (by pid) at its end."""
    process = ServerProcess(root, list(extra_args))
    try:
        yield process.start()
    finally:
        process.stop()
        process.kill()


@contextlib.contextmanager
def running_seaweedfs(data_dir: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS with the bucket ``lakehouse-test`` for the duration of the block, stopped by pid."""
    # An access key id unlike any bucket or key name, so that tests can look for it in what clients see.
    s3 = SeaweedFS(data_dir, access_key=f"AKID{uuid.uuid4().hex[:16]}")
    s3.start()
    try:
        s3.create_bucket(BUCKET)
        yield s3
    finally:
        s3.stop()


def assert_refusal(exc: pytest.ExceptionInfo[BaseException], server: ServerProcess, *fragments: str) -> str:
    """The refusal names every fragment and leaks neither a traceback nor the server's root."""
    message = str(exc.value)
    assert "Traceback" not in message, message
    for form in root_forms(server.root):
        assert form not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def assert_already_exists(
    exc: pytest.ExceptionInfo[BaseException], server: ServerProcess, *fragments: str
) -> str:
    """ALREADY_EXISTS as this server sends it: its ``AlreadyExists`` error (an INVALID_ARGUMENT whose detail
    names the class, or whose message says 'already exists'), never NOT_FOUND; fragments match any case."""
    assert not isinstance(exc.value, pa.ArrowKeyError), exc.value
    message = assert_refusal(exc, server)
    assert "AlreadyExists" in message or "already exists" in message.lower(), message
    for fragment in fragments:
        assert fragment.lower() in message.lower(), f"{fragment!r} not in {message!r}"
    return message


@pytest.fixture
def server(storage_root: str) -> Iterator[ServerProcess]:
    """A fresh server on a free loopback port, stopped (by pid) after the test."""
    with running_server(storage_root) as process:
        yield process


@pytest.fixture
def start_server(storage_root: str) -> Iterator:
    """Factory for servers with extra flags; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, root: str | None = None) -> ServerProcess:
        process = ServerProcess(root or storage_root, list(extra_args), env or {})
        started.append(process)
        return process.start()

    yield start
    for process in started:
        process.stop()
        process.kill()


# -- vector tables ---------------------------------------------------------------------------------------


def vector_array(vectors: object, value_type: pa.DataType | None = None) -> pa.FixedSizeListArray:
    """The rows of a 2-D array-like as a ``fixed_size_list<value_type>[dim]`` array (float32 by default)."""
    value_type = value_type or pa.float32()
    matrix = np.asarray(vectors, dtype=value_type.to_pandas_dtype())
    if matrix.ndim != 2:
        raise ValueError(f"vectors must be 2-D, not {matrix.shape}")
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.ravel(), value_type), matrix.shape[1])


def assert_same_rows(actual: pa.Table, expected: pa.Table) -> None:
    """The same rows in the same order; ``_distance`` equal up to float rounding (searches served from
    memory and from Lance compute it with different kernels)."""
    assert actual.column_names == expected.column_names
    others = [name for name in expected.column_names if name != "_distance"]
    assert actual.select(others).to_pylist() == expected.select(others).to_pylist()
    if "_distance" in expected.column_names:
        np.testing.assert_allclose(
            actual.column("_distance").to_numpy(),
            expected.column("_distance").to_numpy(),
            rtol=1e-5,
            atol=1e-5,
        )


def search(server: ServerProcess, body: dict) -> pa.Table:
    """The ``vector_search`` action: its one result is an Arrow IPC stream, read whole."""
    results = list(server.client.do_action(flight.Action("vector_search", json.dumps(body).encode())))
    assert len(results) == 1, f"vector_search gave {len(results)} results"
    return pa.ipc.open_stream(results[0].body.to_pybytes()).read_all()


def index_entry(server: ServerProcess, dataset: str, column: str) -> dict | None:
    """The ``describe_dataset`` entry of the index on ``column``, or None."""
    described = server.action("describe_dataset", {"dataset": dataset})
    assert isinstance(described, dict)
    return next((entry for entry in described.get("indexes", []) if entry.get("column") == column), None)


def wait_for_index(server: ServerProcess, dataset: str, column: str, timeout: float = 120.0) -> dict:
    """Poll ``describe_dataset`` until the index on ``column`` is ready; fail on 'failed' or timeout."""
    deadline = time.monotonic() + timeout
    entry = None
    while time.monotonic() < deadline:
        entry = index_entry(server, dataset, column)
        if entry is not None and entry.get("state") == "ready":
            return entry
        assert entry is None or entry.get("state") != "failed", f"index build failed: {entry}"
        time.sleep(0.2)
    raise AssertionError(f"index on {dataset}.{column} not ready after {timeout} s: {entry}")


def serving(server: ServerProcess, dataset: str) -> dict:
    """The ``serving`` facts of ``describe_dataset`` (how a Lance table's searches are served)."""
    described = server.action("describe_dataset", {"dataset": dataset})
    assert isinstance(described, dict) and isinstance(described.get("serving"), dict), described
    return described["serving"]


def wait_for_serving(
    server: ServerProcess,
    dataset: str,
    state: str = "warm",
    source: str | None = "memory",
    timeout: float = 60.0,
) -> dict:
    """Poll ``describe_dataset`` until its ``serving`` has ``state`` (and ``from`` == ``source`` unless None);
    fail on state 'failed' (unless waited for) or timeout. Returns the whole ``describe_dataset`` result."""
    deadline = time.monotonic() + timeout
    described: dict = {}
    while time.monotonic() < deadline:
        described = server.action("describe_dataset", {"dataset": dataset})  # type: ignore[assignment]
        facts = described.get("serving") or {}
        if facts.get("state") == state and (source is None or facts.get("from") == source):
            return described
        assert state == "failed" or facts.get("state") != "failed", f"serving {dataset} failed: {facts}"
        time.sleep(0.05)
    raise AssertionError(
        f"{dataset} not {state} (from {source}) after {timeout} s: {described.get('serving')}"
    )
