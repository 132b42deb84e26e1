"""faiss-cpu against usearch for the server's in-memory vector search (issue 5), in one process.

* Input: the clustered vectors of ``workloads.make_corpus`` (``--rows`` x ``--dim`` float32, 100
  clusters, each spread over a 16-dimensional subspace of its own plus noise) and ``--queries`` query
  vectors from the same distribution. Cosine: every index gets unit-length vectors (usearch
  ``metric="cos"``, faiss inner product), as the server's graph does.
* Configurations: faiss ``IndexHNSWFlat`` and ``IndexHNSWSQ`` 8-bit with exact re-ranking of ``4 * k``
  graph candidates against the float32 vectors (what ``vector_memory.ServedTable`` does), usearch ``f32``
  and ``i8`` (and ``i8`` re-ranked the same way, for a like-for-like comparison with the server). All
  with M / connectivity 32, efConstruction / expansion_add 64 (the server's default) and efSearch /
  expansion_search 64.
* Measured per configuration: build time (one build, all cores), index memory, p50/p99 latency of single
  queries (one call per query, this thread), QPS of one batch call with all queries (the libraries'
  own threads: OpenMP for faiss, ``threads=0`` for usearch), recall@k against numpy brute force.
* Filters: whether each library's Python API can restrict a search to an allowed set of ids (the server
  needs it for filtered searches and tombstones), checked on the installed packages.

Latency and batch QPS are repeated ``--rounds`` times (configurations interleaved) and reported as medians.

Usage::

    python -m scripts.bench_ann_libraries                                # 100k x 384, 1000 queries, 5 rounds
    python -m scripts.bench_ann_libraries --rows 20000 --rounds 2        # quick trial
"""

from __future__ import annotations

import argparse
import gc
import inspect
import time
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import psutil
import usearch
from usearch.index import BatchMatches
from usearch.index import Index as UsearchIndex

from scripts import workloads
from scripts.harness import MB, log, median, spread

M = 32
EF_CONSTRUCTION = 64
EF_SEARCH = 64
#: Graph candidates per result row re-ranked exactly (``vector_memory.REFINE``).
REFINE = 4


