"""Unit tests of pure functions otherwise tested only through a server: schema reconciliation, storage
types, the SQL sandbox's node and tree checks, and the vector distance, top-k and validity helpers.

No server, no storage: each test runs in milliseconds (the sandbox ones parse with an in-memory DuckDB).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa
import pytest

from flight_lakehouse import sandbox
from flight_lakehouse.errors import InvalidArgument, NotFound, SchemaConflict
from flight_lakehouse.ingest import reconcile
from flight_lakehouse.schema_types import storage_schema, storage_type
from flight_lakehouse.storage import ReadLeases
from flight_lakehouse.vector_memory import exact_distances, top_k, unit_rows
from flight_lakehouse.vectors import check_vectors, problem_rows

# -- reconcile -------------------------------------------------------------------------------------------

TABLE = pa.schema([("id", pa.int64()), ("name", pa.string()), ("score", pa.float64())])
PREFIX = "schema of upload differs from dataset 'events': "
HINT = "; use schema_mode 'evolve' to add columns"


def conflict(table: pa.Schema, upload: pa.Schema, mode: str) -> str:
    """The message of the SchemaConflict ``reconcile`` raises (failing the test if it raises none)."""
    with pytest.raises(SchemaConflict) as info:
        reconcile(table, upload, mode, "events")
    return str(info.value)


@pytest.mark.parametrize("mode", ["strict", "evolve"])
def test_reconcile_orders_the_upload_like_the_table(mode: str) -> None:
    upload = pa.schema([("score", pa.float64()), ("id", pa.int64()), ("name", pa.string())])
    assert reconcile(TABLE, upload, mode, "events").names == ["id", "name", "score"]


def test_reconcile_keeps_the_uploads_fields_where_only_the_spelling_of_a_type_differs() -> None:
    """large vs small, list field names, time zone names: the same stored type, so no conflict; the file
    schema keeps the upload's fields."""
    table = pa.schema(
        [
            ("name", pa.string()),
            ("tags", pa.list_(pa.field("element", pa.string()))),
            ("at", pa.timestamp("us", tz="UTC")),
        ]
    )
    upload = pa.schema(
        [
            ("name", pa.large_string()),
            ("tags", pa.large_list(pa.field("item", pa.large_string()))),
            ("at", pa.timestamp("us", tz="Europe/Paris")),
        ]
    )
    result = reconcile(table, upload, "strict", "events")
    assert result.equals(upload)


def test_reconcile_strict_refuses_an_extra_column_naming_it_and_hinting_evolve() -> None:
    upload = TABLE.append(pa.field("extra", pa.int32()))
    assert conflict(TABLE, upload, "strict") == PREFIX + "not in dataset: extra" + HINT


def test_reconcile_strict_refuses_missing_columns_naming_them_in_table_order() -> None:
    upload = pa.schema([("id", pa.int64())])
    assert conflict(TABLE, upload, "strict") == PREFIX + "missing from upload: name, score" + HINT


def test_reconcile_strict_lists_every_problem_at_once() -> None:
    upload = pa.schema([("id", pa.int32()), ("name", pa.string()), ("b", pa.bool_()), ("a", pa.bool_())])
    assert conflict(TABLE, upload, "strict") == PREFIX + (
        "type differs: id (int32 vs int64); not in dataset: b, a; missing from upload: score"
    )  # no hint: evolve would not help with the retyped column


def test_reconcile_evolve_appends_new_columns_after_the_tables() -> None:
    upload = pa.schema([("new", pa.int32()), ("name", pa.string()), ("id", pa.int64()), ("z", pa.date32())])
    result = reconcile(TABLE, upload, "evolve", "events")
    assert result.names == ["id", "name", "new", "z"]  # the table's order, then the upload's new ones
    assert result.field("new").type == pa.int32() and result.field("z").type == pa.date32()


def test_reconcile_evolve_allows_missing_columns() -> None:
    result = reconcile(TABLE, pa.schema([("score", pa.float64())]), "evolve", "events")
    assert result.names == ["score"]


@pytest.mark.parametrize("mode", ["strict", "evolve"])
def test_reconcile_refuses_a_changed_type_in_either_mode(mode: str) -> None:
    upload = pa.schema([("id", pa.string()), ("name", pa.string()), ("score", pa.float64())])
    assert conflict(TABLE, upload, mode) == PREFIX + "type differs: id (string vs int64)"


