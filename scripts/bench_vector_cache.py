"""In-memory vector search through the server (issue 5), against lancedb, faiss and a bare Flight server.

* Input: the clustered vectors of ``workloads.make_corpus`` (``--rows`` x ``--dim`` float32 with ``id`` and
  ``category``, 100 clusters each spread over a 16-dimensional subspace of its own plus noise, fixed
  seed) and query vectors from the same distribution, not in the table. Ground truth: numpy brute force
  (cosine) over the first ``--queries`` query vectors.
* Lakehouse server: ``python -m flight_lakehouse serve --root <tmp> --port 0`` in a subprocess. One DoPut
  creates the table (``--ingest-rounds`` times, dropped in between); the time until ``describe_dataset``
  shows ``serving.from == "memory"`` after the DoPut returned is the time until warm. Searches are DoGet
  ``{"search": {"dataset", "vector", "k", "columns": ["id"]}}`` tickets (server defaults: efSearch 64).
* Contenders, all given the same query vectors and k, the clients in this process:
  - ``lakehouse``: the server above (a separate process);
  - ``bare flight+faiss``: a minimal pyarrow Flight server written in this script (``--serve-bare``,
    a separate process) answering each DoGet ticket and DoExchange batch from a faiss ``IndexHNSWFlat``
    (M 32, efConstruction 64, efSearch 64): the floor of Flight + faiss;
  - ``faiss in-process``: the same faiss index in this process;
  - ``lancedb in-process``: a copy of the server's Lance table with a ``--lance-index`` index built in
    this process (lancedb defaults, as the server's ``create_index``), searched with the cheapest
    parameters reaching ``--lance-recall`` (``workloads.CANDIDATES``, the sweep of ``bench_vectors``),
    selecting ``id``.
* Searches: ``--rounds`` rounds of ``--queries`` queries at 1 and ``--concurrency`` client threads (one
  Flight client per thread), contenders interleaved and their order rotating; per-call latency, QPS =
  queries / wall time. CPU per query: user + system time of the server process and of this process.
* Batch search: ``--exchange-queries`` query vectors streamed through DoExchange in batches of
  ``--exchange-batch`` (lakehouse, bare server), against faiss batch calls in this process (and lancedb
  multi-vector searches with ``--lance-batches``; ``bench_vectors`` measures those).
* Memory: the lakehouse server's RSS after warm (``RssSampler.sample``) and its peaks (the kernel's
  high-water mark ``VmHWM``, reset before each phase: no sampling thread competes with the clients for
  the GIL of this process) during ingest and build and while searching; then the server is restarted
  on the same root (it loads the saved graph) and measured again: time until warm, RSS after warm, peak
  during one round of searches.

Reported: medians over rounds, min-max beside them, and PASS/FAIL against the issue's targets.

Usage::

    python -m scripts.bench_vector_cache                     # 100k x 384, 5 rounds of 500 queries
    python -m scripts.bench_vector_cache --rows 20000        # smaller table, same rounds: about 1 min
    python -m scripts.bench_vector_cache --rows 20000 --rounds 2 --queries 200   # quick trial, about 35 s
    python -m scripts.bench_vector_cache --root /tmp/bench-cache --env LAKEHOUSE_VECTOR_GRAPH_EF_SEARCH=32
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.harness import MB, cell, log, median, spread, verdict

COLUMNS = ["id"]
DISTANCE = "_distance"
QUERY_INDEX = "_query_index"
M = 32
EF_CONSTRUCTION = 64
EF_SEARCH = 64
LANCE_KINDS = ("ivf_hnsw_sq", "ivf_pq")
WARMUP_QUERIES = 50
#: Queries of the lancedb parameter sweep (recall is then measured on every round's queries).
SWEEP_QUERIES = 200
POLL_SECONDS = 0.1
SETTLE_SECONDS = 2.0
WARM_TIMEOUT = 900.0
LAKEHOUSE, BARE, FAISS, LANCE = "lakehouse", "bare flight+faiss", "faiss in-process", "lancedb in-process"
BUILD_LINE = re.compile(rf"{workloads.DATASET} in memory: (\d+) rows in ([\d.]+) s")
SAVED_LINE = re.compile(rf"{workloads.DATASET} in memory from its saved graph of version (\d+)")
#: RSS phases with the table served from memory (the RSS target applies to each).
RSS_AFTER_WARM = "lakehouse: after warm (ingesting server)"
RSS_SEARCHING = "lakehouse: peak while searching"
RSS_RESTART_WARM = "lakehouse restarted: after warm"
RSS_RESTART_SEARCHING = "lakehouse restarted: peak while searching"
SERVED_PHASES = (RSS_AFTER_WARM, RSS_SEARCHING, RSS_RESTART_WARM, RSS_RESTART_SEARCHING)


Reader = flight.MetadataRecordBatchReader
Writer = flight.MetadataRecordBatchWriter


@dataclass(frozen=True)
class Targets:
    """The issue's targets."""

    p50_ms: float = 1.5
    qps: float = 900.0
    p99_ms: float = 25.0
    recall: float = 0.95
    rss_mb: float = 450.0
    exchange_qps: float = 5000.0


