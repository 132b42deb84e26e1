"""SQL over the datasets: DuckDB on the current snapshots, streamed batch by batch, sandboxed.

A query reads only the datasets it names: the catalog's listing (one catalog query, no metadata file
read) gives the names, the sandbox check the ones the query reads, and the query takes leases on those
(a dropped dataset's files outlive the queries reading them) before their snapshots are loaded. Each
distinct set of named datasets at their snapshots gets its own in-memory DuckDB database with one view per
dataset over exactly that snapshot's Parquet files. A query takes a cursor of its own, so it sees one
snapshot of every dataset it reads (read-your-writes on this server, never a mix) and runs in parallel
with the others.

Limits: the time limit covers planning (run on a thread of its own: DuckDB's optimizer ignores an
interrupt), execution and a client that stops reading (its buffered batches are released and its next
read fails); batches waiting to be sent count against one server-wide budget.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import queue
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar, cast

import cachetools
import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.access import CALLER, visible
from flight_lakehouse.catalog import SnapshotFiles
from flight_lakehouse.commands import ScanRequest
from flight_lakehouse.datasets.registry import Datasets
from flight_lakehouse.errors import Cancelled, ClientError, InvalidArgument, NotFound, TimedOut, Unavailable
from flight_lakehouse.file_cache import NOTHING_HELD, Hold, QueryFiles
from flight_lakehouse.limits import OnePerKey, Slots
from flight_lakehouse.partitions import Part, parts, row_local
from flight_lakehouse.result_cache import ResultCache, parameters_key, repeatable
from flight_lakehouse.sandbox import (
    check_predicate,
    check_select,
    database_config,
    first_line,
    parameter_count,
    serialize,
    without_catalog,
)
from flight_lakehouse.settings import Settings
from flight_lakehouse.sql_search import Rewritten, SqlSearch
from flight_lakehouse.storage import Lease, quote_literal
from flight_lakehouse.vectors import from_lance, lance_message

log = logging.getLogger(__name__)

BATCH_ROWS = 128 * 1024
#: A result of one batch up to this size is sent whole (``first_batches``).
SMALL_RESULT_BYTES = 1 << 20
#: Result schemas a query database keeps (see ``SnapshotDatabase.remember_schema``).
REMEMBERED_SCHEMAS = 256
#: The largest record batch message sent: ADBC's Flight SQL driver refuses messages over 16 MiB, and a
#: 5M-row scan's 128k-row batches are 24 MB. Not smaller: a slice of a string column is copied when it is
#: written, and 4 MiB copies stayed in malloc's heap (a stalled-reader test kept 266 MB after its streams
#: ended; 12 MiB ones are mapped and unmapped).
MAX_MESSAGE_BYTES = 12 << 20
#: Query databases kept for reuse (each a DuckDB instance over some datasets at their snapshots).
CACHED_DATABASES = 16
#: How often a query looks its datasets up again while drops keep racing with it.
PIN_TRIES = 5
#: How long a stopped query's planning may take to notice before it is abandoned.
PLAN_GRACE_SECONDS = 0.2
#: Stopped queries whose planning may still hold a core; past this, new queries are refused as busy
#: (a client could otherwise start slow-planning queries faster than DuckDB finishes them).
MAX_ABANDONED_PLANS = 2

DATABASE_SERIALS = itertools.count(1)

T = TypeVar("T")


def remembered_by_text(tag: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """A :class:`QueryEngine` method of a query text, its answers kept in the engine's ``_by_text``."""
    return cachetools.cachedmethod(
        lambda engine: engine._by_text,
        key=lambda engine, sql: (tag, sql),
        lock=lambda engine: engine._by_text_guard,
    )


#: Values bound to a query's ``?`` / ``$n`` placeholders, in order.
Params = list[Any] | None


def interrupt(cursor: duckdb.DuckDBPyConnection) -> None:
    """Interrupt what ``cursor`` runs (nothing when it is closed already)."""
    try:
        cursor.interrupt()
    except duckdb.Error:
        log.debug("interrupting a closed cursor", exc_info=True)


def quote_identifier(name: str) -> str:
    """A DuckDB identifier literal."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class LanceView:
    """A Lance table as a query sees it: its schema, and the version to read (current when None)."""

    schema: pa.Schema
    version: int | None = None


class ViewDatabase:
    """An in-memory DuckDB database with one view per dataset over given Parquet files, locked down: the
    files are the only paths it may read, and its configuration cannot change."""

    def __init__(
        self, views: dict[str, SnapshotFiles], paths: dict[str, list[str]], config: dict[str, Any]
    ) -> None:
        self.views = views
        self._paths = paths
        self._connection = duckdb.connect(":memory:", config=config)
        self._created: set[str] = set()
        self._guard = threading.Lock()
        self._lock_down([path for listed in paths.values() for path in listed])

    def prepare(self, names: list[str]) -> None:
        """Create the views of ``names`` (stored names of Iceberg datasets), once each."""
        with self._guard:
            for name in names:
                if name not in self._created:
                    self._create_view(name)
                    self._created.add(name)

    def _create_view(self, name: str) -> None:
        paths = self._paths[name]
        if paths:
            files = ", ".join(quote_literal(path) for path in paths)
            source = f"read_parquet([{files}], union_by_name = true)"
            self._connection.execute(f"CREATE VIEW {quote_identifier(name)} AS SELECT * FROM {source}")
            return
        self._connection.register("__empty_dataset", self.views[name].schema.empty_table())
        try:
            self._connection.execute(
                f"CREATE TABLE {quote_identifier(name)} AS SELECT * FROM __empty_dataset"
            )
        finally:
            self._connection.unregister("__empty_dataset")

    def _lock_down(self, allowed_paths: list[str]) -> None:
        con = self._connection
        con.execute("SET parquet_metadata_cache = true")  # footers are immutable: read them once
        con.execute("SET GLOBAL TimeZone = 'UTC'")  # results must not depend on the server's local zone
        con.execute("SET allowed_paths = ?", [allowed_paths])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one query."""
        return self._connection.cursor()