def test_reconcile_widens_nothing_itself() -> None:
    """A narrower integer or float is a different type here: only :func:`storage_schema` (run before)
    widens, and only what Iceberg cannot store (uint8 -> int32), never int32 -> int64."""
    upload = pa.schema([("id", pa.int32()), ("name", pa.string()), ("score", pa.float32())])
    assert conflict(TABLE, upload, "evolve") == PREFIX + (
        "type differs: id (int32 vs int64), score (float vs double)"
    )


def test_reconcile_after_storage_schema_accepts_types_stored_alike() -> None:
    """uint16 is stored as int32, uint32 as int64, float16 as float32: they append to such columns."""
    table = pa.schema([("a", pa.int32()), ("b", pa.int64()), ("c", pa.float32()), ("t", pa.timestamp("us"))])
    upload = pa.schema(
        [("a", pa.uint16()), ("b", pa.uint32()), ("c", pa.float16()), ("t", pa.timestamp("ns"))]
    )
    result = reconcile(table, storage_schema(upload), "strict", "events")
    assert result.equals(table)
    narrower = pa.schema([("a", pa.uint32()), ("b", pa.int64()), ("c", pa.float32()), ("t", pa.date32())])
    assert conflict(table, storage_schema(narrower), "strict") == PREFIX + (
        "type differs: a (int64 vs int32), t (date32[day] vs timestamp[us])"
    )


def test_reconcile_compares_nested_types_field_by_field() -> None:
    table = pa.schema([("s", pa.struct([("a", pa.int32()), ("b", pa.string())]))])
    same = pa.schema([("s", pa.struct([("a", pa.int32()), ("b", pa.large_string())]))])
    assert reconcile(table, same, "strict", "events").equals(same)
    renamed = pa.schema([("s", pa.struct([("a", pa.int32()), ("c", pa.string())]))])
    assert conflict(table, renamed, "evolve") == PREFIX + (
        "type differs: s (struct<a: int32, c: string> vs struct<a: int32, b: string>)"
    )


@pytest.mark.parametrize("mode", ["strict", "evolve"])
def test_reconcile_refuses_a_case_twin_of_a_column(mode: str) -> None:
    """SQL names are case-insensitive: ``ID`` beside ``id`` could not be stored (evolve once added it, and
    the committed table then failed every later upload and describe with 'duplicate column name')."""
    upload = pa.schema([("ID", pa.int64()), ("name", pa.string())])
    message = conflict(TABLE, upload, mode)
    assert "differ only in case: 'ID' (dataset has 'id')" in message, message


# -- storage types ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        (pa.int8(), pa.int32()),
        (pa.int16(), pa.int32()),
        (pa.uint8(), pa.int32()),
        (pa.uint16(), pa.int32()),
        (pa.uint32(), pa.int64()),
        (pa.float16(), pa.float32()),
        (pa.large_string(), pa.string()),
        (pa.string_view(), pa.string()),
        (pa.large_binary(), pa.binary()),
        (pa.binary_view(), pa.binary()),
        (pa.timestamp("ns"), pa.timestamp("us")),
        (pa.timestamp("s"), pa.timestamp("us")),
        (pa.timestamp("ms", tz="Europe/Paris"), pa.timestamp("us", tz="UTC")),
        (pa.time32("s"), pa.time64("us")),
        (pa.time64("ns"), pa.time64("us")),
        (pa.date64(), pa.date32()),
        (pa.dictionary(pa.int8(), pa.large_string()), pa.string()),
        (pa.dictionary(pa.int32(), pa.uint8()), pa.int32()),
    ],
)
def test_storage_type_converts_what_iceberg_cannot_hold(given: pa.DataType, stored: pa.DataType) -> None:
    assert storage_type(given, "c") == stored


@pytest.mark.parametrize(
    "kept",
    [
        pa.bool_(),
        pa.int32(),
        pa.int64(),
        pa.float32(),
        pa.float64(),
        pa.decimal128(38, 9),
        pa.string(),
        pa.binary(),
        pa.binary(16),
        pa.date32(),
    ],
)
def test_storage_type_keeps_what_iceberg_holds(kept: pa.DataType) -> None:
    assert storage_type(kept, "c") == kept


