"""SQL over the datasets: DuckDB on the current snapshots, streamed batch by batch, sandboxed.

Each distinct state of the catalog (the set of current metadata files) gets its own in-memory DuckDB
database with one view per dataset over exactly that snapshot's Parquet files. A query takes the
database current when it starts and a cursor of its own, so it sees one snapshot of every dataset
(read-your-writes on this server, never a mix) and runs in parallel with the others.
"""

from __future__ import annotations

import logging
import queue
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.catalog import DatasetCatalog, SnapshotFiles
from flight_lakehouse.commands import ScanRequest
from flight_lakehouse.errors import Cancelled, ClientError, InvalidArgument, NotFound, TimedOut, Unavailable
from flight_lakehouse.sandbox import check_predicate, check_select, first_line
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Storage, quote_literal
from flight_lakehouse.vectors import VectorTables

log = logging.getLogger(__name__)

BATCH_ROWS = 128 * 1024


def quote_identifier(name: str) -> str:
    """A DuckDB identifier literal."""
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class LanceView:
    """A Lance table as a query sees it: its schema, and the version to read (current when None)."""

    schema: pa.Schema
    version: int | None = None


class SnapshotDatabase:
    """An in-memory DuckDB database whose views are the datasets at fixed snapshots, locked down.

    Lance tables are not views of the database: each query registers the Lance datasets it reads on its
    own cursor, at their version when the query starts (see :meth:`QueryEngine._attach_lance`).
    """

    def __init__(
        self,
        views: dict[str, SnapshotFiles],
        storage: Storage,
        settings: Settings,
        temp_dir: str,
        lance: dict[str, LanceView] | None = None,
    ):
        self.views = views
        self.lance = lance or {}
        config: dict[str, str | int | bool] = {
            "temp_directory": temp_dir,
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
        }
        if settings.query_threads:
            config["threads"] = settings.query_threads
        if settings.query_memory_mb:
            config["memory_limit"] = f"{settings.query_memory_mb}MB"
        self._connection = duckdb.connect(":memory:", config=config)
        storage.configure_duckdb(self._connection)
        self._paths = {
            name: [storage.scan_path(uri) for uri in snapshot.files] for name, snapshot in views.items()
        }
        self._by_lower = {name.lower(): name for name in [*views, *self.lance]}
        self.names = set(self._by_lower)  # what queries may read, lower-case (SQL names are case-insensitive)
        self._created: set[str] = set()
        self._views_guard = threading.Lock()
        self._lock_down([path for paths in self._paths.values() for path in paths])

    def schema_of(self, name: str) -> pa.Schema:
        """The schema of a dataset of this database."""
        return self.lance[name].schema if name in self.lance else self.views[name].schema

    def lance_names(self, names: set[str]) -> list[str]:
        """The Lance tables among ``names`` (lower-case), by their stored names."""
        return [self._by_lower[lower] for lower in sorted(names) if self._by_lower.get(lower) in self.lance]

    def prepare(self, names: set[str]) -> None:
        """Create the views of the datasets a query reads (lower-case names), once each.

        Views are made on first use, so a query never opens a dataset it does not read: one unreadable
        dataset (or S3 being down) does not break queries on the others.
        """
        with self._views_guard:
            for lower in sorted(names):
                name = self._by_lower.get(lower)
                if name is not None and name not in self._created and name not in self.lance:
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


@dataclass
class RunningQuery:
    """A query in flight, watched for cancellation and its deadline."""

    # Held until the query ends, so that a superseded database outlives every cursor still reading it.
    database: SnapshotDatabase
    cursor: duckdb.DuckDBPyConnection
    deadline: float
    #: Asks the query's Flight call whether the client went away; valid only while the call runs, so it
    #: is asked by the watchdog only until the call hands its stream over, then by the stream itself.
    is_cancelled: Callable[[], bool]
    stop_reason: str | None = None
    key: int = field(default=0)
    starting: bool = True  # the call is still inside DoGet (the watchdog may ask is_cancelled)
    finished: bool = False


