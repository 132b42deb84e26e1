"""Hostile uploads: batches that are not valid Arrow, malformed IPC, strings where vectors belong.

Each is refused with INVALID_ARGUMENT naming the column or the problem; nothing is committed and the
server goes on serving. Invalid batches are made valid, then overwritten in place (pyarrow checks an
array only when it is built, and its Flight client sends what it is given); malformed IPC goes through
grpcio as hand-encoded ``FlightData`` messages, which no Arrow client would send.
"""

from __future__ import annotations

import ctypes
import json
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from tests.conftest import ServerProcess, assert_refusal, running_server, vector_array

ROWS = 3
VECTORS = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]
FLIGHT_SERVICE = "/arrow.flight.protocol.FlightService/"


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One local server for the module, with a Parquet dataset ``people`` and a Lance table ``vecs``."""
    with running_server(str(tmp_path_factory.mktemp("hostile") / "lakehouse")) as server:
        server.put("people", pa.table({"id": pa.array(range(ROWS), pa.int64()), "name": ["a", "b", "c"]}))
        server.put("vecs", pa.table({"id": pa.array(range(ROWS), pa.int64()), "vec": vector_array(VECTORS)}))
        yield server


def assert_serving(server: ServerProcess) -> None:
    """The server process lives and answers queries."""
    assert server.process is not None and server.process.poll() is None, server.log_lines[-20:]
    assert server.sql("SELECT 42 AS x").to_pylist() == [{"x": 42}]


def dataset_names(server: ServerProcess) -> set[str]:
    """Every dataset the server lists."""
    return {entry["name"] for entry in server.action("list_datasets")}  # type: ignore[union-attr]


def count(server: ServerProcess, dataset: str) -> int:
    """``count(*)`` of a dataset through SQL."""
    return server.sql(f"SELECT count(*) AS n FROM {dataset}").column("n")[0].as_py()


def one_line(message: str) -> str:
    """The message a client reads, before pyarrow's ``. Detail:`` suffix; asserted to be one line."""
    head = message.split(". Detail:")[0]
    assert "\n" not in head and "Traceback" not in head, message
    return head


# -- batches that are not valid Arrow --------------------------------------------------------------------


def overwrite(array: pa.Array | pa.ChunkedArray, buffer: int, raw: bytes) -> None:
    """Replace the first bytes of buffer number ``buffer`` of ``array`` (its one chunk) by ``raw``."""
    chunk = array.chunk(0) if isinstance(array, pa.ChunkedArray) else array
    target = chunk.buffers()[buffer]
    assert target is not None and len(raw) <= target.size
    ctypes.memmove(target.address, raw, len(raw))


def int32s(*values: int) -> bytes:
    """Little-endian int32 values: offsets and dictionary indices."""
    return np.array(values, dtype="<i4").tobytes()


def strings() -> pa.Array:
    """``["aa", "bb", "cc"]``: offsets in buffer 1, characters in buffer 2."""
    return pa.array(["aa", "bb", "cc"])


def string_lists() -> pa.Array:
    """``[["aa"], ["bb"], ["cc"]]``: list offsets in buffer 1."""
    return pa.array([["aa"], ["bb"], ["cc"]])


def dictionary() -> pa.Array:
    """Dictionary-encoded ``["aa", "bb", "aa"]``: indices in buffer 1."""
    return pa.array(["aa", "bb", "aa"]).dictionary_encode()


#: A column builder, and the buffer and bytes that make the column invalid.
CORRUPTIONS: dict[str, tuple[Callable[[], pa.Array], int, bytes]] = {
    "offsets_non_monotonic": (strings, 1, int32s(0, 4, 2, 6)),
    "offsets_past_data": (strings, 1, int32s(0, 2, 4, 100_000)),
    "offset_negative": (strings, 1, int32s(0, -50, 4, 6)),
    "offset_huge": (strings, 1, int32s(0, 2, 1 << 30, 6)),  # crashed the Parquet writer (segfault)
    "invalid_utf8": (strings, 2, b"\xff\xfe"),
    "list_offsets_past_values": (string_lists, 1, int32s(0, 1, 2, 50)),
    "list_offsets_non_monotonic": (string_lists, 1, int32s(0, 2, 1, 3)),
    "dictionary_index_out_of_range": (dictionary, 1, int32s(0, 7, 0)),
}
TARGETS = ["parquet_new", "parquet_existing", "lance_new", "lance_existing"]


