"""The serving layer in front of the Lance tables: which tables are in memory, kept current, in budget.

Lance stays the source of truth; this is its buffer pool. :class:`VectorCache` builds a
:class:`~flight_lakehouse.vector_memory.ServedTable` for each Lance table with one vector column on a
background thread (the server answers at once; Lance serves until a table is warm), within
``vector_cache_mb``. Every commit by this server is followed before its call returns (small deltas at
once; large ones in the background while Lance serves); writes by other processes are noticed within
``lance_refresh_seconds``. The graph of a table is saved beside it as one object tagged with its Lance
version, so a restart loads it and catches up instead of rebuilding.
"""

from __future__ import annotations

import logging
import threading
import time
import zipfile
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa

from flight_lakehouse.datasets.lance import LanceTables
from flight_lakehouse.errors import NotFound, TimedOut, Unavailable
from flight_lakehouse.process import large_work_finished
from flight_lakehouse.query import Watchdog, WatchedCursor
from flight_lakehouse.sandbox import database_config
from flight_lakehouse.settings import Settings
from flight_lakehouse.vector_memory import (
    BuildStopped,
    GraphSettings,
    ServedTable,
    estimated_bytes,
    fragment_batches,
    read_saved,
    training_sample,
)
from flight_lakehouse.vectors import table_metric, vector_columns

if TYPE_CHECKING:
    import lance

log = logging.getLogger(__name__)

GRAPH_SUFFIX = ".hnsw.npz"
SLOT = "__slot"
#: A commit adding more rows than this is followed in the background (Lance serves meanwhile).
SYNC_ROWS = 20_000
#: Tombstones past this share of the slots (or rows past this multiple of the training rows) rebuild.
REBUILD_TOMBSTONES = 0.2
RETRAIN_GROWTH = 4


@dataclass
class CacheEntry:
    """One table's place in the cache."""

    state: str  # "building", "warm", "over budget", "failed", "not served"
    served: ServedTable | None = None
    detail: str | None = None
    estimate: int = 0
    dropped: threading.Event = field(default_factory=threading.Event)  # stops its build


def filter_database(settings: Settings) -> duckdb.DuckDBPyConnection:
    """The DuckDB database evaluating search filters on in-memory rows, locked down as query databases
    are: no external access, no extension loading, the query memory limit, configuration locked."""
    connection = duckdb.connect(":memory:", config=database_config(settings, enable_external_access=False))
    connection.execute("SET lock_configuration = true")
    return connection