TARGETS = Targets()


def faiss_hnsw(vectors: np.ndarray) -> Any:
    """A faiss ``IndexHNSWFlat`` (inner product on unit vectors = cosine), M 32, efSearch 64."""
    index = faiss.IndexHNSWFlat(vectors.shape[1], M, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = EF_CONSTRUCTION
    index.add(workloads.unit_rows(vectors))
    index.hnsw.efSearch = EF_SEARCH
    return index


# -- the bare server (run by this script with --serve-bare) ----------------------------------------
def result_table(ids: np.ndarray, similarities: np.ndarray, first: int | None = None) -> pa.Table:
    """Rows ``id`` and ``_distance`` (1 - cosine) of a faiss result, ``_query_index`` first if ``first``."""
    found = ids >= 0
    columns = {
        "id": pa.array(ids[found].astype(np.int64)),
        DISTANCE: pa.array((1.0 - similarities[found]).astype(np.float32)),
    }
    if first is not None:
        query_rows = np.nonzero(found)[0] + first
        columns = {QUERY_INDEX: pa.array(query_rows.astype(np.int64)), **columns}
    return pa.table(columns)


class BareFaissServer(flight.FlightServerBase):
    """pyarrow Flight and a faiss index, nothing else: ids are row numbers (the table's ``id``)."""

    def __init__(self, index: Any) -> None:
        super().__init__("grpc://127.0.0.1:0")
        self.index = index

    def do_get(self, context: flight.ServerCallContext, ticket: flight.Ticket) -> flight.FlightDataStream:
        """One ``{"search": {"vector", "k"}}`` ticket."""
        body = json.loads(ticket.ticket)["search"]
        query = workloads.unit_rows(np.asarray(body["vector"], dtype=np.float32).reshape(1, -1))
        similarities, ids = self.index.search(query, int(body["k"]))
        return flight.RecordBatchStream(result_table(ids, similarities))

    def do_exchange(
        self, _: object, command: flight.FlightDescriptor, reader: Reader, writer: Writer
    ) -> None:
        """Batches of query vectors in, their k nearest rows out, tagged with the query's stream row."""
        k = int(json.loads(command.command)["search"]["k"])
        writer.begin(result_table(np.empty((0, k), np.int64), np.empty((0, k), np.float32), 0).schema)
        first = 0
        for chunk in reader:
            if chunk.data is None:
                continue
            column = chunk.data.column(0)
            matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), -1)
            similarities, ids = self.index.search(workloads.unit_rows(matrix), k)
            writer.write_table(result_table(ids, similarities, first))
            first += len(column)


def serve_bare(index_path: Path) -> int:
    """Serve the faiss index at ``index_path`` on a free loopback port until killed."""
    index = faiss.read_index(str(index_path))
    index.hnsw.efSearch = EF_SEARCH
    server = BareFaissServer(index)
    print(f"ready at grpc://127.0.0.1:{server.port}", file=sys.stderr, flush=True)
    server.serve()
    return 0


@dataclass
class BareServer(harness.Server):
    """This script with ``--serve-bare`` as a server process; ``root`` is the faiss index file."""

    def command(self) -> list[str]:
        """The bare server's command line."""
        return [sys.executable, "-m", __spec__.name, "--serve-bare", str(self.root)]


