"""Other engines read the server's tables as they are on disk, with what ``describe_dataset`` says: plain
pyiceberg (the SQL catalog the server writes, and the metadata file alone), polars (``scan_iceberg``) and
lancedb for a Lance table, each giving the same rows as the server."""

from __future__ import annotations

import json
from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import StaticTable

from flight_lakehouse.catalog import field_ids
from tests.conftest import ServerProcess, vector_array

pytestmark = pytest.mark.parametrize("storage_root", ["local"], indirect=True)

EVENTS = pa.table(
    {
        "id": pa.array([3, 1, 2], pa.int64()),
        "city": pa.array(["Austin", "Boston", None]),
        "rate": pa.array([41.5, 52.0, 38.25]),
    }
)


def sorted_by_id(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: row["id"])


def test_pyiceberg_and_polars_read_what_the_server_wrote(server: ServerProcess) -> None:
    server.put("events", EVENTS)
    server.put("events", EVENTS.slice(0, 1), mode="append")
    facts = server.action("describe_dataset", {"dataset": "events"})
    assert isinstance(facts, dict)
    assert facts["iceberg_identifier"] == "lakehouse.events"
    assert [column["name"] for column in facts["columns"]] == ["id", "city", "rate"]
    through_server = sorted_by_id(server.sql("SELECT * FROM events"))

    root = Path(server.root)
    catalog = SqlCatalog("lakehouse", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root}")
    table = catalog.load_table(facts["iceberg_identifier"])
    assert table.metadata_location == facts["metadata_location"]
    assert sorted_by_id(table.scan().to_arrow()) == through_server

    static = StaticTable.from_metadata(facts["metadata_location"])
    assert sorted_by_id(static.scan().to_arrow()) == through_server
    assert len(static.metadata.snapshots) == facts["snapshots"] == 2

    frame = pl.scan_iceberg(table).sort("id").collect()
    assert frame.to_dicts() == through_server


def test_lancedb_reads_a_lance_table_the_server_wrote(server: ServerProcess) -> None:
    vectors = np.arange(12, dtype=np.float32).reshape(3, 4)
    server.put("docs", pa.table({"id": pa.array([1, 2, 3], pa.int64()), "vec": vector_array(vectors)}))
    facts = server.action("describe_dataset", {"dataset": "docs"})
    assert isinstance(facts, dict)
    location = Path(facts["location"].removeprefix("file://"))
    database = lancedb.connect(location.parent)
    table = database.open_table(location.name.removesuffix(".lance"))
    assert sorted(table.to_arrow().column("id").to_pylist()) == [1, 2, 3]
    assert table.count_rows() == facts["rows"] == 3


def ids_in(path: str) -> dict[str, int]:
    """Dotted path -> Parquet field id of every field of a data file."""
    return {
        name: int(value) for name, value in field_ids(pq.read_schema(path.removeprefix("file://"))).items()
    }


def test_data_files_carry_the_tables_field_ids(server: ServerProcess) -> None:
    """Every Parquet file the server writes has the Iceberg field ids of the table it is committed to (the
    spec asks for them; Daft reads by id alone), through a create, an append and a schema evolution."""
    nested = pa.table(
        {
            "id": pa.array([1, 2], pa.int64()),
            "tags": pa.array([["a"], ["b", "c"]], pa.list_(pa.string())),
            "where": pa.array([{"x": 1.0, "y": 2.0}, {"x": 3.0, "y": None}]),
        }
    )
    server.put("shapes", nested)
    server.put("shapes", nested.slice(0, 1))
    server.put("shapes", nested.append_column("extra", pa.array([7, 8])), schema_mode="evolve")
    root = Path(server.root)
    catalog = SqlCatalog("lakehouse", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root}")
    table = catalog.load_table("lakehouse.shapes")
    schema = table.schema()
    expected = {
        "id": schema.find_field("id").field_id,
        "tags": schema.find_field("tags").field_id,
        "tags.element": schema.find_field("tags.element").field_id,
        "where": schema.find_field("where").field_id,
        "where.x": schema.find_field("where.x").field_id,
        "where.y": schema.find_field("where.y").field_id,
    }
    files = sorted(task.file.file_path for task in table.scan().plan_files())
    assert len(files) == 3
    for path in files:
        ids = ids_in(path)
        if "extra" in ids:
            assert ids == {**expected, "extra": schema.find_field("extra").field_id}, path
        else:
            assert ids == expected, path
    assert sorted(table.scan().to_arrow().column("extra").to_pylist(), key=str) == [7, 8, None, None, None]
    assert {len(ids_in(path)) for path in files} == {6, 7}


def test_an_upload_whose_new_column_lost_its_id_to_another_commits_nothing(server: ServerProcess) -> None:
    """Two evolving uploads planned on the same table each add a column, so both planned the same next
    field id: the one that commits second would label its column with the other's id (an engine reading by
    id would show its values under the wrong name), so it is refused, commits nothing, and its retry
    succeeds with the right id."""
    server.put("race", pa.table({"id": pa.array([1], pa.int64())}))
    uploads = []
    for column in ("x", "y"):
        table = pa.table({"id": pa.array([2], pa.int64()), column: pa.array([7], pa.int64())})
        command = {"ingest": {"dataset": "race", "schema_mode": "evolve"}}
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        writer, reader = server.client.do_put(descriptor, table.schema)
        writer.write_table(table)
        uploads.append((writer, reader, table))
    for number, (writer, reader, _) in enumerate(uploads):
        writer.done_writing()
        if number == 0:
            reader.read()
            writer.close()
        else:
            with pytest.raises(flight.FlightUnavailableError, match="changed during the upload"):
                reader.read()
                writer.close()
    assert sorted(server.sql("SELECT * FROM race").column_names) == ["id", "x"]
    server.put("race", uploads[1][2], schema_mode="evolve")  # the retry
    root = Path(server.root)
    catalog = SqlCatalog("lakehouse", uri=f"sqlite:///{root / 'catalog.db'}", warehouse=f"file://{root}")
    table = catalog.load_table("lakehouse.race")
    for task in table.scan().plan_files():
        for name, field_id in ids_in(task.file.file_path).items():
            assert table.schema().find_field(name).field_id == field_id, (task.file.file_path, name)
    rows = sorted(table.scan().to_arrow().to_pylist(), key=lambda row: (row["id"], row["x"] is None))
    assert rows == [
        {"id": 1, "x": None, "y": None},
        {"id": 2, "x": 7, "y": None},
        {"id": 2, "x": None, "y": 7},
    ]