def upload(target: str, column: pa.Array) -> pa.Table:
    """Three rows with ``column`` as ``name``, and a vector column when the target is a Lance table."""
    columns = {"id": pa.array(range(ROWS), pa.int64()), "name": column}
    if target.startswith("lance"):
        columns["vec"] = vector_array(VECTORS)
    return pa.table(columns)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_invalid_batch_is_refused_naming_the_column(
    hostile: ServerProcess, corruption: str, target: str
) -> None:
    """Refused before any writer sees it (``offset_huge`` used to crash the server), committing nothing."""
    build, buffer, raw = CORRUPTIONS[corruption]
    dataset = f"{corruption}_{target}"
    if target.endswith("existing"):
        hostile.put(dataset, upload(target, build()))
    table = upload(target, build())
    overwrite(table.column("name"), buffer, raw)  # after pa.table, which would check it
    with pytest.raises(pa.ArrowInvalid) as info:
        hostile.put(dataset, table)
    assert "'name'" in one_line(assert_refusal(info, hostile, "not valid Arrow"))
    assert_serving(hostile)
    if target.endswith("existing"):
        assert count(hostile, dataset) == ROWS
    else:
        assert dataset not in dataset_names(hostile)


QUERY_CORRUPTIONS = {
    "offsets_non_monotonic": int32s(0, 4, 2, 6),
    "offsets_past_values": int32s(0, 2, 4, 600),
    "offset_huge": int32s(0, 2, 1 << 30, 6),
}


def exchange(server: ServerProcess, dataset: str, batch: pa.RecordBatch) -> pa.Table:
    """A DoExchange search of ``dataset`` (k = 1) with one batch of query vectors."""
    command = {"search": {"dataset": dataset, "k": 1, "columns": ["id"]}}
    writer, reader = server.client.do_exchange(
        flight.FlightDescriptor.for_command(json.dumps(command).encode())
    )
    with writer:
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        return reader.read_all()


@pytest.mark.parametrize("corruption", list(QUERY_CORRUPTIONS))
def test_invalid_query_vectors_are_refused(hostile: ServerProcess, corruption: str) -> None:
    """The query vectors of a DoExchange search are an upload too."""
    batch = pa.record_batch({"vector": pa.array(VECTORS, pa.list_(pa.float32()))})
    overwrite(batch.column(0), 1, QUERY_CORRUPTIONS[corruption])
    with pytest.raises(pa.ArrowInvalid) as info:
        exchange(hostile, "vecs", batch)
    assert "'vector'" in one_line(assert_refusal(info, hostile, "not valid Arrow"))
    assert_serving(hostile)


# -- strings where vectors belong ------------------------------------------------------------------------

TEXT = pa.array(["1.0", "0.5", "2.0"])
TEXT_LISTS = pa.array([["1.0", "0.0"], ["0.0", "1.0"], ["1.0", "1.0"]])
TEXT_FIXED = pa.FixedSizeListArray.from_arrays(pa.array(["1.0", "0.0"] * ROWS), 2)
#: An upload, its options and the column the refusal names: new tables, then the table ``vecs``.
STRING_VECTORS = {
    "new_string_marked": ("s1", {"v": TEXT}, {"vector_column": "v"}, "'v'"),
    "new_string_marked_lance": ("s2", {"v": TEXT}, {"vector_column": "v", "format": "lance"}, "'v'"),
    "new_string_lists_marked": ("s3", {"v": TEXT_LISTS}, {"vector_column": "v"}, "'v'"),
    "new_fixed_strings_marked": ("s4", {"v": TEXT_FIXED}, {"vector_column": "v"}, "'v'"),
    "existing_string": ("vecs", {"vec": TEXT}, {}, "'vec'"),
    "existing_string_marked": ("vecs", {"vec": TEXT}, {"vector_column": "vec"}, "'vec'"),
    "existing_string_lists_marked": ("vecs", {"vec": TEXT_LISTS}, {"vector_column": "vec"}, "'vec'"),
    "existing_string_upsert": ("vecs", {"vec": TEXT}, {"mode": "upsert", "key": "id"}, "'vec'"),
}


