"""The Arrow results of the Flight SQL metadata commands, as pure functions of plain Python inputs.

Every schema is the one the Flight SQL specification (``schemas/FlightSql.proto``) gives in the comment of
its command; the functions filter and order rows as the specification says. Nothing here touches a server,
a catalog or DuckDB: the server gathers the catalogs, schemas, tables and keywords and passes them in.
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import pyarrow as pa

from flight_lakehouse import __version__
from flight_lakehouse import flight_sql_pb2 as pb

#: The escape character of catalog search patterns (reported as ``SQL_SEARCH_STRING_ESCAPE``).
SEARCH_STRING_ESCAPE = "\\"

# ---------------------------------------------------------------------------------------------------------
# Result schemas, field for field as the specification's comments give them
# ---------------------------------------------------------------------------------------------------------


def _utf8(name: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, pa.utf8(), nullable=nullable)


def _int32(name: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, pa.int32(), nullable=nullable)


def _bool(name: str, nullable: bool = True) -> pa.Field:
    return pa.field(name, pa.bool_(), nullable=nullable)


CATALOGS_SCHEMA = pa.schema([_utf8("catalog_name", nullable=False)])

DB_SCHEMAS_SCHEMA = pa.schema([_utf8("catalog_name"), _utf8("db_schema_name", nullable=False)])

TABLES_SCHEMA = pa.schema(
    [
        _utf8("catalog_name"),
        _utf8("db_schema_name"),
        _utf8("table_name", nullable=False),
        _utf8("table_type", nullable=False),
    ]
)

#: ``TABLES_SCHEMA`` plus the IPC-serialized Arrow schema of each table (``include_schema``).
TABLES_WITH_SCHEMA_SCHEMA = TABLES_SCHEMA.append(pa.field("table_schema", pa.binary(), nullable=False))

TABLE_TYPES_SCHEMA = pa.schema([_utf8("table_type", nullable=False)])


def _key_column_fields(prefix: str = "") -> list[pa.Field]:
    """The catalog, schema, table and column of one side of a key, names prefixed by ``prefix``."""
    return [
        _utf8(f"{prefix}catalog_name"),
        _utf8(f"{prefix}db_schema_name"),
        _utf8(f"{prefix}table_name", nullable=False),
        _utf8(f"{prefix}column_name", nullable=False),
    ]


PRIMARY_KEYS_SCHEMA = pa.schema(
    [*_key_column_fields(), _utf8("key_name"), _int32("key_sequence", nullable=False)]
)

#: The one schema of CommandGetExportedKeys, CommandGetImportedKeys and CommandGetCrossReference.
FOREIGN_KEYS_SCHEMA = pa.schema(
    [
        *_key_column_fields("pk_"),
        *_key_column_fields("fk_"),
        _int32("key_sequence", nullable=False),
        _utf8("fk_key_name"),
        _utf8("pk_key_name"),
        pa.field("update_rule", pa.uint8(), nullable=False),
        pa.field("delete_rule", pa.uint8(), nullable=False),
    ]
)

#: The members of the ``value`` dense union of CommandGetSqlInfo; a member's type code is its index.
SQL_INFO_VALUE_FIELDS = (
    _utf8("string_value"),
    _bool("bool_value"),
    pa.field("bigint_value", pa.int64()),
    _int32("int32_bitmask"),
    pa.field("string_list", pa.list_(_utf8("string_data"))),
    pa.field("int32_to_int32_list_map", pa.map_(pa.int32(), pa.list_(_int32("$data$")))),
)
STRING_VALUE, BOOL_VALUE, BIGINT_VALUE, INT32_BITMASK, STRING_LIST, INT32_TO_INT32_LIST_MAP = range(
    len(SQL_INFO_VALUE_FIELDS)
)

SQL_INFO_VALUE_TYPE = pa.dense_union(list(SQL_INFO_VALUE_FIELDS), list(range(len(SQL_INFO_VALUE_FIELDS))))

SQL_INFO_SCHEMA = pa.schema(
    [pa.field("info_name", pa.uint32(), nullable=False), pa.field("value", SQL_INFO_VALUE_TYPE)]
)

XDBC_TYPE_INFO_SCHEMA = pa.schema(
    [
        _utf8("type_name", nullable=False),
        _int32("data_type", nullable=False),
        _int32("column_size"),
        _utf8("literal_prefix"),
        _utf8("literal_suffix"),
        pa.field("create_params", pa.list_(_utf8("item", nullable=False))),
        _int32("nullable", nullable=False),
        _bool("case_sensitive", nullable=False),
        _int32("searchable", nullable=False),
        _bool("unsigned_attribute"),
        _bool("fixed_prec_scale", nullable=False),
        _bool("auto_increment"),
        _utf8("local_type_name"),
        _int32("minimum_scale"),
        _int32("maximum_scale"),
        _int32("sql_data_type", nullable=False),
        _int32("datetime_subcode"),
        _int32("num_prec_radix"),
        _int32("interval_precision"),
    ]
)


def tables_schema(include_schema: bool) -> pa.Schema:
    """The result schema of CommandGetTables, with or without its ``table_schema`` column."""
    return TABLES_WITH_SCHEMA_SCHEMA if include_schema else TABLES_SCHEMA


# ---------------------------------------------------------------------------------------------------------
# Search patterns and filters
# ---------------------------------------------------------------------------------------------------------


class Wildcard(enum.Enum):
    """The two wildcards of an SQL LIKE pattern."""

    ANY_RUN = "%"  # any run of characters, the empty one included
    ANY_ONE = "_"  # exactly one character


@functools.lru_cache(maxsize=256)
def like_tokens(pattern: str, escape: str | None = SEARCH_STRING_ESCAPE) -> tuple[str | Wildcard, ...]:
    """An SQL LIKE pattern as literal characters and wildcards.

    ``escape`` followed by any character stands for that character itself (``\\%`` a literal percent sign);
    an escape at the very end stands for itself.
    """
    tokens: list[str | Wildcard] = []
    chars = iter(pattern)
    for char in chars:
        if escape is not None and char == escape:
            tokens.append(next(chars, escape))
        elif char in ("%", "_"):
            tokens.append(Wildcard(char))
        else:
            tokens.append(char)
    return tuple(tokens)


def like(value: str, pattern: str, escape: str | None = SEARCH_STRING_ESCAPE) -> bool:
    """Whether the whole of ``value`` matches the SQL LIKE ``pattern`` (case-sensitively, as LIKE does).

    Greedy matching that backtracks only to the last ``%``: O(len(value) * len(pattern)) at worst, so no
    client's pattern can make a search explode the way a backtracking regular expression can.
    """
    tokens = like_tokens(pattern, escape)
    position = token = 0
    last_run, resume = -1, 0  # the last % seen, and where in value its run ends so far
    while position < len(value):
        current = tokens[token] if token < len(tokens) else None
        if current is Wildcard.ANY_RUN:
            last_run, resume, token = token, position, token + 1
        elif current is Wildcard.ANY_ONE or (current is not None and current == value[position]):
            position, token = position + 1, token + 1
        elif last_run >= 0:
            resume += 1
            position, token = resume, last_run + 1
        else:
            return False
    return all(rest is Wildcard.ANY_RUN for rest in tokens[token:])


def _catalog_matches(catalog: str | None, wanted: str | None) -> bool:
    """The specification's catalog / schema filter: unset matches all, ``""`` those without one."""
    return wanted is None or (catalog or "") == wanted


