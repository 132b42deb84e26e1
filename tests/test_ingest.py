"""DoPut ingest through a real server: modes, schema modes, type normalisation, refusals, concurrency."""

from __future__ import annotations

import base64
import datetime
import json
import threading
import time
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from scripts.gen_workers import WORKERS_SCHEMA, iter_worker_batches
from tests.conftest import ServerProcess, assert_refusal, data_files, root_listing, written_files


def put_descriptor(server: ServerProcess, descriptor: flight.FlightDescriptor, table: pa.Table) -> dict:
    """DoPut ``table`` under any descriptor; returns the PutResult JSON."""
    writer, reader = server.client.do_put(descriptor, table.schema)
    with writer:
        writer.write_table(table)
        writer.done_writing()
        result = reader.read()
    return json.loads(result.to_pybytes())


def history(server: ServerProcess, dataset: str) -> list[dict]:
    """The ``dataset_history`` action."""
    result = server.action("dataset_history", {"dataset": dataset})
    assert isinstance(result, list)
    return result


def current_snapshot(server: ServerProcess, dataset: str) -> int:
    """The snapshot id at the head of the dataset's history."""
    return history(server, dataset)[0]["snapshot_id"]


def count(server: ServerProcess, dataset: str) -> int:
    """``count(*)`` of a dataset through SQL."""
    return server.sql(f"select count(*) as n from {dataset}").column("n")[0].as_py()


def dataset_names(server: ServerProcess) -> list[str]:
    """Names from ``list_datasets``, sorted."""
    listing = server.action("list_datasets")
    assert isinstance(listing, list)
    return sorted(entry["name"] for entry in listing)


def tree(root: str) -> list[str]:
    """Everything under a root (either backend), relative to it."""
    return sorted(root_listing(root))


def people(ids: range, **extra: list) -> pa.Table:
    """A small table: ``id`` (int64) and ``name`` (string), plus extra columns."""
    columns: dict[str, object] = {
        "id": pa.array(list(ids), pa.int64()),
        "name": pa.array([f"n{i}" for i in ids], pa.string()),
    }
    columns.update(extra)
    return pa.table(columns)


# -- round trip ----------------------------------------------------------------------------------------


def test_workers_round_trip(server: ServerProcess) -> None:
    """300k generated rows streamed in 50k batches come back with exact counts, sums and lists."""
    table = pa.Table.from_batches(
        list(iter_worker_batches(300_000, batch_rows=50_000)), schema=WORKERS_SCHEMA
    )
    result = server.put("workers", table, batch_rows=50_000)
    assert result["dataset"] == "workers"
    assert result["rows_written"] == 300_000
    assert result["snapshot_id"] == current_snapshot(server, "workers")

    totals = server.sql(
        "select count(*) as n, sum(id)::bigint as ids, sum(years_experience)::bigint as years, "
        "count(rating) as rated from workers"
    ).to_pylist()
    assert totals == [
        {
            "n": 300_000,
            "ids": pc.sum(table["id"]).as_py(),
            "years": pc.sum(table["years_experience"]).as_py(),
            "rated": 300_000 - table["rating"].null_count,
        }
    ]

    by_state = server.sql("select state, count(*) as n from workers group by state order by state")
    expected = table.group_by("state").aggregate([("id", "count")]).sort_by("state")
    assert by_state.to_pylist() == [
        {"state": state, "n": n}
        for state, n in zip(expected["state"].to_pylist(), expected["id_count"].to_pylist(), strict=True)
    ]

    assert server.sql("select * from workers limit 0").schema.names == WORKERS_SCHEMA.names
    ids = [0, 49_999, 50_000, 123_456, 299_999]
    got = server.sql(
        "select id, name, skills, certifications, hourly_rate, available_from from workers "
        f"where id in ({', '.join(map(str, ids))}) order by id"
    ).to_pylist()
    columns = ["id", "name", "skills", "certifications", "hourly_rate", "available_from"]
    want = table.select(columns).take(pa.array(ids)).to_pylist()
    assert got == want
    assert all(1 <= len(row["skills"]) <= 5 for row in got)


# -- modes -----------------------------------------------------------------------------------------------


