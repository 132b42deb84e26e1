"""``optimize`` on a Parquet dataset compacts its small data files (one per small append) into files of the
target size in one snapshot: the same rows, fewer files, time travel intact, concurrent writes kept."""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import ServerProcess
from tests.test_s3 import history_ids, table_files


def batch(first: int, rows: int = 10, **extra: pa.Array) -> pa.Table:
    """``rows`` rows with ids from ``first``; their value is the id times 3."""
    ids = np.arange(first, first + rows)
    return pa.table({"id": ids, "value": ids * 3, **extra})


def data_files(root: str, dataset: str) -> int:
    """Parquet data files of ``dataset`` under the root (current or not)."""
    return sum(1 for name in table_files(root) if f"/{dataset}/data/" in name and name.endswith(".parquet"))


def current_files(server: ServerProcess, dataset: str) -> int:
    """Data files of the dataset's current snapshot."""
    return server.action("describe_dataset", {"dataset": dataset})["files"]


def test_optimize_compacts_small_appends_into_one_file(server: ServerProcess) -> None:
    for number in range(30):
        server.put("small", batch(10 * number))
    before = server.sql("SELECT count(*) AS n, sum(value) AS total FROM small").to_pylist()
    old_snapshot = history_ids(server, "small")[0]  # the newest, before the compaction
    assert current_files(server, "small") == 30

    result = server.action("optimize", {"dataset": "small"})

    assert (result["files_compacted"], result["files_written"]) == (30, 1), result
    assert result["bytes_compacted"] > 0
    assert current_files(server, "small") == 1
    assert server.sql("SELECT count(*) AS n, sum(value) AS total FROM small").to_pylist() == before
    assert server.sql("SELECT count(DISTINCT id) AS n FROM small").to_pylist() == [{"n": 300}]
    assert len(history_ids(server, "small")) == 31, "the compaction is one more snapshot"
    travelled = server.ticket({"dataset": "small", "snapshot_id": old_snapshot})
    assert travelled.num_rows == 300, "time travel reads the old files"
    again = server.action("optimize", {"dataset": "small"})
    assert again["files_compacted"] == 0, "one file: nothing to compact"


def test_compaction_keeps_evolved_columns_and_nulls(server: ServerProcess) -> None:
    """Files written before a column was added read it as null after the rewrite, as before it."""
    for number in range(3):
        server.put("grown", batch(10 * number))
    for number in range(3, 6):
        labels = pa.array([f"l{i}" for i in range(10)])
        server.put("grown", batch(10 * number, label=labels), schema_mode="evolve")
    query = "SELECT count(*) AS n, count(label) AS labelled, sum(value) AS total FROM grown"
    before = server.sql(query).to_pylist()
    assert server.action("optimize", {"dataset": "grown"})["files_compacted"] == 6
    assert server.sql(query).to_pylist() == before == [{"n": 60, "labelled": 30, "total": 3 * sum(range(60))}]


def test_appends_during_compactions_are_kept(server: ServerProcess) -> None:
    """Appends racing repeated optimizes: every appended row is there once (a commit of the compaction
    replaces only the files it read); the compactions that lost answer UNAVAILABLE, nothing changed."""
    for number in range(20):
        server.put("racing", batch(10 * number))
    errors: list[BaseException] = []

    def appender() -> None:
        for number in range(20, 60):
            server.put("racing", batch(10 * number))

    def optimizer() -> None:
        for _ in range(8):
            try:
                server.action("optimize", {"dataset": "racing"})
            except flight.FlightUnavailableError as exc:
                assert "during the compaction" in str(exc) or "retry" in str(exc), exc
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=appender), threading.Thread(target=optimizer)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert server.sql("SELECT count(*) AS n, count(DISTINCT id) AS ids FROM racing").to_pylist() == [
        {"n": 600, "ids": 600}
    ]
    server.action("optimize", {"dataset": "racing"})
    assert current_files(server, "racing") == 1


def optimize_into(server: ServerProcess, dataset: str, outcome: list[object]) -> None:
    """Optimize ``dataset``; its result or its UNAVAILABLE refusal into ``outcome``."""
    try:
        outcome.append(server.action("optimize", {"dataset": dataset}))
    except flight.FlightUnavailableError as exc:
        outcome.append(exc)


@pytest.mark.parametrize("storage_root", ["local"], indirect=True)
def test_an_overwrite_during_a_compaction_wins(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """A compaction and an overwrite racing: afterwards only the overwrite's rows are there, whichever
    committed first (the compaction's commit finds its files gone and changes nothing)."""
    server = start_server()
    for round_number in range(5):
        for number in range(15):
            server.put("replaced", batch(10 * number))
        outcome: list[object] = []
        racing = threading.Thread(target=optimize_into, args=(server, "replaced", outcome))
        racing.start()
        server.put("replaced", batch(1000 * (round_number + 1), rows=7), mode="overwrite")
        racing.join(60)
        assert outcome, "optimize did not answer"
        rows = server.sql("SELECT min(id) AS lo, count(*) AS n FROM replaced").to_pylist()
        assert rows == [{"lo": 1000 * (round_number + 1), "n": 7}], (rows, outcome)
    assert data_files(storage_root, "replaced") > 0


def test_concurrent_optimizes_of_one_dataset_both_answer(server: ServerProcess) -> None:
    """Two optimizes at once: one compacts, the other waits for it and finds nothing left to compact (the
    soak's concurrent optimizes answered UNAVAILABLE: the second commit found its files gone)."""
    for number in range(30):
        server.put("twice", batch(10 * number))
    outcomes: list[object] = []
    threads = [threading.Thread(target=optimize_into, args=(server, "twice", outcomes)) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(isinstance(outcome, dict) for outcome in outcomes), outcomes
    assert sorted(outcome["files_compacted"] for outcome in outcomes) == [0, 0, 30]  # type: ignore[index]
    assert current_files(server, "twice") == 1
