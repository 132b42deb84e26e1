"""``vector_search(...)`` as a table function of SQL, through a real server: DoGet ``{"sql": ...}`` tickets,
GetFlightInfo and the ADBC Flight SQL driver give the rows of the ``vector_search`` action, compose with
the rest of SQL, and refuse bad calls with the action's one-line errors.

One server per storage kind serves the module; data is small and generated with fixed seeds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import adbc_driver_flightsql.dbapi as adbc
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse.commands import SearchRequest
from flight_lakehouse.errors import NotFound
from flight_lakehouse.sandbox import check_select
from flight_lakehouse.sql_search import SqlSearch
from tests.conftest import (
    STORAGE_KINDS,
    ServerProcess,
    assert_refusal,
    assert_same_rows,
    make_root,
    running_server,
    search,
    wait_for_index,
)
from tests.test_vectors import CENTERS, DIM, DOCS, random_vectors, vec_table

ROWS = 300
MATRIX = random_vectors(ROWS, seed=51)
QUERY = random_vectors(1, seed=52)[0]
OTHER = random_vectors(1, seed=53)[0]
#: ADBC's status codes (``AdbcStatusCode``) of the refusals.
ADBC_NOT_FOUND, ADBC_INVALID_ARGUMENT = 3, 5


def sql_value(value: Any) -> str:
    """A JSON value as a SQL literal."""
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    if isinstance(value, list):
        return "[" + ", ".join(sql_value(item) for item in value) + "]"
    if isinstance(value, float) and math.isnan(value):
        return "'NaN'::DOUBLE"
    return repr(value)


def call(body: dict[str, Any]) -> str:
    """The ``vector_search(...)`` of an action body: dataset, vector and k by position, the rest by name."""
    named = {key: value for key, value in body.items() if key not in ("dataset", "vector", "k")}
    arguments = [sql_value(body.get(key)) for key in ("dataset", "vector", "k")]
    arguments += [f'"{key}" := {sql_value(value)}' for key, value in named.items()]  # "column": a keyword
    return f"vector_search({', '.join(arguments)})"


Q = QUERY.tolist()
V = sql_value(Q)


@dataclass
class Lakehouse:
    """The module's server, an ADBC connection to it and its datasets: ``items`` (Lance, l2), ``prices``
    (Parquet, a price per item id), ``docs`` (Lance with an fts index) and ``docs_plain`` (without)."""

    server: ServerProcess
    connection: Any = field(repr=False)

    def sql(self, query: str) -> pa.Table:
        """A DoGet ``{"sql": ...}`` ticket, read whole."""
        return self.server.sql(query)

    def adbc(self, query: str, parameters: list[Any] | None = None) -> pa.Table:
        """The query through the ADBC Flight SQL driver."""
        with self.connection.cursor() as cursor:
            cursor.execute(query, parameters=parameters)
            return cursor.fetch_arrow_table()

    def both(self, query: str) -> pa.Table:
        """The query over DoGet and ADBC: the same result either way, given back once."""
        by_ticket = self.sql(query)
        assert_same_rows(self.adbc(query), by_ticket)
        return by_ticket

    def search(self, **body: Any) -> pa.Table:
        """The ``vector_search`` action."""
        return search(self.server, {key: value for key, value in body.items() if value is not None})


@pytest.fixture(scope="module", params=STORAGE_KINDS)
def lake(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lakehouse]:
    """The module's server with its datasets."""
    root = make_root(request, request.param, tmp_path_factory.mktemp("sql_search"), "sql_search")
    with running_server(root) as server:
        ids = np.arange(ROWS)
        server.put(
            "items",
            vec_table(
                range(ROWS),
                MATRIX,
                category=pa.array(ids % 10, pa.int64()),
                label=pa.array([f"item-{i}" for i in ids]),
            ),
            mode="create",
            metric="l2",
        )
        server.put("prices", pa.table({"id": pa.array(ids, pa.int64()), "price": pa.array(ids * 1.5)}))
        create_docs(server)
        connection = adbc.connect(server.location, autocommit=True)
        try:
            yield Lakehouse(server, connection)
        finally:
            connection.close()


