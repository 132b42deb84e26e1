"""``expected_rows``: an upload that states its size commits only when exactly that many rows arrived. A
client that gives up midway (an exception inside pyarrow's ``with writer:`` closes the stream as cleanly as
a finished upload) commits nothing and leaves no file, in both formats, for a new dataset and an existing
one; one sending more is refused as soon as it does. Without the field, a cleanly ended stream commits."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import ServerProcess, assert_refusal, data_files, stored_files, vector_array


class GaveUp(Exception):
    """The client's own failure in the middle of an upload."""


def rows(start: int, count: int, vectors: bool) -> pa.Table:
    columns: dict[str, pa.Array] = {"id": pa.array(np.arange(start, start + count, dtype=np.int64))}
    if vectors:
        columns["vec"] = vector_array(np.random.default_rng(start).random((count, 4), dtype=np.float32))
    return pa.table(columns)


def upload(server: ServerProcess, dataset: str, batches: list[pa.Table], expected_rows: int | None) -> None:
    """One DoPut of ``batches`` with an ingest command (``expected_rows`` when given)."""
    options: dict[str, object] = {"dataset": dataset}
    if expected_rows is not None:
        options["expected_rows"] = expected_rows
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"ingest": options}).encode())
    writer, _ = server.client.do_put(descriptor, batches[0].schema)
    with writer:
        for batch in batches:
            writer.write_table(batch)


def state(server: ServerProcess, dataset: str) -> tuple[list, set[str]]:
    """A dataset's history (none: it does not exist) and the stored files under the root."""
    try:
        history = server.action("dataset_history", {"dataset": dataset})
    except pa.ArrowKeyError:
        history = None
    # the search graph of a Lance table is saved beside it in the background (via a temporary): left out
    files = {address for address in stored_files(server.root) if ".hnsw.npz" not in address}
    return history, files  # type: ignore[return-value]


FORMATS = pytest.mark.parametrize("vectors", [False, True], ids=["parquet", "lance"])


@FORMATS
@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
def test_a_client_that_gives_up_commits_nothing(server: ServerProcess, vectors: bool, existing: bool) -> None:
    if existing:
        server.put("events", rows(0, 10, vectors))
    before = state(server, "events")
    descriptor = json.dumps({"ingest": {"dataset": "events", "expected_rows": 3000}}).encode()
    schema = rows(0, 1, vectors).schema
    # pyarrow's writer closes the stream as it leaves the block: the server's refusal is what is raised
    with pytest.raises(pa.ArrowInvalid, match="only 1,000 rows arrived") as refused:
        writer, _ = server.client.do_put(flight.FlightDescriptor.for_command(descriptor), schema)
        with writer:
            writer.write_table(rows(100, 1000, vectors))
            raise GaveUp("the client failed after 1,000 of 3,000 rows")
    assert isinstance(refused.value.__context__, GaveUp)
    assert state(server, "events") == before, "a stream that ended short committed or left files"


@FORMATS
def test_a_short_or_long_upload_is_refused_naming_both_counts(server: ServerProcess, vectors: bool) -> None:
    before = state(server, "events")
    with pytest.raises(pa.ArrowInvalid) as short:
        upload(server, "events", [rows(0, 500, vectors), rows(500, 500, vectors)], expected_rows=1500)
    assert_refusal(short, server, "1,000 rows arrived", "expected_rows is 1,500", "nothing was committed")
    with pytest.raises(pa.ArrowInvalid) as long:
        upload(server, "events", [rows(0, 500, vectors), rows(500, 500, vectors)], expected_rows=700)
    assert_refusal(long, server, "more than 1,000 rows arrived", "expected_rows is 700")
    assert state(server, "events") == before == (None, before[1]), "a refused upload left a dataset or files"
    assert not data_files(server.root)


@FORMATS
def test_the_stated_size_commits(server: ServerProcess, vectors: bool) -> None:
    upload(server, "events", [rows(0, 500, vectors), rows(500, 250, vectors)], expected_rows=750)
    assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 750}]
    upload(server, "events", [rows(750, 0, vectors)], expected_rows=0)  # an empty append states 0
    assert server.sql("SELECT count(*) AS n FROM events").to_pylist() == [{"n": 750}]


def test_without_the_field_a_clean_end_commits(server: ServerProcess) -> None:
    """The documented behaviour of plain uploads: whatever ended cleanly is committed."""
    with pytest.raises(GaveUp):
        writer, _ = server.client.do_put(flight.FlightDescriptor.for_path("plain"), rows(0, 1, False).schema)
        with writer:
            writer.write_table(rows(0, 100, False))
            raise GaveUp("the stream is closed cleanly by the context manager all the same")
    assert server.sql("SELECT count(*) AS n FROM plain").to_pylist() == [{"n": 100}]


def test_expected_rows_must_be_a_count(server: ServerProcess) -> None:
    with pytest.raises(pa.ArrowInvalid) as refused:
        upload(server, "events", [rows(0, 1, False)], expected_rows=-1)
    assert_refusal(refused, server, "expected_rows")
