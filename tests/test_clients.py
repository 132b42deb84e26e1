"""What pandas, polars and plain pyarrow users see when they read results from the server."""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Iterator

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.flight as flight
import pytest

from flight_lakehouse.client import LakehouseClient
from tests.conftest import STORAGE_KINDS, ServerProcess, make_root, running_server

UTC_NAMES = ("UTC", "Etc/UTC")
TS = dt.datetime(2024, 1, 2, 3, 4, 5, 6)
TYPED = pa.table(
    {
        "k": pa.array([1, 2, 3], pa.int32()),
        "i": pa.array([10, None, -30], pa.int64()),
        "f": pa.array([1.5, None, -2.25], pa.float64()),
        "s": pa.array(["a", None, "ccc"], pa.string()),
        "l": pa.array([[1, 2], None, []], pa.list_(pa.int64())),
        "d": pa.array([dt.date(2024, 1, 2), None, dt.date(1999, 12, 31)], pa.date32()),
        "ts": pa.array([TS, None, dt.datetime(1970, 1, 1)], pa.timestamp("us")),
        "tz": pa.array([TS, None, dt.datetime(1970, 1, 1)], pa.timestamp("us", tz="UTC")),
        "b": pa.array([True, None, False], pa.bool_()),
        "flag": pa.array([True, False, True], pa.bool_()),
    }
)
BIG_ROWS = 1_000_000


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """A module-wide server per storage kind with ``typed`` (common types, nulls) and ``big`` (1M rows)."""
    root = make_root(request, request.param, tmp_path_factory.mktemp("clients"), "clients")
    with running_server(root) as server:
        server.put("typed", TYPED)
        server.put("big", pa.table({"x": pa.array(range(BIG_ROWS), pa.int64())}), batch_rows=BIG_ROWS)
        yield server


def do_get(server: ServerProcess, ticket: dict[str, object]) -> flight.FlightStreamReader:
    """A DoGet stream for a JSON ticket."""
    return server.client.do_get(flight.Ticket(json.dumps(ticket).encode()))


def test_read_pandas(shared: ServerProcess) -> None:
    """``reader.read_pandas()`` gives the ingested values with the dtypes pandas users expect."""
    df = do_get(shared, {"sql": "select * from typed order by k"}).read_pandas()
    assert list(df.columns) == TYPED.column_names
    assert df["k"].dtype == np.int32 and df["k"].tolist() == [1, 2, 3]
    assert df["i"].dtype == np.float64 and df["i"][0] == 10 and math.isnan(df["i"][1]) and df["i"][2] == -30
    assert (
        df["f"].dtype == np.float64 and df["f"][0] == 1.5 and math.isnan(df["f"][1]) and df["f"][2] == -2.25
    )
    assert pd.api.types.is_string_dtype(df["s"]) and df["s"][0] == "a" and pd.isna(df["s"][1])
    assert df["s"][2] == "ccc"
    assert df["l"].dtype == object and list(df["l"][0]) == [1, 2] and df["l"][1] is None
    assert len(df["l"][2]) == 0
    assert df["d"].tolist() == [dt.date(2024, 1, 2), None, dt.date(1999, 12, 31)]
    assert df["ts"].dtype == "datetime64[us]"
    assert df["ts"][0] == pd.Timestamp(TS) and pd.isna(df["ts"][1])
    assert isinstance(df["tz"].dtype, pd.DatetimeTZDtype) and str(df["tz"].dtype.tz) in UTC_NAMES
    assert df["tz"][0] == pd.Timestamp(TS, tz="UTC") and pd.isna(df["tz"][1])
    assert df["b"].tolist() == [True, None, False]
    assert df["flag"].dtype == np.bool_ and df["flag"].tolist() == [True, False, True]


