"""Parallel endpoints over several servers of one root (issue 21, point 3).

Three ``serve`` processes share one local root and one SQLite catalog file; they find each other in the
catalog's ``lakehouse_servers`` table by heartbeats. GetFlightInfo of a query or scan that reads one
dataset's files row by row answers one endpoint per part, the parts dealt round-robin over the live servers
(the answering server first), each endpoint naming its server. Reading every endpoint from its own location
gives every row exactly once, by pyarrow and by ADBC's ``execute_partitions``; a part ticket is
self-contained (any server answers it, at the snapshot it names) and checked as hostile on every server; a
server that stops is dropped from new FlightInfos.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from sqlalchemy import create_engine, inspect, text

from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.auth import AuthFile
from flight_lakehouse.peers import SERVERS as REGISTRY
from flight_lakehouse.peers import Peers, advertised_location
from flight_lakehouse.protocol import pack
from flight_lakehouse.settings import Settings, SettingsError
from tests.conftest import (
    ServerProcess,
    assert_refusal,
    postgres_catalog,
    register_catalog,
    register_s3_root,
    wait_until,
)
from tests.seaweedfs import SeaweedFS

SERVERS = 3
FILES = 6
ROWS_PER_FILE = 2_000
HEARTBEAT_SECONDS = 0.5
#: Three heartbeats (a server silent that long is stale), the registry's cache and a margin for a loaded box.
DROP_BOUND_SECONDS = 3 * HEARTBEAT_SECONDS + 1.0 + 3.0


def command(body: dict) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(json.dumps(body).encode())


def statement(query: str) -> flight.FlightDescriptor:
    return flight.FlightDescriptor.for_command(pack(sql.CommandStatementQuery(query=query)))


def locations(info: flight.FlightInfo) -> list[str]:
    """The location of each endpoint ('' for none)."""
    return [endpoint.locations[0].uri.decode() if endpoint.locations else "" for endpoint in info.endpoints]


def read_from_locations(info: flight.FlightInfo) -> list[pa.Table]:
    """Every endpoint read in parallel, each from the server its location names (a client per endpoint)."""

    def read(endpoint: flight.FlightEndpoint) -> pa.Table:
        with flight.connect(endpoint.locations[0]) as client:
            return client.do_get(endpoint.ticket).read_all()

    with ThreadPoolExecutor(len(info.endpoints)) as pool:
        return list(pool.map(read, info.endpoints))


def sorted_rows(tables: list[pa.Table]) -> list[tuple]:
    return sorted(row for table in tables for row in zip(*table.to_pydict().values(), strict=True))


def start_cluster(root: str, count: int, *args: str) -> list[ServerProcess]:
    """``count`` servers on ``root`` and one catalog (``--catalog-uri`` in ``args``, or the root's
    registered one), started in parallel."""
    env = {"LAKEHOUSE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS), "LAKEHOUSE_QUERY_PARTS_MAX": str(FILES)}
    servers = [ServerProcess(root, list(args), env) for _ in range(count)]
    try:
        with ThreadPoolExecutor(count) as pool:
            list(pool.map(ServerProcess.start, servers))
    except BaseException:
        stop_all(servers)
        raise
    return servers


def stop_all(servers: list[ServerProcess]) -> None:
    for server in servers:
        server.stop()
        server.kill()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[ServerProcess]]:
    """Three servers on one root and one SQLite catalog; ``big`` has FILES files (one per DoPut)."""
    base = tmp_path_factory.mktemp("endpoints")
    root, catalog = str(base / "lakehouse"), f"sqlite:///{(base / 'catalog.db').as_posix()}"
    Path(root).mkdir()
    servers = start_cluster(root, SERVERS, "--catalog-uri", catalog)
    try:
        fill(servers)
        yield servers
    finally:
        stop_all(servers)


def fill(servers: list[ServerProcess]) -> None:
    """``big``: FILES files (one DoPut each, through the servers in turn), seen by every server with every
    server live."""
    for index in range(FILES):
        ids = range(index * ROWS_PER_FILE, (index + 1) * ROWS_PER_FILE)
        servers[index % len(servers)].put(
            "big", pa.table({"id": pa.array(ids, pa.int64()), "v": [f"v{i}" for i in ids]})
        )
    everyone = {server.location for server in servers}
    for server in servers:
        path_info = functools.partial(server.client.get_flight_info, flight.FlightDescriptor.for_path("big"))
        assert wait_until(lambda info=path_info: set(locations(info())) == everyone, timeout=10)


QUERIES = [
    flight.FlightDescriptor.for_path("big"),
    command({"sql": "select id, upper(v) as v from big where id % 3 <> 0"}),
    command({"dataset": "big", "columns": ["id"], "filter": "id >= 100"}),
]


@pytest.mark.parametrize("descriptor", QUERIES, ids=["path", "sql", "scan"])
def test_endpoints_spread_over_every_server(cluster: list[ServerProcess], descriptor) -> None:
    """On each server, a split path, SQL or scan FlightInfo names every live server, itself first, one part
    per file; read each from its location, the parts hold exactly the rows of one whole DoGet."""
    whole = None
    for server in cluster:
        info = server.client.get_flight_info(descriptor)
        found = locations(info)
        assert len(found) == FILES and found[0] == server.location
        assert set(found) == {s.location for s in cluster}
        assert [found.count(s.location) for s in cluster] == [FILES // SERVERS] * SERVERS
        tables = read_from_locations(info)
        assert all(table.num_rows and table.schema.equals(info.schema) for table in tables)
        if whole is None:
            body = json.loads(info.endpoints[0].ticket.ticket)
            whole = server.sql(body["sql"])  # the part's query, unsplit, in one DoGet
        assert sorted_rows(tables) == sorted_rows([whole])
    assert whole is not None and whole.num_rows > ROWS_PER_FILE


def test_adbc_partitions_read_from_every_server(cluster: list[ServerProcess]) -> None:
    """ADBC ``execute_partitions`` on one server gives a partition per part, naming all three servers;
    ``read_partition`` fetches each (the driver connects to its location), every row exactly once."""
    query = "select id, v from lakehouse.main.big where id % 7 <> 1"
    with dbapi.connect(cluster[1].location) as conn, conn.cursor() as cursor:
        partitions, _ = cursor.adbc_execute_partitions(query)
    # a partition is a serialised FlightInfo of one endpoint
    endpoints = [flight.FlightInfo.deserialize(part).endpoints[0] for part in partitions]
    assert len(partitions) == FILES and {loc.uri.decode() for e in endpoints for loc in e.locations} == {
        s.location for s in cluster
    }

    def read(partition: bytes) -> pa.Table:
        with dbapi.connect(cluster[1].location) as conn, conn.cursor() as cursor:
            cursor.adbc_read_partition(partition)
            return cursor.fetch_arrow_table()

    before = [statement_gets(server) for server in cluster]
    with ThreadPoolExecutor(len(partitions)) as pool:
        tables = list(pool.map(read, partitions))
    ids = sorted(i for table in tables for i in table.column("id").to_pylist())
    assert ids == [i for i in range(FILES * ROWS_PER_FILE) if i % 7 != 1]
    # each server answered the partitions naming it (the driver connected to their locations)
    served = [statement_gets(server) - seen for server, seen in zip(cluster, before, strict=True)]
    assert served == [FILES // SERVERS] * SERVERS


def statement_gets(server: ServerProcess) -> float:
    """How many Flight SQL statement tickets a server answered (its Prometheus counter)."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    pattern = r'^flight_lakehouse_calls_total\{[^}]*call="TicketStatementQuery"[^}]*rpc="DoGet"[^}]*\} (\S+)$'
    return sum(float(value) for value in re.findall(pattern, text, re.MULTILINE))