def _pattern_matches(name: str | None, pattern: str | None) -> bool:
    """An unset pattern matches all names; a missing name is matched as ``""``."""
    return pattern is None or like(name or "", pattern)


def _nulls_first(*names: str | None) -> tuple[tuple[bool, str], ...]:
    """A sort key over optional names that puts missing ones first."""
    return tuple((name is not None, name or "") for name in names)


# ---------------------------------------------------------------------------------------------------------
# Catalog metadata
# ---------------------------------------------------------------------------------------------------------


class TableEntry(NamedTuple):
    """One table as the server knows it; ``schema`` is needed only for ``include_schema``."""

    catalog: str | None
    db_schema: str | None
    name: str
    table_type: str
    schema: pa.Schema | None = None


def get_catalogs(catalogs: Iterable[str]) -> pa.Table:
    """CommandGetCatalogs: the distinct catalog names, ordered."""
    return pa.table({"catalog_name": sorted(set(catalogs))}, schema=CATALOGS_SCHEMA)


def get_db_schemas(
    db_schemas: Iterable[tuple[str | None, str]],
    catalog: str | None = None,
    db_schema_filter_pattern: str | None = None,
) -> pa.Table:
    """CommandGetDbSchemas over ``(catalog, db_schema)`` pairs, filtered and ordered per the specification."""
    rows = sorted(
        {
            (row_catalog, name)
            for row_catalog, name in db_schemas
            if _catalog_matches(row_catalog, catalog) and _pattern_matches(name, db_schema_filter_pattern)
        },
        key=lambda row: _nulls_first(*row),
    )
    columns = list(zip(*rows, strict=True)) if rows else [(), ()]
    return pa.Table.from_arrays([pa.array(column, pa.utf8()) for column in columns], schema=DB_SCHEMAS_SCHEMA)