@pytest.mark.parametrize("lists", [pa.list_(pa.int8()), pa.large_list(pa.int8()), pa.list_(pa.int8(), 3)])
def test_storage_type_stores_every_list_as_a_list_of_element(lists: pa.DataType) -> None:
    stored = storage_type(lists, "v")
    assert pa.types.is_list(stored) and stored.value_type == pa.int32()
    assert stored.value_field.name == "element"


def test_storage_type_converts_inside_structs_and_maps() -> None:
    struct = pa.struct([pa.field("a", pa.uint8(), nullable=False), ("b", pa.large_string())])
    stored = storage_type(struct, "s")
    assert stored == pa.struct([("a", pa.int32()), ("b", pa.string())])
    assert stored.field("a").nullable  # every stored field is nullable, nested ones too
    assert storage_type(pa.map_(pa.large_string(), pa.uint16()), "m") == pa.map_(pa.string(), pa.int32())


@pytest.mark.parametrize(
    ("given", "column", "shown"),
    [
        (pa.uint64(), "c", "uint64"),
        (pa.null(), "c", "null"),
        (pa.duration("s"), "c", "duration[s]"),
        (pa.decimal256(40, 2), "c", "decimal256(40, 2)"),
        (pa.month_day_nano_interval(), "c", "month_day_nano_interval"),
        (pa.large_list(pa.uint64()), "c.element", "uint64"),
        (pa.struct([("inner", pa.uint64())]), "c.inner", "uint64"),
        (pa.map_(pa.uint64(), pa.int32()), "c.key", "uint64"),
        (pa.map_(pa.string(), pa.null()), "c.value", "null"),
    ],
)
def test_storage_type_refuses_naming_the_column_path(given: pa.DataType, column: str, shown: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        storage_type(given, "c")
    assert str(info.value) == f"column {column!r} has type {shown}, which a dataset cannot store"


def test_storage_schema_makes_every_column_nullable_and_converts_types() -> None:
    schema = pa.schema([pa.field("id", pa.uint8(), nullable=False), pa.field("s", pa.large_string())])
    assert storage_schema(schema) == pa.schema([pa.field("id", pa.int32()), pa.field("s", pa.string())])
    assert all(field.nullable for field in storage_schema(schema))


@pytest.mark.parametrize(
    ("names", "message"),
    [
        ([], "the upload has no columns"),
        (["id", "ID"], "duplicate column name 'ID' (column names are case-insensitive)"),
        (["Name", "x", "nAmE"], "duplicate column name 'nAmE' (column names are case-insensitive)"),
        (["id", ""], "invalid column name ''"),
        (["a\x00b"], "invalid column name 'a\\x00b'"),
    ],
)
def test_storage_schema_refuses_bad_names(names: list[str], message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        storage_schema(pa.schema([(name, pa.int64()) for name in names]))
    assert str(info.value) == message


# -- the sandbox: node checks ----------------------------------------------------------------------------


def base_table(name: str, schema: str = "", catalog: str = "") -> dict[str, Any]:
    """A ``FROM name`` node as DuckDB's ``json_serialize_sql`` writes it."""
    return {"type": "BASE_TABLE", "table_name": name, "schema_name": schema, "catalog_name": catalog}


def function(name: str) -> dict[str, Any]:
    """A function call node."""
    return {"class": "FUNCTION", "type": "FUNCTION", "function_name": name, "children": []}


@pytest.mark.parametrize(
    "node",
    [
        base_table("Sales"),
        base_table("sales", "main"),
        base_table("SALES", "MAIN", "Memory"),
        base_table("sales", "", "memory"),
    ],
)
def test_check_node_names_a_readable_local_table_in_lower_case(node: dict[str, Any]) -> None:
    assert sandbox.check_node(node, {"sales"}) == "sales"


@pytest.mark.parametrize(
    ("node", "error", "message"),
    [
        (base_table("other"), NotFound, "dataset 'other' not found"),
        (
            base_table("duckdb_tables"),
            NotFound,
            "dataset 'duckdb_tables' not found (DuckDB's catalog views are not readable)",
        ),
        (
            base_table("Pg_Settings", "main"),
            NotFound,
            "dataset 'Pg_Settings' not found (DuckDB's catalog views are not readable)",
        ),
        (
            base_table("x.parquet"),
            InvalidArgument,
            "'x.parquet' is not a dataset: queries may read registered datasets only",
        ),
        (
            base_table("sales", "other"),
            InvalidArgument,
            "'other.sales' is not a dataset: queries may read registered datasets only",
        ),
        (
            base_table("sales", "main", "db"),
            InvalidArgument,
            "'db.main.sales' is not a dataset: queries may read registered datasets only",
        ),
        (
            {"type": "TABLE_FUNCTION", "function": function("read_csv")},
            InvalidArgument,
            "table function 'read_csv' is not allowed: queries may read registered datasets only",
        ),
        (function("GETENV"), InvalidArgument, "function 'getenv' is not allowed in queries and filters"),
        (function("duckdb_settings"), InvalidArgument, "function 'duckdb_settings' is not allowed"),
        (function("current_setting"), InvalidArgument, "function 'current_setting' is not allowed"),
        (function("read_text"), InvalidArgument, "function 'read_text' is not allowed"),
        (function("no_such_function"), InvalidArgument, "function 'no_such_function' is not allowed"),
    ],
)
def test_check_node_refuses(node: dict[str, Any], error: type[Exception], message: str) -> None:
    with pytest.raises(error) as info:
        sandbox.check_node(node, {"sales"})
    assert type(info.value) is error
    assert str(info.value).startswith(message), str(info.value)


@pytest.mark.parametrize(
    "node",
    [
        function("abs"),
        function("LOWER"),
        {"type": "TABLE_FUNCTION", "function": function("Range")},
        {"type": "TABLE_FUNCTION", "function": function("generate_series")},
        {"type": "BASE_TABLE", "class": "COLUMN_REF", "table_name": "anything"},  # an expression, not a FROM
        {"type": "SELECT_NODE"},
    ],
)
def test_check_node_passes_allowed_nodes_naming_no_table(node: dict[str, Any]) -> None:
    assert sandbox.check_node(node, {"sales"}) is None


def test_blocked_functions_are_not_in_the_allow_list() -> None:
    functions = sandbox.duckdb_names().functions
    assert {"abs", "lower", "sum", "range", "unnest"} <= functions
    assert not {"getenv", "current_setting", "sleep_ms", "query", "glob"} & functions
    assert not [name for name in functions if name.startswith(sandbox.BLOCKED_FUNCTION_PREFIXES)]


# -- the sandbox: trees and CTE scope --------------------------------------------------------------------


@pytest.fixture(scope="module")
def connection() -> Iterator[duckdb.DuckDBPyConnection]:
    with duckdb.connect(":memory:") as db:
        yield db


def check(
    connection: duckdb.DuckDBPyConnection, sql: str, datasets: frozenset[str] = frozenset()
) -> set[str]:
    """The table names ``check_tree`` finds in ``sql``."""
    return sandbox.check_tree(sandbox.serialize(connection, sql), set(datasets))


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("select * from Sales", {"sales"}),
        ("select * from sales s join SALES t using (id)", {"sales"}),
        ("with a as (select 1 as x) select * from a", {"a"}),
        ("with A as (select 1 as x) select * from a", {"a"}),  # CTE names are case-insensitive too
        ("with a as (select 1 as x), b as (select * from a) select * from b", {"a", "b"}),
        ("with a as (select 1 as x) select (select max(x) from a) as m", {"a"}),  # visible in subqueries
        ("with a as (select * from sales) select * from a", {"a", "sales"}),
        ("with sales as (select 1 as x) select * from sales", {"sales"}),  # a CTE may shadow a dataset
        (
            "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) select * from r",
            {"r"},
        ),
        ("select * from range(3), unnest([1, 2])", set()),
    ],
)
def test_check_tree_allows_datasets_and_ctes_in_scope(
    connection: duckdb.DuckDBPyConnection, sql: str, named: set[str]
) -> None:
    assert check(connection, sql, frozenset({"sales"})) == named


