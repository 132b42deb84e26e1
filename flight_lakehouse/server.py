"""The Flight server: decodes each call once and dispatches to one typed method per command."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse import __version__
from flight_lakehouse.catalog import DatasetCatalog, summarise
from flight_lakehouse.commands import (
    Command,
    CreateIndex,
    DatasetRef,
    DeleteRows,
    DropDataset,
    EmptyBody,
    IngestCommand,
    IngestOptions,
    Optimize,
    ScanRequest,
    SearchCommand,
    SearchRequest,
    SqlQuery,
    decode_json_object,
    parse_body,
    parse_model,
    validate_dataset_name,
)
from flight_lakehouse.errors import (
    Cancelled,
    InvalidArgument,
    NotFound,
    Unimplemented,
    client_safe,
    client_safe_iter,
)
from flight_lakehouse.ingest import IngestSession, reading_upload, validated
from flight_lakehouse.process import hide_client_tracebacks, large_work_finished
from flight_lakehouse.query import CallHooks, QueryEngine, QueryStream
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import open_storage
from flight_lakehouse.vector_cache import VectorCache
from flight_lakehouse.vector_index import IndexBuilder
from flight_lakehouse.vector_search import VectorSearch
from flight_lakehouse.vectors import VectorTables, holds_vectors

log = logging.getLogger(__name__)

#: Type URL prefix of Flight SQL commands (protobuf ``Any``), served by a later release.
FLIGHT_SQL_TYPE_PREFIX = b"type.googleapis.com/arrow.flight.protocol.sql."


@dataclass(frozen=True)
class ActionSpec:
    """One action: its body model, what it does, and the method serving it."""

    body: type[Command]
    description: str
    handler: Callable[[Any], Any]


def json_bytes(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), default=str).encode("utf-8")


Request = SqlQuery | ScanRequest | IngestCommand | SearchCommand


def decode_request(raw: bytes, what: str) -> Request:
    """A command or ticket: ``{"sql"}``, ``{"dataset"}`` (scan), ``{"search"}`` or ``{"ingest"}``."""
    if raw.startswith(b"\n") and FLIGHT_SQL_TYPE_PREFIX in raw[:200]:
        raise Unimplemented("Flight SQL commands are not served yet; use JSON commands")
    payload = decode_json_object(raw, what)
    if "sql" in payload:
        return parse_model(SqlQuery, payload)
    if "ingest" in payload:
        return parse_model(IngestCommand, payload)
    if "dataset" in payload:
        return parse_model(ScanRequest, payload)
    if "search" in payload:
        return parse_model(SearchCommand, payload)
    raise InvalidArgument(
        f"{what} must have one of the keys 'sql', 'dataset', 'search' or 'ingest'; got {sorted(payload)}"
    )


def call_hooks(context: flight.ServerCallContext) -> CallHooks:
    """What a query needs of its Flight call: the cancellation check."""
    return CallHooks(is_cancelled=context.is_cancelled)


class LakehouseServer(flight.FlightServerBase):
    """flight-lakehouse over Arrow Flight: ingest by DoPut, SQL and scans by DoGet, catalog by actions."""

    def __init__(self, settings: Settings, **server_options: Any) -> None:
        hide_client_tracebacks()  # the error contract, also of a server embedded in another process
        self.settings = settings
        self.storage = open_storage(settings)
        self.catalog = DatasetCatalog(self.storage, settings.catalog_uri)
        self.vectors = VectorTables(self.storage, settings, self.catalog)
        self.catalog.other_names = self.vectors.names
        self.cache = VectorCache(self.vectors, settings)
        self.searcher = VectorSearch(self.vectors, self.cache)
        self.indexes = IndexBuilder(self.vectors, settings)
        self.engine = QueryEngine(self.catalog, settings, self.vectors)
        self.actions: dict[str, ActionSpec] = {
            "health": ActionSpec(
                EmptyBody, "Liveness and version: {status, version, storage, datasets}.", self.health
            ),
            "list_datasets": ActionSpec(
                EmptyBody, "Every dataset with format, rows, bytes, updated_at.", self.list_datasets
            ),
            "describe_dataset": ActionSpec(
                DatasetRef, "Schema (Arrow IPC, base64) and facts of one dataset.", self.describe_dataset
            ),
            "dataset_history": ActionSpec(
                DatasetRef, "Snapshots of one dataset, newest first.", self.dataset_history
            ),
            "drop_dataset": ActionSpec(
                DropDataset, "Drop a dataset and delete its files.", self.drop_dataset
            ),
            "vector_search": ActionSpec(
                SearchRequest,
                "k nearest rows (vector), best matches (text) or both fused; Arrow IPC stream bytes.",
                self.vector_search,
            ),
            "create_index": ActionSpec(
                CreateIndex,
                "Build an ivf_pq, ivf_hnsw_sq, fts, btree or bitmap index on a Lance table.",
                self.create_index,
            ),
            "delete_rows": ActionSpec(
                DeleteRows, "Delete the rows of a Lance table matching an SQL predicate.", self.delete_rows
            ),
            "optimize": ActionSpec(
                Optimize, "Compact a Lance table, update its indexes, remove old versions.", self.optimize
            ),
        }
        super().__init__(settings.location, **server_options)

    # -- actions ---------------------------------------------------------------------------------
    def health(self, _: EmptyBody) -> dict[str, Any]:
        """The ``health`` action."""
        return {
            "status": "ok",
            "version": __version__,
            "storage": self.storage.public_facts(),
            "datasets": len(self.catalog.metadata_locations()) + len(self.vectors.names()),
        }

    def list_datasets(self, _: EmptyBody) -> list[dict[str, Any]]:
        """The ``list_datasets`` action."""
        lance = [self.vectors.summarise(name) for name in self.vectors.names()]
        return sorted(self.catalog.list_datasets() + lance, key=lambda entry: entry["name"])

    def describe_dataset(self, body: DatasetRef) -> dict[str, Any]:
        """The ``describe_dataset`` action."""
        if self.vectors.exists(body.dataset):
            facts = self.vectors.describe(body.dataset, self.indexes.pending(body.dataset))
            return {**facts, "serving": self.cache.facts(body.dataset)}
        return self.catalog.describe(body.dataset)

    def dataset_history(self, body: DatasetRef) -> list[dict[str, Any]]:
        """The ``dataset_history`` action."""
        if self.vectors.exists(body.dataset):
            return self.vectors.history(body.dataset)
        return self.catalog.history(body.dataset)

    def drop_dataset(self, body: DropDataset) -> dict[str, Any]:
        """The ``drop_dataset`` action."""
        if self.vectors.exists(body.dataset):
            self.vectors.drop(body.dataset)
            self.indexes.forget(body.dataset)
            return {"dropped": True}
        return {"dropped": self.catalog.drop(body.dataset, body.if_exists)}

    def vector_search(self, body: SearchRequest) -> bytes:
        """The ``vector_search`` action: the result as Arrow IPC stream bytes."""
        result = self.searcher.search(self.searcher.plan(body))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, result.schema) as writer:
            writer.write_table(result)
        return sink.getvalue().to_pybytes()

    def create_index(self, body: CreateIndex) -> dict[str, Any]:
        """The ``create_index`` action."""
        self.vectors.require(body.dataset, "create_index")
        return self.indexes.create(body)

    def delete_rows(self, body: DeleteRows) -> dict[str, Any]:
        """The ``delete_rows`` action."""
        self.vectors.require(body.dataset, "delete_rows")
        self.searcher.check_filter(body.where)
        return self.vectors.delete_rows(body.dataset, body.where)

    def optimize(self, body: Optimize) -> dict[str, Any]:
        """The ``optimize`` action."""
        self.vectors.require(body.dataset, "optimize")
        try:
            return self.vectors.optimize(body.dataset, body.older_than_seconds)
        finally:
            large_work_finished()

    @client_safe
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return [(name, spec.description) for name, spec in self.actions.items()]

    @client_safe
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[bytes]:
        spec = self.actions.get(action.type)
        if spec is None:
            raise NotFound(f"unknown action {action.type!r}; ListActions lists them")
        body = parse_body(spec.body, action.body.to_pybytes() if action.body else b"", f"{action.type} body")
        result = spec.handler(body)
        return [result if isinstance(result, bytes) else json_bytes(result)]

    # -- ingest ----------------------------------------------------------------------------------
    @client_safe
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        options = self._ingest_options(descriptor)
        schema = uploaded_schema(reader, context)
        batches = uploaded_batches(reader, context)
        try:
            if self._is_lance(options, schema):
                result = self.vectors.write(options, schema, batches)
            else:
                result = self._ingest_parquet(options, schema, batches)
        finally:
            large_work_finished()
        writer.write(pa.py_buffer(json_bytes(result)))

    def _is_lance(self, options: IngestOptions, schema: pa.Schema) -> bool:
        """Whether an upload goes to a Lance table: the existing dataset's format, else the upload's."""
        lance, parquet = self.vectors.exists(options.dataset), self.catalog.exists(options.dataset)
        if not (lance or parquet):
            return holds_vectors(schema, options)
        wanted = options.format
        if wanted is not None and wanted != ("lance" if lance else "parquet"):
            current = "a Lance table" if lance else "Parquet"
            raise InvalidArgument(
                f"dataset {options.dataset!r} is {current}; format {wanted!r} does not apply"
            )
        return lance

    def _ingest_parquet(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> dict:
        session = IngestSession(self.catalog, self.settings, options, schema)
        try:
            for batch in batches:
                session.write(batch)
        except BaseException:
            session.abort()
            raise
        return session.commit().to_json()

    def _ingest_options(self, descriptor: flight.FlightDescriptor) -> IngestOptions:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            return IngestOptions(dataset=self._path_dataset(descriptor))
        request = decode_request(descriptor.command, "DoPut command")
        if not isinstance(request, IngestCommand):
            raise InvalidArgument("DoPut takes a path descriptor or an {'ingest': {...}} command")
        return request.ingest

    # -- queries ---------------------------------------------------------------------------------
    @client_safe
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        request = decode_request(ticket.ticket, "ticket")
        if isinstance(request, SearchCommand):
            # a search result is small and complete: Flight sends it without calling back into Python
            return flight.RecordBatchStream(self.searcher.search(self.searcher.plan(request.search)))
        stream = self._start(request, call_hooks(context))
        return flight.GeneratorStream(stream.schema, client_safe_iter(stream.batches))

    def _start(self, request: Request, call: CallHooks) -> QueryStream:
        if isinstance(request, SqlQuery):
            return self.engine.run(request.sql, call)
        if isinstance(request, ScanRequest):
            database = self.engine.scan_database(request)
            return self.engine.run(self.engine.scan_sql(request, database), call, database)
        raise InvalidArgument("an ingest command is not a ticket; send it with DoPut")

    @client_safe
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._flight_info(descriptor)

    @client_safe
    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        return flight.SchemaResult(self._flight_info(descriptor).schema)

    @client_safe
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[flight.FlightInfo]:
        names = sorted(self.catalog.names() + self.vectors.names())
        return [self._dataset_info(name) for name in names]

    @client_safe
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        request = decode_request(descriptor.command or b"", "DoExchange command")
        if not isinstance(request, SearchCommand):
            raise InvalidArgument("DoExchange takes a {'search': {...}} command")
        plan = self.searcher.plan(request.search, exchange=True)
        writer.begin(plan.exchange_schema)
        for batch in self.searcher.exchange(plan, uploaded_batches(reader, context)):
            writer.write_batch(batch)

    def _flight_info(self, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        if descriptor.descriptor_type == flight.DescriptorType.PATH:
            return self._dataset_info(self._path_dataset(descriptor))
        request = decode_request(descriptor.command, "command")
        if isinstance(request, ScanRequest):
            database = self.engine.scan_database(request)
            schema = self.engine.schema(self.engine.scan_sql(request, database), database)
            return self._info(descriptor, schema, request.model_dump_json(exclude_none=True).encode(), -1, -1)
        if isinstance(request, SqlQuery):
            schema = self.engine.schema(request.sql)
            return self._info(descriptor, schema, request.model_dump_json().encode(), -1, -1)
        if isinstance(request, SearchCommand):  # run once: Lance alone can tell a bad filter
            schema = self.searcher.search(self.searcher.plan(request.search)).schema
            return self._info(descriptor, schema, request.model_dump_json(exclude_none=True).encode(), -1, -1)
        raise InvalidArgument("an ingest command has no FlightInfo; send it with DoPut")

    def _dataset_info(self, name: str) -> flight.FlightInfo:
        if self.vectors.exists(name):
            facts = self.vectors.summarise(name)
        else:
            facts = summarise(name, self.catalog.load(name))
        request = ScanRequest(dataset=name)
        database = self.engine.scan_database(request)
        schema = self.engine.schema(
            self.engine.scan_sql(request, database), database
        )  # exactly as DoGet streams
        descriptor = flight.FlightDescriptor.for_path(name)
        return self._info(descriptor, schema, json_bytes({"dataset": name}), facts["rows"], facts["bytes"])

    @staticmethod
    def _info(
        descriptor: flight.FlightDescriptor, schema: pa.Schema, ticket: bytes, rows: int, size: int
    ) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(flight.Ticket(ticket), [])
        return flight.FlightInfo(schema, descriptor, [endpoint], rows, size)

    @staticmethod
    def _path_dataset(descriptor: flight.FlightDescriptor) -> str:
        path = descriptor.path or []
        if len(path) != 1:
            raise InvalidArgument(f"a path descriptor names one dataset, got {len(path)} path elements")
        return validate_dataset_name(path[0])


def uploaded_schema(reader: flight.MetadataRecordBatchReader, context: flight.ServerCallContext) -> pa.Schema:
    """The schema a client stream announces (a stream without one is refused)."""
    with reading_upload(context.is_cancelled):
        return reader.schema


def uploaded_batches(
    reader: flight.MetadataRecordBatchReader, context: flight.ServerCallContext
) -> Iterator[pa.RecordBatch]:
    """The record batches of a client stream, each fully validated before anything uses it; malformed
    IPC is the client's error, and a stream the client cut off raises instead of ending."""
    chunks = iter(reader)
    while True:
        with reading_upload(context.is_cancelled):
            chunk = next(chunks, None)
        if chunk is None:
            break
        if chunk.data is not None:
            yield validated(chunk.data)
    if context.is_cancelled():  # a client that died mid-stream can look like a finished one
        raise Cancelled("upload cancelled by the client; nothing was committed")