# -- in-process contenders -------------------------------------------------------------------------
class FaissSearcher:
    """faiss in this process, one call per query; all threads share the index."""

    def __init__(self, index: Any, queries: np.ndarray, k: int) -> None:
        self.index, self.queries, self.k = index, queries, k

    def worker(self, slot: int) -> harness.QueryFn:
        """The search function (the same for every thread)."""

        def search(i: int) -> pa.Table:
            similarities, ids = self.index.search(workloads.unit_rows(self.queries[i : i + 1]), self.k)
            return result_table(ids, similarities)

        return search

    def batches(self, queries: np.ndarray, batch_rows: int) -> pa.Table:
        """One faiss call per batch of ``batch_rows`` queries (the counterpart of DoExchange)."""
        parts = []
        for start in range(0, len(queries), batch_rows):
            similarities, ids = self.index.search(
                workloads.unit_rows(queries[start : start + batch_rows]), self.k
            )
            parts.append(result_table(ids, similarities, start))
        return pa.concat_tables(parts)


class LanceSearcher:
    """lancedb in this process, selecting the same columns as the Flight requests."""

    def __init__(self, table: Any, queries: np.ndarray, params: dict[str, int], k: int) -> None:
        self.table, self.queries, self.params, self.k = table, queries, params, k

    def worker(self, slot: int) -> harness.QueryFn:
        """The search function (the same for every thread)."""
        return lambda i: workloads.local_search(self.table, self.queries[i], self.params, self.k, COLUMNS)

    def batches(self, queries: np.ndarray, batch_rows: int) -> pa.Table:
        """One lancedb multi-vector search per batch (``query_index`` renamed ``_query_index``)."""
        table = workloads.local_batches(self.table, queries, self.params, self.k, batch_rows, COLUMNS)
        names = [QUERY_INDEX if name == "query_index" else name for name in table.column_names]
        return table.rename_columns(names)


# -- plan and results ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan(workloads.VectorPlan):
    """The run's parameters."""

    exchange_batch: int
    ingest_rounds: int
    lance_index: str
    lance_recall: float
    lance_batches: bool


@dataclass
class Results:
    """Everything measured in one run."""

    put_seconds: list[float] = field(default_factory=list)
    warm_seconds: list[float] = field(default_factory=list)
    build_log_seconds: list[float] = field(default_factory=list)
    restart_ready_seconds: float = float("nan")
    restart_warm_seconds: float = float("nan")
    restart_loaded_saved: bool = False
    faiss_build_seconds: float = float("nan")
    lance_build_seconds: float = float("nan")
    lance_params: dict[str, int] = field(default_factory=dict)
    lance_sweep: list[tuple[dict[str, int], float]] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    file_mb: dict[str, float] = field(default_factory=dict)  # file-backed part (libraries) of a phase's RSS
    search: dict[tuple[str, int], harness.Series] = field(
        default_factory=lambda: collections.defaultdict(harness.Series)
    )
    recall: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    exchange_qps: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    exchange_recall: dict[str, float] = field(default_factory=dict)
    symptoms: list[str] = field(default_factory=list)


@dataclass
class Contender:
    """A search contender: its per-thread search functions, its batch call, the process serving it."""

    searcher: harness.Searcher
    exchange: Callable[[np.ndarray], pa.Table] | None  # batch search (``_query_index``, ``id``), if any
    pid: int | None  # the server process (None: this process)


# -- lakehouse phases ------------------------------------------------------------------------------
def wait_warm(client: flight.FlightClient, timeout: float = WARM_TIMEOUT) -> float:
    """Seconds until ``describe_dataset`` shows the table served from memory."""
    started = time.perf_counter()
    if not harness.wait_served(client, workloads.DATASET, timeout, POLL_SECONDS):
        raise RuntimeError(
            f"the table is not served from memory: {harness.serving(client, workloads.DATASET)}"
        )
    return time.perf_counter() - started


