"""Storage faults (issue 18, point 5): a full disk under a local root, the SQLite catalog locked by another
process, a root turned read-only, and S3 answering slowly.

The full disk is a small tmpfs root (mounting one needs root: skipped otherwise). With the disk full, an
upload gets a clear one-line UNAVAILABLE naming the cause, commits nothing and leaves no file behind; once
space is freed the same server takes the same upload without a restart. The catalog locked by another
process (a ``BEGIN EXCLUSIVE`` held open) is UNAVAILABLE too (it was INTERNAL), and the server commits again
once the lock is gone. A read-only root is a bind mount of the root over itself remounted read-only while
the server runs (file modes do not stop root, a read-only mount does; the root's own file system cannot be
remounted while the server holds its catalog open for writing). Slow S3 is a delaying TCP proxy between
the server and SeaweedFS. (S3 stopped mid-upload is in ``tests/test_s3.py``.)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    ServerProcess,
    assert_refusal,
    data_files,
    register_s3_root,
    root_listing,
    vector_array,
    wait_until,
)
from tests.seaweedfs import SeaweedFS

DISK_MB = 24
KEEP_FREE_BYTES = 256 << 10


def rows(count: int, seed: int) -> pa.Table:
    """Incompressible rows: ``count`` random ids and values (16 bytes a row on disk)."""
    rng = np.random.default_rng(seed)
    return pa.table({"id": pa.array(rng.integers(0, 2**62, count)), "v": pa.array(rng.random(count))})


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of :data:`DISK_MB` MB, unmounted after the test."""
    disk = tmp_path / "disk"
    disk.mkdir()
    with mounted(disk, "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs"):
        yield disk


@contextlib.contextmanager
def mounted(folder: Path, *how: str) -> Iterator[Path]:
    """``mount HOW FOLDER`` (mounting needs root: the test is skipped otherwise), unmounted after."""
    done = subprocess.run(["mount", *how, str(folder)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here ({' '.join(how)}): {done.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """A file taking all but :data:`KEEP_FREE_BYTES` of the disk's free space."""
    filler = disk / "filler"
    with filler.open("wb") as out:
        out.truncate(0)
        remaining = shutil.disk_usage(disk).free - KEEP_FREE_BYTES
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            remaining -= out.write(chunk[: min(len(chunk), remaining)])
    os.sync()
    return filler


def test_full_disk_refuses_cleanly_and_recovers(small_disk: Path) -> None:
    root = str(small_disk / "lakehouse")
    server = ServerProcess(root, env={"LAKEHOUSE_TARGET_FILE_MB": "1", "LAKEHOUSE_ROW_GROUP_ROWS": "8192"})
    server.start()
    try:
        server.put("events", rows(1000, 1))
        before_files = data_files(root)
        filler = fill(small_disk)
        upload = rows(200_000, 2)  # 3 MB: far more than the space left
        with pytest.raises(flight.FlightUnavailableError) as info:
            server.put("events", upload, expected_rows=upload.num_rows)
        message = assert_refusal(info, server, "No space left on device").split(". Detail:")[0]
        assert "\n" not in message, message
        assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 1000}]
        assert data_files(root) == before_files, "the failed upload left files"

        filler.unlink()  # the fault ends: the same server, no restart
        assert server.put("events", upload, expected_rows=upload.num_rows)["rows_written"] == 200_000
        assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 201_000}]
    finally:
        server.stop()
        server.kill()


def test_catalog_locked_by_another_process(tmp_path: Path) -> None:
    """Another process holds the SQLite catalog's write lock: an upload waits, then fails cleanly, commits
    nothing; once the lock is released the same server commits."""
    root = tmp_path / "lakehouse"
    server = ServerProcess(str(root))
    server.start()
    try:
        server.put("events", rows(1000, 1))
        before_files = data_files(str(root))
        locker = subprocess.Popen(
            [sys.executable, "-c", LOCK_CATALOG, str(root / "catalog.db")], stdout=subprocess.PIPE, text=True
        )
        try:
            assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
            with pytest.raises(pa.ArrowException) as info:
                server.put("events", rows(500, 2), expected_rows=500)
            assert isinstance(info.value, flight.FlightUnavailableError), info.value
            assert "\n" not in assert_refusal(info, server, "database is locked").split(". Detail:")[0]
        finally:
            locker.kill()  # by its pid: the lock goes with it
            locker.wait(30)
        assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 1000}]
        assert data_files(str(root)) == before_files, "the failed commit left its data files"
        assert server.put("events", rows(500, 2), expected_rows=500)["rows_written"] == 500
        assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 1500}]
    finally:
        server.stop()
        server.kill()


LOCK_CATALOG = """
import sqlite3, sys, time
connection = sqlite3.connect(sys.argv[1], isolation_level=None)
connection.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(600)
"""


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,bind,{mode}", str(folder)], check=True, capture_output=True)