# -- configurations --------------------------------------------------------------------------------
def rerank(vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates (ids, -1 = none) of every query with the highest exact inner product."""
    scores = np.einsum("ncd,nd->nc", vectors[np.maximum(candidates, 0)], queries)
    scores[candidates < 0] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(candidates, order, axis=1)


class Engine:
    """One index configuration: built once from unit vectors, then searched (ids of the k nearest)."""

    name = ""
    note = ""
    #: Whether searches re-rank with a float32 copy of the vectors (kept beside the index).
    reranks = False

    def build(self, vectors: np.ndarray) -> None:
        """Build the index from ``vectors`` (unit length)."""
        raise NotImplementedError

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """The ids of the ``k`` nearest rows of every query (a matrix, one row per query)."""
        raise NotImplementedError

    def serialized_bytes(self) -> int:
        """Size of the serialised index (without the float32 copy used for re-ranking)."""
        raise NotImplementedError

    def reported_bytes(self) -> int | None:
        """The library's own figure of the index's memory, if it has one."""
        return None


class FaissFlat(Engine):
    """faiss ``IndexHNSWFlat``: the graph over the float32 vectors."""

    name = "faiss HNSWFlat"
    note = "float32 vectors in the index"

    def __init__(self) -> None:
        self.index: Any = None

    def build(self, vectors: np.ndarray) -> None:
        """Add all vectors (faiss builds on its OpenMP threads)."""
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.add(vectors)
        self.index.hnsw.efSearch = EF_SEARCH

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """faiss search with efSearch 64."""
        return self.index.search(queries, k)[1]

    def serialized_bytes(self) -> int:
        """``faiss.serialize_index``: a flat dump of the vectors or codes and the links."""
        return int(faiss.serialize_index(self.index).nbytes)


class FaissSq8Rerank(FaissFlat):
    """faiss ``IndexHNSWSQ`` 8-bit, ``4 * k`` candidates re-ranked with the float32 vectors (the server)."""

    name = "faiss HNSWSQ8 + re-rank"
    note = f"{REFINE}k candidates re-ranked exactly (the server's design)"
    reranks = True

    def __init__(self) -> None:
        super().__init__()
        self.vectors = np.empty((0, 0), np.float32)

    def build(self, vectors: np.ndarray) -> None:
        """Train the 8-bit ranges on the vectors, then add them."""
        self.index = faiss.IndexHNSWSQ(
            vectors.shape[1], faiss.ScalarQuantizer.QT_8bit, M, faiss.METRIC_INNER_PRODUCT
        )
        self.index.hnsw.efConstruction = EF_CONSTRUCTION
        self.index.train(vectors)
        self.index.add(vectors)
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """``4 * k`` graph candidates (efSearch = max(64, 4k), as the server), re-ranked exactly."""
        params = faiss.SearchParametersHNSW()
        params.efSearch = max(EF_SEARCH, REFINE * k)
        candidates = self.index.search(queries, REFINE * k, params=params)[1]
        return rerank(self.vectors, queries, candidates, k)


class Usearch(Engine):
    """usearch ``Index`` with cosine metric and the given scalar kind."""

    def __init__(self, dtype: str, k: int, rerank_candidates: bool = False) -> None:
        self.dtype, self.k = dtype, k
        self.reranks = rerank_candidates
        self.name = f"usearch {dtype}" + (" + re-rank" if rerank_candidates else "")
        self.note = f"{REFINE}k candidates re-ranked exactly (extra)" if rerank_candidates else ""
        self.index: Any = None
        self.vectors = np.empty((0, 0), np.float32)

    def build(self, vectors: np.ndarray) -> None:
        """Add all vectors with keys 0..n-1 on all cores (``threads=0``)."""
        self.index = UsearchIndex(
            ndim=vectors.shape[1],
            metric="cos",
            dtype=self.dtype,
            connectivity=M,
            expansion_add=EF_CONSTRUCTION,
            expansion_search=max(EF_SEARCH, REFINE * self.k) if self.reranks else EF_SEARCH,
        )
        self.index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=0)
        self.vectors = vectors

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """usearch search (``threads=0``); keys as int64, -1 padded."""
        wanted = REFINE * k if self.reranks else k
        matches = self.index.search(queries, wanted, threads=0)
        if isinstance(matches, BatchMatches):
            keys = matches.keys.astype(np.int64)
            keys[np.arange(keys.shape[1])[None, :] >= matches.counts[:, None]] = -1
        else:  # one query: a Matches of the keys found
            keys = np.full((1, wanted), -1, dtype=np.int64)
            keys[0, : len(matches.keys)] = matches.keys
        return rerank(self.vectors, queries, keys, k) if self.reranks else keys

    def serialized_bytes(self) -> int:
        """``Index.serialized_length``."""
        return int(self.index.serialized_length)

    def reported_bytes(self) -> int | None:
        """``Index.memory_usage``: vectors, links and the allocator's reserve."""
        return int(self.index.memory_usage)


def engines(k: int, extra: bool) -> list[Engine]:
    """The configurations of the issue, and the usearch i8 + re-rank variant when ``extra``."""
    chosen: list[Engine] = [FaissFlat(), FaissSq8Rerank(), Usearch("f32", k), Usearch("i8", k)]
    if extra:
        chosen.append(Usearch("i8", k, rerank_candidates=True))
    return chosen


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class Figures:
    """What was measured for one configuration."""

    build_seconds: float = 0.0
    serialized_mb: float = 0.0
    reported_mb: float | None = None
    rss_growth_mb: float = 0.0
    recall: float = float("nan")
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    batch_qps: list[float] = field(default_factory=list)


def rss() -> int:
    """This process's resident memory in bytes."""
    return int(psutil.Process().memory_info().rss)


def build(engine: Engine, vectors: np.ndarray) -> Figures:
    """Build ``engine`` once; its build time, memory figure and RSS growth."""
    gc.collect()
    before = rss()
    started = time.perf_counter()
    engine.build(vectors)
    seconds = time.perf_counter() - started
    growth = (rss() - before) / MB
    reported = engine.reported_bytes()
    reported_mb = None if reported is None else reported / MB
    figures = Figures(seconds, engine.serialized_bytes() / MB, reported_mb, growth)
    log(f"{engine.name}: built in {seconds:.1f} s, serialised {figures.serialized_mb:.0f} MB")
    return figures


def single_latencies(engine: Engine, queries: np.ndarray, k: int) -> np.ndarray:
    """Seconds of one search call per query, one query at a time."""
    latencies = np.empty(len(queries))
    for i in range(len(queries)):
        query = queries[i : i + 1]
        started = time.perf_counter()
        engine.search(query, k)
        latencies[i] = time.perf_counter() - started
    return latencies


def measure_round(engine: Engine, queries: np.ndarray, k: int, figures: Figures) -> np.ndarray:
    """One round: single-query latencies, then one batch call with all queries; the batch's ids."""
    latencies = single_latencies(engine, queries, k)
    figures.p50_ms.append(float(np.percentile(latencies, 50)) * 1e3)
    figures.p99_ms.append(float(np.percentile(latencies, 99)) * 1e3)
    started = time.perf_counter()
    found = engine.search(queries, k)
    figures.batch_qps.append(len(queries) / (time.perf_counter() - started))
    return found


def measure(
    chosen: list[Engine], vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray, rounds: int
) -> dict[str, Figures]:
    """Build every configuration, then ``rounds`` rounds with the configurations in rotating order."""
    k = truth.shape[1]
    results = {engine.name: build(engine, vectors) for engine in chosen}
    for engine in chosen:  # warm-up
        engine.search(queries[:50], k)
        single_latencies(engine, queries[:50], k)
    for r in range(rounds):
        shift = r % len(chosen)
        for engine in chosen[shift:] + chosen[:shift]:
            figures = results[engine.name]
            found = measure_round(engine, queries, k, figures)
            if r == 0:
                figures.recall = workloads.recall(found.tolist(), truth)
            log(
                f"round {r + 1} {engine.name:<24}: p50 {figures.p50_ms[-1]:.3f} ms, "
                f"batch {figures.batch_qps[-1]:,.0f} q/s, recall {figures.recall:.3f}"
            )
    return results


# -- filters ---------------------------------------------------------------------------------------
def faiss_filter_check(engine: FaissFlat, queries: np.ndarray, k: int) -> bool:
    """Whether a faiss search restricted with an ``IDSelectorBitmap`` (even ids only) returns only those."""
    size = engine.index.ntotal
    allowed = np.zeros(size, dtype=bool)
    allowed[::2] = True
    bitmap = np.packbits(allowed, bitorder="little")
    params = faiss.SearchParametersHNSW()
    params.efSearch = EF_SEARCH
    params.sel = faiss.IDSelectorBitmap(size, faiss.swig_ptr(bitmap))
    ids = engine.index.search(queries[:20], k, params=params)[1]
    return bool((ids[ids >= 0] % 2 == 0).all())


def usearch_filter_parameters() -> list[str]:
    """Parameters of usearch's Python search calls that could restrict a search (filter, predicate...)."""
    compiled = usearch.compiled.Index.search_many.__doc__ or ""
    names = list(inspect.signature(UsearchIndex.search).parameters)
    words = ("filter", "predicate", "allowed", "mask", "selector")
    return [name for name in names if any(word in name for word in words)] + [
        word for word in words if word in compiled.split("->")[0]
    ]


def render_filters(faiss_ok: bool) -> str:
    """The filter support of both libraries, as checked here."""
    usearch_params = usearch_filter_parameters()
    names = [name for name in inspect.signature(UsearchIndex.search).parameters if name != "self"]
    usearch_line = (
        f"yes ({', '.join(usearch_params)})"
        if usearch_params
        else f"**no**: `Index.search({', '.join(names)})` and the compiled `search_many` take no filter "
        "or predicate; only `Index.remove` (tombstones), post-filtering over-fetched results, or "
        "`exact=True` brute force"
    )
    return (
        "| library | restrict a search to allowed ids from Python | checked |\n|---|---|---|\n"
        f"| faiss-cpu {faiss.__version__} | yes: `SearchParametersHNSW.sel` = `IDSelectorBitmap` "
        f"(what the server uses) | search on even ids only returned only even ids: {faiss_ok} |\n"
        f"| usearch {usearch.__version__} | {usearch_line} | signature inspected |\n"
    )


# -- report ----------------------------------------------------------------------------------------
def render(results: dict[str, Figures], chosen: list[Engine], args: argparse.Namespace, dim: int) -> str:
    """The comparison table (medians over rounds, min-max in the last column)."""
    copy_mb = args.rows * dim * 4 / MB
    lines = []
    for engine in chosen:
        f = results[engine.name]
        extra = f"+ {copy_mb:.0f}" if engine.reranks else "-"
        reported = "-" if f.reported_mb is None else f"{f.reported_mb:.0f}"
        lines.append(
            f"| {engine.name} | {f.build_seconds:.1f} | {f.serialized_mb:.0f} | {reported} | "
            f"{f.rss_growth_mb:.0f} | {extra} | "
            f"{median(f.p50_ms):.3f} | {median(f.p99_ms):.3f} | {median(f.batch_qps):,.0f} | "
            f"{f.recall:.3f} | <sub>p50 {spread(f.p50_ms, 3)}; QPS {spread(f.batch_qps, 0)}</sub> |"
        )
    return (
        f"{args.rows:,} x {dim} float32, {args.clusters} clusters, seed {args.seed}; {args.queries} queries, "
        f"k={args.k}, cosine; M/connectivity {M}, efConstruction/expansion_add {EF_CONSTRUCTION}, "
        f"efSearch/expansion_search {EF_SEARCH}; faiss {faiss.__version__} "
        f"(OpenMP threads {faiss.omp_get_max_threads()}), usearch {usearch.__version__}; "
        f"medians of {args.rounds} rounds\n\n"
        "| configuration | build (s) | index MB serialised | index MB `memory_usage` | RSS growth MB "
        "| float32 copy MB | single p50 ms | single p99 ms | batch QPS | recall@10 | <sub>min-max</sub> |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n" + "\n".join(lines) + "\n"
    )


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="vectors (default %(default)s)")
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (default %(default)s)")
    parser.add_argument("--clusters", type=int, default=100, help="Gaussian clusters (default %(default)s)")
    parser.add_argument("--queries", type=int, default=1000, help="query vectors (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="search rounds (default %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    parser.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    parser.add_argument(
        "--no-extra", action="store_true", help="leave out the usearch i8 + re-rank configuration"
    )
    args = parser.parse_args(argv)
    if min(args.rows, args.dim, args.clusters, args.queries, args.rounds, args.k) <= 0:
        parser.error("counts must be > 0")
    if args.clusters > args.rows or REFINE * args.k > args.rows:
        parser.error("--clusters and 4 * --k must not exceed --rows")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    log(f"generating {args.rows:,} x {args.dim} vectors ...")
    corpus = workloads.make_corpus(args.rows, args.dim, args.clusters, args.queries, args.seed)
    truth = workloads.exact_neighbours(corpus.vectors, corpus.queries, args.k)
    vectors, queries = workloads.unit_rows(corpus.vectors), workloads.unit_rows(corpus.queries)
    del corpus
    chosen = engines(args.k, extra=not args.no_extra)
    results = measure(chosen, vectors, queries, truth, args.rounds)
    flat = next(engine for engine in chosen if isinstance(engine, FaissFlat))
    print(render(results, chosen, args, vectors.shape[1]))
    print(render_filters(faiss_filter_check(flat, queries, args.k)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