def measure_ingest(
    server: harness.Server, client: flight.FlightClient, corpus: workloads.Corpus, plan: Plan, out: Results
) -> None:
    """Create the table ``plan.ingest_rounds`` times (dropped between), each time waiting until warm."""
    rounds = workloads.create_rounds(
        client,
        server.pid,
        corpus,
        plan.ingest_rounds,
        meter=harness.PeakRss,
        then=lambda: out.warm_seconds.append(wait_warm(client)),
    )
    for ingest in rounds:
        out.put_seconds.append(ingest.seconds)
        out.rss_mb["lakehouse: ingest + in-memory build, peak"].append(ingest.peak_rss / MB)
        log(
            f"ingest #{ingest.number + 1}: DoPut {ingest.seconds:.2f} s, "
            f"warm {out.warm_seconds[-1]:.2f} s later, peak RSS {ingest.peak_rss / MB:.0f} MB"
        )
    out.build_log_seconds = [float(m.group(2)) for m in BUILD_LINE.finditer(server.log_text())]
    time.sleep(SETTLE_SECONDS)
    record_steady(server, RSS_AFTER_WARM, out)


def record_steady(server: harness.Server, phase: str, out: Results) -> None:
    """The server's RSS now, and its file-backed part (mapped libraries) on its own."""
    out.rss_mb[phase].append(harness.RssSampler(server.pid).sample() / MB)
    out.file_mb[phase] = psutil.Process(server.pid).memory_info().shared / MB


def check_memory(client: flight.FlightClient, out: Results, when: str) -> None:
    """Record a symptom when the table is not served from memory."""
    facts = harness.serving(client, workloads.DATASET)
    if facts.get("from") != "memory":
        out.symptoms.append(f"{when}: describe_dataset serving = {facts}")
        log(f"NOT served from memory {when}: {facts}")


# -- anchors ---------------------------------------------------------------------------------------
def lance_anchor(
    server_root: Path, work: Path, corpus: workloads.Corpus, truth: np.ndarray, plan: Plan, out: Results
) -> Any:
    """A copy of the server's Lance table with a ``plan.lance_index`` index built here; the open table."""
    import lancedb  # here, not at the top: the bare server process runs this script without it
    from lancedb.index import HnswSq, IvfPq

    shutil.copytree(
        server_root / "lance" / f"{workloads.DATASET}.lance", work / "anchor" / f"{workloads.DATASET}.lance"
    )
    table = lancedb.connect(str(work / "anchor")).open_table(workloads.DATASET)
    config = (
        HnswSq(distance_type=workloads.METRIC)
        if plan.lance_index == "ivf_hnsw_sq"
        else IvfPq(distance_type=workloads.METRIC)
    )
    started = time.perf_counter()
    table.create_index(workloads.VECTOR, config=config)
    out.lance_build_seconds = time.perf_counter() - started
    log(f"lancedb {plan.lance_index} built in {out.lance_build_seconds:.1f} s")
    sweep_truth = truth[:SWEEP_QUERIES]
    for params in workloads.CANDIDATES[plan.lance_index]:
        found = harness.result_ids(
            [
                workloads.local_search(table, q, params, plan.k, COLUMNS)
                for q in corpus.queries[: len(sweep_truth)]
            ]
        )
        out.lance_sweep.append((params, workloads.recall(found, sweep_truth)))
        log(f"lancedb {params}: recall@{plan.k} {out.lance_sweep[-1][1]:.3f}")
        if out.lance_sweep[-1][1] >= plan.lance_recall:
            break
    out.lance_params = out.lance_sweep[-1][0]
    return table


def faiss_anchor(corpus: workloads.Corpus, path: Path, out: Results) -> Any:
    """The faiss HNSW index of the table, built here and saved to ``path`` for the bare server."""
    started = time.perf_counter()
    index = faiss_hnsw(corpus.vectors)
    out.faiss_build_seconds = time.perf_counter() - started
    log(f"faiss HNSWFlat built in {out.faiss_build_seconds:.1f} s")
    faiss.write_index(index, str(path))
    return index


# -- measurements ----------------------------------------------------------------------------------
def warm_up(contenders: dict[str, Contender], plan: Plan) -> None:
    """Untimed queries and one batch per contender."""
    warmup = [i % plan.queries for i in range(WARMUP_QUERIES)]
    for contender in contenders.values():
        harness.run_round(contender.searcher, warmup, plan.concurrency)
        harness.run_round(contender.searcher, warmup, 1)