def test_path_append_create_and_put_result(server: ServerProcess) -> None:
    """Path append creates then appends; ``create`` on an existing dataset is refused and changes nothing."""
    first = server.put("events", people(range(5)))
    assert first["dataset"] == "events"
    assert first["rows_written"] == 5
    assert first["snapshot_id"] == current_snapshot(server, "events")
    assert count(server, "events") == 5

    second = server.put("events", people(range(5)))
    assert second["rows_written"] == 5
    assert second["snapshot_id"] != first["snapshot_id"]
    assert second["snapshot_id"] == current_snapshot(server, "events")
    assert [h["snapshot_id"] for h in history(server, "events")] == [
        second["snapshot_id"],
        first["snapshot_id"],
    ]
    assert server.sql("select count(*) as n, sum(id) as s from events").to_pylist() == [{"n": 10, "s": 20}]

    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("events", people(range(3)), mode="create")
    assert_refusal(exc, server, "already exists", "events")
    assert count(server, "events") == 10
    assert current_snapshot(server, "events") == second["snapshot_id"]
    assert len(history(server, "events")) == 2

    created = server.put("fresh", people(range(4)), mode="create", format="parquet")
    assert created["rows_written"] == 4
    assert created["snapshot_id"] == current_snapshot(server, "fresh")
    assert count(server, "fresh") == 4


def test_overwrite_creates_a_missing_dataset(server: ServerProcess) -> None:
    """``overwrite`` of a dataset that does not exist creates it (one append snapshot); a second
    overwrite replaces its rows."""
    first = server.put("restock", people(range(3)), mode="overwrite")
    assert first["created"] is True and first["rows_written"] == 3
    assert [entry["operation"] for entry in server.action("dataset_history", {"dataset": "restock"})] == [
        "append"
    ]
    second = server.put("restock", people(range(10, 12)), mode="overwrite")
    assert second["created"] is False and count(server, "restock") == 2


def test_overwrite_replaces_rows_and_columns(server: ServerProcess) -> None:
    """``overwrite`` replaces every row and may add and remove columns."""
    server.put("stock", people(range(6)))
    result = server.put(
        "stock",
        pa.table({"id": pa.array([100, 200], pa.int64()), "qty": pa.array([1.5, 2.5])}),
        mode="overwrite",
    )
    assert result["rows_written"] == 2
    assert result["snapshot_id"] == current_snapshot(server, "stock")
    entries = server.action("dataset_history", {"dataset": "stock"})
    assert [entry["operation"] for entry in entries] == ["overwrite", "append"], "one snapshot per overwrite"
    assert entries[0]["parent_id"] == entries[1]["snapshot_id"] and entries[0]["rows"] == 2
    rows = server.sql("select * from stock order by id")
    assert rows.schema.names == ["id", "qty"]
    assert rows.to_pylist() == [{"id": 100, "qty": 1.5}, {"id": 200, "qty": 2.5}]
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.sql("select name from stock")
    assert_refusal(exc, server, "name")


# -- schema modes ----------------------------------------------------------------------------------------


def test_strict_schema_refusals_name_the_fields(server: ServerProcess) -> None:
    """Strict mode refuses extra, missing and retyped columns, naming them, and commits nothing."""
    server.put("staff", people(range(3)))
    before = current_snapshot(server, "staff")

    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("staff", people(range(2), badge=pa.array([1, 2], pa.int64())))
    assert_refusal(exc, server, "badge", "staff")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("staff", pa.table({"id": pa.array([1], pa.int64())}), schema_mode="strict")
    assert_refusal(exc, server, "name")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("staff", pa.table({"id": pa.array(["1"]), "name": pa.array(["x"])}))
    assert_refusal(exc, server, "id", "string")

    assert count(server, "staff") == 3
    assert current_snapshot(server, "staff") == before
    assert len(history(server, "staff")) == 1


@pytest.mark.parametrize("schema_mode", ["strict", "evolve"])
def test_a_column_differing_only_in_case_is_refused(server: ServerProcess, schema_mode: str) -> None:
    """``ID`` for ``id``: refused naming both (evolve once added it beside ``id``, and every later upload
    and describe of the dataset then failed); the dataset is unchanged and takes uploads as before."""
    server.put("cased", people(range(2)))
    twin = people(range(2, 4)).rename_columns(["ID", "name"])
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("cased", twin, schema_mode=schema_mode)
    assert_refusal(exc, server, "differ only in case", "'ID' (dataset has 'id')")
    server.put("cased", people(range(2, 4)))
    assert server.sql("select count(*) as n from cased").to_pylist() == [{"n": 4}]
    assert [c["name"] for c in server.action("describe_dataset", {"dataset": "cased"})["columns"]] == [  # type: ignore[index]
        "id",
        "name",
    ]


