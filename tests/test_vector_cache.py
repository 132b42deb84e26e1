"""The in-memory serving layer of the Lance tables (issue 5) through a real server: recall of the HNSW
graph per metric, read-your-writes while served from memory, filters of any selectivity, saved graphs and
restarts, kill -9 during a graph save, the memory budget, and DoExchange.

Only the Flight protocol and what the server stores are looked at. Brute force is numpy in float64. Tables
are large enough (> 4096 candidate rows) for the graph to be used rather than an exact scan, unless a test
says otherwise.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    ServerProcess,
    assert_same_rows,
    running_server,
    search,
    serving,
    stored_files,
    vector_array,
    wait_for_serving,
)

METRICS = ("cosine", "l2", "dot")
ROWS, DIM = 20_000, 32
K = 10
#: ``_distance`` against the exact distance (float64, then float32 on the wire).
DISTANCE_ATOL = 1e-4
#: The HNSW defaults of the server (LAKEHOUSE_VECTOR_GRAPH_M).
GRAPH_M = 32


# -- helpers ---------------------------------------------------------------------------------------------


def clustered(n: int, dim: int, seed: int, clusters: int = 64, spread: float = 0.35) -> np.ndarray:
    """``n`` float32 vectors around ``clusters`` random centres (like real embeddings, unlike pure noise)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    labels = rng.integers(0, clusters, n)
    return (centres[labels] + spread * rng.normal(size=(n, dim))).astype(np.float32)


def near(matrix: np.ndarray, n: int, seed: int, noise: float = 0.2) -> np.ndarray:
    """``n`` query vectors near random rows of ``matrix`` (not equal to any)."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(matrix), n)
    return (matrix[picks] + noise * rng.normal(size=(n, matrix.shape[1]))).astype(np.float32)


def vec_table(ids: object, vectors: np.ndarray, **extra: object) -> pa.Table:
    """``id`` (int64), ``vec`` (fixed_size_list<float32>), plus extra columns."""
    columns: dict[str, object] = {"id": pa.array(np.asarray(ids), pa.int64()), "vec": vector_array(vectors)}
    columns.update(extra)
    return pa.table(columns)


def exact(matrix: np.ndarray, queries: np.ndarray, metric: str) -> np.ndarray:
    """Distances (queries x rows) in Lance's conventions: cosine 1 - cos, l2 squared, dot 1 - x.q."""
    m, q = matrix.astype(np.float64), np.atleast_2d(queries).astype(np.float64)
    dots = q @ m.T
    if metric == "dot":
        return 1.0 - dots
    if metric == "l2":
        squares = (q * q).sum(axis=1)[:, None] + (m * m).sum(axis=1)[None, :] - 2.0 * dots
        return np.maximum(squares, 0.0)
    return 1.0 - dots / np.outer(np.linalg.norm(q, axis=1), np.linalg.norm(m, axis=1))


def true_top(matrix: np.ndarray, query: np.ndarray, metric: str, k: int, ids: np.ndarray) -> list[int]:
    """Ids of the exact ``k`` nearest rows (``ids[i]`` is the id of row ``i``)."""
    d = exact(matrix, query, metric)[0]
    return [int(ids[p]) for p in np.argsort(d, kind="stable")[:k]]


def assert_exact_distances(
    result: pa.Table, matrix: np.ndarray, query: np.ndarray, metric: str, ids: np.ndarray | None = None
) -> None:
    """Every returned ``_distance`` is the exact distance of its row, and the rows are nearest first."""
    got_ids = np.asarray(result.column("id").to_pylist(), dtype=np.int64)
    positions = got_ids if ids is None else np.searchsorted(ids, got_ids)
    want = exact(matrix[positions], query, metric)[0]
    got = result.column("_distance").to_numpy().astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=DISTANCE_ATOL, err_msg=f"metric {metric}")
    assert np.all(np.diff(got) >= -DISTANCE_ATOL), f"not nearest first: {got}"


def body(dataset: str, query: np.ndarray, k: int = K, **extra: object) -> dict:
    """A search body for one query vector, ``id`` column only by default."""
    return {"dataset": dataset, "vector": np.asarray(query).tolist(), "k": k, "columns": ["id"], **extra}