def create_docs(server: ServerProcess) -> None:
    """``docs`` and ``docs_plain``: the labelled documents of ``test_vectors``, ``docs`` with an fts index."""
    topics, texts = zip(*DOCS, strict=True)
    near_centres = np.stack([CENTERS[topic] for topic in topics]) + random_vectors(len(DOCS), seed=54) / 2
    documents = vec_table(range(len(DOCS)), near_centres, topic=pa.array(topics), text=pa.array(texts))
    for name in ("docs", "docs_plain"):
        server.put(name, documents, mode="create", metric="l2")
    server.action("create_index", {"dataset": "docs", "column": "text", "kind": "fts"})
    wait_for_index(server, "docs", "text", timeout=60)


# -- the rows of the action ------------------------------------------------------------------------------

#: Bodies of the action, each also sent as SQL (:func:`call`).
SEARCHES: dict[str, dict[str, Any]] = {
    "plain": {"dataset": "items", "vector": Q, "k": 10},
    "filter": {"dataset": "items", "vector": Q, "k": 7, "filter": "category = 3 AND id > 50"},
    "metric": {"dataset": "items", "vector": Q, "k": 5, "metric": "cosine"},
    "columns": {"dataset": "items", "vector": Q, "k": 4, "columns": ["label", "id"]},
    "default_k": {"dataset": "items", "vector": Q},
    "k_past_rows": {"dataset": "items", "vector": Q, "k": 400, "nprobes": 3, "refine_factor": 2},
    "no_match": {"dataset": "items", "vector": Q, "filter": "id < 0"},
    "vector_column": {"dataset": "items", "vector": Q, "k": 3, "column": "vec", "ef": 50},
    "text": {"dataset": "docs", "text": "electric car battery", "k": 5},
    "text_filtered": {"dataset": "docs", "text": "red", "filter": "topic = 'space'"},
    "hybrid": {"dataset": "docs", "vector": CENTERS["cars"].tolist(), "k": 10, "text": "electric battery"},
}


@pytest.mark.parametrize("name", sorted(SEARCHES))
def test_rows_are_the_actions(lake: Lakehouse, name: str) -> None:
    """``SELECT * FROM vector_search(...)`` gives the action's rows, in its order, over DoGet and ADBC."""
    body = SEARCHES[name]
    expected = lake.search(**body)
    result = lake.both(f"SELECT * FROM {call(body)}")
    assert_same_rows(result, expected)
    assert [f.type for f in result.schema] == [f.type for f in expected.schema], (
        result.schema,
        expected.schema,
    )
    assert result.schema.names[-1] == ("_score" if "text" in body else "_distance")


def test_spellings_of_one_search(lake: Lakehouse) -> None:
    """Arguments by name (``:=`` or ``=>``, any case, any order), a FLOAT[n] array and constant expressions
    are the same search."""
    expected = lake.search(dataset="items", vector=Q, k=6, filter="category < 5")
    for spelling in (
        f"vector_search('items', {V}::FLOAT[{DIM}], 6, FILTER := 'category < 5')",
        f"vector_search(k => 6, filter => 'category < 5', vector := {V}, dataset := 'items')",
        f"vector_search('it' || 'ems', list_transform({V}, x -> x * 1), 3 + 3, filter := 'category < ' || 5)",
    ):
        assert_same_rows(lake.sql(f"SELECT * FROM {spelling}"), expected)


def test_text_search_finds_the_document(lake: Lakehouse) -> None:
    """Full-text search from SQL ranks the document with the words first, by ``_score``."""
    result = lake.sql("SELECT id, _score FROM vector_search('docs', NULL, 3, text := 'volcano')")
    assert result.column("id")[0].as_py() == 23
    assert result.schema.names == ["id", "_score"]


# -- composition -----------------------------------------------------------------------------------------


def nearest_ids(lake: Lakehouse, vector: np.ndarray, k: int, **body: Any) -> list[int]:
    """The ids the action finds, nearest first."""
    return lake.search(dataset="items", vector=vector.tolist(), k=k, **body).column("id").to_pylist()


