"""Catalog actions, scans, time travel, FlightInfo, GetSchema, ListFlights and restarts via a real server."""

from __future__ import annotations

import base64
import datetime
import json

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse import __version__
from tests.conftest import (
    CATALOG_KINDS,
    ServerProcess,
    assert_no_root,
    assert_refusal,
    data_files,
    root_listing,
    stored_files,
)

#: Every test on both catalogs: SQLite (on both storages) and PostgreSQL.
pytestmark = pytest.mark.parametrize("storage_root", CATALOG_KINDS, indirect=True)

CATALOG_ACTIONS = ("health", "list_datasets", "describe_dataset", "dataset_history", "drop_dataset")


def raw_action(server: ServerProcess, name: str, body: bytes) -> object:
    """Run an action with raw body bytes and decode its JSON result."""
    results = list(server.client.do_action(flight.Action(name, body)))
    return json.loads(results[0].body.to_pybytes())


def history(server: ServerProcess, dataset: str) -> list[dict]:
    """The ``dataset_history`` action."""
    result = server.action("dataset_history", {"dataset": dataset})
    assert isinstance(result, list)
    return result


def listing(server: ServerProcess) -> dict[str, dict]:
    """``list_datasets`` keyed by name."""
    result = server.action("list_datasets")
    assert isinstance(result, list)
    return {entry["name"]: entry for entry in result}


def rows(ids: range, **extra: list) -> pa.Table:
    """A small table: ``id`` (int64), ``name`` (string), ``score`` (float64), plus extra columns."""
    columns: dict[str, object] = {
        "id": pa.array(list(ids), pa.int64()),
        "name": pa.array([f"n{i}" for i in ids], pa.string()),
        "score": pa.array([i / 2 for i in ids], pa.float64()),
    }
    columns.update(extra)
    return pa.table(columns)


