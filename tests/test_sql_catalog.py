"""SQL that does not mislead (issue 17, point 4): statements listing DuckDB's own catalog are refused with
a pointer to where the datasets are listed, DESCRIBE / SUMMARIZE work on datasets of both formats and
are NOT_FOUND on other names, and errors from Lance reach clients as one line without Rust source paths,
Python frames or server paths.

One server per storage kind serves the module; data is small and fixed.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse.errors import InvalidArgument, NotFound
from flight_lakehouse.sandbox import LIST_DATASETS, check_select
from flight_lakehouse.vectors import lance_message
from tests.conftest import (
    STORAGE_KINDS,
    ServerProcess,
    assert_refusal,
    make_root,
    root_forms,
    running_server,
    search,
    vector_array,
)

DIM = 4
ROWS = 12
POINTER = "list_datasets"
#: Statements listing DuckDB's catalog: refused as INVALID_ARGUMENT, pointing to ``list_datasets``.
CATALOG_STATEMENTS = [
    "SHOW TABLES",
    "show tables",
    "SHOW ALL TABLES",
    "SHOW",
    "DESCRIBE",
    "SHOW DATABASES",
    "SHOW SCHEMAS",
    "SHOW VARIABLES",
    "SHOW TABLES FROM main",
    "SHOW TABLES FROM memory.main",
    "SHOW TABLES FROM information_schema",
    "DESCRIBE TABLES",
    "SUMMARIZE TABLES",
    "SELECT * FROM (SHOW TABLES)",
    "SELECT count(*) FROM (SHOW ALL TABLES) t WHERE database = 'memory'",
    "SELECT table_name FROM information_schema.tables",
    "SELECT * FROM information_schema.columns",
    "SELECT * FROM information_schema.schemata",
    "SELECT * FROM pg_catalog.pg_tables",
    "SELECT * FROM system.main.duckdb_tables",
    "SELECT * FROM duckdb_tables()",
    "SELECT * FROM duckdb_views()",
    "SELECT * FROM duckdb_columns()",
    "SELECT * FROM duckdb_databases()",
    "SELECT * FROM pragma_show_tables()",
    "SELECT * FROM pragma_table_info('prices')",
    "DESCRIBE information_schema.tables",
    "PRAGMA show_tables",
    "PRAGMA show_tables_expanded",
    "PRAGMA database_list",
    "PRAGMA table_info('prices')",
    "CALL duckdb_tables()",
]
#: Catalog views read by their plain name: NOT_FOUND like any unknown name, with the same pointer.
CATALOG_VIEWS = ["sqlite_master", "duckdb_tables", "pg_tables", "duckdb_views"]


def lance_table(ids: range) -> pa.Table:
    """Rows of the Lance table ``docs``: a vector, a label, a date and a struct (``ROWS`` of them)."""
    matrix = np.random.default_rng(7).normal(size=(len(ids), DIM)).astype(np.float32)
    return pa.table(
        {
            "id": pa.array(list(ids), pa.int64()),
            "label": [f"doc-{i}" for i in ids],
            "day": pa.array([datetime.date(2024, 1, 1 + i) for i in ids]),
            "meta": pa.array([{"n": i, "tag": "x"} for i in ids]),
            "embedding": vector_array(matrix),
        }
    )


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def lake(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The module's server: ``prices`` (Parquet), ``docs``, ``plain`` and ``timed`` (Lance)."""
    root = make_root(request, request.param, tmp_path_factory.mktemp("sql_catalog"), "sql_catalog")
    with running_server(root) as server:
        server.put("prices", pa.table({"id": [1, 2, 3], "price": [1.5, 2.5, 3.5]}))
        server.put("docs", lance_table(range(ROWS)), mode="create")
        plain = pa.table({"id": [1, 2, 3], "label": ["a", "b", "c"], "v": vector_array(np.eye(3, DIM))})
        server.put("plain", plain, mode="create")
        timed = pa.table(
            {
                "id": [1, 2],
                "clock": pa.array([datetime.time(1, 2), datetime.time(3, 4)]),
                "n": pa.array([1, 2], pa.uint64()),
                "v": vector_array(np.eye(2, DIM)),
            }
        )
        server.put("timed", timed, mode="create")
        yield server


