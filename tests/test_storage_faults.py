"""Storage faults (issue 18, point 5): a full disk under a local root, and the SQLite catalog locked by
another process.

The full disk is a small tmpfs root (mounting one needs root: skipped otherwise). With the disk full, an
upload gets a clear one-line UNAVAILABLE naming the cause, commits nothing and leaves no file behind; once
space is freed the same server takes the same upload without a restart. The catalog locked by another
process (a ``BEGIN EXCLUSIVE`` held open) is UNAVAILABLE too (it was INTERNAL), and the server commits again
once the lock is gone. (S3 stopped mid-upload is in ``tests/test_s3.py``; a read-only root could not be made
here: this runs as root, which file modes do not stop, and a tmpfs cannot be remounted read-only while the
server holds its catalog open for writing.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import ServerProcess, assert_refusal, data_files

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
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


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
