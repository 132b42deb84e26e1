"""The generated Flight SQL messages are current, and speak the specification's wire format."""

from __future__ import annotations

import adbc_driver_flightsql.dbapi
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2
from google.protobuf.message import Message

from flight_lakehouse import flight_sql_pb2 as pb

TYPE_URL_PREFIX = "type.googleapis.com/arrow.flight.protocol.sql."

#: Every message of the specification's format/FlightSql.proto (Arrow 21), top-level ones only.
SPEC_MESSAGES = {
    "CommandGetSqlInfo",
    "CommandGetXdbcTypeInfo",
    "CommandGetCatalogs",
    "CommandGetDbSchemas",
    "CommandGetTables",
    "CommandGetTableTypes",
    "CommandGetPrimaryKeys",
    "CommandGetExportedKeys",
    "CommandGetImportedKeys",
    "CommandGetCrossReference",
    "ActionCreatePreparedStatementRequest",
    "SubstraitPlan",
    "ActionCreatePreparedSubstraitPlanRequest",
    "ActionCreatePreparedStatementResult",
    "ActionClosePreparedStatementRequest",
    "ActionBeginTransactionRequest",
    "ActionBeginSavepointRequest",
    "ActionBeginTransactionResult",
    "ActionBeginSavepointResult",
    "ActionEndTransactionRequest",
    "ActionEndSavepointRequest",
    "CommandStatementQuery",
    "CommandStatementSubstraitPlan",
    "TicketStatementQuery",
    "CommandPreparedStatementQuery",
    "CommandStatementUpdate",
    "CommandPreparedStatementUpdate",
    "CommandStatementIngest",
    "DoPutUpdateResult",
    "DoPutPreparedStatementResult",
    "ActionCancelQueryRequest",
    "ActionCancelQueryResult",
}

SPEC_ENUMS = {
    "SqlInfo",
    "SqlSupportedTransaction",
    "SqlSupportedCaseSensitivity",
    "SqlNullOrdering",
    "SupportedSqlGrammar",
    "SupportedAnsi92SqlGrammarLevel",
    "SqlOuterJoinsSupportLevel",
    "SqlSupportedGroupBy",
    "SqlSupportedElementActions",
    "SqlSupportedPositionedCommands",
    "SqlSupportedSubqueries",
    "SqlSupportedUnions",
    "SqlTransactionIsolationLevel",
    "SqlSupportedTransactions",
    "SqlSupportedResultSetType",
    "SqlSupportedResultSetConcurrency",
    "SqlSupportsConvert",
    "XdbcDataType",
    "XdbcDatetimeSubcode",
    "Nullable",
    "Searchable",
    "UpdateDeleteRules",
}


def test_generated_module_is_current(tmp_path) -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) compiles the proto")
    from scripts.generate_proto import PACKAGE_DIR, generate

    expected = generate(tmp_path)
    stale = [name for name, content in expected.items() if (PACKAGE_DIR / name).read_bytes() != content]
    assert not stale, f"{stale} out of date: run `python -m scripts.generate_proto` and commit the result"


def test_messages_and_enums_are_the_specifications() -> None:
    assert set(pb.DESCRIPTOR.message_types_by_name) == SPEC_MESSAGES
    assert set(pb.DESCRIPTOR.enum_types_by_name) == SPEC_ENUMS
    assert pb.DESCRIPTOR.package == "arrow.flight.protocol.sql"


def pack(message: Message) -> bytes:
    """``message`` as a Flight SQL client sends it: a serialized ``google.protobuf.Any``."""
    wrapper = any_pb2.Any()
    wrapper.Pack(message)
    return wrapper.SerializeToString()


def unpack(data: bytes, message_type: type[Message]) -> Message:
    wrapper = any_pb2.Any.FromString(data)
    message = message_type()
    assert wrapper.Unpack(message), wrapper.type_url
    return message


