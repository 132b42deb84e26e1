"""The read-through cache of an S3 root's data files (``file_cache.py``), on its own.

Files come from a real source: a local directory (each test counts the files it opens) or the session's
SeaweedFS through ``S3Storage.open_file``, as the server reads them. The server-level behaviour (queries on
an S3 root read local copies; S3 down) is in ``test_s3.py``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flight_lakehouse.file_cache import DIRECTORY_PREFIX, FileCache
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import S3Storage
from tests.conftest import BUCKET
from tests.seaweedfs import SeaweedFS

SIZE = 1000


class Broken(io.BytesIO):
    """A file whose reads fail once ``good`` bytes were read (a connection lost mid-download)."""

    def __init__(self, data: bytes, good: int) -> None:
        super().__init__(data)
        self.good = good

    def read(self, size: int | None = -1) -> bytes:
        if self.tell() >= self.good:
            raise OSError("connection reset while reading")
        return super().read(
            min(size if size is not None and size >= 0 else self.good, self.good - self.tell())
        )


class Source:
    """Files in a local directory, opened by name; counts the opens; may hold them at a gate or fail."""

    def __init__(self, directory: Path, names: list[str]) -> None:
        self.directory = directory
        self.opened: Counter[str] = Counter()
        self.gate = threading.Event()
        self.gate.set()
        self.fail_after: int | None = None  # bytes read before an OSError
        for name in names:
            (directory / name).write_bytes(name.encode()[:1] * SIZE)

    def open_file(self, uri: str) -> pa.NativeFile:
        self.opened[uri] += 1
        self.gate.wait(10)
        if self.fail_after is not None:
            return pa.PythonFile(Broken((self.directory / uri).read_bytes(), self.fail_after), mode="r")
        return pa.OSFile(str(self.directory / uri))


@pytest.fixture
def source(tmp_path: Path) -> Source:
    (tmp_path / "source").mkdir()
    return Source(tmp_path / "source", ["a", "b", "c", "d"])


def cache(tmp_path: Path, source: Source, max_bytes: int) -> FileCache:
    return FileCache(tmp_path / "cache", max_bytes, source.open_file)


def kept(files: FileCache, names: str) -> list[bool]:
    """Whether each of ``names`` (one letter each) has a local copy now."""
    return [Path(files.path(name)).exists() for name in names]


def test_a_copy_is_fetched_once_and_read_locally(tmp_path: Path, source: Source) -> None:
    files = cache(tmp_path, source, 10 * SIZE)
    try:
        for _ in range(3):
            files.hold(["a", "b", "a"]).release()
        assert Path(files.path("a")).read_bytes() == b"a" * SIZE
        assert source.opened == {"a": 1, "b": 1}
        assert files.used == 2 * SIZE
        assert files.path("a") != files.path("b") and files.path("a").startswith(str(files.directory))
    finally:
        files.close()
    assert not files.directory.exists()


def test_concurrent_holds_of_one_file_download_it_once(tmp_path: Path, source: Source) -> None:
    files = cache(tmp_path, source, 10 * SIZE)
    source.gate.clear()  # every hold starts before the download can end
    holds: list[object] = []
    threads = [threading.Thread(target=lambda: holds.append(files.hold(["a", "b"]))) for _ in range(6)]
    for thread in threads:
        thread.start()
    source.gate.set()
    for thread in threads:
        thread.join(10)
    try:
        assert len(holds) == 6
        assert source.opened == {"a": 1, "b": 1}
    finally:
        files.close()


def test_a_partial_download_is_never_visible_and_is_fetched_again(tmp_path: Path, source: Source) -> None:
    files = cache(tmp_path, source, 10 * SIZE)
    try:
        source.fail_after = SIZE // 2
        with pytest.raises(OSError, match="connection reset"):
            files.hold(["a"])
        assert kept(files, "a") == [False]
        assert os.listdir(files.directory) == []  # no temporary file left behind
        assert files.used == 0
        source.fail_after = None
        files.hold(["a"]).release()
        assert Path(files.path("a")).read_bytes() == b"a" * SIZE
        assert source.opened["a"] == 2
    finally:
        files.close()


def test_least_recently_used_copies_go_beyond_the_limit(tmp_path: Path, source: Source) -> None:
    files = cache(tmp_path, source, 2 * SIZE + SIZE // 2)
    try:
        files.hold(["a"]).release()
        files.hold(["b"]).release()
        files.hold(["a"]).release()  # b is now the least recently used
        files.hold(["c"]).release()
        assert kept(files, "abc") == [True, False, True]
        assert files.used == 2 * SIZE
    finally:
        files.close()


def test_held_copies_stay_past_the_limit_until_released(tmp_path: Path, source: Source) -> None:
    files = cache(tmp_path, source, 0)  # keep nothing that no query reads
    try:
        first = files.hold(["a", "b"])
        second = files.hold(["b", "c"])
        assert kept(files, "abc") == [True, True, True]
        first.release()
        first.release()  # a second release changes nothing
        assert kept(files, "abc") == [False, True, True]
        second.release()
        assert kept(files, "abc") == [False, False, False]
        assert files.used == 0
    finally:
        files.close()


def test_footer_copies_are_sparse_and_hold_the_parquet_metadata(tmp_path: Path, source: Source) -> None:
    table = pa.table({"id": pa.array(range(200_000)), "name": pa.array([f"n{i}" for i in range(200_000)])})
    pq.write_table(table, source.directory / "data.parquet", row_group_size=50_000)
    files = cache(tmp_path, source, 1 << 30)
    try:
        held = files.hold(["data.parquet"], footers=True)
        copy = Path(files.footer_path("data.parquet"))
        original = pq.ParquetFile(source.directory / "data.parquet").metadata
        assert copy.stat().st_size == (source.directory / "data.parquet").stat().st_size
        assert copy.stat().st_blocks * 512 < copy.stat().st_size / 4  # only the ends are written
        assert pq.ParquetFile(copy).metadata.to_dict() == original.to_dict()
        with duckdb.connect() as con:
            planned = con.sql(f"select id, count(*) from read_parquet('{copy}') group by id").limit(0)
            assert planned.to_arrow_table().schema.names == ["id", "count_star()"]
        assert not Path(files.path("data.parquet")).exists()  # the whole file is fetched only to run
        files.hold(["data.parquet"]).release()
        assert pq.read_table(files.path("data.parquet")).equals(table)
        held.release()
        with pytest.raises(OSError, match="not a Parquet file"):
            files.hold(["a"], footers=True)
    finally:
        files.close()


def test_directories_of_killed_servers_are_deleted(tmp_path: Path, source: Source) -> None:
    parent = tmp_path / "cache"
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True)
    abandoned = parent / f"{DIRECTORY_PREFIX}{int(gone.stdout)}-x"
    alive = parent / f"{DIRECTORY_PREFIX}{os.getpid()}-y"
    for directory in (abandoned, alive):
        directory.mkdir(parents=True)
        (directory / "copy.parquet").write_bytes(b"x")
    files = FileCache(parent, SIZE, source.open_file)
    try:
        assert not abandoned.exists()
        assert alive.exists()
    finally:
        files.close()
        shutil.rmtree(alive)


def test_copies_of_s3_objects(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """The server's source: an object's bytes, whole; a missing object is an OSError and leaves nothing."""
    client = seaweedfs.boto3_client()
    client.put_object(Bucket=BUCKET, Key="file-cache/x.parquet", Body=b"x" * 300_000)
    env = seaweedfs.env(f"s3://{BUCKET}/file-cache")
    settings = Settings(
        root=env["LAKEHOUSE_ROOT"],
        s3_endpoint=env["LAKEHOUSE_S3_ENDPOINT"],
        s3_region=env["LAKEHOUSE_S3_REGION"],
        s3_access_key_id=env["LAKEHOUSE_S3_ACCESS_KEY_ID"],
        s3_secret_access_key=env["LAKEHOUSE_S3_SECRET_ACCESS_KEY"],
        s3_cache_dir=str(tmp_path / "cache"),
        state_dir=str(tmp_path / "state"),
    )
    storage = S3Storage(settings)
    files = storage.query_files(settings)
    try:
        uri = storage.uri("x.parquet")
        held = files.hold([uri])
        assert Path(files.path(uri)).read_bytes() == b"x" * 300_000
        held.release()
        with pytest.raises(FileNotFoundError):
            files.hold([storage.uri("missing.parquet")])
        assert files.location is not None
        assert sorted(os.listdir(files.location)) == [Path(files.path(uri)).name]
    finally:
        files.close()
