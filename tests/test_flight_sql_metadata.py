"""The Flight SQL metadata results: the specification's schemas, its filters and orders, SqlInfo values."""

from __future__ import annotations

import itertools
import re
import time

import duckdb
import pyarrow as pa
import pytest

import flight_lakehouse
from flight_lakehouse import flight_sql_metadata as md
from flight_lakehouse import flight_sql_pb2 as pb

# -- the result schemas, transcribed from the comments of format/FlightSql.proto ----------------------------


def utf8(name: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, pa.string(), nullable)


def int32(name: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, pa.int32(), nullable)


SPEC_CATALOGS = pa.schema([utf8("catalog_name", False)])
SPEC_DB_SCHEMAS = pa.schema([utf8("catalog_name"), utf8("db_schema_name", False)])
SPEC_TABLES = pa.schema(
    [utf8("catalog_name"), utf8("db_schema_name"), utf8("table_name", False), utf8("table_type", False)]
)
SPEC_TABLES_WITH_SCHEMA = pa.schema([*SPEC_TABLES, pa.field("table_schema", pa.binary(), False)])
SPEC_TABLE_TYPES = pa.schema([utf8("table_type", False)])
SPEC_PRIMARY_KEYS = pa.schema(
    [
        utf8("catalog_name"),
        utf8("db_schema_name"),
        utf8("table_name", False),
        utf8("column_name", False),
        utf8("key_name"),
        int32("key_sequence", False),
    ]
)
SPEC_FOREIGN_KEYS = pa.schema(
    [
        utf8("pk_catalog_name"),
        utf8("pk_db_schema_name"),
        utf8("pk_table_name", False),
        utf8("pk_column_name", False),
        utf8("fk_catalog_name"),
        utf8("fk_db_schema_name"),
        utf8("fk_table_name", False),
        utf8("fk_column_name", False),
        int32("key_sequence", False),
        utf8("fk_key_name"),
        utf8("pk_key_name"),
        pa.field("update_rule", pa.uint8(), False),
        pa.field("delete_rule", pa.uint8(), False),
    ]
)
SPEC_SQL_INFO_VALUE = pa.dense_union(
    [
        utf8("string_value"),
        pa.field("bool_value", pa.bool_()),
        pa.field("bigint_value", pa.int64()),
        int32("int32_bitmask"),
        pa.field("string_list", pa.list_(utf8("string_data"))),
        pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(int32("$data$")))),
    ],
    [0, 1, 2, 3, 4, 5],
)
SPEC_SQL_INFO = pa.schema([pa.field("info_name", pa.uint32(), False), pa.field("value", SPEC_SQL_INFO_VALUE)])
SPEC_XDBC_TYPE_INFO = pa.schema(
    [
        utf8("type_name", False),
        int32("data_type", False),
        int32("column_size"),
        utf8("literal_prefix"),
        utf8("literal_suffix"),
        pa.field("create_params", pa.list_(utf8("item", False))),
        int32("nullable", False),
        pa.field("case_sensitive", pa.bool_(), False),
        int32("searchable", False),
        pa.field("unsigned_attribute", pa.bool_()),
        pa.field("fixed_prec_scale", pa.bool_(), False),
        pa.field("auto_increment", pa.bool_()),
        utf8("local_type_name"),
        int32("minimum_scale"),
        int32("maximum_scale"),
        int32("sql_data_type", False),
        int32("datetime_subcode"),
        int32("num_prec_radix"),
        int32("interval_precision"),
    ]
)


def field_names(data_type: pa.DataType) -> list[str]:
    """Every field name nested in ``data_type``, depth first (type equality may not compare them)."""
    names = []
    for index in range(data_type.num_fields):
        child = data_type.field(index)
        names += [child.name, *field_names(child.type)]
    return names


def assert_spec_schema(actual: pa.Schema, expected: pa.Schema) -> None:
    assert actual.equals(expected), f"\n{actual}\n!=\n{expected}"
    for got, want in zip(actual, expected, strict=True):
        assert (got.nullable, field_names(got.type)) == (want.nullable, field_names(want.type)), got.name


