"""Local copies of an S3 root's data files for DuckDB to read: a bounded read-through cache, LRU.

DuckDB 2 has no offline S3 extension (httpfs ships as a wheel for DuckDB 1.5 only), and local files are
its fastest source. A committed data file never changes (Iceberg writes new files and never rewrites
one), so a copy downloaded once stays right for as long as it is kept. A query holds the copies it reads
(:meth:`FileCache.hold`) until it ends: held copies are never evicted; the others are evicted least
recently used first once the copies pass ``max_bytes`` (held ones may push past it: it bounds what is
kept, not what running queries need). A file wanted by several queries at once is downloaded once; a
download goes to a temporary name and is renamed into place when complete, so a partial copy is never
read.

Planning a query (its result schema: GetFlightInfo, ListFlights, prepared statements) reads only the
Parquet footers: it holds *footer copies* instead, at names of their own, each a sparse file of the
object's size holding its first and last bytes (the magic and the footer), fetched with two ranged reads.
Planning never reads the full copies' names, and running never reads a footer copy's.

The cache starts empty in a directory of its own, deleted when the cache is closed; directories left by
a killed server are deleted by the next one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import pyarrow as pa

log = logging.getLogger(__name__)

#: Downloads running at once for one cache (the files of a snapshot are fetched in parallel).
DOWNLOAD_THREADS = 8
DIRECTORY_PREFIX = "lakehouse-files-"
#: Bytes of one read of a download, and of the first read of a footer (most footers fit in it).
CHUNK_BYTES = 16 << 20
FOOTER_GUESS_BYTES = 64 << 10
PARQUET_MAGIC = b"PAR1"

#: Opens the object at a URI for reading (a pyarrow random-access file).
OpenFile = Callable[[str], pa.NativeFile]


@dataclass
class Copy:
    """A complete local copy (of a whole object, or of its footer): its size and how many holds keep it."""

    size: int
    holds: int = 0


class FileCache:
    """Local copies of remote Parquet files named by URI, fetched on first use through ``open_file``."""

    def __init__(self, parent: str | Path, max_bytes: int, open_file: OpenFile) -> None:
        self.max_bytes = max_bytes
        self._open_file = open_file
        parent = Path(parent).expanduser().resolve()
        parent.mkdir(parents=True, exist_ok=True)
        remove_abandoned(parent)
        self.directory = Path(tempfile.mkdtemp(prefix=f"{DIRECTORY_PREFIX}{os.getpid()}-", dir=parent))
        self.location: str | None = self.directory.as_posix()
        self._copies: OrderedDict[str, Copy] = OrderedDict()  # by local path, least recently used first
        self._loading: dict[str, Future[int]] = {}
        self._guard = threading.Lock()
        self._pool = ThreadPoolExecutor(DOWNLOAD_THREADS, thread_name_prefix="file-cache")
        self.used = 0

    def path(self, uri: str) -> str:
        """Where the copy of ``uri`` is (or will be): a name of its own, whatever the URI holds."""
        return (self.directory / f"{digest(uri)}.parquet").as_posix()

    def footer_path(self, uri: str) -> str:
        """Where the footer copy of ``uri`` is (or will be)."""
        return (self.directory / f"{digest(uri)}.footer.parquet").as_posix()

    def hold(self, uris: Iterable[str], footers: bool = False) -> Hold:
        """Make sure ``uris`` are copied locally (only their footers when ``footers``) and keep the copies
        until the hold is released.

        Missing copies are downloaded in parallel (one download per copy, whoever asks). When one fails,
        the copies already held are released and the error (an ``OSError``) is raised."""
        hold = Hold(self, [])
        pending = list(dict.fromkeys(uris))
        try:
            while pending:  # a copy evicted between its download and its hold is fetched again
                loading = {uri: future for uri in pending if (future := self._take(uri, footers, hold))}
                for future in loading.values():
                    future.result()
                pending = list(loading)
        except BaseException:
            hold.release()
            raise
        self._evict()
        return hold

    def close(self) -> None:
        """Stop downloading and delete every copy (the server is stopping)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _take(self, uri: str, footers: bool, hold: Hold) -> Future[int] | None:
        """Hold the copy of ``uri`` if there is one (None), else the future of its download."""
        path = self.footer_path(uri) if footers else self.path(uri)
        with self._guard:
            copy = self._copies.get(path)
            if copy is not None:
                copy.holds += 1
                self._copies.move_to_end(path)
                hold.paths.append(path)
                return None
            future = self._loading.get(path)
            if future is None:
                write = write_footer if footers else write_whole
                future = self._loading[path] = self._pool.submit(self._download, uri, path, write)
            return future

    def _download(self, uri: str, path: str, write: Callable[[pa.NativeFile, BinaryIO], None]) -> int:
        """Copy ``uri`` with ``write`` to a temporary name, then rename it to ``path``; its size."""
        partial = self.directory / f".{uuid.uuid4().hex}.part"
        try:
            with self._open_file(uri) as source, open(partial, "wb") as out:
                write(source, out)
            stat = partial.stat()
            size = min(stat.st_size, stat.st_blocks * 512)  # what it takes on disk (a footer copy is sparse)
            os.replace(partial, path)
        except BaseException:
            partial.unlink(missing_ok=True)
            with self._guard:
                self._loading.pop(path, None)
            raise
        with self._guard:
            self._loading.pop(path, None)
            self._copies[path] = Copy(size)
            self.used += size
        return size

    def release(self, paths: list[str]) -> None:
        """Give holds back (see :class:`Hold`); copies past the size limit may go now."""
        with self._guard:
            for path in paths:
                copy = self._copies.get(path)
                if copy is not None:
                    copy.holds -= 1
        self._evict()

    def _evict(self) -> None:
        """Delete the least recently used copies nobody holds while the copies pass ``max_bytes``."""
        with self._guard:
            if self.used <= self.max_bytes:
                return
            for path in [path for path, copy in self._copies.items() if not copy.holds]:
                if self.used <= self.max_bytes:
                    break
                self.used -= self._copies.pop(path).size
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)


