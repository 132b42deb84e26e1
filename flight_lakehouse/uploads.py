"""A client's upload stream (DoPut, DoExchange): its schema and its batches, each checked before use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.errors import Cancelled, InvalidArgument
from flight_lakehouse.ingest import invalid_batch, reading_upload, validated
from flight_lakehouse.protocol import CallContext

#: Levels of nested types (lists, structs, maps) a column may have. Arrow refuses batches nested deeper
#: than 64, and the schema alone sent pyiceberg's schema conversion past Python's recursion limit (an
#: INTERNAL error) from 65 levels; no table needs more than a few.
MAX_TYPE_DEPTH = 32


@dataclass(frozen=True)
class Upload:
    """The record batch stream a client sends within one call."""

    reader: flight.MetadataRecordBatchReader
    ctx: CallContext
    #: The most Arrow bytes the stream may hold (0: no limit); past it the upload is refused.
    max_bytes: int = 0

    def schema(self) -> pa.Schema:
        """The schema the stream announces (a stream without one is refused)."""
        with reading_upload(self.ctx.is_cancelled):
            schema = self.reader.schema
        check_field_names(schema)
        for column in schema:
            if type_depth(column.type) > MAX_TYPE_DEPTH:
                raise InvalidArgument(
                    f"column {column.name!r} is nested more than {MAX_TYPE_DEPTH} levels deep "
                    "(lists, structs or maps within each other); nothing was committed"
                )
        return schema

    def batches(self, expected_rows: int | None = None) -> Iterator[pa.RecordBatch]:
        """The record batches, each fully validated before anything uses it; malformed IPC is the client's
        error, and a stream the client cut off raises instead of ending. With ``expected_rows`` (the
        client's statement of the upload's size) a stream ending with any other count raises too, and one
        going past it raises as soon as it does: the writer then commits nothing."""
        self.schema()  # a DoExchange reads no schema first: its column names must be checked all the same
        chunks = iter(self.reader)
        received = rows = 0
        while True:
            with reading_upload(self.ctx.is_cancelled):
                chunk = next(chunks, None)
            if chunk is None:
                break
            if chunk.data is not None:
                # nbytes reads the offsets at each column's claimed length: a batch whose header claims more
                # rows than its buffers hold crashed the server there (segfault), so its sizes are checked
                # first (cheap: no data is scanned; the full check follows below)
                shaped(chunk.data)
                received += chunk.data.nbytes
                if self.max_bytes and received > self.max_bytes:
                    raise InvalidArgument(
                        f"upload larger than the server's limit of {self.max_bytes >> 20} MB per call "
                        "(max_ingest_mb); nothing was committed: split it into several uploads"
                    )
                rows += chunk.data.num_rows
                if expected_rows is not None and rows > expected_rows:
                    raise InvalidArgument(incomplete(rows, expected_rows, "more than"))
                self.ctx.note(rows=chunk.data.num_rows, size=chunk.data.nbytes)
                yield validated(chunk.data)
        if self.ctx.is_cancelled():  # a client that died mid-stream can look like a finished one
            raise Cancelled("upload cancelled by the client; nothing was committed")
        if expected_rows is not None and rows != expected_rows:
            raise InvalidArgument(incomplete(rows, expected_rows, "only"))


def shaped(batch: pa.RecordBatch) -> None:
    """Refuse a batch whose buffers are too small for its lengths (Arrow's structural check)."""
    try:
        batch.validate()
    except pa.ArrowException as exc:
        raise InvalidArgument(invalid_batch(batch, exc)) from None


def check_field_names(schema: pa.Schema) -> None:
    """Refuse a schema with a field name (nested ones included) that is not UTF-8: reading it raised
    UnicodeDecodeError, an INTERNAL error (found by fuzzing raw IPC)."""
    level: list[pa.Field] = list(schema)
    for _ in range(MAX_TYPE_DEPTH + 1):
        for column in level:
            try:
                _ = column.name  # decoding the name is the check
            except UnicodeDecodeError:
                raise InvalidArgument("a column name of the upload is not valid UTF-8") from None
        level = [kind.field(i) for kind in (column.type for column in level) for i in range(kind.num_fields)]


def type_depth(data_type: pa.DataType) -> int:
    """Levels of nesting of ``data_type``: 0 for a flat type (walked without recursion)."""
    depth, level = 0, [data_type]
    while level:
        level = [kind.field(i).type for kind in level for i in range(kind.num_fields)]
        depth += bool(level)
        if depth > MAX_TYPE_DEPTH:
            break
    return depth


def incomplete(rows: int, expected_rows: int, how: str) -> str:
    """The refusal of an upload whose row count is not the one it announced."""
    return (
        f"upload incomplete: {how} {rows:,} rows arrived but expected_rows is {expected_rows:,}; "
        "nothing was committed"
    )