TABLE_SCHEMA = pa.schema([pa.field("id", pa.int64(), False), pa.field("name", pa.string())])
TABLES = [
    md.TableEntry("lake", "main", "trips", "TABLE", TABLE_SCHEMA),
    ("lake", "main", "trip_stats", "VIEW", TABLE_SCHEMA),
    ("lake", "raw", "trips_2024", "TABLE", TABLE_SCHEMA),
    ("lake", "raw", "100%_done", "TABLE", TABLE_SCHEMA),
    ("other", "main", "trips", "TABLE", TABLE_SCHEMA),
    (None, None, "loose", "TABLE", TABLE_SCHEMA),
]


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (md.get_catalogs(["lake"]), SPEC_CATALOGS),
        (md.get_catalogs([]), SPEC_CATALOGS),
        (md.get_db_schemas([("lake", "main")]), SPEC_DB_SCHEMAS),
        (md.get_db_schemas([]), SPEC_DB_SCHEMAS),
        (md.get_tables(TABLES), SPEC_TABLES),
        (md.get_tables([]), SPEC_TABLES),
        (md.get_tables(TABLES, include_schema=True), SPEC_TABLES_WITH_SCHEMA),
        (md.get_tables([], include_schema=True), SPEC_TABLES_WITH_SCHEMA),
        (md.get_table_types(["TABLE"]), SPEC_TABLE_TYPES),
        (md.get_primary_keys(), SPEC_PRIMARY_KEYS),
        (md.get_exported_keys(), SPEC_FOREIGN_KEYS),
        (md.get_imported_keys(), SPEC_FOREIGN_KEYS),
        (md.get_cross_reference(), SPEC_FOREIGN_KEYS),
        (md.get_sql_info(md.default_sql_info()), SPEC_SQL_INFO),
        (md.get_sql_info({}), SPEC_SQL_INFO),
        (md.get_xdbc_type_info(), SPEC_XDBC_TYPE_INFO),
        (md.get_xdbc_type_info(pb.XDBC_WCHAR), SPEC_XDBC_TYPE_INFO),
    ],
)
def test_results_have_the_specifications_schema(table: pa.Table, expected: pa.Schema) -> None:
    assert_spec_schema(table.schema, expected)
    table.validate(full=True)


def test_schema_constants_are_the_specifications() -> None:
    assert_spec_schema(md.tables_schema(include_schema=False), SPEC_TABLES)
    assert_spec_schema(md.tables_schema(include_schema=True), SPEC_TABLES_WITH_SCHEMA)
    assert_spec_schema(md.SQL_INFO_SCHEMA, SPEC_SQL_INFO)
    assert_spec_schema(md.XDBC_TYPE_INFO_SCHEMA, SPEC_XDBC_TYPE_INFO)


def test_key_results_are_empty() -> None:
    assert all(
        table.num_rows == 0
        for table in (
            md.get_primary_keys(),
            md.get_exported_keys(),
            md.get_imported_keys(),
            md.get_cross_reference(),
        )
    )


# -- LIKE patterns ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "value", "matches"),
    [
        ("%", "", True),
        ("%", "anything", True),
        ("", "", True),
        ("", "x", False),
        ("trips", "trips", True),
        ("trips", "trips_2024", False),  # the whole name must match
        ("trip%", "trips_2024", True),
        ("%2024", "trips_2024", True),
        ("%ips%", "trips_2024", True),
        ("t_ips", "trips", True),
        ("t_ips", "tips", False),  # '_' is exactly one character
        ("t___ps", "trips", False),
        ("Trips", "trips", False),  # LIKE is case-sensitive
        ("trips\\_2024", "trips_2024", True),  # escaped '_' is literal
        ("trips\\_2024", "tripsX2024", False),
        ("100\\%%", "100%_done", True),  # escaped '%' is literal, the next one a wildcard
        ("100\\%", "1000", False),
        ("a\\\\b", "a\\b", True),  # an escaped escape is a literal backslash
        ("a\\", "a\\", True),  # a trailing escape stands for itself
        ("a.c", "abc", False),  # regular expression characters are literal
        ("a*", "aaa", False),
        ("[ab]", "a", False),
        ("a%", "a\nb", True),  # '%' spans newlines
    ],
)
def test_like_semantics(pattern: str, value: str, matches: bool) -> None:
    assert md.like(value, pattern) is matches


def regex_like(value: str, pattern: str) -> bool:
    """A straightforward LIKE (escape ``\\``) through a regular expression, to check ``md.like`` against."""
    regex, chars = "", iter(pattern)
    for char in chars:
        if char == "\\":
            regex += re.escape(next(chars, "\\"))
        else:
            regex += {"%": ".*", "_": "."}.get(char) or re.escape(char)
    return re.fullmatch(regex, value, re.DOTALL) is not None