def test_statement_query_round_trips_through_any() -> None:
    query = pb.CommandStatementQuery(query="SELECT 1", transaction_id=b"tx")
    wrapper = any_pb2.Any.FromString(pack(query))
    assert wrapper.type_url == f"{TYPE_URL_PREFIX}CommandStatementQuery"
    assert wrapper.Is(pb.CommandStatementQuery.DESCRIPTOR)
    assert unpack(pack(query), pb.CommandStatementQuery) == query


@pytest.mark.parametrize(
    ("message", "wire"),
    [
        (pb.CommandStatementQuery(query="SELECT 1"), b"\n\x08SELECT 1"),
        (pb.CommandGetSqlInfo(info=[pb.FLIGHT_SQL_SERVER_TRANSACTION]), b"\n\x01\x08"),
        (pb.CommandGetTables(table_types=["TABLE"], include_schema=True), b'"\x05TABLE(\x01'),
        (pb.CommandGetDbSchemas(catalog=""), b"\n\x00"),  # optional: an empty catalog is sent
        (pb.DoPutUpdateResult(record_count=-1), b"\x08" + b"\xff" * 9 + b"\x01"),
        (pb.CommandGetXdbcTypeInfo(data_type=pb.XDBC_BIGINT), b"\x08" + b"\xfb" + b"\xff" * 8 + b"\x01"),
        (pb.CommandStatementIngest(table="t", options={"k": "v"}), b"\x12\x01t\xc2>\x06\n\x01k\x12\x01v"),
        (pb.DoPutPreparedStatementResult(prepared_statement_handle=b""), b"\n\x00"),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Message) else "",
)
def test_wire_bytes_follow_the_field_numbers(message: Message, wire: bytes) -> None:
    assert message.SerializeToString() == wire
    assert type(message).FromString(wire) == message


def test_enum_values_follow_the_specification() -> None:
    assert pb.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED == 11
    assert pb.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT == 100
    assert (pb.SQL_DDL_CATALOG, pb.SQL_STORED_FUNCTIONS_USING_CALL_SYNTAX_SUPPORTED) == (500, 576)
    assert (pb.XDBC_WVARCHAR, pb.XDBC_TIMESTAMP) == (-9, 93)
    subcodes = pb.XdbcDatetimeSubcode
    assert subcodes.Value("XDBC_SUBCODE_DATE") == subcodes.Value("XDBC_SUBCODE_YEAR") == 1
    options = pb.CommandStatementIngest.TableDefinitionOptions
    assert options.TABLE_EXISTS_OPTION_REPLACE == 3
    assert options.TABLE_NOT_EXIST_OPTION_CREATE == 1


class CommandRecorder(flight.FlightServerBase):
    """A loopback Flight server that records the command of every GetFlightInfo and answers none."""

    def __init__(self) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.commands: list[bytes] = []

    def get_flight_info(self, context, descriptor):
        self.commands.append(descriptor.command)
        raise flight.FlightUnavailableError("recording only")


@pytest.mark.filterwarnings("ignore:Cannot disable autocommit")
def test_a_flight_sql_client_sends_what_these_messages_parse() -> None:
    """The ADBC Flight SQL driver (arrow-go's messages) against this module: same type URLs and bytes."""
    with CommandRecorder() as server:
        connection = adbc_driver_flightsql.dbapi.connect(f"grpc://127.0.0.1:{server.port}")
        try:
            with connection.cursor() as cursor, pytest.raises(Exception):  # noqa: B017 - nothing answers
                cursor.execute("SELECT 42")
        finally:
            connection.close()
    by_type = {any_pb2.Any.FromString(command).type_url: command for command in server.commands}
    assert f"{TYPE_URL_PREFIX}CommandStatementQuery" in by_type, sorted(by_type)
    query = unpack(by_type[f"{TYPE_URL_PREFIX}CommandStatementQuery"], pb.CommandStatementQuery)
    assert query.query == "SELECT 42"
    assert not query.HasField("transaction_id")
