"""Flight SQL on the server's port: one handler method per Flight SQL command, over the same services as
the JSON commands (query engine, sandbox, datasets registry, ingest).

The codec (``protocol.decode_flight_sql``) turns each protobuf ``Any`` into its message once; the routers
send each message type to its method here. Statement tickets carry the SQL itself (stateless: any server
of the root can answer them) with a query id that ``CancelFlightInfo`` names; a query reading one dataset's
files row by row is answered as several endpoints, one per part (see ``partitions.py``); prepared
statements live in :class:`PreparedStatements`, bounded in number and closed when idle.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import duckdb
import pyarrow as pa
import pyarrow.flight as flight
from google.protobuf.message import DecodeError, Message
from pydantic import StringConstraints, ValidationError

from flight_lakehouse import __version__
from flight_lakehouse import flight_sql_metadata as metadata
from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.access import caller_name
from flight_lakehouse.commands import (
    Command,
    EmbedSpec,
    IngestOptions,
    SqlText,
    describe_validation_error,
    parse_body,
    parse_model,
    validate_dataset_name,
)
from flight_lakehouse.errors import AlreadyExists, Cancelled, InvalidArgument, NotFound, Unavailable
from flight_lakehouse.handlers import FlightFacts, Routes
from flight_lakehouse.partitions import Part, parts_most
from flight_lakehouse.protocol import (
    ActionRouter,
    ActionSpec,
    CallContext,
    decode_flight_sql,
    is_flight_sql,
    pack,
)
from flight_lakehouse.query import CallHooks, Params, QueryStream
from flight_lakehouse.sandbox import READ_ONLY, SQL_CATALOG, SQL_SCHEMA
from flight_lakehouse.services import Services
from flight_lakehouse.settings import Settings
from flight_lakehouse.uploads import Upload

log = logging.getLogger(__name__)

#: The one catalog and schema every dataset (Iceberg or Lance) is a table of.
CATALOG = SQL_CATALOG
DB_SCHEMA = SQL_SCHEMA
TABLE_TYPE = "TABLE"
#: Random bytes of a query id (written in hex in a statement handle).
QUERY_ID_BYTES = 16
QueryId = Annotated[str, StringConstraints(pattern=f"^[0-9a-f]{{{2 * QUERY_ID_BYTES}}}$")]
#: Query ids cancelled by CancelFlightInfo, remembered so a ticket fetched later is refused too.
REMEMBERED_CANCELS = 4096
#: The statuses of a cancel. ``CancelFlightInfoRequest {FlightInfo info = 1}`` and ``CancelFlightInfoResult
#: {CancelStatus status = 1}`` (Flight.proto, no Python class in pyarrow) have the wire format of
#: ``ActionCancelQueryRequest {bytes info = 1}`` and ``ActionCancelQueryResult {CancelResult result = 1}``
#: (the same numbers), so those Flight SQL messages decode and encode both actions.
CANCELLED = sql.ActionCancelQueryResult.CANCEL_RESULT_CANCELLED
NOT_CANCELLABLE = sql.ActionCancelQueryResult.CANCEL_RESULT_NOT_CANCELLABLE
#: Parameter rows one DoPut may bind to a prepared statement.
MAX_PARAMETER_ROWS = 10_000
#: Parameter types bound as typed DuckDB values: DuckDB types a plain Python number by its magnitude, so
#: one column's rows (an int64 of 1, then one of 2**40) would give results of different types.
TYPED_PARAMETERS = {
    pa.int8(): duckdb.sqltypes.TINYINT,
    pa.int16(): duckdb.sqltypes.SMALLINT,
    pa.int32(): duckdb.sqltypes.INTEGER,
    pa.int64(): duckdb.sqltypes.BIGINT,
    pa.uint8(): duckdb.sqltypes.UTINYINT,
    pa.uint16(): duckdb.sqltypes.USMALLINT,
    pa.uint32(): duckdb.sqltypes.UINTEGER,
    pa.uint64(): duckdb.sqltypes.UBIGINT,
    pa.float32(): duckdb.sqltypes.FLOAT,
}
#: Column metadata key of a column's SQL type name (Flight SQL), which drivers report as its type.
TYPE_NAME_KEY = b"ARROW:FLIGHT:SQL:TYPE_NAME"

TableEntry = metadata.TableEntry
IfExists = sql.CommandStatementIngest.TableDefinitionOptions


def sql_keywords() -> list[str]:
    """DuckDB's SQL keywords (reported by SqlInfo)."""
    with duckdb.connect(":memory:") as connection:
        return [row[0] for row in connection.execute("SELECT keyword_name FROM duckdb_keywords()").fetchall()]


