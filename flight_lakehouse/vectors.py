"""Vectors: which columns hold them, the metric a table keeps, and how an upload's batches become rows of a
Lance table (:class:`UploadPlan`, :class:`CheckedStream`), each vector checked on the way.

The Lance tables themselves are :class:`flight_lakehouse.datasets.lance.LanceTables`; search lives in
``vector_search.py`` and background index builds in ``vector_index.py``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.errors import (
    Cancelled,
    ClientError,
    InvalidArgument,
    SchemaConflict,
    Unavailable,
)
from flight_lakehouse.sandbox import first_line

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


def table_metric(schema: pa.Schema) -> str:
    """The metric a Lance table was created with (searches and indexes default to it)."""
    return (schema.metadata or {}).get(METRIC_KEY, DEFAULT_METRIC.encode()).decode()


#: The Rust source location Lance and DataFusion append to errors (``, /home/.../scanner.rs:839:33``).
RUST_LOCATION = re.compile(r",?\s*[^\s,]*\.rs:\d+(?::\d+)?")
#: The Python frames pyarrow appends to an error raised inside a scan (``At:`` then one frame a line).
PYTHON_FRAMES = re.compile(r"\n\s*At:\n.*", re.DOTALL)
#: An absolute file path (``/home/...``, ``/work/.../site-packages/...``); not the ``//`` of a URL.
SERVER_PATH = re.compile(r"(?<![\w<>:/.])/(?:[\w.@+-]+/)+[\w.@+-]*(?:\(\d+\))?")
#: Lance's hidden columns, offered as "did you mean" or listed among the valid fields.
INTERNAL_COLUMN = r"_(?:rowid|rowaddr|rowoffset|fragid|row_created_at_version|row_last_updated_at_version)"
INTERNAL_HINT = re.compile(rf"\s*Did you mean '{INTERNAL_COLUMN}'\?|,\s*(?:\w+\.)?{INTERNAL_COLUMN}\b")
#: The Python exception name pyarrow puts before a Lance message it re-raises through DuckDB.
PYTHON_EXCEPTION = re.compile(r"^(?:ValueError|OSError|RuntimeError|IOError|Arrow\w*Error|Exception): ")
MAX_LANCE_MESSAGE = 300


def from_lance(text: str) -> bool:
    """Whether an error message comes from Lance's Rust code (it names a Rust source file)."""
    return RUST_LOCATION.search(text) is not None


def lance_message(text: str, root: str = "") -> str:
    """A Lance error message (possibly re-raised by DuckDB) fit for clients: one line, at most
    :data:`MAX_LANCE_MESSAGE` characters, without Rust source locations, Python frames, server paths (the
    storage ``root`` reads ``<storage>``), Lance's hidden columns or the frames of Rust debug output.

    A message not from Lance keeps its first line only (DuckDB's caret under the query follows)."""
    for form, replacement in root_forms(root):
        text = text.replace(form, replacement)
    text = PYTHON_FRAMES.sub("", text).strip()
    if from_lance(text):  # Lance's message runs over several lines (a regex error, a debug dump)
        lines = (line.strip() for line in text.splitlines())
        text = " ".join(line for line in lines if line.strip("~-=^ "))
    else:
        text = text.splitlines()[0] if text else ""
    text = RUST_LOCATION.sub("", text)
    text = SERVER_PATH.sub("<path>", text)
    text = INTERNAL_HINT.sub("", text)
    text = PYTHON_EXCEPTION.sub("", " ".join(text.split()))
    if len(text) > MAX_LANCE_MESSAGE:
        text = text[: MAX_LANCE_MESSAGE - 3] + "..."
    return text or "Lance failed"


def root_forms(root: str) -> list[tuple[str, str]]:
    """How messages may name the storage root, each with what replaces it: as given, then without scheme
    or leading slash (Lance's object store names a local file ``tmp/x/...``), and an S3 root's key prefix
    (Lance names an object by its key: ``prefix/lance/...``)."""
    if not root:
        return []
    bare = root.split("://", 1)[-1].lstrip("/")
    forms = [(root, "<storage>")] + ([(bare, "<storage>")] if bare != root else [])
    if root.startswith("s3://") and "/" in bare:
        forms.append((bare.split("/", 1)[1].rstrip("/") + "/", "<storage>/"))
    return forms


def lance_error(exc: BaseException, root: str, doing: str) -> BaseException:
    """The client-facing error for a Lance failure: one line, server paths removed (:func:`lance_message`)."""
    if isinstance(exc, ClientError | Cancelled | Unavailable):
        return exc
    message = lance_message(str(exc), root)
    lowered = message.lower()
    if "commit conflict" in lowered or "retryable" in lowered or "concurrent" in lowered:
        return Unavailable(f"{doing}: a concurrent write won; retry ({message})")
    if "invalid user input" in lowered or "schema error" in lowered:  # pylance raises these as OSError
        return InvalidArgument(f"{doing}: {message}")
    if "error applying filter expression" in lowered:  # the filter failed on a row (1/0, a bad regex)
        return InvalidArgument(f"{doing}: {message}")
    if isinstance(exc, OSError) or any(
        word in lowered for word in ("object store", "io error", "connection", "timed out", "dispatch")
    ):
        log.warning("%s: storage error: %s", doing, exc)
        return Unavailable(f"{doing}: storage error: {message}")
    return InvalidArgument(f"{doing}: {message}")


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