def refusal(call: Callable[[], Any]) -> BaseException:
    """The error ``call`` raises (it must raise)."""
    with pytest.raises(pa.ArrowException) as info:
        call()
    return info.value


def assert_clean(message: str) -> None:
    """A client-facing message: one line, no Rust source file, no server path, no Python frames."""
    for leak in (".rs", "/home/", "/root/", "src/", "site-packages", "At:", "\n"):
        assert leak not in message, f"{leak!r} in {message!r}"


# -- catalog statements ----------------------------------------------------------------------------------


@pytest.mark.parametrize("statement", CATALOG_STATEMENTS)
def test_catalog_statements_are_refused_with_a_pointer(lake: ServerProcess, statement: str) -> None:
    with pytest.raises(pa.ArrowInvalid) as info:
        lake.sql(statement)
    message = assert_refusal(info, lake, POINTER, "GetTables")
    assert not isinstance(info.value, flight.FlightInternalError), message


@pytest.mark.parametrize("view", CATALOG_VIEWS)
def test_catalog_views_are_not_found_with_a_pointer(lake: ServerProcess, view: str) -> None:
    with pytest.raises(pa.ArrowKeyError) as info:
        lake.sql(f"SELECT * FROM {view}")
    assert_refusal(info, lake, view, POINTER)


def test_catalog_refusals_in_the_sandbox() -> None:
    """The same refusals from the sandbox check alone, by class (no server)."""
    with duckdb.connect() as connection:
        for statement in CATALOG_STATEMENTS:
            with pytest.raises(InvalidArgument, match=POINTER):
                check_select(connection, statement, {"prices"})
        for view in CATALOG_VIEWS:
            with pytest.raises(NotFound, match=POINTER):
                check_select(connection, f"SELECT * FROM {view}", {"prices"})
        # other refusals do not point to the catalog
        with pytest.raises(InvalidArgument) as info:
            check_select(connection, "SELECT * FROM read_csv('x.csv')", {"prices"})
        assert POINTER not in str(info.value)
        with pytest.raises(InvalidArgument) as info:
            check_select(connection, "PRAGMA threads = 4", {"prices"})
        assert POINTER not in str(info.value)
    assert "flight-lakehouse datasets" in LIST_DATASETS


def test_datasets_are_listed_where_the_refusal_points(lake: ServerProcess) -> None:
    listed = {row["name"]: row["format"] for row in lake.action("list_datasets")}  # type: ignore[attr-defined]
    assert {"prices", "docs", "plain"} <= set(listed)
    assert listed["docs"] == "lance"


# -- DESCRIBE and SUMMARIZE ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dataset", ["prices", "docs", "plain", "PRICES", "main.prices", "lakehouse.main.docs"]
)
def test_describe_and_summarize_datasets(lake: ServerProcess, dataset: str) -> None:
    described = lake.sql(f"DESCRIBE {dataset}")
    names = described.column("column_name").to_pylist()
    assert "id" in names
    if dataset.lower().endswith("docs"):
        assert names == ["id", "label", "day", "meta", "embedding"]
        assert "_rowid" not in names
    summary = lake.sql(f"SUMMARIZE {dataset}")
    assert "id" in summary.column("column_name").to_pylist()
    assert "count" in summary.column_names


def test_describe_a_query(lake: ServerProcess) -> None:
    described = lake.sql("DESCRIBE SELECT p.id, d.label FROM prices p JOIN docs d ON p.id = d.id")
    assert described.column("column_name").to_pylist() == ["id", "label"]
    assert lake.sql("SELECT * FROM (DESCRIBE prices)").num_rows == 2


