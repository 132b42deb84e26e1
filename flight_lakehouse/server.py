"""The Flight adapter: decodes each call once into a typed request and dispatches it to its handler."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.actions import Actions
from flight_lakehouse.errors import client_safe, client_safe_iter
from flight_lakehouse.flight_sql import FlightSqlHandlers
from flight_lakehouse.handlers import FlightFacts, Handlers
from flight_lakehouse.process import hide_client_tracebacks
from flight_lakehouse.protocol import CallContext, JsonCodec
from flight_lakehouse.query import QueryEngine, QueryStream
from flight_lakehouse.services import Services, build_services
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Storage
from flight_lakehouse.uploads import Upload
from flight_lakehouse.vector_cache import VectorCache


class LakehouseServer(flight.FlightServerBase):
    """flight-lakehouse over Arrow Flight: ingest by DoPut, SQL and scans by DoGet, catalog by actions."""

    def __init__(self, settings: Settings, services: Services | None = None, **server_options: Any) -> None:
        hide_client_tracebacks()  # the error contract, also of a server embedded in another process
        self.settings = settings
        self.services = services or build_services(settings)
        self.codec = JsonCodec()
        self.handlers = Handlers(self.services)
        self.routes = self.handlers.routes()
        self.actions = Actions(self.services).router()
        self.flight_sql = FlightSqlHandlers(self.services)
        self.flight_sql.register(self.routes, self.actions)
        super().__init__(settings.location, **server_options)

    @property
    def storage(self) -> Storage:
        """The storage (the CLI flushes its leases at shutdown)."""
        return self.services.storage

    @property
    def engine(self) -> QueryEngine:
        """The query engine (the CLI stops and closes it at shutdown)."""
        return self.services.engine

    @property
    def cache(self) -> VectorCache:
        """The in-memory vector cache."""
        return self.services.cache

    @client_safe
    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return self.actions.listing()

    @client_safe
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> list[bytes]:
        spec = self.actions.spec(action.type)
        body = self.codec.action_body(spec, action)
        return [self.codec.result(spec.handler(CallContext.of(context), body))]

    @client_safe
    def do_put(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        request = self.codec.descriptor(descriptor, "DoPut command")
        handler = self.routes.put.handler(request)
        ctx = CallContext.of(context)
        result = handler(ctx, request, Upload(reader, ctx))
        writer.write(pa.py_buffer(self.codec.result(result)))

    @client_safe
    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        request = self.codec.command(ticket.ticket, "ticket")
        result = self.routes.get.handler(request)(CallContext.of(context), request)
        if isinstance(result, QueryStream) and result.complete is None:
            return flight.GeneratorStream(result.schema, client_safe_iter(result.batches))
        if isinstance(result, QueryStream):
            result = result.complete
        # a complete result (a search): Flight sends it without calling back into Python
        return flight.RecordBatchStream(result)

    @client_safe
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        request = self.codec.command(descriptor.command or b"", "DoExchange command")
        handler = self.routes.exchange.handler(request)
        ctx = CallContext.of(context)
        stream = handler(ctx, request, Upload(reader, ctx))
        writer.begin(stream.schema)
        for batch in stream.batches:
            writer.write_batch(batch)

    @client_safe
    def get_flight_info(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.FlightInfo:
        return self._flight_info(CallContext.of(context), descriptor)

    @client_safe
    def get_schema(
        self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor
    ) -> flight.SchemaResult:
        return flight.SchemaResult(self._flight_info(CallContext.of(context), descriptor).schema)

    @client_safe
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> list[flight.FlightInfo]:
        ctx = CallContext.of(context)
        names = self.services.datasets.names()
        return [self._flight_info(ctx, flight.FlightDescriptor.for_path(name)) for name in names]

    def _flight_info(self, ctx: CallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        request = self.codec.descriptor(descriptor, "command")
        facts: FlightFacts = self.routes.info.handler(request)(ctx, request)
        # no locations: each endpoint is fetched from this server (any server of the root can answer it)
        endpoints = [flight.FlightEndpoint(flight.Ticket(ticket), []) for ticket in facts.tickets]
        return flight.FlightInfo(facts.schema, descriptor, endpoints, facts.rows, facts.size)
