"""The HTTP side port, through real HTTP clients (urllib, http.client) against a running server: probes,
Arrow over HTTP in three formats compared with Flight DoGet, refusals with the same status classes as on
Flight, authentication, a slow reader, readiness through shutdown."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any, cast

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flight_lakehouse.audit import status_of
from flight_lakehouse.auth import AuthFile
from flight_lakehouse.server import middleware, server_metrics
from flight_lakehouse.settings import Settings
from tests.conftest import (
    ServerProcess,
    root_forms,
    running_server,
    vector_array,
    wait_for_index,
    wait_until,
)
from tests.test_cli import cli

ARROW = "application/vnd.apache.arrow.stream"
CODES = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 503: "UNAVAILABLE"}


@dataclass(frozen=True)
class Answer:
    """An HTTP answer: status, headers, body."""

    status: int
    headers: Message
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def fetch(
    url: str, body: object = None, headers: dict[str, str] | None = None, timeout: float = 30
) -> Answer:
    """One request (POST when there is a body: a dict is sent as JSON, bytes as they are)."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(url, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Answer(error.code, error.headers, error.read())


def query(server: ServerProcess, body: object, accept: str | None = None, **headers: str) -> Answer:
    """``POST /v1/query``."""
    return fetch(f"{server.http_url}/v1/query", body, {**({"Accept": accept} if accept else {}), **headers})


def arrow(answer: Answer) -> pa.Table:
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"] == ARROW
    return pa.ipc.open_stream(answer.body).read_all()


def assert_refused(answer: Answer, server: ServerProcess, status: int, code: str, *fragments: str) -> str:
    """A JSON refusal with this status and code: one line, no traceback, no server path."""
    assert answer.status == status, (answer.status, answer.body)
    body = answer.json()
    assert isinstance(body, dict) and set(body) == {"error", "code"}, body
    assert body["code"] == code, body
    message = body["error"]
    assert "\n" not in message and "Traceback" not in message, message
    for form in root_forms(server.root):
        assert form not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


