"""Vector tables (Lance) through a real server: DoPut, validation, exact, filtered, full-text and hybrid
search over three doors and DoExchange, deletes, optimize, SQL, time travel, history, drop and restart.

One server per storage kind serves the whole module (a server start costs seconds); every test uses
datasets of its own. Data is small and generated with fixed seeds; brute force is numpy in float64.
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime
import json
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    STORAGE_KINDS,
    ServerProcess,
    assert_already_exists,
    assert_no_root,
    assert_refusal,
    assert_same_rows,
    make_root,
    root_listing,
    running_server,
    search,
    vector_array,
    wait_for_index,
)

DIM = 16
METRICS = ("cosine", "l2", "dot")
RTOL = 1e-4
ATOL = 1e-5
# What ``_distance`` is for metric ``dot``: Lance's own convention, 1 - x.q (pinned by running the server;
# the API note said -x.q, which ranks the same).
DOT_OFFSET = 1.0


# -- helpers ---------------------------------------------------------------------------------------------


def random_vectors(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """``n`` standard normal float32 vectors."""
    return np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)


def vec_table(ids: range | list[int], vectors: np.ndarray, **extra: object) -> pa.Table:
    """``id`` (int64), ``vec`` (fixed_size_list<float32>), plus extra columns."""
    columns: dict[str, object] = {"id": pa.array(list(ids), pa.int64()), "vec": vector_array(vectors)}
    columns.update(extra)
    return pa.table(columns)


def distances(matrix: np.ndarray, query: np.ndarray, metric: str) -> np.ndarray:
    """Brute-force distances of every row of ``matrix`` to ``query``, in float64."""
    m = matrix.astype(np.float64)
    q = np.asarray(query, dtype=np.float64)
    if metric == "l2":
        return ((m - q) ** 2).sum(axis=1)
    if metric == "cosine":
        return 1.0 - (m @ q) / (np.linalg.norm(m, axis=1) * np.linalg.norm(q))
    if metric == "dot":
        return DOT_OFFSET - m @ q
    raise ValueError(metric)


def brute_force(matrix: np.ndarray, query: np.ndarray, metric: str, k: int) -> tuple[list[int], np.ndarray]:
    """Row positions and distances of the ``k`` nearest rows."""
    d = distances(matrix, query, metric)
    order = np.argsort(d, kind="stable")[:k]
    return order.tolist(), d[order]


def assert_nearest(
    result: pa.Table,
    matrix: np.ndarray,
    query: np.ndarray,
    metric: str,
    k: int,
    ids: np.ndarray | None = None,
) -> None:
    """``result`` (with ``id`` and ``_distance``) is exactly the brute-force top ``k`` of ``matrix``.

    ``ids`` maps row positions of ``matrix`` to ids (default: the position is the id).
    """
    positions, expected = brute_force(matrix, query, metric, k)
    want_ids = [int(ids[p]) if ids is not None else p for p in positions]
    assert result.num_rows == len(want_ids), (result.num_rows, len(want_ids))
    assert result.schema.field("_distance").type == pa.float32()
    assert result.column("id").to_pylist() == want_ids, (metric, result.column("id").to_pylist(), want_ids)
    got = np.asarray(result.column("_distance").to_pylist(), dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL, err_msg=f"metric {metric}")


def describe(server: ServerProcess, name: str) -> dict:
    """The ``describe_dataset`` action."""
    result = server.action("describe_dataset", {"dataset": name})
    assert isinstance(result, dict)
    return result


def listing(server: ServerProcess) -> dict[str, dict]:
    """``list_datasets`` keyed by name."""
    result = server.action("list_datasets")
    assert isinstance(result, list)
    return {entry["name"]: entry for entry in result}


def history(server: ServerProcess, name: str) -> list[dict]:
    """The ``dataset_history`` action."""
    result = server.action("dataset_history", {"dataset": name})
    assert isinstance(result, list)
    return result


def count(server: ServerProcess, name: str) -> int:
    """``count(*)`` through SQL."""
    return server.sql(f"select count(*) as n from {name}").column("n")[0].as_py()


def state(server: ServerProcess, name: str) -> tuple[int, int, int, int]:
    """What a refused write must leave unchanged: rows, version, versions, SQL count."""
    described = describe(server, name)
    return described["rows"], described["version"], described["versions"], count(server, name)


def decode_schema(encoded: str) -> pa.Schema:
    """An Arrow IPC schema sent as base64."""
    return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(encoded)))


def as_time(value: object) -> datetime.datetime:
    """A timestamp sent as ISO text or epoch seconds."""
    if isinstance(value, int | float):
        return datetime.datetime.fromtimestamp(value, datetime.timezone.utc)
    assert isinstance(value, str), value
    return datetime.datetime.fromisoformat(value)


def raw_action(server: ServerProcess, name: str, body: bytes) -> list[bytes]:
    """An action with raw body bytes; the raw result bodies."""
    return [r.body.to_pybytes() for r in server.client.do_action(flight.Action(name, body))]


def search_ticket(server: ServerProcess, body: dict) -> pa.Table:
    """DoGet ``{"search": body}``."""
    return server.ticket({"search": body})


def lance_entries(server: ServerProcess, name: str) -> list[str]:
    """What is stored under ``lance/<name>.lance/`` of the root (either backend)."""
    return sorted(entry for entry in root_listing(server.root) if entry.startswith(f"lance/{name}.lance/"))


# -- fixtures --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def shared(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per storage kind for the module; tests use datasets of their own."""
    root = make_root(request, request.param, tmp_path_factory.mktemp("vectors"), "vectors")
    with running_server(root) as server:
        yield server


MATRIX = random_vectors(1000, seed=11)
QUERIES = random_vectors(5, seed=12)


# -- DoPut -----------------------------------------------------------------------------------------------


def test_put_creates_lance_table(shared: ServerProcess) -> None:
    """A fixed_size_list<float32> column makes a path DoPut create a Lance table, with exact facts."""
    vectors = random_vectors(300, seed=1)
    table = vec_table(range(300), vectors, label=pa.array([f"l{i % 7}" for i in range(300)]))
    result = shared.put("auto_vecs", table, batch_rows=100)
    assert result["dataset"] == "auto_vecs"
    assert result["format"] == "lance"
    assert result["rows_written"] == 300
    assert result["created"] is True
    assert isinstance(result["version"], int)
    assert isinstance(result["seconds"], int | float) and result["seconds"] >= 0

    entry = listing(shared)["auto_vecs"]
    assert entry["format"] == "lance"
    assert entry["rows"] == 300
    assert entry["bytes"] > 0
    updated = datetime.datetime.fromisoformat(entry["updated_at"])
    assert abs((datetime.datetime.now(datetime.timezone.utc) - updated).total_seconds()) < 300

    described = describe(shared, "auto_vecs")
    assert_no_root(shared, described)
    assert described["name"] == "auto_vecs"
    assert described["format"] == "lance"
    assert described["rows"] == 300
    assert described["version"] == result["version"]
    assert described["versions"] == 1
    assert described["dimension"] == DIM
    assert described["metric"] == "cosine"
    assert described["vector_columns"] == {"vec": DIM}
    assert described["indexes"] == []
    assert described["bytes"] > 0 and described["files"] >= 1
    schema = decode_schema(described["schema"])
    assert schema.names == ["id", "vec", "label"]
    assert schema.field("vec").type == pa.list_(pa.float32(), DIM)

    assert lance_entries(shared, "auto_vecs"), "no files under lance/auto_vecs.lance/"
    assert not [e for e in root_listing(shared.root) if e.startswith("tables/auto_vecs")]
    # the rows are the ones sent
    back = shared.ticket({"dataset": "auto_vecs"}).sort_by("id")
    assert back.column("id").to_pylist() == list(range(300))
    assert back.column("label").to_pylist() == table.column("label").to_pylist()
    np.testing.assert_array_equal(np.asarray(back.column("vec").to_pylist(), dtype=np.float32), vectors)


