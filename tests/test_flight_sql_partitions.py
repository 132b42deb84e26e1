"""Flight SQL statements as several endpoints, and cancellation, through real servers.

A statement that reads one Iceberg dataset row by row, whose snapshot has several files, is answered with
one endpoint per part; the ADBC driver's ``adbc_execute_partitions`` / ``adbc_read_partition`` read them in
parallel, and together they hold every row once. ``CancelFlightInfo`` (Flight RPC) and ``CancelQuery``
(Flight SQL) stop a statement's query, whether it runs, waits for its reader or is not fetched yet.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import adbc_driver_flightsql.dbapi as dbapi
import duckdb
import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_manager import Error as AdbcError
from google.protobuf import any_pb2

from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.partitions import Part, parts, row_local
from flight_lakehouse.protocol import pack
from flight_lakehouse.sandbox import serialize
from tests.conftest import ServerProcess, data_files, wait_until
from tests.test_errors import HEAVY_SQL, SLOW_SECOND_BATCH_SQL, assert_clean

FILES = 6
ROWS_PER_FILE = 1_000
PARTS_MAX = 4
#: A result produced faster than any reader takes it: its stream stalls on a reader that pauses.
ENDLESS_SQL = "select s.id, r.i from stall s, range(10000000000) r(i)"
CANCELLED = sql.ActionCancelQueryResult.CANCEL_RESULT_CANCELLED
NOT_CANCELLABLE = sql.ActionCancelQueryResult.CANCEL_RESULT_NOT_CANCELLABLE
#: Queries over the multi-file dataset that are not row by row (the parse-tree decision is tested in full
#: below, without a server), and one over a single file: each is answered as one endpoint.
WHOLE_QUERIES = [
    "select count(*) as n from multi",
    "select distinct id % 7 as k from multi",
    "select id from multi order by id limit 10",
    "select sum(id) over () as s from multi",
    "select * from multi a join multi b using (id)",
    "with m as (select * from multi) select * from m",
    "select weighted_avg(id, id) as w from multi",
    "select * from single",
]


def command_info(client: flight.FlightClient, query: str) -> flight.FlightInfo:
    """GetFlightInfo of a Flight SQL statement."""
    descriptor = flight.FlightDescriptor.for_command(pack(sql.CommandStatementQuery(query=query)))
    return client.get_flight_info(descriptor)


def read_endpoints(location: str, info: flight.FlightInfo) -> list[pa.Table]:
    """Every endpoint of ``info``, each read on a thread and connection of its own."""

    def read(endpoint: flight.FlightEndpoint) -> pa.Table:
        with flight.connect(location) as client:
            return client.do_get(endpoint.ticket).read_all()

    with ThreadPoolExecutor(len(info.endpoints)) as pool:
        return list(pool.map(read, info.endpoints))


def cancel_flight_info(client: flight.FlightClient, info: flight.FlightInfo | bytes) -> int:
    """The CancelFlightInfo action: a ``CancelFlightInfoRequest {FlightInfo info = 1}``; the status of its
    ``CancelFlightInfoResult {CancelStatus status = 1}``."""
    raw = info if isinstance(info, bytes) else info.serialize()
    body = b"\x0a" + varint(len(raw)) + raw
    [result] = client.do_action(flight.Action("CancelFlightInfo", body))
    reply = result.body.to_pybytes()
    assert reply[:1] == b"\x08" and len(reply) == 2, reply
    return reply[1]


def cancel_query(client: flight.FlightClient, info: flight.FlightInfo) -> int:
    """The Flight SQL CancelQuery action (an ``Any`` both ways)."""
    body = pack(sql.ActionCancelQueryRequest(info=info.serialize()))
    [result] = client.do_action(flight.Action("CancelQuery", body))
    packed = sql.ActionCancelQueryResult()
    assert any_pb2.Any.FromString(result.body.to_pybytes()).Unpack(packed)
    return packed.result


def read_whole(reader: flight.FlightStreamReader) -> pa.Table:
    """A DoGet stream read chunk by chunk: ``read_all`` answers a CANCELLED status by simulating a SIGINT
    in the main thread (pyarrow's signal handling), which would interrupt the tests."""
    batches = []
    while True:
        try:
            batches.append(reader.read_chunk().data)
        except StopIteration:
            return pa.Table.from_batches(batches, reader.schema)


def varint(value: int) -> bytes:
    """``value`` as a protobuf varint."""
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def handle_of(info: flight.FlightInfo, index: int = 0) -> dict:
    """The JSON statement handle in an endpoint's ticket."""
    return json.loads(ticket_handle(info.endpoints[index].ticket.ticket))


def ticket_handle(raw: bytes) -> bytes:
    """The statement handle of a packed TicketStatementQuery."""
    ticket = sql.TicketStatementQuery()
    assert any_pb2.Any.FromString(raw).Unpack(ticket)
    return ticket.statement_handle


def statement_ticket(handle: dict | bytes) -> flight.Ticket:
    """A TicketStatementQuery with ``handle`` (a dict is written as JSON)."""
    raw = handle if isinstance(handle, bytes) else json.dumps(handle).encode()
    return flight.Ticket(pack(sql.TicketStatementQuery(statement_handle=raw)))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server splitting into at most PARTS_MAX parts, with ``multi`` (FILES files, one per DoPut),
    ``single`` (one file) and ``stall`` (a few rows)."""
    process = ServerProcess(
        str(tmp_path_factory.mktemp("parts") / "lakehouse"), env={"LAKEHOUSE_QUERY_PARTS_MAX": str(PARTS_MAX)}
    )
    try:
        process.start()
        for index in range(FILES):
            ids = range(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE)
            process.put("multi", pa.table({"id": pa.array(ids, pa.int64()), "v": [f"v{i}" for i in ids]}))
        process.put("single", pa.table({"id": pa.array(range(100), pa.int64())}))
        yield process
    finally:
        process.stop()
        process.kill()


# -- what splits -----------------------------------------------------------------------------------------

ROW_LOCAL = [
    "select * from t",
    "from t",
    "select a, b + 1 as c from t where a > 1 and b is not null",
    "select * from lakehouse.main.t",
    "select t.a from t as t",
    "select unnest(l), upper(s), random() from t",
    "select * exclude (a) from t",
    "select columns('a.*') from t",
    "select [x + 1 for x in l], list_sum(l) from t",
    "select case when a > 1 then 'x' end from t where a in (1, 2)",
]
NOT_ROW_LOCAL = [
    "select count(*) from t",
    "select list(a) from t",
    "select min(a) filter (where a > 1) from t",
    "select geometric_mean(a) from t",
    "select json_group_array(a) from t",
    "select distinct a from t",
    "select distinct on (a) a, b from t",
    "select a from t order by a",
    "select a from t limit 5",
    "select a from t offset 5",
    "select a from t group by a",
    "select a from t group by all",
    "select a from t group by a having count(*) > 1",
    "select sum(a) over () from t",
    "select a from t qualify row_number() over () = 1",
    "select a from t union all select a from t",
    "select a from t except select a from t",
    "with x as (select * from t) select * from x",
    "select * from (select * from t)",
    "select * from t, u",
    "select * from t join u using (a)",
    "select * from t where a in (select a from u)",
    "select (select 1) from t",
    "select exists (select 1) from t",
    "select * from t using sample 10",
    "select * from t tablesample 10%",
    "select * from t at (version => 1)",
    "select * from t as x(c1, c2)",
    "select * from range(10)",
    "select 1",
    "pivot t on a in (1) using sum(b)",
    "select a from t; select 1",
]


@pytest.mark.parametrize("query", ROW_LOCAL)
def test_row_local_queries(query: str) -> None:
    with duckdb.connect() as connection:
        assert row_local(serialize(connection, query)) == "t"


@pytest.mark.parametrize("query", NOT_ROW_LOCAL)
def test_queries_that_are_not_row_local(query: str) -> None:
    with duckdb.connect() as connection:
        assert row_local(serialize(connection, query)) is None


def test_parts_split_the_files_once() -> None:
    """At most ``most`` parts, none empty, disjoint, together every file once; one file or ``most`` 1: no
    parts."""
    files = tuple(f"f{i}" for i in range(7))
    for most in range(2, 10):
        found = parts("t", 1, len(files), most)
        assert len(found) == min(most, len(files))
        shares = [part.files(files) for part in found]
        assert all(shares) and sorted(f for share in shares for f in share) == sorted(files)
    assert parts("t", 1, 1, 8) == [] and parts("t", 1, 5, 1) == []
    with pytest.raises(ValueError):
        Part(dataset="t", snapshot_id=1, index=2, count=2)


# -- several endpoints -----------------------------------------------------------------------------------


def test_adbc_partitions_hold_every_row_once(server: ServerProcess) -> None:
    """``adbc_execute_partitions`` of a filter over FILES files gives PARTS_MAX partitions; read in parallel
    threads (a connection each), they hold every matching row exactly once, in the one announced schema."""
    query = "select id, upper(v) as v from multi where id % 3 <> 0"
    with dbapi.connect(server.location) as conn, conn.cursor() as cursor:
        partitions, schema = cursor.adbc_execute_partitions(query)
    assert len(partitions) == PARTS_MAX

    def read(partition: bytes) -> pa.Table:
        with dbapi.connect(server.location) as conn, conn.cursor() as cursor:
            cursor.adbc_read_partition(partition)
            return cursor.fetch_arrow_table()

    with ThreadPoolExecutor(len(partitions)) as pool:
        tables = list(pool.map(read, partitions))
    ids = [i for table in tables for i in table.column("id").to_pylist()]
    expected = [i for i in range(FILES * ROWS_PER_FILE) if i % 3]
    assert len(ids) == len(expected) and sorted(ids) == expected
    assert all(table.num_rows > 0 and table.schema.equals(tables[0].schema) for table in tables)
    assert pa.schema(schema).names == ["id", "v"] and tables[0].schema.names == ["id", "v"]
    assert {v for table in tables for v in table.column("v").to_pylist()} == {f"V{i}" for i in expected}


def test_adbc_execute_reads_every_part(server: ServerProcess) -> None:
    """A plain ``execute`` of a split query reads every endpoint: the whole result, each row once."""
    with dbapi.connect(server.location) as conn, conn.cursor() as cursor:
        cursor.execute("select * from lakehouse.main.multi")
        ids = cursor.fetch_arrow_table().column("id").to_pylist()
    assert sorted(ids) == list(range(FILES * ROWS_PER_FILE))


def test_parts_on_each_storage(start_server: Callable[..., ServerProcess]) -> None:
    """On a local root and on S3, each part reads its own files (the database of a part may read only
    those): three files, three parts, every row once."""
    server = start_server()
    for index in range(3):
        server.put("trio", pa.table({"id": pa.array([2 * index, 2 * index + 1], pa.int64())}))
    info = command_info(server.client, "select id * 10 as x from trio where id <> 3")
    assert len(info.endpoints) == 3
    tables = read_endpoints(server.location, info)
    assert sorted(x for table in tables for x in table.column("x").to_pylist()) == [0, 10, 20, 40, 50]
    assert all(table.num_rows for table in tables)


def test_parts_pin_one_snapshot(server: ServerProcess) -> None:
    """Each endpoint's ticket names the snapshot and its part; a commit after GetFlightInfo is not seen, and
    the parts split the files (at most one part per file)."""
    server.put("pinned", pa.table({"id": pa.array([0, 1], pa.int64())}))
    server.put("pinned", pa.table({"id": pa.array([2, 3], pa.int64())}))
    server.put("pinned", pa.table({"id": pa.array([4], pa.int64())}))
    info = command_info(server.client, "select id from pinned")
    assert len(info.endpoints) == 3
    handles = [handle_of(info, index) for index in range(3)]
    assert len({handle["id"] for handle in handles}) == 1
    assert {handle["part"]["snapshot_id"] for handle in handles} == {handles[0]["part"]["snapshot_id"]}
    assert sorted(handle["part"]["index"] for handle in handles) == [0, 1, 2]
    server.put("pinned", pa.table({"id": pa.array([5], pa.int64())}))
    tables = read_endpoints(server.location, info)
    assert sorted(i for table in tables for i in table.column("id").to_pylist()) == [0, 1, 2, 3, 4]
    assert all(table.num_rows for table in tables)


@pytest.mark.parametrize("query", WHOLE_QUERIES)
def test_other_queries_answer_one_endpoint(server: ServerProcess, query: str) -> None:
    """Aggregates, DISTINCT, ORDER BY, LIMIT, windows, set operations, joins, subqueries, CTEs, samples and
    single-file datasets: one endpoint, as before."""
    info = command_info(server.client, query)
    assert len(info.endpoints) == 1
    assert "part" not in handle_of(info)
    server.client.do_get(info.endpoints[0].ticket).read_all()


def test_results_of_split_and_whole_queries_agree(server: ServerProcess) -> None:
    """The count of a whole query equals the rows of the split one."""
    count = command_info(server.client, "select count(*) as n from multi where v like 'v1%'")
    split = command_info(server.client, "select v from multi where v like 'v1%'")
    assert len(split.endpoints) == PARTS_MAX
    rows = sum(table.num_rows for table in read_endpoints(server.location, split))
    assert server.client.do_get(count.endpoints[0].ticket).read_all().to_pylist() == [{"n": rows}]


def test_files_of_different_columns_are_not_split(server: ServerProcess) -> None:
    """A dataset whose files hold different columns (an evolved schema) is answered whole, so every row
    has every column."""
    server.put("evolved", pa.table({"a": pa.array([1], pa.int64())}))
    server.put("evolved", pa.table({"a": pa.array([2], pa.int64()), "b": ["x"]}), schema_mode="evolve")
    info = command_info(server.client, "select * from evolved")
    assert len(info.endpoints) == 1
    table = server.client.do_get(info.endpoints[0].ticket).read_all()
    assert sorted(table.to_pylist(), key=lambda row: row["a"]) == [{"a": 1, "b": None}, {"a": 2, "b": "x"}]


def test_forged_part_tickets_are_refused(server: ServerProcess) -> None:
    """Every field of a part ticket is checked: a part index or count that does not fit the snapshot, a
    snapshot that does not exist, another dataset or a query that is not row by row are refused cleanly;
    a dropped dataset is NOT_FOUND."""
    info = command_info(server.client, "select id from multi")
    handle = handle_of(info)
    part = handle["part"]
    invalid = [
        {**handle, "part": {**part, "index": part["count"]}},
        {**handle, "part": {**part, "index": -1}},
        {**handle, "part": {**part, "count": FILES + 1, "index": FILES}},
        {**handle, "part": {**part, "count": 1, "index": 0}},
        {**handle, "part": {**part, "count": "2"}},
        {**handle, "part": {**part, "dataset": "single"}},
        {**handle, "part": {**part, "dataset": "../x"}},
        {**handle, "part": {**part, "extra": 1}},
        {**handle, "sql": "select count(*) from multi"},
        {**handle, "sql": "select id from multi order by id"},
        {**handle, "sql": "select id from single"},
        {**handle, "id": "not-hex"},
        {**handle, "part": {**part, "snapshot_id": 2**70}},
        b"\xff\xfe not json",
        b"[1, 2]",
    ]
    for forged in invalid:
        with pytest.raises(pa.ArrowInvalid) as refused:
            server.client.do_get(statement_ticket(forged)).read_all()
        assert_clean(refused.value, server.root)
    with pytest.raises(pa.ArrowKeyError) as missing:
        server.client.do_get(statement_ticket({**handle, "part": {**part, "snapshot_id": 1}})).read_all()
    assert "snapshot 1 not found" in assert_clean(missing.value, server.root)
    server.put("doomed", pa.table({"id": pa.array([1], pa.int64())}))
    server.put("doomed", pa.table({"id": pa.array([2], pa.int64())}))
    doomed = command_info(server.client, "select * from doomed")
    assert len(doomed.endpoints) == 2
    server.action("drop_dataset", {"dataset": "doomed"})
    with pytest.raises(pa.ArrowKeyError) as dropped:
        server.client.do_get(doomed.endpoints[0].ticket).read_all()
    assert "doomed" in assert_clean(dropped.value, server.root)
    assert len(server.sql("select * from multi")) == FILES * ROWS_PER_FILE


# -- cancellation ----------------------------------------------------------------------------------------


class Fetch:
    """A DoGet of one endpoint on a thread and connection of its own; ``error`` is how it ended."""

    def __init__(self, location: str, ticket: flight.Ticket) -> None:
        self.error: BaseException | None = None
        self.ended = threading.Event()
        self._client = flight.connect(location)
        self._thread = threading.Thread(target=self._read, args=(ticket,), daemon=True)
        self._thread.start()

    def _read(self, ticket: flight.Ticket) -> None:
        try:
            read_whole(self._client.do_get(ticket))
        except BaseException as exc:
            self.error = exc
        finally:
            self.ended.set()

    def close(self) -> None:
        self._thread.join(30)
        self._client.close()


def assert_server_idles(server: ServerProcess, busy: float) -> None:
    """The server's CPU drops after a cancel (its DuckDB work was interrupted)."""
    process = psutil.Process(server.pid)
    time.sleep(0.5)
    after = process.cpu_percent(1.0)
    assert busy > 25, f"the query did not load the server ({busy}%)"
    assert after < 50 and after < busy / 2, f"server still busy after the cancel: {after}% (was {busy}%)"


@pytest.mark.parametrize(
    ("query", "cancel"),
    [(HEAVY_SQL, cancel_flight_info), (SLOW_SECOND_BATCH_SQL, cancel_query)],
    ids=["CancelFlightInfo_before_first_batch", "CancelQuery_mid_stream"],
)
def test_cancel_stops_a_running_query(
    server: ServerProcess, query: str, cancel: Callable[[flight.FlightClient, flight.FlightInfo], int]
) -> None:
    """A cancel answers CANCELLED; the DoGet ends with CANCELLED within a fraction of a second and the
    server stops working on it; the server answers afterwards."""
    info = command_info(server.client, query)
    fetch = Fetch(server.location, info.endpoints[0].ticket)
    try:
        busy = psutil.Process(server.pid).cpu_percent(1.0)
        assert not fetch.ended.is_set()
        started = time.monotonic()
        assert cancel(server.client, info) == CANCELLED
        assert fetch.ended.wait(5)
        elapsed = time.monotonic() - started
    finally:
        fetch.close()
    assert isinstance(fetch.error, flight.FlightCancelledError), fetch.error
    assert elapsed < 1.0, elapsed
    assert "cancelled" in assert_clean(fetch.error, server.root)
    assert_server_idles(server, busy)
    assert server.sql("select 42 as x").to_pylist() == [{"x": 42}]


def test_cancel_stops_a_stream_stalled_by_its_reader(server: ServerProcess) -> None:
    """A stream whose reader pauses (its batches wait on gRPC) is stopped too: its lease goes at once (the
    files of its dropped dataset are deleted while the reader still pauses) and the reader, resuming,
    gets what was already sent and then CANCELLED."""
    server.put("stall", pa.table({"id": pa.array([1, 2, 3], pa.int64())}))
    stall_files = lambda: {f for f in data_files(server.root) if "/tables/stall/" in f}  # noqa: E731
    assert stall_files()
    info = command_info(server.client, ENDLESS_SQL)
    with flight.connect(server.location) as client:
        reader = client.do_get(info.endpoints[0].ticket)
        rows = reader.read_chunk().data.num_rows
        time.sleep(1.0)  # the server fills its buffers and waits on the reader
        assert cancel_flight_info(server.client, info) == CANCELLED
        server.action("drop_dataset", {"dataset": "stall"})
        assert wait_until(lambda: not stall_files(), timeout=5), "the stalled query still holds its lease"
        with pytest.raises(flight.FlightCancelledError):
            while True:
                rows += reader.read_chunk().data.num_rows
    assert rows < 100_000_000, rows
    assert server.sql("select 42 as x").to_pylist() == [{"x": 42}]


def test_cancel_before_fetch_refuses_every_part(server: ServerProcess) -> None:
    """A statement cancelled before its DoGet: each of its tickets is refused with CANCELLED."""
    info = command_info(server.client, "select * from multi")
    assert len(info.endpoints) == PARTS_MAX
    assert cancel_flight_info(server.client, info) == CANCELLED
    for endpoint in info.endpoints:
        with pytest.raises(flight.FlightCancelledError) as refused:
            read_whole(server.client.do_get(endpoint.ticket))
        assert "cancelled" in assert_clean(refused.value, server.root)
    fresh = command_info(server.client, "select * from multi")
    assert sum(table.num_rows for table in read_endpoints(server.location, fresh)) == FILES * ROWS_PER_FILE


def test_cancel_of_one_partition_cancels_the_statement(server: ServerProcess) -> None:
    """An ADBC partition is a FlightInfo of one endpoint: cancelling it cancels the whole statement (its
    parts share one query id)."""
    with dbapi.connect(server.location) as conn, conn.cursor() as cursor:
        partitions, _ = cursor.adbc_execute_partitions("select id from multi")
    assert cancel_flight_info(server.client, partitions[0]) == CANCELLED
    info = flight.FlightInfo.deserialize(partitions[-1])
    with pytest.raises(flight.FlightCancelledError):
        read_whole(server.client.do_get(info.endpoints[0].ticket))


def test_cancel_of_a_finished_or_unknown_query(server: ServerProcess) -> None:
    """A finished statement: CANCELLED (its tickets are refused from now on). A statement ticket never
    issued: CANCELLED too (tickets are stateless; the id is remembered). FlightInfos without a statement
    (metadata, JSON tickets): NOT_CANCELLABLE."""
    info = command_info(server.client, "select 1 as x")
    assert server.client.do_get(info.endpoints[0].ticket).read_all().to_pylist() == [{"x": 1}]
    assert cancel_flight_info(server.client, info) == CANCELLED
    with pytest.raises(flight.FlightCancelledError):
        read_whole(server.client.do_get(info.endpoints[0].ticket))
    unknown = {"id": "0" * 32, "sql": "select 2"}
    forged = flight.FlightInfo(
        pa.schema([]),
        flight.FlightDescriptor.for_command(b"x"),
        [flight.FlightEndpoint(statement_ticket(unknown), [])],
    )
    assert cancel_flight_info(server.client, forged) == CANCELLED
    catalogs = server.client.get_flight_info(
        flight.FlightDescriptor.for_command(pack(sql.CommandGetCatalogs()))
    )
    assert cancel_flight_info(server.client, catalogs) == NOT_CANCELLABLE
    assert cancel_query(server.client, catalogs) == NOT_CANCELLABLE
    json_sql = server.client.get_flight_info(flight.FlightDescriptor.for_command(b'{"sql": "select 1"}'))
    assert cancel_flight_info(server.client, json_sql) == NOT_CANCELLABLE


@pytest.mark.parametrize(
    "body",
    [b"", b"\xff\xff", b"\x0a\x05abcde", b"\x0a\x02\x08\x01", b"\x0a\x64short"],
    ids=["empty", "garbage", "not_a_flight_info", "no_descriptor", "cut_off"],
)
def test_malformed_cancel_requests_are_refused(server: ServerProcess, body: bytes) -> None:
    with pytest.raises(pa.ArrowInvalid) as refused:
        list(server.client.do_action(flight.Action("CancelFlightInfo", body)))
    assert_clean(refused.value, server.root)


def test_cancel_with_a_forged_statement_handle_is_refused(server: ServerProcess) -> None:
    forged = flight.FlightInfo(
        pa.schema([]),
        flight.FlightDescriptor.for_command(b"x"),
        [flight.FlightEndpoint(statement_ticket(b"not json"), [])],
    )
    with pytest.raises(pa.ArrowInvalid) as refused:
        cancel_flight_info(server.client, forged)
    assert "statement handle" in assert_clean(refused.value, server.root)
    with pytest.raises(pa.ArrowInvalid):
        list(server.client.do_action(flight.Action("CancelQuery", b"\x0anot an any")))


def test_adbc_cancel_stops_the_query(server: ServerProcess) -> None:
    """``cursor.adbc_cancel()`` (the Go driver cancels its gRPC calls) stops a running query: the fetch
    fails with a cancel and the server stops working on it."""
    errors: list[BaseException] = []
    with dbapi.connect(server.location) as conn, conn.cursor() as cursor:

        def run() -> None:
            try:
                cursor.execute(HEAVY_SQL)
                cursor.fetchall()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        busy = psutil.Process(server.pid).cpu_percent(1.0)
        cursor.adbc_cancel()
        thread.join(10)
        assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], AdbcError), errors
    assert "cancel" in str(errors[0]).lower(), errors[0]
    assert_server_idles(server, busy)


def test_cancel_actions_are_listed_and_sql_info_says_so(server: ServerProcess) -> None:
    listed = dict(server.client.list_actions())
    assert "CancelFlightInfo" in listed and "CancelQuery" in listed
    with dbapi.connect(server.location) as conn:
        info = conn.adbc_get_info()
    assert info["vendor_name"] == "flight-lakehouse"
    descriptor = flight.FlightDescriptor.for_command(
        pack(sql.CommandGetSqlInfo(info=[sql.FLIGHT_SQL_SERVER_CANCEL]))
    )
    ticket = server.client.get_flight_info(descriptor).endpoints[0].ticket
    [row] = server.client.do_get(ticket).read_all().to_pylist()
    assert row["info_name"] == sql.FLIGHT_SQL_SERVER_CANCEL and row["value"] is True
