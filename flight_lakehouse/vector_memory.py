"""One Lance table held in memory for search: an HNSW graph, the vectors, the other columns.

A :class:`ServedTable` covers exactly one Lance version. Each live row of the table has a *slot*: the
faiss HNSW graph (over 8-bit scalar-quantised vectors, unit length for cosine) holds slot ``i`` as its
``i``-th vector, ``vectors[i]`` is the original float32 vector (exact re-ranking, result rows) and row
``i`` of ``columns`` holds the other columns (result rows, filters). Slots of one Lance fragment are
consecutive, in row-offset order, so a Lance version is followed by fragment differences: a new
fragment adds slots, rows deleted from a known fragment are tombstoned, a fragment gone (compaction,
overwrite) is tombstoned whole. A rebuild folds tombstones in.
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import faiss
    import lance

ROW_ADDRESS = "_rowaddr"
#: A filter keeping at most this many rows (or this share) is answered by an exact scan over them.
EXACT_ROWS = 4096
EXACT_SHARE = 0.02
#: Graph candidates per result row, re-ranked exactly with the original vectors.
REFINE = 4
RERANK_QUERIES = 32
#: Batches of at least this many queries spread their graph search over OpenMP threads.
PARALLEL_QUERIES = 64
DEFAULT_EF = 64
TRAINING_ROWS = 20_000  # sample the quantiser's ranges are learnt from
ADD_BATCH_ROWS = 8192
OFFSETS_NONE = np.empty(0, dtype=np.int64)


def exact_distances(metric: str, vectors: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Query-by-vector distances in Lance's conventions: cosine ``1 - cos``, l2 squared, dot ``1 - x.q``.

    ``vectors`` is a matrix shared by all queries (a column per vector), or one matrix per query
    (``(queries, candidates, dimension)``: each query against its own candidates). Computed in float64
    (an exact match has distance 0, not the float32 rounding of |q|^2 - 2q.x + |x|^2).
    """
    queries, vectors = np.asarray(queries, dtype=np.float64), np.asarray(vectors, dtype=np.float64)
    per_query = vectors.ndim == 3
    dots = np.einsum("qcd,qd->qc", vectors, queries) if per_query else queries @ vectors.T
    if metric == "dot":
        return 1.0 - dots
    vector_squares = np.einsum("...d,...d->...", vectors, vectors)
    if not per_query:
        vector_squares = vector_squares[None, :]
    query_squares = np.einsum("qd,qd->q", queries, queries)[:, None]
    if metric == "l2":
        return np.maximum(query_squares + vector_squares - 2.0 * dots, 0.0)
    norms = np.sqrt(query_squares * vector_squares)
    return 1.0 - dots / np.where(norms == 0, 1.0, norms)