def test_put_float16_vectors(shared: ServerProcess) -> None:
    """float16 vectors make a Lance table too, searchable: a stored vector finds itself first."""
    vectors = random_vectors(200, seed=2).astype(np.float16)
    table = pa.table({"id": pa.array(range(200), pa.int64()), "vec": vector_array(vectors, pa.float16())})
    result = shared.put("half_vecs", table)
    assert (result["format"], result["rows_written"]) == ("lance", 200)
    described = describe(shared, "half_vecs")
    assert (described["format"], described["dimension"], described["rows"]) == ("lance", DIM, 200)
    assert decode_schema(described["schema"]).field("vec").type.value_type in (pa.float16(), pa.float32())
    query = vectors[42].astype(np.float32)
    found = search(shared, {"dataset": "half_vecs", "vector": query.tolist(), "k": 5, "metric": "l2"})
    assert found.column("id")[0].as_py() == 42
    assert found.column("_distance")[0].as_py() <= 1e-3
    positions, _ = brute_force(vectors.astype(np.float32), query, "l2", 5)
    assert found.column("id").to_pylist() == positions


def test_format_lance_with_vector_column_and_format_parquet(shared: ServerProcess) -> None:
    """``format: lance`` + ``vector_column`` turns a list<float> column into the vector column;
    ``format: parquet`` keeps a fixed_size_list table an Iceberg dataset."""
    vectors = random_vectors(50, seed=3, dim=8)
    table = pa.table(
        {
            "name": pa.array([f"doc{i}" for i in range(50)]),
            "emb": pa.array(vectors.tolist(), pa.list_(pa.float32())),
        }
    )
    result = shared.put("listy", table, mode="create", format="lance", vector_column="emb")
    assert (result["format"], result["rows_written"], result["created"]) == ("lance", 50, True)
    described = describe(shared, "listy")
    assert described["vector_columns"] == {"emb": 8}
    assert described["dimension"] == 8
    assert decode_schema(described["schema"]).field("emb").type == pa.list_(pa.float32(), 8)
    found = search(shared, {"dataset": "listy", "vector": vectors[5].tolist(), "k": 3, "column": "emb"})
    assert found.column("name")[0].as_py() == "doc5"

    forced = shared.put("vec_parquet", vec_table(range(20), random_vectors(20, seed=4)), format="parquet")
    assert forced.get("format", "parquet") == "parquet"
    assert listing(shared)["vec_parquet"]["format"] == "parquet"
    assert count(shared, "vec_parquet") == 20
    assert not lance_entries(shared, "vec_parquet")


def test_append_overwrite_and_create_on_existing(shared: ServerProcess) -> None:
    """Append adds a version, overwrite replaces the rows, create on an existing table is refused."""
    first = shared.put("grow", vec_table(range(100), random_vectors(100, seed=5)), mode="create", metric="l2")
    assert first["created"] is True
    second = shared.put("grow", vec_table(range(100, 200), random_vectors(100, seed=6)))
    assert second["created"] is False
    assert second["rows_written"] == 100
    assert second["version"] > first["version"]
    described = describe(shared, "grow")
    assert (described["rows"], described["version"], described["versions"]) == (200, second["version"], 2)
    assert described["metric"] == "l2", "the metric is set at creation and kept by appends"
    entries = history(shared, "grow")
    assert [e["version"] for e in entries] == [second["version"], first["version"]]
    assert [e["rows"] for e in entries] == [200, 100]
    assert [e["current"] for e in entries] == [True, False]

    replacement = random_vectors(30, seed=7)
    third = shared.put("grow", vec_table(range(1000, 1030), replacement), mode="overwrite")
    assert third["rows_written"] == 30
    assert third["version"] > second["version"]
    assert describe(shared, "grow")["rows"] == 30
    assert shared.sql("select min(id) as lo, max(id) as hi, count(*) as n from grow").to_pylist() == [
        {"lo": 1000, "hi": 1029, "n": 30}
    ]
    found = search(shared, {"dataset": "grow", "vector": replacement[3].tolist(), "k": 1})
    assert found.column("id").to_pylist() == [1003]

    before = state(shared, "grow")
    with pytest.raises(pa.ArrowException) as exc:
        shared.put("grow", vec_table(range(5), random_vectors(5, seed=8)), mode="create")
    assert_already_exists(exc, shared, "grow")
    assert state(shared, "grow") == before


def test_concurrent_upserts_of_the_same_new_keys_insert_each_key_once(start_server) -> None:
    """Eight uploads at once upsert the same new keys, five rounds: every key is stored once, never twice
    (two concurrent merges each inserted the key they did not find: seen in the load generator)."""
    server = start_server(env={"LAKEHOUSE_MAX_CONCURRENT_INGESTS": "8"})
    server.put("keyed", vec_table(range(100), random_vectors(100, seed=40)), mode="upsert", key="id")

    def upsert(round_and_client: tuple[int, int]) -> None:
        number, client = round_and_client
        keys = range(1000 + 10 * number, 1010 + 10 * number)  # new keys, the same for every client
        vectors = random_vectors(10, seed=100 * number + client)
        server.put("keyed", vec_table(keys, vectors), mode="upsert", key="id")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        for number in range(5):
            list(pool.map(upsert, [(number, client) for client in range(8)]))
    counts = server.sql("select count(*) as n, count(distinct id) as keys from keyed").to_pylist()
    assert counts == [{"n": 150, "keys": 150}]