def test_a_part_reads_its_snapshot_on_any_server(cluster: list[ServerProcess]) -> None:
    """A commit on another server after GetFlightInfo is not seen by the parts: each names the snapshot,
    and every server reads that snapshot's files."""
    cluster[0].put("pinned", pa.table({"id": pa.array([0, 1], pa.int64())}))
    cluster[1].put("pinned", pa.table({"id": pa.array([2], pa.int64())}))
    cluster[2].put("pinned", pa.table({"id": pa.array([3, 4], pa.int64())}))
    info = cluster[2].client.get_flight_info(statement("select id from pinned"))
    assert len(info.endpoints) == 3 and set(locations(info)) == {s.location for s in cluster}
    cluster[0].put("pinned", pa.table({"id": pa.array([5], pa.int64())}))
    tables = read_from_locations(info)
    assert sorted(i for table in tables for i in table.column("id").to_pylist()) == [0, 1, 2, 3, 4]


def forged(ticket: dict) -> list[dict]:
    """Tampered copies of a ``{"sql", "part"}`` ticket."""
    part = ticket["part"]
    return [
        {**ticket, "part": {**part, "index": part["count"]}},
        {**ticket, "part": {**part, "count": FILES + 1, "index": FILES}},
        {**ticket, "part": {**part, "snapshot_id": part["snapshot_id"] + 1}},
        {**ticket, "part": {**part, "dataset": "pinned"}},
        {**ticket, "part": {**part, "extra": 1}},
        {**ticket, "sql": "select count(*) from big"},
        {**ticket, "sql": "select * from pinned"},
        {**ticket, "sql": "select * from read_parquet('/etc/passwd')"},
    ]


