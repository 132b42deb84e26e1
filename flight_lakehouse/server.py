"""The Flight adapter: decodes each call once into a typed request and dispatches it to its handler."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.access import (
    AccessMiddlewareFactory,
    Gatekeeper,
    HandshakeByHeaders,
    acting_as,
    require,
)
from flight_lakehouse.actions import Actions
from flight_lakehouse.audit import AuditLog
from flight_lakehouse.auth import Authenticator
from flight_lakehouse.commands import IngestCommand
from flight_lakehouse.errors import client_safe, client_safe_iter
from flight_lakehouse.flight_sql import FlightSqlHandlers
from flight_lakehouse.handlers import FlightFacts, Handlers
from flight_lakehouse.metrics import Metrics
from flight_lakehouse.peers import advertised_location
from flight_lakehouse.process import hide_client_tracebacks
from flight_lakehouse.protocol import (
    FLIGHT_SQL_MESSAGES,
    REQUEST_NAMES,
    ActionRouter,
    CallContext,
    JsonCodec,
    Router,
)
from flight_lakehouse.query import QueryEngine, QueryStream
from flight_lakehouse.services import Services, build_services
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Storage
from flight_lakehouse.tls import server_tls_options
from flight_lakehouse.uploads import Upload
from flight_lakehouse.vector_cache import VectorCache

F = TypeVar("F", bound=Callable[..., Any])


def served(method: F) -> F:
    """A Flight handler, given the :class:`CallContext` of its call (built once): client-safe errors, and
    run as the call's caller (the scope of its lookups)."""

    @functools.wraps(method)
    def handler(self: LakehouseServer, context: flight.ServerCallContext, *args: Any) -> Any:
        ctx = CallContext.of(context)
        with acting_as(ctx.caller):
            return method(self, ctx, *args)

    return client_safe(handler)  # type: ignore[return-value]


def counted(batches: Iterator[pa.RecordBatch], ctx: CallContext) -> Iterator[pa.RecordBatch]:
    """``batches``, their rows and bytes added to the call's audit record as they are sent."""
    for batch in batches:
        ctx.note(rows=batch.num_rows, size=batch.nbytes)
        yield batch


def middleware(
    settings: Settings, metrics: Metrics | None = None
) -> dict[str, flight.ServerMiddlewareFactory]:
    """The access middleware, when authentication, the audit log or the metrics are on."""
    if settings.auth_file is None and settings.audit_log is None and metrics is None:
        return {}
    gatekeeper = None
    if settings.auth_file:
        authenticator = Authenticator(settings.auth_file, bearer_ttl_seconds=settings.auth_token_ttl_seconds)
        gatekeeper = Gatekeeper(authenticator, settings.sessions_per_user)
    audit = AuditLog(settings.audit_log) if settings.audit_log else None
    return {"access": AccessMiddlewareFactory(gatekeeper, audit, metrics)}


