"""Flight SQL through a real client: the ADBC Flight SQL driver (DB-API, pandas, polars) against a server on
a loopback port: queries, ``?`` parameters, metadata, bulk ingest, large results, errors and the limits of
prepared statements. Raw ``pyarrow.flight`` calls send what no driver sends (handles that do not exist)."""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pandas as pd
import polars as pl
import polars.testing
import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_manager import AdbcStatusCode, Error, OperationalError, ProgrammingError
from google.protobuf import any_pb2
from google.protobuf.message import Message

import flight_lakehouse
from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.protocol import pack
from tests.conftest import ServerProcess, vector_array

UTC = dt.timezone.utc
TS = dt.datetime(2024, 1, 2, 3, 4, 5, 678901)
#: One column of each basic type; ``id`` tells the rows apart. Stored and read back as these exact types.
TYPED = pa.table(
    {
        "id": pa.array([0, 1, 2], pa.int64()),
        "i": pa.array([7, None, -(2**40)], pa.int64()),
        "f": pa.array([1.5, -2.25, None], pa.float64()),
        "b": pa.array([True, None, False], pa.bool_()),
        "s": pa.array(["héllo", "", None], pa.string()),
        "bin": pa.array([b"\x00\x01", None, b"z"], pa.binary()),
        "d": pa.array([dt.date(2024, 2, 29), None, dt.date(1970, 1, 1)], pa.date32()),
        "ts": pa.array([TS, None, dt.datetime(1999, 12, 31, 23, 59, 59)], pa.timestamp("us")),
        "tz": pa.array(
            [TS.replace(tzinfo=UTC), None, dt.datetime(2000, 1, 1, tzinfo=UTC)], pa.timestamp("us", "UTC")
        ),
        "dec": pa.array([Decimal("1.25"), Decimal("-3.50"), None], pa.decimal128(10, 2)),
    }
)
#: The DuckDB type name each column of ``TYPED`` reports (ADBC ``xdbc_type_name``).
TYPE_NAMES = [
    "BIGINT",
    "BIGINT",
    "DOUBLE",
    "BOOLEAN",
    "VARCHAR",
    "BLOB",
    "DATE",
    "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE",
    "DECIMAL(10,2)",
]
DIM = 4
VECTORS = np.arange(3 * DIM, dtype=np.float32).reshape(3, DIM) + 1
BIG_ROWS = 2_000_000
PREPARED_MAX = 2
IDLE_SECONDS = 1.0


def vector_table(ids: list[int]) -> pa.Table:
    """Rows with a ``fixed_size_list<float32, 4>`` column: a Lance table."""
    return pa.table({"id": pa.array(ids, pa.int64()), "vec": vector_array(VECTORS[: len(ids)])})


def start(request: pytest.FixtureRequest, base: Path, **env: str) -> ServerProcess:
    """A local server under ``base`` with ``env``, stopped (by pid) at the end of the requesting fixture."""
    server = ServerProcess(str(base / "lakehouse"), env=env)
    request.addfinalizer(server.kill)
    request.addfinalizer(server.stop)  # finalizers run last first: stop, then kill if still running
    return server.start()