def test_where_join_order_by_and_alias(lake: Lakehouse) -> None:
    """A search joins a Parquet dataset under an alias, with WHERE and ORDER BY around it."""
    ids = nearest_ids(lake, QUERY, 20)
    result = lake.both(
        f"SELECT v.id, p.price, v._distance AS d FROM vector_search('items', {V}, 20) AS v "
        "JOIN prices AS p ON p.id = v.id WHERE v.category < 5 ORDER BY p.price DESC"
    )
    wanted = sorted((i for i in ids if i % 10 < 5), reverse=True)
    assert result.column("id").to_pylist() == wanted
    assert result.column("price").to_pylist() == [i * 1.5 for i in wanted]
    assert result.schema.names == ["id", "price", "d"]


def test_two_searches_in_one_query(lake: Lakehouse) -> None:
    """Two calls, each a table of its own: their intersection, and a count by CTE."""
    first, second = nearest_ids(lake, QUERY, 60), nearest_ids(lake, OTHER, 60)
    result = lake.both(
        f"SELECT a.id FROM vector_search('items', {V}, 60) a "
        f"JOIN vector_search('items', {sql_value(OTHER.tolist())}, 60) b USING (id) ORDER BY a.id"
    )
    assert result.column("id").to_pylist() == sorted(set(first) & set(second))
    counted = lake.sql(
        f"WITH near AS (SELECT * FROM vector_search('items', {V}, 8)) "
        f"SELECT (SELECT count(*) FROM near) AS n, "
        f"(SELECT count(*) FROM vector_search('items', {V}, 3, filter := 'category = 1')) AS m"
    )
    assert counted.to_pylist() == [{"n": 8, "m": 3}]


def test_search_in_a_subquery_and_column_aliases(lake: Lakehouse) -> None:
    """A call inside IN (...) and with column aliases (``AS v(a, b, ...)``)."""
    ids = nearest_ids(lake, QUERY, 5)
    result = lake.sql(
        f"SELECT id FROM prices WHERE id IN (SELECT id FROM vector_search('items', {V}, 5)) ORDER BY id"
    )
    assert result.column("id").to_pylist() == sorted(ids)
    aliased = lake.sql(f"SELECT x FROM vector_search('items', {V}, 5, columns := ['id']) AS v(x, dist)")
    assert aliased.column("x").to_pylist() == ids


def test_prepared_statement_parameters_around_a_search(lake: Lakehouse) -> None:
    """ADBC's prepared statements bind parameters elsewhere in the query."""
    ids = nearest_ids(lake, QUERY, 10)
    result = lake.adbc(f"SELECT id FROM vector_search('items', {V}, 10) WHERE id > ?", parameters=[100])
    assert result.column("id").to_pylist() == [i for i in ids if i > 100]


def test_flight_info_plans_but_does_not_run(lake: Lakehouse) -> None:
    """GetFlightInfo gives the result schema from the search's plan: a text search that fails when run
    (no fts index) still has a schema; its ticket then fails with the action's error."""
    sql = f"SELECT * FROM vector_search('items', {V}, 5) v JOIN prices USING (id)"
    info = lake.server.client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"sql": sql}).encode())
    )
    result = lake.server.client.do_get(info.endpoints[0].ticket).read_all()
    assert info.schema.equals(result.schema), (info.schema, result.schema)

    failing = "SELECT * FROM vector_search('docs_plain', NULL, 5, text := 'volcano')"
    info = lake.server.client.get_flight_info(
        flight.FlightDescriptor.for_command(json.dumps({"sql": failing}).encode())
    )
    assert info.schema.names == ["id", "vec", "topic", "text", "_score"]
    with pytest.raises(pa.ArrowInvalid) as by_sql:
        lake.server.client.do_get(info.endpoints[0].ticket).read_all()
    with pytest.raises(pa.ArrowInvalid) as by_action:
        lake.search(dataset="docs_plain", text="volcano", k=5)
    assert head(by_sql.value) == head(by_action.value)


# -- refusals --------------------------------------------------------------------------------------------


def head(exc: BaseException) -> str:
    """The server's one-line message of a refusal."""
    return str(exc).split(". Detail:")[0]