def test_forged_part_tickets_are_refused_on_every_server(cluster: list[ServerProcess]) -> None:
    """A part ticket is not signed but checked in full wherever it is sent: a part that does not fit the
    snapshot, a snapshot the dataset does not have, another dataset, a query that is not row by row or that
    reads files outside the root are refused on every server, cleanly."""
    info = cluster[0].client.get_flight_info(command({"sql": "select * from big"}))
    ticket = json.loads(info.endpoints[0].ticket.ticket)
    for server in cluster:
        for body in forged(ticket):
            with pytest.raises((pa.ArrowInvalid, pa.ArrowKeyError)) as exc:  # INVALID_ARGUMENT, NOT_FOUND
                server.ticket(body)
            assert_refusal(exc, server)


def test_a_stopped_server_is_dropped(cluster: list[ServerProcess]) -> None:
    """A server killed (no goodbye) leaves new FlightInfos within three heartbeats (at the next one: its
    port refuses connections); one stopped cleanly deletes its row. Alone, the last one answers as a
    single server does: a JSON path FlightInfo is one endpoint, a Flight SQL split keeps its parts
    without locations. Runs last: it stops the cluster."""
    first, second, third = cluster
    descriptor = flight.FlightDescriptor.for_path("big")
    os.kill(third.pid, signal.SIGKILL)
    third.process.wait(10)  # type: ignore[union-attr]
    started = time.monotonic()
    assert wait_until(
        lambda: third.location not in locations(first.client.get_flight_info(descriptor)),
        timeout=DROP_BOUND_SECONDS,
    )
    assert time.monotonic() - started < DROP_BOUND_SECONDS
    info = first.client.get_flight_info(descriptor)
    assert set(locations(info)) == {first.location, second.location}
    assert len(sorted_rows(read_from_locations(info))) == FILES * ROWS_PER_FILE
    second.stop()
    assert wait_until(lambda: len(first.client.get_flight_info(descriptor).endpoints) == 1, timeout=3)
    alone = first.client.get_flight_info(statement("select id from big"))
    assert len(alone.endpoints) == FILES and set(locations(alone)) == {""}