def test_describe_a_dataset_not_yet_loaded(lake: ServerProcess) -> None:
    """The first statement naming a new dataset is DESCRIBE (its query database has not loaded it)."""
    lake.put("fresh_parquet", pa.table({"k": [1, 2], "v": ["x", "y"]}))
    assert lake.sql("DESCRIBE fresh_parquet").column("column_name").to_pylist() == ["k", "v"]
    fresh = pa.table({"k": [1, 2], "v": ["x", "y"], "e": vector_array(np.eye(2, DIM))})
    lake.put("fresh_lance", fresh, mode="create")
    assert lake.sql("SUMMARIZE fresh_lance").column("column_name").to_pylist() == ["k", "v", "e"]


@pytest.mark.parametrize(
    "statement",
    [
        "DESCRIBE nope",
        "SUMMARIZE nope",
        "SHOW nope",
        "DESCRIBE SELECT * FROM nope",
        "SHOW FUNCTIONS",
        "DESCRIBE main.nope",
        "SUMMARIZE SELECT * FROM prices, nope",
    ],
)
def test_describe_unknown_names_is_not_found(lake: ServerProcess, statement: str) -> None:
    with pytest.raises(pa.ArrowKeyError) as info:
        lake.sql(statement)
    assert_refusal(info, lake, "not found")


@pytest.mark.parametrize(
    "statement",
    [
        "DESCRIBE 'x.parquet'",
        "DESCRIBE other.prices",
        "SUMMARIZE SELECT * FROM read_parquet('x.parquet')",
        "DESCRIBE pg_catalog.pg_class",
    ],
)
def test_describe_does_not_reach_outside_the_datasets(lake: ServerProcess, statement: str) -> None:
    with pytest.raises(pa.ArrowInvalid) as info:
        lake.sql(statement)
    assert_refusal(info, lake, "datasets")


# -- Lance errors ----------------------------------------------------------------------------------------


#: SQL on Lance tables whose filter DuckDB pushes down to Lance's scanner, which may refuse it (struct
#: fields, unsigned columns, any filter on a table with a TIME column: Lance's Substrait conversion, today);
#: it must answer or refuse with a clean line.
LANCE_SQL = [
    "SELECT id FROM docs WHERE day > DATE '2024-01-05'",
    "SELECT id FROM docs WHERE meta.n > 3",
    "SELECT count(*) FROM docs WHERE meta.tag = 'x'",
    "SELECT id FROM docs WHERE id IN (1, 2, 3)",
    "SELECT id FROM docs WHERE label = 'doc-3'",
    "SELECT id FROM timed WHERE id = 1",
    "SELECT id FROM timed WHERE n > 1",
    "SELECT id FROM timed WHERE clock > TIME '02:00'",
]


def test_sql_on_lance_fails_in_one_clean_line(lake: ServerProcess) -> None:
    failures = []
    for query in LANCE_SQL:
        try:
            lake.sql(query)
        except pa.ArrowException as exc:
            message = str(exc)
            assert isinstance(exc, pa.ArrowInvalid), message
            assert_clean(message.split(". Detail:")[0])
            assert not any(form in message for form in root_forms(lake.root)), message
            failures.append(message)
    # several fail inside Lance today (checked above); when Lance learns them, this test still holds
    for message in failures:
        assert "reading a Lance table failed" in message, message


@pytest.mark.parametrize(
    "where",
    [
        "label > 3",  # Lance cannot compare a string with a number
        "v = 1",  # nor a vector with a number
        "regexp_matches(label, '[')",  # a function Lance's planner does not know, or a broken regex
        "label ~ '['",  # an operator it does not know
        "id = 1 / 0",  # fails on a row: a user error, not a storage error
    ],
)
def test_delete_rows_lance_errors_are_clean(lake: ServerProcess, where: str) -> None:
    with pytest.raises(pa.ArrowInvalid) as info:  # the filter is wrong: INVALID_ARGUMENT, not UNAVAILABLE
        lake.action("delete_rows", {"dataset": "plain", "where": where})
    message = assert_refusal(info, lake, "delete_rows")
    assert not isinstance(info.value, flight.FlightInternalError), message
    assert_clean(message.split(". Detail:")[0])
    assert lake.sql("SELECT count(*) AS n FROM plain").column("n").to_pylist() == [3]


