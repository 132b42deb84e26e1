"""The dataset catalog: Iceberg tables in a pyiceberg SQL catalog, one namespace, names as in the contract."""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import NamespaceAlreadyExistsError, NoSuchTableError
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.table import StaticTable, Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from flight_lakehouse.errors import AlreadyExists, NotFound
from flight_lakehouse.schema_types import storage_schema
from flight_lakehouse.storage import Storage

log = logging.getLogger(__name__)

CATALOG_NAME = "lakehouse"
NAMESPACE = "lakehouse"


@dataclass(frozen=True)
class SnapshotFiles:
    """The data files and Arrow schema of one snapshot of a dataset."""

    schema: pa.Schema
    files: tuple[str, ...]
    snapshot_id: int | None


class DatasetCatalog:
    """Datasets as Iceberg tables; the single place that talks to the pyiceberg catalog."""

    def __init__(self, storage: Storage, catalog_uri: str | None = None) -> None:
        self.storage = storage
        self.iceberg = SqlCatalog(
            CATALOG_NAME,
            uri=catalog_uri or storage.default_catalog_uri(),
            warehouse=storage.uri("tables"),
            **storage.iceberg_properties(),
        )
        with contextlib.suppress(NamespaceAlreadyExistsError):
            self.iceberg.create_namespace(NAMESPACE)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._snapshot_cache: dict[tuple[str, int | None], SnapshotFiles] = {}
        #: Names of the datasets kept elsewhere (the Lance tables): one namespace for both.
        self.other_names: Callable[[], list[str]] = list

    # -- names and locks -------------------------------------------------------------------------
    @staticmethod
    def identifier(name: str) -> tuple[str, str]:
        """The Iceberg identifier of a dataset."""
        return (NAMESPACE, name)

    def table_location(self, name: str) -> str:
        """Where a dataset's data and metadata files are kept."""
        return self.storage.uri("tables", name)

    @contextmanager
    def write_lock(self, name: str) -> Iterator[None]:
        """Serialise commits to one dataset (names differing only in case share a lock)."""
        with self._locks_guard:
            lock = self._locks.setdefault(name.lower(), threading.Lock())
        with lock:
            yield

    # -- reads -----------------------------------------------------------------------------------
    def metadata_locations(self) -> dict[str, str]:
        """Every dataset with its current metadata file, in one catalog query."""
        statement = select(IcebergTables.table_name, IcebergTables.metadata_location).where(
            IcebergTables.catalog_name == CATALOG_NAME, IcebergTables.table_namespace == NAMESPACE
        )
        with Session(self.iceberg.engine) as session:
            return {name: location for name, location in session.execute(statement) if location}

    def names(self) -> list[str]:
        """All dataset names, sorted."""
        return sorted(self.metadata_locations())

    def find(self, name: str) -> str | None:
        """The stored name that equals ``name`` ignoring case (SQL names are case-insensitive)."""
        wanted = name.lower()
        return next((stored for stored in self.metadata_locations() if stored.lower() == wanted), None)

    def exists(self, name: str) -> bool:
        """Whether the dataset exists (exact name)."""
        return name in self.metadata_locations()

    def load(self, name: str) -> Table:
        """The dataset's table at its current metadata, or NOT_FOUND."""
        try:
            return self.iceberg.load_table(self.identifier(name))
        except NoSuchTableError:
            raise NotFound(f"dataset {name!r} not found") from None

    def snapshot_files(self, metadata_location: str, snapshot_id: int | None = None) -> SnapshotFiles:
        """Files and schema of a snapshot (the current one by default); cached, as snapshots are immutable."""
        key = (metadata_location, snapshot_id)
        cached = self._snapshot_cache.get(key)
        if cached is not None:
            return cached
        table = StaticTable.from_metadata(metadata_location, properties=self.iceberg.properties)
        result = files_of(table, snapshot_id)
        if len(self._snapshot_cache) > 4096:
            self._snapshot_cache.clear()
        self._snapshot_cache[key] = result
        return result

    # -- catalog actions -------------------------------------------------------------------------
    def list_datasets(self) -> list[dict[str, Any]]:
        """One summary per dataset, as the ``list_datasets`` action returns it."""
        return [summarise(name, self.load(name)) for name in self.names()]

    def describe(self, name: str) -> dict[str, Any]:
        """Schema and facts of one dataset."""
        table = self.load(name)
        facts = summarise(name, table)
        snapshot = table.current_snapshot()
        facts.update(
            {
                "schema": base64.b64encode(arrow_schema(table).serialize().to_pybytes()).decode("ascii"),
                "columns": [{"name": f.name, "type": str(f.type)} for f in arrow_schema(table)],
                "files": summary_int(snapshot.summary if snapshot else None, "total-data-files"),
                "snapshot_id": snapshot.snapshot_id if snapshot else None,
                "snapshots": len(table.metadata.snapshots),
                "format_version": table.metadata.format_version,
                "indexes": [],
            }
        )
        return facts

    def history(self, name: str) -> list[dict[str, Any]]:
        """The dataset's snapshots, newest first."""
        table = self.load(name)
        current = table.current_snapshot()
        rows = []
        for snapshot in sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True):
            summary = snapshot.summary
            rows.append(
                {
                    "snapshot_id": snapshot.snapshot_id,
                    "parent_id": snapshot.parent_snapshot_id,
                    "timestamp": iso_time(snapshot.timestamp_ms),
                    "operation": summary.operation.value if summary else None,
                    "added_rows": summary_int(summary, "added-records"),
                    "rows": summary_int(summary, "total-records"),
                    "current": current is not None and snapshot.snapshot_id == current.snapshot_id,
                }
            )
        return rows

    def drop(self, name: str, if_exists: bool) -> bool:
        """Drop a dataset: its name goes at once (and may be re-created); its files, as they are now, are
        deleted once no running query reads them (:class:`~flight_lakehouse.storage.ReadLeases`)."""
        location = self.table_location(name)
        with self.write_lock(name):
            if not self.exists(name):
                if if_exists:
                    return False
                raise NotFound(f"dataset {name!r} not found")
            found = self.storage.listing(location)
            self.iceberg.drop_table(self.identifier(name))
        delete = functools.partial(self.storage.delete_listed, location, found)
        now = self.storage.leases.delete_when_unread(name, delete)
        log.info("dropped dataset %s (files %s)", name, "deleted" if now else "kept for running queries")
        return True

    def refuse_case_twin(self, name: str) -> None:
        """Refuse to create ``name`` when a dataset of that name ignoring case exists, in either format."""
        twin = self.find(name)
        if twin is not None and twin != name:
            raise AlreadyExists(
                f"dataset {twin!r} exists; names are case-insensitive in SQL, so {name!r} is refused"
            )
        other = next((stored for stored in self.other_names() if stored.lower() == name.lower()), None)
        if other is not None:
            raise AlreadyExists(f"dataset {other!r} exists as a Lance table; {name!r} is refused")