#: What the action refuses, each over a good search of ``items``; the unknown dataset is NOT_FOUND.
BAD_SEARCHES: dict[str, dict[str, Any]] = {
    "unknown_dataset": {"dataset": "nowhere_vecs"},
    "parquet_dataset": {"dataset": "prices"},
    "bad_dataset_name": {"dataset": "../items"},
    "wrong_dimension": {"vector": [0.5, 0.5]},
    "nan": {"vector": [math.nan, *Q[1:]]},
    "k_zero": {"k": 0},
    "k_too_big": {"k": 10001},
    "k_not_int": {"k": "ten"},
    "vector_not_numbers": {"vector": ["a", "b"]},
    "unknown_metric": {"metric": "manhattan"},
    "unknown_column": {"columns": ["nosuch"]},
    "not_a_vector_column": {"column": "category"},
    "neither_vector_nor_text": {"vector": None},
    "filter_subquery": {"filter": "id IN (SELECT id FROM prices)"},
    "filter_read_csv": {"filter": "id IN (SELECT 1 FROM read_csv('/etc/passwd'))"},
    "filter_union_escape": {"filter": "1=0) UNION ALL SELECT * FROM prices WHERE (1=1"},
    "filter_second_statement": {"filter": "id > 1; DROP TABLE items"},
    "filter_function": {"filter": "getenv('HOME') IS NOT NULL"},
    "filter_unknown_column": {"filter": "nope > 1"},
}


def refusal(lake: Lakehouse, sql: str, not_found: bool) -> str:
    """The one-line refusal of ``sql`` over DoGet (NOT_FOUND or INVALID_ARGUMENT, checked) and ADBC (the
    same message and status); the server answers ``SELECT 42`` afterwards."""
    with pytest.raises(pa.ArrowInvalid if not not_found else pa.ArrowKeyError) as exc:
        lake.sql(sql)
    assert isinstance(exc.value, pa.ArrowKeyError) == not_found, exc.value
    message = head(assert_refusal(exc, lake.server))
    assert "\n" not in message, message
    with pytest.raises(adbc.ProgrammingError) as by_adbc:
        lake.adbc(sql)
    assert int(by_adbc.value.status_code) == (ADBC_NOT_FOUND if not_found else ADBC_INVALID_ARGUMENT)
    assert message in str(by_adbc.value), (message, str(by_adbc.value))
    assert lake.sql("SELECT 42 AS answer").to_pylist() == [{"answer": 42}]
    return message


@pytest.mark.parametrize("name", sorted(BAD_SEARCHES))
def test_refusals_are_the_actions(lake: Lakehouse, name: str) -> None:
    """A search the action refuses is refused in SQL with the action's one-line message and status."""
    body = {"dataset": "items", "vector": Q, "k": 5, **BAD_SEARCHES[name]}
    message = refusal(lake, f"SELECT * FROM {call(body)}", not_found=body["dataset"] == "nowhere_vecs")
    with pytest.raises(pa.ArrowException) as by_action:
        lake.search(**body)
    assert head(by_action.value) == message


SQL_ERRORS = [
    pytest.param(
        f"SELECT * FROM prices, vector_search('items', {V}, id)",
        ("'k'", "column 'id'"),
        id="column_reference",
    ),
    pytest.param(
        "SELECT * FROM prices p, vector_search('items', [p.price], 5)",
        ("'vector'", "p.price"),
        id="lateral_column",
    ),
    pytest.param(
        "SELECT * FROM vector_search('items', (SELECT [1.0]), 5)", ("'vector'", "subquery"), id="subquery"
    ),
    pytest.param(
        f"SELECT * FROM vector_search('items', {V}, 5, ef := EXISTS (SELECT 1))",
        ("'ef'", "subquery"),
        id="exists_subquery",
    ),
    pytest.param("SELECT * FROM vector_search('items', ?, 5)", ("'vector'", "parameter"), id="parameter"),
    pytest.param("SELECT * FROM vector_search('items', *, 5)", ("'vector'",), id="star"),
    pytest.param(
        f"SELECT * FROM vector_search('items', {V}, 5, bogus := 1)",
        ("'bogus'", "filter"),
        id="unknown_parameter",
    ),
    pytest.param(
        f"SELECT * FROM vector_search('items', {V}, 5, 'id > 1')", ("at most 3",), id="too_many_positional"
    ),
    pytest.param(f"SELECT * FROM vector_search('items', {V}, 5, k := 3)", ("'k'", "twice"), id="given_twice"),
    pytest.param("SELECT * FROM vector_search()", ("dataset",), id="no_arguments"),
    pytest.param(f"SELECT * FROM vector_search(getenv('HOME'), {V}, 5)", ("getenv",), id="blocked_function"),
    pytest.param(
        f"SELECT * FROM vector_search('items', {V}, unnest([1, 2]))", ("single values",), id="set_argument"
    ),
    pytest.param(
        f"SELECT * FROM vector_search('items', {V}, 5) WITH ORDINALITY", ("ORDINALITY",), id="ordinality"
    ),
    pytest.param(
        f"SELECT * FROM main.vector_search('items', {V}, 5)", ("plain name in FROM",), id="qualified"
    ),
    pytest.param(f"SELECT vector_search('items', {V}, 5)", ("is a table",), id="scalar"),
    pytest.param(
        f"SELECT * FROM items WHERE vector_search('items', {V}, 5)", ("is a table",), id="in_a_filter"
    ),
    pytest.param(
        "CREATE TABLE x AS SELECT * FROM vector_search('items', [1.0], 5)", ("read-only",), id="write"
    ),
]