def top_k(distances: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``distances`` (a column per slot of ``slots``, shared or one row of slots per row):
    its k nearest slots, nearest first."""
    take = min(k, distances.shape[1])
    if take == 0:
        rows = distances.shape[0]
        return np.empty((rows, 0), dtype=np.int64), np.empty((rows, 0), dtype=np.float32)
    part = np.argpartition(distances, take - 1, axis=1)[:, :take]
    nearest = np.take_along_axis(distances, part, axis=1)
    order = np.take_along_axis(part, np.argsort(nearest, axis=1, kind="stable"), axis=1)
    chosen = np.take_along_axis(slots, order, axis=1) if slots.ndim == 2 else slots[order]
    return chosen, np.take_along_axis(distances, order, axis=1)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` scaled to unit length (zero rows stay zero)."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1.0, norms)


def vector_matrix(column: pa.ChunkedArray | pa.Array, dimension: int) -> np.ndarray:
    """A ``fixed_size_list`` column as a (rows, dimension) float32 matrix."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks() if column.num_chunks else pa.array([], column.type)
    values = column.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(-1, dimension)


class ReadWriteLock:
    """Many readers at once, or one writer; a waiting writer holds new readers back."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold the lock shared (searches)."""
        with self._changed:
            self._changed.wait_for(lambda: not (self._writing or self._writers_waiting))
            self._readers += 1
        try:
            yield
        finally:
            with self._changed:
                self._readers -= 1
                self._changed.notify_all()

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the lock alone (changes to the graph and the slots)."""
        with self._changed:
            self._writers_waiting += 1
            self._changed.wait_for(lambda: not (self._writing or self._readers))
            self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._changed:
                self._writing = False
                self._changed.notify_all()


@dataclass
class FragmentSlots:
    """The slots of one Lance fragment: consecutive from ``first``, one per row offset in ``offsets``."""

    first: int
    offsets: np.ndarray


@dataclass(frozen=True)
class GraphSettings:
    """HNSW parameters of the in-memory graphs."""

    m: int = 32
    ef_construction: int = 64
    ef_search: int = DEFAULT_EF


@dataclass
class ServedTable:
    """One Lance table in memory, at one version (see the module docstring)."""

    name: str
    vector_column: str
    dimension: int
    metric: str
    graph: faiss.Index
    columns: pa.Table  # the other columns, one row per slot
    version: int
    settings: GraphSettings
    vectors: np.ndarray = field(default_factory=lambda: np.empty((0, 0), np.float32))
    alive: np.ndarray = field(default_factory=lambda: np.empty(0, bool))
    fragments: dict[int, FragmentSlots] = field(default_factory=dict)
    size: int = 0
    trained_rows: int = 0  # rows the quantiser's ranges were learnt from
    live: int = 0  # rows a search can return (live slots), counted after each change
    lock: ReadWriteLock = field(default_factory=ReadWriteLock, repr=False)

    @classmethod
    def empty(
        cls, name: str, schema: pa.Schema, vector_column: str, metric: str, settings: GraphSettings
    ) -> ServedTable:
        """A table with no slots yet, for ``schema``."""
        dimension = schema.field(vector_column).type.list_size
        others = pa.schema([f for f in schema if f.name != vector_column])
        served = cls(
            name,
            vector_column,
            dimension,
            metric,
            new_graph(dimension, metric, settings),
            others.empty_table(),
            version=0,
            settings=settings,
        )
        served.vectors = np.empty((0, dimension), dtype=np.float32)
        return served

    @classmethod
    def restore(
        cls,
        name: str,
        saved: Mapping[str, Any],
        schema: pa.Schema,
        read_fragment: Callable[[int], pa.Table],
        settings: GraphSettings,
    ) -> ServedTable | None:
        """A table from :meth:`to_bytes`, its rows read (with ``_rowaddr``) from the saved version's
        fragments by ``read_fragment``; None when they do not match the saved slots."""
        import faiss

        version, dimension, size = (int(value) for value in saved["facts"])
        column, metric = str(saved["vector_column"]), str(saved["metric"])
        if column not in schema.names or schema.field(column).type.list_size != dimension:
            return None
        served = cls.empty(name, schema, column, metric, settings)
        alive = saved["alive"].astype(bool)
        vectors = np.zeros((size, dimension), dtype=np.float32)
        source = np.zeros(size, dtype=np.int64)  # slot -> row of the rows read (dead slots: row 0)
        pieces: list[pa.Table] = []
        read = 0
        splits = np.cumsum(saved["fragment_sizes"])[:-1]
        for fragment_id, first, offsets in zip(
            saved["fragment_ids"], saved["fragment_firsts"], np.split(saved["offsets"], splits), strict=True
        ):
            rows = read_fragment(int(fragment_id))
            live = np.flatnonzero(alive[first : first + len(offsets)])
            if not np.array_equal(offsets_of(rows.column(ROW_ADDRESS)), offsets[live]):
                return None
            vectors[first + live] = vector_matrix(rows.column(column), dimension)
            source[first + live] = np.arange(read, read + rows.num_rows)
            read += rows.num_rows
            pieces.append(rows.drop_columns([column, ROW_ADDRESS]).select(served.columns.column_names))
            served.fragments[int(fragment_id)] = FragmentSlots(int(first), offsets)
        if read == 0:
            return None
        rows_read = pa.concat_tables(pieces).cast(served.columns.schema)
        served.columns = rows_read.take(pa.array(source))
        served.graph = faiss.deserialize_index(saved["graph"])
        served.vectors, served.alive, served.size = vectors, alive, size
        served.version, served.trained_rows = version, size
        served.live = int(alive.sum())
        return served

    @property
    def tombstones(self) -> int:
        """Slots of deleted rows still in the graph."""
        return self.size - self.live

    @property
    def nbytes(self) -> int:
        """Memory held: vectors, graph (codes and links), columns, bookkeeping."""
        return int(self.vectors.nbytes + graph_bytes(self.graph) + self.columns.nbytes + self.alive.nbytes)

    # -- search ----------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots and distances of the k nearest live (and allowed) rows of each query, nearest first.

        Few candidate rows: an exact scan over them. Otherwise the graph proposes ``REFINE * k``
        candidates (restricted to the allowed slots) and the original vectors rank them exactly.
        Fewer than k rows found: slot -1 (or fewer columns) in their place.
        """
        with self.lock.reading():
            mask = self.alive[: self.size]
            count = self.live
            if allowed is not None:
                mask = mask & allowed[: self.size]
                count = int(mask.sum())
            if count <= max(EXACT_ROWS, EXACT_SHARE * self.size):
                return self._exact_scan(queries, np.flatnonzero(mask), k)
            candidates = self._candidates(queries, min(count, REFINE * k), mask, count, ef)
            return self._rerank(queries, candidates, k)

    def _exact_scan(self, queries: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of ``slots`` for each query, by exact distance; ``RERANK_QUERIES`` queries at a
        time, so that a large batch never holds a distance for every (query, slot) pair at once."""
        vectors = self.vectors[slots].astype(np.float64)
        parts = [
            top_k(exact_distances(self.metric, vectors, queries[start : start + RERANK_QUERIES]), slots, k)
            for start in range(0, max(len(queries), 1), RERANK_QUERIES)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _candidates(
        self, queries: np.ndarray, wanted: int, mask: np.ndarray, count: int, ef: int | None
    ) -> np.ndarray:
        import faiss

        params = faiss.SearchParametersHNSW()
        params.efSearch = max(ef or self.settings.ef_search, wanted)
        bitmap = None
        if count < self.size:
            bitmap = np.packbits(mask, bitorder="little")
            params.sel = faiss.IDSelectorBitmap(self.size, faiss.swig_ptr(bitmap))
        # OpenMP threads only for large batches (DoExchange): for a few queries, waking the other
        # threads costs more than it saves, and concurrent searches already run two batches at once
        # (1 client: 2.1 -> 1.5-1.7 ms of server CPU per query; 10 clients: no worse)
        faiss.omp_set_num_threads(search_threads() if len(queries) >= PARALLEL_QUERIES else 1)
        _, candidates = self.graph.search(self._graph_form(queries), wanted, params=params)
        del bitmap  # the selector points into it: alive until the search has returned
        return candidates

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each query's candidate slots (-1: none), by exact distance.

        The candidates' vectors are gathered (in float64) for ``RERANK_QUERIES`` queries at a time: a
        DoExchange batch of 500 queries at once took 150 MB of temporaries at 384 dimensions.
        """
        missing = candidates < 0
        slots = np.where(missing, 0, candidates)
        distances = np.empty(slots.shape, dtype=np.float64)
        for start in range(0, len(queries), RERANK_QUERIES):
            rows = slice(start, start + RERANK_QUERIES)
            distances[rows] = exact_distances(self.metric, self.vectors[slots[rows]], queries[rows])
        distances[missing] = np.inf
        nearest, nearest_distances = top_k(distances, slots, k)
        nearest[np.isinf(nearest_distances)] = -1
        return nearest, nearest_distances.astype(np.float32)

    def _graph_form(self, vectors: np.ndarray) -> np.ndarray:
        """Vectors as the graph holds them: unit length for cosine."""
        form = unit_rows(vectors) if self.metric == "cosine" else vectors
        return np.ascontiguousarray(form, dtype=np.float32)

    def rows(self, slots: np.ndarray, columns: list[str]) -> pa.Table:
        """The rows of ``slots`` with ``columns`` (in that order; the vector column included if named)."""
        with self.lock.reading():
            others = [name for name in columns if name != self.vector_column]
            table = self.columns.select(others).take(pa.array(slots, pa.int64()))
            if self.vector_column in columns:
                values = pa.array(self.vectors[slots].ravel(), pa.float32())
                vectors = pa.FixedSizeListArray.from_arrays(values, self.dimension)
                table = table.append_column(self.vector_column, vectors)
        return table.select(columns)

    # -- following Lance -------------------------------------------------------------------------
    def pending_rows(self, dataset: lance.LanceDataset) -> int:
        """Rows of ``dataset`` in fragments this copy does not have yet."""
        return sum(f.count_rows() for f in dataset.get_fragments() if f.fragment_id not in self.fragments)

    def catch_up(self, dataset: lance.LanceDataset) -> None:
        """Follow ``dataset`` (a later version): add new fragments, tombstone deleted rows."""
        current = {fragment.fragment_id: fragment for fragment in dataset.get_fragments()}
        with self.lock.writing():
            for fragment_id in [known for known in self.fragments if known not in current]:
                self._tombstone(fragment_id, None)
            for fragment_id, fragment in current.items():
                known = self.fragments.get(fragment_id)
                if known is None:
                    self._add_fragment(fragment)
                elif fragment.count_rows() < int(
                    self.alive[known.first : known.first + len(known.offsets)].sum()
                ):
                    live = fragment.to_table(columns=[], with_row_address=True).column(ROW_ADDRESS)
                    self._tombstone(fragment_id, offsets_of(live))
            self.columns = self.columns.combine_chunks()  # one chunk per column: fast takes
            self.version = dataset.version
            self.live = int(self.alive[: self.size].sum())

    def _add_fragment(self, fragment: lance.LanceFragment) -> None:
        """Append a new fragment's live rows as slots, batch by batch (memory: one batch at a time)."""
        first = self.size
        self._reserve(first + fragment.count_rows())
        offsets = []
        for batch in fragment.to_batches(batch_size=ADD_BATCH_ROWS, with_row_address=True):
            self._add_rows(batch)
            offsets.append(offsets_of(batch.column(ROW_ADDRESS)))
        self.fragments[fragment.fragment_id] = FragmentSlots(first, np.concatenate([*offsets, OFFSETS_NONE]))

    def _add_rows(self, rows: pa.RecordBatch) -> None:
        vectors = vector_matrix(rows.column(self.vector_column), self.dimension)
        first, count = self.size, len(vectors)
        self._reserve(first + count)
        self.vectors[first : first + count] = vectors
        self.alive[first : first + count] = True
        if not self.graph.is_trained:  # no sample was given: the first rows set the 8-bit ranges
            self.train(vectors[:TRAINING_ROWS])
        others = pa.Table.from_batches([rows]).select(self.columns.column_names)
        self.columns = pa.concat_tables([self.columns, others.cast(self.columns.schema)])
        self.graph.add(self._graph_form(vectors))
        self.size += count

    def train(self, sample: np.ndarray) -> None:
        """Learn the 8-bit quantiser's ranges from a sample of the table's vectors."""
        self.graph.train(self._graph_form(sample))
        self.trained_rows = len(sample)

    def _reserve(self, capacity: int) -> None:
        if capacity <= len(self.vectors):
            return
        grown = max(capacity, len(self.vectors) * 3 // 2 + 1024)
        vectors = np.zeros((grown, self.dimension), dtype=np.float32)
        vectors[: self.size] = self.vectors[: self.size]
        alive = np.zeros(grown, dtype=bool)
        alive[: self.size] = self.alive[: self.size]
        self.vectors, self.alive = vectors, alive

    def _tombstone(self, fragment_id: int, live_offsets: np.ndarray | None) -> None:
        """Mark a fragment's deleted rows dead (all of them, and forget it, when it is gone)."""
        known = self.fragments[fragment_id]
        if live_offsets is None:
            self.alive[known.first : known.first + len(known.offsets)] = False
            del self.fragments[fragment_id]
            return
        gone = np.flatnonzero(~np.isin(known.offsets, live_offsets, assume_unique=True))
        self.alive[known.first + gone] = False

    # -- saving ----------------------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        """The graph and its slot map as one ``.npz`` object (the rows are re-read from Lance)."""
        import faiss

        with self.lock.reading():
            fragment_ids = list(self.fragments)
            arrays = {
                "graph": faiss.serialize_index(self.graph),
                "alive": self.alive[: self.size],
                "fragment_ids": np.array(fragment_ids, dtype=np.int64),
                "fragment_firsts": np.array([self.fragments[f].first for f in fragment_ids], dtype=np.int64),
                "fragment_sizes": np.array([len(self.fragments[f].offsets) for f in fragment_ids], np.int64),
                "offsets": np.concatenate(
                    [self.fragments[f].offsets for f in fragment_ids] + [np.empty(0, np.int64)]
                ),
                "facts": np.array([self.version, self.dimension, self.size], dtype=np.int64),
                "metric": np.array(self.metric),
                "vector_column": np.array(self.vector_column),
            }
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        return buffer.getvalue()


@functools.cache
def search_threads() -> int:
    """OpenMP threads a large batched graph search uses: ``OMP_NUM_THREADS``, else one per CPU (as
    OpenMP's own default; read here because the calling thread's OpenMP setting may have been lowered)."""
    configured = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(configured) if configured.isdigit() and int(configured) > 0 else len(os.sched_getaffinity(0))


def offsets_of(addresses: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Row offsets within their fragment of Lance row addresses (fragment id << 32 | offset)."""
    if isinstance(addresses, pa.ChunkedArray):
        addresses = addresses.combine_chunks() if addresses.num_chunks else pa.array([], pa.uint64())
    return (addresses.to_numpy(zero_copy_only=False) & 0xFFFFFFFF).astype(np.int64)


def new_graph(dimension: int, metric: str, settings: GraphSettings) -> faiss.Index:
    """An empty HNSW graph over 8-bit quantised vectors; inner product for cosine (unit vectors) and dot."""
    import faiss

    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    graph = faiss.IndexHNSWSQ(dimension, faiss.ScalarQuantizer.QT_8bit, settings.m, kind)
    graph.hnsw.efConstruction = settings.ef_construction
    return graph


def estimated_bytes(rows: int, dimension: int, settings: GraphSettings) -> int:
    """Memory a table of ``rows`` vectors will take in memory (vectors, codes, links), before it is built."""
    return int(rows * (4 * dimension + dimension + 2 * settings.m * 4 * 1.1 + 64))


def graph_bytes(graph: faiss.Index) -> int:
    """Memory of an HNSW-SQ8 graph: one byte per dimension per vector, and its links."""
    hnsw = graph.hnsw
    return int(graph.ntotal * graph.d + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8)
