"""Disk that does not grow forever: snapshots expire by the retention settings at every commit, by the
``expire_snapshots`` action and by ``optimize``; ``gc`` then frees their files and the folders they leave."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.table import TableProperties

from flight_lakehouse import catalog as catalog_module
from flight_lakehouse.catalog import COMMIT_PROPERTIES
from flight_lakehouse.datasets.base import Retention
from flight_lakehouse.storage import LocalStorage
from tests.conftest import POSTGRES_CATALOG, ServerProcess, assert_refusal, root_listing, vector_array
from tests.test_s3 import gc, history_ids, table_files

LOCAL = pytest.mark.parametrize("storage_root", ["local"], indirect=True)
#: Expiry commits through the catalog: on SQLite and on PostgreSQL.
BOTH_CATALOGS = pytest.mark.parametrize("storage_root", ["local", POSTGRES_CATALOG], indirect=True)
#: Keep the newest 3 snapshots, whatever their age.
KEEP_THREE = {"LAKEHOUSE_SNAPSHOT_KEEP_LAST": "3", "LAKEHOUSE_SNAPSHOT_KEEP_SECONDS": "0"}


def generation(number: int, rows: int = 2_000) -> pa.Table:
    """The rows of one overwrite: ``number`` in every row, so a snapshot's rows tell which one it is."""
    return pa.table({"id": np.arange(rows), "generation": np.full(rows, number)})


def data_bytes(root: str) -> int:
    """Bytes of the Parquet data files under ``tables/``."""
    return sum(size for name, size in table_files(root).items() if name.endswith(".parquet"))


def test_retention_keeps_the_newest_and_the_young() -> None:
    """The rule itself: the newest ``keep_last`` stay, and every one younger than ``keep_seconds``."""
    snapshots = [(1, 1_000), (2, 2_000), (3, 3_000), (4, 4_000), (5, 5_000)]  # (id, epoch ms), oldest first
    assert Retention(keep_last=2, keep_seconds=0).expired(snapshots, now=10.0) == [1, 2, 3]
    assert Retention(keep_last=2, keep_seconds=8.5).expired(snapshots, now=10.0) == [1]  # 2000 ms is young
    assert Retention(keep_last=5, keep_seconds=0).expired(snapshots, now=10.0) == []
    assert Retention(keep_last=1, keep_seconds=100).expired(snapshots, now=10.0) == []


