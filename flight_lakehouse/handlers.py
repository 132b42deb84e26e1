"""The data handlers (DoPut, DoGet, DoExchange, GetFlightInfo): one method per request type, and the
routers that send each typed request to its method."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pyarrow as pa

from flight_lakehouse.commands import (
    IngestCommand,
    IngestOptions,
    Part,
    ScanRequest,
    SearchCommand,
    SqlQuery,
)
from flight_lakehouse.partitions import parts_most
from flight_lakehouse.protocol import CallContext, DatasetPath, JsonCodec, Router
from flight_lakehouse.query import CallHooks, QueryStream
from flight_lakehouse.services import Services
from flight_lakehouse.uploads import Upload


@dataclass(frozen=True)
class FlightFacts:
    """What GetFlightInfo answers, less the descriptor: schema, ticket, rows and bytes (-1: unknown), and
    the tickets of the other parts of a result split into several endpoints (``ticket`` is the first)."""

    schema: pa.Schema
    ticket: bytes
    rows: int = -1
    size: int = -1
    other_parts: tuple[bytes, ...] = ()

    @classmethod
    def of_parts(cls, schema: pa.Schema, tickets: list[bytes]) -> FlightFacts:
        """A result answered as one endpoint per ticket (at least one)."""
        return cls(schema, tickets[0], other_parts=tuple(tickets[1:]))

    @property
    def tickets(self) -> list[bytes]:
        """The ticket of each endpoint, in order."""
        return [self.ticket, *self.other_parts]


PutHandler = Callable[[CallContext, Any, Upload], dict[str, Any]]
GetHandler = Callable[[CallContext, Any], "QueryStream | pa.Table"]
ExchangeHandler = Callable[[CallContext, Any, Upload], QueryStream]
InfoHandler = Callable[[CallContext, Any], FlightFacts]


@dataclass(frozen=True)
class Routes:
    """The router of each data RPC."""

    put: Router[PutHandler]
    get: Router[GetHandler]
    exchange: Router[ExchangeHandler]
    info: Router[InfoHandler]


class Handlers:
    """Ingest, queries, searches and flight infos over the :class:`Services`."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def routes(self) -> Routes:
        """Each request type to its handler, per RPC; what a client sends to the wrong RPC is refused."""
        put_only = "DoPut takes a path descriptor or an {'ingest': {...}} command"
        return Routes(
            put=Router[PutHandler]("DoPut", role="writer")
            .route(DatasetPath, self.put_path)
            .route(IngestCommand, self.put_ingest)
            .refuse(put_only, SqlQuery, ScanRequest, SearchCommand),
            get=Router[GetHandler]("DoGet")
            .route(SqlQuery, self.get_sql)
            .route(ScanRequest, self.get_scan)
            .route(SearchCommand, self.get_search)
            .refuse("an ingest command is not a ticket; send it with DoPut", IngestCommand),
            exchange=Router[ExchangeHandler]("DoExchange")
            .route(SearchCommand, self.exchange_search)
            .refuse("DoExchange takes a {'search': {...}} command", SqlQuery, ScanRequest, IngestCommand),
            info=Router[InfoHandler]("GetFlightInfo")
            .route(DatasetPath, self.info_path)
            .route(SqlQuery, self.info_sql)
            .route(ScanRequest, self.info_scan)
            .route(SearchCommand, self.info_search)
            .refuse("an ingest command has no FlightInfo; send it with DoPut", IngestCommand),
        )

    # -- DoPut -----------------------------------------------------------------------------------
    def put_path(self, ctx: CallContext, request: DatasetPath, upload: Upload) -> dict[str, Any]:
        """An upload to the dataset a path descriptor names, with the default options."""
        return self.ingest(ctx, IngestOptions(dataset=request.dataset), upload)

    def put_ingest(self, ctx: CallContext, request: IngestCommand, upload: Upload) -> dict[str, Any]:
        """An upload with an ``{"ingest": {...}}`` command."""
        return self.ingest(ctx, request.ingest, upload)

    def ingest(self, ctx: CallContext, options: IngestOptions, upload: Upload) -> dict[str, Any]:
        """Write one upload as one commit, in the format the registry decides."""
        schema, batches = self.s.texts.for_upload(
            options, upload.schema(), upload.batches(options.expected_rows)
        )
        return self.s.datasets.write(options, schema, batches)

    # -- DoGet -----------------------------------------------------------------------------------
    def get_sql(self, ctx: CallContext, request: SqlQuery) -> QueryStream:
        """A SQL query, streamed; a part reads only its share of the files of the snapshot it names."""
        pinned = self.s.engine.part_database(request.sql, request.part) if request.part else None
        return self.s.engine.run(request.sql, CallHooks(ctx.is_cancelled), pinned)

    def get_scan(self, ctx: CallContext, request: ScanRequest) -> QueryStream:
        """A scan of one dataset, streamed."""
        database = self.s.engine.scan_database(request)
        return self.s.engine.run(
            self.s.engine.scan_sql(request, database), CallHooks(ctx.is_cancelled), database
        )

    def get_search(self, ctx: CallContext, request: SearchCommand) -> pa.Table:
        """A search: its result is small and complete."""
        return self.s.searcher.search(self.s.searcher.plan(request.search))

    # -- DoExchange ------------------------------------------------------------------------------
    def exchange_search(self, ctx: CallContext, request: SearchCommand, upload: Upload) -> QueryStream:
        """Batch search: the k nearest rows of every query vector the client streams."""
        plan = self.s.searcher.plan(request.search, exchange=True)
        return QueryStream(plan.exchange_schema, self.s.searcher.exchange(plan, upload.batches()))

    # -- GetFlightInfo ---------------------------------------------------------------------------
    def info_path(self, ctx: CallContext, request: DatasetPath) -> FlightFacts:
        """A dataset: the schema a scan streams, its rows and bytes."""
        name = request.dataset
        facts = self.s.datasets.summarise(name)
        info = self.info_scan(ctx, ScanRequest(dataset=name))  # exactly as DoGet streams
        return replace(info, rows=facts["rows"], size=facts["bytes"])

    def info_sql(self, ctx: CallContext, request: SqlQuery) -> FlightFacts:
        """A SQL query's result schema, without running it; with several live servers, one ticket per part
        when it reads one dataset's files row by row (see ``partitions.py``), for them to share."""
        most = self.spread_parts()
        if request.part is not None or not most:
            return FlightFacts(self.s.engine.schema(request.sql), JsonCodec.ticket(request))
        schema, found = self.s.engine.split(request.sql, most)
        return FlightFacts.of_parts(schema, part_tickets(request.sql, found) or [JsonCodec.ticket(request)])

    def info_scan(self, ctx: CallContext, request: ScanRequest) -> FlightFacts:
        """A scan's result schema, without running it; with several live servers, the ``{"sql"}`` tickets
        of its parts when it splits (an Iceberg dataset of several files, no limit), at the snapshot it
        names."""
        database = self.s.engine.scan_database(request)
        sql = self.s.engine.scan_sql(request, database)
        most = self.spread_parts()
        try:
            found = self.s.engine.scan_parts(sql, database, most) if most else []
        except BaseException:
            database.lease.release()  # planning the schema would have released it
            raise
        schema = self.s.engine.schema(sql, database)
        return FlightFacts.of_parts(schema, part_tickets(sql, found) or [JsonCodec.ticket(request)])

    def spread_parts(self) -> int:
        """How many parts a JSON command's result may split into: none with one live server (its FlightInfo
        is one endpoint, as it always was), else at least one per server."""
        servers = len(self.s.peers.live_locations())
        return parts_most(self.s.settings.query_parts_max, servers) if servers > 1 else 0

    def info_search(self, ctx: CallContext, request: SearchCommand) -> FlightFacts:
        """A search's result schema, from its checked plan, without running it."""
        plan = self.s.searcher.plan(request.search)
        return FlightFacts(plan.result_schema, JsonCodec.ticket(request))


def part_tickets(sql: str, found: list[Part]) -> list[bytes]:
    """The ``{"sql", "part"}`` ticket of each part (none when the result is answered whole)."""
    return [JsonCodec.ticket(SqlQuery(sql=sql, part=part)) for part in found]