@pytest.mark.parametrize("case", list(STRING_VECTORS))
def test_strings_where_vectors_belong_in_an_upload(hostile: ServerProcess, case: str) -> None:
    """A text column marked or sent as the vector column is refused by name (a marked string column used
    to be INTERNAL)."""
    dataset, columns, options, named = STRING_VECTORS[case]
    table = pa.table({"id": pa.array(range(ROWS), pa.int64()), **columns})
    existed = dataset in dataset_names(hostile)
    with pytest.raises(pa.ArrowInvalid) as info:
        hostile.put(dataset, table, **options)
    assert named in one_line(assert_refusal(info, hostile))
    assert_serving(hostile)
    assert (dataset in dataset_names(hostile)) == existed
    if existed:
        assert count(hostile, dataset) == ROWS


QUERY_STRINGS = {
    "strings": {"vector": TEXT},
    "string_lists": {"vector": TEXT_LISTS},
    "fixed_strings": {"vector": TEXT_FIXED},
    "fixed_strings_unnamed": {"queries": TEXT_FIXED},
}


@pytest.mark.parametrize("case", list(QUERY_STRINGS))
def test_strings_where_query_vectors_belong(hostile: ServerProcess, case: str) -> None:
    """Numbers spelled as text are no query vectors either (they used to be parsed as floats)."""
    columns = QUERY_STRINGS[case]
    with pytest.raises(pa.ArrowInvalid) as info:
        exchange(hostile, "vecs", pa.record_batch(columns))
    assert repr(next(iter(columns))) in one_line(assert_refusal(info, hostile))
    assert_serving(hostile)


# -- malformed IPC, sent as raw gRPC ---------------------------------------------------------------------


