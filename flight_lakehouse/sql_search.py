"""``vector_search`` in SQL: the table function through which BI tools, which can only send SQL, search.

Signature (the fields of the ``vector_search`` action's body, ``commands.SearchRequest``)::

    vector_search(dataset, vector, k [, "column" := ..., metric := ..., filter := ..., columns := [...],
                  text := ..., nprobes := ..., refine_factor := ..., ef := ...])

``dataset``, ``vector`` and ``k`` may be given by position, every parameter by name (``name := value`` or
``name => value``; ``"column"`` quoted, as ``column`` is an SQL keyword). A NULL argument is left out of
the request (its default applies), so ``vector_search('docs', NULL, 10, text := 'free text')`` is a
full-text search and ``vector_search('docs', [0.1, ...], 10, text := 'free text')`` a hybrid one. A text in
place of the vector (``vector_search('docs', 'free text', 10)``, or ``query := 'free text'``) is embedded
with the dataset's model (a search by meaning; the server's embedder, see ``semantic.py``). Each
argument is a constant expression (literals, casts, functions of them): no column, subquery or query
parameter.

The call is a table in FROM like any other (aliases, WHERE, JOIN, ORDER BY, several in one query). Its
columns are the dataset's (or ``columns``), then ``_distance`` (``_score`` for text and hybrid searches),
and its rows those of the ``vector_search`` action, with the same checks and error messages.

How: DuckDB has no Python table functions, so the query is rewritten before the sandbox checks it. In its
parse tree each ``vector_search`` node becomes a table of a generated name (alias kept), and the tree goes
back to SQL (:meth:`SqlSearch.rewrite`). When the query is planned, on its own cursor and within its time
limit, each call's arguments are evaluated by one SELECT, validated as the action's body, checked
(``VectorSearch.plan``) and run (``VectorSearch.search``: the in-memory graph or Lance); the result is
registered on the query's cursor under the generated name, which no other cursor sees
(:meth:`SqlSearch.register`). For a result schema alone (GetFlightInfo) the search is planned, not run:
an empty table of its result schema is registered instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import duckdb

from flight_lakehouse.commands import SearchRequest, parse_model
from flight_lakehouse.errors import InvalidArgument
from flight_lakehouse.sandbox import SEARCH_FUNCTION, check_constant, deserialize, serialize, walk

if TYPE_CHECKING:
    from flight_lakehouse.vector_search import VectorSearch

#: The parameters that may be given by position, in order.
POSITIONAL = ("dataset", "vector", "k")
PARAMETERS = tuple(SearchRequest.model_fields)
#: Tables standing for searches are named this and a random suffix (registered on one cursor only).
TABLE_PREFIX = "__vector_search_"


@dataclass(frozen=True)
class SearchCall:
    """One ``vector_search(...)`` of a query: the table standing for it, and the SELECT of its arguments
    (one column per parameter, named after it)."""

    table: str
    arguments: str


@dataclass(frozen=True)
class Rewritten:
    """A query with its searches as tables: the SQL DuckDB runs and the searches to register first."""

    sql: str
    calls: tuple[SearchCall, ...] = ()

    @property
    def tables(self) -> frozenset[str]:
        """The generated table names (lower-case), readable by this query alone."""
        return frozenset(call.table.lower() for call in self.calls)


class SqlSearch:
    """Rewrites the ``vector_search`` calls of queries and registers their results on the query's cursor."""

    def __init__(self, searcher: VectorSearch) -> None:
        self.searcher = searcher

    def rewrite(self, connection: duckdb.DuckDBPyConnection, sql: str) -> Rewritten:
        """``sql`` with every ``vector_search(...)`` in FROM replaced by a table of its own."""
        if SEARCH_FUNCTION not in sql.lower():
            return Rewritten(sql)
        tree = serialize(connection, sql)
        nodes = [node for node in walk(tree) if is_search(node)]
        if not nodes:
            return Rewritten(sql)
        calls = tuple(search_call(connection, node) for node in nodes)
        return Rewritten(deserialize(connection, tree), calls)

    def register(
        self, cursor: duckdb.DuckDBPyConnection, calls: tuple[SearchCall, ...], run: bool = True
    ) -> None:
        """Run each search (only plan it unless ``run``: an empty table of its result schema) and register
        its result on ``cursor`` under the call's table name."""
        for call in calls:
            plan = self.searcher.plan(search_request(cursor, call))
            result = self.searcher.search(plan) if run else plan.result_schema.empty_table()
            cursor.register(call.table, result)