@pytest.mark.parametrize(
    ("sql", "missing"),
    [
        ("with a as (select * from b), b as (select 1) select * from a", "b"),  # a later CTE
        ("select * from (with a as (select 1 as x) select * from a) t, a", "a"),  # outside its query
        ("select (with a as (select 1 as x) select max(x) from a), * from a", "a"),
        ("with a as (select * from a) select * from a", "a"),  # not recursive: its own name is the catalog's
        ("with r(n) as (select 1 union all select n + 1 from r where n < 3) select * from r", "r"),
    ],
)
def test_check_tree_refuses_ctes_out_of_scope(
    connection: duckdb.DuckDBPyConnection, sql: str, missing: str
) -> None:
    with pytest.raises(NotFound) as info:
        check(connection, sql)
    assert str(info.value) == f"dataset {missing!r} not found"


def test_check_tree_refuses_a_cte_named_like_a_catalog_view(connection: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(InvalidArgument) as info:
        check(connection, "with duckdb_tables as (select 1) select * from duckdb_tables")
    assert str(info.value) == "CTE name 'duckdb_tables' is reserved: it names a DuckDB catalog view"


def test_check_tree_a_cte_named_like_a_path_vouches_for_nothing(
    connection: duckdb.DuckDBPyConnection,
) -> None:
    with pytest.raises(InvalidArgument) as info:
        check(connection, 'with "x.parquet" as (select 1 as x) select * from "x.parquet"')
    assert str(info.value) == "'x.parquet' is not a dataset: queries may read registered datasets only"


def test_check_tree_checks_functions_everywhere(connection: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(InvalidArgument, match=r"^function 'getenv' is not allowed"):
        check(connection, "with a as (select getenv('HOME') as h) select * from a")
    with pytest.raises(InvalidArgument, match=r"^table function 'read_csv' is not allowed"):
        check(connection, "select * from sales where id in (select id from read_csv('x.csv'))", {"sales"})


def nested_selects(count: int) -> str:
    """A query of ``count`` SELECTs, each the derived table of the next."""
    sql = "select 1 as x"
    for _ in range(count - 1):
        sql = f"select * from ({sql}) t"
    return sql


def nested_subqueries(count: int) -> str:
    """A query holding ``count`` scalar subqueries, each inside the next."""
    sql = "select 1"
    for _ in range(count):
        sql = f"select ({sql})"
    return sql


def nested_calls(count: int) -> str:
    """``count`` function calls nested around a constant: ``count + 1`` nested expressions."""
    return "select " + "abs(" * count + "1" + ")" * count


@pytest.mark.parametrize(
    ("sql", "allowed"),
    [
        (nested_selects(sandbox.MAX_QUERY_DEPTH), True),
        (nested_selects(sandbox.MAX_QUERY_DEPTH + 1), False),
        (nested_subqueries(sandbox.MAX_SUBQUERY_DEPTH), True),
        (nested_subqueries(sandbox.MAX_SUBQUERY_DEPTH + 1), False),
        (nested_calls(sandbox.MAX_EXPRESSION_DEPTH - 1), True),
        (nested_calls(sandbox.MAX_EXPRESSION_DEPTH), False),
    ],
    ids=[
        "selects-at-limit",
        "selects-past",
        "subqueries-at-limit",
        "subqueries-past",
        "calls-at",
        "calls-past",
    ],
)
def test_check_tree_nesting_limits_are_exact(
    connection: duckdb.DuckDBPyConnection, sql: str, allowed: bool
) -> None:
    if allowed:
        assert check(connection, sql) == set()
    else:
        with pytest.raises(InvalidArgument) as info:
            check(connection, sql)
        assert str(info.value) == sandbox.TOO_DEEP


# -- the sandbox: the size of a query with its CTEs inlined ----------------------------------------------


def test_inlined_size_counts_each_reference_as_the_ctes_body() -> None:
    body = {"select": {"constant": {}}}  # 3 objects
    tree = {"cte_map": {"map": [{"key": "A", "value": body}]}, "from": [base_table("a"), base_table("a")]}
    assert sandbox.inlined_size(body, {}) == 3
    assert sandbox.inlined_size(tree, {}) == 1 + 2 * (1 + 3)  # the root, two references and two bodies


def test_inlined_size_nests_ctes_reading_earlier_ones() -> None:
    tree = {
        "cte_map": {
            "map": [
                {"key": "c0", "value": {"leaf": {}}},  # 2
                {"key": "c1", "value": {"from": [base_table("c0"), base_table("c0")]}},  # 1 + 2 * 3 = 7
            ]
        },
        "from": base_table("c1"),  # 1 + 7
    }
    assert sandbox.inlined_size(tree, {}) == 1 + 8


def test_inlined_size_scopes_a_cte_to_its_query() -> None:
    inner = {"cte_map": {"map": [{"key": "a", "value": {"leaf": {}}}]}, "from": base_table("a")}  # 1 + 3
    tree = {"before": base_table("a"), "inner": inner, "after": base_table("a")}  # "a" outside inner: 1
    assert sandbox.inlined_size(tree, {}) == 1 + 1 + 4 + 1
    assert sandbox.inlined_size(base_table("a"), {"a": 10}) == 11  # sizes given for the scope count


def test_inlined_size_an_inner_cte_shadows_an_outer_one() -> None:
    inner = {"cte_map": {"map": [{"key": "a", "value": {}}]}, "from": base_table("A")}  # 1 + (1 + 1)
    tree = {"cte_map": {"map": [{"key": "a", "value": {"x": {"y": {}}}}]}, "sub": inner}  # outer a: 3
    assert sandbox.inlined_size(tree, {}) == 1 + 3


def test_inlined_size_refuses_past_the_limit() -> None:
    assert (
        sandbox.inlined_size(base_table("a"), {"a": sandbox.MAX_INLINED_NODES - 1})
        == sandbox.MAX_INLINED_NODES
    )
    with pytest.raises(InvalidArgument) as info:
        sandbox.inlined_size(base_table("a"), {"a": sandbox.MAX_INLINED_NODES})
    assert str(info.value) == sandbox.TOO_LARGE


def doubling_ctes(levels: int) -> str:
    """CTEs each reading the previous one twice: the inlined query doubles with every level."""
    ctes = ["c0 as (select 1 as x)"] + [
        f"c{i} as (select a.x from c{i - 1} a, c{i - 1} b)" for i in range(1, levels + 1)
    ]
    return "with " + ", ".join(ctes) + f" select * from c{levels}"


def test_check_tree_refuses_ctes_that_expand_past_the_limit(connection: duckdb.DuckDBPyConnection) -> None:
    small, larger = (
        sandbox.inlined_size(sandbox.serialize(connection, doubling_ctes(n)), {}) for n in (5, 6)
    )
    assert 2 * small < larger < 2 * small + 100  # each level doubles the inlined query
    assert check(connection, doubling_ctes(5)) == {f"c{i}" for i in range(6)}
    linear = "with c0 as (select 1 as x), " + ", ".join(
        f"c{i} as (select * from c{i - 1})" for i in range(1, 40)
    )
    assert len(check(connection, linear + " select * from c39")) == 40  # read once each: no growth
    with pytest.raises(InvalidArgument) as info:
        check(connection, doubling_ctes(24))
    assert str(info.value) == sandbox.TOO_LARGE


# -- vectors: distances, top-k, unit rows, validity ------------------------------------------------------

QUERY = np.array([[1.0, 2.0, 3.0]])
VECTORS = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [-1.0, -2.0, -3.0], [0.0, 0.0, 0.0], [3.0, -1.0, 0.0]])