def test_read_polars(shared: ServerProcess) -> None:
    """``polars.from_arrow(reader.read_all())`` gives the ingested values and polars dtypes."""
    frame = pl.from_arrow(do_get(shared, {"sql": "select * from typed order by k"}).read_all())
    assert isinstance(frame, pl.DataFrame)
    schema = dict(frame.schema)
    tz_dtype = schema.pop("tz")
    assert schema == {
        "k": pl.Int32,
        "i": pl.Int64,
        "f": pl.Float64,
        "s": pl.String,
        "l": pl.List(pl.Int64),
        "d": pl.Date,
        "ts": pl.Datetime("us"),
        "b": pl.Boolean,
        "flag": pl.Boolean,
    }
    assert (
        isinstance(tz_dtype, pl.Datetime) and tz_dtype.time_unit == "us" and tz_dtype.time_zone in UTC_NAMES
    )
    rows = frame.drop("tz").rows(named=True)
    assert rows == [
        {
            "k": 1,
            "i": 10,
            "f": 1.5,
            "s": "a",
            "l": [1, 2],
            "d": dt.date(2024, 1, 2),
            "ts": TS,
            "b": True,
            "flag": True,
        },
        {"k": 2, "i": None, "f": None, "s": None, "l": None, "d": None, "ts": None, "b": None, "flag": False},
        {
            "k": 3,
            "i": -30,
            "f": -2.25,
            "s": "ccc",
            "l": [],
            "d": dt.date(1999, 12, 31),
            "ts": dt.datetime(1970, 1, 1),
            "b": False,
            "flag": True,
        },
    ]
    assert frame["tz"].to_list()[0] == TS.replace(tzinfo=dt.timezone.utc)
    assert frame["tz"].null_count() == 1


def test_scan_ticket_to_polars(shared: ServerProcess) -> None:
    """A scan ticket with projection, filter and limit reads straight into polars."""
    ticket = {"dataset": "typed", "columns": ["k", "s"], "filter": "s is not null", "limit": 5}
    frame = pl.from_arrow(do_get(shared, ticket).read_all())
    assert isinstance(frame, pl.DataFrame)
    assert frame.sort("k").to_dict(as_series=False) == {"k": [1, 3], "s": ["a", "ccc"]}


@pytest.mark.parametrize(
    "ticket",
    [{"sql": "select x from big"}, {"dataset": "big"}],
    ids=["sql", "scan"],
)
def test_large_result_is_streamed_in_batches(shared: ServerProcess, ticket: dict[str, object]) -> None:
    """A 1M-row result arrives as several batches (streamed), none of them the whole result."""
    sizes: list[int] = []
    total = 0
    for chunk in do_get(shared, ticket):
        sizes.append(chunk.data.num_rows)
        total += pc.sum(chunk.data.column(0)).as_py() or 0
    assert sum(sizes) == BIG_ROWS
    assert total == BIG_ROWS * (BIG_ROWS - 1) // 2
    assert len(sizes) > 1, sizes
    assert max(sizes) <= BIG_ROWS // 2, sizes


def test_lakehouse_client_round_trip(shared: ServerProcess) -> None:
    """``LakehouseClient``: ingest (create, then overwrite) and read back with ``query_batches``."""
    client = LakehouseClient(shared.location)
    try:
        first = pa.table({"id": pa.array(range(1000), pa.int64()), "name": [f"n{i}" for i in range(1000)]})
        result = client.ingest("roundtrip", first.schema, first.to_batches(max_chunksize=300), mode="create")
        assert result["dataset"] == "roundtrip" and result["rows_written"] == 1000
        first_snapshot = result["snapshot_id"]
        assert isinstance(first_snapshot, int)
        batches = list(client.query_batches("select * from roundtrip order by id"))
        assert all(isinstance(batch, pa.RecordBatch) for batch in batches)
        assert pa.Table.from_batches(batches).equals(first)

        second = pa.table({"id": pa.array([7, 8], pa.int64()), "name": ["seven", "eight"]})
        result = client.ingest("roundtrip", second.schema, second.to_batches(), mode="overwrite")
        assert result["rows_written"] == 2 and result["snapshot_id"] != first_snapshot
        rows = pa.Table.from_batches(list(client.query_batches("select * from roundtrip order by id")))
        assert rows.to_pylist() == [{"id": 7, "name": "seven"}, {"id": 8, "name": "eight"}]
        assert sorted(d["name"] for d in client.action("list_datasets")) == ["big", "roundtrip", "typed"]
    finally:
        client.close()


def test_results_do_not_depend_on_server_timezone(start_server: Callable[..., ServerProcess]) -> None:
    """A UTC timestamp comes back as UTC (type and wall clock) even when the server's TZ is not UTC."""
    server = start_server(env={"TZ": "America/New_York"})
    server.put("zoned", pa.table({"tz": pa.array([TS], pa.timestamp("us", tz="UTC"))}))
    table = server.sql("select tz, hour(tz) as h from zoned")
    assert str(table.schema.field("tz").type.tz) in UTC_NAMES, table.schema
    assert table.column("h").to_pylist() == [3]
    df = table.to_pandas()
    assert str(df["tz"].dtype.tz) in UTC_NAMES and df["tz"][0].hour == 3