def strings(alphabet: str, longest: int) -> list[str]:
    return [
        "".join(chars) for size in range(longest + 1) for chars in itertools.product(alphabet, repeat=size)
    ]


def test_like_agrees_with_a_regular_expression_on_every_small_case() -> None:
    values = strings("ab%_", 4)
    mismatches = [
        (pattern, value)
        for pattern in strings("a%_\\", 4)
        for value in values
        if md.like(value, pattern) != regex_like(value, pattern)
    ]
    assert not mismatches[:10]


def test_like_stays_fast_on_hostile_patterns() -> None:
    started = time.perf_counter()
    assert not md.like("a" * 2_000, "%a" * 200 + "%b")
    assert md.like("a" * 2_000 + "b", "%a" * 200 + "%b")
    assert time.perf_counter() - started < 5


def test_like_without_escape_character() -> None:
    assert md.like("a\\b", "a\\_", escape=None)
    assert not md.like("a_", "a\\_", escape=None)


# -- catalogs, schemas, tables, table types -----------------------------------------------------------------


def test_catalogs_are_distinct_and_ordered() -> None:
    assert md.get_catalogs(["zeta", "lake", "zeta"]).column("catalog_name").to_pylist() == ["lake", "zeta"]


def test_table_types_are_distinct_and_ordered() -> None:
    table = md.get_table_types(["VIEW", "TABLE", "VIEW"])
    assert table.column("table_type").to_pylist() == ["TABLE", "VIEW"]


DB_SCHEMAS = [("lake", "raw"), ("lake", "main"), ("other", "main"), (None, "loose"), ("lake", "main")]


@pytest.mark.parametrize(
    ("catalog", "pattern", "expected"),
    [
        (None, None, [(None, "loose"), ("lake", "main"), ("lake", "raw"), ("other", "main")]),
        ("lake", None, [("lake", "main"), ("lake", "raw")]),
        ("", None, [(None, "loose")]),  # the empty catalog selects schemas without one
        ("nowhere", None, []),
        (None, "ma%", [("lake", "main"), ("other", "main")]),
        ("lake", "r_w", [("lake", "raw")]),
    ],
)
def test_db_schemas_filter_and_order(catalog, pattern, expected) -> None:
    table = md.get_db_schemas(DB_SCHEMAS, catalog=catalog, db_schema_filter_pattern=pattern)
    assert list(zip(*table.to_pydict().values(), strict=True)) == expected


def table_names(table: pa.Table) -> list[tuple]:
    return list(zip(*(table.column(name).to_pylist() for name in SPEC_TABLES.names), strict=True))


def test_tables_are_ordered_by_catalog_schema_name_and_type() -> None:
    assert table_names(md.get_tables(TABLES)) == [
        (None, None, "loose", "TABLE"),
        ("lake", "main", "trip_stats", "VIEW"),
        ("lake", "main", "trips", "TABLE"),
        ("lake", "raw", "100%_done", "TABLE"),
        ("lake", "raw", "trips_2024", "TABLE"),
        ("other", "main", "trips", "TABLE"),
    ]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"catalog": "lake"}, ["trip_stats", "trips", "100%_done", "trips_2024"]),
        ({"catalog": ""}, ["loose"]),
        ({"db_schema_filter_pattern": "raw"}, ["100%_done", "trips_2024"]),
        (
            {"db_schema_filter_pattern": "%"},
            ["loose", "trip_stats", "trips", "100%_done", "trips_2024", "trips"],
        ),
        ({"table_name_filter_pattern": "trips"}, ["trips", "trips"]),
        ({"table_name_filter_pattern": "trip%"}, ["trip_stats", "trips", "trips_2024", "trips"]),
        ({"table_name_filter_pattern": "trip\\_%"}, ["trip_stats"]),
        ({"table_name_filter_pattern": "100\\%%"}, ["100%_done"]),
        ({"table_name_filter_pattern": "trips____"}, []),
        ({"table_name_filter_pattern": "trips_____"}, ["trips_2024"]),
        ({"table_types": ["VIEW"]}, ["trip_stats"]),
        ({"table_types": ["VIEW", "TABLE"], "catalog": "other"}, ["trips"]),
        ({"table_types": ["SYSTEM TABLE"]}, []),
        ({"catalog": "lake", "db_schema_filter_pattern": "m%", "table_types": ["TABLE"]}, ["trips"]),
    ],
)
def test_tables_filters(filters: dict, expected: list[str]) -> None:
    assert md.get_tables(TABLES, **filters).column("table_name").to_pylist() == expected


