"""Errors exactly per the contract: status class, one clean line, the offending value named."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import STORAGE_KINDS, ServerProcess, make_root, root_forms, root_listing, running_server

HEAVY_SQL = "select count(*) from range(10000000000) a, range(1000) b"
SMALL = pa.table({"x": [1, 2, 3]})
BAD_NAMES = ["", "..", "a/b", "../x", 'a"b', "a'b", "a b", "a\x00b", "a" * 129, "1abc", "café", "abc\n"]
FLIGHT_SQL_COMMAND = (
    b"\n" + b"type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery" + b"\x12\n\n\x08select 1"
)


def assert_clean(exc: BaseException, root: str, *named: str) -> str:
    """One line before ``. Detail:``, no traceback, source file or root path; every ``named`` present."""
    message = str(exc)
    head = message.split(". Detail:")[0]
    assert "\n" not in head, message
    for forbidden in ("Traceback", 'File "', ".py", *root_forms(root)):
        assert forbidden not in message, f"{forbidden!r} in {message!r}"
    for value in named:
        assert value in head, f"{value!r} not named in {head!r}"
    return head


def named_form(name: str) -> str:
    """How a refused name must appear: its repr (its first 60 characters when it is long)."""
    return repr(name)[:60]


def dataset_dirs(root: str) -> set[str]:
    """The names under ``tables/`` of a root (either backend)."""
    return {
        entry.split("/")[1]
        for entry in root_listing(root)
        if entry.startswith("tables/") and "/" in entry[7:]
    }


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A module-wide server per storage kind with dataset ``t`` (one server per case would be slow)."""
    root = make_root(request, request.param, tmp_path_factory.mktemp("errors"), "errors")
    with running_server(root) as server:
        server.put("t", SMALL)
        yield server


def put_path(server: ServerProcess, name: str) -> object:
    """DoPut with a path descriptor."""
    return server.put(name, SMALL)


def put_command(server: ServerProcess, name: str) -> object:
    """DoPut with an ingest command."""
    return server.put(name, SMALL, mode="append")


def scan(server: ServerProcess, name: str) -> object:
    """DoGet with a scan ticket."""
    return server.ticket({"dataset": name})


def describe(server: ServerProcess, name: str) -> object:
    """The describe_dataset action."""
    return server.action("describe_dataset", {"dataset": name})


def drop(server: ServerProcess, name: str) -> object:
    """The drop_dataset action."""
    return server.action("drop_dataset", {"dataset": name, "if_exists": True})


