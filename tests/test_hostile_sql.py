"""Hostile SQL: every SQL fragment a client sends goes through one sandbox check, with bounded nesting.

Covers issue 13: CTEs named like DuckDB catalog views (the parse-tree check must resolve names with
DuckDB's scoping rules), catalog-reading functions and macros, search, scan and delete filters (the same
function allow-list, the same locked configuration, the query time limit), nesting depth of queries and of
JSON tickets, PIVOT, and searches returning the vector column. One local server serves the module (the
query time limit set to 2 s); the unit tests call the sandbox on a DuckDB connection directly.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse.errors import InvalidArgument, NotFound
from flight_lakehouse.sandbox import (
    MAX_EXPRESSION_DEPTH,
    MAX_INLINED_NODES,
    MAX_QUERY_DEPTH,
    MAX_SUBQUERY_DEPTH,
    check_predicate,
    check_select,
)
from tests.conftest import (
    ServerProcess,
    assert_refusal,
    running_server,
    search,
    vector_array,
    wait_for_serving,
)

TIMEOUT_SECONDS = 2
DIM = 8
#: Rows of the in-memory vector table: enough for a slow filter to outrun the time limit many times over.
ROWS = 20_000
T = pa.table({"x": [1, 2, 3], "s": ["a", "b", "c"]})
SYSTEM_VIEWS = [
    "sqlite_master",
    "duckdb_views",
    "duckdb_databases",
    "duckdb_columns",
    "pragma_database_list",
    "pg_settings",
    "pg_views",
]
#: Ways a CTE named like a system view vouched for the real view.
CTE_FORMS = {
    "self_reference": "WITH {v} AS (SELECT * FROM {v}) SELECT * FROM {v}",
    "materialized": "WITH {v} AS MATERIALIZED (SELECT * FROM {v}) SELECT * FROM {v}",
    "recursive": "WITH RECURSIVE {v} AS (SELECT * FROM {v}) SELECT * FROM {v}",
    "other_scope": "SELECT * FROM (WITH {v} AS (SELECT 1 AS a) SELECT * FROM {v}) q, {v}",
    "nested_with": "WITH a AS (WITH {v} AS (SELECT 1 AS a) SELECT * FROM {v}) SELECT * FROM a, {v}",
    "subquery_scope": "SELECT (SELECT count(*) FROM (WITH {v} AS (SELECT 1) SELECT * FROM {v})), * FROM {v}",
}


def vectors(rows: int, seed: int) -> np.ndarray:
    """``rows`` standard normal float32 vectors of dimension :data:`DIM`."""
    return np.random.default_rng(seed).normal(size=(rows, DIM)).astype(np.float32)


MATRIX = vectors(ROWS, seed=1)
QUERY = MATRIX[0].tolist()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A local server (2 s query limit) with ``t`` (Parquet), ``vt`` (Lance, served from memory) and ``vt2``
    (Lance with two vector columns: Lance answers its searches)."""
    root = str(tmp_path_factory.mktemp("hostile") / "lakehouse")
    with running_server(root, "--query-timeout-seconds", str(TIMEOUT_SECONDS)) as server:
        server.put("t", T)
        tags = pa.array(["abcdefghij"[i % 10] for i in range(ROWS)])
        ids = pa.array(range(ROWS), pa.int64())
        server.put("vt", pa.table({"id": ids, "tag": tags, "vec": vector_array(MATRIX)}))
        small = vector_array(MATRIX[:200])
        server.put("vt2", pa.table({"id": ids[:200], "vec": small, "other": small}))
        wait_for_serving(server, "vt", timeout=120)
        yield server


def assert_invalid(exc: pytest.ExceptionInfo[BaseException], server: ServerProcess, *fragments: str) -> str:
    """INVALID_ARGUMENT (not NOT_FOUND, not INTERNAL), one clean line naming every fragment."""
    assert isinstance(exc.value, pa.ArrowInvalid) and not isinstance(exc.value, pa.ArrowKeyError), exc.value
    return assert_refusal(exc, server, *fragments)


# -- 1. names resolved with DuckDB's scoping rules -------------------------------------------------------