@dataclass
class PreparedStatement:
    """A statement a client prepared: its SQL, schemas and the parameter rows bound to it."""

    handle: bytes
    query: str
    dataset_schema: pa.Schema
    parameter_count: int
    parameter_rows: list[Params] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    #: The user who prepared it (None: authentication is off); to anyone else it does not exist.
    owner: str | None = None

    @property
    def parameter_schema(self) -> pa.Schema:
        """One field per placeholder; DuckDB types them only when values are bound, so they are null."""
        return pa.schema([pa.field(f"${index + 1}", pa.null()) for index in range(self.parameter_count)])

    def bound_rows(self) -> list[Params]:
        """The parameter rows to run with (one run without values when it has no placeholders);
        INVALID_ARGUMENT while its placeholders have no values."""
        if not self.parameter_count:
            return [None]
        if not self.parameter_rows:
            raise InvalidArgument(f"bind the statement's {self.parameter_count} parameters first (DoPut)")
        return self.parameter_rows


class PreparedStatements:
    """The open prepared statements: at most ``prepared_statements_max``, each closed after
    ``prepared_statement_idle_seconds`` unused."""

    def __init__(self, settings: Settings) -> None:
        self._max = settings.prepared_statements_max
        self._per_user = settings.prepared_statements_per_user
        self._idle = settings.prepared_statement_idle_seconds
        self._statements: OrderedDict[bytes, PreparedStatement] = OrderedDict()
        self._guard = threading.Lock()

    def add(self, query: str, dataset_schema: pa.Schema, parameter_count: int) -> PreparedStatement:
        """Open a statement, or UNAVAILABLE when as many as allowed are open and in use."""
        owner = caller_name()
        handle = secrets.token_bytes(16)
        statement = PreparedStatement(handle, query, dataset_schema, parameter_count, owner=owner)
        with self._guard:
            self._expire()
            if len(self._statements) >= self._max:
                raise Unavailable(
                    f"{self._max} prepared statements are open; close some (ClosePreparedStatement) or retry"
                )
            mine = sum(1 for other in self._statements.values() if other.owner == owner)
            if owner is not None and mine >= self._per_user:
                raise Unavailable(
                    f"{owner!r} has {mine} prepared statements open (prepared_statements_per_user); "
                    "close some"
                )
            self._statements[statement.handle] = statement
        return statement

    def get(self, handle: bytes) -> PreparedStatement:
        """The open statement of ``handle``, or NOT_FOUND."""
        with self._guard:
            self._expire()
            statement = self._statements.get(handle)
            if statement is None or statement.owner != caller_name():
                raise NotFound("prepared statement not found: unknown, closed or expired; prepare it again")
            statement.last_used = time.monotonic()
            self._statements.move_to_end(handle)
            return statement

    def close(self, handle: bytes) -> None:
        """Close the statement of ``handle``; closing one already gone succeeds (a client closing a statement
        that expired while idle, as ADBC does when a cursor closes, must not fail)."""
        with self._guard:
            statement = self._statements.get(handle)
            if statement is not None and statement.owner == caller_name():
                del self._statements[handle]

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._idle
        while self._statements:
            oldest = next(iter(self._statements.values()))
            if oldest.last_used >= cutoff:
                break
            del self._statements[oldest.handle]


class Cancellations:
    """Query ids cancelled by ``CancelFlightInfo`` or ``CancelQuery`` (the newest ``REMEMBERED_CANCELS``):
    the watchdog stops a running query of one within its round, a ticket of one fetched later is refused."""

    def __init__(self) -> None:
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._guard = threading.Lock()

    def cancel(self, query_id: str) -> None:
        """Mark ``query_id`` cancelled (remembering the newest ones only)."""
        with self._guard:
            self._ids[query_id] = None
            while len(self._ids) > REMEMBERED_CANCELS:
                self._ids.popitem(last=False)

    def cancelled(self, query_id: str) -> bool:
        """Whether ``query_id`` was cancelled."""
        with self._guard:
            return query_id in self._ids

    def hooks(self, ctx: CallContext, query_id: str) -> CallHooks:
        """The call hooks of a query: cancelled by its client, or by its id from any call (CANCELLED at once
        when that came before its ticket was fetched)."""
        if self.cancelled(query_id):
            raise Cancelled("query cancelled (CancelFlightInfo or CancelQuery); run it again for new tickets")
        return CallHooks(ctx.is_cancelled, revoked=functools.partial(self.cancelled, query_id))


