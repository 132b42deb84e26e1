"""Hostile inputs against the limits: time limits that cover planning and stalled readers, memory for unsent
results, datasets isolated from each other's drops, and gc of Lance files no version references."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse.process import RELEASE_SECONDS
from flight_lakehouse.query import Planner, Stopped
from flight_lakehouse.settings import load_settings
from tests.conftest import (
    ServerProcess,
    assert_refusal,
    data_files,
    is_s3,
    pending_uploads,
    s3_root,
    stored_files,
    vector_array,
    wait_for_serving,
    wait_until,
)
from tests.test_s3 import GC_LINE, cli, relative, storage_env

LOCAL = pytest.mark.parametrize("storage_root", ["local"], indirect=True)


def fan_out_query(levels: int, hint: str = "") -> str:
    """A short, shallow query whose planning doubles a level: each CTE reads the previous one twice, and
    DuckDB's planner expands them (12 levels: about 0.25 s of planning; 11 levels with ``NOT MATERIALIZED``
    as ``hint``: over 9 s)."""
    ctes = ["a0 AS (SELECT 1 AS x)"]
    for level in range(1, levels + 1):
        previous = f"a{level - 1}"
        ctes.append(
            f"a{level} AS {hint}(SELECT (SELECT x FROM {previous} WHERE x > 0)"
            f" + (SELECT x FROM {previous} WHERE x > 1) AS x)"
        )
    return f"WITH {', '.join(ctes)} SELECT x FROM a{levels}"


def nested_query(levels: int) -> str:
    """Scalar subqueries nested ``levels`` deep (their planning doubles with each level)."""
    sql = "SELECT 1"
    for _ in range(levels):
        sql = f"SELECT (SELECT x FROM ({sql}) t(x) WHERE x > 0) + 1"
    return sql


def sql_ticket(sql: str) -> flight.Ticket:
    return flight.Ticket(json.dumps({"sql": sql}).encode())


def timed(call: Callable[[], object]) -> tuple[BaseException | None, float]:
    """The error ``call`` raises (None if it returns), and how long it took."""
    started = time.monotonic()
    try:
        call()
    except Exception as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def rows(start: int, count: int) -> pa.Table:
    ids = np.arange(start, start + count, dtype=np.int64)
    return pa.table({"id": ids, "tag": pa.array([f"row-{i % 97}" for i in range(count)])})


def vector_rows(start: int, count: int) -> pa.Table:
    vectors = np.random.default_rng(start).random((count, 8), dtype=np.float32)
    return pa.table({"id": np.arange(start, start + count, dtype=np.int64), "vec": vector_array(vectors)})


def rss_mb(server: ServerProcess) -> float:
    return psutil.Process(server.pid).memory_info().rss / 2**20


def rss_samples(server: ServerProcess, seconds: float) -> list[float]:
    """The server's RSS (MB) every 0.1 s for ``seconds``."""
    samples = []
    for _ in range(int(seconds * 10)):
        samples.append(rss_mb(server))
        time.sleep(0.1)
    return samples


# -- 3. time limits --------------------------------------------------------------------------------------


@LOCAL
def test_queries_that_would_plan_for_minutes_are_refused_before_planning(
    start_server: Callable[..., ServerProcess],
) -> None:
    """The planner's blow-ups are refused on the parse tree at once: CTEs expanded past the limit, the
    NOT MATERIALIZED hint, deep nesting; the server answers others meanwhile."""
    server = start_server("--query-timeout-seconds", "1")
    for sql in (fan_out_query(20), fan_out_query(11, "NOT MATERIALIZED "), nested_query(24)):
        error, elapsed = timed(lambda sql=sql: server.sql(sql))  # type: ignore[misc]
        assert isinstance(error, pa.ArrowInvalid), error
        assert elapsed < 1, f"refused after {elapsed:.1f} s"
    error, elapsed = timed(lambda: server.sql("SELECT 42 AS answer"))
    assert error is None and elapsed < 1, (error, elapsed)


