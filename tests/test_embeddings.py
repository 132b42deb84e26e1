"""Server-side embeddings through real servers, offline: ingest with ``embed``, search by text (action,
DoGet ticket, DoExchange, SQL), the ``embed`` and ``reembed`` actions, and each backend (``builtin``,
``onnx:DIR``, ``openai:URL`` against a small HTTP server started here), with their refusals.

One builtin-embedder server on a local root serves most of the module; the model loads once per server.
"""

from __future__ import annotations

import http.server
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import adbc_driver_flightsql.dbapi as adbc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.embeddings import BUILTIN_MODEL, BUILTIN_TOKENIZER, OnnxEmbedder
from flight_lakehouse.errors import Unavailable
from flight_lakehouse.protocol import pack
from tests.conftest import (
    ServerProcess,
    assert_refusal,
    make_root,
    running_server,
    search,
    wait_for_index,
)

#: How a refusal reaches a pyarrow client: INVALID_ARGUMENT as ArrowInvalid, others as Flight errors.
REFUSED = (flight.FlightError, pa.ArrowException)
DOCS = [
    "The cat sleeps on the warm windowsill.",
    "Stock markets fell sharply after the interest rate decision.",
    "A recipe for chocolate chip cookies with brown butter.",
    "The football team won the championship final in overtime.",
    "How to repair a flat bicycle tire at home.",
    "Heavy rain and strong winds are expected this weekend.",
]
#: A paraphrase of each document (same order), sharing few words with it.
PARAPHRASES = [
    "a kitty napping by the window in the sun",
    "equities dropped when the central bank changed borrowing costs",
    "how to bake sweet biscuits with cocoa pieces",
    "the squad took the title after extra time",
    "fixing a punctured bike wheel yourself",
    "stormy weather forecast for saturday and sunday",
]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flight-lakehouse ARGS``."""
    command = [sys.executable, "-m", "flight_lakehouse", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ))


def docs_table(start: int = 0, texts: list[str] | None = None) -> pa.Table:
    texts = DOCS if texts is None else texts
    return pa.table({"id": pa.array(range(start, start + len(texts)), pa.int64()), "body": texts})


def embed(server: ServerProcess, texts: list[str], dataset: str | None = None) -> pa.Table:
    """The ``embed`` action's result, read whole."""
    body: dict = {"texts": texts, **({"dataset": dataset} if dataset else {})}
    results = list(server.client.do_action(flight.Action("embed", json.dumps(body).encode())))
    return pa.ipc.open_stream(results[0].body.to_pybytes()).read_all()


def matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    return column.flatten().to_numpy().reshape(len(column), -1)


def nearest_ids(server: ServerProcess, dataset: str, query: str, k: int = 1) -> list[int]:
    rows = search(server, {"dataset": dataset, "query": query, "k": k, "columns": ["id"]})
    return rows.column("id").to_pylist()


def row_count(server: ServerProcess, dataset: str) -> int:
    return server.sql(f"SELECT count(*) AS n FROM {dataset}").column("n")[0].as_py()


