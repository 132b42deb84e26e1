"""Semantic search: text columns embedded into vector columns by the server's :class:`Embedder`.

A vector column the server filled from text carries its record in the column's Arrow field metadata
(:data:`RECORD_KEY`: the model, the text column, the dimension), so it travels with the Lance table's
schema, is committed with the data it describes, and every later upload, search by text or ``embed`` call
finds the model that made it. Uploads into such a table embed the recorded columns they lack; a different
model is refused by name, never mixed into a column.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from flight_lakehouse.batching import Coalescer
from flight_lakehouse.commands import EmbedSpec, EmbedTexts, IngestOptions, Reembed
from flight_lakehouse.embeddings import Embedder
from flight_lakehouse.errors import ClientError, InvalidArgument, Unavailable
from flight_lakehouse.vectors import lance_error, table_metric

if TYPE_CHECKING:
    from flight_lakehouse.datasets.registry import Datasets

RECORD_KEY = b"lakehouse.embedding"
#: Texts embedded (and rows handed on) at a time within an uploaded batch: bounds the vectors held.
CHUNK_ROWS = 1024
#: The schema metadata key of the ``embed`` action's result naming the model.
MODEL_KEY = b"model"


@dataclass(frozen=True)
class EmbeddingRecord:
    """A vector column ``into`` that holds the embeddings of text column ``source`` by ``model``."""

    into: str
    source: str
    model: str
    dimension: int

    def field(self) -> pa.Field:
        """The vector column's Arrow field, the record in its metadata."""
        record = {"model": self.model, "from": self.source, "dimension": self.dimension}
        return pa.field(
            self.into, pa.list_(pa.float32(), self.dimension), metadata={RECORD_KEY: json.dumps(record)}
        )

    def to_json(self) -> dict[str, Any]:
        """What ``describe_dataset`` shows."""
        return {"model": self.model, "dimension": self.dimension, "from": self.source, "into": self.into}


def embedding_records(schema: pa.Schema) -> list[EmbeddingRecord]:
    """The embedded vector columns of a table's schema, in column order."""
    records = []
    for field in schema:
        raw = (field.metadata or {}).get(RECORD_KEY)
        if raw is not None:
            record = json.loads(raw)
            records.append(EmbeddingRecord(field.name, record["from"], record["model"], record["dimension"]))
    return records


def text_column(column: pa.Array | pa.ChunkedArray, name: str, first_row: int) -> list[str]:
    """The texts of a column, refusing non-text columns and NULL texts (naming the row)."""
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    if not any(kind(column.type) for kind in kinds):
        raise InvalidArgument(f"column {name!r} holds {column.type}, not text: it cannot be embedded")
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise InvalidArgument(f"row {first_row + row}: text column {name!r} is null and cannot be embedded")
    return column.to_pylist()


def vector_array(matrix: np.ndarray) -> pa.FixedSizeListArray:
    """A float32 matrix as a ``fixed_size_list<float32>`` array (no copy)."""
    return pa.FixedSizeListArray.from_arrays(pa.array(matrix.reshape(-1)), matrix.shape[1])


