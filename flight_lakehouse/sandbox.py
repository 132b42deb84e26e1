"""The SQL sandbox: user SQL may read the registered datasets and nothing else.

Two walls. First, every SQL fragment a client sends (a query, a scan, search or delete filter) is checked
here on DuckDB's own parse tree: exactly one read-only SELECT (or one predicate), whose tables are datasets
or CTEs in scope (resolved with DuckDB's scoping rules), whose table functions are generators, whose
functions are DuckDB built-ins that read neither the catalog nor the settings, and whose nesting is bounded
before DuckDB binds or plans it. Second, the DuckDB databases that run it have external access switched off
(only the snapshot's data files are allowed paths), their configuration locked, and time and memory limits
(see ``query.py`` and ``vector_cache.py``).
"""

from __future__ import annotations

import functools
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import duckdb
import orjson

from flight_lakehouse.commands import NAME_PATTERN
from flight_lakehouse.errors import InvalidArgument, NotFound
from flight_lakehouse.settings import Settings

SAFE_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest", "generate_subscripts"})
#: Vector search in SQL: a table in FROM, rewritten before the check (``sql_search.py``); never run by DuckDB.
SEARCH_FUNCTION = "vector_search"
SEARCH_ONLY_IN_FROM = (
    f"{SEARCH_FUNCTION}(...) is a table: call it by its plain name in FROM, e.g. "
    f"SELECT * FROM {SEARCH_FUNCTION}('docs', [0.1, 0.2, ...], 10)"
)
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
        "sleep_ms",
        "pg_sleep",
        "write_log",
        "parse_duckdb_log_message",
    }
)
READ_ONLY = (
    "SQL is read-only: only SELECT queries are allowed; writes go through ingest (DoPut, adbc_ingest) "
    "and actions"
)
LOCAL_SCHEMAS = frozenset({"", "main"})
#: Where the datasets are listed: DuckDB's own catalog (SHOW TABLES, information_schema, duckdb_tables())
#: knows only what a query database happened to load, never the Lance tables.
LIST_DATASETS = (
    "use the list_datasets action (CLI: flight-lakehouse datasets) or Flight SQL GetTables (adbc_get_objects)"
)
#: Schemas and catalogs of DuckDB's own catalog views.
CATALOG_SCHEMAS = frozenset({"information_schema", "pg_catalog", "system", "temp"})
#: DuckDB's ``SHOW``/``DESCRIBE``/``SUMMARIZE`` without a query (a ``SHOW_REF`` naming no table), by the
#: name DuckDB gives them in the parse tree.
SHOW_STATEMENTS = {
    '"tables"': "SHOW TABLES",
    "__show_tables_expanded": "SHOW ALL TABLES",
    '"databases"': "SHOW DATABASES",
    '"schemas"': "SHOW SCHEMAS",
    '"variables"': "SHOW VARIABLES",
}
#: A refused PRAGMA or CALL that reads the catalog (``PRAGMA show_tables``, ``CALL duckdb_tables()``).
CATALOG_STATEMENT = re.compile(r"^\s*(pragma|call)\b.*(show|table|database|schema|catalog)", re.I | re.S)
#: The catalog and schema every dataset is a table of, as Flight SQL clients name them.
SQL_CATALOG = "lakehouse"
SQL_SCHEMA = "main"
LOCAL_CATALOGS = frozenset({"", "memory", SQL_CATALOG})
#: Nested SELECTs (derived tables, CTE bodies, subqueries) a query may hold, the outermost counted: nesting
#: multiplies DuckDB's planning work (24 nested aggregating derived tables took 5 s, 16 took 0.03 s).
MAX_QUERY_DEPTH = 16
#: Subquery expressions (scalar, EXISTS, IN) nested inside each other, which cost more: each level of
#: ``(SELECT max(...) FROM t)`` roughly quadruples planning (8 levels: 0.03 s, 10: 0.4 s, 12: 6 s).
MAX_SUBQUERY_DEPTH = 8
#: Nested expressions (function calls, operators, casts ...) on one path of the parse tree.
MAX_EXPRESSION_DEPTH = 200
#: Parse-tree nodes of a query with every CTE reference replaced by the CTE's body, as DuckDB's planner
#: inlines them: a chain of CTEs each reading the previous one twice doubles it a level, and planning time
#: with it (2^17 nodes: 0.25 s; every further level twice that).
MAX_INLINED_NODES = 200_000
TOO_LARGE = (
    f"query is too large once its CTEs are expanded (limit {MAX_INLINED_NODES:,} parse-tree nodes); "
    "a CTE read many times over is expanded each time"
)
NOT_MATERIALIZED = re.compile(r"\bnot\s+materialized\b", re.IGNORECASE)
NOT_MATERIALIZED_REFUSED = (
    "NOT MATERIALIZED is not allowed: it makes DuckDB expand a CTE at every reference, which can keep its "
    "planner busy for minutes; leave the choice to DuckDB"
)
TOO_DEEP = (
    f"query is nested too deeply (limits: {MAX_QUERY_DEPTH} nested SELECTs, {MAX_SUBQUERY_DEPTH} nested "
    f"subquery expressions, {MAX_EXPRESSION_DEPTH} nested expressions)"
)
PIVOT_REFUSED = (
    "PIVOT without an IN list is not supported (DuckDB runs it as several statements); list the values, "
    "e.g. PIVOT t ON col IN ('a', 'b') USING sum(x), or use conditional aggregation such as "
    "sum(x) FILTER (WHERE col = 'a')"
)


