"""The benchmarks' inputs and their in-process anchors.

* Workers (``bench_core``, ``bench_s3``): the generated ``workers`` table in a local Parquet file, streamed
  by every contender in batches of 65,536 rows; the overwrite DoPut; the full scan and GROUP BY queries;
  DuckDB in this process, and DoGet clients and DuckDB each in a spawned process of its own
  (:class:`Spawned`: a contender's work and its timing happen in its own process).
* Vectors (``bench_vectors``, ``bench_vector_cache``, ``bench_ann_libraries``): clustered float32 vectors
  with an ``id`` and a ``category`` column, query vectors from the same distribution (fixed seed), the
  exact neighbours by numpy brute force (cosine), recall; the Lance table's DoPut; lancedb searches in
  this process and the search parameters tried for them.

Every cluster is a Gaussian around its centre whose spread lives in a 16-dimensional subspace of its own,
plus a little isotropic noise: embeddings have a low intrinsic dimension, and with isotropic noise in all
384 dimensions the nearest neighbours inside a cluster are arbitrary (no index reaches a useful recall).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import multiprocessing
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

from scripts.gen_workers import WORKERS_SCHEMA, iter_worker_batches
from scripts.harness import (
    IngestRound,
    PeakRss,
    RssSampler,
    add_work_arguments,
    do_put,
    drain,
    ingest_rounds,
    server_query,
)

T = TypeVar("T")

# -- workers ---------------------------------------------------------------------------------------
CLIENT_BATCH_ROWS = 65_536
READER_BATCH_ROWS = 131_072
SCAN_SQL = "select * from workers"
GROUP_SQL = (
    "select state, role, count(*), avg(hourly_rate), max(years_experience) from workers group by state, role"
)
INGEST_COMMAND = {"ingest": {"dataset": "workers", "mode": "overwrite"}}


@dataclass(frozen=True)
class Source:
    """The generated input file, its row count and in-memory Arrow size."""

    path: Path
    rows: int
    nbytes: int

    def batches(self) -> Iterator[pa.RecordBatch]:
        """The input as the clients stream it."""
        return pq.ParquetFile(self.path).iter_batches(batch_size=CLIENT_BATCH_ROWS)

    @property
    def schema(self) -> pa.Schema:
        """The Arrow schema of the input file."""
        return pq.read_schema(self.path)


def generate_source(path: Path, rows: int) -> Source:
    """Write ``rows`` generated workers to ``path`` once (untimed) and measure their Arrow size."""
    with pq.ParquetWriter(path, WORKERS_SCHEMA, compression="zstd") as writer:
        for batch in iter_worker_batches(rows):
            writer.write_batch(batch)
    source = Source(path, rows, 0)
    nbytes = sum(batch.nbytes for batch in source.batches())
    return Source(path, rows, nbytes)


def server_ingest(client: flight.FlightClient, source: Source) -> dict[str, Any]:
    """DoPut the source with an overwrite command; returns the PutResult JSON."""
    return do_put(client, INGEST_COMMAND, source.schema, source.batches())


def inprocess_query(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """Run ``sql`` on DuckDB in this process, batch by batch, keeping nothing; returns the row count."""
    reader = con.sql(sql).to_arrow_reader(READER_BATCH_ROWS)
    return drain(reader.read_next_batch)


def files_connection(files: Sequence[Path | str]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a ``workers`` view over ``files`` (the in-process anchor)."""
    con = duckdb.connect(":memory:")
    con.execute("SET enable_progress_bar = false")  # DuckDB 2 draws one on stdout (a session setting)
    listing = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
    con.execute(f"create view workers as select * from read_parquet([{listing}])")
    return con


#: What a spawned contender runs: ``sql`` -> row count (set by its initializer, in its own process).
_CONTENDER: Callable[[str], int] | None = None


def _serve_flight(location: str) -> None:
    global _CONTENDER
    client = flight.connect(location)
    _CONTENDER = functools.partial(server_query, client)


def _serve_duckdb(files: Sequence[str]) -> None:
    global _CONTENDER
    _CONTENDER = functools.partial(inprocess_query, files_connection(files))


def _timed(sql: str) -> tuple[float, int]:
    assert _CONTENDER is not None
    started = time.perf_counter()
    rows = _CONTENDER(sql)
    return time.perf_counter() - started, rows


