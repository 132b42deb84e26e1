"""Streaming ingest: a DoPut stream becomes rolling Parquet files and, at its end, one Iceberg commit.

Nothing is visible before the commit; a stream that fails or is cut off deletes the files it wrote.
Every client stream (DoPut to Parquet or Lance, DoExchange query vectors) is read under
:func:`reading_upload` and each of its batches passes :func:`validated` before anything else uses it.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
from sqlalchemy.exc import DBAPIError

from flight_lakehouse.catalog import DatasetCatalog, arrow_schema, retry_conflicts, with_field_ids
from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.errors import (
    AlreadyExists,
    Cancelled,
    ClientError,
    InvalidArgument,
    NotFound,
    SchemaConflict,
)
from flight_lakehouse.sandbox import first_line
from flight_lakehouse.schema_types import canonical_type, storage_schema
from flight_lakehouse.settings import Settings

if TYPE_CHECKING:
    from flight_lakehouse.datasets.base import Namespace

log = logging.getLogger(__name__)


#: The longest part of an Arrow error message quoted back to a client.
MAX_DETAIL = 200


@contextlib.contextmanager
def reading_upload(is_cancelled: Callable[[], bool]) -> Iterator[None]:
    """Read a client's stream: what fails there is the client's input (INVALID_ARGUMENT), or its cancel.

    pyarrow raises malformed IPC (garbage headers, truncated bodies, a second schema) as ``OSError``,
    which would otherwise pass for a storage fault and tell the client to retry the same bytes.
    """
    try:
        yield
    except (ClientError, flight.FlightError, MemoryError):
        raise
    except (pa.ArrowException, OSError) as exc:
        if is_cancelled():
            raise Cancelled("upload cancelled by the client; nothing was committed") from None
        raise InvalidArgument(f"malformed upload: not a valid Arrow IPC stream ({detail(exc)})") from None


def validated(batch: pa.RecordBatch) -> pa.RecordBatch:
    """``batch`` once it is valid Arrow throughout (offsets, buffer sizes, dictionary indices, UTF-8).

    Nothing unchecked may reach a writer, cast or query: bad offsets crash them instead of raising.
    """
    try:
        batch.validate(full=True)
    except pa.ArrowException as exc:
        raise InvalidArgument(invalid_batch(batch, exc)) from None
    return batch


def invalid_batch(batch: pa.RecordBatch, exc: pa.ArrowException) -> str:
    """The refusal of a batch that failed validation, naming its first invalid column."""
    for name, column in zip(batch.schema.names, batch.columns, strict=False):
        try:
            column.validate(full=True)
        except pa.ArrowException as column_exc:
            return f"column {name!r} of the upload is not valid Arrow: {detail(column_exc)}"
    return f"uploaded batch is not valid Arrow: {detail(exc)}"


def detail(exc: BaseException) -> str:
    """The first line of an Arrow error, cut to :data:`MAX_DETAIL` characters."""
    line = first_line(exc)
    return line if len(line) <= MAX_DETAIL else line[: MAX_DETAIL - 3] + "..."


@dataclass(frozen=True)
class IngestResult:
    """What the client gets back in the PutResult."""

    dataset: str
    rows_written: int
    bytes_written: int
    files_written: int
    snapshot_id: int | None
    created: bool
    seconds: float

    def to_json(self) -> dict[str, object]:
        """The PutResult ``app_metadata`` object."""
        return {
            "dataset": self.dataset,
            "rows_written": self.rows_written,
            "bytes_written": self.bytes_written,
            "files_written": self.files_written,
            "snapshot_id": self.snapshot_id,
            "created": self.created,
            "seconds": round(self.seconds, 3),
        }


class RollingParquetWriter:
    """Writes batches into Parquet files of bounded size, buffering up to one row group."""

    def __init__(self, catalog: DatasetCatalog, dataset: str, schema: pa.Schema, settings: Settings) -> None:
        self._storage = catalog.storage
        self._data_dir = f"{catalog.table_location(dataset)}/data"
        self._schema = schema
        self._target_bytes = settings.target_file_mb << 20
        self._row_group_rows = settings.row_group_rows
        self._buffer: list[pa.RecordBatch] = []
        self._buffered_rows = 0
        self._buffered_bytes = 0
        self._writer: pq.ParquetWriter | None = None
        self._sink: pa.NativeFile | None = None
        self.files: list[str] = []
        self.rows = 0
        self.bytes = 0

    def write(self, batch: pa.RecordBatch) -> None:
        """Buffer a batch; flush a row group when enough rows or bytes are buffered."""
        if batch.num_rows == 0:
            return
        self._buffer.append(batch)
        self._buffered_rows += batch.num_rows
        self._buffered_bytes += batch.nbytes
        self.rows += batch.num_rows
        if self._buffered_rows >= self._row_group_rows or self._buffered_bytes >= 64 << 20:
            self._flush_row_group()

    def close(self) -> list[str]:
        """Flush what is buffered and close the current file; returns the files written."""
        self._flush_row_group()
        self._close_file()
        return self.files

    def abort(self) -> None:
        """Close quietly and delete every file written so far."""
        self._buffer.clear()
        try:
            self._discard_file()
        except Exception:  # the stream is already failing; the deletion below is what matters
            log.debug("closing an aborted file failed", exc_info=True)
        try:
            self._storage.delete_files(self.files)
        except OSError as exc:  # storage down: the files stay unreferenced, and `gc` removes them later
            log.warning(
                "could not delete %d files of an aborted upload (%s); gc will remove them",
                len(self.files),
                exc,
            )
        self.files.clear()

    def _flush_row_group(self) -> None:
        if not self._buffer:
            return
        table = pa.Table.from_batches(self._buffer, schema=self._schema)
        self._buffer, self._buffered_rows, self._buffered_bytes = [], 0, 0
        writer = self._writer or self._open_file()
        writer.write_table(table, row_group_size=max(table.num_rows, 1))
        assert self._sink is not None
        if self._sink.tell() >= self._target_bytes:
            self._close_file()

    def _open_file(self) -> pq.ParquetWriter:
        uri = f"{self._data_dir}/{uuid.uuid4().hex}.parquet"
        self.files.append(uri)
        self._sink = self._storage.open_output(uri)
        self._writer = pq.ParquetWriter(self._sink, self._schema, compression="zstd", compression_level=1)
        return self._writer

    def _discard_file(self) -> None:
        """Close the current file even when its writer fails, and let go of both writer and sink at once.

        A Parquet writer or S3 stream left open completes its upload when it is destroyed, which may be
        long after the abort deleted its file (an exception's traceback can keep it alive): on S3 that
        made an orphan file appear after the clean-up. Closing here, before the deletion, rules that out.
        """
        writer, sink = self._writer, self._sink
        self._writer = self._sink = None
        try:
            if writer is not None:
                writer.close()
        finally:
            if sink is not None:
                sink.close()

    def _close_file(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._sink is not None:
            self.bytes += self._sink.tell()
            self._sink.close()
            self._sink = None


class IngestSession:
    """One DoPut: plans the target schema, writes the batches, commits once at the end."""

    def __init__(
        self,
        catalog: DatasetCatalog,
        namespace: Namespace,
        settings: Settings,
        options: IngestOptions,
        schema: pa.Schema,
    ) -> None:
        self.catalog = catalog
        self.namespace = namespace
        self.settings = settings
        self.options = options
        self.started = time.monotonic()
        self.base_metadata_location = catalog.metadata_locations().get(options.dataset)
        self._check_mode()
        self.incoming_schema = storage_schema(schema)
        self.file_schema = self._plan_file_schema()
        self.writer = RollingParquetWriter(catalog, options.dataset, self.file_schema, settings)
        self._max_batch_bytes = settings.max_batch_mb << 20

    # -- planning --------------------------------------------------------------------------------
    def _check_mode(self) -> None:
        options = self.options
        lance_only = {"format 'lance'": options.format == "lance", "mode 'upsert'": options.mode == "upsert"}
        lance_only.update(
            {"metric": options.metric is not None, "vector_column": options.vector_column is not None}
        )
        for what, asked in lance_only.items():
            if asked:
                raise InvalidArgument(
                    f"{what} applies to Lance tables; dataset {options.dataset!r} is Parquet"
                )
        if options.key is not None:
            raise InvalidArgument("field 'key' is only used with mode 'upsert'")
        exists = self.base_metadata_location is not None
        if options.mode == "create" and exists:
            raise AlreadyExists(f"dataset {options.dataset!r} already exists (mode 'create')")
        if not exists:
            self.namespace.refuse_taken(options.dataset)

    def _plan_file_schema(self) -> pa.Schema:
        """The schema files are written with: the upload's, checked against and ordered like the table's,
        with the Iceberg field ids the table will have (:func:`~flight_lakehouse.catalog.with_field_ids`)."""
        if self.base_metadata_location is None:
            return with_field_ids(self.incoming_schema, None, evolve=False)
        table = self.catalog.load(self.options.dataset)
        planned = reconcile(
            arrow_schema(table), self.incoming_schema, self._schema_mode, self.options.dataset
        )
        return with_field_ids(planned, table, evolve=self._schema_mode == "evolve")

    @property
    def _schema_mode(self) -> str:
        """Overwrite may add and remove columns (not retype them), like ``evolve``."""
        return "evolve" if self.options.mode == "overwrite" else self.options.schema_mode

    # -- streaming -------------------------------------------------------------------------------
    def write(self, batch: pa.RecordBatch) -> None:
        """Check, convert and write one uploaded batch."""
        if batch.nbytes > self._max_batch_bytes:
            raise InvalidArgument(
                f"batch of {batch.nbytes} bytes exceeds the limit of {self.settings.max_batch_mb} MB; "
                "send smaller batches"
            )
        self.writer.write(conform(batch, self.file_schema))

    def abort(self) -> None:
        """Forget the stream: delete its files, commit nothing."""
        self.writer.abort()

    def commit(self) -> IngestResult:
        """Close the files and make the whole stream visible in one Iceberg commit."""
        try:
            files = self.writer.close()
            snapshot_id, created = self._commit(files)
        except DBAPIError:
            if not self.catalog.remote:
                self.writer.abort()
                raise
            # the catalog server's answer was lost: the commit may have landed and use the files, so they
            # stay (gc deletes them once no snapshot refers to them, past its grace period)
            log.warning("catalog lost while committing to %s: its files are kept", self.options.dataset)
            raise
        except BaseException:
            self.writer.abort()
            raise
        result = IngestResult(
            dataset=self.options.dataset,
            rows_written=self.writer.rows,
            bytes_written=self.writer.bytes,
            files_written=len(files),
            snapshot_id=snapshot_id,
            created=created,
            seconds=time.monotonic() - self.started,
        )
        log.info("ingest %s", result.to_json())
        return result

    def _commit(self, files: list[str]) -> tuple[int | None, bool]:
        """Commit ``files``; a commit that loses to another server's (shared catalog) is made again on the
        new base: checked against its schema again, the same files appended or the current ones replaced."""
        name = self.options.dataset
        return retry_conflicts(name, lambda: self._commit_once(files), self.catalog.retried)

    def _commit_once(self, files: list[str]) -> tuple[int | None, bool]:
        name = self.options.dataset
        with self.namespace.write_lock(name):
            current = self.catalog.metadata_locations().get(name)
            if current is None:
                if self.base_metadata_location is not None:
                    raise NotFound(f"dataset {name!r} was dropped during the upload; nothing was written")
                self.namespace.refuse_taken(name)
                return self.catalog.create_with_files(name, self.file_schema, files), True
            if self.options.mode == "create":
                raise AlreadyExists(f"dataset {name!r} already exists (mode 'create')")
            table = self.catalog.load(name)
            if current != self.base_metadata_location:  # it changed during the upload: check again
                reconcile(arrow_schema(table), self.file_schema, self._schema_mode, name)
            replace, evolve = self.options.mode == "overwrite", self._schema_mode == "evolve"
            return self.catalog.add_files(table, self.file_schema, files, replace, evolve), False


def reconcile(table: pa.Schema, upload: pa.Schema, schema_mode: str, dataset: str) -> pa.Schema:
    """The file schema for ``upload`` into a table of schema ``table``, or a SchemaConflict naming fields."""
    table_types = {field.name: canonical_type(field.type) for field in table}
    upload_types = {field.name: canonical_type(field.type) for field in upload}
    refuse_case_twins(table.names, upload.names, dataset)
    changed = [
        name for name in upload_types if name in table_types and upload_types[name] != table_types[name]
    ]
    added = [name for name in upload_types if name not in table_types]
    missing = [name for name in table_types if name not in upload_types]
    problems = []
    if changed:
        problems.append(
            "type differs: " + ", ".join(f"{n} ({upload_types[n]} vs {table_types[n]})" for n in changed)
        )
    if schema_mode == "strict":
        if added:
            problems.append("not in dataset: " + ", ".join(added))
        if missing:
            problems.append("missing from upload: " + ", ".join(missing))
    if problems:
        hint = "" if schema_mode == "evolve" or changed else "; use schema_mode 'evolve' to add columns"
        raise SchemaConflict(
            f"schema of upload differs from dataset {dataset!r}: {'; '.join(problems)}{hint}"
        )
    ordered = [upload.field(name) for name in table_types if name in upload_types]
    return pa.schema(ordered + [upload.field(name) for name in added])


def refuse_case_twins(table: list[str], upload: list[str], dataset: str) -> None:
    """Refuse upload columns that differ from a dataset column only in case: SQL names are case-insensitive,
    so both could not be stored (evolve would add a twin that breaks every later upload and describe)."""
    by_lower = {name.lower(): name for name in table}
    twins = [
        f"{name!r} (dataset has {by_lower[name.lower()]!r})"
        for name in upload
        if by_lower.get(name.lower(), name) != name
    ]
    if twins:
        raise SchemaConflict(
            f"schema of upload differs from dataset {dataset!r}: column names differ only in case: "
            f"{', '.join(twins)}; column names are case-insensitive, send them as the dataset has them"
        )


def conform(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """Reorder and cast an uploaded batch to the file schema."""
    if batch.schema.equals(schema):
        return batch
    try:
        columns = [batch.column(field.name).cast(field.type) for field in schema]
    except KeyError as exc:
        raise InvalidArgument(f"batch lacks column {exc.args[0]!r} announced by the stream schema") from None
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidArgument(f"cannot convert uploaded batch: {exc}") from None
    return pa.RecordBatch.from_arrays(columns, schema=schema)
