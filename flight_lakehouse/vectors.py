"""Vector tables: Lance tables beside the Iceberg datasets, under the same root.

A dataset whose schema holds a vector column (``fixed_size_list<float32|float16>``) is a Lance table at
``<root>/lance/<name>.lance``. :class:`VectorTables` opens, lists, describes, writes and maintains them;
search lives in ``vector_search.py`` and background index builds in ``vector_index.py``.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from flight_lakehouse.catalog import DatasetCatalog
from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.errors import (
    AlreadyExists,
    Cancelled,
    ClientError,
    InvalidArgument,
    NotFound,
    SchemaConflict,
    Unavailable,
)
from flight_lakehouse.sandbox import first_line
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Storage

if TYPE_CHECKING:
    import lance
    from lancedb.db import DBConnection
    from lancedb.table import LanceTable

log = logging.getLogger(__name__)

METRIC_KEY = b"lakehouse.metric"
DEFAULT_METRIC = "cosine"
VECTOR_VALUE_TYPES = (pa.float32(), pa.float16())
MAX_DIMENSION = 65_536
#: Uploaded batches reach Lance in slices of about this size: every step between Flight and Lance (the
#: aligned copy, lancedb's own vector checks, Lance's write buffers) holds a few batches at once.
SLICE_BYTES = 2 << 20
#: Column data Lance buffers while it writes a file (its default: 8 MiB per column).
WRITE_BUFFER_BYTES = 4 << 20


def vector_columns(schema: pa.Schema) -> dict[str, int]:
    """The vector columns of ``schema`` (``fixed_size_list<float32|float16>``) and their dimensions."""
    return {
        field.name: field.type.list_size
        for field in schema
        if pa.types.is_fixed_size_list(field.type) and field.type.value_type in VECTOR_VALUE_TYPES
    }


def holds_vectors(schema: pa.Schema, options: IngestOptions) -> bool:
    """Whether an upload with ``schema`` goes to a Lance table when no dataset of its name exists yet."""
    if options.format is not None:
        return options.format == "lance"
    return options.vector_column is not None or options.mode == "upsert" or bool(vector_columns(schema))


def table_metric(schema: pa.Schema) -> str:
    """The metric a Lance table was created with (searches and indexes default to it)."""
    return (schema.metadata or {}).get(METRIC_KEY, DEFAULT_METRIC.encode()).decode()


def lance_error(exc: BaseException, root: str, doing: str) -> BaseException:
    """The client-facing error for a Lance failure: one line, server paths removed."""
    if isinstance(exc, ClientError | Cancelled | Unavailable):
        return exc
    message = first_line(exc).replace(root, "<storage>")
    lowered = message.lower()
    if "commit conflict" in lowered or "retryable" in lowered or "concurrent" in lowered:
        return Unavailable(f"{doing}: a concurrent write won; retry ({message})")
    if "invalid user input" in lowered or "schema error" in lowered:  # pylance raises these as OSError
        return InvalidArgument(f"{doing}: {message}")
    if isinstance(exc, OSError) or any(
        word in lowered for word in ("object store", "io error", "connection", "timed out", "dispatch")
    ):
        log.warning("%s: storage error: %s", doing, exc)
        return Unavailable(f"{doing}: storage error: {message}")
    return InvalidArgument(f"{doing}: {message}")


def summary(name: str, dataset: lance.LanceDataset, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``list_datasets`` entry of a Lance table from its dataset and versions."""
    return {
        "name": name,
        "format": "lance",
        "rows": dataset.count_rows(),
        "bytes": total_bytes(dataset, versions),
        "updated_at": iso(versions[-1]["timestamp"]),
    }


def total_bytes(dataset: lance.LanceDataset, versions: list[dict[str, Any]]) -> int:
    """Bytes of the table's current data files and indexes (deleted versions' files not counted)."""
    current = next((v for v in versions if v["version"] == dataset.version), versions[-1])
    data = int(current.get("metadata", {}).get("total_files_size", 0) or 0)
    return data + sum(index.total_size_bytes or 0 for index in dataset.describe_indices())