def test_upsert_replaces_by_key(shared: ServerProcess) -> None:
    """Upsert creates a missing table, then updates rows with existing keys and inserts the rest."""
    old = random_vectors(100, seed=9)
    created = shared.put(
        "people_vecs", vec_table(range(100), old, label=pa.array(["old"] * 100)), mode="upsert", key="id"
    )
    assert (created["format"], created["rows_written"], created["created"]) == ("lance", 100, True)
    before = describe(shared, "people_vecs")

    new = random_vectors(30, seed=10)
    result = shared.put(
        "people_vecs",
        vec_table(range(90, 120), new, label=pa.array(["new"] * 30)),
        batch_rows=10,
        mode="upsert",
        key="id",
    )
    assert (result["rows_inserted"], result["rows_updated"]) == (20, 10)
    assert result["created"] is False
    after = describe(shared, "people_vecs")
    assert after["rows"] == 120
    assert after["versions"] == before["versions"] + 1, "one version per DoPut"
    assert shared.sql(
        "select label, count(*) as n, min(id) as lo, max(id) as hi from people_vecs "
        "group by label order by label"
    ).to_pylist() == [
        {"label": "new", "n": 30, "lo": 90, "hi": 119},
        {"label": "old", "n": 90, "lo": 0, "hi": 89},
    ]
    assert shared.sql("select count(distinct id) as n from people_vecs").to_pylist() == [{"n": 120}]
    row = shared.ticket({"dataset": "people_vecs", "filter": "id = 95"}).to_pylist()
    assert len(row) == 1
    np.testing.assert_array_equal(np.asarray(row[0]["vec"], dtype=np.float32), new[5])
    found = search(shared, {"dataset": "people_vecs", "vector": new[5].tolist(), "k": 1})
    assert found.column("id").to_pylist() == [95]
    assert found.column("label").to_pylist() == ["new"]

    unchanged = state(shared, "people_vecs")
    small = vec_table(range(3), random_vectors(3, seed=13), label=pa.array(["x"] * 3))
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put("people_vecs", small, mode="upsert")
    assert_refusal(exc, shared, "key")
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put("people_vecs", small, mode="upsert", key="nosuch")
    assert_refusal(exc, shared, "nosuch")
    assert state(shared, "people_vecs") == unchanged

    shared.put("flat_rows", pa.table({"id": pa.array([1, 2], pa.int64()), "x": [1.0, 2.0]}))
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put(
            "flat_rows", pa.table({"id": pa.array([2], pa.int64()), "x": [5.0]}), mode="upsert", key="id"
        )
    assert_refusal(exc, shared, "flat_rows")
    assert shared.sql("select sum(x) as s from flat_rows").to_pylist() == [{"s": 3.0}]


# -- validation ------------------------------------------------------------------------------------------

BAD_VECTORS: dict[str, tuple[object, str]] = {
    # case -> (what replaces the bad row's vector, what the message must say, lower-cased)
    "nan": (float("nan"), "nan"),
    "pos_inf": (float("inf"), "inf"),
    "neg_inf": (float("-inf"), "inf"),
    "null": (None, "null"),
    "zero": (0.0, "zero"),
}


def with_bad_row(n: int, bad_row: int, case: str, seed: int) -> pa.Table:
    """``n`` rows whose row ``bad_row`` has a bad vector (one element NaN/Inf, all zero, or null)."""
    vectors = random_vectors(n, seed=seed)
    rows: list[list[float] | None] = vectors.tolist()
    value = BAD_VECTORS[case][0]
    if case == "null":
        rows[bad_row] = None
    elif case == "zero":
        rows[bad_row] = [0.0] * DIM
    else:
        rows[bad_row][3] = value  # type: ignore[index]
    return pa.table(
        {"id": pa.array(range(n), pa.int64()), "vec": pa.array(rows, pa.list_(pa.float32(), DIM))}
    )


@pytest.mark.parametrize("case", list(BAD_VECTORS))
def test_bad_vectors_refused_and_nothing_committed(shared: ServerProcess, case: str) -> None:
    """A bad vector in the third batch of a stream is refused naming the row; nothing is committed."""
    name = f"bad_{case}"
    shared.put(name, vec_table(range(100), random_vectors(100, seed=14)))
    before = state(shared, name)
    files_before = lance_entries(shared, name)
    reason = BAD_VECTORS[case][1]

    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put(name, with_bad_row(300, 250, case, seed=15), batch_rows=100)
    message = assert_refusal(exc, shared, "row 250", "'vec'")
    assert reason in message.lower(), message
    assert state(shared, name) == before
    assert len(history(shared, name)) == 1
    data_before = [e for e in files_before if "/data/" in e]
    assert [e for e in lance_entries(shared, name) if "/data/" in e] == data_before, "data files left behind"

    # the same on a new table: it is not created at all
    fresh = f"bad_new_{case}"
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put(fresh, with_bad_row(300, 299, case, seed=16), batch_rows=100)
    message = assert_refusal(exc, shared, "row 299")
    assert reason in message.lower(), message
    with pytest.raises(pa.ArrowKeyError):
        describe(shared, fresh)
    assert fresh not in listing(shared)


def test_large_batches_are_written_and_checked_slice_by_slice(shared: ServerProcess) -> None:
    """One uploaded batch of 50,000 rows (3.6 MB, fed to Lance in 2 MB slices): every row lands in order,
    and a bad vector in its last slice is refused naming its row of the upload, with nothing committed."""
    rows = 50_000
    table = vec_table(range(rows), random_vectors(rows, seed=18))
    assert table.nbytes > 3 * 2**20  # more than one slice
    result = shared.put("one_big_batch", table, batch_rows=rows, mode="create")
    assert result["rows_written"] == rows and result["version"] == 1
    stored = shared.sql("select id, vec from one_big_batch order by id")
    assert stored.column("id").to_pylist() == list(range(rows))
    assert stored.column("vec").equals(table.column("vec").cast(stored.schema.field("vec").type))

    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put("one_big_batch", with_bad_row(rows, 49_321, "nan", seed=19), batch_rows=rows)
    assert_refusal(exc, shared, "row 49321", "'vec'")
    assert len(history(shared, "one_big_batch")) == 1


def test_zero_vector_allowed_in_l2_table(shared: ServerProcess) -> None:
    """A zero vector has no cosine direction but is a fine point for l2."""
    table = with_bad_row(50, 7, "zero", seed=17)
    result = shared.put("zeros_ok", table, mode="create", metric="l2")
    assert result["rows_written"] == 50
    assert describe(shared, "zeros_ok")["metric"] == "l2"
    found = search(shared, {"dataset": "zeros_ok", "vector": [0.0] * DIM, "k": 1})
    assert found.column("id").to_pylist() == [7]
    assert found.column("_distance")[0].as_py() == 0.0


def test_wrong_dimension_append_refused(shared: ServerProcess) -> None:
    """Appending 16-dim vectors to an 8-dim table is refused naming both dimensions."""
    shared.put("dim8", vec_table(range(20), random_vectors(20, seed=18, dim=8)))
    before = state(shared, "dim8")
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put("dim8", vec_table(range(20, 220), random_vectors(200, seed=19, dim=16)), batch_rows=50)
    assert_refusal(exc, shared, "dimension 16", "'dim8'", "8", "'vec'")
    assert state(shared, "dim8") == before


