"""The everyday CLI commands (``describe``, ``history``, ``drop``, ``search``, ``index``, ``delete``,
``optimize``, ``datasets``, and ``query``'s output): the real command line against one real server, its
answers checked against the Flight actions'."""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import pty
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from tests.conftest import ServerProcess, search, vector_array

ROWS, DIMENSION = 300, 8


def cli(*args: str, env: dict[str, str] | None = None, stdin: int | None = subprocess.DEVNULL) -> Done:
    """Run ``flight-lakehouse ARGS`` (stdin not a terminal unless given)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", *args],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=stdin,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )
    return Done(done, time.monotonic() - started)


class Done:
    """A finished CLI run."""

    def __init__(self, done: subprocess.CompletedProcess[str], seconds: float) -> None:
        self.code, self.out, self.err, self.seconds = done.returncode, done.stdout, done.stderr, seconds

    def ok(self) -> Done:
        assert self.code == 0, self.err
        return self

    def json(self) -> object:
        return json.loads(self.ok().out)

    def json_lines(self) -> list[dict]:
        return [json.loads(line) for line in self.ok().out.splitlines()]

    def error(self) -> str:
        """The one ``Error:`` line of a refused command (exit code 1, no traceback)."""
        lines = self.err.strip().splitlines()
        assert self.code == 1 and len(lines) == 1 and lines[0].startswith("Error: "), (self.code, self.err)
        return lines[0]


def docs_table(rows: int = ROWS) -> pa.Table:
    """A vector table: id, text, a list column, bytes and an 8-dimensional float32 vector."""
    vectors = np.random.default_rng(7).random((rows, DIMENSION), dtype=np.float32)
    return pa.table(
        {
            "id": pa.array(range(rows), pa.int64()),
            "body": [f"{['alpha', 'beta', 'gamma'][i % 3]} note {i}" for i in range(rows)],
            "tags": [[i, i * 2] for i in range(rows)],
            "raw": [bytes([i % 256, 255]) for i in range(rows)],
            "vec": vector_array(vectors),
        }
    )


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """One server for the module (index builds answer at once and go on in the background), with a vector
    table ``docs`` (full-text index on ``body``), a Parquet table ``plain`` of two snapshots and a Parquet
    table ``wide`` of 40 columns."""
    root = str(tmp_path_factory.mktemp("cli-datasets") / "lakehouse")
    server = ServerProcess(root, env={"LAKEHOUSE_INDEX_WAIT_SECONDS": "0"})
    server.start()
    try:
        server.put("docs", docs_table())
        server.action("create_index", {"dataset": "docs", "column": "body", "kind": "fts"})
        for part in range(2):
            server.put("plain", pa.table({"a": [part, part + 10], "b": ["x", None]}))
        server.put("wide", pa.table({f"column_{i:02d}": [i * 100 + r for r in range(10)] for i in range(40)}))
        assert wait_for_indexes(server, "docs")
        yield server
    finally:
        server.stop()
        server.kill()


def wait_for_indexes(server: ServerProcess, dataset: str, timeout: float = 60) -> list[dict]:
    """The indexes of ``dataset`` once none is building."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        indexes = server.action("describe_dataset", {"dataset": dataset})["indexes"]
        if all(entry["state"] == "ready" for entry in indexes):
            return indexes
        time.sleep(0.1)
    raise AssertionError(f"indexes of {dataset} still building: {indexes}")


def at(server: ServerProcess) -> list[str]:
    """``--server HOST:PORT``, without a scheme."""
    return ["--server", server.location.removeprefix("grpc://")]


def table_lines(text: str) -> list[list[str]]:
    """The cells of each body row of a printed table."""
    return [[cell.strip() for cell in line.split("│")[1:-1]] for line in text.splitlines() if "│" in line]