def test_evolve_adds_nullable_column_and_refuses_retype(server: ServerProcess) -> None:
    """Evolve adds a new column (old rows read NULL); a conflicting type is still refused."""
    server.put("crew", people(range(2)))
    evolved = server.put(
        "crew",
        people(range(2, 4), rank=pa.array([7, 8], pa.int64())),
        schema_mode="evolve",
    )
    assert evolved["rows_written"] == 2
    assert evolved["snapshot_id"] == current_snapshot(server, "crew")
    assert server.sql("select id, name, rank from crew order by id").to_pylist() == [
        {"id": 0, "name": "n0", "rank": None},
        {"id": 1, "name": "n1", "rank": None},
        {"id": 2, "name": "n2", "rank": 7},
        {"id": 3, "name": "n3", "rank": 8},
    ]
    described = server.action("describe_dataset", {"dataset": "crew"})
    assert isinstance(described, dict)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(described["schema"])))
    assert schema.names == ["id", "name", "rank"]
    assert schema.field("rank").nullable

    before = current_snapshot(server, "crew")
    with pytest.raises(pa.ArrowInvalid) as exc:
        server.put("crew", people(range(1), rank=pa.array(["high"])), schema_mode="evolve")
    assert_refusal(exc, server, "rank")
    assert count(server, "crew") == 4
    assert current_snapshot(server, "crew") == before


# -- types -----------------------------------------------------------------------------------------------


def test_types_are_normalised(server: ServerProcess) -> None:
    """Dictionary, unsigned, nanosecond, large and half-float columns are stored and read back exactly."""
    micros = 1_700_000_000_123_456
    table = pa.table(
        {
            "tag": pa.array(["red", "blue", "red"]).dictionary_encode(),
            "u8": pa.array([255, 0, 7], pa.uint8()),
            "u16": pa.array([65_535, 1, 2], pa.uint16()),
            "u32": pa.array([4_294_967_295, 3, 4], pa.uint32()),
            "ts": pa.array([micros * 1000, None, 0], pa.timestamp("ns")),
            "text": pa.array(["long", "strings", ""], pa.large_string()),
            "half": pa.array(np.array([1.5, -2.25, 0.0], dtype=np.float16)),
        }
    )
    assert server.put("typed", table)["rows_written"] == 3
    rows = server.sql("select * from typed order by u16").to_pylist()
    assert [row["tag"] for row in rows] == ["blue", "red", "red"]
    assert [row["u8"] for row in rows] == [0, 7, 255]
    assert [row["u32"] for row in rows] == [3, 4, 4_294_967_295]
    assert [row["text"] for row in rows] == ["strings", "", "long"]
    assert [row["half"] for row in rows] == [-2.25, 0.0, 1.5]
    epoch = datetime.datetime(1970, 1, 1)
    assert [row["ts"] for row in rows] == [None, epoch, epoch + datetime.timedelta(microseconds=micros)]

    described = server.action("describe_dataset", {"dataset": "typed"})
    assert isinstance(described, dict)
    schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(described["schema"])))
    assert schema.field("u8").type == pa.int32()
    assert schema.field("u16").type == pa.int32()
    assert schema.field("u32").type == pa.int64()
    assert schema.field("ts").type == pa.timestamp("us")
    assert schema.field("half").type == pa.float32()
    for name in ("tag", "text"):
        assert pa.types.is_string(schema.field(name).type) or pa.types.is_large_string(
            schema.field(name).type
        )

    # The same source types append in strict mode: normalisation is stable.
    assert server.put("typed", table)["rows_written"] == 3
    assert server.sql("select count(*) as n, sum(u32)::bigint as s from typed").to_pylist() == [
        {"n": 6, "s": 2 * (4_294_967_295 + 7)}
    ]