def test_a_stopped_query_does_not_wait_for_its_planning() -> None:
    """DuckDB's planner ignores interrupts, so planning runs on a thread of its own: a query stopped while
    being planned answers at once, and the planning thread closes the query when DuckDB returns.
    (The sandbox refuses the known blow-ups before planning, so no query through the server still plans
    for long: the planner is driven directly here, with a plan that takes 2 s.)"""
    closed = threading.Event()
    planner = Planner(lambda: time.sleep(2) or "plan", lambda result: closed.set())
    started = time.monotonic()
    with pytest.raises(Stopped):
        planner.wait(lambda: time.monotonic() - started > 0.1)
    assert time.monotonic() - started < 0.5
    assert planner.abandoned and not closed.is_set()
    assert closed.wait(5), "the planning thread never closed the abandoned query"
    assert Planner(lambda: "plan", lambda result: None).wait(lambda: False) == "plan"


@LOCAL
def test_shutdown_stops_queries_still_running_after_the_grace(
    start_server: Callable[..., ServerProcess],
) -> None:
    """SIGTERM while a long query runs: after the grace the query is stopped with a message saying why
    (not a cut connection), and the server exits 0 right after."""
    server = start_server(env={"LAKEHOUSE_SHUTDOWN_GRACE_SECONDS": "1"})
    errors: list[BaseException | None] = []
    endless = "SELECT count(*) AS n FROM range(1000000000000) t(i) WHERE i % 7 = 3"
    query = threading.Thread(target=lambda: errors.append(timed(lambda: server.sql(endless))[0]))
    query.start()
    time.sleep(0.5)
    started = time.monotonic()
    assert server.process is not None
    os.kill(server.pid, signal.SIGTERM)
    assert server.process.wait(20) == 0
    assert time.monotonic() - started < 5, "shutdown waited past its grace"
    query.join(10)
    assert errors and isinstance(errors[0], flight.FlightUnavailableError), errors
    assert "shutting down" in str(errors[0]), errors[0]


def stalled_streams(server: ServerProcess, count: int) -> list[flight.FlightStreamReader]:
    """``count`` DoGets of a large result, each read for one batch and then left unread."""
    sql = "SELECT i, repeat(chr(65 + (i % 26)::INT), 200) AS s FROM range(20000000) t(i)"
    readers = []
    for _ in range(count):
        reader = server.client.do_get(sql_ticket(sql))
        reader.read_chunk()
        readers.append(reader)
    return readers


@LOCAL
def test_stalled_readers_are_ended_at_the_time_limit(start_server: Callable[..., ServerProcess]) -> None:
    """Clients that stop reading lose their stream at the time limit: their buffered batches are freed
    (RSS back near where it was), the files of a dataset dropped meanwhile are deleted, and their next
    read is DEADLINE_EXCEEDED."""
    server = start_server(
        "--query-timeout-seconds",
        "6",
        env={"LAKEHOUSE_RESULT_BUFFER_MB": "256", "LAKEHOUSE_QUERY_THREADS": "1"},
    )
    server.put("stalled", rows(0, 300_000))
    files = files_under(server.root, "tables/stalled")
    time.sleep(RELEASE_SECONDS)  # the server hands memory freed by the upload back every few seconds
    before = rss_mb(server)
    readers = stalled_streams(server, 6)
    reader, _ = open_stream(server, "SELECT id, repeat(tag, 400) AS s FROM stalled")
    try:
        assert server.action("drop_dataset", {"dataset": "stalled"}) == {"dropped": True}
        assert files_under(server.root, "tables/stalled") == files, "files deleted under a running query"
        held = max(rss_samples(server, 2.0)) - before  # well within the 6 s limit, even on a busy machine
        assert wait_until(lambda: not files_under(server.root, "tables/stalled"), 15), (
            "a stalled query kept them"
        )
        time.sleep(RELEASE_SECONDS)
        after = min(rss_samples(server, 1.0)) - before
        assert held - after > 50, f"stalled streams held {held:.0f} MB, {after:.0f} MB past their time limit"
        for stalled in readers:
            with pytest.raises(flight.FlightTimedOutError):
                stalled.read_all()
    finally:
        for stalled in [reader, *readers]:
            stalled.cancel()
    assert server.sql("SELECT 42 AS answer").to_pylist() == [{"answer": 42}]