def test_read_only_root_refuses_writes_and_recovers(tmp_path: Path) -> None:
    """The root's file system turns read-only under a running server: an append (Parquet and Lance) gets
    one clear UNAVAILABLE line naming the cause and commits nothing, reads go on, /readyz says why; once the
    file system is writable again the same server takes the same uploads."""
    root = tmp_path / "lakehouse"
    server = ServerProcess(str(root))
    server.start()
    try:
        server.put("events", rows(1000, 1))
        server.put("vecs", vectors(100, 0), mode="create")
        before_files = root_listing(str(root))
        # a mount made while the server runs has no file open for writing on it, so it can be made
        # read-only; the server's later opens by path go through it (its catalog's open file does not)
        with mounted(root, "--bind", str(root)):
            remount(root, "ro")
            for name, upload in faulted_uploads():
                with pytest.raises(flight.FlightUnavailableError) as info:
                    server.put(name, upload, expected_rows=upload.num_rows)
                message = assert_refusal(info, server, "Read-only file system").split(". Detail:")[0]
                assert "\n" not in message, message
            assert_counts(server, 1000, 100)
            assert wait_until(lambda: readyz(server)[0] == 503, timeout=5), readyz(server)
            assert readyz(server)[1] == {"status": "not ready", "reason": "the root is read-only"}

            remount(root, "rw")  # the fault ends: the same server, no restart
            assert wait_until(lambda: readyz(server)[0] == 200, timeout=5), readyz(server)
            assert root_listing(str(root)) == before_files, "the refused uploads left files"
            assert_recovers(server)
    finally:
        server.stop()
        server.kill()


def assert_counts(server: ServerProcess, events: int, vecs: int) -> None:
    """The rows of the Parquet dataset ``events`` and of the Lance table ``vecs``."""
    assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": events}]
    assert server.sql("SELECT count(*) AS n FROM vecs").to_pylist() == [{"n": vecs}]


def faulted_uploads() -> list[tuple[str, pa.Table]]:
    """The uploads a fault refuses and the recovered server then takes: to each dataset of a test."""
    return [("events", rows(500, 2)), ("vecs", vectors(50, 100))]


def assert_recovers(server: ServerProcess) -> None:
    """The uploads the fault refused are taken, and the datasets hold exactly the rows committed."""
    for name, upload in faulted_uploads():
        assert server.put(name, upload, expected_rows=upload.num_rows)["rows_written"] == upload.num_rows
    assert_counts(server, 1500, 150)


def vectors(count: int, first: int) -> pa.Table:
    """``count`` rows of a Lance table: ids from ``first`` and 8-dimensional vectors."""
    values = np.random.default_rng(first).random((count, 8), dtype=np.float32)
    return pa.table({"id": pa.array(range(first, first + count)), "vec": vector_array(values)})


def readyz(server: ServerProcess) -> tuple[int, object]:
    """``/readyz``: its status and JSON body."""
    try:
        with urllib.request.urlopen(f"{server.http_url}/readyz", timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read())


class SlowProxy:
    """A TCP proxy on a free loopback port in front of ``upstream`` (``host:port``) that holds every chunk a
    client sends for :attr:`delay` seconds before passing it on: S3 answering slowly."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.delay = 0.0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._open: list[socket.socket] = []
        self._stopped = threading.Event()
        self._accepting = threading.Thread(target=self._accept, name="slow-proxy", daemon=True)
        self._accepting.start()

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, delayed: bool) -> None:
        try:
            while data := source.recv(1 << 16):
                if delayed and self.delay:
                    time.sleep(self.delay)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stopped.set()
        self._listener.close()
        self._accepting.join(5)
        for end in self._open:
            end.close()


#: S3 settings under which a request left unanswered for a second fails, tried twice.
QUICK_S3 = {
    "LAKEHOUSE_S3_CONNECT_TIMEOUT_SECONDS": "1",
    "LAKEHOUSE_S3_REQUEST_TIMEOUT_SECONDS": "1",
    "LAKEHOUSE_S3_MAX_ATTEMPTS": "2",
}
#: How long a call may take while S3 is slow: its requests fail after QUICK_S3's timeouts, a few in turn.
SLOW_CALL_BOUND = 45.0


def test_slow_s3_fails_calls_within_the_timeouts_and_recovers(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """S3 behind a proxy that delays every request by 3 s, beyond the server's 1 s request timeout: an
    upload (Parquet and Lance) ends within a bound with one clear UNAVAILABLE line and commits nothing, a
    query ends within the bound (answered from the local copies, or refused cleanly), /readyz says S3 is
    unreachable; once S3 answers promptly again the same server takes the same uploads."""
    root = register_s3_root(seaweedfs, tmp_path / "state", "slow")
    proxy = SlowProxy(seaweedfs.endpoint.removeprefix("http://"))
    server = ServerProcess(root.url, env={**QUICK_S3, "LAKEHOUSE_S3_ENDPOINT": proxy.endpoint})
    try:
        server.start()
        server.put("events", rows(1000, 1))
        server.put("vecs", vectors(100, 0), mode="create")
        proxy.delay = 3.0
        for name, upload in faulted_uploads():
            started = time.monotonic()
            with pytest.raises(flight.FlightUnavailableError) as info:
                server.put(name, upload, expected_rows=upload.num_rows)
            assert time.monotonic() - started < SLOW_CALL_BOUND
            message = assert_refusal(info, server).split(". Detail:")[0]
            assert "\n" not in message and root.prefix not in message, message
        started = time.monotonic()
        with contextlib.suppress(flight.FlightUnavailableError):
            assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 1000}]
        assert time.monotonic() - started < SLOW_CALL_BOUND
        status, body = readyz(server)
        assert status == 503 and "storage is unreachable" in str(body), body

        proxy.delay = 0.0  # the fault ends: the same server, no restart
        assert wait_until(lambda: readyz(server)[0] == 200, timeout=15), readyz(server)
        assert_counts(server, 1000, 100)
        assert_recovers(server)
    finally:
        server.stop()
        server.kill()
        proxy.close()