@pytest.mark.parametrize("form", sorted(CTE_FORMS))
@pytest.mark.parametrize("view", SYSTEM_VIEWS)
def test_cte_named_like_a_system_view_is_refused(hostile: ServerProcess, view: str, form: str) -> None:
    """A CTE named like a catalog view never vouches for the real view, in any scope."""
    with pytest.raises((pa.ArrowInvalid, pa.ArrowKeyError)) as exc:
        hostile.sql(CTE_FORMS[form].format(v=view))
    assert_refusal(exc, hostile, view)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM (WITH q AS (SELECT 1 AS a) SELECT * FROM q) z, q",
        "WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a",
        "SELECT * FROM (WITH q AS (SELECT 1) SELECT * FROM q) UNION ALL SELECT * FROM q",
        "SELECT (SELECT count(*) FROM q) FROM (WITH q AS (SELECT 1) SELECT * FROM q) z",
    ],
    ids=["outer_query", "earlier_sibling", "other_union_branch", "sibling_subquery"],
)
def test_cte_out_of_scope_is_not_a_table(sql: str) -> None:
    """A CTE name is no table outside its scope: DuckDB would look it up in the catalog there."""
    with duckdb.connect() as connection, pytest.raises(NotFound, match=r"'q'|'b'"):
        check_select(connection, sql, {"t"})


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("WITH a AS (SELECT * FROM t), b AS (SELECT * FROM a) SELECT * FROM b", {"t"}),
        ("WITH a AS (SELECT 1) SELECT * FROM a UNION ALL SELECT * FROM a", set()),
        ("WITH a AS (SELECT 1) SELECT (SELECT count(*) FROM a), (SELECT * FROM (SELECT * FROM a))", set()),
        (
            "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 3) SELECT * FROM r",
            set(),
        ),
        ("WITH t AS (SELECT 1 AS x) SELECT * FROM t", {"t"}),
    ],
    ids=["sibling_chain", "union_branches", "subqueries", "recursive", "shadowing_a_dataset"],
)
def test_cte_in_scope_is_a_table(sql: str, named: set[str]) -> None:
    """CTEs stay readable where DuckDB binds them: later siblings, the body, its subqueries, recursion."""
    with duckdb.connect() as connection:
        assert check_select(connection, sql, {"t"}) == named


@pytest.mark.parametrize(
    "sql",
    [
        "WITH RECURSIVE r(i) AS (SELECT * FROM r UNION ALL SELECT i + 1 FROM r) SELECT * FROM r",
        "WITH r AS (SELECT * FROM r) SELECT * FROM r",
    ],
    ids=["recursive_anchor", "plain"],
)
def test_cte_self_reference_outside_recursion_is_not_a_table(sql: str) -> None:
    """Inside its own definition a CTE is visible only in the recursive branch of a WITH RECURSIVE."""
    with duckdb.connect() as connection, pytest.raises(NotFound, match="'r'"):
        check_select(connection, sql, {"t"})


def test_legitimate_ctes_still_run(hostile: ServerProcess) -> None:
    """Ordinary CTEs over datasets, nested and recursive, keep working."""
    sql = "WITH a AS (SELECT x FROM t), b AS (SELECT * FROM a WHERE x > 1) SELECT sum(x) AS s FROM b"
    assert hostile.sql(sql).to_pylist() == [{"s": 5}]
    recursive = (
        "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM r WHERE i < 4) "
        "SELECT sum(i) AS s FROM r"
    )
    assert hostile.sql(recursive).to_pylist() == [{"s": 10}]


CATALOG_FUNCTIONS = [
    ("pg_get_viewdef", "SELECT pg_get_viewdef(i) AS d FROM range(5000) r(i) WHERE d IS NOT NULL"),
    ("format_type", "SELECT format_type(16, 0) AS f"),
    ("get_block_size", "SELECT get_block_size('memory') AS b"),
    ("sleep_ms", "SELECT sleep_ms(1) AS z"),
    ("pg_sleep", "SELECT pg_sleep(0.001) AS z"),
    ("write_log", "SELECT write_log('x') AS z"),
    ("current_setting", "SELECT system.main.current_setting('allowed_paths') AS p"),
]


@pytest.mark.parametrize(("function", "sql"), CATALOG_FUNCTIONS, ids=[c[0] for c in CATALOG_FUNCTIONS])
def test_catalog_reading_functions_are_refused(hostile: ServerProcess, function: str, sql: str) -> None:
    """Macros that query the catalog behind the check, settings, sleeping and logging are refused."""
    hostile.sql("SELECT count(*) FROM t")  # the view of t exists: pg_get_viewdef would show its files
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.sql(sql)
    assert_invalid(exc, hostile, function)


# -- 2. filters: the same check, the same locked database, the time limit --------------------------------