class TextEmbedding:
    """Embedding at ingest, at search and on request, with the server's one embedder (None: none)."""

    def __init__(self, embedder: Embedder | None, datasets: Datasets) -> None:
        self.embedder = embedder
        self.datasets = datasets
        #: Query texts of concurrent searches are embedded together, in one model call.
        self._queries: Coalescer[str, np.ndarray] = Coalescer(self._embed_queries)
        datasets.lance.on_describe.append(self.describe)

    def facts(self) -> dict[str, Any] | None:
        """What ``health`` shows of the embedder (None: none), without loading the model."""
        return None if self.embedder is None else self.embedder.describe()

    def describe(self, name: str, facts: dict[str, Any]) -> None:
        """``describe_dataset``'s ``embedding`` (the column searches by text use when none is named; None
        when no column is embedded from text) and ``embeddings`` (every embedded column)."""
        records = embedding_records(self.datasets.lance.schema(name))
        facts["embedding"] = records[-1].to_json() if records else None
        facts["embeddings"] = [record.to_json() for record in records]

    def require(self, model: str | None = None, what: str = "") -> Embedder:
        """The embedder, refusing when there is none or when it is not ``model``."""
        if self.embedder is None:
            raise InvalidArgument(
                "this server has no embedder (setting 'embedder' / --embedder is 'none'); "
                "install the embed extra or name one: builtin, onnx:DIR or openai:URL"
            )
        if model is not None and model != self.embedder.name:
            raise InvalidArgument(
                f"{what} was embedded with model {model!r}; this server embeds with {self.embedder.name!r} "
                "(re-embed it with the reembed action, or run a server with that model)"
            )
        return self.embedder

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """The vectors of ``texts``."""
        return self.require().embed(texts)

    # -- ingest ----------------------------------------------------------------------------------
    def for_upload(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
        """The upload with the vector columns it must get (``embed``, or the table's records) added,
        embedded batch by batch as the stream arrives."""
        records = self._records_to_fill(options, schema)
        if not records:
            return schema, batches
        for record in records:
            self.require(record.model, f"column {record.into!r} of dataset {options.dataset!r}")
            if record.source not in schema.names:
                raise InvalidArgument(
                    f"the upload lacks text column {record.source!r}, embedded into {record.into!r}"
                )
            text_column(pa.array([], schema.field(record.source).type), record.source, 0)
        target = pa.schema([*schema, *(record.field() for record in records)], metadata=schema.metadata)
        return target, self._embedded(batches, records, target)

    def _records_to_fill(self, options: IngestOptions, schema: pa.Schema) -> list[EmbeddingRecord]:
        name, spec = options.dataset, options.embed
        existing = self.datasets.format_of(name)
        if existing is not None and existing is not self.datasets.lance:
            if spec is None:
                return []
            raise InvalidArgument(
                f"dataset {name!r} is Parquet; embedding makes vector columns of Lance tables"
            )
        if spec is not None and options.format == "parquet":
            raise InvalidArgument("'embed' writes a vector column, which Parquet datasets do not hold")
        records = [] if existing is None else embedding_records(self.datasets.lance.schema(name))
        if spec is not None:
            self._check_spec(name, spec, schema, records, existing is None)
            if existing is None:
                records = [self._new_record(spec)]
        return [record for record in records if record.into not in schema.names]

    def _check_spec(
        self, name: str, spec: EmbedSpec, schema: pa.Schema, records: list[EmbeddingRecord], new: bool
    ) -> None:
        if spec.into in schema.names:
            raise InvalidArgument(
                f"column {spec.into!r} is in the upload; 'embed' writes it from {spec.from_!r}"
            )
        if new:
            return
        record = next((r for r in records if r.into == spec.into), None)
        if record is None:
            raise InvalidArgument(
                f"dataset {name!r} has no column {spec.into!r} embedded from text; add one with reembed"
            )
        if record.source != spec.from_:
            raise InvalidArgument(
                f"column {spec.into!r} of dataset {name!r} is embedded from {record.source!r}, "
                f"not {spec.from_!r}"
            )

    def _new_record(self, spec: EmbedSpec) -> EmbeddingRecord:
        embedder = self.require()
        return EmbeddingRecord(spec.into, spec.from_, embedder.name, embedder.dimension)

    def _embedded(
        self, batches: Iterator[pa.RecordBatch], records: list[EmbeddingRecord], target: pa.Schema
    ) -> Iterator[pa.RecordBatch]:
        row = 0
        for batch in batches:
            for start in range(0, batch.num_rows, CHUNK_ROWS):
                chunk = batch.slice(start, CHUNK_ROWS)
                vectors = [
                    vector_array(self.embed(text_column(chunk.column(r.source), r.source, row)))
                    for r in records
                ]
                yield pa.RecordBatch.from_arrays([*chunk.columns, *vectors], schema=target)
                row += chunk.num_rows

    # -- search ----------------------------------------------------------------------------------
    def record_of(self, dataset: str, schema: pa.Schema, column: str) -> EmbeddingRecord:
        """The record of vector column ``column``, refusing a column not embedded from text."""
        record = next((r for r in embedding_records(schema) if r.into == column), None)
        if record is None:
            raise InvalidArgument(
                f"column {column!r} of dataset {dataset!r} holds vectors the server did not embed from text; "
                "search it with 'vector'"
            )
        self.require(record.model, f"column {column!r} of dataset {dataset!r}")
        return record

    def query_vectors(self, dataset: str, schema: pa.Schema, column: str, texts: Sequence[str]) -> np.ndarray:
        """The vectors of query texts for searching ``column`` (embedded with its model)."""
        self.record_of(dataset, schema, column)
        if len(texts) == 1:
            return self._queries.submit(texts[0]).reshape(1, -1)
        return self.embed(texts)

    def _embed_queries(self, texts: Sequence[str]) -> list[np.ndarray]:
        return list(self.embed(texts))

    # -- the embed action ------------------------------------------------------------------------
    def embed_action(self, body: EmbedTexts) -> bytes:
        """The ``embed`` action: Arrow IPC stream bytes of one ``vector`` column, the model in the
        metadata."""
        if body.dataset is not None:
            tables = self.datasets.vector_table(body.dataset, "embed with a dataset's model")
            schema = tables.schema(body.dataset)
            records = embedding_records(schema)
            if not records:
                raise InvalidArgument(f"dataset {body.dataset!r} has no column embedded from text")
            self.require(records[-1].model, f"dataset {body.dataset!r}")
        embedder = self.require()
        vectors = vector_array(self.embed(body.texts))
        table = pa.table({"vector": vectors}).replace_schema_metadata({MODEL_KEY: embedder.name})
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    # -- re-embedding ----------------------------------------------------------------------------
    def reembed(self, body: Reembed) -> dict[str, Any]:
        """Embed a dataset's text column again with the server's model: into a new dataset (its rows, less
        the old embedded columns) or into a new column of the same dataset, in one commit either way."""
        embedder = self.require()
        if body.model is not None and body.model != embedder.name:
            raise InvalidArgument(
                f"this server embeds with {embedder.name!r}, not {body.model!r}; run a server with "
                "--embedder for that model to re-embed with it"
            )
        tables = self.datasets.vector_table(body.dataset, "reembed")
        schema = tables.schema(body.dataset)
        records = embedding_records(schema)
        source = body.from_ or (records[-1].source if records else None)
        if source is None or source not in schema.names:
            raise InvalidArgument(f"reembed needs 'from': a text column of dataset {body.dataset!r}")
        started = time.monotonic()
        if body.target_dataset is not None:
            result = self._into_dataset(body, source, records)
        else:
            result = self._into_column(body, source, schema)
        result.update(model=embedder.name, seconds=round(time.monotonic() - started, 3))
        return result

    def _into_dataset(self, body: Reembed, source: str, records: list[EmbeddingRecord]) -> dict[str, Any]:
        assert body.target_dataset is not None
        into = body.into or (records[-1].into if records else "vector")
        tables = self.datasets.lance
        dataset = tables.dataset(body.dataset)
        schema = tables.schema(body.dataset)
        kept = [f.name for f in schema if f.name not in {r.into for r in records} and f.name != into]
        options = IngestOptions(
            dataset=body.target_dataset,
            mode="create",
            format="lance",
            metric=table_metric(schema),
            embed=EmbedSpec.model_validate({"from": source, "into": into}),
        )
        rows = pa.schema([schema.field(name) for name in kept])
        try:
            batches = dataset.to_batches(columns=kept)
        except Exception as exc:
            raise lance_error(exc, tables.storage.root_uri, f"reembed {body.dataset!r}") from None
        target, embedded = self.for_upload(options, rows, batches)
        result = self.datasets.write(options, target, embedded)
        return {"dataset": body.target_dataset, "into": into, "rows": result.get("rows_written")}

    def _into_column(self, body: Reembed, source: str, schema: pa.Schema) -> dict[str, Any]:
        import lance

        name = body.dataset
        if body.into is None or body.into in schema.names:
            raise InvalidArgument(
                f"reembed into dataset {name!r} itself needs 'into': a new column name "
                "(or give 'target_dataset' to write a new dataset)"
            )
        text_column(pa.array([], schema.field(source).type), source, 0)
        record = EmbeddingRecord(body.into, source, self.require().name, self.require().dimension)
        output = pa.schema([record.field()])
        failure: list[BaseException] = []
        rows = [0]

        def embed_batch(batch: pa.RecordBatch) -> pa.RecordBatch:
            try:
                vectors = vector_array(self.embed(text_column(batch.column(source), source, rows[0])))
            except BaseException as exc:
                failure.append(exc)
                raise
            rows[0] += batch.num_rows
            return pa.RecordBatch.from_arrays([vectors], schema=output)

        tables = self.datasets.lance
        dataset = tables.writable(name)
        try:
            dataset.add_columns(lance.batch_udf(output_schema=output)(embed_batch), read_columns=[source])
        except Exception as exc:
            if failure and isinstance(failure[0], ClientError | Unavailable):
                raise failure[0] from None
            raise lance_error(exc, tables.storage.root_uri, f"reembed {name!r}") from None
        tables.committed(name, dataset)
        return {"dataset": name, "into": body.into, "rows": rows[0], "version": dataset.version}