@dataclass(frozen=True)
class DuckdbNames:
    """What a fresh DuckDB database knows: the functions queries may call, the catalog views they may not
    read (nor shadow with a CTE: a CTE named like one would vouch for the real view elsewhere)."""

    functions: frozenset[str]
    catalog_views: frozenset[str]


@functools.cache
def duckdb_names() -> DuckdbNames:
    """The function allow-list and the catalog view names of this DuckDB version (computed once)."""
    with duckdb.connect(":memory:") as connection:
        rows = connection.execute(
            "SELECT lower(function_name), bool_or(coalesce(macro_definition, '') ILIKE '%select%') "
            "FROM duckdb_functions() WHERE function_type IN ('scalar', 'aggregate', 'macro') GROUP BY 1"
        ).fetchall()
        # a macro holding a query reads the catalog behind the check (pg_get_viewdef: duckdb_views())
        functions = {
            name for name, reads in rows if not reads and not is_blocked(name)
        } | SAFE_TABLE_FUNCTIONS
        candidates = connection.execute(
            "SELECT DISTINCT lower(view_name) FROM duckdb_views() WHERE internal "
            "UNION SELECT DISTINCT lower(function_name) FROM duckdb_functions() "
            "WHERE function_type IN ('table', 'table_macro')"
        ).fetchall()
        views = {name for (name,) in candidates if resolves(connection, name)}
    return DuckdbNames(frozenset(functions), frozenset(views))


def is_blocked(function: str) -> bool:
    """Whether a function name is refused outright (introspection, settings, files, sleeping)."""
    return function.startswith(BLOCKED_FUNCTION_PREFIXES) or function in BLOCKED_FUNCTIONS


def catalog_refused(what: str) -> str:
    """The refusal of ``what``, a statement listing DuckDB's catalog: it says where the datasets are."""
    return f"{what} lists DuckDB's own catalog, not the datasets: {LIST_DATASETS}"


def read_only(keyword: str, sql: str) -> str:
    """The refusal of a statement that is not a SELECT (``keyword``), saying where the datasets are listed
    if it reads the catalog (``PRAGMA show_tables``, ``CALL duckdb_tables()``)."""
    if CATALOG_STATEMENT.match(sql):
        return f"{READ_ONLY} (got {keyword}); to list the datasets, {LIST_DATASETS}"
    return f"{READ_ONLY} (got {keyword})"


def resolves(connection: duckdb.DuckDBPyConnection, name: str) -> bool:
    """Whether ``FROM name`` (unqualified) binds to something in ``connection``."""
    try:
        connection.execute(f'SELECT * FROM "{name}" LIMIT 0')
    except duckdb.Error:
        return False
    return True