def test_a_token_from_one_server_works_on_the_others(tmp_path: Path) -> None:
    """Servers sharing one auth file share its signing key: a bearer token from a login on one server
    fetches the endpoints it named on another (by pyarrow, and by ADBC logged in on the first), within the
    caller's grants there too (a part ticket of a
    dataset the caller cannot see is NOT_FOUND on every server, whoever answered its FlightInfo)."""
    auth = AuthFile(tmp_path / "auth.json")
    auth.add_user("writer", "writer-password-1", "writer")
    auth.add_user("sales", "sales-password-1", "reader", ["sales_*"])
    root, catalog = str(tmp_path / "lakehouse"), f"sqlite:///{(tmp_path / 'catalog.db').as_posix()}"
    args = ["--catalog-uri", catalog, "--auth-file", str(tmp_path / "auth.json")]
    servers = [
        ServerProcess(root, args, {"LAKEHOUSE_HEARTBEAT_SECONDS": str(HEARTBEAT_SECONDS)}) for _ in "ab"
    ]
    try:
        for server in servers:
            server.start()
        first, second = servers
        writer, sales = (
            flight.FlightCallOptions(
                headers=[first.client.authenticate_basic_token(user, f"{user}-password-1")]
            )
            for user in ("writer", "sales")
        )
        for name in ("sales_q1", "secret"):
            for index in range(2):
                descriptor = flight.FlightDescriptor.for_path(name)
                put, result = first.client.do_put(descriptor, pa.schema([("id", pa.int64())]), writer)
                with put:
                    put.write_table(pa.table({"id": pa.array([2 * index, 2 * index + 1], pa.int64())}))
                    put.done_writing()
                    result.read()
        path = flight.FlightDescriptor.for_path("sales_q1")
        assert wait_until(lambda: len(set(locations(first.client.get_flight_info(path, sales)))) == 2)
        info = first.client.get_flight_info(path, sales)
        ids = [
            i
            for endpoint in info.endpoints
            for i in second.client.do_get(endpoint.ticket, sales).read_all().column("id").to_pylist()
        ]
        assert sorted(ids) == [0, 1, 2, 3]
        # ADBC logs in on the first server and sends the same credentials to the locations it is given
        login = {"username": "sales", "password": "sales-password-1"}
        with dbapi.connect(first.location, db_kwargs=login) as conn, conn.cursor() as cursor:
            partitions, _ = cursor.adbc_execute_partitions("select id from sales_q1")
            named = {
                e.locations[0].uri.decode()
                for p in partitions
                for e in flight.FlightInfo.deserialize(p).endpoints
            }
            assert named == {first.location, second.location}
            ids = []
            for partition in partitions:
                cursor.adbc_read_partition(partition)
                ids += cursor.fetch_arrow_table().column("id").to_pylist()
        assert sorted(ids) == [0, 1, 2, 3]
        hidden = first.client.get_flight_info(flight.FlightDescriptor.for_path("secret"), writer)
        for server in servers:
            with pytest.raises(pa.ArrowKeyError) as exc:
                server.client.do_get(hidden.endpoints[0].ticket, sales).read_all()
            assert_refusal(exc, server, "secret")
    finally:
        stop_all(servers)


