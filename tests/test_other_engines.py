"""Other engines read the server's tables as they are on disk, with what ``describe_dataset`` says: plain
pyiceberg (the SQL catalog the server writes, and the metadata file alone), polars (``scan_iceberg``) and
lancedb for a Lance table, each giving the same rows as the server."""

from __future__ import annotations

from pathlib import Path

import lancedb
import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import StaticTable

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