def check_select(connection: duckdb.DuckDBPyConnection, sql: str, datasets: set[str]) -> set[str]:
    """Refuse ``sql`` unless it is one SELECT reading only ``datasets`` (lower-case names).

    Returns the datasets the query names (lower-case). A verdict depends only on the text and the names,
    so passing ones are remembered: a Flight SQL query is checked up to four times (prepare, FlightInfo,
    DoGet, its parts), ~0.45 ms each for a small query.
    """
    key = (sql, frozenset(datasets))
    with _VERDICTS_GUARD:
        named = _VERDICTS.get(key)
        if named is not None:
            _VERDICTS.move_to_end(key)
            return set(named)
    named = frozenset(_check_select(connection, sql, datasets))
    if len(sql) > MAX_REMEMBERED_CHARS:
        return set(named)
    with _VERDICTS_GUARD:
        _VERDICTS[key] = named
        while len(_VERDICTS) > REMEMBERED_VERDICTS:
            _VERDICTS.popitem(last=False)
    return set(named)


#: Passing verdicts of :func:`check_select` (and parse trees) kept, newest last; only of short texts, so
#: the memory they hold stays bounded (~1024 x 64 KB at worst).
REMEMBERED_VERDICTS = 1024
MAX_REMEMBERED_CHARS = 64 << 10
_VERDICTS: OrderedDict[tuple[str, frozenset[str]], frozenset[str]] = OrderedDict()
_VERDICTS_GUARD = threading.Lock()
#: Parse trees (JSON text) by SQL text, oldest first: one query is parsed by several checks.
_PARSED: OrderedDict[str, str] = OrderedDict()


def _check_select(connection: duckdb.DuckDBPyConnection, sql: str, datasets: set[str]) -> set[str]:
    statements = parse_statements(connection, sql)
    # DuckDB's expansion of one statement (DuckDB 2: one statement of type MULTI)
    generated = (len(statements) > 1 and not statements[0].query) or (
        len(statements) == 1 and statements[0].type == duckdb.StatementType.MULTI
    )
    if generated and re.search(r"\bpivot\b", sql, re.IGNORECASE):
        raise InvalidArgument(PIVOT_REFUSED)
    if len(statements) != 1:
        raise InvalidArgument(f"expected exactly one SQL statement, got {len(statements)}")
    if NOT_MATERIALIZED.search(sql):  # the parse tree as JSON does not keep the hint: read the text
        raise InvalidArgument(NOT_MATERIALIZED_REFUSED)
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        raise InvalidArgument(read_only(kind.name, sql))
    return check_tree(serialize(connection, sql), datasets) & datasets


def check_predicate(
    connection: duckdb.DuckDBPyConnection, predicate: str, datasets: set[str] | None = None
) -> set[str]:
    """Refuse a filter that is not exactly one boolean expression passing the checks of queries.

    Subqueries are refused unless ``datasets`` (lower-case) says what they may read; a search or delete
    filter is evaluated row by row outside the query engine and may read nothing. Returns the datasets the
    predicate names.
    """
    return checked_predicate(connection, predicate, datasets)[1]


def checked_predicate(
    connection: duckdb.DuckDBPyConnection, predicate: str, datasets: set[str] | None = None
) -> tuple[dict[str, Any], set[str]]:
    """:func:`check_predicate`, also giving the predicate's parse tree."""
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
    where = node.get("where_clause")
    if datasets is None and any("cte_map" in part for part in walk(where)):
        raise InvalidArgument("a filter may not contain a subquery")
    return where, check_tree(where, datasets or set()) & (datasets or set())


def parameter_count(tree: Any) -> int:
    """How many distinct placeholders (``?``, ``$n``) a parsed statement has."""
    return len({node.get("identifier") for node in walk(tree) if node.get("class") == "PARAMETER"})


def column_references(tree: Any) -> list[list[str]]:
    """The column references of a parse tree (each its dotted name parts), lambda parameters left out."""
    parameters = {
        tuple(part["column_names"])
        for lambda_node in walk(tree)
        if lambda_node.get("class") == "LAMBDA"
        for part in walk(lambda_node.get("lhs"))
        if part.get("class") == "COLUMN_REF"
    }
    return [
        node["column_names"]
        for node in walk(tree)
        if node.get("class") == "COLUMN_REF" and tuple(node["column_names"]) not in parameters
    ]