def varint(value: int) -> bytes:
    """A protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def path_descriptor(name: str) -> bytes:
    """``FlightDescriptor{type: PATH, path: [name]}``."""
    return varint(1 << 3) + varint(1) + field(3, name.encode())


def search_descriptor(dataset: str) -> bytes:
    """``FlightDescriptor{type: CMD, cmd: {"search": ...}}``."""
    command = {"search": {"dataset": dataset, "k": 1, "columns": ["id"]}}
    return varint(1 << 3) + varint(2) + field(2, json.dumps(command).encode())


def flight_data(descriptor: bytes | None = None, header: bytes | None = None, body: bytes = b"") -> bytes:
    """``FlightData``: descriptor (1), IPC message header (2), body (1000)."""
    parts = [(1, descriptor), (2, header), (1000, body or None)]
    return b"".join(field(number, value) for number, value in parts if value is not None)


def ipc(value: pa.Schema | pa.RecordBatch) -> tuple[bytes, bytes]:
    """The IPC message of a schema or batch: its flatbuffer header and its body."""
    message = pa.ipc.read_message(value.serialize())
    return message.metadata.to_pybytes(), message.body.to_pybytes() if message.body else b""


def raw_call(server: ServerProcess, method: str, messages: list[bytes]) -> grpc.RpcError:
    """The error a raw gRPC stream of ``messages`` to ``method`` ends with."""
    with grpc.insecure_channel(server.location.removeprefix("grpc://")) as channel:
        call = channel.stream_stream(FLIGHT_SERVICE + method)
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter(messages), timeout=60))
    return info.value  # type: ignore[return-value]


LONG_ROWS = 7  # a row count no other number in the batch header equals
BATCH = pa.record_batch({"id": pa.array(range(LONG_ROWS), pa.int64()), "name": [f"n{i}" for i in range(7)]})
SCHEMA_HEADER, _ = ipc(BATCH.schema)
BATCH_HEADER, BATCH_BODY = ipc(BATCH)
GARBAGE = random.Random(13).randbytes(96)


def longer_than_buffers(header: bytes) -> bytes:
    """A batch header claiming 10,000 rows (batch and field nodes) over buffers sized for 7."""
    return header.replace(LONG_ROWS.to_bytes(8, "little"), (10_000).to_bytes(8, "little"))


#: The messages after the first (descriptor and schema) of each malformed upload.
MALFORMED = {
    "garbage_header": [flight_data(header=GARBAGE, body=BATCH_BODY)],
    "garbage_body": [
        flight_data(header=BATCH_HEADER, body=GARBAGE[: len(BATCH_BODY)].ljust(len(BATCH_BODY)))
    ],
    "truncated_header": [flight_data(header=BATCH_HEADER[: len(BATCH_HEADER) // 2], body=BATCH_BODY)],
    "truncated_body": [flight_data(header=BATCH_HEADER, body=BATCH_BODY[:10])],
    "length_past_buffers": [flight_data(header=longer_than_buffers(BATCH_HEADER), body=BATCH_BODY)],
    "second_schema": [
        flight_data(header=BATCH_HEADER, body=BATCH_BODY),
        flight_data(header=ipc(pa.schema([("z", pa.float64())]))[0]),
    ],
}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "existing"])
@pytest.mark.parametrize("case", [*MALFORMED, "no_schema"])
def test_malformed_ipc_upload_is_invalid_argument(hostile: ServerProcess, case: str, existing: bool) -> None:
    """Not UNAVAILABLE ('retry later'): the same bytes would fail again."""
    dataset = "people" if existing else f"ipc_{case}"
    if case == "no_schema":
        messages = [flight_data(path_descriptor(dataset))]
    else:
        messages = [flight_data(path_descriptor(dataset), SCHEMA_HEADER), *MALFORMED[case]]
    error = raw_call(hostile, "DoPut", messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    message = one_line(error.details())
    assert "storage" not in message and hostile.root not in message, message
    assert_serving(hostile)
    if existing:
        assert count(hostile, "people") == ROWS
    else:
        assert dataset not in dataset_names(hostile)


@pytest.mark.parametrize("case", ["garbage_header", "truncated_body", "second_schema"])
def test_malformed_ipc_query_vectors_are_invalid_argument(hostile: ServerProcess, case: str) -> None:
    vectors = pa.record_batch({"vector": vector_array(VECTORS)})
    header, body = ipc(vectors)
    messages = [flight_data(search_descriptor("vecs"), ipc(vectors.schema)[0])]
    if case == "garbage_header":
        messages.append(flight_data(header=GARBAGE, body=body))
    elif case == "truncated_body":
        messages.append(flight_data(header=header, body=body[:5]))
    else:
        messages += [flight_data(header=header, body=body), flight_data(header=SCHEMA_HEADER)]
    error = raw_call(hostile, "DoExchange", messages)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    one_line(error.details())
    assert_serving(hostile)


FIRST_MESSAGE = {
    "garbage_schema": [flight_data(path_descriptor("first"), GARBAGE)],
    "batch_instead_of_schema": [flight_data(path_descriptor("first"), BATCH_HEADER, BATCH_BODY)],
    "nothing": [],
}


@pytest.mark.parametrize("case", list(FIRST_MESSAGE))
def test_malformed_first_message_is_refused_by_arrow(hostile: ServerProcess, case: str) -> None:
    """Arrow's C++ server reads the first message before any handler runs and answers UNKNOWN: never
    UNAVAILABLE, and the server goes on."""
    error = raw_call(hostile, "DoPut", FIRST_MESSAGE[case])
    assert error.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNKNOWN), error.code()
    one_line(error.details())
    assert_serving(hostile)
    assert "first" not in dataset_names(hostile)


# -- storage faults stay UNAVAILABLE ---------------------------------------------------------------------


def test_storage_fault_while_writing_stays_unavailable(hostile: ServerProcess) -> None:
    """A valid upload that storage cannot take is still 'retry later' (only reading the client's stream
    is the client's fault)."""
    blocked = Path(hostile.root) / "tables" / "blocked"
    blocked.mkdir(parents=True)
    (blocked / "data").write_text("a file where the data directory goes")
    with pytest.raises(flight.FlightUnavailableError) as info:
        hostile.put("blocked", pa.table({"id": pa.array(range(ROWS), pa.int64())}))
    assert "storage" in one_line(assert_refusal(info, hostile))
    assert_serving(hostile)
    assert "blocked" not in dataset_names(hostile)