def _serialized_schema(table: TableEntry) -> bytes:
    if table.schema is None:
        raise ValueError(f"table {table.name!r} has no Arrow schema to include")
    return table.schema.serialize().to_pybytes()


def get_tables(
    tables: Iterable[TableEntry | tuple],
    catalog: str | None = None,
    db_schema_filter_pattern: str | None = None,
    table_name_filter_pattern: str | None = None,
    table_types: Sequence[str] = (),
    include_schema: bool = False,
) -> pa.Table:
    """CommandGetTables: the tables that pass every filter, ordered by catalog, schema, name and type.

    ``table_types`` keeps only those types when non-empty; ``include_schema`` adds each table's Arrow schema
    serialized as an IPC message.
    """
    entries = sorted(
        (
            entry
            for entry in (TableEntry(*table) for table in tables)
            if _catalog_matches(entry.catalog, catalog)
            and _pattern_matches(entry.db_schema, db_schema_filter_pattern)
            and _pattern_matches(entry.name, table_name_filter_pattern)
            and (not table_types or entry.table_type in table_types)
        ),
        key=lambda entry: _nulls_first(entry.catalog, entry.db_schema, entry.name, entry.table_type),
    )
    columns: dict[str, list] = {
        "catalog_name": [entry.catalog for entry in entries],
        "db_schema_name": [entry.db_schema for entry in entries],
        "table_name": [entry.name for entry in entries],
        "table_type": [entry.table_type for entry in entries],
    }
    if include_schema:
        columns["table_schema"] = [_serialized_schema(entry) for entry in entries]
    return pa.table(columns, schema=tables_schema(include_schema))


def get_table_types(table_types: Iterable[str]) -> pa.Table:
    """CommandGetTableTypes: the distinct table types, ordered."""
    return pa.table({"table_type": sorted(set(table_types))}, schema=TABLE_TYPES_SCHEMA)


def get_primary_keys() -> pa.Table:
    """CommandGetPrimaryKeys: lakehouse tables declare no primary keys, so always empty."""
    return PRIMARY_KEYS_SCHEMA.empty_table()


def get_exported_keys() -> pa.Table:
    """CommandGetExportedKeys: lakehouse tables declare no foreign keys, so always empty."""
    return FOREIGN_KEYS_SCHEMA.empty_table()


def get_imported_keys() -> pa.Table:
    """CommandGetImportedKeys: lakehouse tables declare no foreign keys, so always empty."""
    return FOREIGN_KEYS_SCHEMA.empty_table()


def get_cross_reference() -> pa.Table:
    """CommandGetCrossReference: lakehouse tables declare no foreign keys, so always empty."""
    return FOREIGN_KEYS_SCHEMA.empty_table()


# ---------------------------------------------------------------------------------------------------------
# SQL info
# ---------------------------------------------------------------------------------------------------------