@pytest.mark.parametrize("where", ["label > 3", "regexp_matches(label, '[')", "meta.n > 'x'"])
def test_vector_search_lance_errors_are_clean(lake: ServerProcess, where: str) -> None:
    body = {"dataset": "docs", "vector": [0.1] * DIM, "k": 3, "filter": where}
    with pytest.raises(pa.ArrowInvalid) as info:
        search(lake, body)
    message = assert_refusal(info, lake)
    assert not isinstance(info.value, flight.FlightInternalError), message
    assert_clean(message.split(". Detail:")[0])


# -- the sanitizer ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            "Invalid user input: Schema error: No field named nope. Did you mean 'name'?., "
            "/home/runner/work/lance/lance/rust/lance/src/dataset/scanner.rs:839:33",
            "Invalid user input: Schema error: No field named nope. Did you mean 'name'?.",
        ),
        (
            "Invalid user input: Received literal Int64(3) and could not convert to literal of type 'Utf8', "
            "/home/runner/work/lance/lance/rust/lance-datafusion/src/logical_expr.rs:23:88, "
            "/home/runner/work/lance/lance/rust/lance-datafusion/src/planner.rs:967:13",
            "Invalid user input: Received literal Int64(3) and could not convert to literal of type 'Utf8'",
        ),
        (
            "Compute error: Regular expression did not compile: Syntax(\n"
            + "~" * 40
            + "\nregex parse error:\n"
            "    [\n    ^\nerror: unclosed character class\n" + "~" * 40 + "\n), "
            "/home/runner/work/lance/lance/rust/lance/src/io/exec/filtered_read.rs:1666:33",
            "Compute error: Regular expression did not compile: Syntax( regex parse error: [ error: unclosed "
            "character class )",
        ),
        (
            "ValueError: Not supported: Unsupported Substrait type: Time(Time { nullability: Nullable }), "
            "/root/lance/rust/lance-datafusion/src/substrait.rs:530:9\n\nAt:\n"
            "  /work/x/.venv/lib/python3.11/site-packages/lance/dataset.py(7510): to_reader\n",
            "Not supported: Unsupported Substrait type: Time(Time { nullability: Nullable })",
        ),
        (
            "No field named nope. Valid fields are t.a, t._rowid, t._rowaddr. Did you mean '_rowid'?, "
            "src/x.rs:1:2",
            "No field named nope. Valid fields are t.a.",
        ),
        ("IO Error: cannot open /srv/data/root/t.lance\nmore", "IO Error: cannot open <storage>/t.lance"),
        ("IO Error: cannot open /var/lib/other/t.lance", "IO Error: cannot open <path>"),
        (  # Lance's object store names a local file without the leading slash
            "External error: Not found: srv/data/root/lance/t.lance/data/01.lance",
            "External error: Not found: <storage>/lance/t.lance/data/01.lance",
        ),
        ("x" * 1000, "x" * 297 + "..."),
    ],
)
def test_lance_message(raw: str, expected: str) -> None:
    cleaned = lance_message(raw, "/srv/data/root")
    assert cleaned == expected
    assert_clean(cleaned)


def test_lance_message_s3_key_prefix() -> None:
    """Lance names an S3 object by its key, the root's prefix included, without the bucket."""
    raw = "LanceError(IO): single PUT of team-a/rooted/lance/t.lance/data/01.lance failed after 9.1s"
    cleaned = lance_message(raw, "s3://bucket/team-a/rooted")
    assert cleaned == "LanceError(IO): single PUT of <storage>/lance/t.lance/data/01.lance failed after 9.1s"