def ids_of(result: pa.Table) -> list[int]:
    return result.column("id").to_pylist()


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    """Mean share of the true neighbours found."""
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def assert_from_memory_at_current_version(server: ServerProcess, dataset: str, version: int) -> dict:
    """Right after a write returns: served from memory, and the copy covers ``version`` (the table's)."""
    described = server.action("describe_dataset", {"dataset": dataset})
    assert isinstance(described, dict)
    facts = described["serving"]
    assert described["version"] == version, (described["version"], version)
    assert facts["from"] == "memory" and facts["state"] == "warm", facts
    assert facts["version"] == version, facts
    assert facts["rows"] == described["rows"], (facts, described["rows"])
    return facts


def graph_address(root: str, name: str) -> str:
    """Where the saved graph of ``name`` is: ``<root>/lance/<name>.hnsw.npz`` (a path or an s3:// URL)."""
    return f"{root.rstrip('/')}/lance/{name}.hnsw.npz"


def loaded_lines(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if re.search(rf"\b{name} in memory from its saved graph of version", line)]


def rebuilt_lines(lines: list[str], name: str) -> list[str]:
    return [line for line in lines if re.search(rf"\b{name} in memory: \d+ rows", line)]


# -- one server with three warm 20k x 32 tables (one per metric) -----------------------------------------

MATRIX = clustered(ROWS, DIM, seed=51)
IDS = np.arange(ROWS, dtype=np.int64)
TAGS = pa.array([f"t{i % 100}" for i in range(ROWS)])
QUERIES = near(MATRIX, 500, seed=52)


def recall_table(metric: str) -> str:
    return f"recall_{metric}"