class Int32(int):
    """An ``int32_bitmask`` SqlInfo value (enum ordinal or bitmask); a plain ``int`` is a ``bigint_value``."""


SqlInfoValue = str | bool | int | Sequence[str] | Mapping[int, Sequence[int]]


def bitmask(*bits: int) -> Int32:
    """The int32 bitmask with the given enum values' bits set."""
    return Int32(sum(1 << bit for bit in set(bits)))


def _union_member(value: SqlInfoValue) -> int:
    """The dense union member (type code) that holds ``value`` (the first kind it is, in this order)."""
    kinds = (
        (str, STRING_VALUE),
        (bool, BOOL_VALUE),
        (Int32, INT32_BITMASK),
        (int, BIGINT_VALUE),
        (Mapping, INT32_TO_INT32_LIST_MAP),
        (Sequence, STRING_LIST),
    )
    member = next((code for kind, code in kinds if isinstance(value, kind)), None)
    if member is None:
        raise TypeError(f"not a SqlInfo value: {value!r}")
    return member


def _as_arrow_value(value: SqlInfoValue) -> object:
    """``value`` in the form ``pa.array`` takes: maps as key/list pairs, string lists as lists."""
    if isinstance(value, Mapping):
        return [(key, list(items)) for key, items in value.items()]
    if isinstance(value, Sequence) and not isinstance(value, str):
        return list(value)
    return value


def sql_info_values(values: Sequence[SqlInfoValue]) -> pa.UnionArray:
    """The ``value`` column of a CommandGetSqlInfo result: a dense union with one member per value kind."""
    members = [_union_member(value) for value in values]
    children: list[list[object]] = [[] for _ in SQL_INFO_VALUE_FIELDS]
    offsets = []
    for member, value in zip(members, values, strict=True):
        offsets.append(len(children[member]))
        children[member].append(_as_arrow_value(value))
    return pa.UnionArray.from_dense(
        pa.array(members, pa.int8()),
        pa.array(offsets, pa.int32()),
        [pa.array(child, field.type) for child, field in zip(children, SQL_INFO_VALUE_FIELDS, strict=True)],
        [field.name for field in SQL_INFO_VALUE_FIELDS],
        list(range(len(SQL_INFO_VALUE_FIELDS))),
    )


def get_sql_info(values: Mapping[int, SqlInfoValue], info: Sequence[int] = ()) -> pa.Table:
    """CommandGetSqlInfo: the requested info ids that ``values`` knows, in request order (all when none)."""
    ids = list(dict.fromkeys(info)) if info else sorted(values)
    known = [info_id for info_id in ids if info_id in values]
    return pa.Table.from_arrays(
        [pa.array(known, pa.uint32()), sql_info_values([values[info_id] for info_id in known])],
        schema=SQL_INFO_SCHEMA,
    )


_NUMERIC_CONVERSIONS = (
    pb.SQL_CONVERT_BIGINT,
    pb.SQL_CONVERT_BIT,
    pb.SQL_CONVERT_DECIMAL,
    pb.SQL_CONVERT_FLOAT,
    pb.SQL_CONVERT_INTEGER,
    pb.SQL_CONVERT_NUMERIC,
    pb.SQL_CONVERT_REAL,
    pb.SQL_CONVERT_SMALLINT,
    pb.SQL_CONVERT_TINYINT,
)
_TEXT_CONVERSIONS = (pb.SQL_CONVERT_CHAR, pb.SQL_CONVERT_VARCHAR, pb.SQL_CONVERT_LONGVARCHAR)
_BINARY_CONVERSIONS = (pb.SQL_CONVERT_BINARY, pb.SQL_CONVERT_VARBINARY, pb.SQL_CONVERT_LONGVARBINARY)
_TEMPORAL_CONVERSIONS = (pb.SQL_CONVERT_DATE, pb.SQL_CONVERT_TIME, pb.SQL_CONVERT_TIMESTAMP)


