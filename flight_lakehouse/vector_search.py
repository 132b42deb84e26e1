"""Vector, full-text and hybrid search over the Lance tables, for one query or a stream of them.

One :class:`SearchPlan` per request: the request is checked once against the table (columns, vector
column, metric, filter, query vectors). The in-memory copy answers k-NN searches it serves; Lance answers
the others (a batch nearest query through pylance), and lancedb's query builder runs full-text and hybrid
searches. The action, the DoGet ticket and DoExchange all go through :meth:`VectorSearch.plan`.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from flight_lakehouse.batching import Coalescer
from flight_lakehouse.commands import SearchRequest
from flight_lakehouse.datasets.lance import LanceTables
from flight_lakehouse.datasets.registry import Datasets
from flight_lakehouse.errors import InvalidArgument
from flight_lakehouse.sandbox import checked_predicate, column_references
from flight_lakehouse.semantic import TextEmbedding, embedding_records, text_column
from flight_lakehouse.vector_cache import VectorCache
from flight_lakehouse.vector_memory import ServedTable, StaleFilter
from flight_lakehouse.vectors import lance_error, problem_rows, table_metric, vector_columns

if TYPE_CHECKING:
    from lancedb.query import LanceQueryBuilder
    from lancedb.table import LanceTable

#: One single-vector search waiting in a batch: its plan and its query vector.
OneQuery = tuple["SearchPlan", np.ndarray]
#: Search batches of one table run at once: while one waits for the GIL, the other's graph search runs
#: (in memory, 10 clients on 2 cores: 1 batch ~850 q/s, 2 batches ~970, 3 no better).
BATCHES_AT_ONCE = 2
#: Result rows one DoExchange lancedb query may produce (query vectors x k); larger batches are split.
MAX_EXCHANGE_ROWS = 1_000_000
#: Evaluations of a search filter on the in-memory rows before Lance answers instead (rows added meanwhile).
FILTER_TRIES = 3
DISTANCE = "_distance"
SCORE = "_score"
QUERY_INDEX = "_query_index"
#: The column Lance tags batch-query rows with (int32).
LANCE_QUERY_INDEX = "query_index"
#: IVF partitions searched when the request does not say (lancedb's default, kept).
DEFAULT_NPROBES = 20


@dataclass(frozen=True)
class SearchPlan:
    """A checked search request against one open table."""

    request: SearchRequest
    tables: LanceTables
    vector_column: str
    dimension: int
    metric: str
    columns: list[str]
    schema: pa.Schema  # the table's

    @property
    def table(self) -> LanceTable:
        """lancedb's handle of the table, for full-text and hybrid search (loads lancedb on first use)."""
        return self.tables.table(self.request.dataset)

    @cached_property
    def result_schema(self) -> pa.Schema:
        """The schema of the result rows: the chosen columns, then ``_distance`` or ``_score``."""
        fields = [self.schema.field(name) for name in self.columns]
        is_vector = self.request.text is None
        fields.append(pa.field(DISTANCE if is_vector else SCORE, pa.float32()))
        return pa.schema(fields)

    @cached_property
    def exchange_schema(self) -> pa.Schema:
        """The schema of DoExchange results: ``_query_index`` first."""
        return self.result_schema.insert(0, pa.field(QUERY_INDEX, pa.int64()))

    def query_vectors(self, values: Any, first_row: int = 0) -> np.ndarray:
        """Query vectors as a float32 matrix, refusing wrong dimensions, NaN/Inf and zero cosine vectors."""
        matrix = np.asarray(values, dtype=np.float32)
        if matrix.ndim == 1:
            matrix = matrix.reshape(1, -1)
        if matrix.shape[1] != self.dimension:
            raise InvalidArgument(
                f"query vector has dimension {matrix.shape[1]}; column {self.vector_column!r} has "
                f"{self.dimension}"
            )
        bad = problem_rows(matrix, self.metric)
        if bad is not None:
            row, reason = bad
            where = f"query vector {first_row + row}" if first_row or matrix.shape[0] > 1 else "query vector"
            raise InvalidArgument(f"{where} {reason}")
        return matrix


