"""One Lance table held in memory for search: an HNSW graph, the other columns, and a vector file.

A :class:`ServedTable` covers exactly one Lance version. Each live row of the table has a *slot*: the
faiss HNSW graph (over scalar-quantised vectors, 8 bits a dimension by default, unit length for cosine)
holds slot ``i`` as its ``i``-th vector, row ``i`` of ``columns`` holds the other columns (result rows,
filters) and row ``i`` of ``vectors`` the original float32 vector (exact re-ranking, result rows). The
vectors, four times the size of the graph's 8-bit codes, are not held in process memory: a
:class:`VectorFile` (an unlinked temporary file) keeps them, read by position for the few rows a search
re-ranks, so the kernel's page cache holds them and may drop them under memory pressure. Slots of one
Lance fragment are consecutive, in row-offset order, so a Lance version is followed by fragment
differences: a new fragment adds slots, rows deleted from a known fragment are tombstoned, a fragment gone
(compaction, overwrite) is tombstoned whole. A rebuild folds tombstones in.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    import faiss
    import lance

ROW_ADDRESS = "_rowaddr"
#: A filter keeping at most this many rows (or this share) is answered by an exact scan over them.
EXACT_ROWS = 4096
EXACT_SHARE = 0.02
#: Graph candidates per result row, re-ranked exactly with the original vectors (read from the vector
#: file: 2 rows per result row keep recall@10 where 4 had it, at half the reads).
REFINE = 2
#: Queries re-ranked together. Their candidates' vectors (and float64 copies) are temporaries of each
#: step: 32 at a time grew a server's RSS by 9 MB over a 5,000-query batch search, 8 at a time by 4 MB.
RERANK_QUERIES = 8
#: An exact scan re-ranks this many rows per result row, chosen on their quantised codes.
SCAN_REFINE = 8
#: Batches of at least this many queries spread their graph search over OpenMP threads.
PARALLEL_QUERIES = 64
DEFAULT_EF = 64
TRAINING_ROWS = 20_000  # sample the quantiser's ranges are learnt from
ADD_BATCH_ROWS = 8192
GRAPH_MEMBER = "graph.faiss"  # the faiss index in a saved graph's zip, beside the slot map's .npy arrays
OFFSETS_NONE = np.empty(0, dtype=np.int64)
#: Rows wanted that spread over at most this many times as many slots (and this many bytes) are read
#: in one piece.
DENSE_SPAN = 8
DENSE_BYTES = 16 << 20


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


class BuildStopped(Exception):
    """A build or catch-up given up because its table is gone."""


class StaleFilter(Exception):
    """A search filter's result no longer covers every slot (rows were added since it ran)."""