# -- exact search ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
def test_exact_search_equals_brute_force(shared: ServerProcess, metric: str) -> None:
    """Without an index, search is brute force: the table's metric by default, or the one asked for."""
    name = f"exact_{metric}"
    shared.put(
        name,
        vec_table(range(len(MATRIX)), MATRIX, label=pa.array([f"r{i}" for i in range(len(MATRIX))])),
        mode="create",
        metric=metric,
    )
    assert describe(shared, name)["metric"] == metric
    for query in QUERIES:
        result = search(shared, {"dataset": name, "vector": query.tolist(), "k": 10})
        assert result.schema.names == ["id", "vec", "label", "_distance"]
        assert_nearest(result, MATRIX, query, metric, 10)
        assert result.column("label").to_pylist() == [f"r{i}" for i in result.column("id").to_pylist()]
        stored = np.asarray(result.column("vec").to_pylist(), dtype=np.float32)
        np.testing.assert_array_equal(stored, MATRIX[result.column("id").to_numpy()])
    other = METRICS[(METRICS.index(metric) + 1) % 3]
    for query in QUERIES[:2]:
        result = search(shared, {"dataset": name, "vector": query.tolist(), "k": 7, "metric": other})
        assert_nearest(result, MATRIX, query, other, 7)
    big = search(shared, {"dataset": name, "vector": QUERIES[0].tolist(), "k": 2000, "columns": ["id"]})
    assert big.num_rows == len(MATRIX), "k larger than the table gives every row"
    assert sorted(big.column("id").to_pylist()) == list(range(len(MATRIX)))
    got = np.asarray(big.column("_distance").to_pylist(), dtype=np.float64)
    assert np.all(np.diff(got) >= 0), "nearest first"
    want = distances(MATRIX, QUERIES[0], metric)[big.column("id").to_numpy()]
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


# -- filter and projection -------------------------------------------------------------------------------

FILTER_N = 2000
FILTER_MATRIX = random_vectors(FILTER_N, seed=20)


@pytest.fixture(scope="module")
def filtered_table(shared: ServerProcess) -> str:
    """``filtered``: 2000 rows, ``category`` = id % 50, ``tag`` 'rare' where category is 7, l2 metric."""
    ids = np.arange(FILTER_N)
    shared.put(
        "filtered",
        vec_table(
            range(FILTER_N),
            FILTER_MATRIX,
            category=pa.array(ids % 50, pa.int64()),
            tag=pa.array(["rare" if i % 50 == 7 else "common" for i in ids]),
        ),
        mode="create",
        metric="l2",
        batch_rows=500,
    )
    return "filtered"


def test_filter_applies_before_knn(shared: ServerProcess, filtered_table: str) -> None:
    """A 2% filter still gives exactly k rows, all matching, the nearest of the matching rows."""
    ids = np.arange(FILTER_N)
    query = random_vectors(1, seed=21)[0]
    result = search(
        shared, {"dataset": filtered_table, "vector": query.tolist(), "k": 10, "filter": "category = 7"}
    )
    assert result.num_rows == 10
    assert set(result.column("category").to_pylist()) == {7}
    mask = ids % 50 == 7
    assert_nearest(result, FILTER_MATRIX[mask], query, "l2", 10, ids=ids[mask])

    few = search(
        shared,
        {
            "dataset": filtered_table,
            "vector": query.tolist(),
            "k": 25,
            "filter": "tag = 'rare' AND id < 1000",
        },
    )
    mask = (ids % 50 == 7) & (ids < 1000)
    assert mask.sum() == 20
    assert few.num_rows == 20, "fewer matches than k: every match"
    assert_nearest(few, FILTER_MATRIX[mask], query, "l2", 20, ids=ids[mask])

    none = search(shared, {"dataset": filtered_table, "vector": query.tolist(), "k": 5, "filter": "id < 0"})
    assert none.num_rows == 0
    assert "_distance" in none.schema.names


def test_columns_projection(shared: ServerProcess, filtered_table: str) -> None:
    """``columns`` gives just those columns (in that order) and ``_distance``; the filter may use others."""
    query = random_vectors(1, seed=22)[0]
    result = search(
        shared,
        {
            "dataset": filtered_table,
            "vector": query.tolist(),
            "k": 8,
            "columns": ["tag", "id"],
            "filter": "category IN (1, 2, 3)",
        },
    )
    assert result.schema.names == ["tag", "id", "_distance"]
    ids = np.arange(FILTER_N)
    mask = np.isin(ids % 50, [1, 2, 3])
    assert_nearest(result, FILTER_MATRIX[mask], query, "l2", 8, ids=ids[mask])
    assert set(result.column("tag").to_pylist()) == {"common"}


def test_three_doors_give_the_same_rows(shared: ServerProcess, filtered_table: str) -> None:
    """The action, a DoGet ``search`` ticket and GetFlightInfo/GetSchema on a ``search`` command agree."""
    query = random_vectors(1, seed=23)[0]
    body = {"dataset": filtered_table, "vector": query.tolist(), "k": 12, "filter": "category < 25"}
    by_action = search(shared, body)
    assert by_action.num_rows == 12
    ids = np.arange(FILTER_N)
    mask = ids % 50 < 25
    assert_nearest(by_action, FILTER_MATRIX[mask], query, "l2", 12, ids=ids[mask])

    by_ticket = search_ticket(shared, body)
    assert_same_rows(by_ticket, by_action)
    assert by_ticket.schema.remove_metadata().equals(by_action.schema.remove_metadata())

    descriptor = flight.FlightDescriptor.for_command(json.dumps({"search": body}).encode())
    info = shared.client.get_flight_info(descriptor)
    assert info.total_records == -1
    assert len(info.endpoints) == 1
    assert info.schema.remove_metadata().equals(by_action.schema.remove_metadata()), (
        info.schema,
        by_action.schema,
    )
    from_info = shared.client.do_get(info.endpoints[0].ticket).read_all()
    assert_same_rows(from_info, by_action)
    schema = shared.client.get_schema(descriptor).schema
    assert schema.remove_metadata().equals(by_action.schema.remove_metadata())

    projected = dict(body, columns=["id"])
    info = shared.client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"search": projected}).encode())
    )
    assert info.schema.names == ["id", "_distance"]
    assert_same_rows(
        shared.client.do_get(info.endpoints[0].ticket).read_all(), by_action.select(["id", "_distance"])
    )