@pytest.fixture(scope="module")
def lake(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """One local server for the module: ``typed`` (Iceberg), ``vecs`` and ``vecs2`` (Lance). Unsent result
    batches are bounded at 64 MB so that the large result cannot sit in the server whole."""
    server = start(request, tmp_path_factory.mktemp("flight_sql"), LAKEHOUSE_RESULT_BUFFER_MB="64")
    server.put("typed", TYPED)
    server.put("vecs", vector_table([1, 2, 3]))
    server.put("vecs2", vector_table([4]))
    return server


@pytest.fixture(scope="module")
def conn(lake: ServerProcess) -> Iterator[dbapi.Connection]:
    """The module's ADBC connection (autocommit: the server has no transactions)."""
    with dbapi.connect(lake.location, autocommit=True) as connection:
        yield connection


def fetch(conn: dbapi.Connection, query: str, parameters: tuple | None = None) -> pa.Table:
    """``query``'s whole result as Arrow."""
    with conn.cursor() as cursor:
        cursor.execute(query, parameters)
        return cursor.fetch_arrow_table()


def rows(conn: dbapi.Connection, query: str, parameters: tuple | None = None) -> list[tuple]:
    """``query``'s result rows."""
    with conn.cursor() as cursor:
        cursor.execute(query, parameters)
        return cursor.fetchall()


def assert_usable(conn: dbapi.Connection) -> None:
    """The connection still answers queries."""
    assert rows(conn, "SELECT 42 AS answer") == [(42,)]


def refusal(conn: dbapi.Connection, call: Callable[[dbapi.Cursor], object], kind: type[Error]) -> Error:
    """The DB-API error ``call`` raises on a fresh cursor: of ``kind``, one line, no traceback; the
    connection stays usable."""
    with pytest.raises(kind) as caught, conn.cursor() as cursor:
        call(cursor)
    message = str(caught.value)
    assert "\n" not in message and "Traceback" not in message, message
    assert_usable(conn)
    return caught.value


# -- queries ----------------------------------------------------------------------------------------------


def test_query_results_as_arrow_pandas_and_polars(conn: dbapi.Connection) -> None:
    """One query, fetched as an Arrow table, a pandas frame (cursor and ``pandas.read_sql``) and a polars
    frame (``polars.read_database``): the stored rows and types exactly."""
    query = "SELECT * FROM typed ORDER BY id"
    assert fetch(conn, query).equals(TYPED)
    expected = TYPED.to_pandas()
    with conn.cursor() as cursor:
        cursor.execute(query)
        pd.testing.assert_frame_equal(cursor.fetch_df(), expected)
    pd.testing.assert_frame_equal(pd.read_sql(query, conn), expected)
    polars.testing.assert_frame_equal(pl.read_database(query, conn), pl.from_arrow(TYPED))


def test_iceberg_and_lance_tables_by_their_full_names(conn: dbapi.Connection) -> None:
    """Both formats are tables of catalog ``lakehouse``, schema ``main``, by short or full name."""
    assert fetch(conn, "SELECT * FROM lakehouse.main.typed ORDER BY id").equals(TYPED)
    vectors = fetch(conn, "SELECT id, vec FROM lakehouse.main.vecs ORDER BY id")
    assert vectors.schema.field("vec").type == pa.list_(pa.float32(), DIM)
    assert vectors.to_pylist() == vector_table([1, 2, 3]).to_pylist()
    joined = "SELECT t.id, v.id AS v FROM lakehouse.main.typed t JOIN main.vecs v ON v.id = t.id + 1"
    assert rows(conn, joined + " ORDER BY t.id") == [(0, 1), (1, 2), (2, 3)]


# -- parameters -------------------------------------------------------------------------------------------

PARAMETERS = [
    ("i", 7, pa.int64()),
    ("f", 1.5, pa.float64()),
    ("b", True, pa.bool_()),
    ("s", "héllo", pa.string()),
    ("bin", b"\x00\x01", pa.binary()),
    ("d", dt.date(2024, 2, 29), pa.date32()),
    ("ts", TS, pa.timestamp("us")),
    ("tz", TS.replace(tzinfo=UTC), None),  # the zone's name is DuckDB's setting
    ("dec", Decimal("1.25"), pa.decimal128(3, 2)),
]


@pytest.mark.parametrize(("column", "value", "arrow_type"), PARAMETERS, ids=[p[0] for p in PARAMETERS])
def test_a_parameter_of_each_basic_type(
    conn: dbapi.Connection, column: str, value: object, arrow_type: pa.DataType | None
) -> None:
    """A ``?`` of each type selects the row holding that value, and comes back as itself."""
    assert rows(conn, f"SELECT id FROM typed WHERE {column} = ?", (value,)) == [(0,)]
    echoed = fetch(conn, "SELECT ? AS v", (value,))
    assert echoed.column("v").to_pylist() == [value]
    if arrow_type is not None:
        assert echoed.schema.field("v").type == arrow_type


def test_a_null_parameter(conn: dbapi.Connection) -> None:
    assert rows(conn, "SELECT ? IS NULL AS n", (None,)) == [(True,)]
    assert rows(conn, "SELECT id FROM typed WHERE i IS NOT DISTINCT FROM ?", (None,)) == [(1,)]


def run_prepared(cursor: dbapi.Cursor, query: str, parameters: pa.RecordBatch) -> pa.Table:
    """ADBC's low-level API: prepare ``query``, bind every row of ``parameters`` at once, execute."""
    statement = cursor.adbc_statement
    statement.set_sql_query(query)
    statement.prepare()
    statement.bind(parameters)
    stream, _ = statement.execute_query()
    return pa.RecordBatchReader.from_stream(stream).read_all()


def test_several_parameter_rows_bound_at_once(conn: dbapi.Connection) -> None:
    """One bound batch of n rows runs the query n times; the results come one after another, each row's
    values keeping their Arrow types (an int64 of 1, then one of 2**40)."""
    with conn.cursor() as cursor:
        bound = pa.record_batch({"n": pa.array([1, 2**40, None], pa.int64()), "label": ["a", "b", None]})
        echoed = run_prepared(cursor, "SELECT ? AS n, ? AS label", bound)
        capsule = cursor.adbc_statement.get_parameter_schema().__arrow_c_schema__()
        assert len(pa.Schema._import_from_c_capsule(capsule)) == 2
        assert echoed.schema.field("n").type == pa.int64()
        assert echoed.to_pylist() == bound.to_pylist()
        lookups = pa.record_batch({"id": pa.array([2, 0, 5], pa.int64())})
        found = run_prepared(cursor, "SELECT id, s FROM typed WHERE id = ?", lookups)
        assert found.to_pylist() == [{"id": 2, "s": None}, {"id": 0, "s": "héllo"}]


# -- metadata ---------------------------------------------------------------------------------------------


def objects(conn: dbapi.Connection, depth: str, **filters: Any) -> list[dict]:
    """``adbc_get_objects`` as Python objects."""
    return conn.adbc_get_objects(depth=depth, **filters).read_all().to_pylist()


def table_names(tree: list[dict]) -> list[tuple[str, str, str]]:
    """(catalog, schema, table) of every table in a ``get_objects`` tree."""
    return [
        (catalog["catalog_name"], schema["db_schema_name"], table["table_name"])
        for catalog in tree
        for schema in catalog["catalog_db_schemas"] or []
        for table in schema["db_schema_tables"] or []
    ]


def columns_of(tree: list[dict], name: str) -> list[dict]:
    """The ``table_columns`` of table ``name`` in a ``get_objects`` tree."""
    [table] = [
        table
        for catalog in tree
        for schema in catalog["catalog_db_schemas"]
        for table in schema["db_schema_tables"]
        if table["table_name"] == name
    ]
    return table["table_columns"]


def test_get_objects_at_every_depth(conn: dbapi.Connection) -> None:
    """Catalogs, then schemas, then tables (Iceberg and Lance alike, type TABLE), then columns with their
    positions and SQL types; ``all`` is ``columns``."""
    assert objects(conn, "catalogs") == [{"catalog_name": "lakehouse", "catalog_db_schemas": None}]
    [catalog] = objects(conn, "db_schemas")
    assert catalog["catalog_db_schemas"] == [{"db_schema_name": "main", "db_schema_tables": None}]
    tables = objects(conn, "tables")
    expected = {("lakehouse", "main", name) for name in ("typed", "vecs", "vecs2")}
    assert expected <= set(table_names(tables))
    every_table = [t for c in tables for s in c["catalog_db_schemas"] for t in s["db_schema_tables"]]
    assert {t["table_type"] for t in every_table} == {"TABLE"}
    assert {t["table_columns"] is None for t in every_table} == {True}
    for depth in ("columns", "all"):
        tree = objects(conn, depth)
        typed = columns_of(tree, "typed")
        assert [c["column_name"] for c in typed] == TYPED.column_names
        assert [c["ordinal_position"] for c in typed] == list(range(1, len(TYPED.column_names) + 1))
        assert [c["xdbc_type_name"] for c in typed] == TYPE_NAMES
        vecs = columns_of(tree, "vecs")
        assert [(c["column_name"], c["xdbc_type_name"]) for c in vecs] == [
            ("id", "BIGINT"),
            ("vec", "FLOAT[4]"),
        ]


FILTERS = [
    ({"catalog_filter": "lakehouse"}, ["typed", "vecs", "vecs2"]),
    ({"catalog_filter": "lake%"}, ["typed", "vecs", "vecs2"]),
    ({"catalog_filter": "lakehous_"}, ["typed", "vecs", "vecs2"]),
    ({"catalog_filter": "other"}, []),
    ({"db_schema_filter": "main"}, ["typed", "vecs", "vecs2"]),
    ({"db_schema_filter": "m_i%"}, ["typed", "vecs", "vecs2"]),
    ({"db_schema_filter": "x%"}, []),
    ({"table_name_filter": "vecs"}, ["vecs"]),
    ({"table_name_filter": "vec_"}, ["vecs"]),
    ({"table_name_filter": "vec%"}, ["vecs", "vecs2"]),
    ({"table_name_filter": "%yp_d"}, ["typed"]),
    ({"table_name_filter": "VECS"}, []),
    ({"table_types_filter": ["TABLE"]}, ["typed", "vecs", "vecs2"]),
    ({"table_types_filter": ["VIEW"]}, []),
]


@pytest.mark.parametrize(("filters", "expected"), FILTERS, ids=[str(f[0]) for f in FILTERS])
def test_get_objects_filters(conn: dbapi.Connection, filters: dict, expected: list[str]) -> None:
    """Catalog, schema and table filters are LIKE patterns (``%``, ``_``), case-sensitive."""
    found = [name for _, _, name in table_names(objects(conn, "tables", **filters))]
    # datasets other tests ingest meanwhile are named ing_*; keep to those made by the fixture
    assert [name for name in found if not name.startswith("ing_")] == expected


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("d%", ["d", "dec"]),
        ("_", ["i", "f", "b", "s", "d"]),
        ("%s", ["s", "ts"]),
        ("none", []),
        (None, TYPED.column_names),
    ],
)
def test_get_objects_column_filter(conn: dbapi.Connection, pattern: str | None, expected: list[str]) -> None:
    tree = objects(conn, "columns", table_name_filter="typed", column_name_filter=pattern)
    assert [c["column_name"] for c in columns_of(tree, "typed")] == expected