@LOCAL
def test_a_result_batch_larger_than_the_budget_is_refused(start_server: Callable[..., ServerProcess]) -> None:
    """A single value (so a batch) larger than the budget for unsent results is refused, not buffered;
    results in many small batches stream whatever their total size."""
    server = start_server(env={"LAKEHOUSE_RESULT_BUFFER_MB": "16"})
    for sql in (
        "SELECT repeat('x', 40 * 1024 * 1024) AS big",
        "SELECT i, CASE WHEN i = 70000 THEN repeat('x', 20 * 1024 * 1024) END AS s FROM range(100000) t(i)",
    ):
        with pytest.raises(pa.ArrowInvalid) as exc:
            server.sql(sql)
        assert_refusal(exc, server, "larger than", "16 MB")
    wide = server.sql("SELECT i, repeat('y', 1000) AS s FROM range(200000) t(i)")  # 128 MB batches, sliced
    assert wide.num_rows == 200_000
    total = server.sql(
        "SELECT count(*) AS n, sum(length(s)) AS size FROM (SELECT repeat('z', 100) AS s FROM range(2000000))"
    )
    assert total.to_pylist() == [{"n": 2_000_000, "size": 200_000_000}]
    streamed = server.sql("SELECT i, repeat('z', 20) AS s FROM range(3000000) t(i)")
    assert streamed.num_rows == 3_000_000
    assert server.sql("SELECT 42 AS answer").to_pylist() == [{"answer": 42}]


