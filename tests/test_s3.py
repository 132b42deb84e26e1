"""S3 roots through the real server process and CLI: start-up checks, secrets, outages, rebuild, gc.

Start-up checks and secrets use the session SeaweedFS; the outage test stops and restarts S3, so it runs
on a SeaweedFS of its own. Catalog rebuild and gc run on both roots.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import sqlalchemy

from tests.conftest import (
    BUCKET,
    CATALOG_KINDS,
    ServerProcess,
    data_files,
    is_s3,
    pending_uploads,
    register_s3_root,
    root_forms,
    running_seaweedfs,
    s3_root,
    storage_env,
    stored_files,
    wait_until,
    without_locations,
)
from tests.seaweedfs import SeaweedFS, free_port

CHUNK = 10_000
# Fail fast when S3 is down: 1 s to connect, 3 s per request, 2 tries.
SHORT_S3_TIMEOUTS = {
    "LAKEHOUSE_S3_CONNECT_TIMEOUT_SECONDS": "1",
    "LAKEHOUSE_S3_REQUEST_TIMEOUT_SECONDS": "3",
    "LAKEHOUSE_S3_MAX_ATTEMPTS": "2",
}
# Small row groups and files: an upload in progress has data files on storage (completed S3 objects).
SMALL_FILES = {"LAKEHOUSE_ROW_GROUP_ROWS": "1024", "LAKEHOUSE_TARGET_FILE_MB": "1"}
GC_LINE = re.compile(r"^(would delete|deleted) (\S+) \((\d+) bytes(?:, unfinished upload)?\)$")

# A client in its own process streaming batches of random (incompressible) values until it is killed.
ENDLESS_UPLOAD = textwrap.dedent(
    """
    import sys, time
    import numpy as np, pyarrow as pa, pyarrow.flight as flight
    location, dataset = sys.argv[1], sys.argv[2]
    client = flight.connect(location)
    rng = np.random.default_rng(7)
    ids, values = pa.array(rng.integers(0, 2**62, 10_000)), pa.array(rng.random(10_000))
    batch = pa.record_batch({"id": ids, "v": values})
    writer, _ = client.do_put(flight.FlightDescriptor.for_path(dataset), batch.schema)
    sent = 0
    while True:
        writer.write_batch(batch)
        sent += 1
        if sent == 5:
            print("streaming", flush=True)
        time.sleep(0.01)
    """
)


def rows(count: int, seed: int = 0) -> pa.Table:
    """``count`` rows of random ``id`` (int64) and ``v`` (float64) values."""
    rng = np.random.default_rng(seed)
    return pa.table({"id": pa.array(rng.integers(0, 2**62, count)), "v": pa.array(rng.random(count))})


def cli(
    *args: str, env: dict[str, str], timeout: float = 120, unset: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``flight-lakehouse ARGS`` with ``env`` over ours, minus variables starting with ``unset``.

    A process outliving ``timeout`` is killed (by ``subprocess.run``, by its pid).
    """
    inherited = {k: v for k, v in os.environ.items() if not (unset and k.startswith(unset))}
    return subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**inherited, **env},
    )


def serve_refused(
    env: dict[str, str], *args: str, timeout: float = 60, unset: tuple[str, ...] = ()
) -> tuple[str, float]:
    """Run ``serve`` expecting it to refuse to start; return its single stderr line and the time taken."""
    started = time.monotonic()
    result = cli("serve", "--port", "0", "--http-port=-1", *args, env=env, timeout=timeout, unset=unset)
    elapsed = time.monotonic() - started
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0], elapsed


def history_ids(server: ServerProcess, dataset: str) -> list[int]:
    """Snapshot ids of a dataset, newest first."""
    history = server.action("dataset_history", {"dataset": dataset})
    assert isinstance(history, list)
    return [entry["snapshot_id"] for entry in history]


def head(exc: BaseException) -> str:
    """The one-line message of a Flight error (before ``. Detail:``)."""
    message = str(exc).split(". Detail:")[0]
    assert "\n" not in message and "Traceback" not in message, str(exc)
    return message


def relative(root: str, address: str) -> str:
    """An address (``s3://`` URL or local path) relative to ``root``."""
    if is_s3(root):
        return address.removeprefix(s3_root(root).url + "/")
    return Path(address).resolve().relative_to(Path(root).resolve()).as_posix()


def table_files(root: str) -> dict[str, int]:
    """Files under ``tables/`` of a root, relative to it, with their sizes."""
    found = {relative(root, address): size for address, size in stored_files(root).items()}
    return {name: size for name, size in found.items() if name.startswith("tables/")}