def duckdb_conversions() -> dict[int, list[int]]:
    """``SQL_SUPPORTS_CONVERT``: the CASTs DuckDB performs between the SqlSupportsConvert type groups."""
    every_type = _NUMERIC_CONVERSIONS + _TEXT_CONVERSIONS + _BINARY_CONVERSIONS + _TEMPORAL_CONVERSIONS
    targets = {
        **dict.fromkeys(_NUMERIC_CONVERSIONS, _NUMERIC_CONVERSIONS + _TEXT_CONVERSIONS),
        **dict.fromkeys(_TEXT_CONVERSIONS, every_type),
        **dict.fromkeys(_BINARY_CONVERSIONS, _BINARY_CONVERSIONS + _TEXT_CONVERSIONS),
        pb.SQL_CONVERT_DATE: (pb.SQL_CONVERT_DATE, pb.SQL_CONVERT_TIMESTAMP, *_TEXT_CONVERSIONS),
        pb.SQL_CONVERT_TIME: (pb.SQL_CONVERT_TIME, *_TEXT_CONVERSIONS),
        pb.SQL_CONVERT_TIMESTAMP: (*_TEMPORAL_CONVERSIONS, *_TEXT_CONVERSIONS),
    }
    return {source: sorted(to) for source, to in sorted(targets.items())}


_UNLIMITED_OR_UNKNOWN = (
    pb.SQL_MAX_BINARY_LITERAL_LENGTH,
    pb.SQL_MAX_CHAR_LITERAL_LENGTH,
    pb.SQL_MAX_COLUMN_NAME_LENGTH,
    pb.SQL_MAX_COLUMNS_IN_GROUP_BY,
    pb.SQL_MAX_COLUMNS_IN_INDEX,
    pb.SQL_MAX_COLUMNS_IN_ORDER_BY,
    pb.SQL_MAX_COLUMNS_IN_SELECT,
    pb.SQL_MAX_COLUMNS_IN_TABLE,
    pb.SQL_MAX_CONNECTIONS,
    pb.SQL_MAX_CURSOR_NAME_LENGTH,
    pb.SQL_MAX_INDEX_LENGTH,
    pb.SQL_DB_SCHEMA_NAME_LENGTH,
    pb.SQL_MAX_PROCEDURE_NAME_LENGTH,
    pb.SQL_MAX_CATALOG_NAME_LENGTH,
    pb.SQL_MAX_ROW_SIZE,
    pb.SQL_MAX_STATEMENT_LENGTH,
    pb.SQL_MAX_STATEMENTS,
    pb.SQL_MAX_TABLE_NAME_LENGTH,
    pb.SQL_MAX_TABLES_IN_SELECT,
    pb.SQL_MAX_USERNAME_LENGTH,
)

_UNSUPPORTED = (
    pb.FLIGHT_SQL_SERVER_SUBSTRAIT,
    pb.FLIGHT_SQL_SERVER_CANCEL,
    pb.FLIGHT_SQL_SERVER_BULK_INGESTION,
    pb.FLIGHT_SQL_SERVER_INGEST_TRANSACTIONS_SUPPORTED,
    pb.SQL_SUPPORTS_DIFFERENT_TABLE_CORRELATION_NAMES,
    pb.SQL_SUPPORTS_INTEGRITY_ENHANCEMENT_FACILITY,
    pb.SQL_SELECT_FOR_UPDATE_SUPPORTED,
    pb.SQL_STORED_PROCEDURES_SUPPORTED,
    pb.SQL_MAX_ROW_SIZE_INCLUDES_BLOBS,
    pb.SQL_TRANSACTIONS_SUPPORTED,
    pb.SQL_DATA_DEFINITION_CAUSES_TRANSACTION_COMMIT,
    pb.SQL_DATA_DEFINITIONS_IN_TRANSACTIONS_IGNORED,
    pb.SQL_BATCH_UPDATES_SUPPORTED,
    pb.SQL_SAVEPOINTS_SUPPORTED,
    pb.SQL_NAMED_PARAMETERS_SUPPORTED,
    pb.SQL_LOCATORS_UPDATE_COPY,
    pb.SQL_STORED_FUNCTIONS_USING_CALL_SYNTAX_SUPPORTED,
)

