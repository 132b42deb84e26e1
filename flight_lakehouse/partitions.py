"""Split results: a query that reads one dataset row by row may be answered as several parts.

A Flight SQL statement whose every result row comes from one row of one Iceberg dataset (a plain
projection and filter) gives the same rows whether it runs over all of the snapshot's files at once or over
disjoint subsets of them, one after another. GetFlightInfo then answers one endpoint per part, each ticket
naming the snapshot and which of its files to read; a client fetches the parts in parallel. Whether a query
is row-local is read from DuckDB's parse tree (:func:`row_local`); anything else is answered whole.

A part's ticket is self-contained (the SQL, the dataset, the snapshot id, the part's index and count): any
server of the same catalog and root answers it, so GetFlightInfo spreads the parts over the live servers
(see ``peers.py``). It is not signed: the server that answers it checks it as it checks any query (the
sandbox, the caller's grants) and reads only the part's share of the files of that snapshot of that
dataset, which the caller could read anyway by time travel; a forged part reads nothing more.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any

import duckdb

from flight_lakehouse.commands import Part
from flight_lakehouse.sandbox import walk

__all__ = ["Part", "parts", "parts_most", "row_local"]

#: The keys of a SELECT node that a row-local query may have, and those that must be empty when present
#: (any key DuckDB adds later counts against splitting until it is listed here).
SELECT_KEYS = frozenset({"type", "select_list", "from_table", "where_clause", "aggregate_handling"})
EMPTY_SELECT_KEYS = frozenset(
    {"modifiers", "cte_map", "group_expressions", "group_sets", "having", "sample", "qualify"}
)
#: The keys of the plain table reference a row-local query reads, and those that must be empty.
TABLE_KEYS = frozenset(
    {
        "type",
        "alias",
        "query_location",
        "query_location_length",
        "schema_name",
        "table_name",
        "catalog_name",
        "qualified_name",
    }
)
EMPTY_TABLE_KEYS = frozenset({"sample", "at_clause", "column_name_alias"})
#: Expression classes that read more than the row at hand.
SET_WIDE_CLASSES = frozenset({"SUBQUERY", "WINDOW"})
CALLED = re.compile(r'"?([a-z_][a-z0-9_]*)"?\s*\(')


def parts_most(configured: int, servers: int) -> int:
    """How many parts a result may split into: ``query_parts_max`` (0: twice the CPU count), at least one
    per live server so that each has a share to serve; 1 (never split) stays 1."""
    most = configured or 2 * (os.cpu_count() or 1)
    return most if most == 1 else max(most, servers)


def parts(dataset: str, snapshot_id: int, files: int, most: int) -> list[Part]:
    """The parts of a snapshot of ``files`` files: at most ``most``, each at least one file."""
    count = min(files, most)
    if count < 2:
        return []
    return [Part(dataset=dataset, snapshot_id=snapshot_id, index=i, count=count) for i in range(count)]


def row_local(tree: dict[str, Any]) -> str | None:
    """The table (lower-case) a parsed query reads row by row: one SELECT over one table reference whose
    every result row comes from one row of the table (projection, filter, scalar functions, unnest): no
    aggregate, DISTINCT, GROUP BY, HAVING, QUALIFY, window, ORDER BY, LIMIT/OFFSET, set operation,
    subquery, CTE, join or sample. None for any other query."""
    statements = tree.get("statements") or []
    if len(statements) != 1 or set(statements[0]) - {"node", "named_param_map"}:
        return None
    node = statements[0].get("node") or {}
    source = node.get("from_table") or {}
    plain = (
        node.get("type") == "SELECT_NODE"
        and node.get("aggregate_handling") == "STANDARD_HANDLING"
        and only_keys(node, SELECT_KEYS, EMPTY_SELECT_KEYS)
        and source.get("type") == "BASE_TABLE"
        and only_keys(source, TABLE_KEYS, EMPTY_TABLE_KEYS)
    )
    expressions = walk([node.get("select_list"), node.get("where_clause")])
    if not plain or any(set_wide(expression) for expression in expressions):
        return None
    return str(source.get("table_name", "")).lower()


def only_keys(node: dict[str, Any], allowed: frozenset[str], empty: frozenset[str]) -> bool:
    """Whether ``node`` has only ``allowed`` keys, plus ``empty`` ones without a value."""
    return all(key in allowed or (key in empty and is_empty(value)) for key, value in node.items())


def is_empty(value: Any) -> bool:
    """Whether a parse-tree value holds nothing (null, empty, or a CTE map without entries)."""
    if isinstance(value, dict):
        return all(is_empty(item) for item in value.values())
    return not value


def set_wide(node: dict[str, Any]) -> bool:
    """Whether an expression reads more than the row at hand: a subquery, a window, an aggregate."""
    if node.get("class") in SET_WIDE_CLASSES:
        return True
    return node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() in set_functions()


@functools.cache
def set_functions() -> frozenset[str]:
    """DuckDB's aggregate functions, and the macros that call one (``weighted_avg``, ``geomean``)."""
    with duckdb.connect(":memory:") as connection:
        rows = connection.execute(
            "SELECT lower(function_name), function_type, lower(coalesce(macro_definition, '')) "
            "FROM duckdb_functions() WHERE function_type IN ('aggregate', 'macro')"
        ).fetchall()
    names = {name for name, kind, _ in rows if kind == "aggregate"}
    macros = {name: set(CALLED.findall(body)) for name, kind, body in rows if kind == "macro"}
    while True:
        found = {name for name, called in macros.items() if name not in names and called & names}
        if not found:
            return frozenset(names)
        names |= found