class VectorFile:
    """Fixed-size float32 rows by slot in an unlinked temporary file (in ``TMPDIR``; gone with the file
    handle, even after a kill): written where a slot is added, read by position."""

    def __init__(self, dimension: int) -> None:
        self.dimension = dimension
        self.row_bytes = 4 * dimension
        self._file = tempfile.TemporaryFile(prefix="lakehouse-vectors-")  # noqa: SIM115 - lives with self
        self.rows = 0  # rows written (slots past the last written row read as zeros)

    @property
    def nbytes(self) -> int:
        """Bytes of the file (in the page cache while it is used, not in the process's memory)."""
        return self.rows * self.row_bytes

    def write(self, first: int, vectors: np.ndarray) -> None:
        """Store ``vectors`` as the rows of slots ``first, first + 1, ...``."""
        data = np.ascontiguousarray(vectors, dtype=np.float32)
        if os.pwrite(self._file.fileno(), data, first * self.row_bytes) != data.nbytes:
            raise OSError(f"short write to the vector file at slot {first}")
        self.rows = max(self.rows, first + len(data))

    def write_slots(self, slots: np.ndarray, vectors: np.ndarray) -> None:
        """Store ``vectors[i]`` as the row of ``slots[i]`` (increasing; the slots between read as zeros),
        one write per run of consecutive slots: no block spanning the gaps of deleted rows."""
        if len(slots):
            breaks = np.flatnonzero(np.diff(slots) != 1) + 1
            for run, rows in zip(np.split(slots, breaks), np.split(vectors, breaks), strict=True):
                self.write(int(run[0]), rows)

    def extend(self, rows: int) -> None:
        """Make the file ``rows`` rows long at least (new rows read as zeros)."""
        if rows > self.rows:
            os.ftruncate(self._file.fileno(), rows * self.row_bytes)
            self.rows = rows

    def read(self, slots: np.ndarray) -> np.ndarray:
        """The rows of ``slots`` (any order, repeats allowed; all written) as a float32 matrix: one
        read of their span when they are dense in it, otherwise one read per row."""
        slots = np.asarray(slots, dtype=np.int64).ravel()
        out = np.empty((len(slots), self.dimension), dtype=np.float32)
        if len(slots) == 0:
            return out
        low, high = int(slots.min()), int(slots.max()) + 1
        if high - low <= DENSE_SPAN * len(slots) and (high - low) * self.row_bytes <= DENSE_BYTES:
            span = np.empty((high - low, self.dimension), dtype=np.float32)
            self._read_rows(span, np.array([low]), span.nbytes)
            return span[slots - low]
        self._read_rows(out, slots, self.row_bytes)
        return out

    def _read_rows(self, out: np.ndarray, firsts: np.ndarray, size: int) -> None:
        """Read ``size`` bytes from the row of each of ``firsts`` into consecutive pieces of ``out``.

        One ``pread`` call per piece through ctypes without releasing the GIL: ``os.pread`` releases
        and takes it back around every row, and under 10 concurrent searches each of those hand-offs
        waits for the other threads (server CPU per search +0.5 ms for 40 rows). ``numpy.memmap`` would
        also read under the GIL, but the pages it touches count in the server's RSS (the vectors are kept
        in the page cache, out of it) and the map would have to follow the file as it grows."""
        fd, base, read = self._file.fileno(), out.ctypes.data, pread_holding_gil()
        done = sum(
            read(fd, base + i * size, size, first * self.row_bytes) for i, first in enumerate(firsts.tolist())
        )
        if done != size * len(firsts):
            raise OSError(f"short read from the vector file ({done} of {size * len(firsts)} bytes)")