def test_exact_distances_in_lances_conventions() -> None:
    cosine = exact_distances("cosine", VECTORS, QUERY)
    assert cosine.shape == (1, 5)
    assert cosine[0].tolist() == [0.0, 0.0, 2.0, 1.0, pytest.approx(1 - 1 / math.sqrt(140))]
    assert exact_distances("l2", VECTORS, QUERY)[0].tolist() == [0.0, 14.0, 56.0, 14.0, 22.0]  # squared
    assert exact_distances("dot", VECTORS, QUERY)[0].tolist() == [-13.0, -27.0, 15.0, 1.0, 0.0]  # 1 - x.q


def test_exact_distances_of_an_exact_float32_match_are_zero() -> None:
    vector = np.float32([[0.1, 0.2, 0.3]])
    assert exact_distances("l2", vector, vector).tolist() == [[0.0]]
    assert exact_distances("cosine", vector, vector).tolist() == [[0.0]]
    assert exact_distances("l2", vector, vector).dtype == np.float64


def test_exact_distances_of_a_zero_vector_or_query_under_cosine_are_one() -> None:
    assert exact_distances("cosine", VECTORS, np.zeros((1, 3))).tolist() == [[1.0] * 5]
    assert exact_distances("cosine", np.zeros((2, 3)), QUERY).tolist() == [[1.0, 1.0]]


