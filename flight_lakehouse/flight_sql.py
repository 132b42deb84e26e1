"""Flight SQL on the server's port: one handler method per Flight SQL command, over the same services as
the JSON commands (query engine, sandbox, datasets registry, ingest).

The codec (``protocol.decode_flight_sql``) turns each protobuf ``Any`` into its message once; the routers
send each message type to its method here. Statement tickets carry the SQL itself (stateless: any server
of the root can answer them) with a query id that ``CancelFlightInfo`` names; prepared statements live in
:class:`PreparedStatements`, bounded in number and closed when idle.
"""

from __future__ import annotations

import functools
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa
from google.protobuf.message import Message

from flight_lakehouse import __version__
from flight_lakehouse import flight_sql_metadata as metadata
from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.commands import IngestOptions, validate_dataset_name
from flight_lakehouse.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from flight_lakehouse.handlers import FlightFacts, Routes
from flight_lakehouse.process import large_work_finished
from flight_lakehouse.protocol import ActionRouter, ActionSpec, CallContext, pack
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
#: Bytes of a query id at the start of a statement handle.
QUERY_ID_BYTES = 16
#: Query ids cancelled by CancelFlightInfo, remembered so a ticket fetched later is refused too.
REMEMBERED_CANCELS = 4096
#: Parameter rows one DoPut may bind to a prepared statement.
MAX_PARAMETER_ROWS = 10_000

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
    parameter_rows: list[Params] = field(default_factory=lambda: [None])
    last_used: float = field(default_factory=time.monotonic)

    @property
    def parameter_schema(self) -> pa.Schema:
        """One field per placeholder; DuckDB types them only when values are bound, so they are null."""
        return pa.schema([pa.field(f"${index + 1}", pa.null()) for index in range(self.parameter_count)])


class PreparedStatements:
    """The open prepared statements: at most ``prepared_statements_max``, each closed after
    ``prepared_statement_idle_seconds`` unused."""

    def __init__(self, settings: Settings) -> None:
        self._max = settings.prepared_statements_max
        self._idle = settings.prepared_statement_idle_seconds
        self._statements: OrderedDict[bytes, PreparedStatement] = OrderedDict()
        self._guard = threading.Lock()

    def add(self, query: str, dataset_schema: pa.Schema, parameter_count: int) -> PreparedStatement:
        """Open a statement, or UNAVAILABLE when as many as allowed are open and in use."""
        statement = PreparedStatement(secrets.token_bytes(16), query, dataset_schema, parameter_count)
        with self._guard:
            self._expire()
            if len(self._statements) >= self._max:
                raise Unavailable(
                    f"{self._max} prepared statements are open; close some (ClosePreparedStatement) or retry"
                )
            self._statements[statement.handle] = statement
        return statement

    def get(self, handle: bytes) -> PreparedStatement:
        """The open statement of ``handle``, or NOT_FOUND."""
        with self._guard:
            self._expire()
            statement = self._statements.get(handle)
            if statement is None:
                raise NotFound("prepared statement not found: unknown, closed or expired; prepare it again")
            statement.last_used = time.monotonic()
            self._statements.move_to_end(handle)
            return statement

    def close(self, handle: bytes) -> None:
        """Close the statement of ``handle`` (NOT_FOUND when it is not open)."""
        with self._guard:
            if self._statements.pop(handle, None) is None:
                raise NotFound("prepared statement not found: unknown, closed or expired")

    def _expire(self) -> None:
        cutoff = time.monotonic() - self._idle
        while self._statements:
            oldest = next(iter(self._statements.values()))
            if oldest.last_used >= cutoff:
                break
            del self._statements[oldest.handle]


class Cancellations:
    """Query ids cancelled by ``CancelFlightInfo``; a query checks its own id while it runs."""

    def __init__(self) -> None:
        self._ids: OrderedDict[bytes, None] = OrderedDict()
        self._guard = threading.Lock()

    def cancel(self, query_id: bytes) -> None:
        """Mark ``query_id`` cancelled (remembering the newest ones only)."""
        with self._guard:
            self._ids[query_id] = None
            while len(self._ids) > REMEMBERED_CANCELS:
                self._ids.popitem(last=False)

    def hooks(self, ctx: CallContext, query_id: bytes) -> CallHooks:
        """The call hooks of a query: cancelled by its client or by ``CancelFlightInfo``."""
        return CallHooks(is_cancelled=lambda: ctx.is_cancelled() or query_id in self._ids)


def statement_ticket(query: str) -> bytes:
    """The ticket of a statement: a fresh query id, then the SQL."""
    handle = secrets.token_bytes(QUERY_ID_BYTES) + query.encode("utf-8")
    return pack(sql.TicketStatementQuery(statement_handle=handle))


def split_handle(handle: bytes) -> tuple[bytes, str]:
    """The query id and SQL of a statement handle."""
    if len(handle) <= QUERY_ID_BYTES:
        raise InvalidArgument("malformed statement handle")
    try:
        return handle[:QUERY_ID_BYTES], handle[QUERY_ID_BYTES:].decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgument("malformed statement handle: the SQL is not UTF-8") from None