ROUTES: dict[str, Callable[[ServerProcess, str], object]] = {
    "put_path": put_path,
    "put_command": put_command,
    "scan": scan,
    "describe": describe,
    "drop": drop,
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("name", BAD_NAMES, ids=[repr(n)[:12] for n in BAD_NAMES])
def test_bad_dataset_name(shared: ServerProcess, route: str, name: str) -> None:
    """Every bad name form is INVALID_ARGUMENT with a clean line naming it, on every route."""
    with pytest.raises(pa.ArrowInvalid) as info:
        ROUTES[route](shared, name)
    assert_clean(info.value, shared.root, named_form(name))


def test_bad_names_touch_no_storage(shared: ServerProcess) -> None:
    """After every bad name on every route (run again here), nothing was written for any."""
    before = root_listing(shared.root)
    for name in BAD_NAMES:
        for call in ROUTES.values():
            with pytest.raises(pa.ArrowInvalid):
                call(shared, name)
    assert root_listing(shared.root) == before
    assert dataset_dirs(shared.root) == {"t"}
    assert [d["name"] for d in shared.action("list_datasets")] == ["t"]  # type: ignore[union-attr]


# (id, raw ticket, expected exception, substrings the message must name)
BAD_TICKETS: list[tuple[str, bytes, type[Exception], tuple[str, ...]]] = [
    ("not_utf8", b"\x80\xff{}", pa.ArrowInvalid, ("UTF-8",)),
    ("utf16_json", json.dumps({"sql": "select 1"}).encode("utf-16"), pa.ArrowInvalid, ("UTF-8",)),
    ("not_json", b"select 1", pa.ArrowInvalid, ("JSON",)),
    ("json_list", b'["sql", "select 1"]', pa.ArrowInvalid, ("object", "list")),
    ("json_string", b'"select 1"', pa.ArrowInvalid, ("object", "str")),
    ("json_number", b"5", pa.ArrowInvalid, ("object", "int")),
    ("empty_object", b"{}", pa.ArrowInvalid, ("sql", "dataset")),
    ("empty_bytes", b"", pa.ArrowInvalid, ("sql", "dataset")),
    ("unknown_key_only", b'{"query": "select 1"}', pa.ArrowInvalid, ("query",)),
    ("unknown_key_with_sql", b'{"sql": "select 1", "foo": 1}', pa.ArrowInvalid, ("foo",)),
    ("unknown_key_with_dataset", b'{"dataset": "t", "rows": 1}', pa.ArrowInvalid, ("rows",)),
    ("sql_not_string", b'{"sql": 5}', pa.ArrowInvalid, ("sql", "5")),
    ("sql_empty", b'{"sql": ""}', pa.ArrowInvalid, ("sql",)),
    ("limit_negative", b'{"dataset": "x", "limit": -1}', pa.ArrowInvalid, ("limit", "-1")),
    ("limit_string", b'{"dataset": "x", "limit": "5"}', pa.ArrowInvalid, ("limit", "'5'")),
    ("limit_float", b'{"dataset": "x", "limit": 5.0}', pa.ArrowInvalid, ("limit", "5.0")),
    ("columns_not_list", b'{"dataset": "t", "columns": "x"}', pa.ArrowInvalid, ("columns",)),
    ("unknown_column", b'{"dataset": "t", "columns": ["nope"]}', pa.ArrowInvalid, ("'nope'",)),
    ("ingest_as_ticket", b'{"ingest": {"dataset": "t"}}', pa.ArrowInvalid, ("ingest",)),
    (
        "search_on_parquet",
        b'{"search": {"dataset": "t", "vector": [1.0], "k": 1}}',
        pa.ArrowInvalid,
        ("'t'", "Parquet"),
    ),
    (
        "search_unknown_dataset",
        b'{"search": {"dataset": "nosuch", "vector": [1.0]}}',
        pa.ArrowKeyError,
        ("'nosuch'",),
    ),
    ("search_k_zero", b'{"search": {"dataset": "t", "vector": [1.0], "k": 0}}', pa.ArrowInvalid, ("k", "0")),
    ("flight_sql_command", FLIGHT_SQL_COMMAND, pa.ArrowNotImplementedError, ("Flight SQL",)),
    ("unknown_dataset_scan", b'{"dataset": "nosuch"}', pa.ArrowKeyError, ("'nosuch'",)),
    ("unknown_snapshot", b'{"dataset": "t", "snapshot_id": 123}', pa.ArrowKeyError, ("123",)),
]


@pytest.mark.parametrize(
    ("raw", "expected", "named"), [c[1:] for c in BAD_TICKETS], ids=[c[0] for c in BAD_TICKETS]
)
def test_bad_ticket(
    shared: ServerProcess, raw: bytes, expected: type[Exception], named: tuple[str, ...]
) -> None:
    """Malformed or unserved tickets get the contract's status and a clean line naming the problem."""
    with pytest.raises(expected) as info:
        shared.client.do_get(flight.Ticket(raw)).read_all()
    if expected is pa.ArrowInvalid:
        assert not isinstance(info.value, pa.ArrowKeyError)
    assert_clean(info.value, shared.root, *named)


@pytest.mark.parametrize(
    ("command", "named"),
    [
        ({"search": {"dataset": "t", "k": 1}}, ("'t'", "Parquet")),
        ({"sql": "SELECT 1"}, ("DoExchange", "search")),
        ({"search": {"dataset": "t", "k": 1, "vector": [1.0]}}, ("stream",)),
    ],
    ids=["parquet_dataset", "not_a_search", "vector_in_body"],
)
def test_bad_do_exchange(shared: ServerProcess, command: dict, named: tuple[str, ...]) -> None:
    """DoExchange serves batch vector search on Lance tables only; anything else is INVALID_ARGUMENT."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    schema = pa.schema([("vector", pa.list_(pa.float32()))])
    with pytest.raises(pa.ArrowInvalid) as info:
        writer, reader = shared.client.do_exchange(descriptor)
        with writer:
            writer.begin(schema)
            writer.write_batch(pa.record_batch([pa.array([[1.0]], schema.field(0).type)], schema=schema))
            writer.done_writing()
            reader.read_all()
    assert not isinstance(info.value, pa.ArrowKeyError)
    assert_clean(info.value, shared.root, *named)