def test_datasets_and_describe(shared: ServerProcess) -> None:
    listed = cli("datasets", "--json", *at(shared)).json()
    assert listed == shared.action("list_datasets", {})
    human = cli("datasets", *at(shared)).ok().out
    assert table_lines(human)[0][:3] == ["docs", "lance", "300"]

    for name in ("docs", "plain"):
        answer = shared.action("describe_dataset", {"dataset": name})
        described = cli("describe", name, "--json", *at(shared)).json()
        assert {k: v for k, v in described.items() if k != "serving"} == {
            k: v for k, v in answer.items() if k != "serving"
        }
        cells = table_lines(cli("describe", name, *at(shared)).ok().out)
        for key in ("format", "rows", "files", "snapshots" if name == "plain" else "versions"):
            assert [key, str(answer[key])] in cells
        if name == "docs":
            assert any(row[:4] == ["body_idx", "body", "fts", "ready"] for row in cells)
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(answer["schema"])))
        for field in schema:
            assert [field.name, str(field.type), "yes" if field.nullable else "no"] in cells


def test_history_newest_first(shared: ServerProcess) -> None:
    answer = shared.action("dataset_history", {"dataset": "plain"})
    assert cli("history", "plain", "--json", *at(shared)).json() == answer
    rows = table_lines(cli("history", "plain", *at(shared)).ok().out)
    assert [row[0] for row in rows] == [str(entry["snapshot_id"]) for entry in answer]
    assert [row[-1] for row in rows] == ["true", "false"]  # current: the newest


def test_search_by_vector_inline_and_from_files(shared: ServerProcess, tmp_path: Path) -> None:
    query = np.random.default_rng(1).random(DIMENSION).astype(np.float32)
    expected = search(shared, {"dataset": "docs", "vector": query.tolist(), "k": 5, "columns": ["id"]})
    ids = expected.column("id").to_pylist()
    (tmp_path / "q.json").write_text(json.dumps(query.tolist()))
    np.save(tmp_path / "q.npy", query)
    (tmp_path / "q.txt").write_text("\n".join(map(str, query.tolist())) + "\n")
    for source in (
        ["--vector", json.dumps(query.tolist())],
        ["--vector-file", str(tmp_path / "q.json")],
        ["--vector-file", str(tmp_path / "q.npy")],
        ["--vector-file", str(tmp_path / "q.txt")],
    ):
        found = cli(
            "search", "docs", *source, "-k", "5", "--columns", "id", "--json", *at(shared)
        ).json_lines()
        assert [row["id"] for row in found] == ids, source
        np.testing.assert_allclose([row["_distance"] for row in found], expected.column("_distance"), 1e-5)
    human = cli("search", "docs", "--vector-file", str(tmp_path / "q.npy"), "-k", "5", *at(shared)).ok().out
    header = next(line for line in human.splitlines() if "┃" in line)
    assert header.split("┃")[1:-1][-1].strip() == "_distance"
    assert [int(row[0]) for row in table_lines(human)] == ids


def test_search_by_text_and_hybrid(shared: ServerProcess) -> None:
    body = {"dataset": "docs", "text": "gamma", "k": 4, "columns": ["id", "body"]}
    text = cli("search", "docs", "--text", "gamma", "-k", "4", "--columns", "id,body", "--json", *at(shared))
    assert text.json_lines() == search(shared, body).to_pylist()
    assert all("gamma" in row["body"] and "_score" in row for row in text.json_lines())

    vector = [0.5] * DIMENSION
    hybrid = {**body, "vector": vector, "filter": "id < 100"}
    args = ["--text", "gamma", "--vector", json.dumps(vector), "--filter", "id < 100", "-k", "4"]
    found = cli("search", "docs", *args, "--columns", "id", "--columns", "body", *at(shared))
    assert [int(row[0]) for row in table_lines(found.ok().out)] == search(shared, hybrid).column(
        "id"
    ).to_pylist()