def test_unsupported_types_refused(server: ServerProcess) -> None:
    """Types a dataset cannot store (uint64, null, nested uint64) and duplicate names are refused by name."""
    cases: list[tuple[str, pa.Table, tuple[str, ...]]] = [
        ("u64", pa.table({"id": [1], "big": pa.array([2**64 - 1], pa.uint64())}), ("big", "uint64")),
        ("nulls", pa.table({"id": [1], "nothing": pa.array([None], pa.null())}), ("nothing", "null")),
        ("nested", pa.table({"l": pa.array([[1]], pa.list_(pa.uint64()))}), ("l", "uint64")),
        ("dupes", pa.table([pa.array([1]), pa.array([2])], names=["a", "A"]), ("duplicate", "A")),
    ]
    for dataset, table, fragments in cases:
        with pytest.raises(pa.ArrowInvalid) as exc:
            server.put(dataset, table)
        assert_refusal(exc, server, *fragments)
    assert dataset_names(server) == []
    assert data_files(server.root) == set()


def test_zero_row_upload_creates_empty_dataset(server: ServerProcess) -> None:
    """A zero-row append creates an empty, queryable dataset with the uploaded columns."""
    schema = pa.schema([("id", pa.int64()), ("name", pa.string()), ("tags", pa.list_(pa.string()))])
    result = server.put("empty", schema.empty_table(), mode="append")
    assert result["dataset"] == "empty"
    assert result["rows_written"] == 0
    assert dataset_names(server) == ["empty"]
    assert count(server, "empty") == 0
    rows = server.sql("select * from empty")
    assert rows.num_rows == 0
    assert rows.schema.names == ["id", "name", "tags"]
    assert rows.schema.field("id").type == pa.int64()
    assert pa.types.is_list(rows.schema.field("tags").type)

    server.put("empty", pa.table({"id": [1, 2], "name": ["a", "b"], "tags": [["x"], []]}, schema=schema))
    assert server.sql("select id, tags from empty order by id").to_pylist() == [
        {"id": 1, "tags": ["x"]},
        {"id": 2, "tags": []},
    ]


# -- refusals of the command -----------------------------------------------------------------------------


def test_non_parquet_modes_and_unknown_fields_refused(server: ServerProcess) -> None:
    """``upsert``, ``lance``, stray ``key``, unknown fields and bad values are refused, naming them."""
    table = people(range(3))
    server.put("orders", table)
    before = current_snapshot(server, "orders")

    refusals: list[tuple[Callable[[], object], tuple[str, ...]]] = [
        (lambda: server.put("orders", table, mode="upsert", key="id"), ("upsert",)),
        (lambda: server.put("orders", table, format="lance"), ("lance",)),
        (lambda: server.put("brand_new", table, mode="upsert", key="id"), ("upsert",)),
        (lambda: server.put("brand_new", table, format="lance"), ("lance",)),
        (lambda: server.put("orders", table, key="id"), ("key",)),
        (lambda: server.put("orders", table, colour="red"), ("colour",)),
        (lambda: server.put("orders", table, mode="replace"), ("mode", "replace")),
        (lambda: server.put("orders", table, schema_mode="loose"), ("schema_mode", "loose")),
        (
            lambda: put_descriptor(
                server,
                flight.FlightDescriptor.for_command(
                    json.dumps({"ingest": {"dataset": "orders"}, "extra": 1}).encode()
                ),
                table,
            ),
            ("extra",),
        ),
        (lambda: put_descriptor(server, flight.FlightDescriptor.for_command(b"{nope"), table), ("JSON",)),
        (
            lambda: put_descriptor(server, flight.FlightDescriptor.for_command(b'{"ingest": {}}'), table),
            ("dataset",),
        ),
    ]
    for call, fragments in refusals:
        with pytest.raises(pa.ArrowInvalid) as exc:
            call()
        assert_refusal(exc, server, *fragments)

    assert dataset_names(server) == ["orders"]
    assert count(server, "orders") == 3
    assert current_snapshot(server, "orders") == before


BAD_NAMES = [
    "",
    ".",
    "..",
    "../escape",
    "a/b",
    "a b",
    "x'y",
    'x"y',
    "a\x00b",
    "9lives",
    "a-b",
    "é",
    "a" * 129,
]


def test_bad_dataset_names_refused_before_storage(server: ServerProcess) -> None:
    """Bad names in path descriptors and ingest commands are refused and touch no storage."""
    table = people(range(2))
    before = tree(server.root)
    for name in BAD_NAMES:
        with pytest.raises(pa.ArrowInvalid) as exc:
            put_descriptor(server, flight.FlightDescriptor.for_path(name), table)
        assert_refusal(exc, server, "dataset name")
        for mode in ("append", "create", "overwrite"):
            with pytest.raises(pa.ArrowInvalid) as exc:
                server.put(name, table, mode=mode)
            assert_refusal(exc, server, "dataset")
    for path in ([], ["a", "b"]):
        with pytest.raises(pa.ArrowInvalid) as exc:
            put_descriptor(server, flight.FlightDescriptor.for_path(*path), table)
        assert_refusal(exc, server, "path")
    assert tree(server.root) == before
    assert dataset_names(server) == []

    longest = "a" * 128
    assert server.put(longest, table)["rows_written"] == 2
    assert dataset_names(server) == [longest]