class StatementHandle(Command):
    """A statement ticket's handle, JSON: the query id a cancel names, the SQL, and for one part of a split
    result which part (stateless: any server of the root answers it; every field checked as hostile)."""

    id: QueryId
    sql: SqlText
    part: Part | None = None


def statement_tickets(query: str, parts: list[Part]) -> list[bytes]:
    """The tickets of a statement, one per part (one when it is answered whole), under one new query id."""
    query_id = secrets.token_hex(QUERY_ID_BYTES)
    handles = [
        parse_model(StatementHandle, {"id": query_id, "sql": query, "part": part}).model_dump_json(
            exclude_none=True
        )
        for part in parts or [None]
    ]
    return [pack(sql.TicketStatementQuery(statement_handle=handle.encode())) for handle in handles]


def statement_handle(raw: bytes) -> StatementHandle:
    """The handle of a statement ticket, validated."""
    return parse_body(StatementHandle, raw, "statement handle")


def cancel_request_info(body: bytes) -> bytes:
    """The serialised FlightInfo of a ``CancelFlightInfoRequest``."""
    request = sql.ActionCancelQueryRequest()  # the same wire format (see CANCELLED)
    try:
        request.ParseFromString(body)
    except DecodeError:
        raise InvalidArgument("malformed CancelFlightInfoRequest") from None
    return request.info


def statement_ids(info: bytes) -> set[str]:
    """The query ids of the statement tickets in a serialised FlightInfo (none: it holds no statement)."""
    if not info:
        raise InvalidArgument("the cancel request holds no FlightInfo")
    try:
        endpoints = flight.FlightInfo.deserialize(info).endpoints
    except pa.ArrowException:
        raise InvalidArgument("malformed FlightInfo in the cancel request") from None
    tickets = [endpoint.ticket.ticket for endpoint in endpoints]
    commands = [decode_flight_sql(raw) for raw in tickets if is_flight_sql(raw)]
    return {
        statement_handle(command.statement_handle).id
        for command in commands
        if isinstance(command, sql.TicketStatementQuery)
    }


def parameter_rows(batch: pa.RecordBatch) -> list[Params]:
    """The parameter values of each row of ``batch``, in column order (numbers typed as their column)."""
    columns = [parameter_values(column) for column in batch.columns]
    return [list(row) for row in zip(*columns, strict=True)] if columns else [[]] * batch.num_rows


def parameter_values(column: pa.Array) -> list[Any]:
    """A parameter column's values: Python values, numbers as DuckDB values of the column's type."""
    values = column.to_pylist()
    duckdb_type = TYPED_PARAMETERS.get(column.type)
    if duckdb_type is None:
        return values
    return [None if value is None else duckdb.Value(value, duckdb_type) for value in values]