@dataclass(frozen=True)
class Frame:
    """A part of the parse tree still to check: the CTE names in scope there and how deep it is."""

    node: Any
    ctes: frozenset[str] = frozenset()
    queries: int = 0
    subqueries: int = 0
    expressions: int = 0


def check_tree(tree: Any, datasets: set[str]) -> set[str]:
    """Check every table reference, function call and nesting level of a parse tree.

    A table name is readable when it is a dataset or a CTE in scope at that reference: a CTE is visible in
    the body of the query node defining it and in the CTEs that follow it in the same WITH, and inside its
    own definition only in the recursive branch of a WITH RECURSIVE (DuckDB binds any other self-reference
    to the catalog). Returns the lower-case table names the tree reads.
    """
    named: set[str] = set()
    stack = [Frame(tree)]
    while stack:
        frame = stack.pop()
        if isinstance(frame.node, list):
            stack.extend(replace(frame, node=item) for item in frame.node)
        elif isinstance(frame.node, dict):
            stack.extend(check_object(frame, datasets, named))
    inlined_size(tree, {})
    return named


def inlined_size(tree: Any, ctes: dict[str, int]) -> int:
    """The parse-tree nodes of ``tree`` with each CTE reference counted as its CTE's expanded body
    (``ctes``: the sizes of the CTEs in scope); refuses a tree past :data:`MAX_INLINED_NODES`.

    Recursion goes one level per nested WITH only (bounded by :data:`MAX_QUERY_DEPTH`)."""
    total = 0
    stack: list[tuple[Any, dict[str, int]]] = [(tree, ctes)]
    while stack:
        node, scope = stack.pop()
        if isinstance(node, list):
            stack.extend((item, scope) for item in node)
            continue
        if not isinstance(node, dict):
            continue
        total += 1
        if isinstance(node.get("cte_map"), dict):
            scope = dict(scope)
            for entry in node["cte_map"].get("map", []):
                scope[str(entry.get("key", "")).lower()] = inlined_size(entry.get("value"), scope)
        if node.get("type") == "BASE_TABLE":
            total += scope.get(str(node.get("table_name", "")).lower(), 0)
        if total > MAX_INLINED_NODES:
            raise InvalidArgument(TOO_LARGE)
        stack.extend((value, scope) for key, value in node.items() if key != "cte_map")
    return total


def check_object(frame: Frame, datasets: set[str], named: set[str]) -> Iterator[Frame]:
    """Check one JSON object of the parse tree; yields its children to check, with their scopes."""
    node: dict[str, Any] = frame.node
    depth = replace(
        frame,
        queries=frame.queries + ("cte_map" in node),
        subqueries=frame.subqueries + (node.get("class") == "SUBQUERY"),
        expressions=frame.expressions + ("class" in node),
    )
    if (
        depth.queries > MAX_QUERY_DEPTH
        or depth.subqueries > MAX_SUBQUERY_DEPTH
        or depth.expressions > MAX_EXPRESSION_DEPTH
    ):
        raise InvalidArgument(TOO_DEEP)
    ctes = frame.ctes
    if "cte_map" in node:
        entries = node["cte_map"].get("map", []) if isinstance(node["cte_map"], dict) else []
        for entry in entries:
            yield replace(depth, node=entry, ctes=ctes)  # sees the CTEs before it only
            ctes = ctes | cte_name(entry)
    table = check_node(node, datasets | ctes)
    if table is not None:
        named.add(table)
    for key, value in node.items():
        if key == "cte_map":
            continue
        scope = ctes
        if node.get("type") == "RECURSIVE_CTE_NODE" and key == "right":
            scope = ctes | {str(node.get("cte_name", "")).lower()}
        yield replace(depth, node=value, ctes=scope)


def cte_name(entry: dict[str, Any]) -> frozenset[str]:
    """The name a CTE entry puts in scope (lower-case), refusing names of DuckDB's catalog views.

    Only plain identifiers count: a CTE named like a file path vouches for nothing.
    """
    name = str(entry.get("key", ""))
    if name.lower() in duckdb_names().catalog_views:
        raise InvalidArgument(f"CTE name {name!r} is reserved: it names a DuckDB catalog view")
    return frozenset({name.lower()}) if re.fullmatch(NAME_PATTERN, name) else frozenset()