def test_get_table_schema_types_and_info(conn: dbapi.Connection) -> None:
    """A table's Arrow schema (Iceberg and Lance), the table types, and the server's identity."""
    assert conn.adbc_get_table_schema("typed").equals(TYPED.schema)
    assert conn.adbc_get_table_schema("typed", catalog_filter="lakehouse", db_schema_filter="main").equals(
        TYPED.schema
    )
    assert conn.adbc_get_table_schema("vecs").field("vec").type == pa.list_(pa.float32(), DIM)
    for name, where in (("nope", {}), ("typed", {"db_schema_filter": "other"})):
        with pytest.raises(ProgrammingError) as caught:
            conn.adbc_get_table_schema(name, **where)
        assert caught.value.status_code == AdbcStatusCode.NOT_FOUND
    assert conn.adbc_get_table_types() == ["TABLE"]
    info = conn.adbc_get_info()
    assert info["vendor_name"] == "flight-lakehouse"
    assert info["vendor_version"] == flight_lakehouse.__version__
    assert info["vendor_arrow_version"] == pa.__version__


# -- bulk ingest ------------------------------------------------------------------------------------------


def ingest(conn: dbapi.Connection, table: str, data: pa.Table, mode: str, **where: str) -> int:
    """``adbc_ingest`` of ``data`` into ``table``."""
    with conn.cursor() as cursor:
        return cursor.adbc_ingest(table, data, mode=mode, **where)