FILTER_ATTACKS = [
    ("current_setting", "current_setting('memory_limit') IS NOT NULL"),
    ("duckdb_settings", "(SELECT count(*) FROM duckdb_settings()) > 0"),
    ("query", "id IN (SELECT 1 FROM query('SELECT 1'))"),
    ("query_table", "EXISTS (SELECT * FROM query_table('rows'))"),
    ("pg_settings", "(SELECT count(*) FROM pg_settings) > 0"),
    ("pg_get_viewdef", "pg_get_viewdef(1) IS NULL"),
    ("oracle", "starts_with(current_setting('temp_directory'), '/')"),
    ("sleep_ms", "sleep_ms(1) IS NULL"),
]


@pytest.mark.parametrize(("name", "predicate"), FILTER_ATTACKS, ids=[c[0] for c in FILTER_ATTACKS])
def test_search_filter_goes_through_the_sandbox(hostile: ServerProcess, name: str, predicate: str) -> None:
    """A search filter served from memory is refused like the same SQL in a query."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(hostile, {"dataset": "vt", "vector": QUERY, "k": 3, "filter": predicate})
    assert_invalid(exc, hostile)


@pytest.mark.parametrize(
    "predicate",
    ["pg_get_viewdef(1) IS NULL", "format_type(16, 0) IS NOT NULL", "sleep_ms(1) IS NULL"],
    ids=["pg_get_viewdef", "format_type", "sleep_ms"],
)
def test_scan_and_delete_filters_go_through_the_sandbox(hostile: ServerProcess, predicate: str) -> None:
    """Scan filters and delete predicates are refused by the same allow-list."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.ticket({"dataset": "t", "filter": predicate})
    assert_invalid(exc, hostile)
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.action("delete_rows", {"dataset": "vt2", "where": predicate})
    assert_invalid(exc, hostile)
    assert hostile.sql("SELECT count(*) AS n FROM vt2").to_pylist() == [{"n": 200}]


def test_slow_search_filter_is_stopped_at_the_time_limit(hostile: ServerProcess) -> None:
    """A filter costing seconds per batch of rows ends with DEADLINE_EXCEEDED near the query time limit."""
    predicate = "levenshtein(repeat(tag, 1000), repeat('b', 1000)) >= 0"  # ~20 s of DuckDB 2.0 over 20k rows
    started = time.monotonic()
    with pytest.raises(flight.FlightTimedOutError) as exc:
        search(hostile, {"dataset": "vt", "vector": QUERY, "k": 3, "filter": predicate})
    assert time.monotonic() - started < TIMEOUT_SECONDS + 8
    assert_refusal(exc, hostile, "time limit")
    assert search(hostile, {"dataset": "vt", "vector": QUERY, "k": 1, "filter": "id = 0"}).num_rows == 1


def test_predicate_check_unit() -> None:
    """``check_predicate``: one expression, the query allow-list, subqueries only over given datasets."""
    with duckdb.connect() as connection:
        check_predicate(connection, "id < 3 AND tag LIKE 'a%'")
        assert check_predicate(connection, "x IN (SELECT x FROM t)", {"t"}) == {"t"}
        for predicate in (
            "x IN (SELECT 1)",
            "pg_get_viewdef(1) IS NULL",
            "1 = 0) UNION ALL SELECT * FROM t WHERE (1 = 1",
        ):
            with pytest.raises(InvalidArgument):
                check_predicate(connection, predicate)


# -- 3. nesting and size bounded before DuckDB plans -------------------------------------------------------


def nested_scalar(levels: int) -> str:
    """A query of ``levels`` nested scalar subqueries over ``t``."""
    inner = "1"
    for _ in range(levels):
        inner = f"(SELECT max({inner}) FROM t)"
    return f"SELECT {inner} AS v"


def nested_derived(levels: int) -> str:
    """A query of ``levels`` nested derived tables over ``t``."""
    inner = "t"
    for _ in range(levels):
        inner = f"(SELECT * FROM {inner})"
    return f"SELECT count(*) AS n FROM {inner} d"


DEEP_QUERIES = {
    "scalar_9": nested_scalar(MAX_SUBQUERY_DEPTH + 1),
    "scalar_300": nested_scalar(300),
    "derived_16": nested_derived(MAX_QUERY_DEPTH),
    "derived_40": nested_derived(40),
    "exists_9": "SELECT 1 AS v" + " WHERE EXISTS (SELECT 1 FROM t" * 9 + ")" * 9,
    "expression_250": "SELECT " + " + ".join(["x"] * 250) + " AS v FROM t",
    "expression_2000": "SELECT " + " + ".join(["1"] * 2000) + " AS v",
    "in_cte_body": f"WITH a AS ({nested_derived(MAX_QUERY_DEPTH - 1)}) SELECT * FROM a",
}