def parse_statements(connection: duckdb.DuckDBPyConnection, sql: str) -> list[Any]:
    """DuckDB's statements of ``sql``, or INVALID_ARGUMENT with the parser's message."""
    try:
        return connection.extract_statements(sql)
    except duckdb.Error as exc:
        message = first_line(exc)
        if "expression depth" in message:  # DuckDB's own parser limit (1000), far past ours
            raise InvalidArgument(TOO_DEEP) from None
        if message.endswith("at end of input"):
            message += f" (the query ends with {sql.strip()[-40:]!r})"
        raise InvalidArgument(f"SQL syntax error: {message}") from None


def without_catalog(connection: duckdb.DuckDBPyConnection, sql: str) -> str:
    """``sql`` with the datasets' catalog removed from table names (``lakehouse.main.t``, as Flight SQL
    clients write them after listing the tables, reads the dataset ``t``); other SQL is returned as is."""
    if SQL_CATALOG not in sql.lower():
        return sql
    tree = serialize(connection, sql)
    qualified = [node for node in walk(tree) if node.get("type") == "BASE_TABLE" and names_catalog(node)]
    if not qualified:
        return sql
    for node in qualified:
        node["catalog_name"] = node["schema_name"] = ""
        node["qualified_name"] = {"path": [node.get("table_name", "")]}  # DuckDB 2 binds this one
    return deserialize(connection, tree)


def names_catalog(table: dict[str, Any]) -> bool:
    """Whether a table reference is ``lakehouse.main.name`` or ``lakehouse.name``."""
    catalog, schema = table.get("catalog_name", "").lower(), table.get("schema_name", "").lower()
    return (catalog == SQL_CATALOG and schema in LOCAL_SCHEMAS) or (not catalog and schema == SQL_CATALOG)


def serialize(connection: duckdb.DuckDBPyConnection, sql: str) -> dict[str, Any]:
    """DuckDB's parse tree of a SELECT as JSON (a fresh copy: callers may change it)."""
    text = _PARSED.get(sql)
    if text is None:
        rows = connection.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()
        text = str(rows[0][0]) if rows else "{}"
        if len(text) <= MAX_REMEMBERED_CHARS:
            with _VERDICTS_GUARD:
                _PARSED[sql] = text
                while len(_PARSED) > REMEMBERED_VERDICTS:
                    _PARSED.popitem(last=False)
    try:
        tree = orjson.loads(text)
    except orjson.JSONDecodeError:  # nested past orjson's depth limit (1024): far past ours
        raise InvalidArgument(TOO_DEEP) from None
    if tree.get("error"):
        message = str(tree.get("error_message", "cannot parse the query"))
        if message.startswith("Only SELECT statements"):
            keyword = sql.split(maxsplit=1)[0].upper() if sql.split() else ""
            raise InvalidArgument(read_only(keyword, sql))
        raise InvalidArgument(f"SQL error: {message}")
    return tree


def deserialize(connection: duckdb.DuckDBPyConnection, tree: dict[str, Any]) -> str:
    """The SQL of a parse tree (as :func:`serialize` gives it)."""
    rows = connection.execute("SELECT json_deserialize_sql(?)", [orjson.dumps(tree).decode()]).fetchall()
    return str(rows[0][0])


def check_constant(expression: Any, what: str) -> None:
    """Refuse an expression that is not a constant (``what`` names it): one reading a column, holding a
    subquery or a query parameter, or failing the checks of queries (functions, nesting)."""
    for node in walk(expression):
        if "cte_map" in node or node.get("class") == "SUBQUERY":
            raise InvalidArgument(f"{what} must be a constant: it holds a subquery")
        if node.get("class") == "PARAMETER":
            raise InvalidArgument(
                f"{what} must be a constant: query parameters are not taken here; write the value"
            )
        if node.get("class") == "STAR":  # also COLUMNS(...)
            raise InvalidArgument(f"{what} must be a constant: it reads columns (*)")
    columns = column_references(expression)
    if columns:
        raise InvalidArgument(f"{what} must be a constant: it reads column {'.'.join(columns[0])!r}")
    check_tree(expression, set())


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