def arrow_schema(table: Table) -> pa.Schema:
    """The dataset's current schema as Arrow, in the types its files are written with (no large types)."""
    return storage_schema(schema_to_pyarrow(table.schema(), include_field_ids=False))


def files_of(table: Table, snapshot_id: int | None) -> SnapshotFiles:
    """Data files of ``snapshot_id`` (current when None), with the schema that snapshot was written with."""
    if snapshot_id is not None and table.snapshot_by_id(snapshot_id) is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else table.current_snapshot()
    schema = table.schema()
    if snapshot is not None and snapshot.schema_id is not None:
        schema = table.schemas().get(snapshot.schema_id, schema)
    files: tuple[str, ...] = ()
    if snapshot is not None:
        tasks = table.scan(snapshot_id=snapshot.snapshot_id).plan_files()
        files = tuple(sorted(task.file.file_path for task in tasks))
    return SnapshotFiles(
        schema=schema_to_pyarrow(schema, include_field_ids=False),
        files=files,
        snapshot_id=snapshot.snapshot_id if snapshot else None,
    )


def summarise(name: str, table: Table) -> dict[str, Any]:
    """The ``list_datasets`` entry of one table."""
    snapshot = table.current_snapshot()
    summary = snapshot.summary if snapshot else None
    return {
        "name": name,
        "format": "parquet",
        "rows": summary_int(summary, "total-records"),
        "bytes": summary_int(summary, "total-files-size"),
        "updated_at": iso_time(table.metadata.last_updated_ms),
    }


def summary_int(summary: Any, key: str) -> int:
    """An integer field of a snapshot summary (0 when absent)."""
    return int(summary.get(key) or 0) if summary else 0


def iso_time(epoch_ms: int) -> str:
    """ISO-8601 UTC time of an epoch in milliseconds."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