def test_default_memory_limit_fits_a_small_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unset, the DuckDB memory limit is a quarter of the machine's (or container's) memory within
    256..2048 MB, not DuckDB's 80%; 0 still means DuckDB's own."""
    monkeypatch.delenv("LAKEHOUSE_QUERY_MEMORY_MB", raising=False)
    monkeypatch.chdir(tmp_path)
    memory = psutil.virtual_memory().total
    limit = Path("/sys/fs/cgroup/memory.max")
    if limit.exists() and limit.read_text().strip().isdigit():
        memory = min(memory, int(limit.read_text()))
    assert load_settings(root=str(tmp_path)).query_memory_mb == max(256, min(2048, (memory >> 20) // 4))
    assert load_settings(root=str(tmp_path), query_memory_mb=0).query_memory_mb == 0
    assert load_settings(root=str(tmp_path)).result_buffer_mb == 256


# -- 4. datasets isolated from each other ----------------------------------------------------------------


def metadata_files(root: str, dataset: str) -> list[str]:
    return [address for address in stored_files(root) if f"/tables/{dataset}/metadata/" in address]


def delete_stored(root: str, addresses: list[str]) -> None:
    if is_s3(root):
        entry = s3_root(root)
        client = entry.s3.boto3_client()
        for address in addresses:
            client.delete_object(Bucket=entry.bucket, Key=address.removeprefix(f"s3://{entry.bucket}/"))
    else:
        for address in addresses:
            Path(address).unlink()


def test_a_query_reads_only_the_datasets_it_names(start_server: Callable[..., ServerProcess]) -> None:
    """A dataset whose metadata cannot be read breaks no query on another one; a query naming it gets a
    clean refusal; creating and dropping datasets meanwhile breaks no query on the others."""
    server = start_server()
    server.put("kept", rows(0, 1000))
    server.put("broken", rows(0, 10))
    delete_stored(server.root, metadata_files(server.root, "broken"))
    assert server.sql("SELECT count(*) AS n FROM kept").to_pylist() == [{"n": 1000}]
    assert server.ticket({"dataset": "kept", "filter": "id < 10"}).num_rows == 10
    info = server.client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"sql": "SELECT id FROM kept"}).encode())
    )
    assert info.schema.names == ["id"]
    with pytest.raises(flight.FlightError) as exc:
        server.sql("SELECT count(*) FROM broken")
    assert not isinstance(exc.value, flight.FlightInternalError), exc.value
    assert_refusal(exc, server)

    failures: list[BaseException] = []
    done = threading.Event()

    def query() -> None:
        while not done.is_set():
            try:
                assert server.sql("SELECT count(*) AS n FROM kept").to_pylist() == [{"n": 1000}]
            except BaseException as exc:
                failures.append(exc)

    threads = [threading.Thread(target=query) for _ in range(3)]
    for thread in threads:
        thread.start()
    try:
        for round_ in range(8):
            server.put("churn", rows(round_, 100))
            server.put("churn", rows(round_, 100))
            server.action("drop_dataset", {"dataset": "churn"})
    finally:
        done.set()
        for thread in threads:
            thread.join(30)
    assert not failures, failures[:3]


def open_stream(server: ServerProcess, sql: str) -> tuple[flight.FlightStreamReader, pa.RecordBatch]:
    reader = server.client.do_get(sql_ticket(sql))
    return reader, reader.read_chunk().data


def read_rest(reader: flight.FlightStreamReader, first: pa.RecordBatch) -> pa.Table:
    return pa.Table.from_batches([first, *reader.read_all().to_batches()])


def files_under(root: str, folder: str) -> set[str]:
    return {address for address in stored_files(root) if f"/{folder}/" in address}


@pytest.fixture
def many_files_server(start_server: Callable[..., ServerProcess]) -> Iterator[ServerProcess]:
    """A server whose queries read one file at a time, so that a stream opens its files as it goes."""
    yield start_server(env={"LAKEHOUSE_QUERY_THREADS": "1", "LAKEHOUSE_ROW_GROUP_ROWS": "16384"})


def test_a_parquet_query_finishes_on_its_snapshot_across_a_drop(many_files_server: ServerProcess) -> None:
    """Dropping (and re-creating) a dataset during a streaming query: the query reads its snapshot to the
    end; the dropped files go once it ends, the new dataset's files stay."""
    server = many_files_server
    for part in range(8):
        server.put("moving", rows(part * 200_000, 200_000))
    reader, first = open_stream(server, "SELECT id, tag FROM moving")
    old_files = files_under(server.root, "tables/moving")
    assert server.action("drop_dataset", {"dataset": "moving"}) == {"dropped": True}
    assert files_under(server.root, "tables/moving") == old_files, "files deleted under a running query"
    server.put("moving", rows(10**9, 5))
    new_files = files_under(server.root, "tables/moving") - old_files
    result = read_rest(reader, first)
    assert result.num_rows == 1_600_000
    assert sorted(result.column("id").to_pylist()) == list(range(1_600_000))
    assert wait_until(lambda: not (files_under(server.root, "tables/moving") & old_files)), "old files kept"
    assert files_under(server.root, "tables/moving") == new_files
    assert server.sql("SELECT min(id) AS lo, count(*) AS n FROM moving").to_pylist() == [
        {"lo": 10**9, "n": 5}
    ]