@pytest.fixture(scope="module")
def warm_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A local server with ``recall_<metric>`` per metric: ``id``, ``vec``, ``tag`` ('t' + id % 100)."""
    root = str(tmp_path_factory.mktemp("vector_cache") / "lakehouse")
    with running_server(root) as server:
        for metric in METRICS:
            server.put(recall_table(metric), vec_table(IDS, MATRIX, tag=TAGS), mode="create", metric=metric)
        yield server


@pytest.mark.parametrize("metric", METRICS)
def test_recall_and_exact_distances_from_memory(warm_server: ServerProcess, metric: str) -> None:
    """At the default graph settings, 50 queries on a 20k-row table served from memory find >= 95% of
    the true 10 nearest, and every ``_distance`` is the exact distance of its row."""
    name = recall_table(metric)
    described = wait_for_serving(warm_server, name)
    assert described["serving"]["rows"] == ROWS and described["serving"]["tombstones"] == 0
    # the float32 vectors are in the vector file, not in the bytes held (graph, codes, columns)
    assert described["serving"]["vector_file_bytes"] == ROWS * DIM * 4, described["serving"]
    assert described["serving"]["bytes"] < ROWS * (DIM + 8 * GRAPH_M * 1.1 + 64), described["serving"]
    found, truth = [], []
    for query in QUERIES[:50]:
        result = search(warm_server, body(name, query))
        assert result.num_rows == K
        assert_exact_distances(result, MATRIX, query, metric)
        found.append(ids_of(result))
        truth.append(true_top(MATRIX, query, metric, K, IDS))
    assert recall(found, truth) >= 0.95, f"{metric}: recall@{K} {recall(found, truth):.3f}"
    assert serving(warm_server, name)["from"] == "memory", "searches must not have moved it out of memory"


def test_fewer_code_bits_hold_less_and_stay_exact(warm_server: ServerProcess, tmp_path: Path) -> None:
    """LAKEHOUSE_VECTOR_GRAPH_CODE_BITS=6: the same table is held with 2 bits a dimension less (the
    8-bit server holds it too, for comparison), and every result keeps its exact distance."""
    eight_bits = wait_for_serving(warm_server, recall_table("l2"))["serving"]["bytes"]
    server = ServerProcess(str(tmp_path / "lakehouse"), env={"LAKEHOUSE_VECTOR_GRAPH_CODE_BITS": "6"})
    try:
        server.start()
        server.put("six_bits", vec_table(IDS, MATRIX, tag=TAGS), mode="create", metric="l2")
        six_bits = wait_for_serving(server, "six_bits")["serving"]["bytes"]
        assert eight_bits - six_bits == pytest.approx(ROWS * DIM * 2 / 8, rel=0.02), (eight_bits, six_bits)
        for query in QUERIES[:10]:
            result = search(server, body("six_bits", query))
            assert result.num_rows == K
            assert_exact_distances(result, MATRIX, query, "l2")
    finally:
        server.stop()
        server.kill()


@pytest.mark.parametrize(
    ("predicate", "matching"),
    [
        ("id % 2 = 0", IDS % 2 == 0),  # 50%: the graph, restricted to the allowed slots
        ("tag = 't7'", IDS % 100 == 7),  # 1%: an exact scan over the candidates
        ("id % 10000 = 0", IDS % 10_000 == 0),  # 0.01%: 2 rows, fewer than k
    ],
    ids=["50%", "1%", "0.01%"],
)
def test_filters_of_any_selectivity(warm_server: ServerProcess, predicate: str, matching: np.ndarray) -> None:
    """A filter applies before k-NN: min(k, matching) rows, all passing it, the brute-force top-k of the
    matching rows (exact distances)."""
    name = recall_table("cosine")
    wait_for_serving(warm_server, name)
    subset, subset_ids = MATRIX[matching], IDS[matching]
    want_rows = min(K, int(matching.sum()))
    for query in QUERIES[100:120]:
        result = search(warm_server, body(name, query, filter=predicate, columns=["id", "tag"]))
        assert result.num_rows == want_rows, (predicate, result.num_rows)
        got = ids_of(result)
        assert all(matching[i] for i in got), (predicate, got)
        assert result.column("tag").to_pylist() == [f"t{i % 100}" for i in got]
        assert got == true_top(subset, query, "cosine", K, subset_ids), predicate
        assert_exact_distances(result, MATRIX, query, "cosine")
    assert serving(warm_server, name)["from"] == "memory"


def test_concurrent_searches_each_get_their_own_rows(warm_server: ServerProcess) -> None:
    """16 clients searching at once (answered from memory in shared batches) with different queries, k,
    columns and tickets: every client gets exactly the rows a search alone gives for its own request."""
    name = recall_table("cosine")
    wait_for_serving(warm_server, name)
    selections = [["id"], ["id", "tag"], ["tag", "vec", "id"]]
    requests = [body(name, QUERIES[200 + i], k=3 + i % 5, columns=selections[i % 3]) for i in range(48)]
    alone = [search(warm_server, request) for request in requests]
    start = threading.Barrier(16)

    def client(first: int) -> list[tuple[int, pa.Table]]:
        connection = flight.FlightClient(warm_server.location)
        start.wait()
        got = []
        for i in range(first, len(requests), 16):
            ticket = flight.Ticket(json.dumps({"search": requests[i]}).encode())
            got.append((i, connection.do_get(ticket).read_all()))
        return got

    with ThreadPoolExecutor(16) as pool:
        answers = [answer for part in pool.map(client, range(16)) for answer in part]
    assert len(answers) == len(requests)
    for i, result in answers:
        assert_same_rows(result, alone[i])
        assert result.num_rows == requests[i]["k"]
    assert serving(warm_server, name)["from"] == "memory"


def test_exchange_500_queries_from_memory(warm_server: ServerProcess) -> None:
    """DoExchange with 500 query vectors on a warm table: 500 * k rows, by query then distance, each
    query's rows the ones the action gives and (>= 95%) the brute-force top-k with exact distances."""
    name = recall_table("l2")
    wait_for_serving(warm_server, name)
    descriptor = flight.FlightDescriptor.for_command(
        json.dumps({"search": {"dataset": name, "k": K, "columns": ["id"]}}).encode()
    )
    schema = pa.schema([("vector", pa.list_(pa.float32(), DIM))])
    writer, reader = warm_server.client.do_exchange(descriptor)
    with writer:
        writer.begin(schema)
        for start in range(0, 500, 125):
            writer.write_batch(pa.record_batch([vector_array(QUERIES[start : start + 125])], schema=schema))
        writer.done_writing()
        result = reader.read_all()
    assert result.schema.names == ["_query_index", "id", "_distance"]
    assert result.num_rows == 500 * K
    np.testing.assert_array_equal(result.column("_query_index").to_numpy(), np.repeat(np.arange(500), K))
    everything = exact(MATRIX, QUERIES, "l2")
    truth = np.argsort(everything, axis=1, kind="stable")[:, :K]
    found = np.asarray(ids_of(result), dtype=np.int64).reshape(500, K)
    got = result.column("_distance").to_numpy().astype(np.float64).reshape(500, K)
    np.testing.assert_allclose(
        got, np.take_along_axis(everything, found, axis=1), rtol=1e-6, atol=DISTANCE_ATOL
    )
    assert np.all(np.diff(got, axis=1) >= -DISTANCE_ATOL), "rows of a query are not nearest first"
    assert recall(found.tolist(), truth.tolist()) >= 0.95, recall(found.tolist(), truth.tolist())
    for q in range(0, 500, 5):
        assert_same_rows(
            result.slice(q * K, K).drop_columns(["_query_index"]), search(warm_server, body(name, QUERIES[q]))
        )