#: Lance's index types as ``create_index`` names them.
INDEX_KINDS = {
    "IVF_PQ": "ivf_pq",
    "IVF_HNSW_SQ": "ivf_hnsw_sq",
    "BTree": "btree",
    "Bitmap": "bitmap",
    "Inverted": "fts",
}


def indexes(dataset: lance.LanceDataset) -> list[dict[str, Any]]:
    """The built indexes of ``dataset``."""
    found = []
    for index in dataset.describe_indices():
        stats = dataset.index_statistics(index.name)
        details = stats.get("indices") or [{}]
        kind = str(stats.get("index_type", ""))
        found.append(
            {
                "name": index.name,
                "column": index.field_names[0] if index.field_names else None,
                "kind": INDEX_KINDS.get(kind, kind.lower()),
                "state": "ready",
                "metric": details[0].get("metric_type"),
                "indexed_rows": stats.get("num_indexed_rows"),
                "unindexed_rows": stats.get("num_unindexed_rows"),
            }
        )
    return found


def iso(value: datetime) -> str:
    """ISO-8601 UTC time, to the millisecond."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat(timespec="milliseconds")


class VectorTables:
    """The Lance tables under the root: one pylance dataset per table, lancedb handles opened on demand.

    Lance itself (pylance) opens, lists, describes, writes, indexes, reads and k-NN searches the tables.
    lancedb runs full-text and hybrid searches (its query builders), and loads on the first of them: each
    of the two libraries carries its own copy of Lance, and lancedb costs a server about 90 MB of RSS (its
    imports, its code pages) that a server ingesting, indexing and searching vectors never needs.
    """

    def __init__(self, storage: Storage, settings: Settings, catalog: DatasetCatalog) -> None:
        self.storage = storage
        self.settings = settings
        self.catalog = catalog
        self._db: DBConnection | None = None
        #: The newest version of each table this server knows, and when the store was last asked.
        self._datasets: dict[str, lance.LanceDataset] = {}
        self._checked: dict[str, float] = {}
        self._queryable: dict[str, LanceTable] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._guard = threading.Lock()
        #: Bumped whenever a table is created or dropped: query databases are rebuilt when it changes.
        self.generation = 0
        #: Called with a table's name after each commit to it by this server, and after it is dropped.
        self.on_commit: list[Callable[[str], None]] = []
        self.on_drop: list[Callable[[str], None]] = []
        for name, dataset in self._stored_tables().items():
            self._adopt(name, dataset, new=True)

    def _uri(self, name: str) -> str:
        return f"{self.storage.lance_uri}/{name}.lance"

    def _open(self, name: str) -> lance.LanceDataset:
        """The newest version of ``name``, read from the store."""
        import lance

        return lance.dataset(self._uri(name), storage_options=self.storage.lance_storage_options())

    @property
    def _connection(self) -> DBConnection:
        """The lancedb connection, opened on first use."""
        if self._db is None:
            import lancedb

            self._db = lancedb.connect(
                self.storage.lance_uri,
                storage_options=self.storage.lance_storage_options(),
                read_consistency_interval=timedelta(seconds=self.settings.lance_refresh_seconds),
            )
        return self._db

    def _stored_tables(self) -> dict[str, lance.LanceDataset]:
        """Tables with at least one version (an object store may keep the folder of a dropped one).
        Lance (a second of imports) loads only when there is one."""
        selector = pafs.FileSelector(self.storage.fs_path(self.storage.lance_uri), allow_not_found=True)
        tables = {}
        for info in self.storage.filesystem.get_file_info(selector):
            if info.type != pafs.FileType.Directory or not info.base_name.endswith(".lance"):
                continue
            name = info.base_name.removesuffix(".lance")
            try:
                tables[name] = self._open(name)
            except Exception:  # no manifest: an empty folder left behind
                log.debug("skipping %s: not a Lance table", name, exc_info=True)
        return tables

    def _adopt(self, name: str, dataset: lance.LanceDataset, new: bool = False) -> None:
        """Make ``dataset`` the known newest version of ``name`` (never going back to an older one).
        Only a ``new`` table is added: a late commit or refresh does not bring back a dropped one."""
        with self._guard:
            known = self._datasets.get(name)
            if known is None and not new:
                return
            if known is None or dataset.version >= known.version:
                self._datasets[name] = dataset
            self._checked[name] = time.monotonic()
            if known is None:
                self.generation += 1

    # -- names -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every Lance table, sorted."""
        with self._guard:
            return sorted(self._datasets)

    def find(self, name: str) -> str | None:
        """The stored name equal to ``name`` ignoring case, if any."""
        wanted = name.lower()
        return next((stored for stored in self.names() if stored.lower() == wanted), None)

    def exists(self, name: str) -> bool:
        """Whether the Lance table ``name`` exists."""
        with self._guard:
            return name in self._datasets

    def require(self, name: str, doing: str) -> None:
        """Refuse ``doing`` on anything but a Lance table: INVALID_ARGUMENT for Parquet, else NOT_FOUND."""
        if self.exists(name):
            return
        if self.catalog.exists(name):
            raise InvalidArgument(f"{doing} serves Lance tables; dataset {name!r} is Parquet")
        raise NotFound(f"dataset {name!r} not found")

    def _known(self, name: str) -> lance.LanceDataset:
        with self._guard:
            dataset = self._datasets.get(name)
        if dataset is None:
            raise NotFound(f"dataset {name!r} not found")
        return dataset

    def table(self, name: str) -> LanceTable:
        """lancedb's handle of ``name``, for full-text and hybrid search (loads lancedb on first use)."""
        self._known(name)
        with self._guard:
            table = self._queryable.get(name)
        if table is None:
            table = self._connection.open_table(name)
            with self._guard:
                table = self._queryable.setdefault(name, table)
        return table

    def dataset(self, name: str, version: int | None = None) -> lance.LanceDataset:
        """The Lance dataset of ``name`` at ``version`` (the newest when None), pinned for one query.

        The newest is what this server committed last, or what the store holds when the last look is
        older than ``lance_refresh_seconds`` (commits by other processes)."""
        if version is None:
            if time.monotonic() - self._checked.get(name, 0.0) >= self.settings.lance_refresh_seconds:
                self.refresh_version(name)
            return self._known(name)
        try:
            return self._known(name).checkout_version(version)
        except NotFound:
            raise
        except Exception:
            raise NotFound(f"version {version} of dataset {name!r} not found") from None

    def version(self, name: str) -> int:
        """The table's current version as this server knows it (updated by its own commits)."""
        return self._known(name).version

    def refresh_version(self, name: str) -> int:
        """The table's current version, asking the store (commits by other processes included)."""
        known = self._known(name)
        try:
            latest = known.latest_version
        except Exception:  # dropped by another process: its last version stays readable until noticed
            log.debug("cannot read the versions of %s", name, exc_info=True)
            return known.version
        self._adopt(name, known if latest == known.version else known.checkout_version(latest))
        return self._known(name).version

    def committed(self, name: str, dataset: lance.LanceDataset | None = None) -> None:
        """Record a commit by this server (``dataset``: the version it made, else read from the store)
        and tell the listeners, before the commit's call returns."""
        if dataset is None:
            self.refresh_version(name)
        else:
            self._adopt(name, dataset)
        with self._guard:
            queryable = self._queryable.get(name)
        if queryable is not None:
            queryable.checkout_latest()
        for listener in self.on_commit:
            listener(name)

    def schema(self, name: str) -> pa.Schema:
        """The table's Arrow schema (with its metric in the metadata), read once: columns are fixed at
        creation (``check_compatible``), and asking Lance costs ~0.4 ms, a third of an in-memory search."""
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = self._known(name).schema
        return schema

    # -- catalog actions -------------------------------------------------------------------------
    def summarise(self, name: str) -> dict[str, Any]:
        """The ``list_datasets`` entry of one Lance table."""
        dataset = self.dataset(name)
        return summary(name, dataset, dataset.versions())

    def describe(self, name: str, building: list[dict[str, Any]]) -> dict[str, Any]:
        """Schema, vector columns, versions and indexes (``building``: builds not finished yet)."""
        dataset = self.dataset(name)
        schema = self.schema(name)
        vectors = vector_columns(schema)
        versions = dataset.versions()
        facts = summary(name, dataset, versions)
        facts.update(
            {
                "schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
                "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
                "files": len(dataset.get_fragments()),
                "version": dataset.version,
                "versions": len(versions),
                "vector_columns": vectors,
                "dimension": next(iter(vectors.values()), None),
                "metric": table_metric(schema),
                "indexes": indexes(dataset) + building,
            }
        )
        return facts

    def history(self, name: str) -> list[dict[str, Any]]:
        """The table's versions, newest first."""
        versions = self.dataset(name).versions()
        current = versions[-1]["version"] if versions else None
        return [
            {
                "version": entry["version"],
                "timestamp": iso(entry["timestamp"]),
                "rows": int(entry.get("metadata", {}).get("total_rows", 0) or 0),
                "current": entry["version"] == current,
            }
            for entry in reversed(versions)
        ]

    def drop(self, name: str) -> None:
        """Drop a Lance table and delete its files."""
        with self.catalog.write_lock(name):
            with self._guard:
                if self._datasets.pop(name, None) is None:
                    raise NotFound(f"dataset {name!r} not found")
                self._queryable.pop(name, None)
                self._schemas.pop(name, None)
                self._checked.pop(name, None)
                self.generation += 1
            self._delete_folder(name)
        for listener in self.on_drop:
            listener(name)
        log.info("dropped Lance table %s", name)

    def _delete_folder(self, name: str) -> None:
        """Delete a dropped table's files: its manifests now (a table re-created under the name writes
        manifests of the same names), the rest as they are now once no running query reads them."""
        uri = self._uri(name)
        found = self.storage.listing(uri)
        manifests = [info for info in found if is_manifest(info.path)]
        self.storage.delete_files(info.path for info in manifests)
        rest = [info for info in found if not is_manifest(info.path)]
        self.storage.leases.delete_when_unread(name, functools.partial(self.storage.delete_listed, uri, rest))

    def delete_rows(self, name: str, where: str) -> dict[str, Any]:
        """Delete the rows matching ``where``."""
        dataset = self.writable(name)
        try:
            result = dataset.delete(where)
        except Exception as exc:
            raise lance_error(exc, self.storage.root_uri, f"delete_rows on {name!r}") from None
        self.committed(name, dataset)
        return {"dataset": name, "rows_deleted": result["num_deleted_rows"], "version": dataset.version}

    def writable(self, name: str) -> lance.LanceDataset:
        """A handle of its own for a commit: Lance moves the handle it commits with to the new version,
        and the shared one may be in use by a query."""
        known = self._known(name)
        return known.checkout_version(known.version)

    def optimize(self, name: str, older_than_seconds: float) -> dict[str, Any]:
        """Compact small fragments, bring indexes up to date, remove versions older than the retention."""
        before = self.dataset(name)
        versions = before.versions()
        versions_before, bytes_before = len(versions), total_bytes(before, versions)
        started = time.monotonic()
        try:
            dataset = self.writable(name)
            dataset.optimize.compact_files()
            dataset.optimize.optimize_indices()  # rows added since an index was built join it
            dataset.cleanup_old_versions(older_than=timedelta(seconds=older_than_seconds))
        except Exception as exc:
            raise lance_error(exc, self.storage.root_uri, f"optimize on {name!r}") from None
        self.committed(name)
        after = self.dataset(name)
        versions = after.versions()
        bytes_after = total_bytes(after, versions)
        return {
            "dataset": name,
            "version": after.version,
            "fragments_before": len(before.get_fragments()),
            "fragments_after": len(after.get_fragments()),
            "versions_before": versions_before,
            "versions_after": len(versions),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "bytes_removed": max(0, bytes_before - bytes_after),
            "seconds": round(time.monotonic() - started, 3),
        }

    # -- writes ----------------------------------------------------------------------------------
    def write(self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> dict:
        """Write one upload as one new version (a new table when missing); refused uploads write nothing."""
        name = options.dataset
        if options.schema_mode == "evolve":
            raise InvalidArgument(f"dataset {name!r}: schema_mode 'evolve' is not supported for Lance tables")
        if options.mode == "upsert" and options.key is None:
            raise InvalidArgument("mode 'upsert' needs 'key': the column that identifies a row")
        if options.mode != "upsert" and options.key is not None:
            raise InvalidArgument("field 'key' is only used with mode 'upsert'")
        started = time.monotonic()
        if self.exists(name):
            result, dataset = self._write_existing(options, schema, batches)
        else:
            with self.catalog.write_lock(name):
                if self.exists(name):  # created meanwhile: write into it
                    result, dataset = self._write_existing(options, schema, batches)
                else:
                    result, dataset = self._create(options, schema, batches)
        self.committed(name, dataset)
        result.update(dataset=name, format="lance", seconds=round(time.monotonic() - started, 3))
        return result

    def _create(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> tuple[dict, lance.LanceDataset]:
        import lance

        name = options.dataset
        twin = self.catalog.find(name) or self.find(name)
        if twin is not None:
            raise AlreadyExists(
                f"dataset {twin!r} exists; names are case-insensitive in SQL, so {name!r} is refused"
            )
        batches = iter(batches)
        first = next(batches, None) if options.vector_column is not None else None
        plan = UploadPlan.for_new_table(schema, options, first)
        if first is not None:
            batches = itertools.chain([first], batches)
        stream = plan.stream(batches, self.settings.max_batch_mb << 20)
        try:
            dataset = lance.write_dataset(
                stream.reader(),
                self._uri(name),
                schema=plan.table_schema,
                mode="create",
                data_cache_bytes=WRITE_BUFFER_BYTES,
                storage_options=self.storage.lance_storage_options(),
            )
        except BaseException as exc:
            with contextlib.suppress(Exception):
                self._delete_folder(name)
            raise stream.failure(exc, self.storage.root_uri, f"create {name!r}") from None
        self._adopt(name, dataset, new=True)
        log.info("created Lance table %s (%d rows)", name, stream.rows)
        return {"rows_written": stream.rows, "version": dataset.version, "created": True}, dataset

    def _write_existing(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> tuple[dict, lance.LanceDataset]:
        import lance

        name = options.dataset
        if options.mode == "create":
            raise AlreadyExists(f"dataset {name!r} already exists (mode 'create')")
        metric = table_metric(self.schema(name))
        if options.metric is not None and options.metric != metric:
            raise InvalidArgument(
                f"dataset {name!r} has metric {metric!r}; it is set when the table is created"
            )
        plan = UploadPlan.for_table(self.schema(name), schema, options)
        stream = plan.stream(batches, self.settings.max_batch_mb << 20)
        dataset = self.writable(name)
        result: dict[str, Any] = {"created": False}
        try:
            if options.mode == "upsert":
                merged = (
                    dataset.merge_insert(options.key)
                    .when_matched_update_all()
                    .when_not_matched_insert_all()
                    .execute(stream.reader())
                )
                result.update(
                    rows_inserted=merged["num_inserted_rows"], rows_updated=merged["num_updated_rows"]
                )
            else:
                dataset = lance.write_dataset(
                    stream.reader(),
                    dataset,
                    schema=plan.table_schema,
                    mode="overwrite" if options.mode == "overwrite" else "append",
                    data_cache_bytes=WRITE_BUFFER_BYTES,
                    storage_options=self.storage.lance_storage_options(),
                )
        except BaseException as exc:
            raise stream.failure(exc, self.storage.root_uri, f"write to {name!r}") from None
        result.update(rows_written=stream.rows, version=dataset.version)
        return result, dataset


@dataclass
class UploadPlan:
    """How the batches of one upload become rows of a Lance table: target schema and vector checks."""

    table_schema: pa.Schema
    upload_schema: pa.Schema
    vectors: dict[str, int]
    metric: str
    marked: str | None = None  # a list<float> column the client marked as the vector column

    @classmethod
    def for_new_table(
        cls, schema: pa.Schema, options: IngestOptions, first: pa.RecordBatch | None
    ) -> UploadPlan:
        """The plan of an upload creating a table: the upload's schema, with the marked column fixed.

        A marked ``list<float>`` column takes its dimension from the first row of the upload.
        """
        target = schema.remove_metadata()
        marked = options.vector_column
        if marked is not None:
            marked_field(target, marked)  # its type, before its first row is measured
            target = mark_vector_column(target, marked, first_dimension(first, marked))
        metric = options.metric or DEFAULT_METRIC
        vectors = vector_columns(target)
        if not vectors:
            raise InvalidArgument(
                f"dataset {options.dataset!r} would be a Lance table (format 'lance', mode 'upsert' or a "
                "vector column), but the upload has no vector column (fixed_size_list<float32|float16>, "
                "or a list column named by 'vector_column')"
            )
        check_dimensions(vectors)
        target = target.with_metadata({METRIC_KEY: metric.encode()})
        return cls(target, schema, vectors, metric, marked)

    @classmethod
    def for_table(cls, table_schema: pa.Schema, schema: pa.Schema, options: IngestOptions) -> UploadPlan:
        """The plan of an upload into an existing table: its columns must match the table's."""
        upload = schema.remove_metadata()
        marked = options.vector_column
        table_vectors = vector_columns(table_schema)
        if marked is not None:
            if marked not in table_vectors:
                raise InvalidArgument(f"column {marked!r} is not a vector column of {options.dataset!r}")
            upload = mark_vector_column(upload, marked, dimension=table_vectors[marked])
        if options.mode == "upsert" and options.key not in upload.names:
            raise InvalidArgument(f"upsert key {options.key!r} is not a column of the upload")
        check_compatible(table_schema, upload, options.dataset)
        return cls(table_schema, schema, table_vectors, table_metric(table_schema), marked)

    def stream(self, batches: Iterator[pa.RecordBatch], max_batch_bytes: int) -> CheckedStream:
        """The upload's batches, checked and converted as Lance pulls them."""
        return CheckedStream(self, batches, max_batch_bytes)

    def conform(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """One uploaded batch in the table's schema (columns by name, missing nullable ones null)."""
        if self.marked is not None:
            dimension = self.vectors[self.marked]
            index = batch.schema.get_field_index(self.marked)
            column = fixed_vectors(batch.column(index), self.marked, dimension)
            batch = batch.set_column(index, pa.field(self.marked, column.type), column)
        columns = []
        for field in self.table_schema:
            if field.name in batch.schema.names:
                columns.append(batch.column(field.name).cast(field.type))
            else:
                columns.append(pa.nulls(batch.num_rows, field.type))
        return pa.RecordBatch.from_arrays(columns, schema=self.table_schema)


class CheckedStream:
    """Feeds Lance the upload batch by batch, refusing the whole stream at the first bad row.

    Lance commits only after the last batch, so raising from here commits nothing.
    """

    def __init__(self, plan: UploadPlan, batches: Iterator[pa.RecordBatch], max_batch_bytes: int) -> None:
        self.plan = plan
        self._batches = batches
        self._max_batch_bytes = max_batch_bytes
        self.rows = 0
        self._refusal: BaseException | None = None

    def reader(self) -> pa.RecordBatchReader:
        """A reader Lance pulls from."""
        return pa.RecordBatchReader.from_batches(self.plan.table_schema, self._checked())

    def _checked(self) -> Iterator[pa.RecordBatch]:
        try:
            for batch in self._batches:
                if batch.nbytes > self._max_batch_bytes:
                    raise InvalidArgument(
                        f"batch of {batch.nbytes} bytes exceeds the limit of "
                        f"{self._max_batch_bytes >> 20} MB; send smaller batches"
                    )
                for piece in slices(batch, SLICE_BYTES):
                    piece = aligned(self.plan.conform(piece))
                    for name in self.plan.vectors:
                        check_vectors(piece.column(name), name, self.plan.metric, self.rows)
                    self.rows += piece.num_rows
                    yield piece
        except BaseException as exc:
            self._refusal = exc  # Lance wraps it; the caller re-raises the original
            raise

    def failure(self, exc: BaseException, root: str, doing: str) -> BaseException:
        """The error to send: the refusal from the stream if there was one, else Lance's, made safe."""
        if self._refusal is not None:
            refusal = self._refusal
            if isinstance(refusal, pa.ArrowInvalid | pa.ArrowTypeError) and not isinstance(
                refusal, ClientError
            ):
                return InvalidArgument(first_line(refusal))
            return refusal
        return lance_error(exc, root, doing)


def slices(batch: pa.RecordBatch, max_bytes: int) -> Iterator[pa.RecordBatch]:
    """``batch`` in consecutive zero-copy slices of at most about ``max_bytes`` (at least one row each)."""
    rows = max(1, batch.num_rows * max_bytes // max(batch.nbytes, 1))
    for start in range(0, batch.num_rows, rows):
        yield batch.slice(start, rows)


def aligned(batch: pa.RecordBatch, alignment: int = 64) -> pa.RecordBatch:
    """``batch`` with every buffer aligned, copying it if needed.

    Buffers received over Flight can sit at any address; Lance (arrow-rs) aborts the process on
    misaligned buffers instead of raising, so they are copied first.
    """
    columns = batch.columns
    if all(is_aligned(column, alignment) for column in columns):
        return batch
    copies = [column if is_aligned(column, alignment) else copied(column) for column in columns]
    return pa.RecordBatch.from_arrays(copies, schema=batch.schema)


def is_aligned(column: pa.Array, alignment: int) -> bool:
    """Whether every buffer of ``column`` (its dictionary's too) starts at a multiple of ``alignment``."""
    buffers = column.buffers()
    if pa.types.is_dictionary(column.type):
        buffers += column.dictionary.buffers()
    return not any(buffer is not None and buffer.address % alignment for buffer in buffers)


def copied(column: pa.Array) -> pa.Array:
    """``column`` in new buffers of its rows only (a dictionary is copied too: concatenation keeps it)."""
    if pa.types.is_dictionary(column.type):
        return pa.DictionaryArray.from_arrays(copied(column.indices), pa.concat_arrays([column.dictionary]))
    return pa.concat_arrays([column])


def check_dimensions(vectors: dict[str, int]) -> None:
    """Refuse vector columns of no or absurd dimension."""
    for name, dimension in vectors.items():
        if not 1 <= dimension <= MAX_DIMENSION:
            raise InvalidArgument(f"vector column {name!r} has dimension {dimension}; 1 to {MAX_DIMENSION}")


def check_compatible(table: pa.Schema, upload: pa.Schema, dataset: str) -> None:
    """Refuse an upload whose columns are not the table's (unknown, retyped or missing non-nullable)."""
    table_vectors = vector_columns(table)
    upload_vectors = vector_columns(upload)
    for name, dimension in upload_vectors.items():
        expected = table_vectors.get(name)
        if expected is not None and expected != dimension:
            raise SchemaConflict(
                f"vector column {name!r} has dimension {dimension}; dataset {dataset!r} has {expected}"
            )
    for field in upload:
        if field.name not in table.names:
            raise SchemaConflict(f"column {field.name!r} is not in dataset {dataset!r} (a Lance table)")
        expected_type = table.field(field.name).type
        if field.type != expected_type:
            raise SchemaConflict(
                f"column {field.name!r} is {field.type}; dataset {dataset!r} has {expected_type}"
            )
    for field in table:
        if field.name not in upload.names and not field.nullable:
            raise SchemaConflict(f"column {field.name!r} of dataset {dataset!r} is missing from the upload")


def marked_field(schema: pa.Schema, name: str) -> pa.Field:
    """The upload's column ``name``, marked as the vector column: refused unless it holds lists of floats."""
    if name not in schema.names:
        raise InvalidArgument(f"vector_column {name!r} is not a column of the upload")
    field = schema.field(name)
    if pa.types.is_fixed_size_list(field.type) and field.type.value_type in VECTOR_VALUE_TYPES:
        return field
    if not (
        (pa.types.is_list(field.type) or pa.types.is_large_list(field.type))
        and pa.types.is_floating(field.type.value_type)
    ):
        raise InvalidArgument(f"vector_column {name!r} must be a list of floats, got {field.type}")
    return field


def mark_vector_column(schema: pa.Schema, name: str, dimension: int) -> pa.Schema:
    """``schema`` with the list column ``name`` as ``fixed_size_list<float32>`` (dimension from data)."""
    field = marked_field(schema, name)
    if pa.types.is_fixed_size_list(field.type):
        return schema
    index = schema.get_field_index(name)
    return schema.set(index, pa.field(name, pa.list_(pa.float32(), dimension), field.nullable))


def first_dimension(batch: pa.RecordBatch | None, name: str) -> int:
    """The length of the first vector of column ``name`` in ``batch``."""
    if batch is None or name not in batch.schema.names or batch.num_rows == 0:
        raise InvalidArgument(f"vector_column {name!r}: the upload's first batch has no rows to size it")
    first = batch.column(name)[0]
    if not first.is_valid:
        raise InvalidArgument(f"row 0: vector column {name!r} is null")
    return len(first)


def fixed_vectors(column: pa.Array, name: str, dimension: int) -> pa.Array:
    """A list<float> column as ``fixed_size_list<float32, dimension>``, refusing rows of other lengths."""
    if pa.types.is_fixed_size_list(column.type):
        return column
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    wrong = np.flatnonzero(lengths != dimension)
    if wrong.size:
        row = int(wrong[0])
        raise InvalidArgument(
            f"row {row}: vector column {name!r} has {lengths[row]} values, expected {dimension}"
        )
    values = pc.list_flatten(column).cast(pa.float32())
    return pa.FixedSizeListArray.from_arrays(values, dimension)


def check_vectors(column: pa.Array, name: str, metric: str, first_row: int) -> None:
    """Refuse null, non-finite and (for cosine) zero vectors, naming the first bad row of the upload."""
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidArgument(f"row {first_row + row}: vector column {name!r} is null")
    dimension = column.type.list_size
    values = column.flatten()
    if values.null_count:
        row = int(np.flatnonzero(values.is_null().to_numpy(zero_copy_only=False))[0]) // dimension
        raise InvalidArgument(f"row {first_row + row}: vector column {name!r} holds a null value")
    matrix = values.to_numpy(zero_copy_only=False).reshape(-1, dimension)
    bad = problem_rows(matrix, metric)
    if bad is not None:
        row, reason = bad
        raise InvalidArgument(f"row {first_row + row}: vector column {name!r} {reason}")


def problem_rows(matrix: np.ndarray, metric: str) -> tuple[int, str] | None:
    """The first row of ``matrix`` that is not a usable vector for ``metric``, and why."""
    finite = np.isfinite(matrix).all(axis=1)
    if not finite.all():
        row = int(np.flatnonzero(~finite)[0])
        reason = "has NaN" if np.isnan(matrix[row]).any() else "has an infinite value"
        return row, reason
    if metric == "cosine":
        zero = ~matrix.any(axis=1)
        if zero.any():
            return int(np.flatnonzero(zero)[0]), "is a zero vector, which has no cosine direction"
    return None


def is_manifest(path: str) -> bool:
    """Whether ``path`` is a Lance version manifest (named by version: re-used by a re-created table)."""
    return "/_versions/" in path or path.endswith("/_latest.manifest")