def test_a_lance_query_finishes_on_its_version_across_a_drop(many_files_server: ServerProcess) -> None:
    """The same for a Lance table: its fragments stay readable to the query that started before the drop."""
    server = many_files_server
    for part in range(8):
        server.put("vecs", vector_rows(part * 100_000, 100_000))
    reader, first = open_stream(server, "SELECT id, vec FROM vecs")
    old_files = files_under(server.root, "lance/vecs.lance")
    assert server.action("drop_dataset", {"dataset": "vecs"}) == {"dropped": True}
    old_data = {address for address in old_files if "/data/" in address}
    assert old_data <= files_under(server.root, "lance/vecs.lance"), "data files deleted under a query"
    server.put("vecs", vector_rows(10**9, 5))
    result = read_rest(reader, first)
    assert result.num_rows == 800_000
    assert sorted(result.column("id").to_pylist()) == list(range(800_000))
    assert wait_until(lambda: not (files_under(server.root, "lance/vecs.lance") & old_data)), "old files kept"
    assert server.sql("SELECT min(id) AS lo, count(*) AS n FROM vecs").to_pylist() == [{"lo": 10**9, "n": 5}]
    server.restart()
    assert server.sql("SELECT min(id) AS lo, count(*) AS n FROM vecs").to_pylist() == [{"lo": 10**9, "n": 5}]


# -- 5. gc of Lance tables -------------------------------------------------------------------------------


def gc_listed(root: str, *args: str) -> dict[str, int]:
    """``flight-lakehouse gc ARGS``: the files it listed (relative to the root) and their sizes."""
    result = cli("gc", "--root", root, *args, env=storage_env(root))
    assert result.returncode == 0, result.stderr
    listed = {}
    for line in result.stdout.strip().splitlines()[:-1]:
        match = GC_LINE.match(line)
        assert match, line
        listed[relative(root, match.group(2))] = int(match.group(3))
    return listed


def put_file(root: str, path: str, data: bytes) -> None:
    """Write a file under the root, as a crashed writer would have left it."""
    if is_s3(root):
        entry = s3_root(root)
        entry.s3.boto3_client().put_object(Bucket=entry.bucket, Key=f"{entry.prefix}/{path}", Body=data)
    else:
        target = Path(root) / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def test_gc_finds_lance_files_no_version_references(start_server: Callable[..., ServerProcess]) -> None:
    """gc lists (then deletes) data, deletion and index files of a Lance table that no version uses, and a
    dropped table's leftover folder; every file a version uses stays, and the table reads the same."""
    server = start_server()
    server.put("vecs", vector_rows(0, 2000))
    server.put("vecs", vector_rows(2000, 2000))
    server.action("delete_rows", {"dataset": "vecs", "where": "id < 100"})
    server.action("create_index", {"dataset": "vecs", "column": "id", "kind": "btree"})
    expected = server.sql("SELECT count(*) AS n, sum(id) AS s FROM vecs").to_pylist()
    # the in-memory graph is saved beside the table in the background: a stop mid-save leaves an
    # unfinished S3 upload that gc rightly lists too, so stop once it is saved
    wait_for_serving(server, "vecs")
    assert wait_until(lambda: not pending_uploads(server.root), timeout=30)
    server.stop()
    kept = {relative(server.root, address) for address in stored_files(server.root)}
    orphans = {
        "lance/vecs.lance/data/0101-crashed-write.lance": os.urandom(300_000),
        "lance/vecs.lance/_deletions/0-9-123.arrow": b"x" * 100,
        "lance/vecs.lance/_indices/00000000-0000-0000-0000-000000000000/page_data.lance": b"y" * 200,
        "lance/ghost.lance/data/1111-dropped.lance": b"z" * 300,
    }
    for path, data in orphans.items():
        put_file(server.root, path, data)
    time.sleep(0.05)
    sizes = {path: len(data) for path, data in orphans.items()}
    assert gc_listed(server.root, "--dry-run") == {}, "fresh files are inside the grace period"
    assert gc_listed(server.root, "--dry-run", "--older-than-seconds", "0") == sizes
    assert gc_listed(server.root, "--apply", "--older-than-seconds", "0") == sizes
    assert {relative(server.root, address) for address in stored_files(server.root)} == kept
    assert gc_listed(server.root, "--dry-run", "--older-than-seconds", "0") == {}
    server.start()
    assert server.sql("SELECT count(*) AS n, sum(id) AS s FROM vecs").to_pylist() == expected
    assert data_files(server.root) == set()