def catalog_file(root: str) -> Path:
    """The SQLite catalog of a root: in the root when local, in the state directory for S3."""
    return (s3_root(root).state_dir if is_s3(root) else Path(root)) / "catalog.db"


def gc(root: str, *args: str) -> dict[str, int]:
    """Run ``flight-lakehouse gc ARGS`` on ``root``; return the files it listed (relative) and their sizes."""
    result = cli("gc", "--root", root, *args, env=storage_env(root))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    listed: dict[str, int] = {}
    for line in lines[:-1]:
        match = GC_LINE.match(line)
        assert match, f"unexpected gc line {line!r}"
        assert match.group(1) == ("deleted" if "--apply" in args else "would delete"), line
        listed[relative(root, match.group(2))] = int(match.group(3))
    assert re.match(rf"^{len(listed)} file\(s\), {sum(listed.values())} bytes ", lines[-1]), result.stdout
    return listed


def dataset_state(server: ServerProcess) -> dict[str, tuple[list[int], int, int | None]]:
    """For each dataset: snapshot ids (newest first), rows, and the sum of ``id`` (a content check)."""
    listing = server.action("list_datasets")
    assert isinstance(listing, list)
    state = {}
    for entry in listing:
        name = entry["name"]
        total = server.sql(f"select count(*) as n, sum(id::hugeint)::varchar as s from {name}").to_pylist()[0]
        state[name] = (history_ids(server, name), total["n"], total["s"])
    return state


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of the test's own (it may stop and restart it), with the bucket ``lakehouse-test``."""
    with running_seaweedfs(tmp_path / "private-s3") as s3:
        yield s3


# -- start-up checks -------------------------------------------------------------------------------------


@pytest.mark.parametrize("wrong", ["secret", "access_key_id"])
def test_wrong_credentials_stop_the_server(seaweedfs: SeaweedFS, tmp_path: Path, wrong: str) -> None:
    """Refused credentials: one line naming endpoint, bucket and the credentials, never the secret."""
    root = register_s3_root(seaweedfs, tmp_path / "state", "wrong-credentials")
    bad_secret = "WRONG" + uuid.uuid4().hex
    env = root.env()
    if wrong == "secret":
        env["LAKEHOUSE_S3_SECRET_ACCESS_KEY"] = bad_secret
    else:
        env["LAKEHOUSE_S3_ACCESS_KEY_ID"] = "AKIDNOSUCHKEY0000000"
    line, _ = serve_refused(env, "--root", root.url)
    assert seaweedfs.endpoint in line and BUCKET in line, line
    assert "credentials" in line.lower(), line
    assert "port in use" not in line, f"a credentials problem reported as a port problem: {line}"
    assert bad_secret not in line and seaweedfs.secret_key not in line, line
    assert root.objects() == {}