def check_node(node: dict[str, Any], readable: set[str]) -> str | None:
    """Refuse a table reference or function call that reaches outside the datasets.

    Returns the (lower-case) name of a readable table the node refers to.
    """
    kind = node.get("type")
    if kind == "BASE_TABLE" and "class" not in node:
        name = str(node.get("table_name", ""))
        schema, catalog = str(node.get("schema_name", "")), str(node.get("catalog_name", ""))
        local = (schema.lower() in LOCAL_SCHEMAS and catalog.lower() in LOCAL_CATALOGS) or names_catalog(node)
        if local and name.lower() in readable:
            return name.lower()
        if local and name.lower() in duckdb_names().catalog_views:
            raise NotFound(
                f"dataset {name!r} not found (DuckDB's catalog views are not readable): to list the "
                f"datasets, {LIST_DATASETS}"
            )
        if local and re.fullmatch(NAME_PATTERN, name):
            raise NotFound(f"dataset {name!r} not found")
        shown = ".".join(part for part in (catalog, schema, name) if part)
        refusal = f"{shown!r} is not a dataset: queries may read registered datasets only"
        if {schema.lower(), catalog.lower()} & CATALOG_SCHEMAS:
            refusal += f"; to list the datasets, {LIST_DATASETS}"
        raise InvalidArgument(refusal)
    elif kind == "SHOW_REF" and "class" not in node and node.get("query") is None:
        # SHOW TABLES, SHOW ALL TABLES, SHOW TABLES FROM s, DESCRIBE (alone) ...: DuckDB's catalog. With a
        # query (DESCRIBE t, SUMMARIZE t, DESCRIBE SELECT ...), the query is checked as any other.
        if node.get("show_type") == "SHOW" and node.get("table_name"):  # DuckDB 2's SHOW t: DESCRIBE t
            return check_node({**node, "type": "BASE_TABLE"}, readable)
        if node.get("show_type") == "SHOW_FROM":
            raise InvalidArgument(catalog_refused("SHOW TABLES FROM ..."))
        table = str(node.get("table_name", ""))
        what = SHOW_STATEMENTS.get(table, f"SHOW {table.strip(chr(34)).upper()}".strip())
        raise InvalidArgument(catalog_refused(what))
    elif kind == "TABLE_FUNCTION" and "class" not in node:
        function = node.get("function", {})
        name = str(function.get("function_name", "")).lower()
        if name == SEARCH_FUNCTION:
            raise InvalidArgument(SEARCH_ONLY_IN_FROM)
        if name not in SAFE_TABLE_FUNCTIONS:
            refusal = f"table function {name!r} is not allowed: queries may read registered datasets only"
            if name.startswith(("duckdb_", "pragma_")) or name in duckdb_names().catalog_views:
                refusal += f"; to list the datasets, {LIST_DATASETS}"
            raise InvalidArgument(refusal)
    elif node.get("class") == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name == SEARCH_FUNCTION:
            raise InvalidArgument(SEARCH_ONLY_IN_FROM)
        if name not in duckdb_names().functions:
            raise InvalidArgument(f"function {name!r} is not allowed in queries and filters")
    return None


def database_config(settings: Settings, **extra: str | int | bool) -> dict[str, str | int | bool]:
    """The configuration every DuckDB database running client SQL starts with (the second wall): no
    extension installed or loaded on demand, the query threads and memory limit; plus ``extra``."""
    config: dict[str, str | int | bool] = {
        "autoinstall_known_extensions": False,
        "autoload_known_extensions": False,
        "lambda_syntax": "ENABLE_SINGLE_ARROW",  # DuckDB 2 refuses ``x -> x + 1`` by default; 1.x took it
        **extra,
    }
    if settings.query_threads:
        config["threads"] = settings.query_threads
    if settings.query_memory_mb:
        config["memory_limit"] = f"{settings.query_memory_mb}MB"
    return config


def first_line(exc: BaseException) -> str:
    """The first line of an exception message."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