# -- writes while served from memory (both roots) ---------------------------------------------------------

SMALL_ROWS, SMALL_DIM = 10_000, 16
SMALL = clustered(SMALL_ROWS, SMALL_DIM, seed=61)


def test_read_your_writes_from_memory(server: ServerProcess) -> None:
    """Append, upsert and delete_rows are followed before they return: the table stays served from memory
    at its new version, an appended row is found, an updated key's old vector and a deleted row never are."""
    name = "ryw"
    server.put(name, vec_table(range(SMALL_ROWS), SMALL), mode="create", metric="cosine")
    wait_for_serving(server, name)
    rng = np.random.default_rng(62)

    # append: each appended vector is found first, exactly
    appended = rng.normal(size=(5, SMALL_DIM)).astype(np.float32)
    result = server.put(name, vec_table(range(SMALL_ROWS, SMALL_ROWS + 5), appended), mode="append")
    assert_from_memory_at_current_version(server, name, result["version"])
    for i, vector in enumerate(appended):
        found = search(server, body(name, vector))
        assert ids_of(found)[0] == SMALL_ROWS + i, ids_of(found)
        assert abs(found.column("_distance")[0].as_py()) <= 1e-5

    # upsert: the updated keys carry their new vector; their old one is never returned
    keys = [3, 4, 5]
    old = SMALL[keys]
    new = rng.normal(size=(3, SMALL_DIM)).astype(np.float32)
    result = server.put(name, vec_table(keys, new), mode="upsert", key="id")
    assert result["rows_updated"] == 3 and result["rows_inserted"] == 0, result
    assert_from_memory_at_current_version(server, name, result["version"])
    for key, before, after in zip(keys, old, new, strict=True):
        for found in (
            search(server, body(name, before, columns=["id", "vec"])),
            search(server, body(name, before, columns=["id", "vec"], filter=f"id = {key}")),
        ):
            vectors = np.asarray(found.column("vec").to_pylist(), dtype=np.float32).reshape(-1, SMALL_DIM)
            assert not (vectors == before).all(axis=1).any(), f"the old vector of key {key} came back"
        found = search(server, body(name, after, columns=["id", "vec"]))
        assert ids_of(found)[0] == key, (key, ids_of(found))
        np.testing.assert_array_equal(np.asarray(found.column("vec")[0].as_py(), np.float32), after)
        assert abs(found.column("_distance")[0].as_py()) <= 1e-5
        only = search(server, body(name, before, filter=f"id = {key}"))
        assert ids_of(only) == [key]
        assert_exact_distances(
            only, new[keys.index(key) : keys.index(key) + 1], before, "cosine", np.array([key])
        )

    # delete_rows: the nearest row of its own vector is never returned once deleted
    victim = 42
    assert ids_of(search(server, body(name, SMALL[victim])))[0] == victim
    result = server.action("delete_rows", {"dataset": name, "where": f"id = {victim}"})
    assert isinstance(result, dict) and result["rows_deleted"] == 1
    facts = assert_from_memory_at_current_version(server, name, result["version"])
    assert facts["tombstones"] >= 1, facts
    for k in (1, K, 200):
        found = search(server, body(name, SMALL[victim], k=k))
        assert victim not in ids_of(found), (k, ids_of(found))
        assert found.num_rows == k
    assert search(server, body(name, SMALL[victim], filter=f"id = {victim}")).num_rows == 0
    assert victim not in ids_of(search(server, body(name, SMALL[victim], filter="id < 100")))
    assert serving(server, name)["from"] == "memory"