def test_tables_include_each_tables_ipc_schema() -> None:
    table = md.get_tables(TABLES, table_name_filter_pattern="loose", include_schema=True)
    (serialized,) = table.column("table_schema").to_pylist()
    assert pa.ipc.read_schema(pa.py_buffer(serialized)).equals(TABLE_SCHEMA)


def test_tables_without_an_arrow_schema_cannot_include_it() -> None:
    assert md.get_tables([("lake", "main", "t", "TABLE")]).num_rows == 1
    with pytest.raises(ValueError, match="'t' has no Arrow schema"):
        md.get_tables([("lake", "main", "t", "TABLE")], include_schema=True)


# -- SQL info -----------------------------------------------------------------------------------------------

STRING, BOOL, BIGINT, INT32, STRING_LIST, INT32_MAP = range(6)


def sql_info(table: pa.Table) -> dict[int, tuple[int, object]]:
    """``info_name`` -> (union type code, Python value) of a CommandGetSqlInfo result."""
    values = table.column("value").combine_chunks()
    codes = values.type_codes.to_pylist()
    return {
        name: (code, value)
        for name, code, value in zip(
            table.column("info_name").to_pylist(), codes, values.to_pylist(), strict=True
        )
    }


@pytest.fixture(scope="module")
def duckdb_keywords() -> list[str]:
    return [row[0] for row in duckdb.sql("select keyword_name from duckdb_keywords()").fetchall()]


@pytest.fixture(scope="module")
def all_info(duckdb_keywords: list[str]) -> dict[int, tuple[int, object]]:
    return sql_info(md.get_sql_info(md.default_sql_info(duckdb_keywords, statement_timeout_ms=30_000)))


def test_sql_info_server_identity(all_info) -> None:
    assert all_info[pb.FLIGHT_SQL_SERVER_NAME] == (STRING, "flight-lakehouse")
    assert all_info[pb.FLIGHT_SQL_SERVER_VERSION] == (STRING, flight_lakehouse.__version__)
    assert all_info[pb.FLIGHT_SQL_SERVER_ARROW_VERSION] == (STRING, pa.__version__)
    assert all_info[pb.FLIGHT_SQL_SERVER_READ_ONLY] == (BOOL, True)
    assert all_info[pb.FLIGHT_SQL_SERVER_SQL] == (BOOL, True)
    assert all_info[pb.FLIGHT_SQL_SERVER_SUBSTRAIT] == (BOOL, False)
    assert all_info[pb.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT] == (INT32, 30_000)


def test_sql_info_no_transactions(all_info) -> None:
    assert all_info[pb.FLIGHT_SQL_SERVER_TRANSACTION] == (INT32, pb.SQL_SUPPORTED_TRANSACTION_NONE)
    assert all_info[pb.SQL_TRANSACTIONS_SUPPORTED] == (BOOL, False)
    assert all_info[pb.SQL_DEFAULT_TRANSACTION_ISOLATION] == (INT32, pb.SQL_TRANSACTION_NONE)
    assert all_info[pb.SQL_SAVEPOINTS_SUPPORTED] == (BOOL, False)


def test_sql_info_duckdb_dialect(all_info, duckdb_keywords) -> None:
    assert all_info[pb.SQL_KEYWORDS] == (STRING_LIST, duckdb_keywords)
    assert "select" in duckdb_keywords
    assert all_info[pb.SQL_IDENTIFIER_QUOTE_CHAR] == (STRING, '"')
    assert all_info[pb.SQL_IDENTIFIER_CASE] == (INT32, pb.SQL_CASE_SENSITIVITY_CASE_INSENSITIVE)
    assert all_info[pb.SQL_QUOTED_IDENTIFIER_CASE][0] == INT32
    assert all_info[pb.SQL_SEARCH_STRING_ESCAPE] == (STRING, md.SEARCH_STRING_ESCAPE)
    assert all_info[pb.SQL_NULL_ORDERING] == (INT32, pb.SQL_NULLS_SORTED_AT_END)
    assert all_info[pb.SQL_DDL_TABLE] == (BOOL, False)
    assert all_info[pb.SQL_SUPPORTED_UNIONS] == (INT32, 0b11)
    assert all_info[pb.SQL_SUPPORTED_GROUP_BY] == (INT32, 0b11)
    assert all_info[pb.SQL_MAX_STATEMENT_LENGTH] == (BIGINT, 0)