class FlightSqlHandlers:
    """One method per Flight SQL command, registered on the server's routers."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.prepared = PreparedStatements(services.settings)
        self.cancels = Cancellations()
        timeout_ms = int(services.settings.prepared_statement_idle_seconds * 1000)
        self._sql_info = metadata.default_sql_info(
            sql_keywords(), server_version=__version__, read_only=True, statement_timeout_ms=timeout_ms
        )
        self._sql_info[sql.FLIGHT_SQL_SERVER_CANCEL] = True  # CancelFlightInfo and CancelQuery

    def register(self, routes: Routes, actions: ActionRouter) -> None:
        """Add the Flight SQL commands to the routers (anything else of the specification: UNIMPLEMENTED)."""
        routes.info.route(sql.CommandStatementQuery, self.info_statement)
        routes.info.route(sql.CommandPreparedStatementQuery, self.info_prepared)
        routes.get.route(sql.TicketStatementQuery, self.get_statement)
        routes.get.route(sql.CommandPreparedStatementQuery, self.get_prepared)
        # a reader learns that SQL is read-only, as a writer does; binding parameters writes nothing
        routes.put.route(sql.CommandStatementUpdate, self.put_update, role="reader")
        routes.put.route(sql.CommandPreparedStatementUpdate, self.put_update, role="reader")
        routes.put.route(sql.CommandPreparedStatementQuery, self.put_parameters, role="reader")
        routes.put.route(sql.CommandStatementIngest, self.put_ingest)
        for kind, (schema_of, result_of) in self._metadata().items():
            routes.info.route(kind, functools.partial(self.info_metadata, schema_of))
            routes.get.route(kind, functools.partial(self.get_metadata, result_of))
        actions.specs.update(
            {
                "CreatePreparedStatement": ActionSpec(
                    sql.ActionCreatePreparedStatementRequest,
                    "Flight SQL: prepare a query",
                    "reader",
                    self.create_prepared,
                ),
                "ClosePreparedStatement": ActionSpec(
                    sql.ActionClosePreparedStatementRequest,
                    "Flight SQL: close a prepared statement",
                    "reader",
                    self.close_prepared,
                ),
                "CancelFlightInfo": ActionSpec(
                    bytes,
                    "Flight: cancel the query of a FlightInfo (CancelFlightInfoRequest)",
                    "reader",
                    self.cancel_flight_info,
                ),
                "CancelQuery": ActionSpec(
                    sql.ActionCancelQueryRequest,
                    "Flight SQL (deprecated): cancel the query of a FlightInfo",
                    "reader",
                    self.cancel_query,
                ),
            }
        )

    # -- statements ------------------------------------------------------------------------------
    def parts_most(self) -> int:
        """How many parts a statement may split into (split with one server too, at least one part per
        live server)."""
        return parts_most(self.s.settings.query_parts_max, len(self.s.peers.live_locations()))

    def info_statement(self, ctx: CallContext, command: sql.CommandStatementQuery) -> FlightFacts:
        """A query's result schema, from DuckDB's plan (the query does not run), and its tickets: one per
        part when it reads one dataset's files row by row (a client may fetch them in parallel), else one."""
        check_no_transaction(command.transaction_id)
        schema, parts = self.s.engine.split(command.query, self.parts_most())
        return FlightFacts.of_parts(schema, statement_tickets(command.query, parts))

    def get_statement(self, ctx: CallContext, ticket: sql.TicketStatementQuery) -> QueryStream:
        """A query, streamed like a DoGet ``{"sql"}`` ticket; a part reads only its share of the files of
        the snapshot its ticket names."""
        handle = statement_handle(ticket.statement_handle)
        hooks = self.cancels.hooks(ctx, handle.id)
        pinned = self.s.engine.part_database(handle.sql, handle.part) if handle.part else None
        return self.s.engine.run(handle.sql, hooks, pinned)

    def cancel_flight_info(self, ctx: CallContext, body: bytes) -> bytes:
        """CancelFlightInfo (Flight RPC): cancel the statement of a FlightInfo, all its parts."""
        status = self._cancel(cancel_request_info(body))
        return sql.ActionCancelQueryResult(result=status).SerializeToString()  # a CancelFlightInfoResult

    def cancel_query(self, ctx: CallContext, request: sql.ActionCancelQueryRequest) -> bytes:
        """CancelQuery (Flight SQL, deprecated): the same, answered packed in an ``Any``."""
        return pack(sql.ActionCancelQueryResult(result=self._cancel(request.info)))

    def _cancel(self, info: bytes) -> int:
        """CANCELLED when the FlightInfo holds statement tickets: their query ids are cancelled (a running
        query stops, a ticket not yet fetched is refused, a finished query stays finished); NOT_CANCELLABLE
        for any other FlightInfo (metadata, prepared statements, JSON tickets)."""
        query_ids = statement_ids(info)
        for query_id in query_ids:
            self.cancels.cancel(query_id)
        return CANCELLED if query_ids else NOT_CANCELLABLE

    def put_update(self, ctx: CallContext, command: Message, upload: Upload) -> bytes:
        """SQL that writes: refused, writes go through ingest."""
        raise InvalidArgument(READ_ONLY)

    # -- prepared statements ---------------------------------------------------------------------
    def create_prepared(self, ctx: CallContext, request: sql.ActionCreatePreparedStatementRequest) -> bytes:
        """Check and plan a query; its placeholders are bound later by DoPut."""
        check_no_transaction(request.transaction_id)
        parameters = self.s.engine.parameter_count(request.query)
        schema = self.s.engine.schema(request.query, params=[None] * parameters if parameters else None)
        statement = self.prepared.add(request.query, schema, parameters)
        return pack(
            sql.ActionCreatePreparedStatementResult(
                prepared_statement_handle=statement.handle,
                dataset_schema=schema.serialize().to_pybytes(),
                parameter_schema=statement.parameter_schema.serialize().to_pybytes(),
            )
        )

    def close_prepared(self, ctx: CallContext, request: sql.ActionClosePreparedStatementRequest) -> bytes:
        """Close a prepared statement."""
        self.prepared.close(request.prepared_statement_handle)
        return b""

    def put_parameters(
        self, ctx: CallContext, command: sql.CommandPreparedStatementQuery, upload: Upload
    ) -> bytes:
        """Bind the uploaded rows as parameter sets: a query then runs once per row, results one after
        another."""
        statement = self.prepared.get(command.prepared_statement_handle)
        rows: list[Params] = []
        for batch in upload.batches():
            if batch.num_columns != statement.parameter_count:
                raise InvalidArgument(
                    f"the statement has {statement.parameter_count} parameters; "
                    f"got {batch.num_columns} columns"
                )
            rows.extend(parameter_rows(batch))
            if len(rows) > MAX_PARAMETER_ROWS:
                raise InvalidArgument(f"at most {MAX_PARAMETER_ROWS} parameter rows may be bound at once")
        statement.parameter_rows = rows
        return sql.DoPutPreparedStatementResult(
            prepared_statement_handle=statement.handle
        ).SerializeToString()

    def info_prepared(self, ctx: CallContext, command: sql.CommandPreparedStatementQuery) -> FlightFacts:
        """A prepared query's result schema (with its first bound parameter row); the command is its
        ticket, unless a query without parameters splits into parts: then the parts' statement tickets
        (ADBC's DB-API prepares every query, ``adbc_execute_partitions`` too)."""
        statement = self.prepared.get(command.prepared_statement_handle)
        rows = statement.bound_rows()
        schema = statement.dataset_schema
        if statement.parameter_count:
            schema = self.s.engine.schema(statement.query, params=rows[0])
        parts = [] if statement.parameter_count else self.s.engine.parts(statement.query, self.parts_most())
        if parts:
            return FlightFacts.of_parts(schema, statement_tickets(statement.query, parts))
        return FlightFacts(schema, pack(command))

    def get_prepared(self, ctx: CallContext, command: sql.CommandPreparedStatementQuery) -> QueryStream:
        """A prepared query, once per bound parameter row, the results one after another."""
        statement = self.prepared.get(command.prepared_statement_handle)
        rows = statement.bound_rows()
        hooks = CallHooks(ctx.is_cancelled)
        first = self.s.engine.run(statement.query, hooks, params=rows[0])
        # run later, while the stream is read: as this call's caller (its grants), as the first row was
        caller = contextvars.copy_context()
        rest = [
            functools.partial(caller.run, self.s.engine.run, statement.query, hooks, params=row)
            for row in rows[1:]
        ]
        return chain_streams(first, rest)

    # -- metadata --------------------------------------------------------------------------------
    def _metadata(self) -> dict[type, tuple[Callable[[Any], pa.Schema], Callable[[Any], pa.Table]]]:
        """Each metadata command's result schema and result."""
        return {
            sql.CommandGetCatalogs: (lambda _: metadata.CATALOGS_SCHEMA, self.catalogs),
            sql.CommandGetDbSchemas: (lambda _: metadata.DB_SCHEMAS_SCHEMA, self.db_schemas),
            sql.CommandGetTables: (lambda c: metadata.tables_schema(c.include_schema), self.tables),
            sql.CommandGetTableTypes: (lambda _: metadata.TABLE_TYPES_SCHEMA, self.table_types),
            sql.CommandGetSqlInfo: (lambda _: metadata.SQL_INFO_SCHEMA, self.sql_info),
            sql.CommandGetXdbcTypeInfo: (lambda _: metadata.XDBC_TYPE_INFO_SCHEMA, self.xdbc_type_info),
            sql.CommandGetPrimaryKeys: (lambda _: metadata.PRIMARY_KEYS_SCHEMA, self.no_keys),
            sql.CommandGetExportedKeys: (lambda _: metadata.FOREIGN_KEYS_SCHEMA, self.no_keys),
            sql.CommandGetImportedKeys: (lambda _: metadata.FOREIGN_KEYS_SCHEMA, self.no_keys),
            sql.CommandGetCrossReference: (lambda _: metadata.FOREIGN_KEYS_SCHEMA, self.no_keys),
        }

    @staticmethod
    def info_metadata(
        schema_of: Callable[[Any], pa.Schema], ctx: CallContext, command: Message
    ) -> FlightFacts:
        """A metadata command's schema; its ticket is the command itself."""
        return FlightFacts(schema_of(command), pack(command))

    @staticmethod
    def get_metadata(result_of: Callable[[Any], pa.Table], ctx: CallContext, command: Message) -> pa.Table:
        """A metadata command's (small, complete) result."""
        return result_of(command)

    def catalogs(self, command: sql.CommandGetCatalogs) -> pa.Table:
        return metadata.get_catalogs([CATALOG])

    def db_schemas(self, command: sql.CommandGetDbSchemas) -> pa.Table:
        return metadata.get_db_schemas(
            [(CATALOG, DB_SCHEMA)],
            optional(command, "catalog"),
            optional(command, "db_schema_filter_pattern"),
        )

    def tables(self, command: sql.CommandGetTables) -> pa.Table:
        """The datasets that pass the filters; with ``include_schema``, only those have their schema read
        (each column's DuckDB type name in its metadata), and one dropped meanwhile is left out."""
        entries = [TableEntry(CATALOG, DB_SCHEMA, name, TABLE_TYPE) for name in self.s.datasets.names()]
        listed = metadata.get_tables(
            entries,
            optional(command, "catalog"),
            optional(command, "db_schema_filter_pattern"),
            optional(command, "table_name_filter_pattern"),
            list(command.table_types),
        )
        if not command.include_schema:
            return listed
        described = []
        with duckdb.connect(":memory:") as connection:
            for name in listed.column("table_name").to_pylist():
                try:
                    schema = with_type_names(connection, self.s.datasets.schema(name))
                except NotFound:
                    continue
                described.append(TableEntry(CATALOG, DB_SCHEMA, name, TABLE_TYPE, schema))
        return metadata.get_tables(described, include_schema=True)

    def table_types(self, command: sql.CommandGetTableTypes) -> pa.Table:
        return metadata.get_table_types([TABLE_TYPE])

    def sql_info(self, command: sql.CommandGetSqlInfo) -> pa.Table:
        return metadata.get_sql_info(self._sql_info, list(command.info))

    def xdbc_type_info(self, command: sql.CommandGetXdbcTypeInfo) -> pa.Table:
        return metadata.get_xdbc_type_info(optional(command, "data_type"))

    def no_keys(self, command: Message) -> pa.Table:
        """Datasets have no primary or foreign keys."""
        if isinstance(command, sql.CommandGetPrimaryKeys):
            return metadata.get_primary_keys()
        return metadata.get_cross_reference()

    # -- bulk ingest -----------------------------------------------------------------------------
    def put_ingest(self, ctx: CallContext, command: sql.CommandStatementIngest, upload: Upload) -> bytes:
        """``adbc_ingest``: the upload through the same path and atomic commit as DoPut (a dataset with
        columns embedded from text gets them embedded, as by DoPut)."""
        options = self.ingest_options(command)
        schema, batches = self.s.texts.for_upload(options, upload.schema(), upload.batches())
        result = self.s.datasets.write(options, schema, batches)
        return sql.DoPutUpdateResult(record_count=int(result.get("rows_written", 0))).SerializeToString()

    def ingest_options(self, command: sql.CommandStatementIngest) -> IngestOptions:
        """The ingest options of a CommandStatementIngest: its table and what to do if it exists or not."""
        check_no_transaction(command.transaction_id)
        if command.temporary:
            raise InvalidArgument("temporary tables are not supported; ingest into a dataset")
        check_location(optional(command, "catalog"), optional(command, "schema"))
        embed = ingest_embed_option(dict(command.options))
        name = validate_dataset_name(command.table)
        definition = command.table_definition_options
        exists = self.s.datasets.format_of(name) is not None
        if exists and definition.if_exists in (
            IfExists.TABLE_EXISTS_OPTION_UNSPECIFIED,
            IfExists.TABLE_EXISTS_OPTION_FAIL,
        ):
            raise AlreadyExists(f"dataset {name!r} already exists")
        if not exists and definition.if_not_exist == IfExists.TABLE_NOT_EXIST_OPTION_FAIL:
            raise NotFound(f"dataset {name!r} not found")
        if definition.if_exists == IfExists.TABLE_EXISTS_OPTION_REPLACE:
            # overwrite takes the upload's columns in both formats (Lance refuses schema_mode 'evolve')
            return IngestOptions(dataset=name, mode="overwrite", embed=embed)
        return IngestOptions(dataset=name, mode="append" if exists else "create", embed=embed)