class Spawned:
    """A contender in a spawned process of its own: a Flight client of a server (DoGet) or DuckDB over
    Parquet files (the in-process anchor). :meth:`timed` runs a query there and times it there."""

    def __init__(self, initializer: Callable[..., None], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self._pool = ProcessPoolExecutor(1, mp_context=context, initializer=initializer, initargs=args)

    @classmethod
    def flight_client(cls, location: str) -> Spawned:
        """DoGet through a Flight client of the server at ``location``."""
        return cls(_serve_flight, location)

    @classmethod
    def duckdb(cls, files: Sequence[Path | str]) -> Spawned:
        """DuckDB over ``files`` as the ``workers`` view."""
        return cls(_serve_duckdb, [str(path) for path in files])

    def timed(self, sql: str) -> tuple[float, int]:
        """Seconds and rows of ``sql``, batch by batch, keeping nothing."""
        return self._pool.submit(_timed, sql).result()

    def call(self, function: Callable[..., T], *args: object) -> T:
        """``function(*args)`` in the process (a module-level function, after the initializer)."""
        return self._pool.submit(function, *args).result()

    def close(self) -> None:
        """Stop the process."""
        self._pool.shutdown()


# -- vectors ---------------------------------------------------------------------------------------
DATASET = "vectors"
VECTOR = "vector"
COLUMNS = ["id", "category"]
DISTANCE = "_distance"
METRIC = "cosine"
LATENT_DIMS = 16
NOISE = 0.1
CATEGORIES = 8
PUT_BATCH_ROWS = 10_000
#: lancedb search parameters per index kind, cheapest first; the first reaching the target recall is used.
CANDIDATES: dict[str, list[dict[str, int]]] = {
    "ivf_pq": [
        {"nprobes": nprobes, "refine_factor": refine}
        for nprobes, refine in ((10, 5), (20, 5), (10, 10), (20, 10), (40, 10), (20, 20), (40, 20), (80, 40))
    ],
    "ivf_hnsw_sq": [{"ef": ef} for ef in (10, 20, 40, 80, 160, 320)],
}


@dataclass(frozen=True)
class Corpus:
    """The table to ingest, its vectors as a matrix, and the query vectors (not in the table)."""

    table: pa.Table
    vectors: np.ndarray
    queries: np.ndarray


def clustered(
    rng: np.random.Generator, centres: np.ndarray, bases: np.ndarray, labels: np.ndarray
) -> np.ndarray:
    """One vector per label: its cluster's centre + a point of the cluster's subspace + small noise."""
    out = np.empty((len(labels), centres.shape[1]), dtype=np.float32)
    for cluster in np.unique(labels):
        rows = np.flatnonzero(labels == cluster)
        latent = rng.standard_normal((len(rows), LATENT_DIMS), dtype=np.float32)
        noise = rng.standard_normal((len(rows), centres.shape[1]), dtype=np.float32)
        out[rows] = centres[cluster] + latent @ bases[cluster] + NOISE * noise
    return out


def make_corpus(rows: int, dim: int, clusters: int, queries: int, seed: int) -> Corpus:
    """Generate the table and the query vectors from ``seed``."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    bases = rng.standard_normal((clusters, LATENT_DIMS, dim), dtype=np.float32) / np.sqrt(LATENT_DIMS)
    labels = rng.integers(0, clusters, rows)
    vectors = clustered(rng, centres, bases, labels)
    query_vectors = clustered(rng, centres, bases, rng.integers(0, clusters, queries))
    categories = np.char.add("cat-", (labels % CATEGORIES).astype(str))
    table = pa.table(
        {
            "id": pa.array(np.arange(rows, dtype=np.int64)),
            "category": pa.array(categories, pa.string()),
            VECTOR: pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
        }
    )
    return Corpus(table, vectors, query_vectors)


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """``vectors`` scaled to unit length, float32, C-contiguous (the form a cosine HNSW graph holds)."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.ascontiguousarray(unit, dtype=np.float32)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The ids (row numbers) of the ``k`` nearest rows of every query, cosine, numpy brute force."""
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    truth = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 50):
        chunk = queries[start : start + 50]
        scores = (chunk / np.linalg.norm(chunk, axis=1, keepdims=True)) @ unit.T
        truth[start : start + 50] = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return truth


