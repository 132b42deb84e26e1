"""The limits one careless client meets: concurrent uploads and queries past the limit are UNAVAILABLE at
once (earlier ones finish intact), an upload past the byte limit is refused with nothing committed, and a
user's prepared statements and login sessions are bounded (another user's are invisible)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from google.protobuf import any_pb2

from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.auth import AuthFile
from flight_lakehouse.protocol import pack
from tests.conftest import ServerProcess

PASSWORDS = {"ann": "ann-password-1", "ben": "ben-password-2"}


def rows(start: int, count: int) -> pa.Table:
    return pa.table({"id": np.arange(start, start + count, dtype=np.int64), "v": np.ones(count)})


def started(request: pytest.FixtureRequest, tmp_path: Path, *args: str, **env: str) -> ServerProcess:
    server = ServerProcess(str(tmp_path / "lakehouse"), list(args), env)
    request.addfinalizer(server.kill)
    request.addfinalizer(server.stop)
    return server.start()


def timed_refusal(call: object) -> tuple[BaseException, float]:
    began = time.monotonic()
    with pytest.raises(flight.FlightError) as refused:
        call()  # type: ignore[operator]
    return refused.value, time.monotonic() - began


def test_uploads_past_the_limit_are_unavailable_while_earlier_ones_finish(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = started(request, tmp_path, LAKEHOUSE_MAX_CONCURRENT_INGESTS="1")
    table = rows(0, 1000)
    writer, _ = server.client.do_put(flight.FlightDescriptor.for_path("slow"), table.schema)
    writer.write_table(table)  # the upload is being written: it holds the one slot
    time.sleep(0.5)
    error, seconds = timed_refusal(lambda: server.put("other", rows(0, 10)))
    assert isinstance(error, flight.FlightUnavailableError), error
    assert "busy" in str(error) and "max_concurrent_ingests" in str(error) and seconds < 2
    writer.write_table(rows(1000, 500))
    writer.close()
    assert server.sql("SELECT count(*) AS n FROM slow").to_pylist() == [{"n": 1500}]
    assert server.put("other", rows(0, 10))["rows_written"] == 10  # the slot is free again
    assert server.sql("SELECT count(*) AS n FROM other").to_pylist() == [{"n": 10}]


def test_an_upload_past_the_byte_limit_is_refused_and_nothing_is_committed(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = started(request, tmp_path, LAKEHOUSE_MAX_INGEST_MB="1")
    server.put("capped", rows(0, 100))
    big = rows(0, 200_000)  # 3.2 MB of Arrow
    with pytest.raises(pa.ArrowInvalid, match="max_ingest_mb") as refused:
        server.put("capped", big, batch_rows=10_000, mode="append")
    assert "\n" not in str(refused.value).split(". Detail")[0]
    with pytest.raises(pa.ArrowInvalid, match="max_ingest_mb"):
        server.put("fresh", big, batch_rows=10_000)
    assert server.sql("SELECT count(*) AS n FROM capped").to_pylist() == [{"n": 100}]
    assert [entry["name"] for entry in server.action("list_datasets")] == ["capped"]  # type: ignore[union-attr]
    assert server.put("capped", rows(0, 1000), mode="append")["rows_written"] == 1000


def test_queries_past_the_limit_are_unavailable_until_one_ends(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    server = started(request, tmp_path, LAKEHOUSE_MAX_CONCURRENT_QUERIES="1")
    server.put("events", rows(0, 10))
    ticket = flight.Ticket(json.dumps({"sql": "SELECT i FROM range(100000000) t(i)"}).encode())
    reader = server.client.do_get(ticket)
    reader.read_chunk()  # the stream is open: its query holds the one slot
    error, seconds = timed_refusal(lambda: server.sql("SELECT count(*) AS n FROM events"))
    assert isinstance(error, flight.FlightUnavailableError) and "max_concurrent_queries" in str(error), error
    assert seconds < 2
    reader.cancel()
    deadline = time.monotonic() + 10
    while True:
        try:
            assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 10}]
            break
        except flight.FlightUnavailableError:
            assert time.monotonic() < deadline, "the cancelled query kept its slot"
            time.sleep(0.1)


def login(server: ServerProcess, user: str) -> tuple[flight.FlightClient, flight.FlightCallOptions]:
    client = flight.connect(server.location)
    return client, flight.FlightCallOptions(headers=[client.authenticate_basic_token(user, PASSWORDS[user])])


@pytest.fixture
def secured(request: pytest.FixtureRequest, tmp_path: Path) -> ServerProcess:
    auth = AuthFile(tmp_path / "auth.json")
    for user, password in PASSWORDS.items():
        auth.add_user(user, password, "reader")
    return started(
        request,
        tmp_path,
        "--auth-file",
        str(tmp_path / "auth.json"),
        LAKEHOUSE_PREPARED_STATEMENTS_PER_USER="2",
        LAKEHOUSE_SESSIONS_PER_USER="2",
    )


def prepare(client: flight.FlightClient, options: flight.FlightCallOptions) -> bytes:
    request = sql.ActionCreatePreparedStatementRequest(query="SELECT 42 AS answer")
    [result] = client.do_action(flight.Action("CreatePreparedStatement", pack(request)), options)
    created = sql.ActionCreatePreparedStatementResult()
    any_pb2.Any.FromString(result.body.to_pybytes()).Unpack(created)
    return created.prepared_statement_handle


def run_prepared(client: flight.FlightClient, options: flight.FlightCallOptions, handle: bytes) -> pa.Table:
    command = sql.CommandPreparedStatementQuery(prepared_statement_handle=handle)
    info = client.get_flight_info(flight.FlightDescriptor.for_command(pack(command)), options)
    return client.do_get(info.endpoints[0].ticket, options).read_all()


def test_prepared_statements_are_bounded_per_user_and_private(secured: ServerProcess) -> None:
    ann, ann_options = login(secured, "ann")
    ben, ben_options = login(secured, "ben")
    handles = [prepare(ann, ann_options) for _ in range(2)]
    with pytest.raises(flight.FlightUnavailableError, match="prepared_statements_per_user"):
        prepare(ann, ann_options)
    theirs = prepare(ben, ben_options)  # another user's bound is their own
    assert run_prepared(ann, ann_options, handles[0]).to_pylist() == [{"answer": 42}]
    with pytest.raises(pa.ArrowKeyError, match="prepared statement not found"):
        run_prepared(ben, ben_options, handles[0])
    close = sql.ActionClosePreparedStatementRequest(prepared_statement_handle=handles[0])
    list(ben.do_action(flight.Action("ClosePreparedStatement", pack(close)), ben_options))  # not ben's
    assert run_prepared(ann, ann_options, handles[0]).num_rows == 1
    list(ann.do_action(flight.Action("ClosePreparedStatement", pack(close)), ann_options))
    assert prepare(ann, ann_options) and run_prepared(ben, ben_options, theirs).num_rows == 1


def test_a_new_login_past_the_session_limit_ends_the_oldest(secured: ServerProcess) -> None:
    sessions = [login(secured, "ann") for _ in range(3)]
    oldest_client, oldest_options = sessions[0]
    with pytest.raises(flight.FlightUnauthenticatedError, match="invalid credentials"):
        list(oldest_client.list_actions(oldest_options))
    for client, options in sessions[1:]:
        assert list(client.list_actions(options))
    client, options = login(secured, "ben")  # another user's sessions are not counted against ann
    assert list(client.list_actions(options))


def test_queries_of_many_threads_within_the_limit_all_answer(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The default limit leaves room for a handful of concurrent clients (none refused)."""
    server = started(request, tmp_path)
    server.put("events", rows(0, 1000))
    errors: list[BaseException] = []

    def query(index: int) -> None:
        try:
            client = flight.connect(server.location)
            ticket = json.dumps({"sql": f"SELECT count(*) AS n FROM events WHERE id >= {index}"}).encode()
            assert client.do_get(flight.Ticket(ticket)).read_all().num_rows == 1
        except BaseException as exc:  # collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=query, args=(index,)) for index in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