def ingest_embed_option(options: dict[str, str]) -> EmbedSpec | None:
    """The one bulk-ingest option the server reads, ``embed`` = ``FROM:INTO`` (the DoPut command's
    ``"embed": {"from", "into"}``, as the CLI's ``--embed`` writes it); any other option is refused."""
    unknown = sorted(set(options) - {"embed"})
    if unknown:
        raise InvalidArgument(f"ingest options are not supported: {unknown[:5]} (only 'embed' is)")
    if "embed" not in options:
        return None
    source, _, target = options["embed"].partition(":")
    if not source or not target:
        raise InvalidArgument(
            f"ingest option 'embed' must be FROM:INTO (text column:vector column), not {options['embed']!r}"
        )
    try:
        return EmbedSpec.model_validate({"from": source, "into": target})
    except ValidationError as exc:
        raise InvalidArgument(f"ingest option 'embed': {describe_validation_error(exc)}") from None


def with_type_names(connection: duckdb.DuckDBPyConnection, schema: pa.Schema) -> pa.Schema:
    """``schema`` with each column's DuckDB type name (``BIGINT``, ``DECIMAL(10,2)``, ``FLOAT[8]``) as its
    Flight SQL ``TYPE_NAME``, which drivers report (ADBC's ``xdbc_type_name``, JDBC's ``TYPE_NAME``)."""
    try:
        types = connection.from_arrow(schema.empty_table()).types
    except duckdb.Error:  # a type DuckDB does not read: the schema as it is
        return schema
    fields = [
        column.with_metadata({**(column.metadata or {}), TYPE_NAME_KEY: str(duckdb_type).encode()})
        for column, duckdb_type in zip(schema, types, strict=True)
    ]
    return pa.schema(fields, metadata=schema.metadata)