def test_exact_distances_l2_never_negative() -> None:
    """|q|^2 + |x|^2 - 2 q.x rounds to -4.4e-16 for these neighbours (one ulp apart): clamped at 0."""
    query = np.array([[0.5118216247002567, 0.9504636963259353, 0.14415961271963373]])
    vector = np.array([[0.5118216247002568, 0.9504636963259353, 0.14415961271963373]])
    assert exact_distances("l2", vector, query).tolist() == [[0.0]]


def test_exact_distances_per_query_candidates() -> None:
    queries = np.array([[1.0, 0.0], [0.0, 2.0]])
    candidates = np.array([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]])  # (queries, candidates, d)
    assert exact_distances("l2", candidates, queries).tolist() == [[0.0, 2.0], [1.0, 13.0]]
    assert exact_distances("dot", candidates, queries).tolist() == [[0.0, 1.0], [-1.0, 1.0]]
    assert exact_distances("cosine", candidates, queries).tolist() == [[0.0, 1.0], [0.0, 1.0]]


def test_top_k_nearest_first_with_shared_slots() -> None:
    distances = np.array([[0.5, 0.1, 0.9, 0.3], [0.2, 0.8, 0.0, 0.4]])
    slots = np.array([10, 11, 12, 13])
    chosen, nearest = top_k(distances, slots, 3)
    assert chosen.tolist() == [[11, 13, 10], [12, 10, 13]]
    assert nearest.tolist() == [[0.1, 0.3, 0.5], [0.0, 0.2, 0.4]]