def recall(found: Sequence[Sequence[int]], truth: np.ndarray) -> float:
    """Mean recall@k of ``found[i]`` (ids) against ``truth[i]``."""
    k = truth.shape[1]
    hits = [len(set(ids) & set(truth[i].tolist())) / k for i, ids in enumerate(found)]
    return float(np.mean(hits))


def put_table(client: flight.FlightClient, table: pa.Table) -> dict[str, Any]:
    """DoPut ``table`` as a new Lance table (``mode: create``, cosine); returns the PutResult JSON."""
    command = {"ingest": {"dataset": DATASET, "mode": "create", "metric": METRIC}}
    return do_put(client, command, table.schema, table.to_batches(max_chunksize=PUT_BATCH_ROWS))


def create_rounds(
    client: flight.FlightClient,
    pid: int,
    corpus: Corpus,
    rounds: int,
    meter: Callable[[int], RssSampler | PeakRss] = RssSampler,
    then: Callable[[], object] | None = None,
) -> Iterator[IngestRound]:
    """:func:`harness.ingest_rounds` of the corpus's table: ``rounds`` DoPuts creating it, dropped between."""
    put = functools.partial(put_table, client, corpus.table)
    return ingest_rounds(client, pid, DATASET, rounds, put, corpus.table.num_rows, meter, then)


def local_search(
    table: Any,
    query: np.ndarray | list[np.ndarray],
    params: dict[str, int],
    k: int,
    columns: Sequence[str] = COLUMNS,
) -> pa.Table:
    """lancedb in this process: what the server runs for one request (``_distance`` selected explicitly)."""
    builder = table.search(query, vector_column_name=VECTOR).distance_type(METRIC)
    for name, value in params.items():  # nprobes, refine_factor, ef: builder methods of the same names
        builder = getattr(builder, name)(value)
    return builder.select([*columns, DISTANCE]).limit(k).to_arrow()


def local_batches(
    table: Any,
    queries: np.ndarray,
    params: dict[str, int],
    k: int,
    batch_rows: int,
    columns: Sequence[str] = COLUMNS,
) -> pa.Table:
    """The in-process counterpart of DoExchange: one multi-vector search per ``batch_rows`` queries."""
    parts = [
        local_search(table, list(queries[start : start + batch_rows]), params, k, columns)
        for start in range(0, len(queries), batch_rows)
    ]
    return pa.concat_tables(parts)


@dataclass(frozen=True)
class VectorPlan:
    """The parameters of both vector benchmarks that run a server: the table, the queries, the rounds."""

    rows: int
    dim: int
    clusters: int
    seed: int
    rounds: int
    queries: int
    exchange_queries: int
    concurrency: int
    k: int

    @classmethod
    def from_args(cls, args: argparse.Namespace, **values: Any) -> Any:
        """The plan of the parsed arguments of the same names (``values`` given instead of some)."""
        return cls(**{f.name: values.get(f.name, getattr(args, f.name)) for f in dataclasses.fields(cls)})


def vector_parser(description: str) -> argparse.ArgumentParser:
    """The arguments the vector benchmarks that run a server start with: the table, and rounds."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--rows", type=int, default=100_000, help="vectors in the table (default %(default)s)"
    )
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (default %(default)s)")
    parser.add_argument("--clusters", type=int, default=100, help="Gaussian clusters (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default %(default)s)")
    return parser


def parse_vector_arguments(
    parser: argparse.ArgumentParser, argv: list[str] | None, counts: Sequence[str]
) -> argparse.Namespace:
    """Add ``--seed``, ``--root`` and ``--env``, then parse: the table's sizes, ``--rounds``, ``--k`` and the
    arguments named in ``counts`` must be > 0, ``--clusters`` and ``--k`` at most ``--rows``."""
    parser.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    names = ("rows", "dim", "clusters", "rounds", "k", *counts)
    if min(getattr(args, name) for name in names) <= 0:
        parser.error("counts must be > 0")
    if args.clusters > args.rows or args.k > args.rows:
        parser.error("--clusters and --k must not exceed --rows")
    return args