class SnapshotDatabase:
    """The datasets at fixed snapshots, as views of a locked-down in-memory DuckDB database.

    Queries run on the data files where :class:`QueryFiles` puts them; when planning needs other copies
    (an S3 root's footer copies, see ``file_cache.py``), queries are planned on a second database whose
    views read those (one thread: it only plans). Lance tables are not views: each query registers the
    Lance datasets it reads on its own cursor, at their version when the query starts (see
    :meth:`QueryEngine._attach_lance`).
    """

    def __init__(
        self,
        views: dict[str, SnapshotFiles],
        files: QueryFiles,
        settings: Settings,
        temp_dir: str,
        lance: dict[str, LanceView] | None = None,
    ):
        self.views = views
        self.lance = lance or {}
        config = database_config(settings, temp_directory=temp_dir)
        self._running = ViewDatabase(views, self._paths(files.path), config)
        self._planning = self._running
        if files.location is not None and views:
            self._planning = ViewDatabase(views, self._paths(files.footer_path), {**config, "threads": 1})
        #: The URIs of the Parquet files of every dataset of this database (what its queries read).
        self.data_files = [uri for snapshot in views.values() for uri in snapshot.files]
        self._by_lower = {name.lower(): name for name in [*views, *self.lance]}
        self.names = set(self._by_lower)  # what queries may read, lower-case (SQL names are case-insensitive)
        #: Result schemas of queries planned on this database without values, by text and number of
        #: (null) parameters (bounded).
        self.schemas: dict[tuple[str, int], pa.Schema] = {}
        #: Unique among the databases of this process: remembered results are keyed by it.
        self.serial = next(DATABASE_SERIALS)

    def _paths(self, path: Callable[[str], str]) -> dict[str, list[str]]:
        """The local paths of each dataset's files, by ``path`` of a file's URI."""
        return {name: [path(uri) for uri in snapshot.files] for name, snapshot in self.views.items()}

    def remember_schema(self, key: tuple[str, int], schema: pa.Schema) -> None:
        """Keep the result schema of a query on this database (its datasets' snapshots never change):
        planning it again cost ~1.4 ms of a small prepared query's ~2 ms."""
        if len(self.schemas) >= REMEMBERED_SCHEMAS:
            self.schemas.clear()
        self.schemas[key] = schema

    def schema_of(self, name: str) -> pa.Schema:
        """The schema of a dataset of this database."""
        return self.lance[name].schema if name in self.lance else self.views[name].schema

    def lance_names(self, names: set[str]) -> list[str]:
        """The Lance tables among ``names`` (lower-case), by their stored names."""
        return [self._by_lower[lower] for lower in sorted(names) if self._by_lower.get(lower) in self.lance]

    def prepare(self, names: set[str], planning: bool = False) -> None:
        """Create the views of the datasets a query reads (lower-case names), once each.

        Views are made on first use, so a query never opens a dataset it does not read: one unreadable
        dataset (or S3 being down) does not break queries on the others.
        """
        stored = [self._by_lower[lower] for lower in sorted(names) if lower in self._by_lower]
        database = self._planning if planning else self._running
        database.prepare([name for name in stored if name not in self.lance])

    def cursor(self, planning: bool = False) -> duckdb.DuckDBPyConnection:
        """A connection of its own for one query (for planning it only, when ``planning``)."""
        return (self._planning if planning else self._running).cursor()

    @contextlib.contextmanager
    def parsing(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor for the sandbox's parsing, opened only if used: parse trees and verdicts are
        remembered by text, and opening a cursor took ~0.13 ms of a repeated small query."""
        lazy = LazyCursor(self)
        try:
            yield cast(duckdb.DuckDBPyConnection, lazy)
        finally:
            lazy.close()


class LazyCursor:
    """A cursor of a database, opened on first use."""

    def __init__(self, database: SnapshotDatabase) -> None:
        self._database = database
        self._cursor: duckdb.DuckDBPyConnection | None = None

    def __getattr__(self, name: str) -> Any:
        if self._cursor is None:
            self._cursor = self._database.cursor()
        return getattr(self._cursor, name)

    def close(self) -> None:
        """Close the cursor if it was opened."""
        if self._cursor is not None:
            self._cursor.close()


@dataclass
class Pinned:
    """A query's database, with leases on the datasets it reads (their files outlive the query)."""

    database: SnapshotDatabase
    lease: Lease


@dataclass
class RunningQuery:
    """A query in flight, watched for cancellation and its deadline."""

    # Held until the query ends, so that a superseded database outlives every cursor still reading it.
    pinned: Pinned
    cursor: duckdb.DuckDBPyConnection
    deadline: float
    #: Asks the query's Flight call whether the client went away; valid only while the call runs, so it
    #: is asked by the watchdog only until the call hands its stream over, then by the stream itself.
    is_cancelled: Callable[[], bool]
    #: Whether the query was cancelled from elsewhere (``CancelFlightInfo``): asked by the watchdog until
    #: the query ends, so that a stream stalled by its reader stops too.
    revoked: Callable[[], bool] = lambda: False
    stop_reason: str | None = None
    key: int = field(default=0)
    starting: bool = True  # the call is still inside DoGet (the watchdog may ask is_cancelled)
    finished: bool = False
    #: Planning outlived the query's stop: the planning thread closes the cursor when DuckDB lets it go.
    abandoned: bool = False
    prefetch: Prefetcher | None = None
    #: The data files the query reads, kept where DuckDB reads them until the query is closed.
    files: Hold = NOTHING_HELD

    def stop(self, reason: str) -> None:
        """End the query: interrupt DuckDB and release its buffered batches (its next read fails)."""
        self.stop_reason = self.stop_reason or reason
        if self.prefetch is not None:
            self.prefetch.expire()
        interrupt(self.cursor)


class Watched(Protocol):
    """What the :class:`Watchdog` watches: a deadline, a cancellation check while ``starting``, a check
    for a cancel from elsewhere at any time (``revoked``), a stop."""

    key: int
    deadline: float
    starting: bool
    stop_reason: str | None
    is_cancelled: Callable[[], bool]
    revoked: Callable[[], bool]

    def stop(self, reason: str) -> None: ...


@dataclass
class WatchedCursor:
    """A cursor running client SQL outside a query stream (a search filter): stopped at its deadline."""

    cursor: duckdb.DuckDBPyConnection
    deadline: float
    key: int = 0
    starting: bool = False
    stop_reason: str | None = None
    is_cancelled: Callable[[], bool] = lambda: False
    revoked: Callable[[], bool] = lambda: False

    def stop(self, reason: str) -> None:
        """Interrupt the cursor."""
        self.stop_reason = self.stop_reason or reason
        interrupt(self.cursor)


class Watchdog:
    """Interrupts queries whose client went away or whose time is up (one thread for all of them)."""

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._queries: dict[int, Watched] = {}
        self._guard = threading.Lock()
        self._next_key = 0
        self._thread = threading.Thread(target=self._run, name="query-watchdog", daemon=True)
        self._thread.start()

    def watch(self, query: Watched) -> None:
        """Start watching a query."""
        with self._guard:
            self._next_key += 1
            query.key = self._next_key
            self._queries[query.key] = query

    def forget(self, query: Watched) -> None:
        """Stop watching a query."""
        with self._guard:
            self._queries.pop(query.key, None)

    def streaming(self, query: Watched) -> None:
        """The query's call is about to hand its stream over: from now on only its deadline is watched
        here (the stream checks for cancellation itself, on the call's own thread)."""
        with self._guard:
            query.starting = False

    def stop_all(self, reason: str) -> None:
        """Stop every running query (at shutdown)."""
        with self._guard:
            for query in self._queries.values():
                self._stop(query, reason)

    def _run(self) -> None:
        while True:
            time.sleep(self._interval)
            # Checked under the guard: a call's context is asked only while the call is inside DoGet
            # (``starting``, cleared under the guard before DoGet returns); asking a destroyed context
            # whether it is cancelled would crash.
            with self._guard:
                now = time.monotonic()
                for query in self._queries.values():
                    if query.stop_reason is None:
                        self._check(query, now)

    @classmethod
    def _check(cls, query: Watched, now: float) -> None:
        try:
            if query.revoked() or (query.starting and query.is_cancelled()):
                cls._stop(query, "cancelled")
            elif now > query.deadline:
                cls._stop(query, "timeout")
        except Exception:
            log.debug("checking a query failed", exc_info=True)

    @staticmethod
    def _stop(query: Watched, reason: str) -> None:
        try:
            query.stop(reason)
        except Exception:  # a cursor closed under our feet has nothing left to interrupt
            log.debug("interrupting a query failed", exc_info=True)


class Stopped(Exception):
    """The query was stopped (deadline, cancellation, shutdown) while its batches were waiting."""


class ResultTooLarge(Exception):
    """One result row is larger than the server-wide budget of unsent results."""


class ResultBudget:
    """Bytes of result batches produced but not yet handed to gRPC, across all queries."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self._changed = threading.Condition()

    def acquire(self, size: int, stopped: threading.Event, waiting: int) -> bool:
        """Wait until ``size`` bytes fit, unless the query has none ``waiting`` (one piece a query always
        fits: stalled readers cannot starve the others); False when ``stopped`` first."""
        if size > self.limit:
            raise ResultTooLarge(
                f"a result row of {size / 2**20:.0f} MB is larger than the server's limit of "
                f"{self.limit / 2**20:.0f} MB for unsent results; select smaller values"
            )
        with self._changed:
            while waiting and self.used + size > self.limit:
                if stopped.is_set():
                    return False
                self._changed.wait(0.1)
            self.used += size
            return True

    def release(self, size: int) -> None:
        """Give ``size`` bytes back."""
        with self._changed:
            self.used -= size
            self._changed.notify_all()


def pieces(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """``batch`` in zero-copy slices of at most ``max_bytes`` each, unless a single row is larger."""
    if batch.nbytes <= max_bytes or batch.num_rows <= 1:
        yield batch
        return
    half = batch.num_rows // 2
    yield from pieces(batch.slice(0, half), max_bytes)
    yield from pieces(batch.slice(half), max_bytes)


def first_batches(reader: pa.RecordBatchReader) -> tuple[pa.RecordBatchReader | None, list[pa.RecordBatch]]:
    """The start of a result, read while it is planned: ``(None, batches)`` when the whole result is at
    most one batch of :data:`SMALL_RESULT_BYTES`, else a reader of the whole result (nothing lost).

    A small query's DoGet then takes no prefetch thread, no hand-off and no Python call per batch (with
    them, ``select count(*)`` took ~1.2 ms more than a bare call)."""
    first = next_batch(reader)
    if first is None:
        return None, [pa.RecordBatch.from_pylist([], schema=reader.schema)]
    if first.nbytes > SMALL_RESULT_BYTES or first.num_rows >= BATCH_ROWS:
        return pa.RecordBatchReader.from_batches(reader.schema, itertools.chain([first], reader)), []
    second = next_batch(reader)
    if second is None:
        return None, [first]
    return pa.RecordBatchReader.from_batches(reader.schema, itertools.chain([first, second], reader)), []


def next_batch(reader: pa.RecordBatchReader) -> pa.RecordBatch | None:
    """The reader's next batch, None at its end."""
    try:
        return reader.read_next_batch()
    except StopIteration:
        return None