def test_top_k_with_slots_per_row() -> None:
    distances = np.array([[3.0, 1.0, 2.0], [0.0, 5.0, 4.0]])
    slots = np.array([[7, 8, 9], [4, 5, 6]])
    chosen, nearest = top_k(distances, slots, 2)
    assert chosen.tolist() == [[8, 9], [4, 6]]
    assert nearest.tolist() == [[1.0, 2.0], [0.0, 4.0]]


def test_top_k_more_than_there_are_returns_all_sorted() -> None:
    chosen, nearest = top_k(np.array([[0.3, 0.1, 0.2]]), np.array([5, 6, 7]), 10)
    assert chosen.tolist() == [[6, 7, 5]]
    assert nearest.tolist() == [[0.1, 0.2, 0.3]]


@pytest.mark.parametrize(("columns", "k"), [(0, 3), (4, 0)])
def test_top_k_empty(columns: int, k: int) -> None:
    chosen, nearest = top_k(np.zeros((2, columns)), np.arange(columns), k)
    assert chosen.shape == (2, 0) and chosen.dtype == np.int64
    assert nearest.shape == (2, 0) and nearest.dtype == np.float32


def test_top_k_ties() -> None:
    """Tied rows inside k are all returned; at the cut-off one of the tied rows is; distances ascend."""
    distances = np.array([[1.0, 0.0, 0.0, 1.0, 0.5, 1.0]])
    slots = np.array([10, 11, 12, 13, 14, 15])
    chosen, nearest = top_k(distances, slots, 3)
    assert sorted(chosen[0][:2].tolist()) == [11, 12] and chosen[0][2] == 14
    assert nearest.tolist() == [[0.0, 0.0, 0.5]]
    chosen, nearest = top_k(distances, slots, 4)
    assert chosen[0][3] in {10, 13, 15} and nearest.tolist() == [[0.0, 0.0, 0.5, 1.0]]
    chosen, _ = top_k(distances, slots, 6)
    assert sorted(chosen[0].tolist()) == slots.tolist()