@functools.cache
def pread_holding_gil() -> Callable[[int, int, int, int], int]:
    """libc's ``pread(fd, address, count, offset)``, called without releasing the GIL."""
    pread = ctypes.PyDLL(None).pread
    pread.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_long]
    pread.restype = ctypes.c_ssize_t
    return pread


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
    #: Bits a dimension of the graph's codes (4, 6 or 8). Fewer bits, less memory (100k x 384: 38 MB of
    #: codes at 8 bits, 19 MB at 4), but the graph proposes worse candidates: recall@10 after the exact
    #: re-ranking 0.992 / 0.995 / 0.989 at 8 / 6 / 4 bits on that table, but 1.0 / 0.96 / 0.55 on
    #: 20k x 32 tight clusters (the tests' data), where a coarse step hides the neighbours' differences.
    code_bits: int = 8


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
    vectors: VectorFile
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
        return cls(
            name,
            vector_column,
            dimension,
            metric,
            new_graph(dimension, metric, settings),
            others.empty_table(),
            version=0,
            settings=settings,
            vectors=VectorFile(dimension),
        )

    @classmethod
    def restore(
        cls,
        name: str,
        saved: Mapping[str, Any],
        schema: pa.Schema,
        read_fragment: Callable[[int], Iterator[pa.RecordBatch]],
        settings: GraphSettings,
    ) -> ServedTable | None:
        """A table from :func:`read_saved`, its rows read batch by batch (with ``_rowaddr``) from the
        saved version's fragments by ``read_fragment``; None when they do not match the saved slots."""
        version, dimension, size = (int(value) for value in saved["facts"])
        column, metric = str(saved["vector_column"]), str(saved["metric"])
        if column not in schema.names or schema.field(column).type.list_size != dimension:
            return None
        served = cls.empty(name, schema, column, metric, settings)
        alive = saved["alive"].astype(bool)
        source = np.zeros(size, dtype=np.int64)  # slot -> row of the rows read (dead slots: row 0)
        pieces: list[pa.Table] = []
        read = 0
        splits = np.cumsum(saved["fragment_sizes"])[:-1]
        for fragment_id, first, offsets in zip(
            saved["fragment_ids"], saved["fragment_firsts"], np.split(saved["offsets"], splits), strict=True
        ):
            live = first + np.flatnonzero(alive[first : first + len(offsets)])  # in row-offset order
            done = 0
            for batch in read_fragment(int(fragment_id)):
                slots = live[done : done + batch.num_rows]
                found = offsets_of(batch.column(ROW_ADDRESS))
                if len(slots) != batch.num_rows or not np.array_equal(found, offsets[slots - first]):
                    return None
                served.vectors.write_slots(slots, vector_matrix(batch.column(column), dimension))
                source[slots] = np.arange(read, read + batch.num_rows)
                read, done = read + batch.num_rows, done + batch.num_rows
                pieces.append(pa.Table.from_batches([batch]).select(served.columns.column_names))
            if done != len(live):
                return None
            served.fragments[int(fragment_id)] = FragmentSlots(int(first), offsets)
        if read == 0:
            return None
        served.vectors.extend(size)  # dead slots past the last live one read as zeros
        rows_read = pa.concat_tables(pieces).cast(served.columns.schema)
        served.columns = rows_read.take(pa.array(source))
        served.graph = saved["graph"]
        served.alive, served.size = alive, size
        served.version, served.trained_rows = version, size
        served.live = int(alive.sum())
        return served

    @property
    def tombstones(self) -> int:
        """Slots of deleted rows still in the graph."""
        return self.size - self.live

    @property
    def nbytes(self) -> int:
        """Memory held: graph (codes and links), columns, bookkeeping (the vectors are in their file)."""
        return int(graph_bytes(self.graph) + self.columns.nbytes + self.alive.nbytes)

    # -- search ----------------------------------------------------------------------------------
    def search(
        self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None, ef: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Slots and distances of the k nearest live (and allowed) rows of each query, nearest first.

        Few candidate rows: an exact scan over them. Otherwise the graph proposes ``REFINE * k``
        candidates (restricted to the allowed slots) and the original vectors rank them exactly.
        Fewer than k rows found: slot -1 (or fewer columns) in their place. :class:`StaleFilter` when
        ``allowed`` (the filter's result) covers fewer slots than there are: a commit added rows since the
        filter ran (after a compaction, every live row).
        """
        with self.lock.reading():
            mask = self.alive[: self.size]
            count = self.live
            if allowed is not None:
                if len(allowed) < self.size:
                    raise StaleFilter(self.name)
                mask = mask & allowed[: self.size]
                count = int(mask.sum())
            if count <= max(EXACT_ROWS, EXACT_SHARE * self.size):
                return self._exact_scan(queries, np.flatnonzero(mask), k)
            candidates = self._candidates(queries, min(count, REFINE * k), mask, count, ef)
            return self._rerank(queries, candidates, k)

    def _exact_scan(self, queries: np.ndarray, slots: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of ``slots`` for each query, by exact distance.

        Every slot is ranked on its quantised code (decoded in memory), and the best ``SCAN_REFINE * k`` of
        each query are re-ranked with their vectors from the file: reading every allowed row from the
        file took 2.2 ms for a 1 % filter of 100k x 384 rows (one read per row). ``RERANK_QUERIES``
        queries at a time, so that a large batch never holds a distance for every (query, slot) pair.
        """
        wanted = SCAN_REFINE * k
        if len(slots) <= wanted:
            return self._rerank(queries, np.broadcast_to(slots, (len(queries), len(slots))), k)
        use_search_threads(len(queries))  # faiss decodes in parallel too (2 threads: 8 ms for 2,000 codes)
        decoded = self.graph.reconstruct_batch(slots).astype(np.float64)
        candidates = np.concatenate(
            [
                top_k(
                    exact_distances(self.metric, decoded, queries[start : start + RERANK_QUERIES]),
                    slots,
                    wanted,
                )[0]
                for start in range(0, len(queries), RERANK_QUERIES)
            ]
        )
        return self._rerank(queries, candidates, k)

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
        use_search_threads(len(queries))
        _, candidates = self.graph.search(self._graph_form(queries), wanted, params=params)
        del bitmap  # the selector points into it: alive until the search has returned
        return candidates

    def _rerank(self, queries: np.ndarray, candidates: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest of each query's candidate slots (-1: none), by exact distance.

        ``RERANK_QUERIES`` queries at a time, each distinct candidate of them read once from the vector
        file and gathered in float64: a DoExchange batch of 500 queries at once took 150 MB of
        temporaries at 384 dimensions.
        """
        missing = candidates < 0
        slots = np.where(missing, 0, candidates)
        distances = np.empty(slots.shape, dtype=np.float64)
        for start in range(0, len(queries), RERANK_QUERIES):
            rows = slice(start, start + RERANK_QUERIES)
            distinct, where = np.unique(slots[rows], return_inverse=True)
            vectors = self.vectors.read(distinct)[where.reshape(slots[rows].shape)]
            distances[rows] = exact_distances(self.metric, vectors, queries[rows])
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
        indices = pa.array(slots, pa.int64())
        with self.lock.reading():
            arrays = {
                name: self.columns.column(name).take(indices)
                for name in columns
                if name != self.vector_column
            }
            if self.vector_column in columns:
                values = pa.array(self.vectors.read(slots).ravel(), pa.float32())
                arrays[self.vector_column] = pa.FixedSizeListArray.from_arrays(values, self.dimension)
        # built from the arrays (a take of no columns would have no rows); no columns at all: just the count
        if not columns:
            return pa.table({"slot": indices}).select([])
        return pa.table([arrays[name] for name in columns], names=columns)

    # -- following Lance -------------------------------------------------------------------------
    def pending_rows(self, dataset: lance.LanceDataset) -> int:
        """Rows of ``dataset`` in fragments this copy does not have yet."""
        return sum(f.count_rows() for f in dataset.get_fragments() if f.fragment_id not in self.fragments)

    def catch_up(self, dataset: lance.LanceDataset, stop: threading.Event | None = None) -> None:
        """Follow ``dataset`` (a later version): add new fragments, tombstone deleted rows. ``stop`` set
        (the table was dropped) ends it between batches with :class:`BuildStopped`. A version this copy
        already covers changes nothing: two commits' catch-ups may arrive in either order, and following the
        older second would tombstone the newer one's fragments (and put the copy behind the table)."""
        current = {fragment.fragment_id: fragment for fragment in dataset.get_fragments()}
        with self.lock.writing():
            if dataset.version <= self.version:
                return
            for fragment_id in [known for known in self.fragments if known not in current]:
                self._tombstone(fragment_id, None)
            for fragment_id, fragment in current.items():
                known = self.fragments.get(fragment_id)
                if known is None:
                    self._add_fragment(fragment, stop)
                elif fragment.count_rows() < int(
                    self.alive[known.first : known.first + len(known.offsets)].sum()
                ):
                    live = fragment.to_table(columns=[], with_row_address=True).column(ROW_ADDRESS)
                    self._tombstone(fragment_id, offsets_of(live))
            self.columns = self.columns.combine_chunks()  # one chunk per column: fast takes
            self.version = dataset.version
            self.live = int(self.alive[: self.size].sum())

    def _add_fragment(self, fragment: lance.LanceFragment, stop: threading.Event | None) -> None:
        """Append a new fragment's live rows as slots, batch by batch (memory: one batch at a time)."""
        first = self.size
        self._reserve(first + fragment.count_rows())
        offsets = []
        for batch in fragment_batches(fragment):
            if stop is not None and stop.is_set():
                raise BuildStopped(self.name)
            self._add_rows(batch)
            offsets.append(offsets_of(batch.column(ROW_ADDRESS)))
        self.fragments[fragment.fragment_id] = FragmentSlots(first, np.concatenate([*offsets, OFFSETS_NONE]))

    def _add_rows(self, rows: pa.RecordBatch) -> None:
        vectors = vector_matrix(rows.column(self.vector_column), self.dimension)
        first, count = self.size, len(vectors)
        self._reserve(first + count)
        self.vectors.write(first, vectors)
        self.alive[first : first + count] = True
        if not self.graph.is_trained:  # no sample was given: the first rows set the quantiser's ranges
            self.train(vectors[:TRAINING_ROWS])
        others = pa.Table.from_batches([rows]).select(self.columns.column_names)
        self.columns = pa.concat_tables([self.columns, others.cast(self.columns.schema)])
        self.graph.add(self._graph_form(vectors))
        self.size += count

    def train(self, sample: np.ndarray) -> None:
        """Learn the quantiser's ranges from a sample of the table's vectors."""
        self.graph.train(self._graph_form(sample))
        self.trained_rows = len(sample)

    def _reserve(self, capacity: int) -> None:
        if capacity <= len(self.alive):
            return
        alive = np.zeros(max(capacity, len(self.alive) * 3 // 2 + 1024), dtype=bool)
        alive[: self.size] = self.alive[: self.size]
        self.alive = alive

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
    def save(self, file: IO[bytes]) -> None:
        """Write the graph and its slot map to ``file`` as one zip (see :func:`read_saved`), streamed:
        no serialised copy of the graph in memory (the rows are re-read from Lance)."""
        import faiss

        with self.lock.reading(), zipfile.ZipFile(file, "w", allowZip64=True) as archive:
            fragment_ids = list(self.fragments)
            arrays = {
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
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
            with archive.open(GRAPH_MEMBER, "w", force_zip64=True) as member:
                faiss.write_index(self.graph, faiss.PyCallbackIOWriter(member.write))


def read_saved(file: IO[bytes]) -> dict[str, Any]:
    """What :meth:`ServedTable.save` wrote: its arrays by name, and the graph (a faiss index) as
    ``"graph"``, read from the zip member by member. ``KeyError``/``ValueError``/``BadZipFile`` (or
    faiss's ``RuntimeError``) when it is not such a file."""
    import faiss

    saved: dict[str, Any] = {}
    with zipfile.ZipFile(file) as archive:
        for name in archive.namelist():
            if name.endswith(".npy"):
                with archive.open(name) as member:
                    saved[name.removesuffix(".npy")] = np.lib.format.read_array(member, allow_pickle=False)
        with archive.open(GRAPH_MEMBER) as member:
            saved["graph"] = faiss.read_index(faiss.PyCallbackIOReader(member.read))
    return saved


def fragment_batches(
    fragment: lance.LanceFragment, columns: list[str] | None = None
) -> Iterator[pa.RecordBatch]:
    """A fragment's live rows (``columns``, all by default) with ``_rowaddr``, in row-offset order,
    ``ADD_BATCH_ROWS`` at a time, each range read on its own: one scan of a 100k x 384 fragment, even
    batch by batch with little read-ahead, held 110-215 MB of it at once; ranges, 60 MB."""
    for start in range(0, fragment.count_rows(), ADD_BATCH_ROWS):
        rows = fragment.to_table(columns=columns, offset=start, limit=ADD_BATCH_ROWS, with_row_address=True)
        yield from rows.to_batches()


def training_sample(dataset: lance.LanceDataset, column: str, dimension: int) -> np.ndarray:
    """About ``TRAINING_ROWS`` vectors spread evenly over the table (every n-th row), read range by range
    (Lance's random ``sample`` reads every page it touches at once: 150 MB more at the peak)."""
    stride = max(1, dataset.count_rows() // TRAINING_ROWS)
    pieces = [
        vector_matrix(batch.column(column), dimension)[::stride].copy()  # not a view of the batch
        for fragment in dataset.get_fragments()
        for batch in fragment_batches(fragment, [column])
    ]
    return np.concatenate([*pieces, np.empty((0, dimension), np.float32)])[:TRAINING_ROWS]


def use_search_threads(queries: int) -> None:
    """Let this thread's faiss calls use OpenMP threads only for large batches (DoExchange): for a few
    queries, waking the other threads costs more than it saves, and concurrent searches already run two
    batches at once (1 client: 2.1 -> 1.5-1.7 ms of server CPU per query; 10 clients: no worse)."""
    import faiss

    faiss.omp_set_num_threads(search_threads() if queries >= PARALLEL_QUERIES else 1)


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
    """An empty HNSW graph over quantised vectors (``settings.code_bits`` a dimension); inner product for
    cosine (unit vectors) and dot."""
    import faiss

    kind = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
    quantiser = getattr(faiss.ScalarQuantizer, f"QT_{settings.code_bits}bit")
    graph = faiss.IndexHNSWSQ(dimension, quantiser, settings.m, kind)
    graph.hnsw.efConstruction = settings.ef_construction
    return graph


def estimated_bytes(rows: int, dimension: int, settings: GraphSettings) -> int:
    """Memory a table of ``rows`` vectors will take in memory (codes, links, columns), before it is built."""
    code_bytes = math.ceil(dimension * settings.code_bits / 8)
    return int(rows * (code_bytes + 2 * settings.m * 4 * 1.1 + 64))


def graph_bytes(graph: faiss.Index) -> int:
    """Memory of an HNSW graph over quantised vectors: its codes and its links."""
    hnsw = graph.hnsw
    return int(
        graph.ntotal * graph.storage.sa_code_size() + hnsw.neighbors.size() * 4 + hnsw.offsets.size() * 8
    )