def decode_schema(encoded: str) -> pa.Schema:
    """An Arrow IPC schema sent as base64."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def read_ticket(server: ServerProcess, ticket: flight.Ticket) -> pa.Table:
    """DoGet a ticket taken from a FlightInfo."""
    return server.client.do_get(ticket).read_all()


# -- health and actions ----------------------------------------------------------------------------------


def test_health_and_list_actions(server: ServerProcess, storage_root: str) -> None:
    """``health`` reports status, version, storage kind and dataset count; ListActions describes each."""
    health = server.action("health")
    kind = "s3" if storage_root.startswith("s3://") else "local"
    assert isinstance(health, dict)
    assert health["status"] == "ok"
    assert health["version"] == __version__
    assert health["storage"]["kind"] == kind
    assert health["datasets"] == 0
    assert_no_root(server, health)

    server.put("one", rows(range(2)))
    server.put("two", rows(range(3)))
    health = server.action("health")
    assert isinstance(health, dict)
    assert health["datasets"] == 2

    actions = {action.type: action.description for action in server.client.list_actions()}
    for name in CATALOG_ACTIONS:
        assert name in actions, actions
        description = actions[name]
        assert isinstance(description, str)
        assert description.strip()
        assert "\n" not in description


# -- list and describe -----------------------------------------------------------------------------------


def test_list_and_describe_datasets(server: ServerProcess) -> None:
    """``list_datasets`` and ``describe_dataset`` report exact facts and no server path."""
    server.put("alpha", rows(range(3)))
    server.put("alpha", rows(range(3, 5)))
    server.put("beta", rows(range(7), flag=pa.array([True] * 7)))
    now = datetime.datetime.now(datetime.timezone.utc)

    entries = listing(server)
    assert sorted(entries) == ["alpha", "beta"]
    for name, expected_rows in (("alpha", 5), ("beta", 7)):
        entry = entries[name]
        assert {"name", "format", "rows", "bytes", "updated_at"} <= set(entry)
        assert entry["format"] == "parquet"
        assert entry["rows"] == expected_rows
        assert entry["bytes"] > 0
        updated = datetime.datetime.fromisoformat(entry["updated_at"])
        assert updated.tzinfo is not None
        assert abs((now - updated).total_seconds()) < 120
    sizes = stored_files(server.root)
    on_disk = sum(sizes[address] for address in data_files(server.root))
    assert entries["alpha"]["bytes"] + entries["beta"]["bytes"] == on_disk
    assert_no_root(server, list(entries.values()))

    described = server.action("describe_dataset", {"dataset": "alpha"})
    assert isinstance(described, dict)
    assert_no_root(server, described)
    schema = decode_schema(described["schema"])
    assert schema.names == ["id", "name", "score"]
    assert schema.field("id").type == pa.int64()
    assert schema.field("score").type == pa.float64()
    assert described["rows"] == 5
    assert described["files"] == 2
    assert described["bytes"] == entries["alpha"]["bytes"]
    assert described["snapshots"] == 2
    beta = server.action("describe_dataset", {"dataset": "beta"})
    assert isinstance(beta, dict)
    assert decode_schema(beta["schema"]).names == ["id", "name", "score", "flag"]
    assert (beta["rows"], beta["files"], beta["snapshots"]) == (7, 1, 1)

    with pytest.raises(pa.ArrowKeyError) as exc:
        server.action("describe_dataset", {"dataset": "gamma"})
    assert_refusal(exc, server, "gamma")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.action("describe_dataset", {"dataset": "../alpha"})
    assert_refusal(exc, server, "dataset")


# -- history and time travel -----------------------------------------------------------------------------


def test_history_and_time_travel(server: ServerProcess) -> None:
    """History is newest first with exact rows; a scan at an old snapshot returns the old rows."""
    first = server.put("ledger", rows(range(2)))
    second = server.put("ledger", rows(range(2, 5)))
    entries = history(server, "ledger")
    assert [e["snapshot_id"] for e in entries] == [second["snapshot_id"], first["snapshot_id"]]
    assert [e["rows"] for e in entries] == [5, 2]
    assert_no_root(server, entries)

    old = server.ticket({"dataset": "ledger", "snapshot_id": first["snapshot_id"]})
    assert sorted(old.column("id").to_pylist()) == [0, 1]
    projected = server.ticket({"dataset": "ledger", "snapshot_id": first["snapshot_id"], "columns": ["name"]})
    assert projected.schema.names == ["name"]
    assert sorted(projected.column("name").to_pylist()) == ["n0", "n1"]

    third = server.put("ledger", pa.table({"id": pa.array([9], pa.int64()), "note": ["x"]}), mode="overwrite")
    assert history(server, "ledger")[0]["snapshot_id"] == third["snapshot_id"]
    assert history(server, "ledger")[0]["rows"] == 1
    assert server.ticket({"dataset": "ledger"}).to_pylist() == [{"id": 9, "note": "x"}]
    before = server.ticket({"dataset": "ledger", "snapshot_id": second["snapshot_id"]})
    assert before.schema.names == ["id", "name", "score"]
    assert sorted(before.column("id").to_pylist()) == [0, 1, 2, 3, 4]

    for missing in (12345, -1):
        with pytest.raises(pa.ArrowKeyError) as exc:
            server.ticket({"dataset": "ledger", "snapshot_id": missing})
        assert_refusal(exc, server, str(missing))
    with pytest.raises(pa.ArrowKeyError) as exc:
        history(server, "nowhere")
    assert_refusal(exc, server, "nowhere")


# -- drop ------------------------------------------------------------------------------------------------


def test_drop_dataset(server: ServerProcess) -> None:
    """Drop removes the dataset and its files; a second drop is NOT_FOUND unless ``if_exists``."""
    server.put("keep", rows(range(4)))
    keep_files = data_files(server.root)
    server.put("gone", rows(range(6)))
    server.put("gone", rows(range(6, 8)))
    assert len(data_files(server.root)) == len(keep_files) + 2

    assert server.action("drop_dataset", {"dataset": "gone"}) == {"dropped": True}
    assert data_files(server.root) == keep_files
    assert not [entry for entry in root_listing(server.root) if "gone" in entry], root_listing(server.root)
    assert sorted(listing(server)) == ["keep"]

    with pytest.raises(pa.ArrowKeyError) as exc:
        server.action("drop_dataset", {"dataset": "gone"})
    assert_refusal(exc, server, "gone")
    assert server.action("drop_dataset", {"dataset": "gone", "if_exists": True}) == {"dropped": False}
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.sql("select count(*) from gone")
    assert_refusal(exc, server, "gone")
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.ticket({"dataset": "gone"})
    assert_refusal(exc, server, "gone")

    assert server.sql("select count(*) as n from keep").to_pylist() == [{"n": 4}]
    server.put("gone", rows(range(100, 103)))
    assert server.sql("select count(*) as n, min(id) as lo from gone").to_pylist() == [{"n": 3, "lo": 100}]
    assert len(history(server, "gone")) == 1


# -- scans -----------------------------------------------------------------------------------------------


def test_scan_tickets(server: ServerProcess) -> None:
    """Scan tickets project, filter and limit; bad columns and injected statements are refused."""
    server.put("items", rows(range(10)))

    projected = server.ticket({"dataset": "items", "columns": ["name", "id"]})
    assert projected.schema.names == ["name", "id"]
    assert sorted(projected.column("id").to_pylist()) == list(range(10))

    filtered = server.ticket({"dataset": "items", "filter": "id >= 7"})
    assert filtered.schema.names == ["id", "name", "score"]
    assert sorted(filtered.to_pylist(), key=lambda r: r["id"]) == [
        {"id": 7, "name": "n7", "score": 3.5},
        {"id": 8, "name": "n8", "score": 4.0},
        {"id": 9, "name": "n9", "score": 4.5},
    ]
    assert server.ticket({"dataset": "items", "limit": 4}).num_rows == 4
    empty = server.ticket({"dataset": "items", "limit": 0})
    assert (empty.num_rows, empty.schema.names) == (0, ["id", "name", "score"])

    combined = server.ticket({"dataset": "items", "columns": ["id"], "filter": "id % 2 = 0", "limit": 2})
    assert combined.schema.names == ["id"]
    ids = combined.column("id").to_pylist()
    assert len(ids) == 2
    assert set(ids) <= {0, 2, 4, 6, 8}

    with pytest.raises(pa.ArrowInvalid) as exc:
        server.ticket({"dataset": "items", "columns": ["id", "nosuch"]})
    assert_refusal(exc, server, "nosuch")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.ticket({"dataset": "items", "filter": "missing_col > 1"})
    assert_refusal(exc, server, "missing_col")
    for injected in (
        "1=1; drop table items",
        "1=1; select 1",
        "id IN (SELECT 1 FROM read_csv('/etc/passwd'))",
    ):
        with pytest.raises(pa.ArrowInvalid) as exc:
            server.ticket({"dataset": "items", "filter": injected})
        assert_refusal(exc, server)
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.ticket({"dataset": "items", "limit": -1})
    assert_refusal(exc, server, "limit")
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.ticket({"dataset": "nothing_here"})
    assert_refusal(exc, server, "nothing_here")

    assert server.sql("select count(*) as n from items").to_pylist() == [{"n": 10}]


def test_scan_filter_stays_a_predicate(server: ServerProcess) -> None:
    """A filter that closes its parenthesis and appends a UNION is not a predicate: no foreign rows."""
    server.put("items", rows(range(3)))
    server.put("secret", pa.table({"id": pa.array([999], pa.int64()), "name": ["s"], "score": [0.0]}))
    escape = "1=0) UNION ALL SELECT * FROM secret WHERE (1=1"
    try:
        result = server.ticket({"dataset": "items", "filter": escape})
    except pa.ArrowInvalid as exc:
        assert "Traceback" not in str(exc)
    else:
        assert 999 not in result.column("id").to_pylist(), result.to_pylist()


# -- FlightInfo, GetSchema, ListFlights ------------------------------------------------------------------


def test_flight_info_and_schema_for_path(server: ServerProcess) -> None:
    """GetFlightInfo/GetSchema on a path: exact total_records, the columns, and a ticket that works."""
    server.put("metrics", rows(range(7)))
    server.put("metrics", rows(range(7, 12)))
    descriptor = flight.FlightDescriptor.for_path("metrics")
    info = server.client.get_flight_info(descriptor)
    assert info.total_records == 12
    assert info.schema.names == ["id", "name", "score"]
    assert info.descriptor.descriptor_type == flight.DescriptorType.PATH
    assert info.descriptor.path == [b"metrics"]
    assert len(info.endpoints) == 1
    data = read_ticket(server, info.endpoints[0].ticket)
    assert data.num_rows == 12
    assert sorted(data.column("id").to_pylist()) == list(range(12))
    assert server.client.get_schema(descriptor).schema.names == ["id", "name", "score"]

    with pytest.raises(pa.ArrowKeyError) as exc:
        server.client.get_flight_info(flight.FlightDescriptor.for_path("absent"))
    assert_refusal(exc, server, "absent")
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.client.get_schema(flight.FlightDescriptor.for_path("absent"))
    assert_refusal(exc, server, "absent")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.client.get_flight_info(flight.FlightDescriptor.for_path("no/such"))
    assert_refusal(exc, server, "dataset")


def test_path_flight_info_schema_matches_stream(server: ServerProcess) -> None:
    """The schema a path FlightInfo/GetSchema announces is the schema its ticket streams."""
    server.put("typed", rows(range(3), tags=pa.array([["a"], [], ["b", "c"]], pa.list_(pa.string()))))
    descriptor = flight.FlightDescriptor.for_path("typed")
    info = server.client.get_flight_info(descriptor)
    streamed = server.client.do_get(info.endpoints[0].ticket).read_all().schema
    announced = server.client.get_schema(descriptor).schema
    assert info.schema.remove_metadata().equals(streamed.remove_metadata()), (info.schema, streamed)
    assert announced.remove_metadata().equals(streamed.remove_metadata()), (announced, streamed)


def test_flight_info_and_schema_for_sql(server: ServerProcess) -> None:
    """GetFlightInfo/GetSchema on ``{"sql"}`` give the result schema and a working ticket; bad SQL refused."""
    server.put("sales", rows(range(6), region=pa.array(["n", "s", "n", "n", "s", "e"])))
    query = "select region, count(*) as n, sum(id) as total from sales group by region order by region"
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"sql": query}).encode())
    info = server.client.get_flight_info(descriptor)
    assert info.schema.names == ["region", "n", "total"]
    assert info.schema.field("n").type == pa.int64()
    assert len(info.endpoints) == 1
    data = read_ticket(server, info.endpoints[0].ticket)
    assert data.schema.names == ["region", "n", "total"]
    assert [(r["region"], r["n"], int(r["total"])) for r in data.to_pylist()] == [
        ("e", 1, 5),
        ("n", 3, 5),
        ("s", 2, 5),
    ]
    assert data.schema.remove_metadata().equals(info.schema.remove_metadata())
    schema = server.client.get_schema(descriptor).schema
    assert schema.remove_metadata().equals(info.schema.remove_metadata())

    for bad in ("selec 1", "select 1; select 2", "select nosuch from sales", "drop table sales"):
        command = flight.FlightDescriptor.for_command(json.dumps({"sql": bad}).encode())
        with pytest.raises(pa.ArrowInvalid) as exc:
            server.client.get_flight_info(command)
        assert_refusal(exc, server)
        with pytest.raises(pa.ArrowInvalid) as exc:
            server.client.get_schema(command)
        assert_refusal(exc, server)
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.client.get_flight_info(flight.FlightDescriptor.for_command(b"{not json"))
    assert_refusal(exc, server, "JSON")
    assert server.sql("select count(*) as n from sales").to_pylist() == [{"n": 6}]


def test_list_flights(server: ServerProcess) -> None:
    """ListFlights gives one FlightInfo per dataset, with its path, exact rows and a working ticket."""
    server.put("a_first", rows(range(3)))
    server.put("b_second", rows(range(5)))
    server.put("c_empty", rows(range(0)))
    infos = {info.descriptor.path[0].decode(): info for info in server.client.list_flights()}
    assert sorted(infos) == ["a_first", "b_second", "c_empty"]
    for name, expected in (("a_first", 3), ("b_second", 5), ("c_empty", 0)):
        info = infos[name]
        assert info.descriptor.descriptor_type == flight.DescriptorType.PATH
        assert info.descriptor.path == [name.encode()]
        assert info.total_records == expected
        assert info.schema.names == ["id", "name", "score"]
        assert read_ticket(server, info.endpoints[0].ticket).num_rows == expected


# -- bad action bodies -----------------------------------------------------------------------------------


def test_bad_action_bodies(server: ServerProcess) -> None:
    """Malformed bodies are INVALID_ARGUMENT naming the problem; unknown actions are NOT_FOUND."""
    server.put("target", rows(range(3)))
    cases: list[tuple[str, bytes, tuple[str, ...]]] = [
        ("describe_dataset", b"{not json", ("JSON",)),
        ("describe_dataset", b"\xff\xfe", ("JSON",)),
        ("describe_dataset", b"[1, 2]", ("object",)),
        ("dataset_history", b'"target"', ("object",)),
        ("describe_dataset", b'{"dataset": "target", "bogus": 1}', ("bogus",)),
        ("describe_dataset", b"{}", ("dataset",)),
        ("describe_dataset", b'{"dataset": 5}', ("dataset",)),
        ("drop_dataset", b'{"dataset": "target", "if_exists": "yes"}', ("if_exists",)),
        ("drop_dataset", b'{"dataset": ["target"]}', ("dataset",)),
        ("drop_dataset", b'{"dataset": "a/b"}', ("dataset",)),
        ("health", b'{"verbose": true}', ("verbose",)),
        ("list_datasets", b'{"limit": 1}', ("limit",)),
    ]
    for name, body, fragments in cases:
        with pytest.raises(pa.ArrowInvalid) as exc:
            raw_action(server, name, body)
        assert_refusal(exc, server, *fragments)
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.action("no_such_action", {})
    assert_refusal(exc, server, "no_such_action")
    assert sorted(listing(server)) == ["target"]
    assert server.sql("select count(*) as n from target").to_pylist() == [{"n": 3}]


# -- restart ---------------------------------------------------------------------------------------------


def test_restart_keeps_every_dataset(server: ServerProcess) -> None:
    """A restart keeps every dataset with the same rows, bytes and snapshot ids."""
    server.put("a", rows(range(4)))
    server.put("a", rows(range(4, 6)))
    server.put("b", rows(range(3), extra=pa.array([1, 2, 3], pa.int32())))
    server.put("c", rows(range(0)))
    before_listing = {name: (e["rows"], e["bytes"]) for name, e in listing(server).items()}
    before_history = {name: [h["snapshot_id"] for h in history(server, name)] for name in ("a", "b")}
    assert before_listing == {"a": (6, before_listing["a"][1]), "b": (3, before_listing["b"][1]), "c": (0, 0)}

    server.restart()

    assert {name: (e["rows"], e["bytes"]) for name, e in listing(server).items()} == before_listing
    assert {name: [h["snapshot_id"] for h in history(server, name)] for name in ("a", "b")} == before_history
    assert server.sql("select count(*) as n, sum(id)::bigint as s from a").to_pylist() == [{"n": 6, "s": 15}]
    assert server.sql("select sum(extra)::bigint as s from b").to_pylist() == [{"s": 6}]
    assert server.sql("select count(*) as n from c").to_pylist() == [{"n": 0}]

    after = server.put("a", rows(range(6, 7)))
    assert [h["snapshot_id"] for h in history(server, "a")] == [after["snapshot_id"], *before_history["a"]]
    assert server.sql("select count(*) as n from a").to_pylist() == [{"n": 7}]
