"""Several servers, one state: three ``serve`` processes on one S3 bucket (SeaweedFS) and one PostgreSQL
catalog. Writes through any of them commit exactly once (Iceberg commits that lose to another server's are
applied again on the new base; Lance commits by conditional put), and every server sees the others'."""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    ServerProcess,
    postgres_catalog,
    register_catalog,
    register_s3_root,
    search,
    vector_array,
    wait_for_serving,
    wait_until,
)
from tests.seaweedfs import SeaweedFS

SERVERS = 3
#: Small, so that the test waits little for Lance commits and in-memory copies of other servers.
LANCE_REFRESH_SECONDS = 0.5
DIMENSION = 4


@pytest.fixture(scope="module")
def servers(
    request: pytest.FixtureRequest, seaweedfs: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ServerProcess]]:
    """Three servers on one S3 root and one PostgreSQL catalog (each its own local state), started at once
    on the empty database (they race to set up the catalog's tables), stopped by pid."""
    base = tmp_path_factory.mktemp("several")
    root = register_s3_root(seaweedfs, base / "state", "several").url
    register_catalog(root, postgres_catalog(request))
    started = [
        ServerProcess(
            root,
            [],
            {
                "LAKEHOUSE_STATE_DIR": str(Path(base, f"state-{number}")),
                "LAKEHOUSE_LANCE_REFRESH_SECONDS": str(LANCE_REFRESH_SECONDS),
            },
        )
        for number in range(SERVERS)
    ]
    try:
        run_concurrently([server.start for server in started])
        yield started
    finally:
        for server in started:
            server.stop()
            server.kill()


def rows(first: int, count: int, tag: str = "") -> pa.Table:
    return pa.table({"id": pa.array(range(first, first + count), pa.int64()), "tag": [tag] * count})


def put(location: str, dataset: str, table: pa.Table, **options: object) -> dict:
    """DoPut through a client of its own (one per thread)."""
    client = flight.connect(location)
    try:
        command = {"ingest": {"dataset": dataset, **options}}
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        writer, reader = client.do_put(descriptor, table.schema)
        with writer:
            writer.write_table(table)
            writer.done_writing()
            return json.loads(reader.read().to_pybytes())
    finally:
        client.close()


def run_concurrently(jobs: list[Callable[[], None]]) -> None:
    """Run every job on a thread of its own, all at once; re-raise the first failure."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    if errors:
        raise errors[0]


def count(server: ServerProcess, dataset: str, expression: str = "count(*)") -> int:
    return server.sql(f"SELECT {expression} AS n FROM {dataset}").column("n")[0].as_py()


def counts_soon(server: ServerProcess, dataset: str, expected: int) -> bool:
    """Whether ``server`` counts ``expected`` rows in ``dataset`` within a few ``lance_refresh_seconds``
    (a Lance table another server created is not found until then)."""

    def counted() -> bool:
        try:
            return count(server, dataset) == expected
        except pa.ArrowKeyError:
            return False

    return wait_until(counted, timeout=10 * LANCE_REFRESH_SECONDS)


def test_concurrent_appends_through_three_servers_count_exactly(servers: list[ServerProcess]) -> None:
    servers[0].put("appends", rows(0, 1), mode="create")
    retries_before = sum(commit_retries(server) for server in servers)
    per_client, clients_per_server = 8, 2

    def appender(server: ServerProcess, client: int) -> Callable[[], None]:
        def job() -> None:
            for number in range(per_client):
                first = 1000 * (client + 1) + number * 10
                put(server.location, "appends", rows(first, 3, server.location))

        return job

    jobs = [appender(s, n * clients_per_server + c) for n, s in enumerate(servers) for c in range(2)]
    run_concurrently(jobs)
    expected = 1 + 3 * per_client * len(jobs)
    for server in servers:  # never lost, never doubled, and seen by every server at once
        assert count(server, "appends") == expected
        assert count(server, "appends", "count(DISTINCT id)") == expected
    history = servers[1].action("dataset_history", {"dataset": "appends"})
    assert len(history) == 1 + per_client * len(jobs)  # one snapshot per upload
    assert sorted(entry["rows"] for entry in history)[-1] == expected
    # the servers take turns by the dataset's lock in PostgreSQL: no commit of one lost to another's
    # (tests/test_postgres_catalog.py makes commits lose, without it)
    assert sum(commit_retries(server) for server in servers) == retries_before


def commit_retries(server: ServerProcess) -> float:
    """The server's ``flight_lakehouse_commit_retries_total`` (its HTTP port's /metrics)."""
    with urllib.request.urlopen(f"{server.http_url}/metrics", timeout=10) as response:
        text = response.read().decode()
    found = re.search(r"^flight_lakehouse_commit_retries_total (\S+)$", text, re.MULTILINE)
    assert found, "no flight_lakehouse_commit_retries_total"
    return float(found.group(1))


def test_first_uploads_racing_on_three_servers_create_the_dataset_once(servers: list[ServerProcess]) -> None:
    """Every server appends to a dataset none has yet: one creates it, the others' commits (which lost the
    creation) are made again as appends."""
    run_concurrently(
        [
            lambda s=server, n=number: put(s.location, "born", rows(10 * n, 10))
            for number, server in enumerate(servers)
        ]
    )
    for server in servers:
        assert count(server, "born", "count(DISTINCT id)") == 10 * SERVERS
    history = servers[0].action("dataset_history", {"dataset": "born"})
    assert len(history) == SERVERS


def test_racing_overwrites_leave_exactly_one_upload(servers: list[ServerProcess]) -> None:
    servers[0].put("snapshot", rows(0, 10, "first"), mode="create")

    def overwriter(server: ServerProcess, number: int) -> Callable[[], None]:
        def job() -> None:
            for attempt in range(3):
                put(server.location, "snapshot", rows(0, 10, f"{number}-{attempt}"), mode="overwrite")

        return job

    run_concurrently([overwriter(server, number) for number, server in enumerate(servers)])
    for server in servers:
        result = server.sql("SELECT count(*) AS n, count(DISTINCT tag) AS tags FROM snapshot").to_pylist()
        assert result == [{"n": 10, "tags": 1}]  # one overwrite's rows, never two mixed or doubled
    history = servers[2].action("dataset_history", {"dataset": "snapshot"})
    assert len(history) == 1 + 3 * SERVERS
    assert all(entry["rows"] == 10 for entry in history)


def vectors(first: int, count: int) -> pa.Table:
    matrix = np.random.default_rng(first).random((count, DIMENSION), dtype=np.float32)
    return pa.table({"id": pa.array(range(first, first + count), pa.int64()), "vec": vector_array(matrix)})


def test_lance_writes_and_upserts_from_several_servers_all_land(servers: list[ServerProcess]) -> None:
    servers[0].put("points", vectors(0, 10), mode="create")
    assert all(counts_soon(server, "points", 10) for server in servers)

    def appender(server: ServerProcess, number: int) -> Callable[[], None]:
        def job() -> None:
            for batch in range(5):
                put(server.location, "points", vectors(1000 * (number + 1) + 10 * batch, 4))

        return job

    run_concurrently([appender(server, number) for number, server in enumerate(servers[1:])])
    expected = 10 + 2 * 5 * 4
    assert all(counts_soon(server, "points", expected) for server in servers)

    def upserter(server: ServerProcess) -> Callable[[], None]:
        def job() -> None:  # ids 0..9 exist; 5000+ are new: every server upserts the same keys
            put(server.location, "points", vectors(0, 10), mode="upsert", key="id")
            for first in range(5000, 5030, 10):
                put(server.location, "points", vectors(first, 10), mode="upsert", key="id")

        return job

    run_concurrently([upserter(server) for server in servers])
    expected += 30  # each new key once, whichever server inserted it first
    for server in servers:
        assert counts_soon(server, "points", expected), count(server, "points")
        assert count(server, "points", "count(DISTINCT id)") == expected


def test_a_lance_table_created_by_two_servers_at_once_is_kept(servers: list[ServerProcess]) -> None:
    """The creation that loses is refused UNAVAILABLE (nothing written), and never deletes the winner's."""
    outcomes: list[str] = []

    def creator(server: ServerProcess, first: int) -> Callable[[], None]:
        def job() -> None:
            try:
                put(server.location, "twin", vectors(first, 10))
                outcomes.append("written")
            except flight.FlightUnavailableError as exc:
                assert "concurrent" in str(exc), exc
                outcomes.append("refused")

        return job

    run_concurrently([creator(servers[0], 0), creator(servers[1], 100)])
    assert "written" in outcomes
    expected = 10 * outcomes.count("written")
    for server in servers:
        assert counts_soon(server, "twin", expected), (outcomes, count(server, "twin"))