def measure_searches(contenders: dict[str, Contender], truth: np.ndarray, plan: Plan, out: Results) -> None:
    """``plan.rounds`` rounds at 1 and ``plan.concurrency`` threads, the contenders' order rotating."""
    names = list(contenders)
    queries = list(range(plan.queries))
    for r in range(plan.rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for concurrency in (1, plan.concurrency):
            for name in order:
                contender = contenders[name]
                server_cpu, local_cpu = (
                    harness.cpu_seconds(contender.pid) if contender.pid else 0.0,
                    harness.cpu_seconds(),
                )
                result = harness.run_round(contender.searcher, queries, concurrency)
                if contender.pid:
                    server_cpu = harness.cpu_seconds(contender.pid) - server_cpu
                out.search[(name, concurrency)].add(result, server_cpu, harness.cpu_seconds() - local_cpu)
                if concurrency == 1:
                    out.recall[name].append(workloads.recall(harness.result_ids(result.results), truth))
                log(
                    f"round {r + 1} {name:<19} c={concurrency:<2}: {result.qps:7.1f} q/s, "
                    f"p50 {result.percentile_ms(50):6.2f} ms, p99 {result.percentile_ms(99):6.2f} ms"
                )


def measure_exchange(
    contenders: dict[str, Contender], queries: np.ndarray, truth: np.ndarray, plan: Plan, out: Results
) -> None:
    """Batch search of ``queries`` per contender, ``plan.rounds`` times, the order rotating."""
    names = [name for name, contender in contenders.items() if contender.exchange is not None]
    for name in names:  # warm-up
        contenders[name].exchange(queries[: plan.exchange_batch])
    for r in range(plan.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            started = time.perf_counter()
            result = contenders[name].exchange(queries)
            seconds = time.perf_counter() - started
            if result.num_rows != len(queries) * plan.k:
                out.symptoms.append(f"{name} batch search: {result.num_rows} rows for {len(queries)} queries")
            out.exchange_qps[name].append(len(queries) / seconds)
            if r == 0:
                found = harness.exchange_ids(result, len(queries))[: len(truth)]
                out.exchange_recall[name] = workloads.recall(found, truth)
            log(f"exchange round {r + 1} {name:<19}: {len(queries) / seconds:8.1f} q/s")


def measure_restart(
    work: Path, env: dict[str, str], tickets: list[flight.Ticket], plan: Plan, out: Results
) -> None:
    """Restart the lakehouse on the same root: time until warm (saved graph), RSS, one search round."""
    server = harness.Server(work / "lakehouse", work / "server-restart.log", env, name="restarted server")
    started = time.perf_counter()
    with server, flight.connect(server.location) as client:
        out.restart_ready_seconds = time.perf_counter() - started
        out.restart_warm_seconds = wait_warm(client)
        out.restart_loaded_saved = SAVED_LINE.search(server.log_text()) is not None
        log(
            f"restarted: ready in {out.restart_ready_seconds:.1f} s, "
            f"warm {out.restart_warm_seconds:.1f} s later (saved graph: {out.restart_loaded_saved})"
        )
        time.sleep(SETTLE_SECONDS)
        record_steady(server, RSS_RESTART_WARM, out)
        searcher = harness.FlightSearcher(server.location, tickets, plan.concurrency)
        try:
            with harness.PeakRss(server.pid) as rss:
                result = harness.run_round(searcher, list(range(plan.queries)), plan.concurrency)
                out.search[("lakehouse restarted", plan.concurrency)].add(result, 0.0, 0.0)
            out.rss_mb[RSS_RESTART_SEARCHING].append(rss.peak / MB)
            check_memory(client, out, "after the searches of the restarted server")
        finally:
            searcher.close()


@dataclass(frozen=True)
class Anchors:
    """The in-process contenders' indexes: faiss, and the lancedb table with its search parameters."""

    index: Any
    lance_table: Any
    lance_params: dict[str, int]


def contenders_of(
    stack: ExitStack,
    servers: tuple[harness.Server, harness.Server],
    anchors: Anchors,
    corpus: workloads.Corpus,
    tickets: list[flight.Ticket],
    plan: Plan,
) -> dict[str, Contender]:
    """The four contenders (lakehouse, bare server, faiss, lancedb); ``stack`` closes their clients."""
    lakehouse, bare = servers
    body = {"dataset": workloads.DATASET, "k": plan.k, "columns": COLUMNS}
    faiss_searcher = FaissSearcher(anchors.index, corpus.queries, plan.k)
    lance_searcher = LanceSearcher(anchors.lance_table, corpus.queries, anchors.lance_params, plan.k)
    contenders: dict[str, Contender] = {}
    for name, server in ((LAKEHOUSE, lakehouse), (BARE, bare)):
        searcher = harness.FlightSearcher(server.location, tickets, plan.concurrency)
        stack.callback(searcher.close)
        client = searcher.clients[0]
        contenders[name] = Contender(
            searcher,
            lambda q, client=client: harness.flight_exchange(
                client, q, body, workloads.VECTOR, plan.exchange_batch
            ),
            server.pid,
        )
    contenders[FAISS] = Contender(
        faiss_searcher, lambda q: faiss_searcher.batches(q, plan.exchange_batch), None
    )
    contenders[LANCE] = Contender(
        lance_searcher,
        (lambda q: lance_searcher.batches(q, plan.exchange_batch)) if plan.lance_batches else None,
        None,
    )
    return contenders


# -- report ----------------------------------------------------------------------------------------
def render_searches(out: Results, plan: Plan) -> str:
    """QPS, latencies, recall and CPU per contender and concurrency."""
    lines = []
    for name in (LAKEHOUSE, BARE, FAISS, LANCE):
        for concurrency in (1, plan.concurrency):
            s = out.search[(name, concurrency)]
            cpu = cell(s.local_cpu_ms, 2)
            if name in (LAKEHOUSE, BARE):
                cpu = f"{cell(s.server_cpu_ms, 2)} + {cpu}"
            lines.append(
                f"| {name} | {concurrency} | {cell(s.qps, 0)} | {cell(s.p50_ms, 2)} | {cell(s.p99_ms, 2)} | "
                f"{median(out.recall[name]):.3f} | {cpu} | <sub>QPS {spread(s.qps, 0)}; "
                f"p50 {spread(s.p50_ms, 2)}; p99 {spread(s.p99_ms, 2)}</sub> |"
            )
    return (
        f"| contender | clients | QPS | p50 ms | p99 ms | recall@{plan.k} | CPU ms/query (server + client) "
        "| <sub>min-max</sub> |\n|---|---:|---:|---:|---:|---:|---|---|\n" + "\n".join(lines) + "\n"
    )


def render_exchange(out: Results, plan: Plan) -> str:
    """Batch search QPS per contender."""
    lines = [
        f"| {name} | {cell(out.exchange_qps[name], 0)} | {out.exchange_recall.get(name, float('nan')):.3f} | "
        f"<sub>{spread(out.exchange_qps[name], 0)}</sub> |"
        for name in (LAKEHOUSE, BARE, FAISS, LANCE)
        if name in out.exchange_qps
    ]
    return (
        f"| batch search ({plan.exchange_queries} queries, batches of {plan.exchange_batch}) | QPS | "
        f"recall@{plan.k} | <sub>min-max</sub> |\n|---|---:|---:|---|\n" + "\n".join(lines) + "\n"
    )


def render_serving(out: Results, plan: Plan) -> str:
    """Ingest, warm-up and restart times of the lakehouse; build times of the anchors."""
    restarted = out.search[("lakehouse restarted", plan.concurrency)]
    return (
        "| lakehouse | median | <sub>min-max</sub> |\n|---|---:|---|\n"
        f"| DoPut create (s) | {cell(out.put_seconds, 2)} | <sub>{spread(out.put_seconds, 2)}</sub> |\n"
        f"| time until warm after the DoPut returned (s) | {cell(out.warm_seconds, 2)} | "
        f"<sub>{spread(out.warm_seconds, 2)}</sub> |\n"
        f"| in-memory build, from the server log (s) | {cell(out.build_log_seconds, 2)} | "
        f"<sub>{spread(out.build_log_seconds, 2)}</sub> |\n"
        f"| restart: process start until ready (s) | {out.restart_ready_seconds:.2f} | |\n"
        f"| restart: ready until warm, saved graph loaded = {out.restart_loaded_saved} (s) | "
        f"{out.restart_warm_seconds:.2f} | |\n"
        f"| restarted server, one round at {plan.concurrency} clients (QPS / p50 / p99 ms) | "
        f"{cell(restarted.qps, 0)} / {cell(restarted.p50_ms, 2)} / {cell(restarted.p99_ms, 2)} | |\n"
        f"\nAnchors: faiss HNSWFlat built in {out.faiss_build_seconds:.1f} s; "
        f"lancedb `{plan.lance_index}` built in {out.lance_build_seconds:.1f} s, searched with "
        + ", ".join(f"{key}={value}" for key, value in out.lance_params.items())
        + " (sweep: "
        + ", ".join(f"{params} {value:.3f}" for params, value in out.lance_sweep)
        + ").\n"
    )


def render_memory(out: Results) -> str:
    """Server RSS per phase."""
    lines = [
        f"| {phase} | {median(values):.0f} | "
        + (f"{out.file_mb[phase]:.0f}" if phase in out.file_mb else "-")
        + f" | <sub>{spread(values, 0)}</sub> |"
        for phase, values in out.rss_mb.items()
    ]
    return (
        "| server RSS (MB) | median | of which file-backed (libraries) | <sub>min-max</sub> |\n"
        "|---|---:|---:|---|\n" + "\n".join(lines) + "\n"
    )


def render_targets(out: Results, plan: Plan) -> str:
    """The issue's targets, PASS/FAIL."""
    one, many = out.search[(LAKEHOUSE, 1)], out.search[(LAKEHOUSE, plan.concurrency)]
    p50, qps, p99 = median(one.p50_ms), median(many.qps), median(many.p99_ms)
    found = median(out.recall[LAKEHOUSE])
    exchange = median(out.exchange_qps[LAKEHOUSE])
    rows = [
        (f"p50 <= {TARGETS.p50_ms} ms at 1 client", f"{p50:.2f} ms", p50 <= TARGETS.p50_ms),
        (
            f">= {TARGETS.qps:.0f} q/s at {plan.concurrency} clients with p99 <= {TARGETS.p99_ms:.0f} ms",
            f"{qps:.0f} q/s, p99 {p99:.1f} ms",
            qps >= TARGETS.qps and p99 <= TARGETS.p99_ms,
        ),
        (
            f"recall@{plan.k} >= {TARGETS.recall}",
            f"{found:.3f} (DoGet), {out.exchange_recall.get(LAKEHOUSE, float('nan')):.3f} (DoExchange)",
            min(found, out.exchange_recall.get(LAKEHOUSE, 0.0)) >= TARGETS.recall,
        ),
    ]
    for phase in SERVED_PHASES:
        value = max(out.rss_mb.get(phase, [float("nan")]))
        target = f"server RSS <= {TARGETS.rss_mb:.0f} MB: {phase}"
        rows.append((target, f"{value:.0f} MB", value <= TARGETS.rss_mb))
    rows.append(
        (
            f"DoExchange >= {TARGETS.exchange_qps:.0f} q/s",
            f"{exchange:.0f} q/s",
            exchange >= TARGETS.exchange_qps,
        )
    )
    lines = [f"| {target} | {measured} | {verdict(ok)} |" for target, measured, ok in rows]
    return "| target | measured | pass/fail |\n|---|---|---|\n" + "\n".join(lines) + "\n"


def render(out: Results, plan: Plan, corpus: workloads.Corpus) -> str:
    """The whole markdown report."""
    symptoms = "".join(f"\n- server symptom: {text}" for text in out.symptoms) or "\n- server symptoms: none"
    return (
        f"{plan.rows:,} rows x {plan.dim} float32 ({corpus.table.nbytes / MB:.0f} MB of Arrow data), "
        f"{plan.clusters} clusters, seed {plan.seed}; k={plan.k}, columns {COLUMNS}, "
        f"metric {workloads.METRIC}; medians of {plan.rounds} rounds of {plan.queries} queries per contender "
        "and concurrency\n\n"
        + render_searches(out, plan)
        + "\n"
        + render_exchange(out, plan)
        + "\n"
        + render_serving(out, plan)
        + "\n"
        + render_memory(out)
        + "\n"
        + render_targets(out, plan)
        + symptoms
        + "\n"
    )


# -- main ------------------------------------------------------------------------------------------
def run(work: Path, plan: Plan, env: dict[str, str]) -> str:
    """Generate the input, run every phase against fresh servers, render the report."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"generating {plan.rows:,} x {plan.dim} vectors ...")
    corpus = workloads.make_corpus(
        plan.rows, plan.dim, plan.clusters, max(plan.queries, plan.exchange_queries), plan.seed
    )
    truth = workloads.exact_neighbours(corpus.vectors, corpus.queries[: plan.queries], plan.k)
    tickets = harness.search_tickets(
        corpus.queries[: plan.queries], {"dataset": workloads.DATASET, "k": plan.k, "columns": COLUMNS}
    )
    out = Results()
    lakehouse = harness.Server(work / "lakehouse", work / "server.log", env, name="lakehouse")
    bare = BareServer(work / "faiss.index", work / "bare.log", name="bare server")
    with ExitStack() as servers, ExitStack() as stack:
        servers.enter_context(lakehouse)
        log(f"lakehouse at {lakehouse.location} (pid {lakehouse.pid}), log {lakehouse.log}")
        out.rss_mb["lakehouse: idle at start"].append(harness.RssSampler(lakehouse.pid).sample() / MB)
        client = stack.enter_context(flight.connect(lakehouse.location))
        measure_ingest(lakehouse, client, corpus, plan, out)
        index = faiss_anchor(corpus, bare.root, out)
        servers.enter_context(bare)
        log(f"bare server at {bare.location} (pid {bare.pid})")
        lance_table = lance_anchor(lakehouse.root, work, corpus, truth, plan, out)
        anchors = Anchors(index, lance_table, out.lance_params)
        contenders = contenders_of(stack, (lakehouse, bare), anchors, corpus, tickets, plan)
        check_memory(client, out, "before the searches")
        record_steady(lakehouse, "lakehouse: before the searches (after the anchors' Lance index)", out)
        warm_up(contenders, plan)
        with harness.PeakRss(lakehouse.pid) as rss, harness.PeakRss(bare.pid) as bare_rss:
            measure_searches(contenders, truth, plan, out)
            measure_exchange(contenders, corpus.queries[: plan.exchange_queries], truth, plan, out)
        out.rss_mb[RSS_SEARCHING].append(rss.peak / MB)
        out.rss_mb["bare flight+faiss: peak while searching"].append(bare_rss.peak / MB)
        check_memory(client, out, "after the searches")
    measure_restart(work, env, tickets, plan, out)
    return render(out, plan, corpus)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = workloads.vector_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--queries", type=int, default=500, help="queries per round and contender (default %(default)s)"
    )
    parser.add_argument(
        "--exchange-queries", type=int, default=5000, help="queries per batch search (default %(default)s)"
    )
    parser.add_argument(
        "--exchange-batch", type=int, default=500, help="query vectors per batch (default %(default)s)"
    )
    parser.add_argument("--concurrency", type=int, default=10, help="client threads (default %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    parser.add_argument(
        "--ingest-rounds", type=int, default=3, help="DoPut + warm-up rounds (default %(default)s)"
    )
    parser.add_argument(
        "--lance-index",
        choices=LANCE_KINDS,
        default=LANCE_KINDS[0],
        help="lancedb index (default %(default)s)",
    )
    parser.add_argument(
        "--lance-recall", type=float, default=0.9, help="recall@k lancedb must reach (default %(default)s)"
    )
    parser.add_argument(
        "--lance-batches", action="store_true", help="also time lancedb multi-vector batch searches"
    )
    parser.add_argument("--serve-bare", type=Path, default=None, help=argparse.SUPPRESS)
    counts = ("queries", "exchange_queries", "exchange_batch", "concurrency", "ingest_rounds")
    return workloads.parse_vector_arguments(parser, argv, counts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout (or serve the bare server with --serve-bare)."""
    args = parse_args(argv)
    if args.serve_bare is not None:
        return serve_bare(args.serve_bare)
    return harness.print_report(
        args, "bench-vector-cache-", lambda work, env: run(work, Plan.from_args(args), env)
    )


if __name__ == "__main__":
    raise SystemExit(main())