def server_metrics(settings: Settings, services: Services, actions: ActionRouter) -> Metrics | None:
    """The server's metrics, when its HTTP port (which serves them) is on; the call names they count."""
    if settings.http_port < 0:
        return None
    names = {
        *REQUEST_NAMES.values(),
        *actions.specs,
        *(url.rsplit(".", 1)[-1] for url in FLIGHT_SQL_MESSAGES),
    }
    return Metrics(services, names)


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
        #: Calls and state for Prometheus (None: the HTTP port is off)
        self.metrics = server_metrics(settings, self.services, self.actions)
        server_options.setdefault("middleware", middleware(settings, self.metrics))
        #: The access middleware (authentication, audit log, metrics), shared with the HTTP port
        self.access: AccessMiddlewareFactory | None = server_options["middleware"].get("access")
        server_options.update(server_tls_options(settings))
        if settings.auth_file is not None:
            server_options.setdefault("auth_handler", HandshakeByHeaders())
        super().__init__(settings.location, **server_options)
        #: The location other clients reach this server at (the port is known once it is bound)
        self.advertised = advertised_location(settings, self.port)
        self.services.peers.start(self.advertised)

    def shutdown(self) -> None:
        """Leave the registry first (new FlightInfos of the other servers stop naming this one), then stop
        taking calls and let running ones finish."""
        self.services.peers.stop()
        super().shutdown()

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

    @served
    def list_actions(self, ctx: CallContext) -> list[tuple[str, str]]:
        return self.actions.listing()

    @served
    def do_action(self, ctx: CallContext, action: flight.Action) -> list[bytes]:
        ctx.note(call=action.type[:100])
        spec = self.actions.spec(action.type)
        require(spec.role, f"run action {action.type!r}")
        body = self.codec.action_body(spec, action)
        ctx.note(dataset=getattr(body, "dataset", None))
        return [self.codec.result(spec.handler(ctx, body))]

    @served
    def do_put(
        self,
        ctx: CallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.FlightMetadataWriter,
    ) -> None:
        request = self.codec.descriptor(descriptor, "DoPut command")
        handler = self.dispatch(self.routes.put, request, ctx)
        result = handler(ctx, request, self.upload(reader, ctx))
        writer.write(pa.py_buffer(self.codec.result(result)))

    @served
    def do_get(self, ctx: CallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        request = self.codec.command(ticket.ticket, "ticket")
        result = self.dispatch(self.routes.get, request, ctx)(ctx, request)
        if isinstance(result, QueryStream) and result.complete is None:
            batches = counted(result.batches, ctx) if ctx.record else result.batches
            return flight.GeneratorStream(result.schema, client_safe_iter(batches))
        if isinstance(result, QueryStream):
            result = result.complete
        ctx.note(rows=result.num_rows)
        # a complete result (a search): Flight sends it without calling back into Python
        return flight.RecordBatchStream(result)

    @served
    def do_exchange(
        self,
        ctx: CallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        request = self.codec.command(descriptor.command or b"", "DoExchange command")
        handler = self.dispatch(self.routes.exchange, request, ctx)
        stream = handler(ctx, request, self.upload(reader, ctx))
        writer.begin(stream.schema)
        for batch in counted(stream.batches, ctx):
            writer.write_batch(batch)

    @served
    def get_flight_info(self, ctx: CallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        return self._flight_info(ctx, descriptor)

    @served
    def get_schema(self, ctx: CallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        return flight.SchemaResult(self._flight_info(ctx, descriptor).schema)

    @served
    def list_flights(self, ctx: CallContext, criteria: bytes) -> list[flight.FlightInfo]:
        require("reader", "list flights")
        names = self.services.datasets.names()
        return [self._flight_info(ctx, flight.FlightDescriptor.for_path(name)) for name in names]

    def _flight_info(self, ctx: CallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        request = self.codec.descriptor(descriptor, "command")
        facts: FlightFacts = self.dispatch(self.routes.info, request, ctx)(ctx, request)
        live = self.services.peers.live_locations() if len(facts.tickets) > 1 else []
        endpoints = spread(facts.tickets, live)
        return flight.FlightInfo(facts.schema, descriptor, endpoints, facts.rows, facts.size)

    def upload(self, reader: flight.MetadataRecordBatchReader, ctx: CallContext) -> Upload:
        """A client's stream, within the bytes one upload may send."""
        return Upload(reader, ctx, self.settings.max_ingest_mb << 20)

    @staticmethod
    def dispatch(router: Router[F], request: object, ctx: CallContext) -> F:
        """The handler of ``request``, once the caller's role allows it (noted for the audit log)."""
        name = router.call_name(request)
        ctx.note(call=name, dataset=dataset_of(request))
        handler = router.handler(request)
        require(router.role_of(request), f"send {name} by {router.rpc}")
        return handler


def spread(tickets: list[bytes], live: list[str]) -> list[flight.FlightEndpoint]:
    """One endpoint per ticket. With several live servers (this one first) the tickets are dealt round-robin
    over them, each endpoint naming its server's location (any server of the root can answer any ticket:
    they are self-contained); else no location: the client fetches each from this server."""
    if len(live) < 2:
        return [flight.FlightEndpoint(flight.Ticket(ticket), []) for ticket in tickets]
    return [
        flight.FlightEndpoint(flight.Ticket(ticket), [live[index % len(live)]])
        for index, ticket in enumerate(tickets)
    ]


def dataset_of(request: object) -> str | None:
    """The dataset a request names, if it names one."""
    if isinstance(request, IngestCommand):
        return request.ingest.dataset
    dataset = getattr(request, "dataset", None)
    return dataset if isinstance(dataset, str) else None