def test_sql_info_conversions_are_an_int32_list_map(all_info) -> None:
    code, pairs = all_info[pb.SQL_SUPPORTS_CONVERT]
    conversions = dict(pairs)
    assert code == INT32_MAP
    assert pb.SQL_CONVERT_INTEGER in conversions[pb.SQL_CONVERT_VARCHAR]
    assert pb.SQL_CONVERT_VARCHAR in conversions[pb.SQL_CONVERT_TIMESTAMP]
    assert pb.SQL_CONVERT_DATE not in conversions[pb.SQL_CONVERT_INTEGER]


#: The value kind of each SqlInfo id, as the specification's comments state it.
SPEC_INT32_INFOS = {
    pb.FLIGHT_SQL_SERVER_TRANSACTION,
    pb.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT,
    pb.FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT,
    pb.SQL_IDENTIFIER_CASE,
    pb.SQL_QUOTED_IDENTIFIER_CASE,
    pb.SQL_NULL_ORDERING,
    pb.SQL_SUPPORTED_GROUP_BY,
    pb.SQL_SUPPORTED_GRAMMAR,
    pb.SQL_ANSI92_SUPPORTED_LEVEL,
    pb.SQL_OUTER_JOINS_SUPPORT_LEVEL,
    pb.SQL_SCHEMAS_SUPPORTED_ACTIONS,
    pb.SQL_CATALOGS_SUPPORTED_ACTIONS,
    pb.SQL_SUPPORTED_POSITIONED_COMMANDS,
    pb.SQL_SUPPORTED_SUBQUERIES,
    pb.SQL_SUPPORTED_UNIONS,
    pb.SQL_DEFAULT_TRANSACTION_ISOLATION,
    pb.SQL_SUPPORTED_TRANSACTIONS_ISOLATION_LEVELS,
    pb.SQL_SUPPORTED_RESULT_SET_TYPES,
    *range(pb.SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_UNSPECIFIED, pb.SQL_BATCH_UPDATES_SUPPORTED),
}
SPEC_STRING_INFOS = {
    *range(pb.FLIGHT_SQL_SERVER_NAME, pb.FLIGHT_SQL_SERVER_READ_ONLY),
    pb.FLIGHT_SQL_SERVER_SUBSTRAIT_MIN_VERSION,
    pb.FLIGHT_SQL_SERVER_SUBSTRAIT_MAX_VERSION,
    pb.SQL_IDENTIFIER_QUOTE_CHAR,
    pb.SQL_SEARCH_STRING_ESCAPE,
    pb.SQL_EXTRA_NAME_CHARACTERS,
    pb.SQL_SCHEMA_TERM,
    pb.SQL_PROCEDURE_TERM,
    pb.SQL_CATALOG_TERM,
}
SPEC_STRING_LIST_INFOS = set(range(pb.SQL_KEYWORDS, pb.SQL_SEARCH_STRING_ESCAPE))
SPEC_BIGINT_INFOS = set(range(pb.SQL_MAX_BINARY_LITERAL_LENGTH, pb.SQL_DEFAULT_TRANSACTION_ISOLATION)) - {
    pb.SQL_MAX_ROW_SIZE_INCLUDES_BLOBS
}
SPEC_MAP_INFOS = {pb.SQL_SUPPORTS_CONVERT}


def spec_kind(info_id: int) -> int:
    kinds = [
        (SPEC_INT32_INFOS, INT32),
        (SPEC_STRING_INFOS, STRING),
        (SPEC_STRING_LIST_INFOS, STRING_LIST),
        (SPEC_BIGINT_INFOS, BIGINT),
        (SPEC_MAP_INFOS, INT32_MAP),
    ]
    return next((kind for ids, kind in kinds if info_id in ids), BOOL)


def test_every_sql_info_value_has_the_specifications_kind(all_info) -> None:
    kinds = {pb.SqlInfo.Name(info_id): code for info_id, (code, _) in all_info.items()}
    assert kinds == {name: spec_kind(pb.SqlInfo.Value(name)) for name in kinds}
    assert set(all_info) <= set(pb.SqlInfo.values())


