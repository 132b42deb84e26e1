"""The formats ``POST /v1/query`` streams a result in: an Arrow IPC stream (the default), JSON lines or CSV,
chosen by the request's ``Accept`` header. Each encoder turns one record batch at a time into bytes, so a
result is never held whole."""

from __future__ import annotations

import base64
import datetime
import decimal
import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv

from flight_lakehouse.errors import InvalidArgument
from flight_lakehouse.text_values import csv_batch, csv_schema

ARROW_STREAM = "application/vnd.apache.arrow.stream"
NDJSON = "application/x-ndjson"
JSONL = "application/jsonl"
CSV = "text/csv"


class Chunks:
    """A write-only file the Arrow writers write into; :meth:`take` hands over what they wrote."""

    closed = False

    def __init__(self) -> None:
        self._data = bytearray()

    def write(self, data: pa.Buffer | bytes) -> int:
        """Copy ``data`` (pyarrow passes a buffer it reuses for the next write)."""
        self._data += data
        return len(data)

    def flush(self) -> None:
        """Nothing is buffered."""

    def take(self) -> bytearray:
        """Everything written since the last call."""
        data, self._data = self._data, bytearray()
        return data


class Encoder(ABC):
    """Encodes one result: :meth:`start` once (with the schema), :meth:`batch` per record batch, then
    :meth:`finish`; each returns the bytes to send."""

    media_type: str

    @abstractmethod
    def start(self, schema: pa.Schema) -> bytes | bytearray:
        """The bytes before the first batch (refuses a schema the format cannot hold)."""

    @abstractmethod
    def batch(self, batch: pa.RecordBatch) -> bytes | bytearray:
        """One batch's bytes."""

    def finish(self) -> bytes | bytearray:
        """The bytes after the last batch."""
        return b""


class WriterEncoder(Encoder):
    """An encoder over a pyarrow batch writer (IPC stream, CSV) writing into a :class:`Chunks` sink."""

    def __init__(self) -> None:
        self._sink = Chunks()
        self._writer: pa.ipc.RecordBatchStreamWriter | pacsv.CSVWriter | None = None

    @abstractmethod
    def open_writer(
        self, sink: Chunks, schema: pa.Schema
    ) -> pa.ipc.RecordBatchStreamWriter | pacsv.CSVWriter:
        """The format's writer of ``schema`` into ``sink``."""

    def start(self, schema: pa.Schema) -> bytes | bytearray:
        self._writer = self.open_writer(self._sink, schema)
        return self._sink.take()

    def batch(self, batch: pa.RecordBatch) -> bytes | bytearray:
        assert self._writer is not None
        self._writer.write_batch(batch)
        return self._sink.take()

    def finish(self) -> bytes | bytearray:
        assert self._writer is not None
        self._writer.close()
        return self._sink.take()


class ArrowEncoder(WriterEncoder):
    """An Arrow IPC stream (schema, record batches, end-of-stream marker), as Flight DoGet sends it."""

    media_type = ARROW_STREAM

    def open_writer(self, sink: Chunks, schema: pa.Schema) -> pa.ipc.RecordBatchStreamWriter:
        return pa.ipc.new_stream(sink, schema)


class CsvEncoder(WriterEncoder):
    """CSV with a header line (pyarrow's writer: RFC 4180 quoting, ISO timestamps); lists, structs, maps
    and vectors as JSON text, binary as base64, as the CLI writes CSV (``text_values``)."""

    media_type = CSV

    def open_writer(self, sink: Chunks, schema: pa.Schema) -> pacsv.CSVWriter:
        try:
            return pacsv.CSVWriter(sink, csv_schema(schema))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidArgument(
                f"the result cannot be sent as CSV ({first_line(exc)}); ask for Arrow"
            ) from None

    def batch(self, batch: pa.RecordBatch) -> bytes | bytearray:
        return super().batch(csv_batch(batch))


class JsonLinesEncoder(Encoder):
    """One JSON object per row and line: binary as base64, decimals as strings, times in ISO 8601."""

    def __init__(self, media_type: str = NDJSON) -> None:
        self.media_type = media_type

    def start(self, schema: pa.Schema) -> bytes | bytearray:
        return b""

    def batch(self, batch: pa.RecordBatch) -> bytes | bytearray:
        option = orjson.OPT_APPEND_NEWLINE | orjson.OPT_NON_STR_KEYS
        return b"".join(orjson.dumps(row, default=json_value, option=option) for row in batch.to_pylist())


def json_value(value: Any) -> Any:
    """What orjson cannot write itself, as JSON can hold it."""
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


#: Encoders by the media types a client may ask for.
ENCODERS: dict[str, Callable[[], Encoder]] = {
    ARROW_STREAM: ArrowEncoder,
    NDJSON: functools.partial(JsonLinesEncoder, NDJSON),
    JSONL: functools.partial(JsonLinesEncoder, JSONL),
    CSV: CsvEncoder,
}
#: What ``*/*`` and the other wildcards stand for.
WILDCARDS = {"*/*": ARROW_STREAM, "application/*": ARROW_STREAM, "text/*": CSV}


class NotAcceptable(InvalidArgument):
    """The client accepts none of the formats the server writes (HTTP 406)."""


def encoder_for(accept: str | None) -> Encoder:
    """The encoder of the best format ``accept`` lists that the server writes (no header: Arrow), or
    :class:`NotAcceptable`."""
    ranked = media_ranges(accept or "")
    if not ranked:
        return ArrowEncoder()
    for media in ranked:
        make = ENCODERS.get(WILDCARDS.get(media, media))
        if make is not None:
            return make()
    raise NotAcceptable(f"cannot answer in {(accept or '')[:200]!r}; the server writes {', '.join(ENCODERS)}")


def media_ranges(accept: str) -> list[str]:
    """The media ranges of an ``Accept`` header, best first (by ``q``, then by order), ``q=0`` left out."""
    ranked: list[tuple[float, int, str]] = []
    for index, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            key, _, value = parameter.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        if media and quality > 0:
            ranked.append((-quality, index, media.lower()))
    return [media for _, _, media in sorted(ranked)]


def first_line(exc: BaseException) -> str:
    """The first line of an error's message."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__