def parameter_rows(batch: pa.RecordBatch) -> list[Params]:
    """The parameter values of each row of ``batch``, in column order."""
    columns = [column.to_pylist() for column in batch.columns]
    return [list(row) for row in zip(*columns, strict=True)] if columns else [[]] * batch.num_rows


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

    def register(self, routes: Routes, actions: ActionRouter) -> None:
        """Add the Flight SQL commands to the routers (anything else of the specification: UNIMPLEMENTED)."""
        routes.info.route(sql.CommandStatementQuery, self.info_statement)
        routes.info.route(sql.CommandPreparedStatementQuery, self.info_prepared)
        routes.get.route(sql.TicketStatementQuery, self.get_statement)
        routes.get.route(sql.CommandPreparedStatementQuery, self.get_prepared)
        routes.put.route(sql.CommandStatementUpdate, self.put_update)
        routes.put.route(sql.CommandPreparedStatementUpdate, self.put_update)
        routes.put.route(sql.CommandPreparedStatementQuery, self.put_parameters)
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
            }
        )

    # -- statements ------------------------------------------------------------------------------
    def info_statement(self, ctx: CallContext, command: sql.CommandStatementQuery) -> FlightFacts:
        """A query's result schema, from DuckDB's plan (the query does not run)."""
        check_no_transaction(command.transaction_id)
        schema = self.s.engine.schema(command.query)
        return FlightFacts(schema, statement_ticket(command.query))

    def get_statement(self, ctx: CallContext, ticket: sql.TicketStatementQuery) -> QueryStream:
        """A query, streamed like a DoGet ``{"sql"}`` ticket."""
        query_id, query = split_handle(ticket.statement_handle)
        return self.s.engine.run(query, self.cancels.hooks(ctx, query_id))

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
        statement.parameter_rows = rows if statement.parameter_count else [None]
        return sql.DoPutPreparedStatementResult(
            prepared_statement_handle=statement.handle
        ).SerializeToString()

    def info_prepared(self, ctx: CallContext, command: sql.CommandPreparedStatementQuery) -> FlightFacts:
        """A prepared query's result schema (with its first bound parameter row); the command is its
        ticket."""
        statement = self.prepared.get(command.prepared_statement_handle)
        schema = statement.dataset_schema
        if statement.parameter_count and statement.parameter_rows:
            schema = self.s.engine.schema(statement.query, params=statement.parameter_rows[0])
        return FlightFacts(schema, pack(command))

    def get_prepared(self, ctx: CallContext, command: sql.CommandPreparedStatementQuery) -> QueryStream:
        """A prepared query, once per bound parameter row, the results one after another."""
        statement = self.prepared.get(command.prepared_statement_handle)
        rows = statement.parameter_rows
        if statement.parameter_count and (not rows or rows == [None]):
            raise InvalidArgument(
                f"bind the statement's {statement.parameter_count} parameters first (DoPut)"
            )
        hooks = CallHooks(ctx.is_cancelled)
        first = self.s.engine.run(statement.query, hooks, params=rows[0])
        rest = [functools.partial(self.s.engine.run, statement.query, hooks, params=row) for row in rows[1:]]
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
        names = self.s.datasets.names()
        schema_of = self.s.datasets.schema if command.include_schema else lambda _: None
        entries = [TableEntry(CATALOG, DB_SCHEMA, name, TABLE_TYPE, schema_of(name)) for name in names]
        return metadata.get_tables(
            entries,
            optional(command, "catalog"),
            optional(command, "db_schema_filter_pattern"),
            optional(command, "table_name_filter_pattern"),
            list(command.table_types),
            command.include_schema,
        )

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
        """``adbc_ingest``: the upload through the same path and atomic commit as DoPut."""
        options = self.ingest_options(command)
        try:
            result = self.s.datasets.write(options, upload.schema(), upload.batches())
        finally:
            large_work_finished()
        return sql.DoPutUpdateResult(record_count=int(result.get("rows_written", 0))).SerializeToString()

    def ingest_options(self, command: sql.CommandStatementIngest) -> IngestOptions:
        """The ingest options of a CommandStatementIngest: its table and what to do if it exists or not."""
        check_no_transaction(command.transaction_id)
        if command.temporary:
            raise InvalidArgument("temporary tables are not supported; ingest into a dataset")
        check_location(optional(command, "catalog"), optional(command, "schema"))
        if command.options:
            raise InvalidArgument(f"ingest options are not supported: {sorted(command.options)[:5]}")
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
            return IngestOptions(dataset=name, mode="overwrite", schema_mode="evolve")
        return IngestOptions(dataset=name, mode="append" if exists else "create")


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
    in ``first``'s schema."""
    schema = first.schema

    def batches() -> Iterator[pa.RecordBatch]:
        yield from first.batches
        for run in runs:
            for batch in run().batches:
                yield batch if batch.schema.equals(schema) else batch.cast(schema)

    return QueryStream(schema, batches())