def test_list_vector_and_binary_columns_in_csv_are_json_and_base64(
    shared: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "docs.csv"
    sql = "select id, tags, raw, vec from docs order by id limit 20"
    written = cli("query", sql, "--format", "csv", "-o", str(out), *at(shared))
    assert written.ok().err.strip() == f"20 rows written to {out}"
    expected = shared.sql(sql).to_pylist()
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [json.loads(row["tags"]) for row in rows] == [row["tags"] for row in expected]
    assert [base64.b64decode(row["raw"]) for row in rows] == [row["raw"] for row in expected]
    np.testing.assert_allclose([json.loads(row["vec"]) for row in rows], [row["vec"] for row in expected])

    vector = json.dumps([0.1] * DIMENSION)
    streamed = cli("search", "docs", "--vector", vector, "-k", "3", "--format", "csv", *at(shared)).ok().out
    assert all(len(json.loads(row["vec"])) == DIMENSION for row in csv.DictReader(io.StringIO(streamed)))


def test_query_json_lines_and_arrow_file(shared: ServerProcess, tmp_path: Path) -> None:
    sql = "select a, b from plain order by a"
    assert cli("query", sql, "--json", *at(shared)).json_lines() == shared.sql(sql).to_pylist()
    out = tmp_path / "plain.arrow"
    cli("query", sql, "--format", "arrow", "-o", str(out), *at(shared)).ok()
    assert pa.ipc.open_file(out).read_all().equals(shared.sql(sql))
    assert (
        cli("query", sql, "--format", "arrow", *at(shared)).error()
        == "Error: --format arrow needs --output FILE"
    )


def test_wide_results_fit_the_terminal(shared: ServerProcess) -> None:
    narrow = {"COLUMNS": "80"}
    table = cli("query", "select * from wide order by column_00", *at(shared), env=narrow).ok()
    assert table.out and max(len(line) for line in table.out.splitlines()) <= 80
    shown = [name.strip() for name in table.out.splitlines()[1].split("┃")[1:-1]]
    assert shown == [f"column_{i:02d}" for i in range(len(shown))] and 1 < len(shown) < 40
    assert (
        f"({40 - len(shown)} of 40 columns left out to fit 80 characters: column_{len(shown):02d}"
        in table.err
    )
    assert len(table_lines(table.out)) == 10

    for args in (["--vertical"], ["--max-rows", "1"]):  # asked for, or one row: one field per line
        vertical = cli("query", "select * from wide order by column_00", *args, *at(shared), env=narrow).ok()
        assert max(len(line) for line in vertical.out.splitlines()) <= 80
        assert "column_39 | 3900" in vertical.out.splitlines()
        assert "left out" not in vertical.err


def test_index_create_wait_then_list(shared: ServerProcess) -> None:
    shared.put("indexed", docs_table(2000))
    building = cli("index", "create", "indexed", "--column", "id", "--kind", "btree", *at(shared)).ok()
    assert building.out.startswith("index id_idx on indexed.id (btree): building")
    args = ["--column", "vec", "--kind", "ivf_pq", "--num-partitions", "2", "--num-sub-vectors", "2"]
    waited = cli(
        "index", "create", "indexed", *args, "--metric", "l2", "--wait", "--json", *at(shared)
    ).json()
    assert waited["index"] == "vec_idx" and waited["state"] == "ready" and waited["metric"] == "l2"
    indexes = wait_for_indexes(shared, "indexed")
    assert cli("index", "list", "indexed", "--json", *at(shared)).json() == indexes
    listed = table_lines(cli("index", "list", "indexed", *at(shared)).ok().out)
    assert sorted(row[:4] for row in listed) == [
        ["id_idx", "id", "btree", "ready"],
        ["vec_idx", "vec", "ivf_pq", "ready"],
    ]
    replaced = cli("index", "create", "indexed", *args, "--replace", "--wait", *at(shared)).ok()
    assert replaced.out.strip() == "index vec_idx on indexed.vec (ivf_pq): ready"


def test_delete_then_count_and_optimize(shared: ServerProcess) -> None:
    shared.put("trimmed", docs_table())
    refused = cli("delete", "trimmed", "--where", "id < 10", *at(shared))
    assert "pass --yes" in refused.error()
    deleted = cli("delete", "trimmed", "--where", "id < 10", "--yes", *at(shared)).ok()
    assert deleted.out.startswith("10 rows deleted from trimmed")
    assert shared.sql("select count(*) as n from trimmed").to_pylist() == [{"n": ROWS - 10}]
    answer = cli("delete", "trimmed", "--where", "id >= 290", "--yes", "--json", *at(shared)).json()
    assert answer["rows_deleted"] == 10
    assert shared.sql("select count(*) as n from trimmed").to_pylist() == [{"n": ROWS - 20}]

    facts = cli("optimize", "trimmed", "--older-than-seconds", "0", "--json", *at(shared)).json()
    assert facts["versions_before"] > facts["versions_after"] == 1
    assert shared.action("describe_dataset", {"dataset": "trimmed"})["versions"] == 1
    human = table_lines(cli("optimize", "trimmed", *at(shared)).ok().out)
    assert ["versions_after", "1"] in human and ["dataset", "trimmed"] in human


def answer_on_a_terminal(args: list[str], answer: str) -> Done:
    """Run the CLI with a terminal as stdin that has ``answer`` typed into it."""
    controller, terminal = pty.openpty()
    try:
        os.write(controller, answer.encode())
        return cli(*args, stdin=terminal)
    finally:
        os.close(terminal)
        os.close(controller)


def test_drop_asks_first(shared: ServerProcess) -> None:
    for name in ("dropped_1", "dropped_2"):
        shared.put(name, pa.table({"x": [1, 2]}))
    exists = {"dataset": "dropped_1", "if_exists": True}
    assert "pass --yes" in cli("drop", "dropped_1", *at(shared)).error()
    declined = answer_on_a_terminal(["drop", "dropped_1", *at(shared)], "n\n")
    assert declined.code == 1 and "Drop dataset dropped_1 and delete its files?" in declined.err
    assert "dropped_1" in {entry["name"] for entry in shared.action("list_datasets", {})}
    confirmed = answer_on_a_terminal(["drop", "dropped_1", *at(shared)], "y\n")
    assert confirmed.ok().out.strip() == "dropped dropped_1"
    assert shared.action("drop_dataset", exists) == {"dropped": False}

    assert cli("drop", "dropped_2", "--yes", "--json", *at(shared)).json() == {"dropped": True}
    missing = cli("drop", "dropped_2", "--yes", "--if-exists", *at(shared)).ok()
    assert missing.out.strip() == "dropped_2 does not exist; nothing dropped"


@pytest.mark.parametrize(
    "command",
    [
        ["describe"],
        ["search", "--text", "x"],
        ["delete", "--where", "id < 1", "--yes"],
    ],
    ids=lambda command: " ".join(command[:2]),
)
def test_unknown_dataset_is_one_line(shared: ServerProcess, command: list[str]) -> None:
    head, *rest = command
    words = [head, rest.pop(0)] if head == "index" else [head]
    refused = cli(*words, "nope", *rest, *at(shared))
    assert refused.error() == "Error: dataset 'nope' not found"


def test_refused_input_is_one_line(shared: ServerProcess, tmp_path: Path) -> None:
    assert "dimension 2" in cli("search", "docs", "--vector", "[1, 2]", *at(shared)).error()
    assert "--vector: expected a non-empty JSON list" in cli("search", "docs", "--vector", '{"a": 1}').error()
    (tmp_path / "bad.txt").write_text("0.5\nabc\n")
    assert "one number per line" in cli("search", "docs", "--vector-file", str(tmp_path / "bad.txt")).error()
    assert "give a query" in cli("search", "docs", *at(shared)).error()
    # --query reaches the server, which embeds only into columns it embedded itself (or has no embedder)
    assert "embed" in cli("search", "docs", "--query", "notes", *at(shared)).error()


@pytest.fixture
def mute_port() -> Iterator[int]:
    """A loopback port that accepts connections and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        yield listener.getsockname()[1]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("address", ["closed", "mute", "no-such-host.invalid:8815", "not an address"])
def test_bad_server_address_is_one_line_and_quick(address: str, request: pytest.FixtureRequest) -> None:
    if address == "closed":
        address = f"127.0.0.1:{closed_port()}"
    elif address == "mute":
        address = f"127.0.0.1:{request.getfixturevalue('mute_port')}"
    refused = cli("describe", "docs", "--server", address)
    line = refused.error()
    # within the client's 5 s connect timeout plus the process start, not gRPC's own 20 s
    assert "Traceback" not in refused.err and refused.seconds < 20, refused.seconds
    if address.startswith("127.0.0.1"):
        assert re.match(rf"Error: cannot reach the server at grpc://{re.escape(address)}: ", line), line