def test_case_insensitive_twin_refused(server: ServerProcess) -> None:
    """After ``Sales`` exists, ``sales`` (any mode) is refused; ``Sales`` itself still appends."""
    server.put("Sales", people(range(3)))
    before = current_snapshot(server, "Sales")
    for call in (
        lambda: server.put("sales", people(range(1))),
        lambda: server.put("SALES", people(range(1)), mode="create"),
        lambda: server.put("sales", people(range(1)), mode="overwrite"),
    ):
        with pytest.raises(pa.ArrowInvalid) as exc:
            call()
        assert_refusal(exc, server, "Sales")
    assert dataset_names(server) == ["Sales"]
    assert current_snapshot(server, "Sales") == before
    assert count(server, "sales") == 3  # SQL names are case-insensitive
    server.put("Sales", people(range(3, 5)))
    assert count(server, "Sales") == 5


# -- limits and concurrency ------------------------------------------------------------------------------


def test_oversize_batch_refused_and_cleaned_up(start_server: Callable[..., ServerProcess]) -> None:
    """A 5 MB batch over a 1 MB limit is refused mid-stream; the files already written are deleted."""
    server = start_server(env={"LAKEHOUSE_MAX_BATCH_MB": "1", "LAKEHOUSE_ROW_GROUP_ROWS": "1024"})
    small = pa.table({"id": pa.array(range(4096), pa.int64())})
    big = pa.table({"id": pa.array(np.arange(655_360, dtype=np.int64))})
    assert big.nbytes >= 5 << 20

    with pytest.raises(pa.ArrowInvalid) as exc:
        writer, reader = server.client.do_put(flight.FlightDescriptor.for_path("bulky"), small.schema)
        with writer:
            writer.write_table(small)
            deadline = time.monotonic() + 15
            while not written_files(server.root) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert written_files(server.root), "the first batch should reach a Parquet file mid-stream"
            writer.write_batch(big.to_batches()[0])
            writer.done_writing()
            reader.read()
    assert_refusal(exc, server, "limit", "1 MB")

    assert written_files(server.root) == set()
    assert dataset_names(server) == []
    with pytest.raises(pa.ArrowKeyError):
        server.sql("select count(*) from bulky")
    assert server.put("bulky", small)["rows_written"] == 4096
    assert count(server, "bulky") == 4096


def test_concurrent_appends(server: ServerProcess) -> None:
    """Four threads append 10k rows each to one dataset; every row lands exactly once."""
    results: list[dict] = []
    errors: list[BaseException] = []

    def append(worker: int) -> None:
        table = pa.table(
            {
                "id": pa.array(range(worker * 10_000, (worker + 1) * 10_000), pa.int64()),
                "worker": pa.array([worker] * 10_000, pa.int32()),
            }
        )
        client = flight.connect(server.location)
        try:
            for _ in range(10):
                try:
                    writer, reader = client.do_put(flight.FlightDescriptor.for_path("shared"), table.schema)
                    with writer:
                        writer.write_table(table)
                        writer.done_writing()
                        results.append(json.loads(reader.read().to_pybytes()))
                    return
                except flight.FlightUnavailableError as exc:
                    assert "retry" in str(exc), str(exc)
                    time.sleep(0.1)
            raise AssertionError(f"worker {worker} gave up after 10 retries")
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=append, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert sorted(r["rows_written"] for r in results) == [10_000] * 4
    assert server.sql(
        "select count(*) as n, count(distinct id) as d, sum(id)::bigint as s, "
        "count(distinct worker) as w from shared"
    ).to_pylist() == [{"n": 40_000, "d": 40_000, "s": 40_000 * 39_999 // 2, "w": 4}]
    snapshots = [h["snapshot_id"] for h in history(server, "shared")]
    assert len(snapshots) == 4
    assert sorted(snapshots) == sorted(r["snapshot_id"] for r in results)