def stored(conn: dbapi.Connection, table: str) -> pa.Table:
    return fetch(conn, f"SELECT * FROM {table} ORDER BY id")


def test_ingest_create_then_append(conn: dbapi.Connection) -> None:
    """``create`` makes the table (rows and types exactly as sent), ``append`` adds to it."""
    assert ingest(conn, "ing_created", TYPED, "create") == TYPED.num_rows
    assert stored(conn, "ing_created").equals(TYPED)
    later = TYPED.set_column(0, "id", pa.array([10, 11, 12], pa.int64()))
    assert ingest(conn, "ing_created", later, "append", db_schema_name="main") == TYPED.num_rows
    assert stored(conn, "ing_created").equals(pa.concat_tables([TYPED, later]))


def test_ingest_replace_and_create_append(conn: dbapi.Connection) -> None:
    """``replace`` swaps the rows and columns for the upload's; ``create_append`` creates, then appends."""
    ingest(conn, "ing_replaced", TYPED, "create")
    narrow = TYPED.select(["id", "s"]).slice(1)
    assert ingest(conn, "ing_replaced", narrow, "replace") == 2
    assert stored(conn, "ing_replaced").equals(narrow)
    assert ingest(conn, "ing_fresh", narrow, "replace") == 2  # replace creates a missing table
    assert stored(conn, "ing_fresh").equals(narrow)
    ingest(conn, "ing_either", TYPED.slice(0, 1), "create_append")
    ingest(conn, "ing_either", TYPED.slice(1), "create_append")
    assert stored(conn, "ing_either").equals(TYPED)