def test_exchange_many_queries(shared: ServerProcess, filtered_table: str) -> None:
    """200 query vectors streamed in uneven batches: k rows each, in order, each group the brute force."""
    queries = random_vectors(200, seed=24)
    k = 5
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"search": {"dataset": filtered_table, "k": k, "columns": ["id"]}}).encode()
    )
    schema = pa.schema([("vector", pa.list_(pa.float32(), DIM))])
    writer, reader = shared.client.do_exchange(descriptor)
    with writer:
        writer.begin(schema)
        start = 0
        for size in (50, 70, 30, 50):
            writer.write_batch(pa.record_batch([vector_array(queries[start : start + size])], schema=schema))
            start += size
        writer.done_writing()
        result = reader.read_all()
    assert result.schema.names == ["_query_index", "id", "_distance"]
    assert result.schema.field("_query_index").type == pa.int64()
    assert result.num_rows == 200 * k
    index = result.column("_query_index").to_numpy()
    np.testing.assert_array_equal(index, np.repeat(np.arange(200), k))
    for q in range(200):
        group = result.slice(q * k, k)
        assert_nearest(group, FILTER_MATRIX, queries[q], "l2", k)

    # a filter in the descriptor applies to every query
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps(
            {"search": {"dataset": filtered_table, "k": 3, "filter": "category = 7", "columns": ["id"]}}
        ).encode()
    )
    writer, reader = shared.client.do_exchange(descriptor)
    with writer:
        writer.begin(schema)
        writer.write_batch(pa.record_batch([vector_array(queries[:10])], schema=schema))
        writer.done_writing()
        filtered = reader.read_all()
    assert filtered.num_rows == 30
    assert all(i % 50 == 7 for i in filtered.column("id").to_pylist())


# -- full-text and hybrid --------------------------------------------------------------------------------

TOPICS = ("fruit", "cars", "space")
DOCS: list[tuple[str, str]] = [
    ("fruit", "Bananas are rich in potassium and make a sweet smoothie"),
    ("fruit", "A ripe mango tastes of summer"),
    ("fruit", "Apples and pears grow in the orchard behind the farm"),
    ("fruit", "Citrus fruits like oranges and lemons are full of vitamin C"),
    ("fruit", "Strawberries and blueberries go well with yogurt"),
    ("fruit", "The pineapple has a tough skin and sweet yellow flesh"),
    ("fruit", "Grapes can be eaten fresh or dried into raisins"),
    ("fruit", "Watermelon is mostly water and very refreshing"),
    ("fruit", "Cherries ripen early in the summer season"),
    ("fruit", "A kiwi is fuzzy outside and green inside"),
    ("cars", "The electric car battery charges overnight in the garage"),
    ("cars", "A diesel engine gives the truck a lot of torque"),
    ("cars", "Change the motor oil and rotate the tires every season"),
    ("cars", "The sports car accelerates from zero to sixty in four seconds"),
    ("cars", "Hybrid vehicles combine a petrol engine with an electric motor"),
    ("cars", "Winter tires grip the icy road better"),
    ("cars", "The mechanic replaced the brake pads and the clutch"),
    ("cars", "Self driving cars use lidar and cameras"),
    ("cars", "A convertible lets you drive with the roof down"),
    ("cars", "Fuel economy matters on a long highway trip"),
    ("space", "The rocket launched the satellite into orbit"),
    ("space", "Astronauts live on the international space station"),
    ("space", "A telescope observed a distant galaxy and its black hole"),
    ("space", "Mars has red dust and the tallest volcano in the solar system"),
    ("space", "The moon landing was watched by millions"),
    ("space", "Comets have icy tails that point away from the sun"),
    ("space", "Jupiter is a gas giant with a great red spot"),
    ("space", "A nebula is a cloud of gas where stars are born"),
    ("space", "The probe sent pictures of Saturn and its rings"),
    ("space", "Meteor showers light up the night sky"),
]
CENTERS = {topic: 3.0 * random_vectors(1, seed=30 + i)[0] for i, topic in enumerate(TOPICS)}


@pytest.fixture(scope="module")
def docs_table(shared: ServerProcess) -> str:
    """``docs``: 30 labelled documents whose vectors sit around one centre per topic, with an fts index."""
    noise = random_vectors(len(DOCS), seed=33) * 0.5
    vectors = np.stack([CENTERS[topic] for topic, _ in DOCS]) + noise
    table = vec_table(
        range(len(DOCS)),
        vectors,
        topic=pa.array([topic for topic, _ in DOCS]),
        text=pa.array([text for _, text in DOCS]),
    )
    shared.put("docs", table, mode="create", metric="l2")
    shared.put("docs_plain", table, mode="create", metric="l2")
    created = shared.action("create_index", {"dataset": "docs", "column": "text", "kind": "fts"})
    assert isinstance(created, dict)
    assert (created["dataset"], created["column"], created["kind"]) == ("docs", "text", "fts")
    assert created["index"] == "text_idx"
    assert created["state"] in ("ready", "building")
    entry = wait_for_index(shared, "docs", "text", timeout=60)
    assert entry["kind"] == "fts"
    return "docs"


def test_full_text_search(shared: ServerProcess, docs_table: str) -> None:
    """Text search ranks the document with the words first, scores with ``_score`` (higher first)."""
    cases = {
        "volcano": 23,
        "electric car battery": 10,
        "smoothie bananas potassium": 0,
        "satellite orbit rocket": 20,
        "brake pads clutch": 16,
    }
    for text, expected in cases.items():
        result = search(shared, {"dataset": docs_table, "text": text, "k": 5})
        assert "_score" in result.schema.names, result.schema
        assert "_distance" not in result.schema.names
        assert result.num_rows >= 1
        assert result.column("id")[0].as_py() == expected, (text, result.to_pylist())
        scores = result.column("_score").to_pylist()
        assert scores == sorted(scores, reverse=True), scores
        words = text.lower().split()
        for row in result.to_pylist():
            assert any(w in row["text"].lower() for w in words), (text, row)
    projected = search(
        shared, {"dataset": docs_table, "text": "galaxy telescope", "k": 3, "columns": ["id", "topic"]}
    )
    assert projected.schema.names == ["id", "topic", "_score"]
    assert projected.column("id")[0].as_py() == 22
    assert search(shared, {"dataset": docs_table, "text": "submarine", "k": 5}).num_rows == 0


def test_hybrid_search(shared: ServerProcess, docs_table: str) -> None:
    """Text + vector fuse into ``_score`` (higher first); the doc matching both is in the top results."""
    # The 10 car documents are the 10 nearest to the query; docs 10 ("electric car battery") and 14
    # ("electric motor") are the only text matches, so fusion ranks exactly those two first.
    query = CENTERS["cars"] + random_vectors(1, seed=34)[0] * 0.1
    result = search(
        shared, {"dataset": docs_table, "text": "electric battery", "vector": query.tolist(), "k": 10}
    )
    assert "_score" in result.schema.names
    scores = result.column("_score").to_pylist()
    assert scores == sorted(scores, reverse=True)
    assert set(result.column("id").to_pylist()[:2]) == {10, 14}, result.to_pylist()
    assert result.num_rows == 10
    assert set(result.column("topic").to_pylist()) == {"cars"}

    space = CENTERS["space"] + random_vectors(1, seed=35)[0] * 0.1
    result = search(shared, {"dataset": docs_table, "text": "volcano", "vector": space.tolist(), "k": 10})
    assert result.column("id")[0].as_py() == 23, result.to_pylist()
    assert result.column("_score")[0].as_py() > result.column("_score")[1].as_py()