_SUPPORTED = (
    pb.FLIGHT_SQL_SERVER_SQL,
    pb.SQL_ALL_TABLES_ARE_SELECTABLE,
    pb.SQL_SUPPORTS_COLUMN_ALIASING,
    pb.SQL_NULL_PLUS_NULL_IS_NULL,
    pb.SQL_SUPPORTS_TABLE_CORRELATION_NAMES,
    pb.SQL_SUPPORTS_EXPRESSIONS_IN_ORDER_BY,
    pb.SQL_SUPPORTS_ORDER_BY_UNRELATED,
    pb.SQL_SUPPORTS_LIKE_ESCAPE_CLAUSE,
    pb.SQL_SUPPORTS_NON_NULLABLE_COLUMNS,
    pb.SQL_CORRELATED_SUBQUERIES_SUPPORTED,
    pb.SQL_CATALOG_AT_START,
)


def default_sql_info(
    keywords: Sequence[str] = (),
    *,
    server_version: str = __version__,
    read_only: bool = True,
    statement_timeout_ms: int = 0,
) -> dict[int, SqlInfoValue]:
    """The SqlInfo values of flight-lakehouse: a read-only DuckDB dialect without transactions.

    ``keywords`` are the engine's SQL keywords (e.g. DuckDB's ``duckdb_keywords()``); the caller may add or
    replace entries (function lists, ids from 10,000 up) in the returned dict before ``get_sql_info``.
    """
    values: dict[int, SqlInfoValue] = {
        **dict.fromkeys(_SUPPORTED, True),
        **dict.fromkeys(_UNSUPPORTED, False),
        **dict.fromkeys(_UNLIMITED_OR_UNKNOWN, 0),
        **dict.fromkeys((pb.SQL_DDL_CATALOG, pb.SQL_DDL_SCHEMA, pb.SQL_DDL_TABLE), not read_only),
        pb.FLIGHT_SQL_SERVER_NAME: "flight-lakehouse",
        pb.FLIGHT_SQL_SERVER_VERSION: server_version,
        pb.FLIGHT_SQL_SERVER_ARROW_VERSION: pa.__version__,
        pb.FLIGHT_SQL_SERVER_READ_ONLY: read_only,
        pb.FLIGHT_SQL_SERVER_TRANSACTION: Int32(pb.SQL_SUPPORTED_TRANSACTION_NONE),
        pb.FLIGHT_SQL_SERVER_STATEMENT_TIMEOUT: Int32(statement_timeout_ms),
        pb.FLIGHT_SQL_SERVER_TRANSACTION_TIMEOUT: Int32(0),
        # DuckDB folds neither unquoted nor quoted identifiers, and compares both case-insensitively.
        pb.SQL_IDENTIFIER_CASE: Int32(pb.SQL_CASE_SENSITIVITY_CASE_INSENSITIVE),
        pb.SQL_QUOTED_IDENTIFIER_CASE: Int32(pb.SQL_CASE_SENSITIVITY_CASE_INSENSITIVE),
        pb.SQL_IDENTIFIER_QUOTE_CHAR: '"',
        # DuckDB's default_null_order is NULLS_LAST for ascending and descending sorts alike.
        pb.SQL_NULL_ORDERING: Int32(pb.SQL_NULLS_SORTED_AT_END),
        pb.SQL_KEYWORDS: list(keywords),
        pb.SQL_SEARCH_STRING_ESCAPE: SEARCH_STRING_ESCAPE,
        pb.SQL_EXTRA_NAME_CHARACTERS: "",
        pb.SQL_SUPPORTS_CONVERT: duckdb_conversions(),
        pb.SQL_SUPPORTED_GROUP_BY: bitmask(pb.SQL_GROUP_BY_UNRELATED, pb.SQL_GROUP_BY_BEYOND_SELECT),
        pb.SQL_SUPPORTED_GRAMMAR: bitmask(pb.SQL_MINIMUM_GRAMMAR, pb.SQL_CORE_GRAMMAR),
        pb.SQL_ANSI92_SUPPORTED_LEVEL: bitmask(pb.ANSI92_ENTRY_SQL, pb.ANSI92_INTERMEDIATE_SQL),
        pb.SQL_OUTER_JOINS_SUPPORT_LEVEL: Int32(pb.SQL_FULL_OUTER_JOINS),
        pb.SQL_SCHEMA_TERM: "schema",
        pb.SQL_CATALOG_TERM: "catalog",
        pb.SQL_SCHEMAS_SUPPORTED_ACTIONS: bitmask(),
        pb.SQL_CATALOGS_SUPPORTED_ACTIONS: bitmask(),
        pb.SQL_SUPPORTED_POSITIONED_COMMANDS: bitmask(),
        pb.SQL_SUPPORTED_SUBQUERIES: bitmask(
            pb.SQL_SUBQUERIES_IN_COMPARISONS,
            pb.SQL_SUBQUERIES_IN_EXISTS,
            pb.SQL_SUBQUERIES_IN_INS,
            pb.SQL_SUBQUERIES_IN_QUANTIFIEDS,
        ),
        pb.SQL_SUPPORTED_UNIONS: bitmask(pb.SQL_UNION, pb.SQL_UNION_ALL),
        pb.SQL_DEFAULT_TRANSACTION_ISOLATION: Int32(pb.SQL_TRANSACTION_NONE),
        pb.SQL_SUPPORTED_TRANSACTIONS_ISOLATION_LEVELS: bitmask(pb.SQL_TRANSACTION_NONE),
        pb.SQL_SUPPORTED_RESULT_SET_TYPES: bitmask(pb.SQL_RESULT_SET_TYPE_FORWARD_ONLY),
        pb.SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_UNSPECIFIED: bitmask(),
        pb.SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_FORWARD_ONLY: bitmask(
            pb.SQL_RESULT_SET_CONCURRENCY_READ_ONLY
        ),
        pb.SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_SCROLL_SENSITIVE: bitmask(),
        pb.SQL_SUPPORTED_CONCURRENCIES_FOR_RESULT_SET_SCROLL_INSENSITIVE: bitmask(),
    }
    return values


