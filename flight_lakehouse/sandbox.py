"""The SQL sandbox: user SQL may read the registered datasets and nothing else.

Two walls. First, the statement is checked here on DuckDB's own parse tree: exactly one read-only
SELECT, whose tables are datasets or its own CTEs, whose table functions are generators, and which calls
no introspection function. Second, the DuckDB database that runs it has external access switched off
(only the snapshot's data files are allowed paths) and its configuration locked (see ``query.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import duckdb

from flight_lakehouse.commands import NAME_PATTERN
from flight_lakehouse.errors import InvalidArgument, NotFound

SAFE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "generate_subscripts"})
BLOCKED_FUNCTION_PREFIXES = ("duckdb_", "pragma_", "read_", "parquet_", "iceberg_", "delta_", "sniff_")
BLOCKED_FUNCTIONS = frozenset(
    {
        "current_setting",
        "getenv",
        "which_secret",
        "json_execute_serialized_sql",
        "query",
        "query_table",
        "glob",
    }
)
LOCAL_SCHEMAS = frozenset({"", "main"})
LOCAL_CATALOGS = frozenset({"", "memory"})


def check_select(connection: duckdb.DuckDBPyConnection, sql: str, datasets: set[str]) -> set[str]:
    """Refuse ``sql`` unless it is one SELECT reading only ``datasets`` (lower-case names).

    Returns the datasets the query names (lower-case).
    """
    statements = parse_statements(connection, sql)
    if len(statements) != 1:
        raise InvalidArgument(f"expected exactly one SQL statement, got {len(statements)}")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise InvalidArgument(
            f"only SELECT queries are allowed; writes go through DoPut and actions (got {kind.name})"
        )
    tree = serialize(connection, sql)
    # CTE names count only when they are plain identifiers: a CTE named like a file path could
    # otherwise vouch for a file read elsewhere in the query, outside the CTE's scope.
    ctes = {name.lower() for name in cte_names(tree) if re.fullmatch(NAME_PATTERN, name)}
    readable = datasets | ctes
    named: set[str] = set()
    for node in walk(tree):
        table = check_node(node, readable)
        if table is not None:
            named.add(table)
    return named & datasets


def check_predicate(connection: duckdb.DuckDBPyConnection, predicate: str) -> None:
    """Refuse a scan filter that is not exactly one boolean expression (e.g. one closing its parenthesis)."""
    tree = serialize(connection, f"SELECT * FROM __scan WHERE ({predicate}\n)")
    statements = tree.get("statements", [])
    node = statements[0].get("node", {}) if len(statements) == 1 else {}
    single = (
        node.get("type") == "SELECT_NODE"
        and node.get("from_table", {}).get("table_name") == "__scan"
        and not node.get("group_expressions")
        and node.get("having") is None
        and not node.get("modifiers")
        and len(node.get("select_list", [])) == 1
    )
    if not single:
        raise InvalidArgument(f"filter must be one SQL predicate: {predicate[:200]!r}")


def parse_statements(connection: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    """DuckDB's statements of ``sql``, or INVALID_ARGUMENT with the parser's message."""
    try:
        return connection.extract_statements(sql)
    except duckdb.Error as exc:
        message = first_line(exc)
        if message.endswith("at end of input"):
            message += f" (the query ends with {sql.strip()[-40:]!r})"
        raise InvalidArgument(f"SQL syntax error: {message}") from None


def serialize(connection: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of a SELECT as JSON."""
    rows = connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
    tree = json.loads(rows[0][0]) if rows else {}
    if tree.get("error"):
        message = str(tree.get("error_message", "cannot parse the query"))
        if message.startswith("Only SELECT statements"):
            keyword = sql.split(maxsplit=1)[0].upper() if sql.split() else ""
            raise InvalidArgument(
                f"only SELECT queries are allowed; writes go through DoPut and actions (got {keyword})"
            )
        raise InvalidArgument(f"SQL error: {message}")
    return tree


def walk(tree: Any) -> Iterator[dict[str, Any]]:
    """Every JSON object of the parse tree."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def cte_names(tree: dict[str, Any]) -> Iterator[str]:
    """Names of every common table expression defined anywhere in the query."""
    for node in walk(tree):
        cte_map = node.get("cte_map")
        if isinstance(cte_map, dict):
            for entry in cte_map.get("map", []):
                yield str(entry.get("key", ""))


def check_node(node: dict[str, Any], readable: set[str]) -> str | None:
    """Refuse a table reference or function call that reaches outside the datasets.

    Returns the (lower-case) name of a readable table the node refers to.
    """
    kind = node.get("type")
    if kind == "BASE_TABLE" and "class" not in node:
        name = str(node.get("table_name", ""))
        schema, catalog = str(node.get("schema_name", "")), str(node.get("catalog_name", ""))
        local = schema.lower() in LOCAL_SCHEMAS and catalog.lower() in LOCAL_CATALOGS
        if local and name.lower() in readable:
            return name.lower()
        if local and re.fullmatch(NAME_PATTERN, name):
            raise NotFound(f"dataset {name!r} not found")
        shown = ".".join(part for part in (catalog, schema, name) if part)
        raise InvalidArgument(f"{shown!r} is not a dataset: queries may read registered datasets only")
    elif kind == "TABLE_FUNCTION" and "class" not in node:
        function = node.get("function", {})
        name = str(function.get("function_name", "")).lower()
        if name not in SAFE_TABLE_FUNCTIONS:
            raise InvalidArgument(
                f"table function {name!r} is not allowed: queries may read registered datasets only"
            )
    elif node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name.startswith(BLOCKED_FUNCTION_PREFIXES) or name in BLOCKED_FUNCTIONS:
            raise InvalidArgument(f"function {name!r} is not allowed in queries")
    return None


def first_line(exc: BaseException) -> str:
    """The first line of an exception message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