class Watchdog:
    """Interrupts queries whose client went away or whose time is up."""

    def __init__(self, interval: float = 0.05) -> None:
        self._interval = interval
        self._queries: dict[int, RunningQuery] = {}
        self._guard = threading.Lock()
        self._next_key = 0
        self._thread = threading.Thread(target=self._run, name="query-watchdog", daemon=True)
        self._thread.start()

    def watch(self, query: RunningQuery) -> None:
        """Start watching a query."""
        with self._guard:
            self._next_key += 1
            query.key = self._next_key
            self._queries[query.key] = query

    def forget(self, query: RunningQuery) -> None:
        """Stop watching a query."""
        with self._guard:
            self._queries.pop(query.key, None)

    def streaming(self, query: RunningQuery) -> None:
        """The query's call is about to hand its stream over: from now on only its deadline is watched
        here (the stream checks for cancellation itself, on the call's own thread)."""
        with self._guard:
            query.starting = False

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

    @staticmethod
    def _check(query: RunningQuery, now: float) -> None:
        try:
            if query.starting and query.is_cancelled():
                query.stop_reason = "cancelled"
            elif now > query.deadline:
                query.stop_reason = "timeout"
            if query.stop_reason is not None:
                query.cursor.interrupt()
        except Exception:  # a cursor closed under our feet has nothing left to interrupt
            log.debug("interrupting a query failed", exc_info=True)


class Prefetcher:
    """Reads the next batches from DuckDB on a thread of its own while the current one is being sent.

    Sending a batch (IPC encoding, gRPC) and producing the next (DuckDB) then overlap; at most
    ``depth`` batches wait in between, so memory stays bounded.
    """

    _END = object()

    def __init__(self, reader: pa.RecordBatchReader, depth: int = 2) -> None:
        self._reader = reader
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="query-prefetch", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            for batch in self._reader:
                if not self._offer(batch):
                    return
            self._offer(self._END)
        except BaseException as exc:
            self._offer(exc)

    def _offer(self, item: object) -> bool:
        while not self._stopped.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def batches(self, is_cancelled: Callable[[], bool]) -> Iterator[pa.RecordBatch]:
        """The batches in order; while waiting for one, ``is_cancelled`` is asked every 50 ms and a
        cancelled call raises :class:`Cancelled`."""
        while True:
            try:
                item = self._queue.get(timeout=0.05)
            except queue.Empty:
                if is_cancelled():
                    raise Cancelled("the client cancelled the query") from None
                continue
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item  # type: ignore[misc]

    def stop(self, cursor: duckdb.DuckDBPyConnection) -> None:
        """Stop producing: interrupt DuckDB if the producer is still inside it, and wait for the thread."""
        self._stopped.set()
        if self._thread.is_alive():
            cursor.interrupt()
            self._thread.join(10)


@dataclass(frozen=True)
class CallHooks:
    """What a query needs of the Flight call that runs it."""

    is_cancelled: Callable[[], bool]


@dataclass
class QueryStream:
    """A started query: its schema and its batches (consumed once)."""

    schema: pa.Schema
    batches: Iterator[pa.RecordBatch]