@pytest.mark.parametrize("name", sorted(DEEP_QUERIES))
def test_deep_queries_are_refused_before_planning(hostile: ServerProcess, name: str) -> None:
    """Nested subqueries past the limit and deep expressions: INVALID_ARGUMENT naming the limits, at once."""
    started = time.monotonic()
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.sql(DEEP_QUERIES[name])
    assert time.monotonic() - started < 1.5
    limits = (str(limit) for limit in (MAX_QUERY_DEPTH, MAX_SUBQUERY_DEPTH, MAX_EXPRESSION_DEPTH))
    assert_invalid(exc, hostile, "nested too deeply", *limits)


def fan_out(levels: int, hint: str = "") -> str:
    """CTEs each reading the previous one twice: DuckDB's planner expands them, doubling a level."""
    ctes = ["a0 AS (SELECT 1 AS x)"]
    for level in range(1, levels + 1):
        previous = f"a{level - 1}"
        ctes.append(
            f"a{level} AS {hint}(SELECT (SELECT x FROM {previous}) + (SELECT x FROM {previous}) AS x)"
        )
    return f"WITH {', '.join(ctes)} SELECT x FROM a{levels}"


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        (fan_out(15), f"{MAX_INLINED_NODES:,} parse-tree nodes"),
        (fan_out(40), f"{MAX_INLINED_NODES:,} parse-tree nodes"),
        (fan_out(3, "NOT MATERIALIZED "), "NOT MATERIALIZED is not allowed"),
        (fan_out(3, "not\n  materialized "), "NOT MATERIALIZED is not allowed"),
    ],
    ids=["expands_15", "expands_40", "not_materialized", "not_materialized_lower"],
)
def test_cte_expansion_is_bounded_before_planning(sql: str, message: str) -> None:
    """A query short as text that DuckDB's planner would expand for minutes is refused on its parse tree."""
    connection = duckdb.connect()
    started = time.monotonic()
    with pytest.raises(InvalidArgument, match=message):
        check_select(connection, sql, set())
    assert time.monotonic() - started < 1


def test_cte_expansion_within_the_bound_runs(hostile: ServerProcess) -> None:
    """12 doubling levels (94k nodes expanded) and recursive CTEs stay allowed and answer."""
    assert hostile.sql(fan_out(12)).to_pylist() == [{"x": 4096}]
    recursive = "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 50) "
    recursive += "SELECT sum(n) AS s FROM r"
    assert hostile.sql(recursive).to_pylist() == [{"s": 1275}]


def test_queries_within_the_limits_run(hostile: ServerProcess) -> None:
    """The limits leave room: 8 nested subqueries, 16 nested SELECTs and 150 nested operators run."""
    assert hostile.sql(nested_scalar(MAX_SUBQUERY_DEPTH)).to_pylist() == [{"v": 1}]
    assert hostile.sql(nested_derived(MAX_QUERY_DEPTH - 1)).to_pylist() == [{"n": 3}]
    assert hostile.sql("SELECT " + " + ".join(["x"] * 150) + " AS v FROM t LIMIT 1").to_pylist() == [
        {"v": 150}
    ]


def test_deep_search_filter_is_refused(hostile: ServerProcess) -> None:
    """Filters are bounded the same way."""
    predicate = "id < " + " + ".join(["1"] * 400)
    with pytest.raises(pa.ArrowInvalid) as exc:
        search(hostile, {"dataset": "vt", "vector": QUERY, "k": 3, "filter": predicate})
    assert_invalid(exc, hostile, "nested too deeply")


def deep_json(depth: int, opener: str = "[", closer: str = "]") -> str:
    """A JSON value nested ``depth`` levels."""
    return opener * depth + "1" + closer * depth


DEEP_TICKETS = {
    "sql_list_5000": '{"sql": ' + deep_json(5000) + "}",
    "sql_list_1000": '{"sql": ' + deep_json(1000) + "}",
    "filter_object_5000": '{"dataset": "t", "filter": ' + deep_json(5000, '{"a": ', "}") + "}",
    "search_vector_5000": '{"search": {"dataset": "vt", "vector": ' + deep_json(5000) + "}}",
    "top_level_list_5000": deep_json(5000),
}