def digest(uri: str) -> str:
    """A file name for ``uri``: its SHA-256 in hex."""
    return hashlib.sha256(uri.encode()).hexdigest()


def write_whole(source: pa.NativeFile, out: BinaryIO) -> None:
    """Copy all of ``source`` into ``out``."""
    while chunk := source.read(CHUNK_BYTES):
        out.write(chunk)


def write_footer(source: pa.NativeFile, out: BinaryIO) -> None:
    """Write a sparse file of ``source``'s size holding only its leading magic and its footer (what
    reading a Parquet file's schema and statistics reads)."""
    size = source.size()
    tail = source.read_at(min(size, FOOTER_GUESS_BYTES), size - min(size, FOOTER_GUESS_BYTES))
    if len(tail) < 8 or tail[-4:] != PARQUET_MAGIC:
        raise OSError("not a Parquet file: no footer")
    needed = int.from_bytes(tail[-8:-4], "little") + 8
    if needed > len(tail):
        if needed > size:
            raise OSError("not a Parquet file: its footer is longer than the file")
        tail = source.read_at(needed, size - needed)
    out.write(source.read_at(len(PARQUET_MAGIC), 0))
    out.seek(size - len(tail))
    out.write(tail)


class Hold:
    """Copies a query reads, kept until :meth:`release` (once; later calls do nothing)."""

    def __init__(self, cache: FileCache | None, paths: list[str]) -> None:
        self.paths = paths  # of the copies held
        self._cache = cache
        self._released = False

    def release(self) -> None:
        """Let the copies be evicted again."""
        if self._released or self._cache is None:
            return
        self._released = True
        self._cache.release(self.paths)


#: A hold of nothing (files read where they are).
NOTHING_HELD = Hold(None, [])


class QueryFiles(Protocol):
    """Where DuckDB reads a storage's data files: ``path`` of a file to run a query on, ``footer_path`` of
    one to plan it on, each valid while a ``hold`` of it lasts; ``location``: the directory of local
    copies (kept from clients), None when files are read in place."""

    location: str | None

    def path(self, uri: str) -> str: ...

    def footer_path(self, uri: str) -> str: ...

    def hold(self, uris: Iterable[str], footers: bool = False) -> Hold: ...

    def close(self) -> None: ...


class DirectFiles:
    """Files DuckDB reads where they are (a local root): nothing to fetch or keep."""

    location = None

    def __init__(self, path: Callable[[str], str]) -> None:
        self._path = path

    def path(self, uri: str) -> str:
        """The file itself."""
        return self._path(uri)

    def footer_path(self, uri: str) -> str:
        """The file itself."""
        return self._path(uri)

    def hold(self, uris: Iterable[str], footers: bool = False) -> Hold:
        """Nothing to do: the files are there."""
        return NOTHING_HELD

    def close(self) -> None:
        """Nothing to delete."""


def remove_abandoned(parent: Path) -> None:
    """Delete cache directories under ``parent`` whose server process is gone (killed, not stopped)."""
    for directory in parent.glob(f"{DIRECTORY_PREFIX}*"):
        pid = directory.name.removeprefix(DIRECTORY_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            log.info("deleting the file cache of stopped process %s", pid)
            shutil.rmtree(directory, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's
        return True
    return True