# -- saved graphs and restarts (both roots) ----------------------------------------------------------------


def test_restart_loads_saved_graph(server: ServerProcess) -> None:
    """A warm table's graph is saved as ``<root>/lance/<name>.hnsw.npz``; a restart loads it instead of a
    rebuild and gives the same rows; a write after the save is caught up on the next load; drop deletes it."""
    name = "graph_saved"
    created = server.put(name, vec_table(range(SMALL_ROWS), SMALL), mode="create", metric="l2")
    wait_for_serving(server, name)
    graph = graph_address(server.root, name)
    assert graph in stored_files(server.root), sorted(stored_files(server.root))
    queries = near(SMALL, 10, seed=71)
    before = [search(server, body(name, query, columns=["id", "vec"])) for query in queries]

    mark = len(server.log_lines)
    server.restart()
    described = wait_for_serving(server, name)
    lines = server.log_lines[mark:]
    assert loaded_lines(lines, name), "\n".join(lines)
    assert f"of version {created['version']}" in loaded_lines(lines, name)[0]
    assert not rebuilt_lines(lines, name), "\n".join(lines)
    assert described["serving"]["rows"] == SMALL_ROWS
    for query, expected in zip(queries, before, strict=True):
        assert_same_rows(search(server, body(name, query, columns=["id", "vec"])), expected)

    # a write after the save: the next start loads the older graph and catches it up
    extra = np.random.default_rng(72).normal(size=(3, SMALL_DIM)).astype(np.float32) * 3
    appended = server.put(name, vec_table(range(SMALL_ROWS, SMALL_ROWS + 3), extra), mode="append")
    assert appended["version"] > created["version"]
    mark = len(server.log_lines)
    server.restart()
    described = wait_for_serving(server, name)
    lines = server.log_lines[mark:]
    assert loaded_lines(lines, name) and not rebuilt_lines(lines, name), "\n".join(lines)
    assert described["version"] == appended["version"] == described["serving"]["version"]
    assert described["serving"]["rows"] == SMALL_ROWS + 3
    for i, vector in enumerate(extra):
        found = search(server, body(name, vector))
        assert ids_of(found)[0] == SMALL_ROWS + i, ids_of(found)
        assert found.column("_distance")[0].as_py() <= 1e-5
    for query in queries:
        found = search(server, body(name, query, columns=["id", "vec"]))
        assert_exact_distances(found, np.vstack([SMALL, extra]), query, "l2")

    assert server.action("drop_dataset", {"dataset": name}) == {"dropped": True}
    assert graph not in stored_files(server.root), "a dropped table's graph stays"


# -- kill -9 while a graph is being built or saved (local root) -------------------------------------------

CRASH_ROWS = 8_000
CRASH = clustered(CRASH_ROWS, SMALL_DIM, seed=81)


def save_marks(lance_dir: Path, name: str) -> tuple[tuple[int, int] | None, set[str]]:
    """What shows a graph save of ``name``: the graph file's identity (inode, mtime), the temp files."""
    try:
        stat = (lance_dir / f"{name}.hnsw.npz").stat()
        identity: tuple[int, int] | None = (stat.st_ino, stat.st_mtime_ns)
    except FileNotFoundError:
        identity = None
    try:
        temps = {entry.name for entry in lance_dir.iterdir() if entry.name.startswith(f"{name}.hnsw.npz.")}
    except FileNotFoundError:
        temps = set()
    return identity, temps


def kill_when_saving(
    server: ServerProcess,
    lance_dir: Path,
    name: str,
    before: tuple[tuple[int, int] | None, set[str]],
    timeout: float = 20.0,
) -> str:
    """SIGKILL the server as soon as a new graph save of ``name`` shows (since ``before``, see
    :func:`save_marks`): a new temp file, or the graph file replaced. Says what was seen; saves are short,
    so the kill may also land just after one."""
    deadline = time.monotonic() + timeout
    seen = "nothing"
    while time.monotonic() < deadline:
        identity, temps = save_marks(lance_dir, name)
        if temps - before[1]:
            seen = "temp file"
            break
        if identity != before[0]:
            seen = "graph replaced"
            break
    server.kill()
    return seen