@pytest.mark.parametrize("name", sorted(DEEP_TICKETS))
def test_deeply_nested_json_tickets_are_refused(hostile: ServerProcess, name: str) -> None:
    """A ticket nested thousands of levels deep is INVALID_ARGUMENT, not INTERNAL."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.client.do_get(flight.Ticket(DEEP_TICKETS[name].encode())).read_all()
    assert_invalid(exc, hostile)


def test_deeply_nested_action_body_is_refused(hostile: ServerProcess) -> None:
    """Action bodies are decoded the same way."""
    body = '{"dataset": "vt", "vector": ' + deep_json(5000) + "}"
    with pytest.raises(pa.ArrowInvalid) as exc:
        list(hostile.client.do_action(flight.Action("vector_search", body.encode())))
    assert_invalid(exc, hostile, "nested too deeply")


# -- 5. PIVOT, the vector column in results, strings for query vectors ------------------------------------


@pytest.mark.parametrize(
    "sql",
    ["PIVOT t ON s USING sum(x)", "SELECT * FROM (PIVOT t ON s USING sum(x))"],
    ids=["statement", "subquery"],
)
def test_pivot_without_values_is_refused_by_name(hostile: ServerProcess, sql: str) -> None:
    """A PIVOT DuckDB runs as several statements is refused naming PIVOT and what to write instead."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        hostile.sql(sql)
    assert_invalid(exc, hostile, "PIVOT", "IN (")


def test_pivot_with_values_is_served(hostile: ServerProcess) -> None:
    """PIVOT with an explicit IN list is one SELECT: it is served."""
    result = hostile.sql("PIVOT t ON s IN ('a', 'c') USING sum(x)").to_pylist()
    assert result == [{"a": 1, "c": 3}]
    standard = hostile.sql("SELECT * FROM t PIVOT (sum(x) FOR s IN ('a', 'b'))").to_pylist()
    assert standard == [{"a": 1, "b": 2}]


@pytest.mark.parametrize(
    ("dataset", "extra"),
    [("vt", {}), ("vt", {"filter": "id < 100"}), ("vt2", {"column": "vec"})],
    ids=["memory", "memory_filtered", "lance"],
)
@pytest.mark.parametrize("columns", [["vec"], ["id", "vec"]], ids=["vector_only", "with_id"])
def test_search_returns_the_vector_column(
    hostile: ServerProcess, dataset: str, extra: dict, columns: list[str]
) -> None:
    """Asking for the vector column returns the stored vectors, from memory and from Lance."""
    body = {"dataset": dataset, "vector": QUERY, "k": 3, "columns": columns, **extra}
    for result in (search(hostile, body), hostile.ticket({"search": body})):
        assert result.column_names == [*columns, "_distance"]
        assert result.num_rows == 3
        np.testing.assert_allclose(result.column("vec")[0].as_py(), QUERY, rtol=1e-6)


def test_exchange_returns_the_vector_column(hostile: ServerProcess) -> None:
    """DoExchange searches return the vector column too."""
    command = {"search": {"dataset": "vt", "k": 2, "columns": ["vec"]}}
    result = exchange(hostile, command, pa.record_batch([vector_array(MATRIX[:4])], names=["vector"]))
    assert result.column_names == ["_query_index", "vec", "_distance"]
    assert result.num_rows == 8
    np.testing.assert_allclose(result.column("vec")[0].as_py(), QUERY, rtol=1e-6)


def exchange(server: ServerProcess, command: dict, batch: pa.RecordBatch) -> pa.Table:
    """One DoExchange search of the query vectors of ``batch``."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    writer, reader = server.client.do_exchange(descriptor)
    with writer:
        writer.begin(batch.schema)
        writer.write_batch(batch)
        writer.done_writing()
        return reader.read_all()


@pytest.mark.parametrize(
    "column",
    [
        pa.array(["0.1"] * 2),
        pa.array([["0.1"] * DIM] * 2, pa.list_(pa.string())),
        pa.array([["0.1"] * DIM] * 2, pa.list_(pa.string(), DIM)),
    ],
    ids=["strings", "list_of_strings", "fixed_size_list_of_strings"],
)
def test_strings_as_query_vectors_are_refused(hostile: ServerProcess, column: pa.Array) -> None:
    """Strings where query vectors belong: INVALID_ARGUMENT naming the column, not INTERNAL."""
    with pytest.raises(pa.ArrowInvalid) as exc:
        exchange(hostile, {"search": {"dataset": "vt", "k": 2}}, pa.record_batch([column], names=["vector"]))
    assert_invalid(exc, hostile, "vector")