def test_commits_and_drops_are_seen_by_every_server(servers: list[ServerProcess]) -> None:
    first, second, third = servers
    first.put("shared", rows(0, 5), mode="create")
    assert count(second, "shared") == 5  # the next query of another server sees the commit
    second.put("shared", rows(5, 5))
    assert count(third, "shared") == 10
    first.put("vectors_shared", vectors(0, 5), mode="create")
    assert counts_soon(third, "vectors_shared", 5)

    assert first.action("drop_dataset", {"dataset": "shared"})
    for server in (second, third):
        with pytest.raises(pa.ArrowKeyError, match="not found"):  # NOT_FOUND
            server.action("describe_dataset", {"dataset": "shared"})
        with pytest.raises(pa.ArrowKeyError, match="not found"):
            server.sql("SELECT count(*) FROM shared")
    assert second.action("drop_dataset", {"dataset": "vectors_shared"})

    def gone(server: ServerProcess) -> bool:
        try:
            server.action("describe_dataset", {"dataset": "vectors_shared"})
        except pa.ArrowKeyError:
            return True
        return False

    assert wait_until(lambda: gone(first) and gone(third), timeout=10 * LANCE_REFRESH_SECONDS)
    names = {entry["name"] for entry in third.action("list_datasets")}  # type: ignore[union-attr]
    assert not names & {"shared", "vectors_shared"}


def test_in_memory_copy_of_another_server_catches_up(servers: list[ServerProcess]) -> None:
    writer, reader = servers[0], servers[1]
    writer.put("memory", vectors(0, 50), mode="create")
    assert counts_soon(reader, "memory", 50)
    described = wait_for_serving(reader, "memory", timeout=60)
    version = described["serving"]["version"]
    probe = np.full((1, DIMENSION), 7.0, dtype=np.float32)  # far from every random [0, 1) vector
    writer.put("memory", pa.table({"id": pa.array([999], pa.int64()), "vec": vector_array(probe)}))
    started = time.monotonic()
    body = {"dataset": "memory", "vector": probe[0].tolist(), "k": 1, "columns": ["id"]}
    assert wait_until(lambda: search(reader, body).column("id").to_pylist() == [999], timeout=10)
    seen = time.monotonic() - started
    caught_up = wait_for_serving(reader, "memory", timeout=10)
    assert caught_up["serving"]["version"] > version
    assert caught_up["serving"]["rows"] == 51
    assert seen < 4 * LANCE_REFRESH_SECONDS + 1, seen