class Prefetcher:
    """Reads the next batches from DuckDB on a thread of its own while the current one is being sent.

    Sending a batch (IPC encoding, gRPC) and producing the next (DuckDB) then overlap; at most
    ``depth`` batches wait in between, within the server-wide ``budget``. ``on_exit`` runs on the
    producing thread once it is out of DuckDB for good (closing the cursor there is safe).
    """

    _END = object()

    def __init__(
        self,
        reader: pa.RecordBatchReader,
        budget: ResultBudget,
        on_exit: Callable[[], None],
        depth: int = 2,
    ) -> None:
        self._reader = reader
        self._budget = budget
        self._on_exit = on_exit
        self._queue: queue.Queue[tuple[object, int]] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="query-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for batch in self._reader:
                for piece in pieces(batch, min(self._budget.limit // 4, MAX_MESSAGE_BYTES)):
                    if not self._offer(piece, piece.nbytes):
                        return
            self._offer(self._END, 0)
        except BaseException as exc:
            self._offer(exc, 0)
        finally:
            if self._stopped.is_set():
                self._drain()
                self._on_exit()

    def _offer(self, item: object, size: int) -> bool:
        if size and not self._budget.acquire(size, self._stopped, self._queue.qsize()):
            return False
        while not self._stopped.is_set():
            try:
                self._queue.put((item, size), timeout=0.1)
                return True
            except queue.Full:
                continue
        self._budget.release(size)
        return False

    def _drain(self) -> None:
        """Drop the waiting batches, giving their bytes back to the budget."""
        while True:
            try:
                _, size = self._queue.get_nowait()
            except queue.Empty:
                return
            self._budget.release(size)

    def batches(self, is_cancelled: Callable[[], bool]) -> Iterator[pa.RecordBatch]:
        """The batches in order; while waiting for one, ``is_cancelled`` is asked every 50 ms and a
        cancelled call raises :class:`Cancelled`; a stopped prefetcher raises :class:`Stopped`."""
        while True:
            if self._stopped.is_set():
                self._drain()
                raise Stopped("query stopped")
            try:
                item, size = self._queue.get(timeout=0.05)
            except queue.Empty:
                if is_cancelled():
                    raise Cancelled("the client cancelled the query") from None
                continue
            self._budget.release(size)
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def expire(self) -> None:
        """Stop producing and release the waiting batches, without waiting (the watchdog calls this)."""
        self._stopped.set()
        self._drain()
        if not self._thread.is_alive():  # done producing: nothing else will close the query
            self._on_exit()

    def stop(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Stop producing: interrupt DuckDB if the producer is still inside it, and wait for the thread."""
        self._stopped.set()
        if self._thread.is_alive():
            interrupt(cursor)
            self._thread.join(10)
        self._drain()


#: The threads planning queries, reused: a new thread per query cost ~0.1 ms of a ~4.5 ms small Flight SQL
#: query. Sized far above the calls that plan at once (gRPC's workers) plus the abandoned plans.
PLANNING_THREADS = ThreadPoolExecutor(max_workers=256, thread_name_prefix="query-plan")


class Planner:
    """Runs DuckDB's planning of a query on a thread of its own, so that a stopped query answers at once.

    DuckDB's optimizer does not look at interrupts (a 20-level nested subquery planned on for seconds
    past an interrupt), so the call stops waiting and leaves the thread to finish; ``on_abandoned``
    runs on that thread once DuckDB returns.
    """

    def __init__(self, plan: Callable[[], Any], on_abandoned: Callable[[Any], None]) -> None:
        self._plan = plan
        self._on_abandoned = on_abandoned
        self._done = threading.Event()
        self._guard = threading.Lock()
        self.abandoned = False
        self._result: Any = None
        self._error: BaseException | None = None
        PLANNING_THREADS.submit(contextvars.copy_context().run, self._run)  # as the call's caller

    def _run(self) -> None:
        try:
            self._result = self._plan()
        except BaseException as exc:
            self._error = exc
        with self._guard:
            self._done.set()
            abandoned = self.abandoned
        if abandoned:
            self._on_abandoned(self._result)

    def wait(self, stopped: Callable[[], bool]) -> Any:
        """The plan's result; raises :class:`Stopped` when ``stopped()`` and DuckDB does not return soon."""
        while not self._done.wait(0.05):
            if stopped() and not self._done.wait(PLAN_GRACE_SECONDS):
                with self._guard:
                    if not self._done.is_set():
                        self.abandoned = True
                        raise Stopped("query stopped while being planned")
        if self._error is not None:
            raise self._error
        return self._result


@dataclass(frozen=True)
class CallHooks:
    """What a query needs of the Flight call that runs it: whether its client went away (asked only while
    the call runs), and whether it was cancelled from elsewhere (asked at any time, by the watchdog)."""

    is_cancelled: Callable[[], bool]
    revoked: Callable[[], bool] = lambda: False


@dataclass
class QueryStream:
    """A started query: its schema and its batches (consumed once); ``complete`` holds the whole result
    when it was one small batch (sent without a Python call per batch)."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]
    complete: pa.Table | None = None


@dataclass(frozen=True)
class Listing:
    """The datasets when a query starts, as the catalog lists them (no metadata file is read)."""

    locations: dict[str, str]  # Iceberg dataset -> its current metadata file
    lance: dict[str, pa.Schema]  # Lance table -> its schema (a query pins its version when it starts)

    def by_lower(self) -> dict[str, str]:
        """Lower-case name -> stored name, of every dataset."""
        return {name.lower(): name for name in [*self.locations, *self.lance]}

    def stored(self, lower_names: set[str]) -> list[str]:
        """The stored names of the listed datasets among ``lower_names``."""
        by_lower = self.by_lower()
        return sorted(by_lower[lower] for lower in lower_names if lower in by_lower)

    def same_for(self, other: Listing, names: list[str]) -> bool:
        """Whether ``names`` are the same datasets (at the same snapshots) in both listings."""
        return all(
            self.locations.get(name) == other.locations.get(name)
            and (name in self.lance) == (name in other.lance)
            for name in names
        )


class QueryEngine:
    """Runs SQL and scans on DuckDB over the datasets' current snapshots.

    The two formats reach DuckDB differently: an Iceberg dataset is a view over its snapshot's Parquet
    files, a Lance table is registered on each query's cursor at the version the query pins.
    """

    def __init__(self, datasets: Datasets, settings: Settings, sql_search: SqlSearch | None = None) -> None:
        self.catalog = datasets.iceberg.catalog
        self.vectors = datasets.lance
        self.datasets = datasets
        self.settings = settings
        #: ``vector_search(...)`` in FROM (none: the sandbox refuses it as an unknown table function).
        self.sql_search = sql_search
        self._temp_dir = tempfile.TemporaryDirectory(prefix="lakehouse-duckdb-", ignore_cleanup_errors=True)
        #: Where DuckDB reads the data files (an S3 root's: local copies, see ``file_cache.py``).
        self.files = self.catalog.storage.query_files(settings)
        self._databases: dict[frozenset[tuple[Any, ...]], SnapshotDatabase] = {}
        self._building = OnePerKey()
        self._guard = threading.Lock()
        self._closing = threading.Lock()
        self._watchdog = Watchdog()
        self._budget = ResultBudget(settings.result_buffer_mb << 20)
        self.results = ResultCache(settings.result_cache_mb << 20)
        #: What the parse tree of a query text says (the table it reads row by row, whether its result
        #: is repeatable), newest kept.
        self._by_text: cachetools.LRUCache[tuple[Any, ...], Any] = cachetools.LRUCache(REMEMBERED_SCHEMAS)
        self._by_text_guard = threading.Lock()
        #: Queries started and not yet closed (a reader that stalls holds its slot until its time limit).
        self.running = Slots(settings.max_concurrent_queries, "queries", "max_concurrent_queries")
        self._storage_root = self.catalog.storage.root_uri
        self._leases = self.catalog.storage.leases
        #: An empty locked-down database: the sandbox parses queries on it before any dataset is loaded.
        self._parser = self._build({})
        self._abandoned_plans = 0

    def close(self) -> None:
        """Delete DuckDB's spill directory and the copies of data files (``serve`` ends with ``os._exit``:
        no finaliser runs)."""
        self._temp_dir.cleanup()
        self.files.close()

    def stop_all(self) -> None:
        """Stop every running query (at shutdown: a call stuck in DuckDB must not hold the exit up)."""
        self._watchdog.stop_all("shutdown")

    # -- databases -------------------------------------------------------------------------------
    def _listing(self) -> Listing:
        """The datasets the caller sees, at their current snapshots."""
        iceberg, lance = self.datasets.iceberg.pins(), self.datasets.lance.pins()
        if CALLER.get() is None:
            return Listing(iceberg, lance)
        return Listing(
            {name: pin for name, pin in iceberg.items() if visible(name)},
            {name: pin for name, pin in lance.items() if visible(name)},
        )

    def _pin(self, named: Callable[[Listing], set[str]]) -> Pinned:
        """The database of the datasets a query reads (``named``: lower-case names from a listing), at
        their current snapshots, with leases taken before their metadata is read.

        A drop racing with the lookup is seen by the leases' epoch: the datasets are looked up again (one
        dropped is then NOT_FOUND for this query; drops of others do not concern it)."""
        for _ in range(PIN_TRIES):
            epoch = self._leases.epoch
            listing = self._listing()
            names = listing.stored(named(listing))
            lease = self._leases.hold(names)
            if self._leases.epoch == epoch or self._listing().same_for(listing, names):
                try:
                    return Pinned(self._database(listing, names), lease)
                except BaseException:
                    lease.release()
                    raise
            lease.release()
        raise Unavailable("datasets are being dropped and re-created; retry the query")

    def _database(self, listing: Listing, names: list[str]) -> SnapshotDatabase:
        """The database of ``names`` at their listed snapshots (reused while they are current)."""
        lance = {name: LanceView(listing.lance[name]) for name in names if name in listing.lance}
        key = frozenset(
            [(name, listing.locations[name]) for name in names if name in listing.locations]
            + [(name, view.schema) for name, view in lance.items()]
        )
        with self._guard:
            database = self._databases.get(key)
        if database is not None:
            return database
        with self._building.held(key):  # queries of a new snapshot wait for one build of its database
            with self._guard:
                database = self._databases.get(key)
            if database is not None:
                return database
            views = {
                name: self._snapshot(name, listing.locations[name]) for name in names if name not in lance
            }
            database = self._build(views, lance)
            with self._guard:
                self._forget_stale(listing)
                return self._databases.setdefault(key, database)

    def _forget_stale(self, listing: Listing) -> None:
        """Drop cached databases of superseded snapshots, and the oldest beyond the cache's size."""
        current = set(listing.locations.items())
        for key in list(self._databases):
            if not all((name, value) in current or name in listing.lance for name, value in key):
                del self._databases[key]
        while len(self._databases) >= CACHED_DATABASES:
            del self._databases[next(iter(self._databases))]

    def _snapshot(self, name: str, location: str, snapshot_id: int | None = None) -> SnapshotFiles:
        """A snapshot's files; NOT_FOUND when the dataset went away before its metadata could be read."""
        try:
            return self.catalog.snapshot_files(location, snapshot_id)
        except OSError as exc:
            if self.catalog.metadata_locations().get(name) != location:
                raise NotFound(f"dataset {name!r} not found") from None
            log.warning("cannot read the metadata of %s: %s", name, exc)
            raise Unavailable(f"storage error: the metadata of dataset {name!r} cannot be read") from None

    def _build(
        self, views: dict[str, SnapshotFiles], lance: dict[str, LanceView] | None = None
    ) -> SnapshotDatabase:
        return SnapshotDatabase(views, self.files, self.settings, self._temp_dir.name, lance)

    def scan_database(self, request: ScanRequest) -> Pinned:
        """A database with the scanned dataset, at the requested snapshot when there is one."""
        pinned = self._pin(lambda listing: self._scanned(request, listing))
        if request.snapshot_id is None:
            return pinned
        name, database = request.dataset, pinned.database
        if name in database.lance:  # a Lance table: snapshots are its versions
            self.vectors.dataset(name, request.snapshot_id)  # NOT_FOUND for unknown versions
            lance = {name: LanceView(database.lance[name].schema, request.snapshot_id)}
            return Pinned(self._build({}, lance), pinned.lease)
        location = self.catalog.metadata_locations().get(name, "")
        views = {name: self._snapshot(name, location, request.snapshot_id)}
        return Pinned(self._build(views), pinned.lease)

    @staticmethod
    def _scanned(request: ScanRequest, listing: Listing) -> set[str]:
        if request.dataset not in listing.locations and request.dataset not in listing.lance:
            raise NotFound(f"dataset {request.dataset!r} not found")
        return {request.dataset.lower()}

    def _pin_query(self, sql: str, searches: frozenset[str] = frozenset()) -> Pinned:
        """The pinned database of what ``sql`` reads, after the sandbox's check (errors as clients see
        them)."""
        try:
            return self._pin(lambda listing: self._checked(sql, listing, searches))
        except BaseException as exc:
            raise self._client_error(exc, None) from None

    # -- split results (see partitions.py) -------------------------------------------------------
    def split(self, sql: str, most: int) -> tuple[pa.Schema, list[Part]]:
        """The result schema of ``sql`` and the parts (at most ``most``) it splits into when it reads one
        Iceberg dataset row by row and that dataset's current snapshot has several files; no parts: it is
        answered whole. Schema and parts are of the same snapshot."""
        pinned, found = self._pinned_parts(sql, most)
        return self.schema(sql, pinned), found

    def parts(self, sql: str, most: int) -> list[Part]:
        """The parts of ``sql`` at the current snapshot, as :meth:`split` finds them (without planning);
        none, without looking at any snapshot, for a query that does not read one table row by row."""
        if self._row_local(self._rewritten(sql).sql) is None:
            return []
        pinned, found = self._pinned_parts(sql, most)
        pinned.lease.release()
        return found

    def _pinned_parts(self, sql: str, most: int) -> tuple[Pinned, list[Part]]:
        rewritten = self._rewritten(sql)
        pinned = self._pin_query(rewritten.sql, rewritten.tables)
        try:
            return pinned, self._parts(rewritten.sql, pinned.database, most)
        except BaseException:
            pinned.lease.release()
            raise

    def scan_parts(self, sql: str, pinned: Pinned, most: int) -> list[Part]:
        """The parts (at most ``most``) of a scan's ``sql`` over its pinned database (see
        :meth:`scan_database`: the snapshot it asks for), as :meth:`split` finds them."""
        return self._parts(sql, pinned.database, most)

    def part_database(self, sql: str, part: Part) -> Pinned:
        """The database of one part of a split query: its dataset at the part's snapshot, over the part's
        files only. The part (a client's ticket) is checked against the query and the snapshot."""
        rewritten = self._rewritten(sql)
        pinned = self._pin_query(rewritten.sql, rewritten.tables)
        try:
            return Pinned(self._build(self._part_views(rewritten.sql, pinned.database, part)), pinned.lease)
        except BaseException as exc:
            pinned.lease.release()
            raise self._client_error(exc, None) from None

    def _parts(self, sql: str, database: SnapshotDatabase, most: int) -> list[Part]:
        name = self._split_dataset(sql, database)
        snapshot = database.views[name] if name else None
        if snapshot is None or not snapshot.uniform or snapshot.snapshot_id is None:
            return []
        return parts(name, snapshot.snapshot_id, len(snapshot.files), most)

    def _part_views(self, sql: str, database: SnapshotDatabase, part: Part) -> dict[str, SnapshotFiles]:
        name = self._split_dataset(sql, database)
        if name is None or name.lower() != part.dataset.lower():
            raise InvalidArgument(f"statement handle: its query does not read {part.dataset!r} row by row")
        location = self.catalog.metadata_locations().get(name, "")
        snapshot = self._snapshot(name, location, part.snapshot_id)
        if not snapshot.uniform or part.count > len(snapshot.files):
            raise InvalidArgument(
                f"statement handle: snapshot {part.snapshot_id} of {name!r} does not split into "
                f"{part.count} parts"
            )
        return {name: replace(snapshot, files=part.files(snapshot.files))}

    def _split_dataset(self, sql: str, database: SnapshotDatabase) -> str | None:
        """The one Iceberg dataset of ``database`` when ``sql`` reads it row by row and nothing else."""
        if database.lance or len(database.views) != 1:
            return None
        name = next(iter(database.views))
        return name if self._row_local(sql) == name.lower() else None

    @remembered_by_text("row_local")
    def _row_local(self, sql: str) -> str | None:
        """The table ``sql`` reads row by row (see :func:`~flight_lakehouse.partitions.row_local`)."""
        with self._parser.parsing() as cursor:
            return row_local(serialize(cursor, sql))

    @remembered_by_text("repeatable")
    def _repeatable(self, sql: str) -> bool:
        """Whether ``sql``'s result may be kept (see :func:`~flight_lakehouse.result_cache.repeatable`)."""
        with self._parser.parsing() as cursor:
            return repeatable(serialize(cursor, sql))

    # -- statements ------------------------------------------------------------------------------
    def scan_sql(self, request: ScanRequest, pinned: Pinned) -> str:
        """The SELECT a scan ticket stands for, with its columns checked."""
        database = pinned.database
        known = {f.name.lower() for f in database.schema_of(request.dataset)}
        for column in request.columns or []:
            if column.lower() not in known:
                raise InvalidArgument(f"unknown column {column!r} in dataset {request.dataset!r}")
        columns = ", ".join(quote_identifier(c) for c in request.columns) if request.columns else "*"
        sql = f"SELECT {columns} FROM {quote_identifier(request.dataset)}"
        if request.filter:
            cursor = database.cursor()
            try:
                check_predicate(cursor, request.filter)
            finally:
                cursor.close()
            sql += f" WHERE ({request.filter}\n)"
        if request.limit is not None:
            sql += f" LIMIT {request.limit}"
        return sql

    def _checked(self, sql: str, listing: Listing, searches: frozenset[str] = frozenset()) -> set[str]:
        """The datasets ``sql`` reads (lower-case), after the sandbox's check (``searches``: the tables
        standing for its ``vector_search`` calls, readable by it alone)."""
        with self._parser.parsing() as cursor:
            return check_select(cursor, sql, set(listing.by_lower()) | searches)

    def _rewritten(self, sql: str) -> Rewritten:
        """``sql`` reading ``lakehouse.main.t`` as the dataset ``t`` (see ``sandbox.without_catalog``) and
        each ``vector_search(...)`` as a table of its own (see ``sql_search``)."""
        try:
            with self._parser.parsing() as cursor:
                sql = without_catalog(cursor, sql)
                return self.sql_search.rewrite(cursor, sql) if self.sql_search else Rewritten(sql)
        except BaseException as exc:
            raise self._client_error(exc, None) from None

    def _searched(self, query: RunningQuery, rewritten: Rewritten, run: bool) -> duckdb.DuckDBPyConnection:
        """The query's cursor with the results of its searches registered (only planned unless ``run``)."""
        if self.sql_search is not None:
            self.sql_search.register(query.cursor, rewritten.calls, run)
        return query.cursor

    def parameter_count(self, sql: str) -> int:
        """How many distinct placeholders (``?``, ``$n``) ``sql`` has (it is checked when it is planned)."""
        with self._parser.parsing() as cursor:
            return parameter_count(serialize(cursor, sql))

    def schema(self, sql: str, pinned: Pinned | None = None, params: Params = None) -> pa.Schema:
        """The result schema of ``sql``, without running it (planned within the time limit)."""
        rewritten = self._rewritten(sql)
        sql = rewritten.sql
        pinned = pinned or self._pin_query(sql, rewritten.tables)
        # a value's type is not all that types it (a decimal's digits, a timestamp's zone): only a query
        # without values is remembered
        remembered = not rewritten.tables and all(value is None for value in params or ())
        key = (sql, len(params or ()))
        known = pinned.database.schemas.get(key) if remembered else None
        if known is not None:  # the same text over the same snapshots (a prepared query run again)
            pinned.lease.release()
            return known
        query = self._start(sql, pinned, CallHooks(is_cancelled=lambda: False), rewritten.tables, True)
        try:  # searches are planned, not run: their tables are empty
            schema = self._plan(
                query,
                lambda: (
                    self._searched(query, rewritten, run=False)
                    .sql(sql, params=params)
                    .limit(0)
                    .to_arrow_table()
                    .schema
                ),
            )
        except BaseException as exc:
            raise self._client_error(exc, query) from None
        finally:
            self._finish(query)
        if remembered:
            pinned.database.remember_schema(key, schema)
        return schema

    def run(
        self, sql: str, call: CallHooks, pinned: Pinned | None = None, params: Params = None
    ) -> QueryStream:
        """Start ``sql`` (with ``params`` bound to its placeholders); the batches are produced as the client
        reads them."""
        rewritten = self._rewritten(sql)
        sql = rewritten.sql
        key = None
        if not rewritten.tables:
            pinned = pinned or self._pin_query(sql)
            key = self._result_key(sql, params, pinned.database)
            kept = self.results.get(key) if key is not None else None
            if kept is not None:  # the same question over the same snapshots
                pinned.lease.release()
                return QueryStream(kept.schema, iter(kept.to_batches()), kept)
        query = self._start(sql, pinned, call, rewritten.tables)
        try:  # the searches run here, within the query's time limit
            reader, first = self._plan(
                query,
                lambda: first_batches(
                    self._searched(query, rewritten, run=True)
                    .sql(sql, params=params)
                    .to_arrow_reader(BATCH_ROWS)
                ),
            )
        except BaseException as exc:
            self._finish(query)
            raise self._client_error(exc, query) from None
        if reader is None:  # all of it, small: no prefetching, no Python call per batch
            self._finish(query)
            table = pa.Table.from_batches(first)
            if key is not None:
                self.results.put(key, table)
            return QueryStream(table.schema, iter(table.to_batches()), table)
        self._watchdog.streaming(query)
        batches = self._batches(reader, query)
        # a stream dropped before its first batch never runs its ``finally``: finish when it is freed
        weakref.finalize(batches, self._finish, query)
        return QueryStream(reader.schema, batches)

    def _result_key(self, sql: str, params: Params, database: SnapshotDatabase) -> Hashable | None:
        """The key of ``sql``'s result in the result cache, None when it may not be kept (see
        :mod:`~flight_lakehouse.result_cache`)."""
        if not self.results.limit or database.lance:
            return None
        values = parameters_key(params)
        if values is None:
            return None
        return (database.serial, sql, values) if self._repeatable(sql) else None

    def _start(
        self,
        sql: str,
        pinned: Pinned | None,
        call: CallHooks,
        searches: frozenset[str] = frozenset(),
        planning: bool = False,
    ) -> RunningQuery:
        """Pin the query's datasets, open its cursor and watch it (its deadline starts now); a query
        ``planning`` only is never run (its cursor may read footer copies only)."""
        deadline = time.monotonic() + self.settings.query_timeout_seconds
        pinned = pinned or self._pin_query(sql, searches)
        try:
            self.running.take()  # given back when the query is closed
        except Unavailable:
            pinned.lease.release()
            raise
        database = pinned.database
        query = RunningQuery(pinned, database.cursor(planning), deadline, call.is_cancelled, call.revoked)
        self._watchdog.watch(query)
        try:
            query.files = self._hold(database, planning)
            database.prepare(database.names, planning)
            self._attach_lance(query.cursor, database, database.names)
        except BaseException as exc:
            self._finish(query)
            raise self._client_error(exc, query) from None
        return query

    def _plan(self, query: RunningQuery, plan: Callable[[], T]) -> T:
        """``plan()`` (DuckDB binding and optimising) within the query's time limit."""
        with self._guard:
            if self._abandoned_plans >= MAX_ABANDONED_PLANS:
                raise Unavailable("the server is still planning stopped queries; retry later")
        planner = Planner(plan, lambda result: self._abandoned_plan_done(query))
        try:
            result = planner.wait(lambda: query.stop_reason is not None)
            if query.stop_reason is None and time.monotonic() > query.deadline:  # between watchdog rounds
                query.stop("timeout")
            if query.stop_reason is not None:  # planned, but past the limit all the same
                raise Stopped("query stopped while being planned")
            return result
        except Stopped:
            if not planner.abandoned:
                raise
            with self._guard:
                self._abandoned_plans += 1
            query.abandoned = True  # the planning thread closes the query once DuckDB returns
            log.warning(
                "a query was stopped (%s) while DuckDB planned it; planning goes on", query.stop_reason
            )
            raise

    def _abandoned_plan_done(self, query: RunningQuery) -> None:
        """DuckDB returned from the planning of a stopped query: close it and free its place."""
        self._close(query)
        with self._guard:
            self._abandoned_plans -= 1

    def _hold(self, database: SnapshotDatabase, planning: bool) -> Hold:
        """Keep the database's data files where DuckDB reads them (fetching those not there yet; for
        ``planning``, their footers)."""
        try:
            return self.files.hold(database.data_files, footers=planning)
        except OSError as exc:
            log.warning("fetching data files for a query failed: %s", exc)
            raise Unavailable(
                f"storage error while reading: a data file could not be fetched ({type(exc).__name__})"
            ) from None

    def _attach_lance(
        self, cursor: duckdb.DuckDBPyConnection, database: SnapshotDatabase, names: set[str]
    ) -> None:
        """Register the Lance tables a query reads on its cursor, each at one version for the whole query."""
        for name in database.lance_names(names):
            cursor.register(name, self.vectors.dataset(name, database.lance[name].version))

    def _batches(self, reader: pa.RecordBatchReader, query: RunningQuery) -> Iterator[pa.RecordBatch]:
        prefetch = query.prefetch = Prefetcher(reader, self._budget, lambda: self._close(query))
        try:
            yield from prefetch.batches(query.is_cancelled)
        except GeneratorExit:
            query.stop_reason = query.stop_reason or "cancelled"
            raise
        except BaseException as exc:
            raise self._client_error(exc, query) from None
        finally:
            prefetch.stop(query.cursor)
            self._finish(query)

    def _finish(self, query: RunningQuery) -> None:
        """Stop watching ``query`` and close it, unless its abandoned planning closes it later."""
        self._watchdog.forget(query)
        if not query.abandoned:
            self._close(query)

    def _close(self, query: RunningQuery) -> None:
        """Close the query's cursor and give its leases back (once; later calls do nothing)."""
        with self._closing:
            if query.finished:
                return
            query.finished = True
        try:
            query.cursor.close()
        except duckdb.Error:
            log.debug("closing a cursor failed", exc_info=True)
        query.files.release()
        query.pinned.lease.release()
        self.running.give_back()

    def _private(self) -> list[str]:
        """The server's storage root and the directory of its copies of data files, if any."""
        return [self._storage_root, *([self.files.location] if self.files.location else [])]

    def _redact(self, text: str) -> str:
        """``text`` without the server's storage root (nor its copies' directory)."""
        for private in self._private():
            text = text.replace(private, "<storage>")
        return text

    def _redacted(self, exc: BaseException) -> BaseException:
        """A client-facing error with the storage root removed from its message."""
        message = str(exc)
        if not any(private in message for private in self._private()):
            return exc
        return type(exc)(self._redact(message))

    def _client_error(self, exc: BaseException, query: RunningQuery | None) -> BaseException:
        """The client-facing error for a DuckDB failure (server paths removed)."""
        reason = query.stop_reason if query else None
        if reason == "timeout":
            return TimedOut(f"query exceeded the time limit of {self.settings.query_timeout_seconds:g} s")
        if reason == "shutdown":
            return Unavailable("the server is shutting down; retry on another server or later")
        if isinstance(exc, ResultTooLarge):  # retrying cannot help: the query's values are too large
            return InvalidArgument(str(exc))
        if reason == "cancelled" or isinstance(exc, duckdb.InterruptException):
            return Cancelled("query cancelled")
        if isinstance(exc, ClientError | flight.FlightError):
            return self._redacted(exc)
        if not isinstance(exc, duckdb.Error | OSError | pa.ArrowException):
            return exc
        text = str(exc)
        if from_lance(text):  # a Lance scan failed (e.g. on a filter pushed down to it)
            message = f"reading a Lance table failed: {lance_message(text, self._storage_root)}"
        else:
            message = self._redact(first_line(exc))
        if isinstance(exc, duckdb.OutOfMemoryException):
            return Unavailable(f"query ran out of memory: {message}")
        if self._storage_fault(exc, message):
            log.warning("query storage error: %s", exc)
            return Unavailable(f"storage error while reading: {message}")
        if isinstance(exc, duckdb.PermissionException):
            return InvalidArgument("queries may read registered datasets only")
        return InvalidArgument(message)

    def _storage_fault(self, exc: BaseException, message: str) -> bool:
        """Whether a query failed because storage could not be read (not because of the query)."""
        if isinstance(exc, duckdb.IOException | duckdb.HTTPException):
            return True
        if isinstance(exc, duckdb.PermissionException):  # one of our snapshot files could not be opened
            return any(private in str(exc) for private in self._private())
        # DuckDB's error re-raised by the Arrow stream reader keeps only its message
        return not isinstance(exc, duckdb.Error) and message.startswith(("IO Error", "HTTP Error"))
