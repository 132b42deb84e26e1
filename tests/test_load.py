"""Issue 18: the server under sustained mixed load, and under one-row writes while it is searched.

Short forms of ``scripts/loadgen.py`` (the documented long runs are in docs/benchmarks.md, "Load and
soak"): every scenario checks its answer, nothing but an intended limit's UNAVAILABLE may fail, and every
dataset ends with exactly the rows the clients committed.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.flight as flight

from scripts import loadgen
from tests.conftest import ServerProcess, wait_for_index, wait_for_serving, wait_until


@contextlib.contextmanager
def load_server(root: Path, **env: str) -> Iterator[ServerProcess]:
    """A server on a local ``root`` with ``LAKEHOUSE_<KEY>`` settings, stopped by pid at the end."""
    process = ServerProcess(str(root), [], {f"LAKEHOUSE_{key.upper()}": value for key, value in env.items()})
    try:
        yield process.start()
    finally:
        process.stop()
        process.kill()


def append_rows(location: str, name: str, ids: list[int]) -> list[int]:
    """One one-row DoPut per id on a client of its own; the versions the appends made."""
    versions = []
    with flight.connect(location) as client:
        for row_id in ids:
            table = loadgen.churn_table([row_id])
            command = {"ingest": {"dataset": name, "expected_rows": 1}}
            writer, reader = client.do_put(
                flight.FlightDescriptor.for_command(json.dumps(command).encode()), table.schema
            )
            with writer:
                writer.write_table(table)
                writer.done_writing()
                versions.append(json.loads(reader.read().to_pybytes())["version"])
    return versions


def test_concurrent_appends_keep_the_copy_current(tmp_path: Path) -> None:
    """One-row appends on several connections at once: when they have all returned, the in-memory copy is
    at the newest version with every row and no tombstone (a catch-up to an older version must not undo a
    newer one's: it used to tombstone the newer fragments and leave the copy behind, served by Lance,
    until the next commit or refresh)."""
    with load_server(tmp_path / "root", max_concurrent_ingests="8", lance_refresh_seconds="3600") as server:
        server.put("race", loadgen.churn_table(list(range(100))), mode="create", metric="cosine")
        wait_for_serving(server, "race")
        writers, each = 6, 15
        ids = [list(range(1000 * (w + 1), 1000 * (w + 1) + each)) for w in range(writers)]
        with ThreadPoolExecutor(writers) as pool:
            versions = [
                v
                for done in pool.map(append_rows, [server.location] * writers, ["race"] * writers, ids)
                for v in done
            ]
        described = server.action("describe_dataset", {"dataset": "race"})
        assert isinstance(described, dict)
        facts = described["serving"]
        assert described["version"] == max(versions), (described["version"], max(versions))
        assert facts["from"] == "memory" and facts["version"] == described["version"], facts
        assert facts["rows"] == 100 + writers * each and facts["tombstones"] == 0, facts


def run_plan(
    root: Path, plan: loadgen.LoadPlan, limits: loadgen.Limits, **env: str
) -> tuple[loadgen.LoadReport, dict]:
    """Prepare the load datasets on a fresh server, run ``plan`` against it; the report, and how the churn
    table is served once the clients are done (``describe_dataset``)."""
    with load_server(root, **env) as server:
        fixture = loadgen.prepare(server.location)
        report = loadgen.run_load(fixture, server.pid, plan, limits)
        report.markdown()  # renders
        described = server.action("describe_dataset", {"dataset": loadgen.CHURN})
    assert isinstance(described, dict)
    return report, described


#: Growth bounds of the short runs: files and threads must come back to their level after the warm-up; RSS
#: over ~30 s cannot show a slope below the noise, so only a gross leak fails (the soak states the slope).
SHORT_LIMITS = loadgen.Limits(warmup_share=0.3, rss_mb_per_min=600.0, files_growth=15, threads_growth=30)


def test_mixed_load(tmp_path: Path) -> None:
    """Every scenario of the mix at small concurrency: no error but intended limits, every answer right,
    every dataset holding exactly what the clients committed, no file-descriptor or thread growth."""
    plan = loadgen.LoadPlan(clients=6, processes=2, seconds=30, mix="mixed")
    report, _ = run_plan(tmp_path / "root", plan, SHORT_LIMITS)
    assert report.problems() == [], report.markdown()
    ran = {name for name, latencies in report.outcomes.latencies.items() if latencies}
    assert ran >= set(loadgen.MIXES["mixed"]) - {"create_index", "optimize"}, report.markdown()


def test_one_row_writes_while_searching(tmp_path: Path) -> None:
    """One-row appends and deletes into a small vector table while other clients search it (filtered and
    not): no crash, every result row one of the table with its own vector, the row searched for first,
    and the table served from memory when the writes stop."""
    plan = loadgen.LoadPlan(clients=6, processes=2, seconds=8, mix="churn")
    report, described = run_plan(tmp_path / "root", plan, SHORT_LIMITS, max_concurrent_ingests="8")
    assert report.problems() == [], report.markdown()
    facts = described["serving"]
    assert facts["from"] == "memory" and facts["version"] == described["version"], facts
    assert facts["rows"] == report.stored[loadgen.CHURN], (facts, report.stored)
    assert len(report.outcomes.latencies["append_one"]) > 20, report.markdown()


def test_listing_and_optimize_while_rows_change(tmp_path: Path) -> None:
    """list_datasets, describe_dataset, dataset_history and filtered searches while optimize compacts and
    removes old versions, and optimize while rows are appended and deleted: every call answers, right.
    (Reading the versions raced with the removal of their manifests: INTERNAL; a compaction preempted by a
    concurrent delete: UNAVAILABLE; a search of the version before the compaction read files its clean-up
    had just removed: "Not found".)"""
    with load_server(tmp_path / "root") as server:
        server.put("pruned", loadgen.churn_table(list(range(200))), mode="create", metric="cosine")
        stop = threading.Event()

        def optimize() -> int:
            rounds = 0
            with flight.connect(server.location) as client:
                while not stop.is_set():
                    append_rows(server.location, "pruned", [10_000 + 2 * rounds, 10_001 + 2 * rounds])
                    body = json.dumps({"dataset": "pruned", "older_than_seconds": 0}).encode()
                    list(client.do_action(flight.Action("optimize", body)))
                    rounds += 1
            return rounds

        def delete() -> int:
            with flight.connect(server.location) as client:
                for row_id in range(200):
                    if stop.is_set():
                        return row_id
                    body = json.dumps({"dataset": "pruned", "where": f"id = {row_id}"}).encode()
                    list(client.do_action(flight.Action("delete_rows", body)))
                return 200

        def search() -> int:
            """Filtered searches: k rows every time (a compaction caught up between the filter's evaluation
            and the graph search left no allowed live row: 0 rows)."""
            searches = 0
            with flight.connect(server.location) as client:
                while not stop.is_set():
                    body = {
                        "dataset": "pruned",
                        "vector": [1.0] * loadgen.DIM,
                        "k": 5,
                        "filter": "id % 2 = 0",
                    }
                    ticket = flight.Ticket(json.dumps({"search": body}).encode())
                    found = client.do_get(ticket).read_all()
                    assert found.num_rows == 5 and all(i % 2 == 0 for i in found.column("id").to_pylist())
                    searches += 1
            return searches

        with ThreadPoolExecutor(3) as pool:
            optimized, deleted, searched = pool.submit(optimize), pool.submit(delete), pool.submit(search)
            deadline = time.monotonic() + 8
            try:
                while time.monotonic() < deadline:
                    server.action("list_datasets")
                    server.action("describe_dataset", {"dataset": "pruned"})
                    server.action("dataset_history", {"dataset": "pruned"})
            finally:
                stop.set()
            assert optimized.result() > 3 and deleted.result() > 10 and searched.result() > 10


def test_result_cache_counts_what_its_results_hold(tmp_path: Path) -> None:
    """Many distinct small results (point lookups) keep the result cache within its budget counted in real
    memory: a kept one-row result held 25 KB of RSS (DuckDB's vectors) but counted 18 bytes, so a 64 MB
    cache grew the server without bound (the soak's RSS rose 25 MB/min)."""
    lookups, budget = 1200, 1 << 20
    with load_server(tmp_path / "root", result_cache_mb="1") as server:
        server.put("lookups", loadgen.events_table(list(range(lookups)), 0))

        def look(first: int) -> None:
            with flight.connect(server.location) as client:
                for row_id in range(first, lookups, 4):
                    ticket = {"sql": f"SELECT id, value FROM lookups WHERE id = {row_id}"}
                    table = client.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()
                    assert table.column("value").to_pylist() == [row_id % 1000]

        with ThreadPoolExecutor(4) as pool:
            list(pool.map(look, range(4)))
        facts = server.action("health")
        assert isinstance(facts, dict)
        kept = facts["result_cache"]
        assert 0 < kept["results"] <= budget // 4096 and kept["bytes"] <= budget, kept


#: A Lance table of 40 fragments (one per append) of 20,000 rows: a scan of it streams for a while.
PIECES, PER_PIECE = 40, 20_000


def fragmented_table(server: ServerProcess, name: str) -> None:
    """Create ``name`` by ``PIECES`` appends of ``PER_PIECE`` rows each."""
    for piece in range(PIECES):
        ids = list(range(piece * PER_PIECE, (piece + 1) * PER_PIECE))
        server.put(name, loadgen.churn_table(ids), mode="create" if piece == 0 else "append")


def slow_scan(client: flight.FlightClient, name: str) -> flight.FlightStreamReader:
    """A scan of every row of ``name``, started (its version pinned) and left for the caller to read."""
    return client.do_get(flight.Ticket(json.dumps({"sql": f"SELECT id, vec FROM {name}"}).encode()))


def test_optimize_waits_for_a_running_read_of_the_old_version(server: ServerProcess) -> None:
    """A scan of a Lance table streamed slowly while ``optimize`` with ``older_than_seconds: 0`` compacts it:
    the scan reads every row of the version it started on (the clean-up removed the old fragments under it:
    "Not found" on S3), and the old version's files go once the scan has ended."""
    fragmented_table(server, "held")
    with flight.connect(server.location) as client:
        reader = slow_scan(client, "held")
        first = reader.read_chunk().data
        optimized = server.action("optimize", {"dataset": "held", "older_than_seconds": 0})
        assert optimized["fragments_after"] == 1, optimized
        rest = reader.read_all()
    assert first.num_rows + rest.num_rows == PIECES * PER_PIECE
    history = lambda: server.action("dataset_history", {"dataset": "held"})  # noqa: E731
    assert wait_until(lambda: len(history()) == 1), history()


def index_files_open(pid: int) -> int:
    """Files of Lance indexes the process holds open."""
    fd_dir = Path(f"/proc/{pid}/fd")
    held = 0
    for entry in fd_dir.iterdir():
        with contextlib.suppress(OSError):  # closed meanwhile
            held += "/_indices/" in os.readlink(entry)
    return held


def test_rebuilt_indexes_do_not_keep_their_files_open(server: ServerProcess) -> None:
    """Every optimize makes a new version of a full-text index; the readers Lance's caches kept of the
    replaced versions held their files open (three more per optimize, a soak +110), and their count now
    stays put."""
    server.put("indexed", loadgen.items_table(list(range(500))), mode="create")
    server.action("create_index", {"dataset": "indexed", "column": "text", "kind": "fts"})
    wait_for_index(server, "indexed", "text", timeout=60)
    text_search = {"search": {"dataset": "indexed", "text": "w3", "k": 5}}
    held = []
    for number in range(12):
        server.put("indexed", loadgen.items_table([1000 + number]))
        server.action("optimize", {"dataset": "indexed"})
        with flight.connect(server.location) as client:
            assert client.do_get(flight.Ticket(json.dumps(text_search).encode())).read_all().num_rows == 5
        held.append(index_files_open(server.pid))
    assert max(held[4:]) <= max(held[:4]) + 2, held


def test_expire_snapshots_waits_for_a_running_read_of_an_old_version(server: ServerProcess) -> None:
    """``expire_snapshots`` keeping one version of a Lance table while a scan streams the version before a
    compaction: the scan reads every row (Lance's clean-up deleted the fragments under it), and the old
    versions go once it has ended."""
    fragmented_table(server, "kept")
    with flight.connect(server.location) as client:
        reader = slow_scan(client, "kept")
        first = reader.read_chunk().data
        optimized = server.action("optimize", {"dataset": "kept", "older_than_seconds": 3600})
        assert optimized["fragments_after"] == 1, optimized  # the old fragments stay with their versions
        expired = server.action(
            "expire_snapshots", {"dataset": "kept", "keep_last": 1, "older_than_seconds": 0}
        )
        assert expired["old_versions_removed"] == "after the running reads", expired
        assert expired["snapshots_expired"] == expired["snapshots_before"] - 1, expired
        rest = reader.read_all()
    assert first.num_rows + rest.num_rows == PIECES * PER_PIECE
    history = lambda: server.action("dataset_history", {"dataset": "kept"})  # noqa: E731
    assert wait_until(lambda: len(history()) == 1), history()
    assert server.sql("SELECT count(*) AS n FROM kept").column("n")[0].as_py() == PIECES * PER_PIECE
    idle = server.action("expire_snapshots", {"dataset": "kept", "keep_last": 1, "older_than_seconds": 0})
    assert (idle["snapshots_expired"], idle["old_versions_removed"]) == (0, "now"), idle
