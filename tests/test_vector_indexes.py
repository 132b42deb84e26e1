"""Vector and scalar indexes through a real server: recall of ivf_pq and ivf_hnsw_sq, btree and bitmap,
refusals, appended rows, searches during a build, and indexes kept over a restart.

The slow cases share one server on a local root; the restart case runs on both roots.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    ServerProcess,
    assert_already_exists,
    assert_refusal,
    assert_same_rows,
    index_entry,
    running_server,
    search,
    vector_array,
    wait_for_index,
)

N, DIM, CLUSTERS, QUERY_COUNT, K = 20_000, 32, 50, 50, 10
# Search settings that reach the recall floor on this data (reported in the test docstrings).
PQ_SEARCH = {"nprobes": 20, "refine_factor": 20}
HNSW_SEARCH = {"nprobes": 20, "ef": 100, "refine_factor": 5}  # SQ alone tops out near 0.95
RECALL_FLOOR = 0.90
#: Searches answered by Lance and its indexes, not by the in-memory graphs (--vector-cache-mb 0).
LANCE_ONLY = ("--vector-cache-mb", "0")


def clustered(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """``n`` float32 points around ``clusters`` random centres (spread 4, unit noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32) * 4
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def vec_table(ids: range | np.ndarray, vectors: np.ndarray, **extra: object) -> pa.Table:
    """``id`` (int64), ``vec`` (fixed_size_list<float32>), plus extra columns."""
    columns: dict[str, object] = {"id": pa.array(np.asarray(ids), pa.int64()), "vec": vector_array(vectors)}
    columns.update(extra)
    return pa.table(columns)