def test_on_postgresql_and_s3(request: pytest.FixtureRequest, seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """The same on an S3 root (SeaweedFS) with the catalog on PostgreSQL: the FlightInfo names all three
    servers, each reads its parts (local copies of its own files only), every row once, by pyarrow and
    by ADBC; a killed server is dropped."""
    root = register_s3_root(seaweedfs, tmp_path / "state", "endpoints").url
    register_catalog(root, postgres_catalog(request))
    servers = start_cluster(root, SERVERS)
    query = "select * from big where id % 5 <> 0"
    try:
        fill(servers)
        info = servers[1].client.get_flight_info(command({"sql": query}))
        assert len(info.endpoints) == FILES and locations(info)[0] == servers[1].location
        expected = sorted_rows([servers[0].sql(query)])
        assert sorted_rows(read_from_locations(info)) == expected
        with dbapi.connect(servers[2].location) as conn, conn.cursor() as cursor:
            partitions, _ = cursor.adbc_execute_partitions(query)
        tables = []
        for partition in partitions:
            with dbapi.connect(servers[2].location) as conn, conn.cursor() as cursor:
                cursor.adbc_read_partition(partition)
                tables.append(cursor.fetch_arrow_table())
        assert len(partitions) == FILES and sorted_rows(tables) == expected
        servers[2].kill()
        path = flight.FlightDescriptor.for_path("big")
        two = {server.location for server in servers[:2]}
        assert wait_until(
            lambda: set(locations(servers[0].client.get_flight_info(path))) == two, timeout=DROP_BOUND_SECONDS
        )
    finally:
        stop_all(servers)


# -- the registry and the static list, in this process ----------------------------------------------------


def peers_of(engine, **settings: object) -> Peers:
    """A :class:`Peers` over ``engine`` (a SQLAlchemy engine, or None) with ``settings``."""
    return Peers(Settings(**{"heartbeat_seconds": 0.2, **settings}), engine)  # type: ignore[arg-type]


def test_registry_beats_ignores_stale_rows_and_forgets_a_clean_stop(tmp_path: Path) -> None:
    """Two servers' registries on one SQLite file see each other, themselves first; a row whose heartbeat
    is older than three intervals (a killed server) is ignored and removed, as is a fresh row whose port
    does not answer (killed and restarted elsewhere); a table dropped under them is made again; a clean stop
    deletes the row."""
    engine = create_engine(f"sqlite:///{tmp_path / 'catalog.db'}")
    with listening() as first, listening() as second:
        one = peers_of(engine).start(first)
        two = peers_of(engine).start(second)
        try:
            with engine.begin() as connection:  # killed long ago, and just now (its port closed)
                for location, beat in (("grpc://dead:1", 1.0), ("grpc://127.0.0.1:1", time.time() + 60)):
                    row = {"location": location, "server_id": "x", "started": 0.0, "heartbeat": beat}
                    connection.execute(REGISTRY.insert().values(**row))
            assert wait_until(lambda: one.live_locations() == [first, second], timeout=3)
            assert wait_until(lambda: two.live_locations() == [second, first], timeout=3)
            assert wait_until(lambda: len(rows(engine)) == 3, timeout=3)  # the stale row removed
            with engine.begin() as connection:  # the catalog database rebuilt under running servers
                connection.execute(text("DROP TABLE lakehouse_servers"))
            assert wait_until(
                lambda: inspect(engine).has_table("lakehouse_servers") and len(rows(engine)) == 2
            )
            two.stop()
            assert wait_until(lambda: one.live_locations() == [first], timeout=3)
            assert peers_of(engine).live_locations() == []  # not started
        finally:
            one.stop()
            two.stop()
    assert rows(engine) == []  # both stopped cleanly


@contextlib.contextmanager
def listening() -> Iterator[str]:
    """The location of a loopback port that accepts connections (for the block)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield f"grpc://127.0.0.1:{sock.getsockname()[1]}"


def rows(engine) -> list:
    """The registry's rows."""
    with engine.connect() as connection:
        return connection.execute(REGISTRY.select()).fetchall()


def test_static_peers_are_live_while_their_port_answers() -> None:
    """With ``peers``, no registry: a listed server is live while its port accepts a connection."""
    with listening() as me, listening() as up, socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, not listening: connections are refused
        down = f"grpc://127.0.0.1:{closed.getsockname()[1]}"
        peers = peers_of(None, peers=f"{up}, {down},{me}").start(me)
        try:
            assert peers.engine is None and peers.live_locations() == [me, up]
        finally:
            peers.stop()


@pytest.mark.parametrize(
    ("settings", "named"),
    [
        ({"peers": "127.0.0.1"}, "--peers entry"),
        ({"peers": "grpc+tls://127.0.0.1:1"}, "--peers entry"),
        ({"advertise": "http://host:1"}, "--advertise"),
        ({"advertise": "grpc://host"}, "--advertise"),
        ({"advertise": "grpc://host:1/path"}, "--advertise"),
    ],
)
def test_bad_locations_are_refused(settings: dict, named: str) -> None:
    """A peer or advertised location must be ``grpc://HOST:PORT`` (``grpc+tls://`` with TLS)."""
    with pytest.raises(SettingsError, match=named):
        peers_of(None, **settings)


def test_advertised_location() -> None:
    """The bound host and port by default; the machine's name for a wildcard bind; ``advertise`` as is."""
    assert advertised_location(Settings(), 1234) == "grpc://127.0.0.1:1234"
    wildcard = Settings(host="0.0.0.0", insecure_no_auth=True)
    assert advertised_location(wildcard, 1) == f"grpc://{socket.gethostname()}:1"
    assert advertised_location(Settings(advertise="grpc://lake-1:8815"), 1) == "grpc://lake-1:8815"
    assert advertised_location(Settings(advertise="lake-1:8815"), 1) == "grpc://lake-1:8815"
    tls = Settings.model_construct(**{**Settings().model_dump(), "tls_cert": "cert.pem"})
    assert advertised_location(tls, 1) == "grpc+tls://127.0.0.1:1"  # the scheme of the server's TLS
    assert peers_of(None, peers="a:1,grpc://b:2").static == ["grpc://a:1", "grpc://b:2"]
