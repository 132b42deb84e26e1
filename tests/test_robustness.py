"""Failures mid-way: cut-off uploads, a killed server, readers racing writers, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import (
    ServerProcess,
    assert_refusal,
    data_files,
    is_s3,
    root_listing,
    s3_root,
    wait_until,
    written_files,
)

CHUNK = 10_000

# A client in its own process that streams batches forever (slowly) until it is killed.
ENDLESS_UPLOAD = textwrap.dedent(
    """
    import json, sys, time
    import pyarrow as pa, pyarrow.flight as flight
    location, dataset = sys.argv[1], sys.argv[2]
    client = flight.connect(location)
    batch = pa.record_batch({"id": pa.array(range(10_000), pa.int64()), "tag": pa.array(["late"] * 10_000)})
    command = json.dumps({"ingest": {"dataset": dataset}}).encode()
    writer, _ = client.do_put(flight.FlightDescriptor.for_command(command), batch.schema)
    sent = 0
    while True:
        writer.write_batch(batch)
        sent += 1
        if sent == 20:
            print("streaming", flush=True)
        time.sleep(0.01)
    """
)


def tagged(rows: int, tag: str) -> pa.Table:
    """``rows`` rows whose ids count from 0, all tagged ``tag``."""
    return pa.table({"id": pa.array(range(rows), pa.int64()), "tag": pa.array([tag] * rows)})


def start_endless_upload(server: ServerProcess, dataset: str) -> subprocess.Popen[str]:
    """Start the slow uploader and wait until it has sent 20 batches."""
    uploader = subprocess.Popen(
        [sys.executable, "-c", ENDLESS_UPLOAD, server.location, dataset], stdout=subprocess.PIPE, text=True
    )
    assert uploader.stdout is not None
    assert uploader.stdout.readline().strip() == "streaming"
    return uploader


def history_ids(server: ServerProcess, dataset: str) -> list[int]:
    """Snapshot ids of a dataset, newest first."""
    return [entry["snapshot_id"] for entry in server.action("dataset_history", {"dataset": dataset})]


SMALL_FILES = {"LAKEHOUSE_TARGET_FILE_MB": "1", "LAKEHOUSE_ROW_GROUP_ROWS": "4096"}


def test_client_killed_mid_upload_commits_nothing_and_leaves_no_files(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(env=SMALL_FILES)  # small row groups: files exist on disk mid-stream
    server.put("events", tagged(CHUNK, "first"))
    before_files = written_files(server.root)
    before_ids = history_ids(server, "events")
    uploader = start_endless_upload(server, "events")
    assert wait_until(lambda: len(written_files(server.root)) > len(before_files)), "upload wrote no file yet"
    os.kill(uploader.pid, signal.SIGKILL)
    uploader.wait(10)
    assert wait_until(lambda: written_files(server.root) == before_files), "orphan files left behind"
    assert history_ids(server, "events") == before_ids
    assert server.sql(
        "select count(*) as n, count(*) filter (where tag = 'late') as late from events"
    ).to_pylist() == [{"n": CHUNK, "late": 0}]


def test_client_killed_while_creating_leaves_no_dataset(start_server) -> None:  # type: ignore[no-untyped-def]
    server = start_server(env=SMALL_FILES)
    uploader = start_endless_upload(server, "never")
    assert wait_until(lambda: bool(written_files(server.root))), "upload wrote no file yet"
    os.kill(uploader.pid, signal.SIGKILL)
    uploader.wait(10)
    assert wait_until(lambda: not written_files(server.root))
    assert server.action("list_datasets") == []
    with pytest.raises(pa.ArrowKeyError, match="never"):
        server.sql("select * from never")


def test_server_killed_mid_ingest_keeps_previous_snapshot(server: ServerProcess) -> None:
    server.put("events", tagged(CHUNK, "first"))
    before_ids = history_ids(server, "events")
    uploader = start_endless_upload(server, "events")
    try:
        server.kill()
    finally:
        uploader.kill()
        uploader.wait(10)
    server.start()
    assert history_ids(server, "events") == before_ids
    assert server.sql("select count(*) as n, min(tag) as tag from events").to_pylist() == [
        {"n": CHUNK, "tag": "first"}
    ]
    server.put("events", tagged(CHUNK, "second"))
    assert server.sql("select count(*) as n from events").to_pylist() == [{"n": 2 * CHUNK}]


def test_queries_during_ingest_see_whole_snapshots(start_server) -> None:  # type: ignore[no-untyped-def]
    # Small files and row groups: every append writes several files, so a torn read would show.
    server = start_server(env=SMALL_FILES)
    appends = 12
    server.put("events", tagged(5 * CHUNK, "0"))
    seen: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def read_loop() -> None:
        client = flight.connect(server.location)
        ticket = flight.Ticket(b'{"sql": "select count(*) as n, count(distinct tag) as tags from events"}')
        try:
            while not done.is_set():
                row = client.do_get(ticket).read_all().to_pylist()[0]
                seen.append((row["n"], row["tags"]))
        except BaseException as exc:
            errors.append(exc)
        finally:
            client.close()

    readers = [threading.Thread(target=read_loop) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for number in range(1, appends + 1):
            server.put("events", tagged(5 * CHUNK, str(number)), batch_rows=2_000)
    finally:
        done.set()
        for reader in readers:
            reader.join(30)
    assert not errors, errors
    assert len(seen) > appends
    for rows, tags in seen:
        assert rows == tags * 5 * CHUNK, f"torn snapshot: {rows} rows over {tags} appends"
    # The readers raced the writer: they saw the dataset grow, not one snapshot throughout.
    assert len(set(seen)) > 1, f"the readers saw only {set(seen)}"
    # After the last append, a read sees every append whole: all tags, all rows.
    final = server.sql("select count(*) as n, count(distinct tag) as tags from events").to_pylist()
    assert final == [{"n": (appends + 1) * 5 * CHUNK, "tags": appends + 1}]


def test_sigterm_lets_a_running_query_finish_and_exits_zero(server: ServerProcess) -> None:
    server.put("numbers", pa.table({"x": pa.array(range(200_000), pa.int64())}))
    reader = server.client.do_get(flight.Ticket(b'{"sql": "select x from numbers, range(20) order by x"}'))
    first = reader.read_chunk().data
    assert first.num_rows > 0
    os.kill(server.pid, signal.SIGTERM)
    rows = first.num_rows + sum(chunk.data.num_rows for chunk in reader)
    assert rows == 4_000_000
    assert server.process is not None
    assert server.process.wait(30) == 0


def test_stop_leaves_no_temporary_files(tmp_path: Path) -> None:
    """A stopped server leaves nothing in its TMPDIR (DuckDB's spill directory, the vector files)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    server = ServerProcess(str(tmp_path / "lakehouse"), env={"TMPDIR": str(temp)})
    try:
        server.start()
        server.put("numbers", pa.table({"x": pa.array(range(1000), pa.int64())}))
        assert server.sql("select sum(x) as s from numbers").to_pylist() == [{"s": 499500}]
        assert [p.name for p in temp.iterdir()], "the server made no temporary directory: nothing is tested"
        assert server.stop() == 0
        assert list(temp.iterdir()) == []
    finally:
        server.kill()


def test_restart_keeps_data_on_disk_layout(server: ServerProcess) -> None:
    server.put("kept", tagged(CHUNK, "a"))
    files = data_files(server.root)
    assert files and all(address.startswith(server.root.rstrip("/") + "/") for address in files), files
    server.restart()
    assert data_files(server.root) == files
    assert server.sql("select count(*) as n from kept").to_pylist() == [{"n": CHUNK}]


def remove_file(root: str, address: str) -> None:
    """Delete one stored file behind the server's back (local path or ``s3://`` URL)."""
    if is_s3(root):
        bucket, key = address.removeprefix("s3://").split("/", 1)
        s3_root(root).s3.boto3_client().delete_object(Bucket=bucket, Key=key)
    else:
        os.remove(address)


def test_a_damaged_dataset_does_not_break_queries_on_others(server: ServerProcess) -> None:
    server.put("good", tagged(CHUNK, "g"))
    server.put("damaged", tagged(CHUNK, "d"))
    (lost,) = (address for address in data_files(server.root) if "/damaged/" in address)
    remove_file(server.root, lost)
    assert server.sql("select 42 as x").to_pylist() == [{"x": 42}]
    assert server.sql("select count(*) as n from good").to_pylist() == [{"n": CHUNK}]
    with pytest.raises(flight.FlightUnavailableError) as info:
        server.sql("select count(*) from damaged")
    assert "storage" in str(info.value) and server.root not in str(info.value)
    assert server.sql("select count(*) as n from good").to_pylist() == [{"n": CHUNK}]


def test_lost_metadata_file_is_unavailable_not_internal(server: ServerProcess) -> None:
    """Storage lost the metadata file the catalog names: uploads and queries on that dataset answer one
    UNAVAILABLE line naming it (an upload answered INTERNAL before), other datasets keep working."""
    server.put("good", tagged(CHUNK, "g"))
    server.put("orphaned", tagged(CHUNK, "o"))
    base = f"{s3_root(server.root).url}/" if is_s3(server.root) else f"{server.root}/"
    metadata = [n for n in root_listing(server.root) if "/orphaned/metadata/" in n and n.endswith(".json")]
    assert metadata
    for name in metadata:
        remove_file(server.root, base + name)
    with pytest.raises(flight.FlightUnavailableError) as upload:
        server.put("orphaned", tagged(5, "x"))
    assert_refusal(upload, server, "metadata of dataset 'orphaned' cannot be read")
    with pytest.raises(flight.FlightUnavailableError) as query:
        server.sql("select count(*) from orphaned")
    assert_refusal(query, server, "metadata of dataset 'orphaned' cannot be read")
    assert server.sql("select count(*) as n from good").to_pylist() == [{"n": CHUNK}]
    assert not [line for line in server.log_lines if "internal error" in line]