def test_sql_info_filters_by_requested_ids_in_request_order() -> None:
    values = md.default_sql_info(["select"])
    requested = [pb.SQL_KEYWORDS, pb.FLIGHT_SQL_SERVER_NAME, 99_999, pb.SQL_KEYWORDS, pb.SQL_DDL_CATALOG]
    table = md.get_sql_info(values, requested)
    assert table.column("info_name").to_pylist() == requested[:2] + requested[-1:]
    assert table.column("value").to_pylist() == [["select"], "flight-lakehouse", False]


def test_sql_info_without_ids_returns_every_value_in_id_order() -> None:
    values = md.default_sql_info()
    table = md.get_sql_info(values)
    assert table.column("info_name").to_pylist() == sorted(values)


def test_sql_info_custom_ids_and_value_kinds() -> None:
    values = {
        10_000: md.Int32(7),
        10_001: 7,
        10_002: True,
        10_003: ("a", "b"),
        10_004: {1: [2, 3]},
        10_005: "",
    }
    assert sql_info(md.get_sql_info(values)) == {
        10_000: (INT32, 7),
        10_001: (BIGINT, 7),
        10_002: (BOOL, True),
        10_003: (STRING_LIST, ["a", "b"]),
        10_004: (INT32_MAP, [(1, [2, 3])]),
        10_005: (STRING, ""),
    }
    with pytest.raises(TypeError, match="not a SqlInfo value"):
        md.get_sql_info({10_006: 1.5})


def test_sql_info_survives_ipc() -> None:
    table = md.get_sql_info(md.default_sql_info(["select", "from"]))
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    assert pa.ipc.open_stream(sink.getvalue()).read_all().equals(table)


def test_bitmask_sets_one_bit_per_enum_value() -> None:
    assert md.bitmask() == 0
    assert md.bitmask(pb.SQL_UNION, pb.SQL_UNION_ALL) == 0b11
    assert md.bitmask(pb.SQL_TRANSACTION_SERIALIZABLE) == 0b10000
    assert isinstance(md.bitmask(1), md.Int32)


# -- XDBC type info -----------------------------------------------------------------------------------------


def test_xdbc_types_are_ordered_by_data_type_then_name() -> None:
    table = md.get_xdbc_type_info()
    keys = list(
        zip(table.column("data_type").to_pylist(), table.column("type_name").to_pylist(), strict=True)
    )
    assert keys == sorted(keys)
    assert {"BOOLEAN", "BIGINT", "DOUBLE", "DECIMAL", "VARCHAR", "BLOB", "DATE", "TIMESTAMP"} <= {
        name for _, name in keys
    }


def test_xdbc_type_info_filters_by_data_type() -> None:
    table = md.get_xdbc_type_info(pb.XDBC_BIGINT)
    assert table.column("type_name").to_pylist() == ["BIGINT", "UBIGINT"]
    assert table.column("unsigned_attribute").to_pylist() == [False, True]
    assert md.get_xdbc_type_info(pb.XDBC_WCHAR).num_rows == 0


def test_xdbc_datetime_types_use_the_generic_sql_data_type() -> None:
    rows = {row["type_name"]: row for row in md.get_xdbc_type_info().to_pylist()}
    assert rows["DATE"]["data_type"] == pb.XDBC_DATE
    assert rows["DATE"]["sql_data_type"] == pb.XDBC_DATETIME
    assert rows["DATE"]["datetime_subcode"] == pb.XDBC_SUBCODE_DATE
    assert rows["TIMESTAMPTZ"]["datetime_subcode"] == pb.XDBC_SUBCODE_TIMESTAMP_WITH_TIMEZONE
    assert rows["INTEGER"]["sql_data_type"] == pb.XDBC_INTEGER
    assert rows["INTEGER"]["datetime_subcode"] is None
    assert rows["DECIMAL"]["create_params"] == ["precision", "scale"]
    assert rows["DOUBLE"]["num_prec_radix"] == 2
    assert rows["VARCHAR"]["case_sensitive"] is True


def test_xdbc_type_names_are_duckdb_types() -> None:
    for name in md.get_xdbc_type_info().column("type_name").to_pylist():
        duckdb.sql(f"select cast(null as {name})").fetchall()