class VectorSearch:
    """Runs search requests on the Lance tables."""

    def __init__(self, datasets: Datasets, cache: VectorCache, texts: TextEmbedding | None = None) -> None:
        self.datasets = datasets
        #: The server's text embedding (searches by ``query`` text; DoExchange streams of texts).
        self.texts = texts
        self.tables = datasets.lance
        self.cache = cache
        self._parser = duckdb.connect(":memory:", config={"enable_external_access": False})
        self._parser_guard = threading.Lock()
        self._coalescers: dict[str, Coalescer[OneQuery, pa.Table]] = {}

    # -- planning --------------------------------------------------------------------------------
    def plan(self, request: SearchRequest, exchange: bool = False) -> SearchPlan:
        """Check ``request`` against its table."""
        if exchange and (request.vector is not None or request.text is not None or request.query is not None):
            raise InvalidArgument("a DoExchange search takes its query vectors from the stream, not the body")
        if not exchange and request.vector is None and request.text is None and request.query is None:
            raise InvalidArgument("a search needs 'vector' or 'query' (text to embed), 'text', or both")
        if request.vector is not None and request.query is not None:
            raise InvalidArgument("a search takes 'vector' or 'query' (text to embed), not both")
        name = request.dataset
        self.datasets.vector_table(name, "search")
        schema = self.tables.schema(name)
        vector_column, dimension = self._vector_column(request, schema)
        if request.query is not None:
            vector = self._text_embedding().query_vectors(name, schema, vector_column, [request.query])[0]
            request = request.model_copy(update={"vector": vector.tolist(), "query": None})
        metric = request.metric or table_metric(schema)
        columns = self._columns(request, schema)
        if request.filter is not None:
            self.check_filter(request.filter, schema, name)
        plan = SearchPlan(request, self.tables, vector_column, dimension, metric, columns, schema)
        if request.vector is not None:
            plan.query_vectors(request.vector)
        return plan

    def _text_embedding(self) -> TextEmbedding:
        if self.texts is None:
            raise InvalidArgument("this server does not embed text")
        return self.texts

    @staticmethod
    def _vector_column(request: SearchRequest, schema: pa.Schema) -> tuple[str, int]:
        vectors = vector_columns(schema)
        if request.column is None and request.query is not None:
            records = embedding_records(schema)
            if records:  # the column searches by text use: the newest embedded from text
                return records[-1].into, records[-1].dimension
        if request.column is not None:
            if request.column not in vectors:
                raise InvalidArgument(
                    f"column {request.column!r} is not a vector column of {request.dataset!r}"
                )
            return request.column, vectors[request.column]
        if len(vectors) != 1:
            raise InvalidArgument(
                f"dataset {request.dataset!r} has vector columns {sorted(vectors)}; name one with 'column'"
            )
        return next(iter(vectors.items()))

    @staticmethod
    def _columns(request: SearchRequest, schema: pa.Schema) -> list[str]:
        if request.columns is None:
            return list(schema.names)
        for column in request.columns:
            if column not in schema.names:
                raise InvalidArgument(f"unknown column {column!r} in dataset {request.dataset!r}")
        return list(dict.fromkeys(request.columns))

    def check_filter(self, predicate: str, schema: pa.Schema | None = None, dataset: str = "") -> None:
        """Refuse a filter that is not exactly one SQL predicate passing the sandbox (no subqueries) or,
        given the table's ``schema``, one naming a column the table does not have."""
        with self._parser_guard:
            cursor = self._parser.cursor()
        try:
            where, _ = checked_predicate(cursor, predicate)
        except duckdb.Error as exc:
            raise InvalidArgument(f"filter does not parse: {str(exc).splitlines()[0]}") from None
        finally:
            cursor.close()
        if schema is not None:
            check_filter_columns(where, schema, dataset)

    # -- running ---------------------------------------------------------------------------------
    def search(self, plan: SearchPlan) -> pa.Table:
        """The nearest (or best-scoring) rows of one request, nearest first."""
        request = plan.request
        vector = plan.query_vectors(request.vector)[0] if request.vector is not None else None
        with self.tables.reading(request.dataset):  # an optimize meanwhile leaves the files read
            if request.text is not None and vector is None:
                builder = plan.table.search(request.text, query_type="fts")
            elif request.text is not None:
                from lancedb.rerankers import RRFReranker

                builder = (
                    plan.table.search(query_type="hybrid", vector_column_name=plan.vector_column)
                    .vector(vector)
                    .text(request.text)
                    .rerank(RRFReranker(return_score="relevance"))
                )
            else:
                return self._nearest(plan, vector)
            return self._run(plan, builder).select(plan.result_schema.names).cast(plan.result_schema)

    def exchange(self, plan: SearchPlan, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """For every query vector of the stream, in order, its k nearest rows tagged ``_query_index``."""
        first_row = 0
        queries_per_call = max(1, MAX_EXCHANGE_ROWS // plan.request.k)
        for batch in batches:
            for start in range(0, batch.num_rows, queries_per_call):
                queries = batch.slice(start, queries_per_call)
                with self.tables.reading(plan.request.dataset):
                    results = list(self._exchange_batch(plan, queries, first_row))
                yield from results
                first_row += min(queries_per_call, batch.num_rows - start)

    def _exchange_batch(
        self, plan: SearchPlan, batch: pa.RecordBatch, first_row: int
    ) -> Iterator[pa.RecordBatch]:
        """The results of one slice of query vectors, the first being query ``first_row`` of the stream."""
        if batch.num_rows == 0:
            return
        matrix = plan.query_vectors(self._query_matrix(plan, batch, first_row), first_row)
        in_memory = self._from_memory(plan, matrix)
        if in_memory is not None:
            rows, query_rows = in_memory
            tagged = rows.add_column(0, QUERY_INDEX, pa.array(query_rows + first_row, pa.int64()))
            yield from tagged.cast(plan.exchange_schema).to_batches()
            return
        result = self._lance_nearest(plan, matrix)
        indexes = pc.add(result.column(LANCE_QUERY_INDEX).cast(pa.int64()), first_row)
        result = result.append_column(QUERY_INDEX, indexes)
        yield from result.select(plan.exchange_schema.names).cast(plan.exchange_schema).to_batches()

    def _query_matrix(self, plan: SearchPlan, batch: pa.RecordBatch, first_row: int) -> np.ndarray:
        """The query vectors of a DoExchange batch: its vectors, or its texts embedded (a ``query`` column,
        or the only text column of a batch without list columns)."""
        texts = text_query_column(batch)
        if texts is None:
            return query_matrix(batch, plan.dimension)
        request = plan.request
        values = text_column(batch.column(texts), texts, first_row)
        return self._text_embedding().query_vectors(request.dataset, plan.schema, plan.vector_column, values)

    def _nearest(self, plan: SearchPlan, vector: np.ndarray) -> pa.Table:
        """The k nearest rows of one query vector.

        Concurrent searches of a table are answered together (see ``batching``): from the in-memory
        graph when it serves the table, otherwise one multi-vector Lance query per distinct set of
        parameters. A filtered search the graph serves is answered at once (its filter gives the
        allowed rows of that search alone).
        """
        if plan.request.filter is not None:
            in_memory = self._from_memory(plan, vector.reshape(1, -1))
            if in_memory is not None:
                return in_memory[0].cast(plan.result_schema)
        name = plan.request.dataset
        coalescer = self._coalescers.get(name)
        if coalescer is None:
            coalescer = self._coalescers.setdefault(name, Coalescer(self._nearest_batch, BATCHES_AT_ONCE))
        return coalescer.submit((plan, vector))

    def _nearest_batch(self, queries: Sequence[OneQuery]) -> list[pa.Table | BaseException]:
        """The results of concurrent searches of one table: one graph search per distinct (k, ef) for
        those the graph serves, one Lance query per distinct request (the vector aside) for the others.
        A failing Lance query fails only the searches it answers."""
        results: list[pa.Table | BaseException] = [ValueError("not searched")] * len(queries)
        served = self.cache.served(queries[0][0].request.dataset)
        from_memory: dict[tuple[int, int | None], list[int]] = {}
        from_lance: dict[str, list[int]] = {}
        for index, (plan, _) in enumerate(queries):
            if served is not None and plan.request.filter is None and self._serves(served, plan):
                from_memory.setdefault((plan.request.k, plan.request.ef), []).append(index)
            else:
                from_lance.setdefault(plan.request.model_dump_json(exclude={"vector"}), []).append(index)
        for (k, ef), members in from_memory.items():
            assert served is not None
            slots, distances = served.search(np.stack([queries[i][1] for i in members]), k, None, ef)
            plans = [queries[i][0] for i in members]
            for index, table in zip(members, result_tables(served, plans, slots, distances), strict=True):
                results[index] = table
        for members in from_lance.values():
            plan = queries[members[0]][0]
            try:
                tables = self._nearest_from_lance(plan, np.stack([queries[i][1] for i in members]))
            except Exception as exc:  # e.g. a filter Lance refuses: those searches fail, not the batch
                tables = [exc] * len(members)
            for index, table in zip(members, tables, strict=True):
                results[index] = table
        return results

    def _nearest_from_lance(self, plan: SearchPlan, matrix: np.ndarray) -> list[pa.Table]:
        """One table per query vector (rows of ``matrix``) from one Lance query with ``plan``'s parameters."""
        result = self._lance_nearest(plan, matrix)
        owners = result.column(LANCE_QUERY_INDEX).to_numpy()
        bounds = np.searchsorted(owners, np.arange(len(matrix) + 1))
        rows = result.select(plan.result_schema.names).cast(plan.result_schema)
        return [rows.slice(start, stop - start) for start, stop in itertools.pairwise(bounds)]

    def _lance_nearest(self, plan: SearchPlan, matrix: np.ndarray) -> pa.Table:
        """The k nearest rows of every query vector (rows of ``matrix``) in one Lance batch query, tagged
        with Lance's ``query_index``, by query then distance. The first ``nprobes`` partitions are searched,
        more only while fewer than k rows pass the filter."""
        request = plan.request
        nearest: dict[str, Any] = {
            "column": plan.vector_column,
            "q": matrix,
            "k": request.k,
            "metric": plan.metric,
            "minimum_nprobes": request.nprobes or DEFAULT_NPROBES,
        }
        if request.refine_factor is not None:
            nearest["refine_factor"] = request.refine_factor
        if request.ef is not None:
            nearest["ef"] = request.ef
        dataset = self.tables.dataset(request.dataset)
        try:
            result = dataset.to_table(
                columns=plan.columns, filter=request.filter, prefilter=True, nearest=nearest
            )
        except Exception as exc:
            raise lance_error(exc, self.tables.storage.root_uri, f"search on {request.dataset!r}") from None
        return result.sort_by([(LANCE_QUERY_INDEX, "ascending"), (DISTANCE, "ascending")])

    def _from_memory(self, plan: SearchPlan, queries: np.ndarray) -> tuple[pa.Table, np.ndarray] | None:
        """The result rows (and the query each answers) from the in-memory graph, if it can serve."""
        served = self._served(plan)
        if served is None:
            return None
        for _ in range(FILTER_TRIES):
            allowed = None
            if plan.request.filter is not None:
                try:
                    allowed = self.cache.allowed(served, plan.request.filter)
                except duckdb.Error:  # e.g. a predicate on the vector column: Lance evaluates it
                    return None
            try:
                slots, distances = served.search(queries, plan.request.k, allowed, plan.request.ef)
                break
            except StaleFilter:  # rows were added while the filter ran: run it again
                continue
        else:
            return None  # rows keep coming: Lance answers
        found = slots >= 0
        rows = served.rows(slots[found], plan.columns)
        rows = rows.append_column(DISTANCE, pa.array(distances[found], pa.float32()))
        return rows, np.nonzero(found)[0]

    def _served(self, plan: SearchPlan) -> ServedTable | None:
        if plan.request.text is not None:
            return None
        served = self.cache.served(plan.request.dataset)
        return served if served is not None and self._serves(served, plan) else None

    @staticmethod
    def _serves(served: ServedTable, plan: SearchPlan) -> bool:
        """Whether the in-memory copy answers ``plan`` (its metric and vector column)."""
        return served.metric == plan.metric and served.vector_column == plan.vector_column

    def _run(self, plan: SearchPlan, builder: LanceQueryBuilder) -> pa.Table:
        """A full-text or hybrid search through lancedb's query builder."""
        request = plan.request
        if request.vector is not None:  # hybrid: the vector half
            builder = builder.distance_type(plan.metric)
            if request.nprobes is not None:
                builder = builder.nprobes(request.nprobes)
            # more partitions only when the first ones hold fewer than k rows passing the filter
            builder = builder.maximum_nprobes(0)
            if request.refine_factor is not None:
                builder = builder.refine_factor(request.refine_factor)
            if request.ef is not None:
                builder = builder.ef(request.ef)
        if request.filter is not None:
            builder = builder.where(request.filter, prefilter=True)
        builder = builder.select(plan.columns).limit(request.k)
        try:
            result = builder.to_arrow()
        except Exception as exc:
            raise lance_error(exc, self.tables.storage.root_uri, f"search on {request.dataset!r}") from None
        if "_relevance_score" in result.column_names:
            result = result.rename_columns(
                [SCORE if n == "_relevance_score" else n for n in result.column_names]
            )
        return result


def result_tables(
    served: ServedTable, plans: Sequence[SearchPlan], slots: np.ndarray, distances: np.ndarray
) -> list[pa.Table]:
    """One result table per plan from the rows of a batched search (row i of ``slots`` for plan i);
    the rows of plans selecting the same columns are taken from memory at once."""
    found = slots >= 0
    by_columns: dict[tuple[str, ...], list[int]] = {}
    for index, plan in enumerate(plans):
        by_columns.setdefault(tuple(plan.columns), []).append(index)
    tables: list[pa.Table] = [pa.table({})] * len(plans)
    for columns, members in by_columns.items():
        rows = served.rows(np.concatenate([slots[i][found[i]] for i in members]), list(columns))
        start = 0
        for index in members:
            count = int(found[index].sum())
            piece = rows.slice(start, count)
            values = [*piece.columns, pa.array(distances[index][found[index]], pa.float32())]
            table = pa.Table.from_arrays(values, names=plans[index].result_schema.names)
            schema = plans[index].result_schema
            tables[index] = table if table.schema.equals(schema) else table.cast(schema)
            start += count
    return tables


def check_filter_columns(where: Any, schema: pa.Schema, dataset: str) -> None:
    """Refuse a filter naming a column ``schema`` lacks (names compared ignoring case, as SQL does; a
    dotted name is a struct field of its first part, or a column qualified by a table name)."""
    known = {name.lower() for name in schema.names}
    for parts in column_references(where):
        if not any(part.lower() in known for part in parts[:2]):
            raise InvalidArgument(f"filter names unknown column {'.'.join(parts)!r} of dataset {dataset!r}")


def text_query_column(batch: pa.RecordBatch) -> str | None:
    """The column of query texts of a DoExchange batch, if it sends texts rather than vectors."""
    kinds = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
    texts = [f.name for f in batch.schema if any(kind(f.type) for kind in kinds)]
    if "query" in texts:
        return "query"
    if "vector" in batch.schema.names or len(texts) != 1:
        return None
    lists = [f for f in batch.schema if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type)]
    return texts[0] if not lists else None


def query_matrix(batch: pa.RecordBatch, dimension: int) -> np.ndarray:
    """The query vectors of a DoExchange batch: its ``vector`` column, or its only list column."""
    names = batch.schema.names
    lists = [
        f.name
        for f in batch.schema
        if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type) or pa.types.is_large_list(f.type)
    ]
    name = "vector" if "vector" in names else (lists[0] if len(lists) == 1 else None)
    if name is None:
        raise InvalidArgument(
            f"query batches need a 'vector' column (or exactly one list column); got {names}"
        )
    column = batch.column(name)
    if name not in lists or not (
        pa.types.is_floating(column.type.value_type) or pa.types.is_integer(column.type.value_type)
    ):
        raise InvalidArgument(f"query column {name!r} must hold lists of numbers, got {column.type}")
    if column.null_count:
        raise InvalidArgument("a query vector is null")
    if pa.types.is_fixed_size_list(column.type):
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, column.type.list_size)
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if (lengths != dimension).any():
        row = int(np.flatnonzero(lengths != dimension)[0])
        raise InvalidArgument(
            f"query vector {row} of the batch has dimension {lengths[row]}; expected {dimension}"
        )
    return pc.list_flatten(column).to_numpy(zero_copy_only=False).reshape(-1, dimension)