@pytest.fixture(scope="module")
def builtin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server with the builtin embedder (the default with the embed extra), and the dataset ``docs``."""
    with running_server(str(tmp_path_factory.mktemp("embed-root"))) as server:
        server.put("docs", docs_table(), embed={"from": "body", "into": "vec"})
        yield server


@pytest.fixture(scope="module")
def builtin_model() -> OnnxEmbedder:
    """The builtin model in this process (the HTTP embedder below serves its vectors)."""
    return OnnxEmbedder.builtin()


# -- builtin: ingest, search, embed ----------------------------------------------------------------


def test_search_by_paraphrase_finds_each_document(builtin: ServerProcess) -> None:
    for expected, paraphrase in enumerate(PARAPHRASES):
        assert nearest_ids(builtin, "docs", paraphrase) == [expected], paraphrase
    facts = builtin.action("describe_dataset", {"dataset": "docs"})
    assert facts["embedding"] == {"model": BUILTIN_MODEL, "dimension": 384, "from": "body", "into": "vec"}
    assert builtin.action("health")["embedder"] == {"model": BUILTIN_MODEL, "backend": "onnx"}
    listed = {action.type for action in builtin.client.list_actions()}
    assert {"embed", "reembed"} <= listed


def test_embed_action_gives_the_stored_vectors(builtin: ServerProcess) -> None:
    result = embed(builtin, DOCS, dataset="docs")
    assert result.schema.metadata == {b"model": BUILTIN_MODEL.encode()}
    assert result.schema.field("vector").type == pa.list_(pa.float32(), 384)
    stored = builtin.ticket({"dataset": "docs", "columns": ["id", "vec"]}).sort_by("id")
    np.testing.assert_allclose(matrix(result.column("vector")), matrix(stored.column("vec"))[:6], atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(matrix(result.column("vector")), axis=1), 1.0, atol=1e-5)


def test_appends_are_embedded_the_same_way(builtin: ServerProcess) -> None:
    builtin.put("growing", docs_table(texts=DOCS[:3]), embed={"from": "body", "into": "vec"})
    builtin.put("growing", docs_table(3, DOCS[3:]))  # no "embed": the dataset remembers it
    assert nearest_ids(builtin, "growing", PARAPHRASES[4]) == [4]
    with pytest.raises(REFUSED) as exc:
        builtin.put("growing", docs_table(10, ["x"]), embed={"from": "body", "into": "other"})
    assert_refusal(exc, builtin, "no column 'other' embedded from text")
    builtin.put("plain", docs_table())  # Parquet
    with pytest.raises(REFUSED) as exc:
        builtin.put("plain", docs_table(10, ["x"]), embed={"from": "body", "into": "vec"})
    assert_refusal(exc, builtin, "'plain' is Parquet")
    with pytest.raises(REFUSED) as exc:
        builtin.put("typed", pa.table({"id": [1]}), embed={"from": "id", "into": "vec"})
    assert_refusal(exc, builtin, "'id' holds int64, not text")


def test_flight_sql_ingest_and_search_by_text(builtin: ServerProcess) -> None:
    builtin.put("adbc_docs", docs_table(texts=DOCS[:3]), embed={"from": "body", "into": "vec"})
    with adbc.connect(builtin.location, autocommit=True) as connection, connection.cursor() as cursor:
        cursor.adbc_ingest("adbc_docs", docs_table(3, DOCS[3:]), mode="append")  # embedded on the way
        cursor.execute(f"SELECT id FROM vector_search('adbc_docs', '{PARAPHRASES[5]}', 1)")
        assert cursor.fetchall() == [(5,)]


def flight_sql_ingest(server: ServerProcess, dataset: str, table: pa.Table, options: dict[str, str]) -> None:
    """CommandStatementIngest (create or append) with bulk-ingest ``options``, through raw Flight."""
    definition = sql.CommandStatementIngest.TableDefinitionOptions(
        if_not_exist=sql.CommandStatementIngest.TableDefinitionOptions.TABLE_NOT_EXIST_OPTION_CREATE,
        if_exists=sql.CommandStatementIngest.TableDefinitionOptions.TABLE_EXISTS_OPTION_APPEND,
    )
    command = sql.CommandStatementIngest(table=dataset, table_definition_options=definition, options=options)
    writer, reader = server.client.do_put(flight.FlightDescriptor.for_command(pack(command)), table.schema)
    with writer:
        writer.write_table(table)
        writer.done_writing()
        reader.read()


def test_flight_sql_ingest_option_embed(builtin: ServerProcess) -> None:
    """The bulk-ingest option ``embed`` = ``FROM:INTO`` creates an embedded dataset, as DoPut's ``embed``;
    another option or a malformed value is refused and commits nothing."""
    flight_sql_ingest(builtin, "fsql_docs", docs_table(texts=DOCS), {"embed": "body:vec"})
    assert builtin.action("describe_dataset", {"dataset": "fsql_docs"})["embedding"]["into"] == "vec"
    assert nearest_ids(builtin, "fsql_docs", PARAPHRASES[2]) == [2]
    for options, fragment in [
        ({"embed": "body"}, "FROM:INTO"),
        ({"embed": "body:"}, "FROM:INTO"),
        ({"embed": "missing:vec"}, "missing"),
        ({"compression": "zstd"}, "only 'embed'"),
    ]:
        with pytest.raises(REFUSED) as exc:
            flight_sql_ingest(builtin, "fsql_refused", docs_table(texts=DOCS[:1]), options)
        assert_refusal(exc, builtin, fragment)
    assert "fsql_refused" not in {entry["name"] for entry in builtin.action("list_datasets")}


def test_search_by_text_on_every_path(builtin: ServerProcess) -> None:
    ticket = builtin.ticket({"search": {"dataset": "docs", "query": PARAPHRASES[2], "k": 1}})
    assert ticket.column("id").to_pylist() == [2]
    sql = builtin.sql(f"SELECT id FROM vector_search('docs', '{PARAPHRASES[3]}', 1)")
    assert sql.column("id").to_pylist() == [3]
    named = builtin.sql(f"SELECT id FROM vector_search('docs', NULL, 1, query := '{PARAPHRASES[5]}')")
    assert named.column("id").to_pylist() == [5]
    command = json.dumps({"search": {"dataset": "docs", "k": 1, "columns": ["id"]}}).encode()
    writer, reader = builtin.client.do_exchange(flight.FlightDescriptor.for_command(command))
    queries = pa.table({"query": PARAPHRASES})
    with writer:
        writer.begin(queries.schema)
        writer.write_table(queries)
        writer.done_writing()
        result = reader.read_all()
    assert result.column("_query_index").to_pylist() == list(range(6))
    assert result.column("id").to_pylist() == list(range(6))


def test_hybrid_search_by_query_and_text(builtin: ServerProcess) -> None:
    builtin.put("hybrid", docs_table(), embed={"from": "body", "into": "vec"})
    builtin.action("create_index", {"dataset": "hybrid", "column": "body", "kind": "fts"})
    wait_for_index(builtin, "hybrid", "body")
    body = {"dataset": "hybrid", "query": PARAPHRASES[1], "text": "interest rate", "k": 2}
    result = search(builtin, {**body, "columns": ["id"]})
    assert result.column_names == ["id", "_score"]
    assert result.column("id")[0].as_py() == 1


def test_empty_null_and_huge_texts(builtin: ServerProcess) -> None:
    huge = "bicycle repair " * 50_000  # far past the model's 256 tokens: truncated, not refused
    result = builtin.put("odd", docs_table(texts=["", huge, "plain"]), embed={"from": "body", "into": "vec"})
    assert result["rows_written"] == 3
    vectors = matrix(embed(builtin, ["", "bicycle repair " * 6000, "bicycle repair " * 300]).column("vector"))
    assert np.isfinite(vectors).all()
    np.testing.assert_allclose(vectors[1], vectors[2], atol=1e-6)  # both cut at the same 256 tokens
    nulls = pa.table({"id": [7, 8], "body": ["fine", None]})
    with pytest.raises(REFUSED) as exc:
        builtin.put("odd", nulls)
    assert_refusal(exc, builtin, "row 1", "'body' is null")
    assert row_count(builtin, "odd") == 3  # nothing committed
    with pytest.raises(REFUSED) as exc:
        search(builtin, {"dataset": "docs", "query": "x", "vector": [0.1] * 384})
    assert_refusal(exc, builtin, "'vector' or 'query'")


def test_reembed_into_a_new_column_and_a_new_dataset(builtin: ServerProcess) -> None:
    builtin.put("source", docs_table(), embed={"from": "body", "into": "vec"})
    result = builtin.action("reembed", {"dataset": "source", "into": "vec2"})
    assert result["rows"] == 6 and result["model"] == BUILTIN_MODEL
    stored = builtin.ticket({"dataset": "source", "columns": ["vec", "vec2"]})
    np.testing.assert_allclose(matrix(stored.column("vec")), matrix(stored.column("vec2")), atol=1e-6)
    copied = builtin.action("reembed", {"dataset": "source", "target_dataset": "copy", "into": "v"})
    assert copied["rows"] == 6
    facts = builtin.action("describe_dataset", {"dataset": "copy"})
    assert facts["embedding"]["into"] == "v" and set(facts["vector_columns"]) == {"v"}
    assert nearest_ids(builtin, "copy", PARAPHRASES[1]) == [1]
    with pytest.raises(REFUSED) as exc:
        builtin.action("reembed", {"dataset": "source", "model": "some-other-model"})
    assert_refusal(exc, builtin, "embeds with", "not 'some-other-model'")


def test_embed_and_reembed_on_s3(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    with running_server(make_root(request, "s3", tmp_path, "embed-s3")) as server:
        server.put("docs", docs_table(), embed={"from": "body", "into": "vec"})
        server.put("docs", docs_table(6, ["a dog barking at the mailman"]))
        server.action("reembed", {"dataset": "docs", "into": "vec2"})
        assert nearest_ids(server, "docs", "a noisy puppy") == [6]
        facts = server.action("describe_dataset", {"dataset": "docs"})
        assert [entry["into"] for entry in facts["embeddings"]] == ["vec", "vec2"]
        assert facts["embedding"]["into"] == "vec2"  # the newest: searches by text use it


def test_cli_ingest_with_embed(builtin: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "notes.csv"
    docs_table().to_pandas().to_csv(source, index=False)
    done = cli(
        "ingest", str(source), "--dataset", "notes", "--embed", "body:vec", "--server", builtin.location
    )
    assert done.returncode == 0, done.stderr
    assert "6 rows into notes" in done.stdout
    assert nearest_ids(builtin, "notes", PARAPHRASES[0]) == [0]
    bad = cli("ingest", str(source), "--dataset", "notes2", "--embed", "body", "--server", builtin.location)
    assert bad.returncode == 1 and bad.stderr.strip().splitlines()[-1].startswith("Error: --embed")


# -- other backends --------------------------------------------------------------------------------


def test_onnx_directory_gives_the_builtin_vectors(
    builtin: ServerProcess, builtin_model: OnnxEmbedder, tmp_path: Path
) -> None:
    (tmp_path / "minilm").mkdir()
    (tmp_path / "minilm" / "model.onnx").symlink_to(builtin_model.model_file)
    (tmp_path / "minilm" / "tokenizer.json").symlink_to(BUILTIN_TOKENIZER)
    (tmp_path / "minilm" / "sentence_bert_config.json").write_text('{"max_seq_length": 256}')
    with running_server(builtin.root, "--embedder", f"onnx:{tmp_path / 'minilm'}") as other:
        vectors = embed(other, DOCS)
        assert vectors.schema.metadata == {b"model": b"onnx:minilm"}
        expected = matrix(embed(builtin, DOCS).column("vector"))
        np.testing.assert_allclose(matrix(vectors.column("vector")), expected, atol=1e-6)
        with pytest.raises(REFUSED) as exc:  # another model never mixes into 'vec'
            other.put("docs", docs_table(100, ["a new document"]))
        assert_refusal(exc, other, "'vec'", BUILTIN_MODEL, "onnx:minilm")
        with pytest.raises(REFUSED) as exc:
            search(other, {"dataset": "docs", "query": "cats"})
        assert_refusal(exc, other, BUILTIN_MODEL)


class EmbeddingsHandler(http.server.BaseHTTPRequestHandler):
    """``POST /v1/embeddings`` answered with the builtin model's vectors (or a fault the test sets)."""

    model: OnnxEmbedder
    fault: str | None = None
    requests = 0

    def do_POST(self) -> None:
        type(self).requests += 1
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.fault == "slow":
            time.sleep(1.5)
        if self.fault == "error":
            self.send_error(503, "model overloaded")
            return
        vectors = self.model.embed(body["input"]).tolist()
        data = [{"index": i, "embedding": v, "object": "embedding"} for i, v in enumerate(vectors)]
        reply = json.dumps({"data": data, "model": body.get("model")}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_embedder(builtin_model: OnnxEmbedder) -> Iterator[type[EmbeddingsHandler]]:
    handler = type("Handler", (EmbeddingsHandler,), {"model": builtin_model, "fault": None})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    handler.url = f"http://127.0.0.1:{httpd.server_address[1]}"  # type: ignore[attr-defined]
    yield handler
    httpd.shutdown()
    httpd.server_close()


def test_openai_endpoint_and_its_faults(
    http_embedder: type[EmbeddingsHandler], builtin: ServerProcess, tmp_path: Path
) -> None:
    args = ("--embedder", f"openai:{http_embedder.url}", "--embedder-model", "minilm")  # type: ignore[attr-defined]
    server = ServerProcess(str(tmp_path / "root"), list(args), {"LAKEHOUSE_EMBEDDER_TIMEOUT_SECONDS": "0.5"})
    try:
        server.start()
        server.put("docs", docs_table(), embed={"from": "body", "into": "vec"})
        assert nearest_ids(server, "docs", PARAPHRASES[4]) == [4]
        expected = matrix(embed(builtin, DOCS[:2]).column("vector"))
        np.testing.assert_allclose(matrix(embed(server, DOCS[:2]).column("vector")), expected, atol=1e-6)
        for fault, words in (("error", "HTTP 503"), ("slow", "timed out")):
            http_embedder.fault = fault
            with pytest.raises(flight.FlightUnavailableError) as exc:
                server.put("docs", docs_table(50))
            assert_refusal(exc, server, "embedder", words)
            assert row_count(server, "docs") == 6  # nothing committed
    finally:
        server.stop()
        server.kill()


def test_without_an_embedder_text_is_refused(builtin: ServerProcess, tmp_path: Path) -> None:
    with running_server(str(tmp_path / "root"), "--embedder", "none") as server:
        with pytest.raises(REFUSED) as exc:
            server.put("docs", docs_table(), embed={"from": "body", "into": "vec"})
        assert_refusal(exc, server, "no embedder")
        with pytest.raises(REFUSED) as exc:
            embed(server, ["hello"])
        assert_refusal(exc, server, "no embedder")
    bad = cli(
        "serve",
        "--root",
        str(tmp_path / "r2"),
        "--port",
        "0",
        "--http-port",
        "-1",
        "--embedder",
        "onnx:/no/such/dir",
    )
    assert bad.returncode != 0 and "model.onnx and tokenizer.json" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_a_broken_or_altered_model_is_refused_cleanly(builtin_model: OnnxEmbedder, tmp_path: Path) -> None:
    broken = tmp_path / "model.onnx"
    broken.write_bytes(b"not an onnx file")
    with pytest.raises(Unavailable, match=r"cannot load its model \(\w+\)"):
        OnnxEmbedder(broken, BUILTIN_TOKENIZER, "broken").embed(["hello"])
    altered = OnnxEmbedder(builtin_model.model_file, BUILTIN_TOKENIZER, "x", checksums={broken: "0" * 64})
    with pytest.raises(Unavailable, match="does not match its pinned sha256"):
        altered.embed(["hello"])