def test_text_search_needs_an_fts_index(shared: ServerProcess, docs_table: str) -> None:
    """Text search on a table with no fts index is INVALID_ARGUMENT."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(shared, {"dataset": "docs_plain", "text": "volcano", "k": 5})
    message = assert_refusal(exc, shared)
    assert "index" in message.lower(), message
    assert not isinstance(exc.value, pa.ArrowKeyError)


# -- bad search input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bad_input_tables(shared: ServerProcess) -> str:
    """``probe`` (cosine, 16-dim) and the Parquet dataset ``plain_rows``."""
    shared.put(
        "probe", vec_table(range(100), random_vectors(100, seed=40), counter=pa.array(range(100), pa.int64()))
    )
    shared.put("plain_rows", pa.table({"id": pa.array([1, 2, 3], pa.int64())}))
    shared.put("secret_rows", pa.table({"id": pa.array([999], pa.int64())}))
    return "probe"


GOOD = random_vectors(1, seed=41)[0].tolist()
BAD_BODIES: list[tuple[str, dict, tuple[str, ...]]] = [
    ("wrong_dimension", {"vector": [0.5] * 8, "k": 5}, ("8", "16")),
    ("zero_vector_cosine", {"vector": [0.0] * DIM, "k": 5}, ("zero",)),
    ("k_zero", {"vector": GOOD, "k": 0}, ("k",)),
    ("k_too_big", {"vector": GOOD, "k": 10001}, ("k",)),
    ("k_not_int", {"vector": GOOD, "k": "ten"}, ("k",)),
    ("unknown_column", {"vector": GOOD, "k": 5, "columns": ["id", "nosuch"]}, ("nosuch",)),
    ("unknown_filter_column", {"vector": GOOD, "k": 5, "filter": "missing_col > 1"}, ("missing_col",)),
    ("bad_filter_syntax", {"vector": GOOD, "k": 5, "filter": "id >>> 3"}, ()),
    ("filter_subquery", {"vector": GOOD, "k": 5, "filter": "id IN (SELECT id FROM secret_rows)"}, ()),
    (
        "filter_read_csv",
        {"vector": GOOD, "k": 5, "filter": "id IN (SELECT 1 FROM read_csv('/etc/passwd'))"},
        (),
    ),
    ("filter_second_statement", {"vector": GOOD, "k": 5, "filter": "id > 1; DROP TABLE probe"}, ()),
    (
        "filter_union_escape",
        {"vector": GOOD, "k": 5, "filter": "1=0) UNION ALL SELECT * FROM secret_rows WHERE (1=1"},
        (),
    ),
    ("unknown_metric", {"vector": GOOD, "k": 5, "metric": "manhattan"}, ("manhattan",)),
    ("not_a_vector_column", {"vector": GOOD, "k": 5, "column": "counter"}, ("counter",)),
    ("unknown_vector_column", {"vector": GOOD, "k": 5, "column": "nosuch_vec"}, ("nosuch_vec",)),
    ("neither_vector_nor_text", {"k": 5}, ()),
    ("vector_not_numbers", {"vector": ["a"] * DIM, "k": 5}, ("vector",)),
    ("unknown_field", {"vector": GOOD, "k": 5, "bogus": 1}, ("bogus",)),
]


@pytest.mark.parametrize(("body", "fragments"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_search_input(
    shared: ServerProcess, bad_input_tables: str, body: dict, fragments: tuple[str, ...]
) -> None:
    """Each bad body is INVALID_ARGUMENT on the action and on a DoGet ticket; nothing changes."""
    full = {"dataset": bad_input_tables, **body}
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(shared, full)
    assert not isinstance(exc.value, pa.ArrowKeyError)
    assert_refusal(exc, shared, *fragments)
    with pytest.raises(pa.ArrowInvalid) as exc:
        search_ticket(shared, full)
    assert_refusal(exc, shared, *fragments)
    assert count(shared, "probe") == 100
    assert count(shared, "secret_rows") == 1


@pytest.mark.parametrize(("body", "fragments"), [c[1:] for c in BAD_BODIES], ids=[c[0] for c in BAD_BODIES])
def test_bad_search_input_flight_info(
    shared: ServerProcess, bad_input_tables: str, body: dict, fragments: tuple[str, ...]
) -> None:
    """GetFlightInfo and GetSchema refuse the same bodies up front (no ticket for a search that must fail)."""
    full = {"dataset": bad_input_tables, **body}
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"search": full}).encode())
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.client.get_flight_info(descriptor)
    assert_refusal(exc, shared, *fragments)
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.client.get_schema(descriptor)
    assert_refusal(exc, shared, *fragments)
    assert count(shared, "probe") == 100
    assert count(shared, "secret_rows") == 1


@pytest.mark.parametrize("token", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_query_refused(shared: ServerProcess, bad_input_tables: str, token: str) -> None:
    """A JSON NaN/Infinity token in the query vector is INVALID_ARGUMENT (raw bytes, not Python's json)."""
    numbers = ", ".join(["0.25"] * (DIM - 1) + [token])
    raw = f'{{"dataset": "{bad_input_tables}", "vector": [{numbers}], "k": 5}}'.encode()
    with pytest.raises(pa.ArrowInvalid) as exc:
        raw_action(shared, "vector_search", raw)
    message = assert_refusal(exc, shared)
    assert ("nan" if token == "NaN" else "inf") in message.lower(), message
    with pytest.raises(pa.ArrowInvalid):
        shared.client.do_get(flight.Ticket(b'{"search": ' + raw + b"}")).read_all()


def test_search_unknown_dataset_and_parquet_dataset(shared: ServerProcess, bad_input_tables: str) -> None:
    """An unknown dataset is NOT_FOUND naming it; a Parquet dataset is INVALID_ARGUMENT naming it."""
    body = {"vector": GOOD, "k": 5}
    with pytest.raises(pa.ArrowKeyError) as exc:
        search(shared, {"dataset": "nowhere_vecs", **body})
    assert_refusal(exc, shared, "nowhere_vecs")
    with pytest.raises(pa.ArrowKeyError) as exc:
        search_ticket(shared, {"dataset": "nowhere_vecs", **body})
    assert_refusal(exc, shared, "nowhere_vecs")
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(shared, {"dataset": "plain_rows", **body})
    assert not isinstance(exc.value, pa.ArrowKeyError)
    assert_refusal(exc, shared, "plain_rows")
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(shared, {"dataset": "../probe", **body})
    assert_refusal(exc, shared, "dataset")


# -- delete and optimize ---------------------------------------------------------------------------------


def test_delete_rows(shared: ServerProcess) -> None:
    """Deleted rows are gone from search, SQL and scans; the answer counts them; bad predicates refused."""
    vectors = random_vectors(500, seed=50)
    shared.put("shrink", vec_table(range(500), vectors), mode="create", metric="l2")
    version = describe(shared, "shrink")["version"]
    result = shared.action("delete_rows", {"dataset": "shrink", "where": "id < 100"})
    assert isinstance(result, dict)
    assert result["dataset"] == "shrink"
    assert result["rows_deleted"] == 100
    assert result["version"] > version
    described = describe(shared, "shrink")
    assert (described["rows"], described["version"]) == (400, result["version"])
    assert shared.sql("select count(*) as n, min(id) as lo from shrink").to_pylist() == [
        {"n": 400, "lo": 100}
    ]
    assert min(shared.ticket({"dataset": "shrink", "columns": ["id"]}).column("id").to_pylist()) == 100
    for gone in (0, 5, 99):
        found = search(shared, {"dataset": "shrink", "vector": vectors[gone].tolist(), "k": 20})
        assert all(i >= 100 for i in found.column("id").to_pylist())
        assert_nearest(found, vectors[100:], vectors[gone], "l2", 20, ids=np.arange(100, 500))
    assert shared.action("delete_rows", {"dataset": "shrink", "where": "id < 100"})["rows_deleted"] == 0

    unchanged = state(shared, "shrink")
    for where in ("nosuch > 1", "id IN (SELECT 1)", "id > 1; DROP TABLE shrink"):
        with pytest.raises(pa.ArrowInvalid) as exc:
            shared.action("delete_rows", {"dataset": "shrink", "where": where})
        assert_refusal(exc, shared)
    assert state(shared, "shrink") == unchanged
    with pytest.raises(pa.ArrowKeyError) as exc:
        shared.action("delete_rows", {"dataset": "nowhere_rows", "where": "id < 1"})
    assert_refusal(exc, shared, "nowhere_rows")


def test_optimize_keeps_data(shared: ServerProcess) -> None:
    """Optimize compacts fragments and drops old versions, reports facts, and keeps every row readable."""
    vectors = random_vectors(400, seed=51)
    for part in range(4):
        shared.put(
            "compact_me",
            vec_table(range(part * 100, part * 100 + 100), vectors[part * 100 : part * 100 + 100]),
        )
    shared.action("delete_rows", {"dataset": "compact_me", "where": "id % 10 = 0"})
    before = shared.sql("select count(*) as n, sum(id)::bigint as s from compact_me").to_pylist()
    assert before == [{"n": 360, "s": sum(i for i in range(400) if i % 10)}]
    versions_before = describe(shared, "compact_me")["versions"]

    facts = shared.action("optimize", {"dataset": "compact_me", "older_than_seconds": 0})
    assert isinstance(facts, dict)
    assert_no_root(shared, facts)
    for key in (
        "dataset",
        "version",
        "fragments_before",
        "fragments_after",
        "versions_before",
        "versions_after",
    ):
        assert key in facts, (key, facts)
    assert facts["dataset"] == "compact_me"
    assert facts["fragments_before"] >= 4
    assert facts["fragments_after"] < facts["fragments_before"]
    assert facts["versions_before"] == versions_before
    assert facts["versions_after"] < facts["versions_before"]
    described = describe(shared, "compact_me")
    assert described["version"] == facts["version"]
    assert described["versions"] == facts["versions_after"]
    assert described["rows"] == 360

    assert shared.sql("select count(*) as n, sum(id)::bigint as s from compact_me").to_pylist() == before
    keep = np.array([i for i in range(400) if i % 10])
    found = search(shared, {"dataset": "compact_me", "vector": vectors[123].tolist(), "k": 10})
    assert_nearest(found, vectors[keep], vectors[123], "cosine", 10, ids=keep)
    scanned = shared.ticket({"dataset": "compact_me"}).sort_by("id")
    assert scanned.column("id").to_pylist() == keep.tolist()
    np.testing.assert_array_equal(
        np.asarray(scanned.column("vec").to_pylist(), dtype=np.float32), vectors[keep]
    )

    again = shared.action("optimize", {"dataset": "compact_me"})
    assert again["dataset"] == "compact_me"
    assert shared.sql("select count(*) as n from compact_me").to_pylist() == [{"n": 360}]
    # last, so that a missing fact does not hide the checks above
    assert isinstance(facts.get("bytes_removed"), int), facts
    assert facts["bytes_removed"] >= 0


# -- SQL, scans and time travel --------------------------------------------------------------------------


def test_sql_over_lance_table(shared: ServerProcess) -> None:
    """SQL reads a Lance table (counts, filters, joins with Parquet); the sandbox still holds."""
    vectors = random_vectors(300, seed=60)
    shared.put(
        "sqlvecs", vec_table(range(300), vectors, category=pa.array([i % 3 for i in range(300)], pa.int64()))
    )
    shared.put(
        "cats", pa.table({"category": pa.array([0, 1, 2], pa.int64()), "label": ["zero", "one", "two"]})
    )
    assert shared.sql("SELECT count(*) AS n FROM sqlvecs").to_pylist() == [{"n": 300}]
    assert shared.sql(
        "select count(*) as n, sum(id)::bigint as s from sqlvecs where category = 1"
    ).to_pylist() == [{"n": 100, "s": sum(range(1, 300, 3))}]
    assert shared.sql(
        "select c.label, count(*) as n from sqlvecs v join cats c using (category) where v.id < 10 "
        "group by c.label order by c.label"
    ).to_pylist() == [{"label": "one", "n": 3}, {"label": "two", "n": 3}, {"label": "zero", "n": 4}]
    row = shared.sql("select id, vec from sqlvecs where id = 7").to_pylist()
    assert len(row) == 1
    np.testing.assert_array_equal(np.asarray(row[0]["vec"], dtype=np.float32), vectors[7])
    assert shared.sql("select count(*) as n from SQLVECS").to_pylist() == [{"n": 300}]

    for refused in (
        "select * from read_csv('/etc/passwd')",
        "select * from read_parquet('lance/sqlvecs.lance/data/*')",
        "select * from sqlvecs, read_text('/etc/hostname')",
        "copy sqlvecs to '/tmp/stolen.parquet'",
        "drop table sqlvecs",
        "delete from sqlvecs where id < 10",
        "insert into sqlvecs select * from sqlvecs",
        "attach '/tmp/x.db' as x",
    ):
        with pytest.raises(pa.ArrowException) as exc:
            shared.sql(refused)
        assert_refusal(exc, shared)
    assert shared.sql("select count(*) as n from sqlvecs").to_pylist() == [{"n": 300}]


def test_scan_ticket_and_time_travel(shared: ServerProcess) -> None:
    """Scan tickets project, filter and limit Lance tables; ``snapshot_id`` reads an older version."""
    first = shared.put("travel", vec_table(range(10), random_vectors(10, seed=61), tag=pa.array(["v1"] * 10)))
    second = shared.put(
        "travel", vec_table(range(10, 25), random_vectors(15, seed=62), tag=pa.array(["v2"] * 15))
    )
    assert second["version"] > first["version"]
    old = shared.ticket({"dataset": "travel", "snapshot_id": first["version"]})
    assert sorted(old.column("id").to_pylist()) == list(range(10))
    assert set(old.column("tag").to_pylist()) == {"v1"}
    assert shared.ticket({"dataset": "travel"}).num_rows == 25
    current = shared.ticket({"dataset": "travel", "snapshot_id": second["version"]})
    assert sorted(current.column("id").to_pylist()) == list(range(25))

    projected = shared.ticket({"dataset": "travel", "columns": ["tag", "id"], "filter": "id >= 20"})
    assert projected.schema.names == ["tag", "id"]
    assert sorted(projected.column("id").to_pylist()) == [20, 21, 22, 23, 24]
    assert shared.ticket({"dataset": "travel", "limit": 3}).num_rows == 3
    old_filtered = shared.ticket(
        {"dataset": "travel", "snapshot_id": first["version"], "columns": ["id"], "filter": "id > 6"}
    )
    assert sorted(old_filtered.column("id").to_pylist()) == [7, 8, 9]

    with pytest.raises(pa.ArrowKeyError) as exc:
        shared.ticket({"dataset": "travel", "snapshot_id": 98765})
    assert_refusal(exc, shared, "98765")
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.ticket({"dataset": "travel", "columns": ["id", "nosuch"]})
    assert_refusal(exc, shared, "nosuch")
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.ticket({"dataset": "travel", "filter": "id IN (SELECT 1 FROM read_csv('/etc/passwd'))"})
    assert_refusal(exc, shared)


# -- history, drop, names --------------------------------------------------------------------------------


def test_history_and_drop(shared: ServerProcess) -> None:
    """History lists versions newest first; drop removes the table and its files; the name is reusable."""
    puts = [
        shared.put("ephemeral", vec_table(range(i * 10, i * 10 + 10), random_vectors(10, seed=70 + i)))
        for i in range(3)
    ]
    deleted = shared.action("delete_rows", {"dataset": "ephemeral", "where": "id < 5"})
    entries = history(shared, "ephemeral")
    assert_no_root(shared, entries)
    versions = [p["version"] for p in puts] + [deleted["version"]]
    assert [e["version"] for e in entries] == versions[::-1]
    assert [e["rows"] for e in entries] == [25, 30, 20, 10]
    assert [e["current"] for e in entries] == [True, False, False, False]
    stamps = [as_time(e["timestamp"]) for e in entries]
    assert stamps == sorted(stamps, reverse=True)
    assert lance_entries(shared, "ephemeral")

    assert shared.action("drop_dataset", {"dataset": "ephemeral"}) == {"dropped": True}
    assert "ephemeral" not in listing(shared)
    assert not lance_entries(shared, "ephemeral"), lance_entries(shared, "ephemeral")
    for call in (
        lambda: describe(shared, "ephemeral"),
        lambda: history(shared, "ephemeral"),
        lambda: search(shared, {"dataset": "ephemeral", "vector": GOOD, "k": 3}),
        lambda: shared.sql("select count(*) from ephemeral"),
        lambda: shared.action("drop_dataset", {"dataset": "ephemeral"}),
    ):
        with pytest.raises(pa.ArrowKeyError) as exc:
            call()
        assert_refusal(exc, shared, "ephemeral")
    assert shared.action("drop_dataset", {"dataset": "ephemeral", "if_exists": True}) == {"dropped": False}

    shared.put("ephemeral", pa.table({"id": pa.array([1, 2, 3], pa.int64()), "name": ["a", "b", "c"]}))
    assert listing(shared)["ephemeral"]["format"] == "parquet"
    assert shared.sql("select count(*) as n from ephemeral").to_pylist() == [{"n": 3}]
    assert not lance_entries(shared, "ephemeral")
    assert shared.action("drop_dataset", {"dataset": "ephemeral"}) == {"dropped": True}
    again = shared.put("ephemeral", vec_table(range(4), random_vectors(4, seed=79)))
    assert (again["format"], again["created"]) == ("lance", True)
    assert count(shared, "ephemeral") == 4


def test_name_twins_across_formats(shared: ServerProcess) -> None:
    """Lance and Parquet names share one case-insensitive namespace; format conflicts are refused."""
    shared.put("twin_a", pa.table({"id": pa.array([1], pa.int64())}))
    shared.put("twin_b", vec_table(range(5), random_vectors(5, seed=80)))
    with pytest.raises(pa.ArrowException) as exc:
        shared.put("TWIN_A", vec_table(range(5), random_vectors(5, seed=81)))
    assert_already_exists(exc, shared, "twin_a")
    with pytest.raises(pa.ArrowException) as exc:
        shared.put("Twin_B", pa.table({"id": pa.array([1], pa.int64())}))
    assert_already_exists(exc, shared, "twin_b")
    with pytest.raises(pa.ArrowException) as exc:
        shared.put("Twin_B", vec_table(range(5), random_vectors(5, seed=82)), mode="create")
    assert_already_exists(exc, shared, "twin_b")

    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put("twin_b", vec_table(range(5), random_vectors(5, seed=83)), format="parquet")
    assert_refusal(exc, shared, "twin_b")
    with pytest.raises(pa.ArrowInvalid) as exc:
        shared.put(
            "twin_a",
            pa.table({"id": pa.array([2], pa.int64()), "vec": vector_array(random_vectors(1, seed=84))}),
            format="lance",
        )
    assert_refusal(exc, shared, "twin_a")
    names = listing(shared)
    assert (names["twin_a"]["format"], names["twin_a"]["rows"]) == ("parquet", 1)
    assert (names["twin_b"]["format"], names["twin_b"]["rows"]) == ("lance", 5)
    assert not {"TWIN_A", "Twin_B"} & set(names)


# -- restart (last: it restarts the module's server) -----------------------------------------------------


def test_restart_keeps_tables(shared: ServerProcess) -> None:
    """After a restart every Lance table is there with the same rows, versions and search answers."""
    vectors = random_vectors(200, seed=90)
    shared.put("durable", vec_table(range(100), vectors[:100]), mode="create", metric="dot")
    shared.put("durable", vec_table(range(100, 200), vectors[100:]))
    query = random_vectors(1, seed=91)[0]
    body = {"dataset": "durable", "vector": query.tolist(), "k": 10}
    before_search = search(shared, body)
    assert_nearest(before_search, vectors, query, "dot", 10)
    before = describe(shared, "durable")
    before_history = history(shared, "durable")
    before_listing = {name: (e["format"], e["rows"]) for name, e in listing(shared).items()}

    shared.restart()

    after = describe(shared, "durable")
    for key in ("rows", "version", "versions", "dimension", "metric", "vector_columns", "schema"):
        assert after[key] == before[key], key
    assert history(shared, "durable") == before_history
    assert {name: (e["format"], e["rows"]) for name, e in listing(shared).items()} == before_listing
    assert_same_rows(search(shared, body), before_search)
    assert count(shared, "durable") == 200
    more = shared.put("durable", vec_table(range(200, 210), random_vectors(10, seed=92)))
    assert more["version"] > before["version"]
    assert describe(shared, "durable")["rows"] == 210
