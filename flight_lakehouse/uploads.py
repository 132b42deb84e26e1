"""A client's upload stream (DoPut, DoExchange): its schema and its batches, each checked before use."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.errors import Cancelled
from flight_lakehouse.ingest import reading_upload, validated
from flight_lakehouse.protocol import CallContext


@dataclass(frozen=True)
class Upload:
    """The record batch stream a client sends within one call."""

    reader: flight.MetadataRecordBatchReader
    ctx: CallContext

    def schema(self) -> pa.Schema:
        """The schema the stream announces (a stream without one is refused)."""
        with reading_upload(self.ctx.is_cancelled):
            return self.reader.schema

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The record batches, each fully validated before anything uses it; malformed IPC is the client's
        error, and a stream the client cut off raises instead of ending."""
        chunks = iter(self.reader)
        while True:
            with reading_upload(self.ctx.is_cancelled):
                chunk = next(chunks, None)
            if chunk is None:
                break
            if chunk.data is not None:
                yield validated(chunk.data)
        if self.ctx.is_cancelled():  # a client that died mid-stream can look like a finished one
            raise Cancelled("upload cancelled by the client; nothing was committed")