def assert_serves_live_rows(server: ServerProcess, name: str, live: np.ndarray, deleted: list[int]) -> None:
    """Warm from memory again, with exactly the live rows, correct nearest rows and no deleted row."""
    described = wait_for_serving(server, name, timeout=60)
    assert described["rows"] == int(live.sum()) == described["serving"]["rows"], described
    matrix, ids = CRASH[live], np.flatnonzero(live)
    found, truth = [], []
    for query in near(CRASH, 10, seed=82):
        result = search(server, body(name, query))
        assert result.num_rows == K
        assert all(live[i] for i in ids_of(result)), ids_of(result)
        assert_exact_distances(result, matrix, query, "l2", ids)
        found.append(ids_of(result))
        truth.append(true_top(matrix, query, "l2", K, ids))
    assert recall(found, truth) >= 0.9, recall(found, truth)
    for victim in deleted[:5]:
        assert victim not in ids_of(search(server, body(name, CRASH[victim]))), victim
    survivor = int(ids[len(ids) // 2])
    assert ids_of(search(server, body(name, CRASH[survivor])))[0] == survivor


def test_kill_during_graph_build_and_save(tmp_path: Path) -> None:
    """SIGKILL while a graph is built or saved (after a create, at start-up, after deletes that trigger a
    rebuild) always leaves a state the next start serves correctly; leftover temp files are never loaded
    as a graph and do not break start-up."""
    root = str(tmp_path / "lakehouse")
    lance_dir = Path(root) / "lance"
    name = "crash"
    live = np.ones(CRASH_ROWS, dtype=bool)
    deleted: list[int] = []
    server = ServerProcess(root)
    try:
        server.start()
        server.put(name, vec_table(range(CRASH_ROWS), CRASH), mode="create", metric="l2")
        server.kill()  # during the first build
        before = save_marks(lance_dir, name)
        server.start()
        seen: list[str] = []
        if before[0] is None:  # as expected: no graph saved yet, so start-up builds and saves one
            seen.append(kill_when_saving(server, lance_dir, name, before))
            server.start()
        assert_serves_live_rows(server, name, live, deleted)

        for step in range(2):
            where = f"id % 4 = {step}"  # > 20% of the slots tombstoned: a background rebuild and save
            mask = (np.arange(CRASH_ROWS) % 4 == step) & live
            before = save_marks(lance_dir, name)
            result = server.action("delete_rows", {"dataset": name, "where": where})
            assert result["rows_deleted"] == int(mask.sum())
            live &= ~mask
            deleted = np.flatnonzero(mask).tolist() + deleted
            seen.append(kill_when_saving(server, lance_dir, name, before))
            server.start()
            assert_serves_live_rows(server, name, live, deleted)

        # temp files a crash left (a valid graph's bytes, half of them, junk) and no graph: start-up must
        # neither fail nor load any of them, but rebuild
        graph = lance_dir / f"{name}.hnsw.npz"
        saved = graph.read_bytes()
        server.stop()
        for digit, content in enumerate((saved, saved[: len(saved) // 2], b"PK\x03\x04")):
            (lance_dir / f"{name}.hnsw.npz.{str(digit) * 32}.tmp").write_bytes(content)
        graph.unlink()
        mark = len(server.log_lines)
        server.start()
        assert_serves_live_rows(server, name, live, deleted)
        lines = server.log_lines[mark:]
        assert rebuilt_lines(lines, name) and not loaded_lines(lines, name), "\n".join(lines)
        assert graph.exists(), "the rebuilt graph was not saved"
        # every build above (at start-up, after deletes past 20% of the slots) saved a graph
        assert "nothing" not in seen, seen
        print("kills landed on:", seen, "temp files left:", sorted(save_marks(lance_dir, name)[1]))
    finally:
        server.stop()
        server.kill()


# -- the memory budget ------------------------------------------------------------------------------------

BUDGET_ROWS, BUDGET_DIM = 4_000, 32  # <= 4096 rows: the in-memory search is an exact scan
BUDGET_A = clustered(BUDGET_ROWS, BUDGET_DIM, seed=91)
BUDGET_B = clustered(BUDGET_ROWS, BUDGET_DIM, seed=92)


def estimate(rows: int, dim: int) -> int:
    """The server's size estimate of a table: rows * (dim + 8*M*1.1 + 64) bytes."""
    return int(rows * (dim + 8 * GRAPH_M * 1.1 + 64))


def assert_brute_force(server: ServerProcess, name: str, matrix: np.ndarray, metric: str, seed: int) -> None:
    """Searches give exactly the brute-force top-k, with exact distances."""
    ids = np.arange(len(matrix))
    for query in near(matrix, 5, seed=seed):
        result = search(server, body(name, query))
        assert ids_of(result) == true_top(matrix, query, metric, K, ids), name
        assert_exact_distances(result, matrix, query, metric)


def test_budget_two_tables_compete(tmp_path: Path) -> None:
    """With room for one of two tables, one is served from memory within the budget and the other is
    'over budget' (Lance serves it); both answer correctly; dropping the served one lets the other in."""
    each = estimate(BUDGET_ROWS, BUDGET_DIM)
    budget_mb = math.ceil(each / 2**20)
    budget = budget_mb << 20
    assert each <= budget < 2 * each
    with running_server(str(tmp_path / "lakehouse"), "--vector-cache-mb", str(budget_mb)) as server:
        tables = {"budget_a": BUDGET_A, "budget_b": BUDGET_B}
        for name, matrix in tables.items():
            server.put(name, vec_table(range(BUDGET_ROWS), matrix), mode="create", metric="cosine")
        deadline = time.monotonic() + 60
        facts = {name: serving(server, name) for name in tables}
        while sorted(f["state"] for f in facts.values()) != ["over budget", "warm"]:
            assert time.monotonic() < deadline, facts
            assert all(f["state"] != "failed" for f in facts.values()), facts
            time.sleep(0.05)
            facts = {name: serving(server, name) for name in tables}
        served = next(name for name, f in facts.items() if f["state"] == "warm")
        waiting = next(name for name in tables if name != served)
        assert facts[served]["from"] == "memory"
        assert 0 < facts[served]["bytes"] <= budget == facts[served]["budget_bytes"], facts
        assert facts[waiting]["from"] == "lance", facts
        assert facts[waiting]["estimated_bytes"] == pytest.approx(each, rel=0.01), facts
        for seed, (name, matrix) in enumerate(tables.items()):
            assert_brute_force(server, name, matrix, "cosine", seed=93 + seed)
        assert serving(server, waiting)["from"] == "lance"

        assert server.action("drop_dataset", {"dataset": served}) == {"dropped": True}
        described = wait_for_serving(server, waiting, timeout=30)
        assert described["serving"]["bytes"] <= budget
        assert_brute_force(server, waiting, tables[waiting], "cosine", seed=95)


def test_drop_during_build_stops_it(server: ServerProcess) -> None:
    """A table dropped while its in-memory copy is being built: the build stops (no graph is saved), and
    a new table of the same name is built and served from its own rows."""
    name = "dropped_early"
    big = clustered(60_000, SMALL_DIM, seed=111)
    server.put(name, vec_table(range(len(big)), big), mode="create", metric="l2")
    mark = len(server.log_lines)
    assert server.action("drop_dataset", {"dataset": name}) == {"dropped": True}
    deadline = time.monotonic() + 30
    while not any(f"building {name} in memory stopped" in line for line in server.log_lines[mark:]):
        assert time.monotonic() < deadline, "\n".join(server.log_lines[mark:])
        time.sleep(0.05)
    assert not [a for a in stored_files(server.root) if a.endswith(f"{name}.hnsw.npz")]
    server.put(name, vec_table(range(SMALL_ROWS), SMALL), mode="create", metric="l2")
    wait_for_serving(server, name)
    for query in near(SMALL, 3, seed=112):
        found = search(server, body(name, query, k=5))
        assert ids_of(found) == true_top(SMALL, query, "l2", 5, np.arange(SMALL_ROWS))


def test_zero_budget_serves_nothing_from_memory(tmp_path: Path) -> None:
    """``--vector-cache-mb 0``: no table is served from memory (nor its graph saved); searches are right."""
    root = str(tmp_path / "lakehouse")
    matrix = clustered(6_000, SMALL_DIM, seed=101)
    with running_server(root, "--vector-cache-mb", "0") as server:
        server.put("no_cache", vec_table(range(6_000), matrix), mode="create", metric="l2")
        deadline = time.monotonic() + 30
        facts = serving(server, "no_cache")
        while facts["state"] == "building":
            assert time.monotonic() < deadline, facts
            time.sleep(0.05)
            facts = serving(server, "no_cache")
        assert facts["from"] == "lance" and facts["state"] not in ("warm", "failed"), facts
        assert facts["budget_bytes"] == 0
        assert_brute_force(server, "no_cache", matrix, "l2", seed=102)
        server.put("no_cache", vec_table([6_000], matrix[:1] + 1), mode="append")
        time.sleep(0.5)
        assert serving(server, "no_cache")["from"] == "lance"
        assert not [a for a in stored_files(root) if a.endswith(".hnsw.npz")], "a graph was saved"


def lancedb_loaded(server: ServerProcess) -> bool:
    """Whether the server process has lancedb's native library mapped."""
    return "_lancedb" in Path(f"/proc/{server.pid}/maps").read_text()


def test_ingesting_and_serving_never_load_lancedb(tmp_path: Path) -> None:
    """Writes, catalog actions, index builds, optimize, SQL and k-NN searches (from memory or from Lance)
    go through Lance alone: lancedb (its own copy of Lance, ~90 MB of RSS) loads only for a full-text or
    hybrid search, which then works."""
    with running_server(str(tmp_path / "lakehouse")) as server:
        name = "lean"
        server.put(name, vec_table(range(SMALL_ROWS), SMALL), mode="create", metric="l2")
        server.put(name, vec_table([SMALL_ROWS], SMALL[:1]), mode="append")
        server.put(name, vec_table([0], SMALL[1:2]), mode="upsert", key="id")
        assert server.action("delete_rows", {"dataset": name, "where": "id = 1"})["rows_deleted"] == 1
        server.action("create_index", {"dataset": name, "column": "id", "kind": "btree"})
        server.action("optimize", {"dataset": name})
        described = wait_for_serving(server, name)
        assert described["rows"] == SMALL_ROWS
        indexes = [(e["column"], e["kind"], e["state"]) for e in described["indexes"]]
        assert indexes == [("id", "btree", "ready")]
        history = server.action("dataset_history", {"dataset": name})
        assert [entry["version"] for entry in history][-4:] == [4, 3, 2, 1]
        assert server.sql(f"SELECT count(*) AS n FROM {name}").column("n").to_pylist() == [SMALL_ROWS]
        assert ids_of(search(server, body(name, SMALL[5], k=3)))[0] == 5
        by_cosine = search(server, body(name, SMALL[5], k=3, metric="cosine"))  # Lance: not the copy's metric
        assert by_cosine.num_rows == 3 and ids_of(by_cosine)[0] == 5
        assert not lancedb_loaded(server)

        notes = ["apples and pears", "a quiet harbour at dawn", "pears in syrup"]
        server.put("notes", vec_table(range(3), SMALL[:3], note=notes), mode="create", metric="l2")
        server.action("create_index", {"dataset": "notes", "column": "note", "kind": "fts"})
        found = search(server, {"dataset": "notes", "text": "harbour", "k": 3, "columns": ["id"]})
        assert lancedb_loaded(server)
        assert found.column("id").to_pylist() == [1]


def test_dropping_a_served_table_frees_its_copy(tmp_path: Path) -> None:
    """Once dropped, a table's in-memory copy is gone: nothing, not even the idle build worker, holds it
    (a copy kept until the next commit would make a re-ingest run with both in memory)."""
    import weakref

    from flight_lakehouse.server import LakehouseServer
    from flight_lakehouse.settings import Settings

    server = LakehouseServer(Settings(root=str(tmp_path / "lakehouse"), host="127.0.0.1", port=0))
    threading.Thread(target=server.serve, daemon=True).start()
    client = ServerProcess(str(tmp_path), location=f"grpc://127.0.0.1:{server.port}")
    try:
        client.put("gone", vec_table(range(SMALL_ROWS), SMALL), mode="create", metric="l2")
        wait_for_serving(client, "gone")
        served = server.cache.served("gone")
        assert served is not None
        copy = weakref.ref(served)
        del served
        assert client.action("drop_dataset", {"dataset": "gone"}) == {"dropped": True}
        assert copy() is None
    finally:
        client.stop()
        server.shutdown()