def test_ingest_refusals(conn: dbapi.Connection, lake: ServerProcess) -> None:
    """``create`` on an existing table, ``append`` to a missing one, another schema or a temporary table
    are refused with a DB-API error; nothing is written."""
    create = refusal(conn, lambda c: c.adbc_ingest("typed", TYPED, mode="create"), ProgrammingError)
    assert "already exists" in str(create)
    assert stored(conn, "typed").equals(TYPED)
    missing = refusal(conn, lambda c: c.adbc_ingest("ing_missing", TYPED, mode="append"), ProgrammingError)
    assert missing.status_code == AdbcStatusCode.NOT_FOUND and "ing_missing" in str(missing)
    elsewhere = refusal(
        conn, lambda c: c.adbc_ingest("ing_x", TYPED, mode="create", db_schema_name="other"), ProgrammingError
    )
    assert elsewhere.status_code == AdbcStatusCode.NOT_FOUND
    temporary = refusal(conn, lambda c: c.adbc_ingest("ing_x", TYPED, mode="create", temporary=True), Error)
    assert "temporary" in str(temporary)
    assert not {"ing_missing", "ing_x"} & {entry["name"] for entry in lake.action("list_datasets", {})}


def test_ingest_vectors_make_a_lance_table(conn: dbapi.Connection, lake: ServerProcess) -> None:
    """A ``fixed_size_list<float32, 4>`` column makes a Lance table; append and replace work on it too."""
    ingest(conn, "ing_vectors", vector_table([1, 2]), "create")
    assert lake.action("describe_dataset", {"dataset": "ing_vectors"})["format"] == "lance"
    back = stored(conn, "ing_vectors")
    assert back.schema.field("vec").type == pa.list_(pa.float32(), DIM)
    assert back.to_pylist() == vector_table([1, 2]).to_pylist()
    ingest(conn, "ing_vectors", vector_table([3]), "append")
    assert stored(conn, "ing_vectors").column("id").to_pylist() == [1, 2, 3]
    ingest(conn, "ing_vectors", vector_table([7]), "replace")
    assert stored(conn, "ing_vectors").to_pylist() == vector_table([7]).to_pylist()


# -- large results ----------------------------------------------------------------------------------------


def test_a_large_result_streams_through_the_server(conn: dbapi.Connection, lake: ServerProcess) -> None:
    """2M rows (over 200 MB of Arrow) read batch by batch through ADBC: the server's memory grows by far
    less than the result (it never holds it whole: at most the 64 MB result budget waits to be sent)."""
    process = psutil.Process(lake.pid)
    rows(conn, "SELECT count(*) FROM range(1000)")  # the query machinery warmed up
    before = process.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    count = size = 0
    try:
        with conn.cursor() as cursor:
            cursor.execute(f"SELECT i, repeat(chr(65 + (i % 26)::INT), 100) AS s FROM range({BIG_ROWS}) t(i)")
            for batch in cursor.fetch_record_batch():
                count += batch.num_rows
                size += batch.nbytes
    finally:
        done.set()
        sampler.join()
    assert count == BIG_ROWS and size > 200 * 2**20
    grown = peak[0] - before
    assert grown < size / 2, f"server grew {grown / 2**20:.0f} MB for a {size / 2**20:.0f} MB result"


