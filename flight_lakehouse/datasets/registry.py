"""The registry: the one namespace of datasets over the table formats, and the format of each."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa

from flight_lakehouse.access import check_writable, visible
from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.datasets.base import Retention, TableFormat
from flight_lakehouse.datasets.iceberg import IcebergTables
from flight_lakehouse.datasets.lance import LanceTables
from flight_lakehouse.errors import AlreadyExists, InvalidArgument, NotFound
from flight_lakehouse.limits import Slots
from flight_lakehouse.process import large_work_finished


class Datasets:
    """Every dataset, whatever its format: names are one case-insensitive namespace (SQL's), each dataset
    has one write lock, and the registry alone decides which format a dataset is in."""

    def __init__(self, iceberg: IcebergTables, lance: LanceTables, ingests: Slots | None = None) -> None:
        self.iceberg = iceberg
        self.lance = lance
        #: Uploads being written at once (a new one past the limit is refused, not queued).
        self.ingests = ingests or Slots(1_000_000, "uploads", "max_concurrent_ingests")
        #: In the order they are asked to claim a new dataset: the last takes what no other claims.
        self.formats: tuple[TableFormat, ...] = (lance, iceberg)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    # -- the namespace ---------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every dataset the caller sees, sorted."""
        return sorted(name for table_format in self.formats for name in table_format.names() if visible(name))

    def find(self, name: str) -> str | None:
        """The stored name equal to ``name`` ignoring case, if any."""
        wanted = name.lower()
        return next((stored for stored in self.names() if stored.lower() == wanted), None)

    @contextmanager
    def write_lock(self, name: str) -> Iterator[None]:
        """Serialise creations, commits and drops of one dataset (names differing in case share a lock), in
        this server and, on a PostgreSQL catalog, across the servers sharing it."""
        with self._locks_guard:
            lock = self._locks.setdefault(name.lower(), threading.Lock())
        with lock, self.iceberg.catalog.server_lock(name):
            yield

    def refuse_taken(self, name: str) -> None:
        """Refuse to create ``name`` when a dataset of that name ignoring case exists, in any format (the
        caller creates it in a format that does not hold it: one of that exact name was made in another)."""
        twin = self.find(name)
        if twin == name:
            raise AlreadyExists(
                f"dataset {name!r} was created meanwhile in another format; nothing was written"
            )
        if twin is not None:
            raise AlreadyExists(
                f"dataset {twin!r} exists; names are case-insensitive in SQL, so {name!r} is refused"
            )

    # -- the format of a dataset -----------------------------------------------------------------
    def format_of(self, name: str) -> TableFormat | None:
        """The format holding dataset ``name`` (exact name), if it exists and the caller sees it."""
        if not visible(name):
            return None
        return next((table_format for table_format in self.formats if table_format.exists(name)), None)

    def table_format(self, name: str) -> TableFormat:
        """The format holding dataset ``name``, or NOT_FOUND."""
        table_format = self.format_of(name)
        if table_format is None:
            raise NotFound(f"dataset {name!r} not found")
        return table_format

    def vector_table(self, name: str, doing: str) -> LanceTables:
        """The Lance tables, once ``name`` is one of them: ``doing`` serves only those."""
        if self.table_format(name) is not self.lance:
            raise InvalidArgument(f"{doing} serves Lance tables; dataset {name!r} is Parquet")
        return self.lance

    def format_for_upload(self, options: IngestOptions, schema: pa.Schema) -> TableFormat:
        """Where an upload goes: the existing dataset's format, else the first format that claims it."""
        existing = self.format_of(options.dataset)
        if existing is None:
            return next(table_format for table_format in self.formats if table_format.claims(options, schema))
        if options.format is not None and options.format != existing.kind:
            current = "a Lance table" if existing is self.lance else "Parquet"
            raise InvalidArgument(
                f"dataset {options.dataset!r} is {current}; format {options.format!r} does not apply"
            )
        return existing

    # -- what the actions and handlers ask -------------------------------------------------------
    def write(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> dict[str, Any]:
        """Write one upload as one commit, in the dataset's format (then its temporaries go back to the
        system: :func:`~flight_lakehouse.process.large_work_finished`)."""
        check_writable(options.dataset)
        with self.ingests.held():
            try:
                return self.format_for_upload(options, schema).write(options, schema, batches, self)
            finally:
                large_work_finished()

    def summarise(self, name: str) -> dict[str, Any]:
        """The dataset's ``list_datasets`` entry."""
        return self.table_format(name).summarise(name)

    def list_datasets(self) -> list[dict[str, Any]]:
        """One summary per dataset, sorted by name."""
        return [table_format.summarise(name) for name, table_format in self._by_name()]

    def describe(self, name: str) -> dict[str, Any]:
        """Schema and facts of one dataset."""
        return self.table_format(name).describe(name)

    def history(self, name: str) -> list[dict[str, Any]]:
        """The dataset's snapshots or versions, newest first."""
        return self.table_format(name).history(name)

    def schema(self, name: str) -> pa.Schema:
        """The dataset's current Arrow schema."""
        return self.table_format(name).schema(name)

    def expire(self, name: str, retention: Retention) -> dict[str, Any]:
        """Let go of the dataset's snapshots or versions that ``retention`` does not keep."""
        check_writable(name)
        with self.write_lock(name):
            return self.table_format(name).expire(name, retention)

    def optimize(self, name: str, retention: Retention) -> dict[str, Any]:
        """The ``optimize`` action on ``name``, in its format."""
        check_writable(name)
        return self.table_format(name).optimize(name, retention, self)

    def drop(self, name: str, if_exists: bool) -> bool:
        """Drop a dataset; False when it does not exist and ``if_exists`` allows that, else NOT_FOUND."""
        with self.write_lock(name):
            table_format = self.format_of(name)
            if table_format is None:
                if if_exists:
                    return False
                raise NotFound(f"dataset {name!r} not found")
            table_format.drop(name)
        return True

    def _by_name(self) -> list[tuple[str, TableFormat]]:
        by_name = [
            (name, table_format)
            for table_format in self.formats
            for name in table_format.names()
            if visible(name)
        ]
        return sorted(by_name, key=lambda entry: entry[0])