def mixed(rows: int) -> pa.Table:
    """Ints, floats, strings, booleans and nulls."""
    ids = np.arange(rows)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "score": pa.array(ids * 0.5, pa.float64()),
            "name": pa.array([f'name,{i}\n"q"' if i % 7 == 0 else f"n{i}" for i in ids]),
            "flag": pa.array(ids % 2 == 0),
            "maybe": pa.array([None if i % 3 == 0 else int(i) for i in ids], pa.int64()),
        }
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One local server for the module, with a table and a vector table."""
    with running_server(str(tmp_path_factory.mktemp("http") / "lakehouse")) as process:
        assert process.http_url.startswith("http://127.0.0.1:")
        process.put("mixed", mixed(1000))
        vectors = np.arange(40, dtype=np.float32).reshape(10, 4)
        process.put("vecs", pa.table({"id": pa.array(range(10), pa.int64()), "vec": vector_array(vectors)}))
        yield process


# -- the port and the probes ---------------------------------------------------------------------------


def test_probes_answer(server: ServerProcess) -> None:
    health = fetch(f"{server.http_url}/healthz")
    assert (health.status, health.json()) == (200, {"status": "ok"})
    ready = fetch(f"{server.http_url}/readyz")
    assert (ready.status, ready.json()) == (200, {"status": "ready"})


def test_unknown_endpoints_and_methods_are_json_refusals(server: ServerProcess) -> None:
    assert_refused(fetch(f"{server.http_url}/nowhere"), server, 404, "NOT_FOUND", "/nowhere")
    assert_refused(fetch(f"{server.http_url}/v1/query"), server, 405, "INVALID_ARGUMENT")  # GET
    assert_refused(fetch(f"{server.http_url}/healthz", b"{}"), server, 405, "INVALID_ARGUMENT")


# -- Arrow over HTTP -----------------------------------------------------------------------------------

SQL = "SELECT * FROM mixed ORDER BY id"


def test_query_as_arrow_equals_doget(server: ServerProcess) -> None:
    for accept in (None, ARROW, "*/*", "text/html;q=0.9, application/vnd.apache.arrow.stream"):
        assert arrow(query(server, {"sql": SQL}, accept)).equals(server.sql(SQL))


def test_query_as_json_lines_equals_doget(server: ServerProcess) -> None:
    expected = server.sql(SQL).to_pylist()
    for accept in ("application/x-ndjson", "application/jsonl"):
        answer = query(server, {"sql": SQL}, accept)
        assert answer.status == 200 and answer.headers["Content-Type"] == accept
        assert [json.loads(line) for line in answer.body.decode().splitlines()] == expected


def test_query_as_csv_equals_doget(server: ServerProcess) -> None:
    expected = server.sql(SQL)
    answer = query(server, {"sql": SQL}, "text/csv")
    assert answer.status == 200 and answer.headers["Content-Type"] == "text/csv"
    parsed = pacsv.read_csv(
        pa.py_buffer(answer.body),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=expected.schema),
    )
    assert parsed.equals(expected)


def test_csv_writes_nested_and_binary_cells_as_text(server: ServerProcess) -> None:
    """Lists, structs, maps and vectors as JSON text, binary as base64: what the CLI writes to CSV."""
    sql = (
        "SELECT [1, 2] AS l, {'a': 1, 'b': 'x'} AS s, MAP {'k': 2} AS m, "
        "[0.5, 1.5]::FLOAT[2] AS v, '\\xAB\\x01'::BLOB AS b, NULL::INT[] AS n"
    )
    answer = query(server, {"sql": sql}, "text/csv")
    assert answer.status == 200, answer.body
    assert answer.body.decode().splitlines() == [
        '"l","s","m","v","b","n"',
        '"[1,2]","{""a"":1,""b"":""x""}","[[""k"",2]]","[0.5,1.5]","qwE=",',
    ]


def test_a_large_result_streams_in_batches(server: ServerProcess) -> None:
    sql = "SELECT range AS i, range * 2 AS j FROM range(600000)"
    table = arrow(query(server, {"sql": sql}))
    assert table.num_rows == 600_000 and len(table.to_batches()) > 1
    assert table.equals(server.sql(sql))


def test_scan_and_search_bodies_are_the_doget_tickets(server: ServerProcess) -> None:
    scan = {"dataset": "mixed", "columns": ["id", "name"], "filter": "id < 20", "limit": 5}
    assert arrow(query(server, scan)).equals(server.ticket(scan))
    search = {"search": {"dataset": "vecs", "vector": [1, 2, 3, 4], "k": 3}}
    found = arrow(query(server, search))
    assert found.num_rows == 3 and found.equals(server.ticket(search))


def test_datasets_are_the_list_datasets_action(server: ServerProcess) -> None:
    answer = fetch(f"{server.http_url}/v1/datasets")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("application/json")
    assert answer.json() == server.action("list_datasets")
    assert {entry["name"] for entry in answer.json()} >= {"mixed", "vecs"}


@pytest.mark.parametrize(
    ("body", "status", "fragment"),
    [
        (b"{not json", 400, "not valid UTF-8 JSON"),
        (b"[1, 2]", 400, "must be a JSON object"),
        ({"nothing": 1}, 400, "must have one of the keys"),
        ({"sql": "SELEC oops"}, 400, "syntax error"),
        ({"sql": "SELECT * FROM read_csv('/etc/passwd')"}, 400, ""),
        ({"sql": "COPY mixed TO '/tmp/out.csv'"}, 400, ""),
        ({"sql": "SELECT * FROM missing_table"}, 404, "missing_table"),
        ({"dataset": "missing"}, 404, "missing"),
        ({"dataset": "../etc"}, 400, "invalid dataset name"),
        ({"search": {"dataset": "vecs", "vector": [1, 2], "k": 3}}, 400, ""),
        ({"ingest": {"dataset": "x"}}, 400, "DoPut"),
    ],
)
def test_refusals_have_the_status_class_of_flight(
    server: ServerProcess, body: object, status: int, fragment: str
) -> None:
    ticket = json.dumps(body).encode() if isinstance(body, dict) else body
    with pytest.raises(pa.ArrowException) as refused:
        server.client.do_get(flight.Ticket(ticket)).read_all()
    code = status_of(refused.value)
    assert code == CODES[status], refused.value
    assert_refused(query(server, body), server, status, code, fragment)


def test_oversize_bodies_and_unknown_formats(server: ServerProcess) -> None:
    big = {"sql": "SELECT 1", "pad": "x" * (2 << 20)}
    assert_refused(query(server, big), server, 413, "INVALID_ARGUMENT", "larger than")
    answer = query(server, {"sql": "SELECT 1"}, "text/html")
    assert_refused(answer, server, 406, "INVALID_ARGUMENT", "text/html")
    assert not [line for line in server.log_lines if "internal error" in line or "Traceback" in line]


def test_a_slow_http_reader_stalls_neither_flight_nor_http(server: ServerProcess) -> None:
    host, port = server.http_url.removeprefix("http://").split(":")
    body = json.dumps({"sql": "SELECT range AS i, repeat('x', 100) AS s FROM range(3000000)"}).encode()
    with socket.create_connection((host, int(port))) as slow:
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        request = f"POST /v1/query HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        slow.sendall(request.encode() + body)
        assert b"200 OK" in slow.recv(1024)  # the result started; nothing more is read
        started = time.monotonic()
        for _ in range(10):
            assert server.sql("SELECT 42 AS x").column("x").to_pylist() == [42]
            assert fetch(f"{server.http_url}/healthz", timeout=5).status == 200
            assert arrow(query(server, {"sql": "SELECT 1 AS one"})).num_rows == 1
        assert time.monotonic() - started < 10
        assert metric(server, "flight_lakehouse_queries_running") >= 1
    assert wait_until(lambda: metric(server, "flight_lakehouse_queries_running") == 0, timeout=15)


def test_a_client_gone_mid_stream_frees_its_query(server: ServerProcess) -> None:
    host, port = server.http_url.removeprefix("http://").split(":")
    body = json.dumps({"sql": "SELECT range AS i FROM range(20000000)"}).encode()
    with socket.create_connection((host, int(port))) as gone:
        request = f"POST /v1/query HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n\r\n"
        gone.sendall(request.encode() + body)
        gone.recv(65536)
    assert wait_until(lambda: metric(server, "flight_lakehouse_queries_running") == 0, timeout=15)


# -- on S3 ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_root", ["s3"], indirect=True)
def test_query_on_s3_equals_doget(server_s3: ServerProcess) -> None:
    server_s3.put("mixed", mixed(500))
    assert arrow(query(server_s3, {"sql": SQL})).equals(server_s3.sql(SQL))
    assert fetch(f"{server_s3.http_url}/readyz").status == 200


@pytest.fixture
def server_s3(storage_root: str) -> Iterator[ServerProcess]:
    with running_server(storage_root) as process:
        yield process


# -- authentication ------------------------------------------------------------------------------------

PASSWORDS = {"reader": "reader-secret-1", "sales": "sales-secret-2", "admin": "admin-secret-3"}


def basic(user: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    """A server with --auth-file; an API token of a reader."""
    base = tmp_path_factory.mktemp("http-auth")
    auth = AuthFile(base / "auth.json")
    auth.add_user("reader", PASSWORDS["reader"], "reader")
    auth.add_user("sales", PASSWORDS["sales"], "reader", ["sales_*"])
    auth.add_user("admin", PASSWORDS["admin"], "admin")
    token = auth.create_token("dashboards", "reader")
    with running_server(str(base / "lakehouse"), "--auth-file", str(base / "auth.json")) as process:
        client = flight.connect(process.location)
        header = client.authenticate_basic_token("admin", PASSWORDS["admin"])
        options = flight.FlightCallOptions(headers=[header])
        for name in ("shared", "sales_q1"):
            table = pa.table({"id": pa.array(range(5), pa.int64())})
            writer, _ = client.do_put(flight.FlightDescriptor.for_path(name), table.schema, options)
            with writer:
                writer.write_table(table)
        client.close()
        yield process, token


def test_without_credentials_only_the_probes_answer(secured: tuple[ServerProcess, str]) -> None:
    server, _ = secured
    assert fetch(f"{server.http_url}/healthz").status == 200
    assert fetch(f"{server.http_url}/readyz").status == 200
    for answer in (
        query(server, {"sql": "SELECT 1"}),
        fetch(f"{server.http_url}/v1/datasets"),
        fetch(f"{server.http_url}/metrics"),
        query(
            server, {"sql": "SELECT 1"}, Authorization="Basic " + base64.b64encode(b"reader:wrong").decode()
        ),
        query(server, {"sql": "SELECT 1"}, Authorization="Bearer not-a-token"),
    ):
        assert_refused(answer, server, 401, "UNAUTHENTICATED", "invalid credentials")
        assert answer.headers["WWW-Authenticate"].startswith("Basic")


def test_basic_and_bearer_credentials(secured: tuple[ServerProcess, str]) -> None:
    server, token = secured
    answer = query(server, {"sql": "SELECT count(*) AS n FROM shared"}, **basic("reader"))
    assert arrow(answer).column("n").to_pylist() == [5]
    bearer = answer.headers["Authorization"]
    assert bearer.startswith("Bearer ")
    assert arrow(query(server, {"dataset": "shared"}, Authorization=bearer)).num_rows == 5
    assert arrow(query(server, {"dataset": "shared"}, Authorization=f"Bearer {token}")).num_rows == 5
    assert fetch(f"{server.http_url}/metrics", headers={"Authorization": f"Bearer {token}"}).status == 200


def test_grants_hide_datasets_as_on_flight(secured: tuple[ServerProcess, str]) -> None:
    server, _ = secured
    listing = fetch(f"{server.http_url}/v1/datasets", headers=basic("sales"))
    assert [entry["name"] for entry in listing.json()] == ["sales_q1"]
    assert_refused(query(server, {"dataset": "shared"}, **basic("sales")), server, 404, "NOT_FOUND")
    assert_refused(query(server, {"sql": "SELECT * FROM shared"}, **basic("sales")), server, 404, "NOT_FOUND")
    assert arrow(query(server, {"dataset": "sales_q1"}, **basic("sales"))).num_rows == 5


# -- start and shutdown --------------------------------------------------------------------------------


def test_readiness_through_a_storage_outage_and_shutdown(tmp_path: Path) -> None:
    """/readyz names a missing root and recovers; on SIGTERM it answers 503 while both ports still take
    calls, then the process drains and exits 0."""
    root = tmp_path / "lakehouse"
    process = ServerProcess(str(root), env={"LAKEHOUSE_SHUTDOWN_UNREADY_SECONDS": "2"})
    process.start()
    try:
        assert fetch(f"{process.http_url}/readyz").status == 200
        os.rename(root, tmp_path / "moved")
        assert wait_until(lambda: fetch(f"{process.http_url}/readyz").status == 503, timeout=5)
        body = fetch(f"{process.http_url}/readyz").json()
        assert body == {"status": "not ready", "reason": "the root directory is gone"}
        assert fetch(f"{process.http_url}/healthz").status == 200
        os.rename(tmp_path / "moved", root)
        assert wait_until(lambda: fetch(f"{process.http_url}/readyz").status == 200, timeout=5)

        client = flight.connect(process.location)
        os.kill(process.pid, signal.SIGTERM)
        assert wait_until(lambda: fetch(f"{process.http_url}/readyz").status == 503, timeout=1.5)
        assert fetch(f"{process.http_url}/readyz").json() == {
            "status": "not ready",
            "reason": "shutting down",
        }
        ticket = flight.Ticket(json.dumps({"sql": "SELECT 7 AS x"}).encode())
        assert client.do_get(ticket).read_all().column("x").to_pylist() == [7]  # still taking calls
        assert arrow(query(process, {"sql": "SELECT 8 AS y"})).column("y").to_pylist() == [8]
        assert process.process is not None and process.process.wait(30) == 0
        with pytest.raises(urllib.error.URLError):
            urllib.request.urlopen(f"{process.http_url}/healthz", timeout=2)
    finally:
        process.kill()


def test_a_taken_http_port_is_one_error_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli(
            "serve", "--root", str(tmp_path / "b"), "--port", "0", "--http-port", str(port), timeout=60
        )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: cannot start the HTTP port") and f":{port}" in lines[-1], (
        result.stderr
    )
    assert "Traceback" not in result.stderr


def test_without_the_port_nothing_is_counted(tmp_path: Path) -> None:
    """``--http-port -1``: no metrics, and (without auth or audit log) no call middleware at all."""
    settings = Settings(root=str(tmp_path), http_port=-1)
    assert server_metrics(settings, cast(Any, None), cast(Any, None)) is None
    assert middleware(settings) == {}
    assert set(middleware(Settings(root=str(tmp_path)), cast(Any, object()))) == {"access"}


# -- metrics -------------------------------------------------------------------------------------------


def scrape(server: ServerProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of ``/metrics`` by name, parsed by prometheus-client's parser."""
    answer = fetch(f"{server.http_url}/metrics")
    assert answer.status == 200 and answer.headers["Content-Type"].startswith("text/plain")
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(answer.body.decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def metric(server: ServerProcess, name: str, **labels: str) -> float:
    """One sample's value in the server's ``/metrics`` (0 when absent)."""
    for found, value in scrape(server).get(name, []):
        if all(found.get(key) == wanted for key, wanted in labels.items()):
            return value
    return 0.0


@contextlib.contextmanager
def moves(server: ServerProcess, name: str, by: float | None = None, **labels: str) -> Iterator[None]:
    """Assert that a metric grows (by ``by`` exactly, when given) with what the block does."""
    before = metric(server, name, **labels)
    yield
    wanted = (lambda value: value > before) if by is None else (lambda value: value == before + by)
    assert wait_until(lambda: wanted(metric(server, name, **labels)), timeout=5), (
        name,
        labels,
        before,
        metric(server, name, **labels),
    )


def test_metrics_follow_prometheus_conventions(server: ServerProcess) -> None:
    answer = fetch(f"{server.http_url}/metrics")
    families = list(text_string_to_metric_families(answer.body.decode()))
    assert families
    for family in families:  # (the parser names a counter's family without its "_total")
        assert family.name.startswith(("flight_lakehouse_", "process_")), family.name
        if family.type == "counter":
            assert all(sample.name.endswith("_total") for sample in family.samples), family.name
        if "bytes" in family.name:
            assert family.name.endswith("_bytes"), family.name
        if "duration" in family.name or "seconds" in family.name:
            assert family.name.endswith("_seconds"), family.name
    samples = scrape(server)
    assert samples["process_resident_memory_bytes"][0][1] > 10 << 20
    assert samples["process_open_fds"][0][1] > 0
    assert not any(name.endswith("_created") for name in samples)


def test_calls_rows_and_bytes_move(server: ServerProcess) -> None:
    table = pa.table({"id": pa.array(range(123), pa.int64())})
    with (
        moves(server, "flight_lakehouse_rows_total", 123, direction="in"),
        moves(server, "flight_lakehouse_data_bytes_total", direction="in"),
        moves(server, "flight_lakehouse_calls_total", 1, rpc="DoPut", call="path", status="OK"),
    ):
        server.put("counted", table)
    with (
        moves(server, "flight_lakehouse_rows_total", 123 * 2, direction="out"),
        moves(server, "flight_lakehouse_calls_total", 1, rpc="DoGet", call="sql", status="OK"),
        moves(server, "flight_lakehouse_calls_total", 1, rpc="POST /v1/query", call="sql", status="OK"),
        moves(server, "flight_lakehouse_call_duration_seconds_count", 1, rpc="DoGet"),
    ):
        assert server.sql("SELECT * FROM counted").num_rows == 123
        assert arrow(query(server, {"sql": "SELECT * FROM counted"})).num_rows == 123


def test_failed_calls_count_by_status(server: ServerProcess) -> None:
    with (
        moves(server, "flight_lakehouse_calls_total", 1, rpc="DoGet", call="sql", status="INVALID_ARGUMENT"),
        moves(
            server, "flight_lakehouse_calls_total", 1, rpc="POST /v1/query", call="scan", status="NOT_FOUND"
        ),
        moves(server, "flight_lakehouse_calls_total", 1, rpc="DoAction", call="other", status="NOT_FOUND"),
    ):
        with pytest.raises(pa.ArrowInvalid):
            server.sql("SELEC nonsense")
        assert query(server, {"dataset": "nowhere"}).status == 404
        with pytest.raises(pa.ArrowKeyError):  # an unknown action's name is no label of its own
            server.action("made_up_action_name")


def test_lance_caches_show_in_the_gauge_and_stay_within_their_bound(start_server) -> None:
    """pylance's and lancedb's caches are counted, and neither outgrows ``lance_cache_mb`` while every write
    makes a version whose metadata a read caches (Lance's defaults, 1 GiB of metadata and 6 GiB of index
    parts per session, let the server grow with the writes: here to 1.5 MB in pylance's and 1.7 MB in
    lancedb's, measured with a 16 MB bound)."""
    server = start_server("--http-port", "0", env={"LAKEHOUSE_LANCE_CACHE_MB": "1"})
    rng = np.random.default_rng(5)

    def rows(first: int, count: int) -> pa.Table:
        ids = range(first, first + count)
        vectors = vector_array(rng.random((count, 8), dtype=np.float32))
        return pa.table({"id": pa.array(ids, pa.int64()), "vec": vectors, "body": [f"w{i % 7}" for i in ids]})

    server.put("cached", rows(0, 5000), mode="create")
    server.action("create_index", {"dataset": "cached", "column": "body", "kind": "fts"})
    wait_for_index(server, "cached", "body", timeout=60)
    text_search = flight.Action(
        "vector_search", json.dumps({"dataset": "cached", "text": "w3", "k": 5}).encode()
    )
    for round_number in range(60):  # every write a version; every read caches its metadata
        server.put("cached", rows(10_000 + 50 * round_number, 50))
        server.sql("SELECT count(*) FROM cached WHERE id % 97 = 0")
        list(server.client.do_action(text_search))
    held = {
        session: metric(server, "flight_lakehouse_lance_cache_bytes", session=session)
        for session in ("pylance", "lancedb")
    }
    assert all(0 < held_bytes <= 1 << 20 for held_bytes in held.values()), held


def test_a_running_upload_shows_in_the_gauge(server: ServerProcess) -> None:
    table = pa.table({"id": pa.array(range(10), pa.int64())})
    writer, reader = server.client.do_put(flight.FlightDescriptor.for_path("uploading"), table.schema)
    writer.write_table(table)
    assert wait_until(lambda: metric(server, "flight_lakehouse_ingests_running") == 1, timeout=5)
    writer.done_writing()
    reader.read()
    writer.close()
    assert wait_until(lambda: metric(server, "flight_lakehouse_ingests_running") == 0, timeout=5)


def test_state_gauges_move(server: ServerProcess) -> None:
    """Datasets and rows (read at most every 5 s), the vector cache, index builds."""
    server.put("gauged", pa.table({"id": pa.array(range(77), pa.int64())}))
    listed = [entry for entry in server.action("list_datasets") if entry["format"] == "parquet"]
    assert "gauged" in {entry["name"] for entry in listed}
    assert wait_until(lambda: metric(server, "flight_lakehouse_vector_tables", state="warm") >= 1, timeout=10)
    assert metric(server, "flight_lakehouse_vector_cache_bytes") > 0
    assert metric(server, "flight_lakehouse_vector_cache_budget_bytes") == 1024 << 20
    samples = scrape(server)  # (no build fails on demand: Lance builds even 500 partitions of 10 rows)
    assert samples["flight_lakehouse_index_build_failures_total"] == [({}, 0.0)]
    assert samples["flight_lakehouse_index_builds_running"] == [({}, 0.0)]
    assert wait_until(
        lambda: metric(server, "flight_lakehouse_datasets", format="parquet") == len(listed), timeout=8
    )
    rows = sum(entry["rows"] for entry in listed)
    assert metric(server, "flight_lakehouse_dataset_rows", format="parquet") == rows