class VectorCache:
    """Keeps Lance tables in memory for search, within the memory budget."""

    def __init__(self, tables: LanceTables, settings: Settings) -> None:
        self.tables = tables
        self.budget = settings.vector_cache_mb << 20
        self.refresh_seconds = settings.lance_refresh_seconds
        self.graph_settings = GraphSettings(
            m=settings.vector_graph_m,
            ef_construction=settings.vector_graph_ef_construction,
            ef_search=settings.vector_graph_ef_search,
            code_bits=settings.vector_graph_code_bits,
        )
        self._entries: dict[str, CacheEntry] = {}
        self._queue: dict[str, None] = {}
        self._guard = threading.Condition()
        self._filters = filter_database(settings)
        self.filter_seconds = settings.query_timeout_seconds
        self._watchdog = Watchdog()
        tables.on_commit.append(self.committed)
        tables.on_drop.append(self.forget)
        tables.on_describe.append(self.describe)
        threading.Thread(target=self._work, name="vector-cache", daemon=True).start()
        for name in tables.names():
            self.track(name)

    # -- what searches use -----------------------------------------------------------------------
    def served(self, name: str) -> ServedTable | None:
        """The in-memory copy of ``name`` when it covers the version searches must see."""
        entry = self._entries.get(name)
        if entry is None or entry.state != "warm" or entry.served is None:
            return None
        if entry.served.version != self.tables.version(name):
            return None
        return entry.served

    def allowed(self, served: ServedTable, predicate: str) -> np.ndarray:
        """The slots whose row passes ``predicate`` (already checked by the sandbox), as a mask."""
        with served.lock.reading():
            size = served.size
            rows = served.columns.append_column(SLOT, pa.array(np.arange(size, dtype=np.int64)))
        cursor = self._filters.cursor()
        # the one watchdog thread stops it at the limit (a timer thread a search cost ~130 us)
        watched = WatchedCursor(cursor, time.monotonic() + self.filter_seconds)
        self._watchdog.watch(watched)
        try:
            cursor.register("rows", rows)
            found = cursor.sql(f"SELECT {SLOT} FROM rows WHERE ({predicate}\n)").fetchnumpy()[SLOT]
        except duckdb.InterruptException:
            raise TimedOut(f"search filter exceeded the time limit of {self.filter_seconds:g} s") from None
        except duckdb.OutOfMemoryException:
            raise Unavailable("search filter ran out of memory") from None
        finally:
            self._watchdog.forget(watched)
            cursor.close()
        mask = np.zeros(size, dtype=bool)
        mask[np.asarray(found, dtype=np.int64)] = True
        return mask

    def describe(self, name: str, facts: dict[str, Any]) -> None:
        """Add how the table is served to its ``describe_dataset`` facts."""
        facts["serving"] = self.facts(name)

    def facts(self, name: str) -> dict[str, Any]:
        """How ``describe_dataset`` shows the serving of ``name``."""
        entry = self._entries.get(name)
        if entry is None:
            return {"from": "lance", "state": "not served"}
        served = entry.served
        facts: dict[str, Any] = {
            "from": "memory" if self.served(name) is not None else "lance",
            "state": entry.state,
            "budget_bytes": self.budget,
        }
        if entry.detail:
            facts["detail"] = entry.detail
        if served is not None:
            facts.update(
                bytes=served.nbytes,
                vector_file_bytes=served.vectors.nbytes,
                version=served.version,
                rows=served.live,
                tombstones=served.tombstones,
            )
        elif entry.estimate:
            facts["estimated_bytes"] = entry.estimate
        return facts

    # -- following the tables --------------------------------------------------------------------
    def track(self, name: str) -> None:
        """Serve ``name`` from memory once it is built (in the background)."""
        with self._guard:
            self._entries.setdefault(name, CacheEntry("building"))
            self._queue[name] = None
            self._guard.notify()

    def forget(self, name: str) -> None:
        """Stop serving a dropped table and delete its saved graph; tables over budget may fit now."""
        with self._guard:
            entry = self._entries.pop(name, None)
            self._queue.pop(name, None)
            if entry is not None:
                entry.dropped.set()
            waiting = [other for other, kept in self._entries.items() if kept.state == "over budget"]
        self.tables.storage.delete_files([self.graph_uri(name)])
        for other in waiting:
            self.track(other)

    def committed(self, name: str) -> None:
        """Follow a commit by this server before its call returns (a large one in the background)."""
        entry = self._entries.get(name)
        served = entry.served if entry is not None else None
        if entry is None or served is None or entry.state != "warm":
            self.track(name)
            return
        dataset = self.tables.dataset(name)
        if served.pending_rows(dataset) > SYNC_ROWS:
            with self._guard:
                entry.state = "building"  # Lance serves until the background catch-up is done
            self.track(name)
            return
        served.catch_up(dataset)
        if self._needs_rebuild(served):
            self.track(name)

    def _needs_rebuild(self, served: ServedTable) -> bool:
        return served.tombstones > REBUILD_TOMBSTONES * max(
            served.size, 1
        ) or served.size > RETRAIN_GROWTH * max(served.trained_rows, 1)

    def _work(self) -> None:
        next_check = time.monotonic() + self.refresh_seconds
        while True:
            with self._guard:
                while not self._queue:
                    if not self._guard.wait(timeout=max(0.0, next_check - time.monotonic())):
                        break
                name = next(iter(self._queue), None)
                if name is not None:
                    del self._queue[name]
            if name is None:
                self._notice_other_writers()
                next_check = time.monotonic() + self.refresh_seconds
            else:
                self._handle(name)

    def _handle(self, name: str) -> None:
        """Refresh ``name``'s copy; a method of its own so that no local of the worker loop outlives the work
        (one would keep a dropped table's copy, ~70 MB at 100k x 384, until the next commit)."""
        entry = self._entries.get(name)
        try:
            self._refresh(name)
        except Exception as exc:
            # stopped, or its files went before the drop told the cache (the name goes first)
            if entry is not None and (entry.dropped.is_set() or not self.tables.exists(name)):
                log.info("building %s in memory stopped: the table was dropped", name)
            elif isinstance(exc, NotFound):
                self.forget(name)
            else:
                self._failed(name, exc)

    def _failed(self, name: str, exc: Exception) -> None:
        log.warning("serving %s from memory failed: %s", name, exc, exc_info=True)
        entry = self._entries.get(name)
        if entry is not None:
            entry.state, entry.served, entry.detail = "failed", None, str(exc).splitlines()[0][:300]

    def _notice_other_writers(self) -> None:
        """Queue the tables whose Lance version moved without this server (another process wrote)."""
        for name, entry in list(self._entries.items()):
            try:
                moved = entry.served is not None and entry.served.version != self.tables.refresh_version(name)
            except NotFound:  # dropped by another server: the tables told :meth:`forget`
                continue
            if moved:
                self.track(name)

    def _refresh(self, name: str) -> None:
        """Build, load, catch up or rebuild the in-memory copy of ``name``."""
        entry = self._entries.get(name)
        if entry is None:
            return
        dataset = self.tables.dataset(name)
        served = entry.served
        if served is not None and not self._needs_rebuild(served):
            served.catch_up(dataset)
            entry.state = "warm"
            if self._needs_rebuild(served):  # the catch-up was large (e.g. an overwrite)
                self.track(name)
            return
        schema = self.tables.schema(name)
        vectors = vector_columns(schema)
        if len(vectors) != 1:
            entry.state, entry.detail = (
                "not served",
                "only tables with one vector column are served from memory",
            )
            return
        entry.estimate = estimated_bytes(
            dataset.count_rows(), next(iter(vectors.values())), self.graph_settings
        )
        if entry.estimate > self.budget - self._used(excluding=name):
            entry.state, entry.served = "over budget", None
            return
        fresh = self._load(name, dataset) if served is None else None
        if fresh is None:
            fresh = self._build(name, schema, dataset, entry.dropped)
            if entry.dropped.is_set():  # no graph file for a table that is gone
                raise BuildStopped(name)
            self._save(fresh)
        fresh.catch_up(self.tables.dataset(name), entry.dropped)  # commits made while it was being built
        large_work_finished()  # the build's temporaries, before the copy is announced warm
        entry.served, entry.state, entry.detail = fresh, "warm", None
        # a commit went to the copy being replaced, or a loaded graph caught up on many changes
        if fresh.version != self.tables.version(name) or self._needs_rebuild(fresh):
            self.track(name)

    def usage(self) -> tuple[int, dict[str, int]]:
        """Bytes the in-memory tables hold, and how many tables are in each state (``warm``: served from
        memory), for the metrics."""
        with self._guard:
            entries = list(self._entries.values())
        states: dict[str, int] = {}
        for entry in entries:
            states[entry.state] = states.get(entry.state, 0) + 1
        return sum(entry.served.nbytes for entry in entries if entry.served is not None), states

    def _used(self, excluding: str) -> int:
        with self._guard:
            entries = [entry for name, entry in self._entries.items() if name != excluding]
        return sum(entry.served.nbytes for entry in entries if entry.served is not None)

    def _build(
        self, name: str, schema: pa.Schema, dataset: lance.LanceDataset, dropped: threading.Event
    ) -> ServedTable:
        started = time.monotonic()
        column = next(iter(vector_columns(schema)))
        served = ServedTable.empty(name, schema, column, table_metric(schema), self.graph_settings)
        rows = dataset.count_rows()
        if rows:
            served.train(training_sample(dataset, column, served.dimension))
        served.catch_up(dataset, dropped)
        served.trained_rows = served.size  # grown 4x past this, a rebuild retrains
        log.info("%s in memory: %d rows in %.1f s", name, served.size, time.monotonic() - started)
        return served

    # -- saved graphs ----------------------------------------------------------------------------
    def graph_uri(self, name: str) -> str:
        """Where the graph of ``name`` is saved: one object beside the Lance table."""
        return f"{self.tables.storage.lance_uri}/{name}{GRAPH_SUFFIX}"

    def _save(self, served: ServedTable) -> None:
        try:
            self.tables.storage.write_atomically(self.graph_uri(served.name), served.save)
        except OSError as exc:  # serving goes on; the next start rebuilds
            log.warning("could not save the graph of %s: %s", served.name, exc)

    def _load(self, name: str, latest: lance.LanceDataset) -> ServedTable | None:
        """The saved graph of ``name`` with its rows re-read from Lance at the graph's version, if usable."""
        try:
            with self.tables.storage.open_local(self.graph_uri(name)) as file:
                saved = read_saved(file)
        except (OSError, KeyError, ValueError, RuntimeError, zipfile.BadZipFile):  # missing, damaged: rebuild
            return None
        try:
            version = int(saved["facts"][0])
            at_version = self.tables.dataset(name, version)
            served = ServedTable.restore(
                name,
                saved,
                self.tables.schema(name),
                lambda fragment_id: fragment_batches(at_version.get_fragment(fragment_id)),
                self.graph_settings,
            )
        except (NotFound, KeyError, ValueError, AttributeError, zipfile.BadZipFile) as exc:
            log.info("the saved graph of %s is not usable (%s); rebuilding", name, exc)
            return None
        if served is not None:
            served.catch_up(latest)
            log.info("%s in memory from its saved graph of version %d", name, version)
        return served