def l2_top(matrix: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Row positions of the ``k`` nearest rows by squared euclidean distance."""
    d = ((matrix.astype(np.float64) - query.astype(np.float64)) ** 2).sum(axis=1)
    return np.argsort(d, kind="stable")[:k]


def describe(server: ServerProcess, name: str) -> dict:
    """The ``describe_dataset`` action."""
    result = server.action("describe_dataset", {"dataset": name})
    assert isinstance(result, dict)
    return result


def create_index(server: ServerProcess, **body: object) -> dict:
    """The ``create_index`` action."""
    result = server.action("create_index", body)
    assert isinstance(result, dict)
    return result


def recall(server: ServerProcess, dataset: str, settings: dict) -> float:
    """Mean recall@K of the module's queries against brute force."""
    hits = 0
    for query, truth in zip(QUERIES, TRUTH, strict=True):
        body = {"dataset": dataset, "vector": query.tolist(), "k": K, "columns": ["id"], **settings}
        result = search(server, body)
        assert result.num_rows == K
        hits += len(set(result.column("id").to_pylist()) & set(truth.tolist()))
    return hits / (K * len(QUERIES))


DATA = clustered(N, DIM, CLUSTERS, seed=7)
_rng = np.random.default_rng(8)
QUERIES = (DATA[_rng.integers(0, N, QUERY_COUNT)] + _rng.normal(size=(QUERY_COUNT, DIM)) * 0.1).astype(
    np.float32
)
TRUTH = [l2_top(DATA, q, K) for q in QUERIES]


@pytest.fixture(scope="module")
def local(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server on a local root for the slow index cases; searches go to Lance and its indexes (no
    in-memory serving), which is what these tests are about."""
    with running_server(str(tmp_path_factory.mktemp("indexes") / "lakehouse"), *LANCE_ONLY) as server:
        yield server


def build(server: ServerProcess, dataset: str, kind: str, **options: object) -> dict:
    """Upload DATA as ``dataset`` (l2), build a ``kind`` index on ``vec`` and wait until it is ready."""
    server.put(dataset, vec_table(range(N), DATA), batch_rows=5000, mode="create", metric="l2")
    started = create_index(server, dataset=dataset, column="vec", kind=kind, **options)
    assert started["dataset"] == dataset
    assert (started["column"], started["kind"], started["index"]) == ("vec", kind, "vec_idx")
    assert started["state"] in ("ready", "building")
    entry = wait_for_index(server, dataset, "vec", timeout=180)
    assert entry["kind"] == kind
    assert entry["indexed_rows"] == N
    assert entry["unindexed_rows"] == 0
    return entry


@pytest.fixture(scope="module")
def pq_dataset(local: ServerProcess) -> str:
    """``clustered_pq``: DATA with a ready ivf_pq index (50 partitions, 8 sub-vectors)."""
    build(local, "clustered_pq", "ivf_pq", num_partitions=50, num_sub_vectors=8)
    return "clustered_pq"


@pytest.fixture(scope="module")
def hnsw_dataset(local: ServerProcess) -> str:
    """``clustered_hnsw``: DATA with a ready ivf_hnsw_sq index."""
    build(local, "clustered_hnsw", "ivf_hnsw_sq", num_partitions=50, m=16, ef_construction=100)
    return "clustered_hnsw"


# -- vector indexes --------------------------------------------------------------------------------------


def test_ivf_pq_recall(local: ServerProcess, pq_dataset: str) -> None:
    """ivf_pq reaches recall@10 >= 0.90 with nprobes=20, refine_factor=20; the index is really used."""
    measured = recall(local, pq_dataset, PQ_SEARCH)
    print(f"ivf_pq recall@{K} = {measured:.3f} with {PQ_SEARCH}")
    assert measured >= RECALL_FLOOR
    # Refined results carry exact distances; unrefined ones carry PQ approximations, which a flat scan
    # would never give: so the index, not brute force, answers.
    exact, approximate = 0, 0
    for query in QUERIES[:10]:
        refined = search(local, {"dataset": pq_dataset, "vector": query.tolist(), "k": K, **PQ_SEARCH})
        ids = refined.column("id").to_numpy()
        want = ((DATA[ids].astype(np.float64) - query) ** 2).sum(axis=1)
        got = np.asarray(refined.column("_distance").to_pylist())
        exact += np.allclose(got, want, rtol=1e-3, atol=1e-4)
        raw = search(local, {"dataset": pq_dataset, "vector": query.tolist(), "k": K, "nprobes": 1})
        ids = raw.column("id").to_numpy()
        want = ((DATA[ids].astype(np.float64) - query) ** 2).sum(axis=1)
        approximate += not np.allclose(
            np.asarray(raw.column("_distance").to_pylist()), want, rtol=1e-3, atol=1e-4
        )
    assert exact == 10, "refine_factor gives exact distances"
    assert approximate >= 5, "without refinement the distances are PQ approximations (index in use)"


def test_concurrent_lance_searches_each_get_their_own_rows(local: ServerProcess, pq_dataset: str) -> None:
    """16 clients searching the ivf_pq table at once (concurrent searches with the same parameters are
    answered by one multi-vector Lance query): every client gets the rows its search alone gives, and a
    filter Lance refuses fails only the searches that sent it."""
    selections = [["id"], ["id", "vec"]]
    filters = [None, "id % 2 = 0", "no_such_column > 1"]
    requests = [
        {
            "dataset": pq_dataset,
            "vector": QUERIES[i % QUERY_COUNT].tolist(),
            "k": (5, K)[i % 2],
            "columns": selections[i // 2 % 2],
            **({"filter": filters[i % 3]} if filters[i % 3] else {}),
            **PQ_SEARCH,
        }
        for i in range(60)
    ]
    refused = {i for i, request in enumerate(requests) if request.get("filter") == filters[2]}
    alone = {i: search(local, request) for i, request in enumerate(requests) if i not in refused}
    start = threading.Barrier(16)

    def client(first: int) -> list[tuple[int, pa.Table | Exception]]:
        connection = flight.FlightClient(local.location)
        start.wait()
        got: list[tuple[int, pa.Table | Exception]] = []
        for i in range(first, len(requests), 16):
            ticket = flight.Ticket(json.dumps({"search": requests[i]}).encode())
            try:
                got.append((i, connection.do_get(ticket).read_all()))
            except pa.ArrowException as exc:  # INVALID_ARGUMENT arrives as ArrowInvalid
                got.append((i, exc))
        return got

    with ThreadPoolExecutor(16) as pool:
        answers = dict(answer for part in pool.map(client, range(16)) for answer in part)
    assert len(answers) == len(requests)
    for i, answer in answers.items():
        if i in refused:
            assert isinstance(answer, pa.ArrowInvalid), answer
            assert "no_such_column" in str(answer), answer
        else:
            assert isinstance(answer, pa.Table), answer
            assert_same_rows(answer, alone[i])
            assert answer.num_rows == requests[i]["k"]


def test_ivf_hnsw_sq_recall(local: ServerProcess, hnsw_dataset: str) -> None:
    """ivf_hnsw_sq reaches recall@10 >= 0.90 with nprobes=20, ef=100, refine_factor=5."""
    described = describe(local, hnsw_dataset)
    assert [(e["column"], e["kind"], e["state"]) for e in described["indexes"]] == [
        ("vec", "ivf_hnsw_sq", "ready")
    ]
    measured = recall(local, hnsw_dataset, HNSW_SEARCH)
    print(f"ivf_hnsw_sq recall@{K} = {measured:.3f} with {HNSW_SEARCH}")
    assert measured >= RECALL_FLOOR


def test_appended_rows_are_found(local: ServerProcess, pq_dataset: str) -> None:
    """Rows appended after the build are unindexed yet found: an exact appended vector comes back first."""
    rng = np.random.default_rng(9)
    fresh = (rng.normal(size=(5, DIM)) * 0.3 + 20.0).astype(np.float32)  # far from every cluster
    local.put(pq_dataset, vec_table(range(N, N + 5), fresh))
    entry = index_entry(local, pq_dataset, "vec")
    assert entry is not None
    assert (entry["state"], entry["indexed_rows"], entry["unindexed_rows"]) == ("ready", N, 5)
    for i, vector in enumerate(fresh):
        found = search(local, {"dataset": pq_dataset, "vector": vector.tolist(), "k": 3, **PQ_SEARCH})
        assert found.column("id")[0].as_py() == N + i
        assert found.column("_distance")[0].as_py() <= 1e-4
    # and an old row is still found through the index
    found = search(local, {"dataset": pq_dataset, "vector": DATA[123].tolist(), "k": 1, **PQ_SEARCH})
    assert found.column("id").to_pylist() == [123]


# -- scalar indexes and refusals -------------------------------------------------------------------------


SCALAR_VECTORS = np.random.default_rng(10).normal(size=(3000, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def scalar_dataset(local: ServerProcess) -> str:
    """``scalars``: 3000 rows with ``category`` (id % 30), ``tag`` (5 values) and 16-dim vectors."""
    ids = np.arange(3000)
    local.put(
        "scalars",
        vec_table(
            ids,
            SCALAR_VECTORS,
            category=pa.array(ids % 30, pa.int64()),
            tag=pa.array([f"t{i % 5}" for i in ids]),
            note=pa.array([f"row number {i}" for i in ids]),
        ),
        mode="create",
        metric="l2",
    )
    return "scalars"


def test_btree_and_bitmap_keep_filters_correct(local: ServerProcess, scalar_dataset: str) -> None:
    """btree on ``category`` and bitmap on ``tag`` build; filtered search, scans and SQL stay exact."""
    vectors = SCALAR_VECTORS
    query = np.random.default_rng(11).normal(size=16).astype(np.float32)
    ids = np.arange(3000)
    cases = {
        "category = 7": ids % 30 == 7,
        "category BETWEEN 3 AND 5 AND tag = 't2'": (ids % 30 >= 3) & (ids % 30 <= 5) & (ids % 5 == 2),
        "tag IN ('t1', 't4')": np.isin(ids % 5, [1, 4]),
    }

    def check() -> None:
        for where, mask in cases.items():
            result = search(
                local, {"dataset": scalar_dataset, "vector": query.tolist(), "k": 10, "filter": where}
            )
            want = ids[mask][l2_top(vectors[mask], query, 10)]
            assert result.column("id").to_pylist() == want.tolist(), where
            scanned = local.ticket({"dataset": scalar_dataset, "columns": ["id"], "filter": where})
            assert sorted(scanned.column("id").to_pylist()) == ids[mask].tolist(), where
            sql = local.sql(f"select count(*) as n from {scalar_dataset} where {where}")
            assert sql.to_pylist() == [{"n": int(mask.sum())}], where

    check()
    for column, kind in (("category", "btree"), ("tag", "bitmap")):
        started = create_index(local, dataset=scalar_dataset, column=column, kind=kind)
        assert (started["column"], started["kind"], started["index"]) == (column, kind, f"{column}_idx")
        entry = wait_for_index(local, scalar_dataset, column, timeout=60)
        assert entry["kind"] == kind
    kinds = {e["column"]: (e["kind"], e["state"]) for e in describe(local, scalar_dataset)["indexes"]}
    assert kinds == {"category": ("btree", "ready"), "tag": ("bitmap", "ready")}
    check()


def test_index_refusals_and_replace(local: ServerProcess, scalar_dataset: str) -> None:
    """Wrong kinds for a column are refused; a second index needs ``replace``; replace works."""
    for column, kind in (("category", "ivf_pq"), ("tag", "ivf_hnsw_sq"), ("category", "fts"), ("vec", "fts")):
        with pytest.raises(pa.ArrowInvalid) as exc:
            create_index(local, dataset=scalar_dataset, column=column, kind=kind)
        assert not isinstance(exc.value, pa.ArrowKeyError)
        assert_refusal(exc, local, column)
    with pytest.raises(pa.ArrowInvalid) as exc:
        create_index(local, dataset=scalar_dataset, column="vec", kind="kdtree")
    assert_refusal(exc, local, "kdtree")
    with pytest.raises(pa.ArrowKeyError) as exc:
        create_index(local, dataset="no_such_table", column="vec", kind="ivf_pq")
    assert_refusal(exc, local, "no_such_table")

    first = create_index(local, dataset=scalar_dataset, column="note", kind="fts")
    assert first["kind"] == "fts"
    wait_for_index(local, scalar_dataset, "note", timeout=60)
    with pytest.raises(pa.ArrowException) as exc:
        create_index(local, dataset=scalar_dataset, column="note", kind="fts")
    assert_already_exists(exc, local, "'note'")

    # ivf_pq on vec, then replace it with ivf_hnsw_sq
    create_index(
        local, dataset=scalar_dataset, column="vec", kind="ivf_pq", num_partitions=4, num_sub_vectors=4
    )
    wait_for_index(local, scalar_dataset, "vec", timeout=120)
    with pytest.raises(pa.ArrowException) as exc:
        create_index(local, dataset=scalar_dataset, column="vec", kind="ivf_hnsw_sq")
    assert_already_exists(exc, local, "'vec'")
    replaced = create_index(local, dataset=scalar_dataset, column="vec", kind="ivf_hnsw_sq", replace=True)
    assert replaced["kind"] == "ivf_hnsw_sq"
    entry = wait_for_index(local, scalar_dataset, "vec", timeout=120)
    assert entry["kind"] == "ivf_hnsw_sq"
    vec_entries = [e for e in describe(local, scalar_dataset)["indexes"] if e["column"] == "vec"]
    assert len(vec_entries) == 1, vec_entries
    found = search(local, {"dataset": scalar_dataset, "vector": [0.0] * 16, "k": 5, "nprobes": 4})
    assert found.num_rows == 5
    text = search(local, {"dataset": scalar_dataset, "text": "2999", "k": 3})
    assert text.column("id")[0].as_py() == 2999


# -- searches during a build ------------------------------------------------------------------------------

BIG_N, BIG_DIM = 100_000, 64
SEARCH_BOUND = 10.0  # seconds; a blocked search would wait for the whole build


def test_build_in_progress_does_not_block_searches(local: ServerProcess) -> None:
    """While an ivf_pq build runs (describe says 'building'), searches answer, each in a few seconds."""
    data = clustered(BIG_N, BIG_DIM, CLUSTERS, seed=12)
    local.put("big_vecs", vec_table(range(BIG_N), data), batch_rows=25_000, mode="create", metric="l2")
    started_at = time.monotonic()
    started = create_index(
        local, dataset="big_vecs", column="vec", kind="ivf_pq", num_partitions=128, num_sub_vectors=8
    )
    assert started["state"] == "building", f"the build finished within the action's wait: {started}"

    during: list[float] = []
    entry = index_entry(local, "big_vecs", "vec")
    assert entry is not None and entry["state"] == "building", entry
    assert {"elapsed_seconds", "rows"} <= set(entry["progress"]), entry
    # a second build on the same column while one runs
    with pytest.raises(flight.FlightUnavailableError) as exc:
        create_index(local, dataset="big_vecs", column="vec", kind="ivf_pq", replace=True)
    assert_refusal(exc, local, "vec")

    # Ten searches, paced so that they do not starve the build of the two CPUs, each checked to finish
    # while the index is still building; then the build must complete.
    for probe in range(10):
        row = (probe * 7919) % BIG_N
        began = time.monotonic()
        found = search(local, {"dataset": "big_vecs", "vector": data[row].tolist(), "k": 5})
        took = time.monotonic() - began
        entry = index_entry(local, "big_vecs", "vec")
        assert entry is not None
        if entry["state"] != "building":
            break
        assert found.column("id")[0].as_py() == row
        assert took < SEARCH_BOUND, f"a search took {took:.1f} s during the build"
        during.append(took)
        time.sleep(0.3)
    entry = wait_for_index(local, "big_vecs", "vec", timeout=300)
    build_seconds = time.monotonic() - started_at
    assert entry["indexed_rows"] == BIG_N
    assert len(during) >= 2, f"only {len(during)} searches finished while building ({build_seconds:.1f} s)"
    assert max(during) < build_seconds, (during, build_seconds)
    found = search(
        local, {"dataset": "big_vecs", "vector": data[42].tolist(), "k": 5, "nprobes": 20, "refine_factor": 5}
    )
    assert found.column("id")[0].as_py() == 42
    print(f"build {build_seconds:.1f} s; {len(during)} searches during it, slowest {max(during):.2f} s")


# -- restart ---------------------------------------------------------------------------------------------


def test_restart_keeps_indexes(start_server: Callable[..., ServerProcess]) -> None:
    """Indexes (vector, scalar, fts) are listed ready after a restart and still answer (both roots)."""
    server = start_server(*LANCE_ONLY)
    rng = np.random.default_rng(14)
    data = clustered(2000, 16, 8, seed=15)
    ids = np.arange(2000)
    server.put(
        "kept",
        vec_table(
            ids, data, category=pa.array(ids % 10, pa.int64()), note=pa.array([f"note {i}" for i in ids])
        ),
        mode="create",
        metric="l2",
    )
    for column, kind, options in (
        ("vec", "ivf_pq", {"num_partitions": 8, "num_sub_vectors": 4}),
        ("category", "btree", {}),
        ("note", "fts", {}),
    ):
        create_index(server, dataset="kept", column=column, kind=kind, **options)
        wait_for_index(server, "kept", column, timeout=120)
    before = sorted(
        (e["column"], e["kind"], e["state"], e["indexed_rows"]) for e in describe(server, "kept")["indexes"]
    )
    assert before == [
        ("category", "btree", "ready", 2000),
        ("note", "fts", "ready", 2000),
        ("vec", "ivf_pq", "ready", 2000),
    ]
    query = data[rng.integers(0, 2000)]
    body = {
        "dataset": "kept",
        "vector": query.tolist(),
        "k": 10,
        "nprobes": 8,
        "refine_factor": 10,
        "filter": "category < 5",
    }
    answer = search(server, body)

    server.restart()

    after = sorted(
        (e["column"], e["kind"], e["state"], e["indexed_rows"]) for e in describe(server, "kept")["indexes"]
    )
    assert after == before
    assert_same_rows(search(server, body), answer)
    assert search(server, {"dataset": "kept", "text": "1234", "k": 1}).column("id").to_pylist() == [1234]
    with pytest.raises(pa.ArrowException) as exc:
        create_index(server, dataset="kept", column="vec", kind="ivf_pq")
    assert_already_exists(exc, server, "'vec'")
