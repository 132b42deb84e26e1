"""Iceberg tables of Parquet files: the tabular datasets, kept in the pyiceberg SQL catalog."""

from __future__ import annotations

import time
from typing import Any

import pyarrow as pa

from flight_lakehouse.catalog import DatasetCatalog, arrow_schema, summarise
from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.compaction import Compactor
from flight_lakehouse.datasets.base import Batches, Facts, Namespace, Retention, TableFormat
from flight_lakehouse.ingest import IngestSession
from flight_lakehouse.settings import Settings


class IcebergTables(TableFormat):
    """The Iceberg datasets: facts from the catalog, uploads as rolling Parquet files and one commit."""

    kind = "parquet"

    def __init__(self, catalog: DatasetCatalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self.compactor = Compactor(catalog, settings)

    def names(self) -> list[str]:
        return self.catalog.names()

    def exists(self, name: str) -> bool:
        return self.catalog.exists(name)

    def schema(self, name: str) -> pa.Schema:
        return arrow_schema(self.catalog.load(name))

    def summarise(self, name: str) -> dict[str, Any]:
        return summarise(name, self.catalog.load(name))

    def describe(self, name: str) -> dict[str, Any]:
        return self.catalog.describe(name)

    def history(self, name: str) -> list[dict[str, Any]]:
        return self.catalog.history(name)

    def drop(self, name: str) -> None:
        self.catalog.drop(name)

    def expire(self, name: str, retention: Retention) -> Facts:
        """Expired snapshots leave the metadata at once; files only they used are left to ``gc``."""
        return self.catalog.expire_snapshots(name, retention)

    def optimize(self, name: str, retention: Retention, names: Namespace) -> Facts:
        """Compact the small data files, then expire the snapshots ``retention`` lets go (their files are
        left to ``gc``)."""
        started = time.monotonic()
        compacted = self.compactor.compact(names, name)
        with names.write_lock(name):
            expired = self.expire(name, retention)
        return {**expired, **compacted, "seconds": round(time.monotonic() - started, 3)}

    def claims(self, options: IngestOptions, schema: pa.Schema) -> bool:
        """Every upload without a reason to be a Lance table is tabular (the registry asks Lance first)."""
        return options.format in (None, "parquet")

    def write(self, options: IngestOptions, schema: pa.Schema, batches: Batches, names: Namespace) -> Facts:
        session = IngestSession(self.catalog, names, self.settings, options, schema)
        try:
            for batch in batches:
                session.write(batch)
        except BaseException:
            session.abort()
            raise
        return session.commit().to_json()

    def pins(self) -> dict[str, str]:  # type: ignore[override]
        """Each dataset with its current metadata file (one catalog query)."""
        return dict(self.catalog.metadata_locations())