class QueryEngine:
    """Runs SQL and scans on DuckDB over the catalog's current snapshots."""

    def __init__(self, catalog: DatasetCatalog, settings: Settings, vectors: VectorTables) -> None:
        self.catalog = catalog
        self.settings = settings
        self.vectors = vectors
        self._temp_dir = tempfile.TemporaryDirectory(prefix="lakehouse-duckdb-", ignore_cleanup_errors=True)
        self._database: tuple[frozenset[tuple[str, str]], SnapshotDatabase] | None = None
        self._guard = threading.Lock()
        self._watchdog = Watchdog()
        self._storage_root = catalog.storage.root_uri

    def close(self) -> None:
        """Delete DuckDB's spill directory (``serve`` ends with ``os._exit``: no finaliser runs)."""
        self._temp_dir.cleanup()

    # -- databases -------------------------------------------------------------------------------
    def current_database(self) -> SnapshotDatabase:
        """The database of the catalog's current state, built when the state changed."""
        return self._current()[1]

    def _current(self) -> tuple[dict[str, str], SnapshotDatabase]:
        """The current metadata file of every dataset (one catalog query), and the database over them."""
        locations = self.catalog.metadata_locations()
        # Lance tables change the set of names only when one is created or dropped: the generation says so
        state = frozenset([*locations.items(), ("lance generation", str(self.vectors.generation))])
        with self._guard:
            if self._database is None or self._database[0] != state:
                views = {name: self.catalog.snapshot_files(location) for name, location in locations.items()}
                lance = {name: LanceView(self.vectors.schema(name)) for name in self.vectors.names()}
                self._database = (state, self._build(views, lance))
            return locations, self._database[1]

    def _build(
        self, views: dict[str, SnapshotFiles], lance: dict[str, LanceView] | None = None
    ) -> SnapshotDatabase:
        return SnapshotDatabase(views, self.catalog.storage, self.settings, self._temp_dir.name, lance)

    def scan_database(self, request: ScanRequest) -> SnapshotDatabase:
        """A database with the scanned dataset, at the requested snapshot when there is one."""
        locations, database = self._current()
        location = locations.get(request.dataset)
        if location is None and request.dataset not in database.lance:
            raise NotFound(f"dataset {request.dataset!r} not found")
        if request.snapshot_id is None:
            return database
        if location is None:  # a Lance table: snapshots are its versions
            self.vectors.dataset(request.dataset, request.snapshot_id)  # NOT_FOUND for unknown versions
            lance = {request.dataset: LanceView(database.lance[request.dataset].schema, request.snapshot_id)}
            return self._build({}, lance)
        return self._build({request.dataset: self.catalog.snapshot_files(location, request.snapshot_id)})

    # -- statements ------------------------------------------------------------------------------
    def scan_sql(self, request: ScanRequest, database: SnapshotDatabase) -> str:
        """The SELECT a scan ticket stands for, with its columns checked."""
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

    def schema(self, sql: str, database: SnapshotDatabase | None = None) -> pa.Schema:
        """The result schema of ``sql``, without running it."""
        database = database or self.current_database()
        cursor = database.cursor()
        try:
            self._prepare(cursor, database, check_select(cursor, sql, database.names))
            return cursor.sql(sql).limit(0).to_arrow_table().schema
        except BaseException as exc:
            raise self._client_error(exc, None) from None
        finally:
            cursor.close()

    def run(self, sql: str, call: CallHooks, database: SnapshotDatabase | None = None) -> QueryStream:
        """Start ``sql``; the batches are produced as the client reads them."""
        database = database or self.current_database()
        cursor = database.cursor()
        deadline = time.monotonic() + self.settings.query_timeout_seconds
        query = RunningQuery(database, cursor, deadline, call.is_cancelled)
        self._watchdog.watch(query)
        try:
            self._prepare(cursor, database, check_select(cursor, sql, database.names))
            reader = cursor.sql(sql).to_arrow_reader(BATCH_ROWS)
        except BaseException as exc:
            self._finish(query)
            raise self._client_error(exc, query) from None
        self._watchdog.streaming(query)
        batches = self._batches(reader, query)
        # a stream dropped before its first batch never runs its ``finally``: finish when it is freed
        weakref.finalize(batches, self._finish, query)
        return QueryStream(reader.schema, batches)

    def _prepare(
        self, cursor: duckdb.DuckDBPyConnection, database: SnapshotDatabase, names: set[str]
    ) -> None:
        """Make the datasets a query reads visible to its cursor."""
        database.prepare(names)
        self._attach_lance(cursor, database, names)

    def _attach_lance(
        self, cursor: duckdb.DuckDBPyConnection, database: SnapshotDatabase, names: set[str]
    ) -> None:
        """Register the Lance tables a query reads on its cursor, each at one version for the whole query."""
        for name in database.lance_names(names):
            cursor.register(name, self.vectors.dataset(name, database.lance[name].version))

    def _batches(self, reader: pa.RecordBatchReader, query: RunningQuery) -> Iterator[pa.RecordBatch]:
        prefetch = Prefetcher(reader)
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
        """Stop watching ``query`` and close its cursor (once; later calls do nothing)."""
        self._watchdog.forget(query)
        if query.finished:
            return
        query.finished = True
        try:
            query.cursor.close()
        except duckdb.Error:
            log.debug("closing a cursor failed", exc_info=True)

    def _redact(self, text: str) -> str:
        """``text`` without the server's storage root."""
        return text.replace(self._storage_root, "<storage>")

    def _redacted(self, exc: BaseException) -> BaseException:
        """A client-facing error with the storage root removed from its message."""
        message = str(exc)
        if self._storage_root not in message:
            return exc
        return type(exc)(self._redact(message))

    def _client_error(self, exc: BaseException, query: RunningQuery | None) -> BaseException:
        """The client-facing error for a DuckDB failure (server paths removed)."""
        reason = query.stop_reason if query else None
        if reason == "timeout":
            return TimedOut(f"query exceeded the time limit of {self.settings.query_timeout_seconds:g} s")
        if reason == "cancelled" or isinstance(exc, duckdb.InterruptException):
            return Cancelled("query cancelled")
        if isinstance(exc, ClientError | flight.FlightError):
            return self._redacted(exc)
        if not isinstance(exc, duckdb.Error | OSError | pa.ArrowException):
            return exc
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
            return self._storage_root in str(exc)
        # DuckDB's error re-raised by the Arrow stream reader keeps only its message
        return not isinstance(exc, duckdb.Error) and message.startswith(("IO Error", "HTTP Error"))