# ---------------------------------------------------------------------------------------------------------
# XDBC type information
# ---------------------------------------------------------------------------------------------------------


class XdbcType(NamedTuple):
    """One row of CommandGetXdbcTypeInfo, its fields in the specification's column order."""

    type_name: str
    data_type: int
    column_size: int | None
    literal_prefix: str | None
    literal_suffix: str | None
    create_params: list[str] | None
    nullable: int
    case_sensitive: bool
    searchable: int
    unsigned_attribute: bool | None
    fixed_prec_scale: bool
    auto_increment: bool | None
    local_type_name: str | None
    minimum_scale: int | None
    maximum_scale: int | None
    sql_data_type: int
    datetime_subcode: int | None
    num_prec_radix: int | None
    interval_precision: int | None


def _xdbc_type(
    name: str,
    data_type: int,
    *,
    column_size: int | None = None,
    literal: tuple[str, str] | None = None,
    create_params: list[str] | None = None,
    case_sensitive: bool = False,
    searchable: int = pb.SEARCHABLE_BASIC,
    unsigned: bool | None = None,
    scale: tuple[int, int] | None = None,
    sql_data_type: int | None = None,
    datetime_subcode: int | None = None,
    radix: int | None = None,
) -> XdbcType:
    """A nullable DuckDB type; numeric ones (``unsigned`` set) report no auto increment."""
    prefix, suffix = literal or (None, None)
    minimum_scale, maximum_scale = scale or (None, None)
    return XdbcType(
        type_name=name,
        data_type=data_type,
        column_size=column_size,
        literal_prefix=prefix,
        literal_suffix=suffix,
        create_params=create_params,
        nullable=pb.NULLABILITY_NULLABLE,
        case_sensitive=case_sensitive,
        searchable=searchable,
        unsigned_attribute=unsigned,
        fixed_prec_scale=False,
        auto_increment=None if unsigned is None else False,
        local_type_name=name,
        minimum_scale=minimum_scale,
        maximum_scale=maximum_scale,
        sql_data_type=data_type if sql_data_type is None else sql_data_type,
        datetime_subcode=datetime_subcode,
        num_prec_radix=radix,
        interval_precision=None,
    )