# -- errors -----------------------------------------------------------------------------------------------

BAD_SQL = [
    ("SELEC 1", AdbcStatusCode.INVALID_ARGUMENT, "syntax error"),
    ("SELECT * FROM nope", AdbcStatusCode.NOT_FOUND, "'nope' not found"),
    ("SELECT * FROM read_csv('/etc/passwd')", AdbcStatusCode.INVALID_ARGUMENT, "read_csv"),
    ("COPY typed TO '/tmp/out.csv'", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
    ("ATTACH '/tmp/other.db' AS other", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
    ("INSERT INTO typed (id) VALUES (9)", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
    ("UPDATE typed SET i = 0", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
    ("CREATE TABLE t2 (a INT)", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
    ("DELETE FROM typed", AdbcStatusCode.INVALID_ARGUMENT, "read-only"),
]


@pytest.mark.parametrize(("query", "status", "fragment"), BAD_SQL, ids=[b[0] for b in BAD_SQL])
def test_bad_sql_is_a_programming_error(
    conn: dbapi.Connection, query: str, status: AdbcStatusCode, fragment: str
) -> None:
    """Bad SQL, unknown tables, sandbox escapes and writes: ProgrammingError naming the problem."""
    error = refusal(conn, lambda cursor: cursor.execute(query), ProgrammingError)
    assert error.status_code == status and fragment in str(error), error
    assert stored(conn, "typed").equals(TYPED)


BAD_PARAMETERS = [
    ("SELECT id FROM typed WHERE id = ?", None, "bind the statement's 1 parameters first"),
    ("SELECT id FROM typed WHERE id = ?", (1, 2), "has 1 parameters; got 2"),
    ("SELECT id FROM typed WHERE id = ? AND s = ?", (1,), "has 2 parameters; got 1"),
    ("SELECT id FROM typed WHERE id = ?", ("abc",), "Could not convert"),
    ("SELECT id FROM typed WHERE d = ?", (b"\x00",), "BLOB"),
]


@pytest.mark.parametrize(("query", "parameters", "fragment"), BAD_PARAMETERS)
def test_bad_parameters_are_programming_errors(
    conn: dbapi.Connection, query: str, parameters: tuple | None, fragment: str
) -> None:
    """No values, too many or too few, or values of a type that does not fit the placeholder (DuckDB 2
    converts the values when the query runs, not when it is planned: the error may come with the
    results)."""
    error = refusal(
        conn, lambda cursor: (cursor.execute(query, parameters), cursor.fetch_arrow_table()), ProgrammingError
    )
    assert error.status_code == AdbcStatusCode.INVALID_ARGUMENT and fragment in str(error), error


def sql_action(
    client: flight.FlightClient, name: str, request: Message, result: Message | None = None
) -> None:
    """A Flight SQL action; its result (a protobuf ``Any``) unpacked into ``result``."""
    [answer] = list(client.do_action(flight.Action(name, pack(request))))
    if result is not None:
        packed = any_pb2.Any()
        packed.ParseFromString(answer.body.to_pybytes())
        assert packed.Unpack(result)


def prepare(client: flight.FlightClient, query: str) -> bytes:
    """A prepared statement's handle (CreatePreparedStatement)."""
    created = sql.ActionCreatePreparedStatementResult()
    sql_action(
        client, "CreatePreparedStatement", sql.ActionCreatePreparedStatementRequest(query=query), created
    )
    return created.prepared_statement_handle


def close_prepared(client: flight.FlightClient, handle: bytes) -> None:
    sql_action(
        client,
        "ClosePreparedStatement",
        sql.ActionClosePreparedStatementRequest(prepared_statement_handle=handle),
    )


def handle_calls(client: flight.FlightClient, handle: bytes) -> dict[str, Callable[[], object]]:
    """Every call that uses a prepared statement's handle (closing one works whether it is open or not)."""
    command = pack(sql.CommandPreparedStatementQuery(prepared_statement_handle=handle))

    def bind() -> None:
        writer, reader = client.do_put(
            flight.FlightDescriptor.for_command(command), pa.schema([("p", pa.int64())])
        )
        with writer:
            writer.write_batch(pa.record_batch({"p": [1]}))
            writer.done_writing()
            reader.read()

    return {
        "GetFlightInfo": lambda: client.get_flight_info(flight.FlightDescriptor.for_command(command)),
        "DoGet": lambda: client.do_get(flight.Ticket(command)).read_all(),
        "DoPut": bind,
    }


def assert_not_found(call: Callable[[], object]) -> None:
    """``call`` is refused with NOT_FOUND naming the prepared statement, in one line."""
    with pytest.raises(pa.ArrowKeyError) as caught:
        call()
    message = str(caught.value).split(". Detail:")[0]
    assert message.startswith("prepared statement not found") and "\n" not in message, message


def test_unknown_and_closed_prepared_statements(conn: dbapi.Connection, lake: ServerProcess) -> None:
    """A handle that never existed, or one closed, is NOT_FOUND on every call that uses it; closing it
    (again) succeeds; the connection and the server go on serving."""
    client = lake.client
    unknown = b"\x01" * 16
    for call in handle_calls(client, unknown).values():
        assert_not_found(call)
    close_prepared(client, unknown)
    handle = prepare(client, "SELECT 1 AS one")
    assert client.do_get(
        flight.Ticket(pack(sql.CommandPreparedStatementQuery(prepared_statement_handle=handle)))
    ).read_all().to_pylist() == [{"one": 1}]
    close_prepared(client, handle)
    close_prepared(client, handle)
    for call in handle_calls(client, handle).values():
        assert_not_found(call)
    assert_usable(conn)


# -- prepared statement limits ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ServerProcess:
    """A server with room for two prepared statements, each closed after 1 s unused."""
    return start(
        request,
        tmp_path_factory.mktemp("limited"),
        LAKEHOUSE_PREPARED_STATEMENTS_MAX=str(PREPARED_MAX),
        LAKEHOUSE_PREPARED_STATEMENT_IDLE_SECONDS=str(IDLE_SECONDS),
    )


def prepare_on(cursor: dbapi.Cursor, query: str) -> None:
    """ADBC prepares ``query`` on ``cursor`` (CreatePreparedStatement)."""
    cursor.adbc_statement.set_sql_query(query)
    cursor.adbc_statement.prepare()


def test_one_prepared_statement_too_many_is_unavailable(limited: ServerProcess) -> None:
    """Past ``prepared_statements_max`` open statements a new one is UNAVAILABLE (ADBC: OperationalError)
    until one is closed."""
    client = limited.client
    handles = [prepare(client, f"SELECT {n} AS n") for n in range(PREPARED_MAX)]
    with pytest.raises(flight.FlightUnavailableError, match="prepared statements are open"):
        prepare(client, "SELECT 'one too many'")
    with dbapi.connect(limited.location, autocommit=True) as connection, connection.cursor() as cursor:
        with pytest.raises(OperationalError) as caught:
            prepare_on(cursor, "SELECT 'one too many'")
        assert caught.value.status_code == AdbcStatusCode.IO and "\n" not in str(caught.value)
        close_prepared(client, handles.pop())
        assert rows(connection, "SELECT ? AS n", (5,)) == [(5,)]
    for handle in handles:
        close_prepared(client, handle)


def test_an_idle_prepared_statement_expires(limited: ServerProcess) -> None:
    """A statement unused for ``prepared_statement_idle_seconds`` is closed: NOT_FOUND afterwards, and its
    place is free again."""
    client = limited.client
    handle = prepare(client, "SELECT 1 AS one")
    with dbapi.connect(limited.location, autocommit=True) as connection:
        cursor = connection.cursor()
        prepare_on(cursor, "SELECT 2 AS two")
        time.sleep(IDLE_SECONDS + 0.5)
        assert_not_found(handle_calls(client, handle)["GetFlightInfo"])
        with pytest.raises(ProgrammingError) as caught:
            cursor.adbc_statement.execute_query()
        assert caught.value.status_code == AdbcStatusCode.NOT_FOUND
        assert "prepared statement not found" in str(caught.value)
        cursor.close()  # ADBC closes its statement on the server: gone already, which is no error
        fresh = [prepare(client, f"SELECT {n} AS n") for n in range(PREPARED_MAX)]
        for each in fresh:
            close_prepared(client, each)