def test_unit_rows() -> None:
    rows = unit_rows(np.array([[3.0, 4.0], [0.0, 0.0], [-2.0, 0.0], [1e-30, 0.0]]))
    assert rows.tolist() == [[0.6, 0.8], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]  # a zero row stays zero


@pytest.mark.parametrize(
    ("matrix", "metric", "found"),
    [
        ([[1.0, 2.0], [3.0, 4.0]], "cosine", None),
        ([[1.0, 2.0], [np.nan, 1.0], [0.0, 0.0]], "cosine", (1, "has NaN")),
        ([[np.inf, np.nan]], "l2", (0, "has NaN")),  # NaN is named before infinity within a row
        ([[1.0, 2.0], [1.0, -np.inf]], "dot", (1, "has an infinite value")),
        ([[1.0, 2.0], [0.0, 0.0]], "cosine", (1, "is a zero vector, which has no cosine direction")),
        ([[-0.0, 0.0]], "cosine", (0, "is a zero vector, which has no cosine direction")),
        ([[0.0, 0.0]], "l2", None),  # a zero vector has an l2 and a dot distance
        ([[0.0, 0.0]], "dot", None),
        ([[0.0, 0.0], [np.nan, 0.0]], "cosine", (1, "has NaN")),  # non-finite checked before zero
        ([[1e-45, 0.0]], "cosine", None),  # tiny is not zero
    ],
)
def test_problem_rows(matrix: list[list[float]], metric: str, found: tuple[int, str] | None) -> None:
    assert problem_rows(np.array(matrix, dtype=np.float32), metric) == found


def vector_column(rows: list[list[float] | None], dimension: int = 2) -> pa.Array:
    return pa.array(rows, pa.list_(pa.float32(), dimension))


@pytest.mark.parametrize(
    ("rows", "metric", "message"),
    [
        ([[1.0, 2.0], None], "cosine", "row 101: vector column 'v' is null"),
        ([[1.0, 2.0], [1.0, None]], "l2", "row 101: vector column 'v' holds a null value"),
        ([[1.0, 2.0], [1.0, 1.0], [np.nan, 1.0]], "l2", "row 102: vector column 'v' has NaN"),
        (
            [[0.0, 0.0]],
            "cosine",
            "row 100: vector column 'v' is a zero vector, which has no cosine direction",
        ),
    ],
)
def test_check_vectors_names_the_uploads_row(
    rows: list[list[float] | None], metric: str, message: str
) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_vectors(vector_column(rows), "v", metric, first_row=100)
    assert str(info.value) == message


def test_check_vectors_passes_good_vectors() -> None:
    check_vectors(vector_column([[1.0, 2.0], [0.0, 0.0]]), "v", "l2", first_row=0)
    check_vectors(vector_column([[1.0, 2.0], [0.0, -1.0]]), "v", "cosine", first_row=0)


def test_a_deletion_waits_only_for_the_reads_running_when_it_was_asked() -> None:
    """A deletion (a drop's files, an optimize's old versions) waits for the leases held when it was asked
    for, not for reads started later (they see the change): under steady reads it used to wait until the
    time limit."""
    leases = ReadLeases(max_wait_seconds=60)
    done = threading.Event()
    earlier = leases.hold(["t"])
    assert leases.run_when_unread("t", done.set) is False
    later = leases.hold(["t"])
    earlier.release()
    assert done.wait(5), "the deletion waited for a read started after it"
    later.release()
    now = threading.Event()
    assert leases.run_when_unread("t", now.set) is True and now.is_set()


def test_waiting_deletions_run_at_their_deadline_from_one_thread() -> None:
    """A deletion whose reads never end runs after ``max_wait_seconds``; many waiting deletions are
    watched by one thread (a timer thread each, alive for the whole wait, piled up under steady optimizes:
    +36 threads in the soak)."""
    leases = ReadLeases(max_wait_seconds=0.5)
    before = threading.active_count()
    held = leases.hold(["t"])
    done = [threading.Event() for _ in range(40)]
    for event in done:
        assert leases.run_when_unread("t", event.set) is False
    assert threading.active_count() <= before + 1
    assert all(event.wait(5) for event in done), "a deletion did not run at its deadline"
    early = threading.Event()
    assert leases.run_when_unread("t", early.set) is False
    held.release()
    assert early.wait(5)