@pytest.mark.parametrize(("sql", "fragments"), SQL_ERRORS)
def test_bad_calls_are_refused(lake: Lakehouse, sql: str, fragments: tuple[str, ...]) -> None:
    """Non-constant, unknown or malformed arguments and raw uses of the function: INVALID_ARGUMENT."""
    message = refusal(lake, sql, not_found=False)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_search_tables_are_not_datasets(lake: Lakehouse) -> None:
    """The tables standing for searches cannot be named by a query: NOT_FOUND like any unknown dataset."""
    message = refusal(lake, "SELECT * FROM __vector_search_0123456789abcdef0123456789abcdef", not_found=True)
    assert "__vector_search_0123456789abcdef0123456789abcdef" in message


# -- the rewrite, in-process -----------------------------------------------------------------------------


@dataclass
class FakePlan:
    """What :class:`SqlSearch` reads of a search plan."""

    result_schema: pa.Schema


@dataclass
class FakeSearcher:
    """What :class:`SqlSearch` needs of ``VectorSearch``: records the requests, answers ``result``."""

    result: pa.Table
    requests: list[SearchRequest] = field(default_factory=list)

    def plan(self, request: SearchRequest) -> FakePlan:
        self.requests.append(request)
        return FakePlan(self.result.schema)

    def search(self, plan: FakePlan) -> pa.Table:
        return self.result


def test_search_tables_belong_to_their_cursor() -> None:
    """The rewrite keeps the alias; the registered result is readable on the query's cursor only, and the
    sandbox accepts its name only where the engine vouches for it."""
    searcher = FakeSearcher(pa.table({"id": [1, 2], "_distance": pa.array([0.0, 0.5], pa.float32())}))
    sql_search = SqlSearch(cast(Any, searcher))
    database = duckdb.connect(":memory:")
    mine, other = database.cursor(), database.cursor()
    rewritten = sql_search.rewrite(
        mine, "SELECT v.id FROM vector_search('t', [1, 2.5], 2, filter := 'id > 0') v"
    )
    (name,) = rewritten.tables
    assert f"{name} AS v" in rewritten.sql
    assert check_select(mine, rewritten.sql, set(rewritten.tables)) == {name}

    sql_search.register(mine, rewritten.calls, run=False)
    assert mine.sql(rewritten.sql).fetchall() == []
    assert searcher.requests == [SearchRequest(dataset="t", vector=[1.0, 2.5], k=2, filter="id > 0")]

    fresh = sql_search.rewrite(mine, "SELECT v.id FROM vector_search('t', [1, 2.5], 2) v")
    sql_search.register(mine, fresh.calls)
    assert mine.sql(fresh.sql).fetchall() == [(1,), (2,)]
    (fresh_name,) = fresh.tables
    with pytest.raises(duckdb.CatalogException):
        other.sql(f"SELECT * FROM {fresh_name}").fetchall()
    with pytest.raises(NotFound):
        check_select(other, f"SELECT * FROM {fresh_name}", set())