def test_repeated_overwrites_reach_a_steady_disk_use(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """Overwrites with keep-last 3: three snapshots stay (the newest), and after gc the data on disk is
    that of three generations, the same after the fourth overwrite as after the sixth."""
    server = start_server(env=KEEP_THREE)
    sizes = []
    for number in range(6):
        server.put("daily", generation(number), mode="overwrite")
        assert len(history_ids(server, "daily")) == min(number + 1, 3)
        if number in (3, 5):
            gc(storage_root, "--apply", "--older-than-seconds", "0")
            sizes.append(data_bytes(storage_root))
    assert sizes[0] == sizes[1], f"disk use kept changing: {sizes}"
    assert len([name for name in table_files(storage_root) if name.endswith(".parquet")]) == 3

    newest = history_ids(server, "daily")
    assert server.sql("select min(generation) g, count(*) n from daily").to_pylist() == [{"g": 5, "n": 2000}]
    oldest_kept = server.ticket({"dataset": "daily", "snapshot_id": newest[-1], "columns": ["generation"]})
    assert set(oldest_kept.column("generation").to_pylist()) == {3}
    facts = server.action("describe_dataset", {"dataset": "daily"})
    assert facts["snapshots"] == 3 and facts["rows"] == 2000


@BOTH_CATALOGS
def test_time_travel_to_an_expired_snapshot_is_not_found(start_server: Callable[..., ServerProcess]) -> None:
    server = start_server(env=KEEP_THREE)
    server.put("ledger", generation(0), mode="overwrite")
    first = history_ids(server, "ledger")[0]
    for number in range(1, 4):
        server.put("ledger", generation(number), mode="overwrite")
    assert first not in history_ids(server, "ledger")
    with pytest.raises(pa.ArrowKeyError) as exc:
        server.ticket({"dataset": "ledger", "snapshot_id": first})
    assert_refusal(exc, server, f"snapshot {first} not found")


@BOTH_CATALOGS
def test_expire_snapshots_action_and_optimize(start_server: Callable[..., ServerProcess]) -> None:
    """The server's default retention keeps them all (100, a week); the action and optimize let go of what
    their bodies say, for Parquet snapshots and Lance versions alike; appends keep every row."""
    server = start_server()
    for number in range(6):
        server.put("events", generation(number, rows=100))
    assert len(history_ids(server, "events")) == 6

    done = server.action("expire_snapshots", {"dataset": "events", "keep_last": 4, "older_than_seconds": 0})
    assert {key: done[key] for key in ("snapshots_before", "snapshots_expired", "snapshots_after")} == {
        "snapshots_before": 6,
        "snapshots_expired": 2,
        "snapshots_after": 4,
    }
    assert len(history_ids(server, "events")) == 4
    assert server.sql("select count(*) n from events").to_pylist() == [{"n": 600}]  # appends: all rows stay

    young = server.action("expire_snapshots", {"dataset": "events", "keep_last": 1})  # a week by default
    assert young["snapshots_expired"] == 0
    optimized = server.action("optimize", {"dataset": "events", "older_than_seconds": 0})
    assert optimized["files_compacted"] == 6, optimized
    assert optimized["snapshots_after"] == 5, "optimize keeps the newest snapshot_keep_last (100)"
    assert server.sql("select count(*) n from events").to_pylist() == [{"n": 600}]

    vectors = pa.table({"id": [1, 2], "vec": vector_array(np.eye(2, dtype=np.float32))})
    for _ in range(4):
        server.put("points", vectors, mode="overwrite")
    expired = server.action(
        "expire_snapshots", {"dataset": "points", "keep_last": 2, "older_than_seconds": 0}
    )
    assert expired["snapshots_after"] == 2 and expired["snapshots_expired"] >= 2
    assert len(server.action("dataset_history", {"dataset": "points"})) == 2
    assert server.sql("select count(*) n from points").to_pylist() == [{"n": 2}]


@LOCAL
def test_expire_snapshots_refusals(server: ServerProcess) -> None:
    server.put("kept", generation(0, rows=10))
    for body, status, fragment in [
        ({"dataset": "missing"}, pa.ArrowKeyError, "not found"),
        ({"dataset": "kept", "keep_last": 0}, pa.ArrowInvalid, "keep_last"),
        ({"dataset": "kept", "older_than_seconds": -1}, pa.ArrowInvalid, "older_than_seconds"),
        ({"dataset": "../x"}, pa.ArrowInvalid, "dataset"),
    ]:
        with pytest.raises(status) as exc:
            server.action("expire_snapshots", body)
        assert fragment in str(exc.value), (body, str(exc.value))
    assert len(history_ids(server, "kept")) == 1


@LOCAL
def test_gc_removes_the_folders_it_empties(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """A table whose catalog entry is gone (its files orphans): gc deletes them and leaves no empty
    folder behind, while the folders of live tables stay."""
    server = start_server()
    server.put("live", generation(0, rows=10))
    server.put("lost", generation(0, rows=10))
    server.stop()
    with sqlite3.connect(Path(storage_root) / "catalog.db") as connection:
        connection.execute("delete from iceberg_tables where table_name = 'lost'")
    gc(storage_root, "--apply", "--older-than-seconds", "0")
    listing = root_listing(storage_root)
    assert not any("lost" in entry for entry in listing), sorted(listing)
    assert any(entry.startswith("tables/live/data/") for entry in listing)


@LOCAL
def test_many_small_appends_keep_manifests_and_metadata_files_bounded(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """One-row appends: the current snapshot lists at most ``min-count-to-merge`` manifests (each append
    added one that every later commit listed: appends slowed down as they piled up), and the table's
    metadata folder keeps at most ``previous-versions-max`` + 1 metadata files. A table made without
    these properties (by an older server) gets them at its next commit."""
    server = start_server()
    server.put("small", one_row(0), mode="create")
    server.stop()
    catalog = SqlCatalog("lakehouse", uri=f"sqlite:///{storage_root}/catalog.db")
    table = catalog.load_table(("lakehouse", "small"))
    with table.transaction() as tx:
        tx.remove_properties(*COMMIT_PROPERTIES)
    assert not set(COMMIT_PROPERTIES) & set(catalog.load_table(("lakehouse", "small")).properties)
    server = start_server()
    appends = 60
    for row_id in range(1, appends + 1):
        server.put("small", one_row(row_id))
    table = catalog.load_table(("lakehouse", "small"))
    assert {key: table.properties.get(key) for key in COMMIT_PROPERTIES} == COMMIT_PROPERTIES
    manifests = table.current_snapshot().manifests(table.io)
    assert len(manifests) <= int(COMMIT_PROPERTIES[TableProperties.MANIFEST_MIN_MERGE_COUNT]), len(manifests)
    metadata = list((Path(storage_root) / "tables" / "small" / "metadata").glob("*.metadata.json"))
    assert len(metadata) <= int(COMMIT_PROPERTIES[TableProperties.METADATA_PREVIOUS_VERSIONS_MAX]) + 1
    assert server.sql("select count(*) n, sum(id) s from small").to_pylist() == [
        {"n": appends + 1, "s": appends * (appends + 1) // 2}
    ]


def one_row(row_id: int) -> pa.Table:
    return pa.table({"id": pa.array([row_id], pa.int64())})


def test_planned_snapshots_cache_stays_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every commit of a growing table makes a new snapshot listing all its files; planning each one (as
    the first query of every new snapshot does) kept every list, up to 4,096 of them: quadratically many
    names (the soak's RSS grew by the minute). The cache now holds a bounded number of names, the least
    recently used forgotten first, and answers the same."""
    monkeypatch.setattr(catalog_module, "CACHED_SNAPSHOT_FILES", 100)
    storage = LocalStorage(tmp_path / "root")
    catalog = catalog_module.DatasetCatalog(storage)
    schema = one_row(0).schema
    for number in range(40):
        uri = storage.uri("tables", "growing", "data", f"{number:05d}.parquet")
        Path(storage.fs_path(uri)).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(one_row(number), storage.fs_path(uri))
        if number == 0:
            catalog.create_with_files("growing", schema, [uri])
        else:
            catalog.add_files(catalog.load("growing"), schema, [uri], replace=False, evolve=False)
        planned = catalog.snapshot_files(catalog.metadata_locations()["growing"])
        assert len(planned.files) == number + 1
    held = sum(len(planned.files) + 1 for planned in catalog._snapshot_cache.values())
    assert held <= 100 + 40, held  # all 40 would hold 860 names
    again = catalog.snapshot_files(catalog.metadata_locations()["growing"])
    assert len(again.files) == 40