def test_missing_credentials_stop_the_server(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """No credentials anywhere (nor in the AWS chain): one line saying so, naming endpoint and bucket."""
    root = register_s3_root(seaweedfs, tmp_path / "state", "no-credentials")
    env = {k: v for k, v in root.env().items() if "ACCESS_KEY" not in k}
    env.update(
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    line, _ = serve_refused(env, "--root", root.url, unset=("AWS_", "LAKEHOUSE_S3_"))
    assert seaweedfs.endpoint in line and BUCKET in line, line
    assert "credentials" in line.lower(), line
    assert "port in use" not in line, line


def test_missing_bucket_needs_create_bucket(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """A missing bucket stops the server (naming ``--create-bucket``); with the flag it is created."""
    bucket = f"missing-{uuid.uuid4().hex[:12]}"
    root = register_s3_root(seaweedfs, tmp_path / "state", "created", bucket=bucket)
    client = seaweedfs.boto3_client()

    line, _ = serve_refused(root.env(), "--root", root.url)
    assert seaweedfs.endpoint in line and bucket in line, line
    assert "does not exist" in line and "--create-bucket" in line, line
    assert "port in use" not in line, line
    assert bucket not in {b["Name"] for b in client.list_buckets()["Buckets"]}

    server = ServerProcess(root.url, ["--create-bucket"])
    try:
        server.start()
        assert bucket in {b["Name"] for b in client.list_buckets()["Buckets"]}
        assert server.put("t", rows(100))["rows_written"] == 100
        assert server.sql("select count(*) as n from t").to_pylist() == [{"n": 100}]
        assert data_files(root.url), "the data should be in the new bucket"
    finally:
        server.stop()
        server.kill()


def test_unreachable_endpoint_stops_the_server_promptly(tmp_path: Path) -> None:
    """Nothing listening at the endpoint (default timeouts): one line naming it, exit within ~15 s."""
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "LAKEHOUSE_S3_ENDPOINT": endpoint,
        "LAKEHOUSE_S3_REGION": "us-east-1",
        "LAKEHOUSE_S3_ACCESS_KEY_ID": "AKIDUNREACHABLE00000",
        "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "unreachable-secret-" + uuid.uuid4().hex,
        "LAKEHOUSE_STATE_DIR": str(tmp_path / "state"),
    }
    line, elapsed = serve_refused(env, "--root", f"s3://{BUCKET}/unreachable", timeout=60)
    assert endpoint in line and BUCKET in line, line
    assert env["LAKEHOUSE_S3_SECRET_ACCESS_KEY"] not in line, line
    assert "port in use" not in line, line
    assert elapsed < 16, f"took {elapsed:.1f} s to give up on an unreachable endpoint"


# -- secrets ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
def test_credentials_never_reach_logs_results_or_errors(
    seaweedfs: SeaweedFS, tmp_path: Path, log_level: str
) -> None:
    """Neither the secret nor the access key id appear in any log line, result, error or CLI output.

    At DEBUG level the AWS libraries would log signed request headers (with the access key id); the
    server keeps them at INFO.
    """
    root = register_s3_root(seaweedfs, tmp_path / "state", "secrets")
    secret, key_id = seaweedfs.secret_key, seaweedfs.access_key
    seen: list[str] = []
    server = ServerProcess(root.url, ["--log-level", log_level])
    try:
        server.start()
        for seed in (1, 2):
            seen.append(json.dumps(server.put("t", rows(1000, seed))))
        server.put("u", rows(10))
        for name, body in (
            ("health", {}),
            ("list_datasets", {}),
            ("describe_dataset", {"dataset": "t"}),
            ("dataset_history", {"dataset": "t"}),
        ):
            seen.append(json.dumps(without_locations(server.action(name, body))))
        seen.extend(str(info.schema) + str(info.endpoints) for info in server.client.list_flights())
        seen.append(str(server.client.get_flight_info(flight.FlightDescriptor.for_path("t")).endpoints))
        seen.extend(action.description for action in server.client.list_actions())

        failing: list[Callable[[], object]] = [
            lambda: server.sql("select * from nosuch"),
            lambda: server.sql("select nosuch_column from t"),
            lambda: server.sql("select * from read_parquet('s3://lakehouse-test/other/x.parquet')"),
            lambda: server.sql(f"select * from '{sorted(data_files(root.url))[0]}'"),
            lambda: server.ticket({"dataset": "t", "snapshot_id": 123}),
            lambda: server.action("describe_dataset", {"dataset": "nosuch"}),
            lambda: server.put("t", pa.table({"other": [1]})),
        ]
        # A storage fault: the data files of ``u`` vanish behind the server's back.
        failing.append(lambda: server.sql("select sum(v) from u"))
        for call in failing[:-1]:
            with pytest.raises(pa.ArrowException) as info:
                call()
            seen.append(str(info.value))
        client = seaweedfs.boto3_client()
        for url in data_files(root.url):
            if "/tables/u/" in url:
                client.delete_object(Bucket=root.bucket, Key=url.removeprefix(f"s3://{root.bucket}/"))
        with pytest.raises(pa.ArrowException) as info:
            failing[-1]()
        assert "Traceback" not in str(info.value)
        seen.append(str(info.value))
        for text in seen:
            assert secret not in text and key_id not in text, text
            for form in root_forms(root.url):
                assert form not in text, text

        for command in (("gc", "--dry-run"), ("catalog", "rebuild")):
            result = cli(*command, "--root", root.url, env=root.env())
            assert result.returncode == 0, result.stderr
            assert secret not in result.stdout + result.stderr, command
            assert key_id not in result.stdout + result.stderr, command
    finally:
        server.stop()
        server.kill()
    assert len(server.log_lines) > 3
    for line in server.log_lines:
        assert secret not in line and key_id not in line, line


def test_standard_aws_credential_chain(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    """Without LAKEHOUSE_S3_* credentials the standard AWS variables are used, for writes and reads."""
    root = register_s3_root(seaweedfs, tmp_path / "state", "chain")
    chain = {
        "LAKEHOUSE_S3_ACCESS_KEY_ID": "",
        "LAKEHOUSE_S3_SECRET_ACCESS_KEY": "",
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key,
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key,
    }
    server = ServerProcess(root.url, env=chain)
    try:
        server.start()
        assert server.put("chained", rows(1000, 3))["rows_written"] == 1000
        assert server.sql("select count(*) as n from chained").to_pylist() == [{"n": 1000}]
        assert len(data_files(root.url)) == 1
    finally:
        server.stop()
        server.kill()


# -- S3 outage -------------------------------------------------------------------------------------------


def test_s3_stopped_mid_ingest_then_back(private_s3: SeaweedFS, tmp_path: Path) -> None:
    """S3 stops during an upload: UNAVAILABLE, nothing committed; once S3 is back the server recovers."""
    root = register_s3_root(private_s3, tmp_path / "state", "outage")
    server = ServerProcess(root.url, env={**SHORT_S3_TIMEOUTS, **SMALL_FILES})
    try:
        server.start()
        server.put("events", rows(CHUNK, 1))
        server.put("unread", rows(10, 4))  # never queried before S3 goes down: no local copy of its files
        before_ids = history_ids(server, "events")
        before_files = data_files(root.url)
        # A first query: the server has what it needs locally to answer queries reading no dataset, and
        # copies of the data files of ``events`` (a query reads local copies, see file_cache.py).
        assert server.sql("select count(*) as n from events").to_pylist() == [{"n": CHUNK}]

        s3_down = threading.Event()
        outcome: dict[str, object] = {}
        batch = rows(CHUNK, 2).to_batches()[0]

        def upload() -> None:
            """Stream slowly; a second after S3 went down, finish the upload (if still possible)."""
            client = flight.connect(server.location)
            try:
                writer, reader = client.do_put(flight.FlightDescriptor.for_path("events"), batch.schema)
                with writer:
                    deadline = None
                    while deadline is None or time.monotonic() < deadline:
                        writer.write_batch(batch)
                        time.sleep(0.02)
                        if deadline is None and s3_down.is_set():
                            deadline = time.monotonic() + 1.0
                    writer.done_writing()
                    outcome["result"] = reader.read()
            except BaseException as exc:
                outcome["error"] = exc
            finally:
                outcome["ended"] = time.monotonic()
                client.close()

        uploader = threading.Thread(target=upload)
        uploader.start()
        try:
            assert wait_until(
                lambda: len(data_files(root.url) | pending_uploads(root.url)) > len(before_files)
            )
            private_s3.stop()
            stopped = time.monotonic()
            s3_down.set()
        finally:
            uploader.join(60)
        assert not uploader.is_alive(), "the upload hangs while S3 is down"
        error = outcome.get("error")
        assert isinstance(error, flight.FlightUnavailableError), outcome
        message = head(error)
        assert re.search(r"storage|s3", message, re.IGNORECASE), message
        assert private_s3.secret_key not in str(error)
        for form in root_forms(root.url):
            assert form not in str(error), str(error)
        assert float(outcome["ended"]) - stopped < 20  # type: ignore[arg-type]

        # While S3 is down: storage reads are UNAVAILABLE, promptly; work needing no storage goes on, and so
        # do a result the server keeps (the count above: the snapshot it read has not changed) and queries
        # over the local copies of the files it read.
        started = time.monotonic()
        with pytest.raises(flight.FlightUnavailableError) as info:
            server.sql("select count(*) as n, max(id) as top from unread")
        assert time.monotonic() - started < 15
        assert re.search(r"storage|s3", head(info.value), re.IGNORECASE), str(info.value)
        assert server.sql("select 42 as x").to_pylist() == [{"x": 42}]
        assert server.sql("select count(*) as n from events").to_pylist() == [{"n": CHUNK}]
        assert server.sql("select count(*) as n, min(v) >= 0 as ok from events").to_pylist() == [
            {"n": CHUNK, "ok": True}
        ]

        private_s3.restart()
        pid = server.pid

        def recovered() -> bool:
            try:
                return server.sql("select sum(id) >= 0 as ok from events").to_pylist() == [{"ok": True}]
            except flight.FlightUnavailableError:
                return False

        assert wait_until(recovered, timeout=30, interval=0.5), "no recovery within 30 s of S3's return"
        assert server.process is not None and server.process.poll() is None and server.pid == pid
        assert history_ids(server, "events") == before_ids
        after = server.put("events", rows(5, 3))
        assert after["rows_written"] == 5
        assert history_ids(server, "events") == [after["snapshot_id"], *before_ids]
        assert server.sql("select count(*) as n from events").to_pylist() == [{"n": CHUNK + 5}]
    finally:
        server.stop()
        server.kill()


# -- catalog rebuild -------------------------------------------------------------------------------------


def lose_catalog(root: str) -> None:
    """Lose the catalog of ``root``: delete its SQLite file, or drop its tables in PostgreSQL."""
    uri = storage_env(root).get("LAKEHOUSE_CATALOG_URI")
    if uri is not None:
        engine = sqlalchemy.create_engine(uri)
        try:
            with engine.begin() as connection:
                connection.execute(sqlalchemy.text("DROP TABLE iceberg_tables, iceberg_namespace_properties"))
        finally:
            engine.dispose()
        return
    catalog = catalog_file(root)
    assert catalog.is_file()
    for path in catalog.parent.glob(catalog.name + "*"):
        path.unlink()


@pytest.mark.parametrize("storage_root", CATALOG_KINDS, indirect=True)
def test_catalog_rebuild_after_losing_the_catalog(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """Lose the catalog (its file; its tables in PostgreSQL), ``catalog rebuild``: every dataset is back at
    its last snapshot."""
    server = start_server()
    for seed in range(3):
        server.put("multi", rows(1000 + seed, seed))
    server.put("multi", rows(500, 9), mode="overwrite")
    server.put("multi", rows(7, 10))
    server.put("single", rows(321, 11))
    server.put("empty", rows(0))
    server.put("dropped", rows(5, 12))
    assert server.action("drop_dataset", {"dataset": "dropped"}) == {"dropped": True}
    before = dataset_state(server)
    assert sorted(before) == ["empty", "multi", "single"]
    assert len(before["multi"][0]) >= 5 and before["multi"][1] == 507
    server.stop()

    lose_catalog(storage_root)
    server.start()
    assert server.action("list_datasets") == [], "the catalog was not lost"
    server.stop()

    rebuilt = cli("catalog", "rebuild", "--root", storage_root, env=storage_env(storage_root))
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert sorted(re.findall(r"^registered (\w+) -> ", rebuilt.stdout, re.MULTILINE)) == sorted(before)
    assert rebuilt.stdout.strip().splitlines()[-1] == "3 table(s) registered"

    server.start()
    assert dataset_state(server) == before
    server.put("multi", rows(3, 13))
    assert history_ids(server, "multi")[1:] == before["multi"][0]
    server.stop()
    again = cli("catalog", "rebuild", "--root", storage_root, env=storage_env(storage_root))
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip().splitlines() == ["0 table(s) registered"]


# -- gc --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("storage_root", CATALOG_KINDS, indirect=True)
def test_gc_lists_and_deletes_exactly_the_orphans(
    start_server: Callable[..., ServerProcess], storage_root: str
) -> None:
    """After a server killed mid-ingest, gc lists exactly the unreferenced files, deletes them, no more."""
    server = start_server(env=SMALL_FILES)
    server.put("events", rows(CHUNK, 1))
    server.put("events", rows(CHUNK, 2))
    ids = history_ids(server, "events")
    before = table_files(storage_root)

    uploader = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_UPLOAD, server.location, "events"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert uploader.stdout is not None
        assert uploader.stdout.readline().strip() == "streaming"
        grew = wait_until(lambda: len(data_files(storage_root)) > len(before), timeout=30)
        assert grew, "the upload put no data file on storage"
        time.sleep(0.3)
        server.kill()  # SIGKILL: the server cleans nothing up
    finally:
        os.kill(uploader.pid, signal.SIGKILL)
        uploader.wait(10)
    after = table_files(storage_root)
    orphans = {name: size for name, size in after.items() if name not in before}
    assert orphans and all(before[name] == after[name] for name in before), (before, after)
    time.sleep(0.1)

    # On S3 a file the killed server was writing is an unfinished multipart upload: garbage too (0 bytes).
    # Whether one was open at the kill is timing: the one ingest writes one file at a time, opened at the
    # first row group after the previous file rolled over. So at most one, of a data file not yet listed.
    unfinished = {relative(storage_root, address): 0 for address in pending_uploads(storage_root)}
    assert len(unfinished) <= 1, unfinished
    for name in unfinished:
        assert name.startswith("tables/") and name.endswith(".parquet") and name not in after, name
    garbage = {**orphans, **unfinished}
    assert gc(storage_root, "--dry-run") == {}, "fresh files are inside the default grace period"
    assert gc(storage_root, "--dry-run", "--older-than-seconds", "0") == garbage
    assert table_files(storage_root) == after, "a dry run deleted something"
    assert gc(storage_root, "--apply", "--older-than-seconds", "0") == garbage
    assert table_files(storage_root) == before
    assert pending_uploads(storage_root) == set(), "gc left the cut-off upload's multipart upload"

    server.start()
    assert history_ids(server, "events") == ids
    assert server.sql("select count(*) as n from events").to_pylist() == [{"n": 2 * CHUNK}]
    server.stop()
    assert gc(storage_root, "--dry-run", "--older-than-seconds", "0") == {}
