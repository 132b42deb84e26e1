"""Results of repeated small queries, kept per snapshot: answered again from memory while nothing they read
has changed, never once it has, and never for a query whose result may change by itself (``random()``,
``now()``, samples, Lance tables, vector searches). Through the Flight commands and ADBC."""

from __future__ import annotations

import math
from collections.abc import Iterator

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import ServerProcess, vector_array


def rows(start: int, count: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + count), pa.int64())})


def hits(server: ServerProcess) -> int:
    return int(server.action("health")["result_cache"]["hits"])


def answers_twice(server: ServerProcess, sql: str) -> tuple[list[dict], list[dict], int]:
    """``sql``'s rows on a first and a second run, and how many of the two runs the cache answered."""
    before = hits(server)
    first = server.sql(sql).to_pylist()
    second = server.sql(sql).to_pylist()
    return first, second, hits(server) - before


def test_a_repeated_query_is_answered_from_memory_until_its_dataset_changes(server: ServerProcess) -> None:
    """The second run of the same query over the same snapshot is a cache hit with the same rows; an append,
    an overwrite, a drop and a re-create each give the new answer at once."""
    server.put("events", rows(0, 100))
    sql = "SELECT count(*) AS n, sum(id) AS total FROM events"
    first, second, answered = answers_twice(server, sql)
    assert first == second == [{"n": 100, "total": 4950}]
    assert answered == 1
    server.put("events", rows(100, 5), mode="append")
    assert server.sql(sql).to_pylist() == [{"n": 105, "total": sum(range(105))}]
    server.put("events", rows(0, 3), mode="overwrite")
    assert server.sql(sql).to_pylist() == [{"n": 3, "total": 3}]
    server.action("drop_dataset", {"dataset": "events"})
    server.put("events", rows(10, 2))
    assert server.sql(sql).to_pylist() == [{"n": 2, "total": 21}]
    with pytest.raises(Exception, match="other"):  # a query of another dataset is not answered by this one
        server.sql("SELECT count(*) AS n FROM other")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT random() AS r FROM events LIMIT 1",
        "SELECT now() AS t, count(*) AS n FROM events",
        "SELECT current_timestamp AS t FROM events LIMIT 1",
        "SELECT gen_random_uuid()::VARCHAR AS u FROM events LIMIT 1",
        "SELECT count(*) AS n FROM events USING SAMPLE 50 PERCENT (bernoulli)",
        "SELECT count(*) AS n FROM range(10) t(i), events",
    ],
    ids=["random", "now", "current_timestamp", "uuid", "sample", "table_function"],
)
def test_results_that_may_change_by_themselves_are_never_kept(server: ServerProcess, sql: str) -> None:
    server.put("events", rows(0, 1000))
    before = hits(server)
    results = [server.sql(sql).to_pylist() for _ in range(3)]
    assert hits(server) == before, f"{sql!r} was answered from memory"
    if "random" in sql or "uuid" in sql:
        assert results[0] != results[1]


def test_lance_tables_are_read_again_every_time(server: ServerProcess) -> None:
    """A Lance table is read at its current version, so its results are not kept: an append is seen."""
    vectors = np.random.default_rng(0).random((3, 4), dtype=np.float32)
    server.put("vecs", pa.table({"id": pa.array([1, 2, 3], pa.int64()), "vec": vector_array(vectors)}))
    sql = "SELECT count(*) AS n FROM vecs"
    first, second, answered = answers_twice(server, sql)
    assert first == second == [{"n": 3}] and answered == 0
    more = pa.table({"id": pa.array([4], pa.int64()), "vec": vector_array(vectors[:1])})
    server.put("vecs", more, mode="append")
    assert server.sql(sql).to_pylist() == [{"n": 4}]


def test_large_results_are_not_kept(server: ServerProcess) -> None:
    server.put("events", rows(0, 300_000))
    first, second, answered = answers_twice(server, "SELECT id FROM events ORDER BY id")
    assert len(first) == len(second) == 300_000 and answered == 0


@pytest.fixture
def adbc(server: ServerProcess) -> Iterator[dbapi.Connection]:
    server.put("events", rows(0, 10))
    with dbapi.connect(server.location, autocommit=True) as connection:
        yield connection


def test_parameters_key_results_exactly(server: ServerProcess, adbc: dbapi.Connection) -> None:
    """A prepared query is kept per bound value: ``0.0`` and ``-0.0``, ``1`` and ``1.5``, ``'1'`` differ."""
    with adbc.cursor() as cursor:

        def answer(value: object) -> object:
            cursor.execute("SELECT 1 / ? AS x, count(*) AS n FROM events", (value,))
            return cursor.fetchall()[0][0]

        assert answer(0.0) == math.inf
        assert answer(-0.0) == -math.inf
        before = hits(server)
        assert answer(0.0) == math.inf and answer(-0.0) == -math.inf
        assert hits(server) - before == 2
        assert answer(2) == 0.5 and answer(4.0) == 0.25 and answer(2) == 0.5


def test_adbc_runs_of_a_prepared_query_are_answered_from_memory(
    server: ServerProcess, adbc: dbapi.Connection
) -> None:
    """The DB-API cursor prepares once and runs the statement again (GetFlightInfo and DoGet each time):
    every run after the first is a hit with the same rows, and an ingest in between is seen."""
    with adbc.cursor() as cursor:
        before = hits(server)
        for _ in range(20):
            cursor.execute("SELECT count(*) AS n, max(id) AS m FROM events")
            assert cursor.fetchall() == [(10, 9)]
        assert hits(server) - before == 19
        server.put("events", rows(10, 1), mode="append")
        cursor.execute("SELECT count(*) AS n, max(id) AS m FROM events")
        assert cursor.fetchall() == [(11, 10)]