def optional(message: Message, name: str) -> Any:
    """An ``optional`` field of ``message``: its value when set, else None."""
    return getattr(message, name) if message.HasField(name) else None


def check_no_transaction(transaction_id: bytes) -> None:
    """Refuse a transaction id: the server has no transactions (SqlInfo says so)."""
    if transaction_id:
        raise InvalidArgument("transactions are not supported; every statement and ingest commits alone")


def check_location(catalog: str | None, db_schema: str | None) -> None:
    """Refuse a catalog or schema other than the one every dataset is in."""
    if catalog is not None and catalog.lower() != CATALOG:
        raise NotFound(f"catalog {catalog!r} not found; every dataset is in catalog {CATALOG!r}")
    if db_schema is not None and db_schema.lower() != DB_SCHEMA:
        raise NotFound(f"schema {db_schema!r} not found; every dataset is in schema {DB_SCHEMA!r}")


def chain_streams(first: QueryStream, runs: list[Callable[[], QueryStream]]) -> QueryStream:
    """One stream: ``first``, then the results of ``runs`` (each started when the previous one is done)
    in ``first``'s schema (``first`` itself when there are no others: a small result stays complete)."""
    if not runs:
        return first
    schema = first.schema

    def batches() -> Iterator[pa.RecordBatch]:
        yield from first.batches
        for row, run in enumerate(runs, start=2):
            for batch in run().batches:
                yield batch if batch.schema.equals(schema) else cast_result(batch, schema, row)

    return QueryStream(schema, batches())


def cast_result(batch: pa.RecordBatch, schema: pa.Schema, row: int) -> pa.RecordBatch:
    """A batch of parameter row ``row``'s result in the first row's schema, or INVALID_ARGUMENT."""
    try:
        return batch.cast(schema)
    except pa.ArrowException as exc:
        reason = str(exc).splitlines()[0]
        raise InvalidArgument(
            f"parameter row {row} gives a result of other types than row 1 ({reason}); "
            "cast the parameters in the SQL, e.g. CAST(? AS BIGINT)"
        ) from None