def _integer(name: str, data_type: int, digits: int, unsigned: bool = False) -> XdbcType:
    return _xdbc_type(name, data_type, column_size=digits, unsigned=unsigned, scale=(0, 0), radix=10)


def _floating(name: str, data_type: int, mantissa_bits: int) -> XdbcType:
    return _xdbc_type(name, data_type, column_size=mantissa_bits, unsigned=False, radix=2)


def _datetime(name: str, data_type: int, subcode: int, characters: int) -> XdbcType:
    return _xdbc_type(
        name,
        data_type,
        column_size=characters,
        literal=(f"{name} '", "'"),
        sql_data_type=pb.XDBC_DATETIME,
        datetime_subcode=subcode,
    )


#: The scalar types DuckDB serves, with their XDBC codes (unsigned integers share the signed codes).
DUCKDB_XDBC_TYPES: tuple[XdbcType, ...] = (
    _xdbc_type("BOOLEAN", pb.XDBC_BIT, column_size=1),
    _integer("TINYINT", pb.XDBC_TINYINT, 3),
    _integer("UTINYINT", pb.XDBC_TINYINT, 3, unsigned=True),
    _integer("SMALLINT", pb.XDBC_SMALLINT, 5),
    _integer("USMALLINT", pb.XDBC_SMALLINT, 5, unsigned=True),
    _integer("INTEGER", pb.XDBC_INTEGER, 10),
    _integer("UINTEGER", pb.XDBC_INTEGER, 10, unsigned=True),
    _integer("BIGINT", pb.XDBC_BIGINT, 19),
    _integer("UBIGINT", pb.XDBC_BIGINT, 20, unsigned=True),
    _integer("HUGEINT", pb.XDBC_NUMERIC, 38),
    _xdbc_type(
        "DECIMAL",
        pb.XDBC_DECIMAL,
        column_size=38,
        create_params=["precision", "scale"],
        unsigned=False,
        scale=(0, 38),
        radix=10,
    ),
    _floating("FLOAT", pb.XDBC_REAL, 24),
    _floating("DOUBLE", pb.XDBC_DOUBLE, 53),
    _xdbc_type(
        "VARCHAR", pb.XDBC_VARCHAR, literal=("'", "'"), case_sensitive=True, searchable=pb.SEARCHABLE_FULL
    ),
    _xdbc_type("BLOB", pb.XDBC_VARBINARY),
    _datetime("DATE", pb.XDBC_DATE, pb.XDBC_SUBCODE_DATE, 10),
    _datetime("TIME", pb.XDBC_TIME, pb.XDBC_SUBCODE_TIME, 15),
    _datetime("TIMESTAMP", pb.XDBC_TIMESTAMP, pb.XDBC_SUBCODE_TIMESTAMP, 26),
    _datetime("TIMESTAMPTZ", pb.XDBC_TIMESTAMP, pb.XDBC_SUBCODE_TIMESTAMP_WITH_TIMEZONE, 32),
    _xdbc_type(
        "INTERVAL",
        pb.XDBC_INTERVAL,
        literal=("INTERVAL '", "'"),
        datetime_subcode=pb.XDBC_SUBCODE_UNKNOWN,
    ),
)


def get_xdbc_type_info(
    data_type: int | None = None, types: Iterable[XdbcType] = DUCKDB_XDBC_TYPES
) -> pa.Table:
    """CommandGetXdbcTypeInfo: ``types`` (only those of ``data_type`` when set), by data_type then name."""
    rows = sorted(
        (row for row in types if data_type is None or row.data_type == data_type),
        key=lambda row: (row.data_type, row.type_name),
    )
    return pa.Table.from_pylist([row._asdict() for row in rows], schema=XDBC_TYPE_INFO_SCHEMA)