def is_search(node: dict[str, Any]) -> bool:
    """Whether a parse-tree node is a ``vector_search(...)`` table function (unqualified)."""
    if node.get("type") != "TABLE_FUNCTION" or "class" in node:
        return False
    function = node.get("function") or {}
    return (
        str(function.get("function_name", "")).lower() == SEARCH_FUNCTION
        and not function.get("schema")
        and not function.get("catalog")
    )


def search_call(connection: duckdb.DuckDBPyConnection, node: dict[str, Any]) -> SearchCall:
    """Turn a ``vector_search`` node into a table reference (in place), keeping its alias and sample."""
    if node.get("with_ordinality", "WITHOUT_ORDINALITY") != "WITHOUT_ORDINALITY":
        raise InvalidArgument(f"{SEARCH_FUNCTION} does not take WITH ORDINALITY")
    arguments = named_arguments(node["function"].get("arguments", []))
    table = TABLE_PREFIX + uuid.uuid4().hex
    del node["function"]
    node.pop("with_ordinality", None)
    node.update(
        type="BASE_TABLE",
        catalog_name="",
        schema_name="",
        table_name=table,
        qualified_name={"path": [table]},  # DuckDB 2 binds this one
        at_clause=None,
    )
    return SearchCall(table, arguments_sql(connection, arguments))


def named_arguments(given: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Parameter name -> argument expression, each checked to be a constant (``given``: the function's
    arguments in DuckDB 2's parse tree, each a ``name`` (empty when by position) and an ``expression``)."""
    arguments: dict[str, dict[str, Any]] = {}
    unnamed = 0
    for argument in given:
        child = argument.get("expression") or {}
        name = str(argument.get("name", "")).lower()
        if not name:
            if unnamed >= len(POSITIONAL):
                raise InvalidArgument(
                    f"{SEARCH_FUNCTION} takes at most {len(POSITIONAL)} arguments by position "
                    f"({', '.join(POSITIONAL)}); name the others, e.g. filter := 'id > 3'"
                )
            name, unnamed = POSITIONAL[unnamed], unnamed + 1
        if name not in PARAMETERS:
            raise InvalidArgument(
                f"{SEARCH_FUNCTION} has no parameter {name!r}; its parameters: {', '.join(PARAMETERS)}"
            )
        if name in arguments:
            raise InvalidArgument(f"{SEARCH_FUNCTION} parameter {name!r} is given twice")
        check_constant(child, f"{SEARCH_FUNCTION} parameter {name!r}")
        arguments[name] = child
    if not arguments:
        raise InvalidArgument(f"{SEARCH_FUNCTION} needs a dataset: {SEARCH_FUNCTION}('name', vector, k)")
    return arguments


def arguments_sql(connection: duckdb.DuckDBPyConnection, arguments: dict[str, dict[str, Any]]) -> str:
    """A SELECT of the argument expressions, each as a column named after its parameter."""
    tree = serialize(connection, "SELECT NULL")
    tree["statements"][0]["node"]["select_list"] = [
        dict(expression, alias=name) for name, expression in arguments.items()
    ]
    return deserialize(connection, tree)


def search_request(cursor: duckdb.DuckDBPyConnection, call: SearchCall) -> SearchRequest:
    """The search request of a call: its arguments evaluated on ``cursor``, NULLs left out, validated as
    the action's body."""
    relation = cursor.sql(call.arguments)
    rows = relation.limit(2).fetchall()
    if len(rows) != 1:  # unnest(...) makes rows
        raise InvalidArgument(f"{SEARCH_FUNCTION} arguments must be single values, not sets of rows")
    values = {
        name: plain(value) for name, value in zip(relation.columns, rows[0], strict=True) if value is not None
    }
    if isinstance(values.get("vector"), str):  # vector_search('docs', 'free text', 10): text to embed
        values["query"] = values.pop("vector")
    return parse_model(SearchRequest, values)


def plain(value: Any) -> Any:
    """A DuckDB value as JSON gives it: decimals (DuckDB's type of ``0.5``) as floats, arrays as lists."""
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, list | tuple):
        return [plain(item) for item in value]
    return value
