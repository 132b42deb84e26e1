"""Compaction of a Parquet dataset: its small data files (many small appends make one each) rewritten into
files of ``target_file_mb``, committed in one snapshot that replaces exactly them.

Every query of a dataset opens each of its files, so thousands of small appends make every read slower
and hold more open files; ``optimize`` compacts them. The rows do not change: time travel to an earlier
snapshot still reads the old files (``gc`` frees them once those snapshots expire). The rewrite runs
without the dataset's write lock; the commit takes it, keeps what was appended meanwhile, and gives up
(UNAVAILABLE, nothing changed) when an overwrite replaced the files being compacted.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan

from flight_lakehouse.catalog import DatasetCatalog, arrow_schema, with_field_ids
from flight_lakehouse.ingest import RollingParquetWriter, conform
from flight_lakehouse.settings import Settings

if TYPE_CHECKING:
    from pyiceberg.table import FileScanTask, Table

    from flight_lakehouse.datasets.base import Namespace

log = logging.getLogger(__name__)

#: A data file under this share of ``target_file_mb`` is small: compacting it makes reads cheaper.
SMALL_SHARE = 0.5
#: The most bytes of small files one ``optimize`` rewrites (the rest waits for the next one).
MAX_INPUT_BYTES = 2 << 30


@dataclass(frozen=True)
class CompactionPlan:
    """The small files of one snapshot of a table that a compaction rewrites."""

    table: Table
    tasks: list[FileScanTask]

    @classmethod
    def of(cls, table: Table, settings: Settings) -> CompactionPlan:
        """The small files of the table's current snapshot, smallest first, within ``MAX_INPUT_BYTES``."""
        small_bytes = (settings.target_file_mb << 20) * SMALL_SHARE
        small = sorted(
            (task for task in table.scan().plan_files() if task.file.file_size_in_bytes < small_bytes),
            key=lambda task: task.file.file_size_in_bytes,
        )
        chosen, total = [], 0
        for task in small:
            if chosen and total + task.file.file_size_in_bytes > MAX_INPUT_BYTES:
                break
            chosen.append(task)
            total += task.file.file_size_in_bytes
        return cls(table, chosen if len(chosen) >= 2 else [])

    @property
    def paths(self) -> list[str]:
        """The files rewritten."""
        return [task.file.file_path for task in self.tasks]

    @property
    def input_bytes(self) -> int:
        """Their size on storage."""
        return sum(task.file.file_size_in_bytes for task in self.tasks)


class Compactor:
    """Compacts the Parquet datasets of one catalog, one compaction of a dataset at a time (two would
    rewrite the same files, and the second commit would find them gone)."""

    def __init__(self, catalog: DatasetCatalog, settings: Settings) -> None:
        self.catalog = catalog
        self.settings = settings
        self._running: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def compact(self, names: Namespace, name: str) -> dict[str, Any]:
        """Rewrite the small data files of dataset ``name`` into files of the target size, in one commit
        (after a compaction of it already running here, planned on what that one left)."""
        with self._guard:
            running = self._running.setdefault(name.lower(), threading.Lock())
        with running:
            return self._compact(names, name)

    def _compact(self, names: Namespace, name: str) -> dict[str, Any]:
        started = time.monotonic()
        plan = CompactionPlan.of(self.catalog.load(name), self.settings)
        if not plan.tasks:
            return {"files_compacted": 0, "files_written": 0, "bytes_compacted": 0}
        writer = self._rewrite(name, plan)
        try:
            with names.write_lock(name):
                self.catalog.replace_files(name, plan.paths, writer.files)
        except BaseException:
            writer.abort()
            raise
        log.info(
            "compacted %d files of %s into %d (%d rows) in %.1f s",
            len(plan.tasks),
            name,
            len(writer.files),
            writer.rows,
            time.monotonic() - started,
        )
        return {
            "files_compacted": len(plan.tasks),
            "files_written": len(writer.files),
            "bytes_compacted": plan.input_bytes,
        }

    def _rewrite(self, name: str, plan: CompactionPlan) -> RollingParquetWriter:
        """The rows of ``plan``'s files written anew (batch by batch) in the table's current schema."""
        table = plan.table
        schema = with_field_ids(arrow_schema(table), table, evolve=False)
        writer = RollingParquetWriter(self.catalog, name, schema, self.settings)
        try:
            scan = ArrowScan(table.metadata, table.io, table.schema(), AlwaysTrue())
            for batch in scan.to_record_batches(plan.tasks):
                writer.write(conform(batch, schema))
            writer.close()
        except BaseException:
            writer.abort()
            raise
        return writer
