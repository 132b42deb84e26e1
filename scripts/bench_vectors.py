"""Vector-search benchmark (issue 4): ingest, index builds, search QPS/latency and recall through the server.

* Input: ``--rows`` clustered float32 vectors of ``--dim`` (fixed seed), with an int ``id`` and a small
  ``category`` string column. Every cluster is a Gaussian around its centre whose spread lives in a
  16-dimensional subspace of its own, plus a little isotropic noise: embeddings have a low intrinsic
  dimension, and with isotropic noise in all 384 dimensions the nearest neighbours inside a cluster are
  arbitrary (no index reaches a useful recall).
* Server: ``python -m flight_lakehouse serve --root <tmp> --port 0`` in a subprocess, stopped by pid.
  The clients run in this process, one Flight client per thread.
* Ingest: one DoPut of the whole table (``mode: create``), repeated ``--rounds`` times (dropped between).
* Index builds: ``create_index`` (ivf_pq, then ivf_hnsw_sq with ``replace``), polling ``describe_dataset``
  until the index is ``ready``.
* Parameters: for each index, the cheapest candidate search parameters whose recall@10 against numpy
  brute force (cosine) reaches ``--target-recall``, tried in-process on the server's table.
* Search: DoGet ``{"search": ...}`` tickets at concurrency 1 and ``--concurrency``, next to lancedb in
  this process on the same Lance table (same k, parameters, query vectors and number of threads).
* Batch search: DoExchange with the queries streamed in batches of 100, next to lancedb multi-vector
  searches of the same batches in this process.
* Memory: the server's RSS (children included), peak per phase and steady after the searches. After
  each DoPut the server builds its in-memory copy of the table (issue 5; unless ``--env
  LAKEHOUSE_VECTOR_CACHE_MB=0``): the next round waits for it, and its peak is listed with the builds.

Every measurement is repeated ``--rounds`` times (contenders interleaved) and reported as medians.

Usage::

    python scripts/bench_vectors.py                                          # 100k x 384, 5 rounds
    python scripts/bench_vectors.py --rows 20000 --rounds 3 --queries 200    # quick trial
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_core import RssSampler, add_work_arguments, median, print_report, spread, stop_process

READY = re.compile(r"ready at (grpc://127\.0\.0\.1:\d+)")
LANCE_WARNING = re.compile(r"\bWARN\s+(\S+)\]\s*(.{0,90})")
DATASET = "vectors"
VECTOR = "vector"
COLUMNS = ["id", "category"]
DISTANCE = "_distance"
METRIC = "cosine"
KINDS = ("ivf_pq", "ivf_hnsw_sq")
LATENT_DIMS = 16
NOISE = 0.1
CATEGORIES = 8
PUT_BATCH_ROWS = 10_000
EXCHANGE_BATCH_ROWS = 100
WARMUP_QUERIES = 50
POLL_SECONDS = 0.25
SETTLE_SECONDS = 2.0
BUILD_TIMEOUT = 900.0  # an in-memory copy or an index of the table
MB = 1e6
STARTED = time.monotonic()
#: Search parameters tried per index kind, cheapest first; the first reaching the target recall is used.
CANDIDATES: dict[str, list[dict[str, int]]] = {
    "ivf_pq": [
        {"nprobes": nprobes, "refine_factor": refine}
        for nprobes, refine in ((10, 5), (20, 5), (10, 10), (20, 10), (40, 10), (20, 20), (40, 20), (80, 40))
    ],
    "ivf_hnsw_sq": [{"ef": ef} for ef in (10, 20, 40, 80, 160, 320)],
}


# -- input -----------------------------------------------------------------------------------------
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


# -- server process --------------------------------------------------------------------------------
@dataclass
class Server:
    """``python -m flight_lakehouse serve`` on a free port, its stderr in a file, stopped by pid."""

    root: Path
    log: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    location: str = ""

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        """The command line of the server process (it logs ``ready at grpc://...`` on stderr)."""
        return [sys.executable, "-m", "flight_lakehouse", "serve", "--root", str(self.root), "--port", "0"]

    def start(self, timeout: float = 60.0) -> Server:
        """Start the server and wait for the ready line in its log."""
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            match = READY.search(self.log.read_text(errors="replace"))
            if match:
                self.location = match.group(1)
                return self
            time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_tail())

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM by pid, then SIGKILL if it does not exit within ``grace`` seconds."""
        stop_process(self.process, grace)

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's stderr."""
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def warnings(self) -> collections.Counter[str]:
        """Rust ``WARN`` lines of the server log, counted by target and message start."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return collections.Counter(f"{m.group(1)}: {m.group(2)}" for m in LANCE_WARNING.finditer(text))


# -- Flight calls ----------------------------------------------------------------------------------
def action(client: flight.FlightClient, name: str, body: dict[str, Any]) -> Any:
    """Run an action; returns its decoded JSON result."""
    results = list(client.do_action(flight.Action(name, json.dumps(body).encode())))
    return json.loads(results[0].body.to_pybytes()) if results else None


def put_table(client: flight.FlightClient, table: pa.Table) -> dict[str, Any]:
    """DoPut ``table`` as a new Lance table; returns the PutResult JSON."""
    command = {"ingest": {"dataset": DATASET, "mode": "create", "metric": METRIC}}
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    writer, metadata = client.do_put(descriptor, table.schema)
    with writer:
        for batch in table.to_batches(max_chunksize=PUT_BATCH_ROWS):
            writer.write_batch(batch)
        writer.done_writing()
        result = metadata.read()
    return json.loads(result.to_pybytes()) if result is not None else {}


def serving(client: flight.FlightClient) -> dict[str, Any]:
    """The ``serving`` facts of ``describe_dataset`` (the in-memory copy of the table, issue 5)."""
    return action(client, "describe_dataset", {"dataset": DATASET}).get("serving", {})


def wait_served(
    client: flight.FlightClient, timeout: float = BUILD_TIMEOUT, poll: float = POLL_SECONDS
) -> bool:
    """Wait until the table is served from memory (True), or the server says it will not be (False)."""
    started = time.perf_counter()
    while (facts := serving(client)).get("from") != "memory":
        if facts.get("state") in ("failed", "over budget", "not served"):
            return False
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"not served from memory after {timeout:.0f} s: {facts}")
        time.sleep(poll)
    return True


def index_state(client: flight.FlightClient, kind: str) -> str:
    """``ready`` once the vector column has a ready index of ``kind`` and no build running, else the state."""
    facts = action(client, "describe_dataset", {"dataset": DATASET})
    entries = [entry for entry in facts.get("indexes", []) if entry.get("column") == VECTOR]
    failed = [entry for entry in entries if entry.get("state") == "failed"]
    if failed:
        raise RuntimeError(f"index build failed: {failed[0].get('error')}")
    if any(entry.get("state") == "building" for entry in entries):
        return "building"
    ready = any(entry.get("kind") == kind and entry.get("state") == "ready" for entry in entries)
    return "ready" if ready else "missing"


def build_index(client: flight.FlightClient, kind: str, replace: bool, timeout: float = 1800.0) -> float:
    """Create an index of ``kind`` on the vector column; seconds until ``describe_dataset`` shows it ready."""
    started = time.perf_counter()
    answer = action(
        client, "create_index", {"dataset": DATASET, "column": VECTOR, "kind": kind, "replace": replace}
    )
    while answer.get("state") != "ready" and index_state(client, kind) != "ready":
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"index {kind} not ready after {timeout:.0f} s")
        time.sleep(POLL_SECONDS)
    return time.perf_counter() - started


def search_body(params: dict[str, int], k: int) -> dict[str, Any]:
    """A search request body without its vector."""
    return {"dataset": DATASET, "k": k, "columns": COLUMNS, **params}


def search_tickets(queries: np.ndarray, body: dict[str, Any]) -> list[flight.Ticket]:
    """One DoGet ``{"search": ...}`` ticket per query vector (encoded before any timing)."""
    return [
        flight.Ticket(json.dumps({"search": {**body, "vector": row.tolist()}}).encode()) for row in queries
    ]


def flight_exchange(
    client: flight.FlightClient,
    queries: np.ndarray,
    body: dict[str, Any],
    batch_rows: int = EXCHANGE_BATCH_ROWS,
) -> pa.Table:
    """Stream ``queries`` through DoExchange in batches of ``batch_rows`` (sent on a thread); all results."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"search": body}).encode())
    vector_type = pa.list_(pa.float32(), queries.shape[1])
    schema = pa.schema([(VECTOR, vector_type)])
    writer, reader = client.do_exchange(descriptor)

    def send() -> None:
        writer.begin(schema)
        for start in range(0, len(queries), batch_rows):
            chunk = queries[start : start + batch_rows]
            column = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), queries.shape[1])
            writer.write_batch(pa.record_batch([column], schema=schema))
        writer.done_writing()

    with writer, ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send)
        result = reader.read_all()
        sent.result()
    return result


# -- in-process anchor -----------------------------------------------------------------------------
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
    batch_rows: int = EXCHANGE_BATCH_ROWS,
    columns: Sequence[str] = COLUMNS,
) -> pa.Table:
    """The in-process counterpart of DoExchange: one multi-vector search per ``batch_rows`` queries."""
    parts = [
        local_search(table, list(queries[start : start + batch_rows]), params, k, columns)
        for start in range(0, len(queries), batch_rows)
    ]
    return pa.concat_tables(parts)


# -- concurrent query rounds -----------------------------------------------------------------------
QueryFn = Callable[[int], pa.Table]


class Searcher(Protocol):
    """A contender: gives every client thread its own search function (query number -> result)."""

    def worker(self, slot: int) -> QueryFn: ...


class FlightSearcher:
    """DoGet search tickets, one Flight client per thread slot."""

    def __init__(self, location: str, tickets: list[flight.Ticket], slots: int) -> None:
        self.tickets = tickets
        self.clients = [flight.connect(location) for _ in range(slots)]

    def worker(self, slot: int) -> QueryFn:
        """The search function of thread ``slot``."""
        client = self.clients[slot]
        return lambda i: client.do_get(self.tickets[i]).read_all()

    def close(self) -> None:
        """Close the clients."""
        for client in self.clients:
            client.close()


class LocalSearcher:
    """lancedb in this process; all threads share one table handle, as the server's do."""

    def __init__(self, table: Any, queries: np.ndarray, params: dict[str, int], k: int) -> None:
        self.table, self.queries, self.params, self.k = table, queries, params, k

    def worker(self, slot: int) -> QueryFn:
        """The search function (the same for every thread)."""
        return lambda i: local_search(self.table, self.queries[i], self.params, self.k)


@dataclass(frozen=True)
class Round:
    """One round of queries: wall time and per-query latencies (seconds)."""

    seconds: float
    latencies: list[float]
    results: list[pa.Table]

    @property
    def qps(self) -> float:
        """Queries per second over the round."""
        return len(self.latencies) / self.seconds

    def percentile_ms(self, q: float) -> float:
        """A latency percentile in milliseconds."""
        return float(np.percentile(self.latencies, q)) * 1e3


def run_round(searcher: Searcher, queries: Sequence[int], concurrency: int) -> Round:
    """Run ``queries`` on ``concurrency`` threads (query ``j`` on thread ``j % concurrency``)."""
    latencies = [0.0] * len(queries)
    results: list[pa.Table] = [pa.table({})] * len(queries)
    barrier = threading.Barrier(concurrency + 1)

    def work(slot: int) -> None:
        search = searcher.worker(slot)
        barrier.wait()
        for j in range(slot, len(queries), concurrency):
            started = time.perf_counter()
            results[j] = search(queries[j])
            latencies[j] = time.perf_counter() - started

    with ThreadPoolExecutor(concurrency) as pool:
        futures = [pool.submit(work, slot) for slot in range(concurrency)]
        barrier.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        seconds = time.perf_counter() - started
    return Round(seconds, latencies, results)


def result_ids(tables: Sequence[pa.Table]) -> list[list[int]]:
    """The ``id`` column of every result table."""
    return [table.column("id").to_pylist() for table in tables]


def exchange_ids(result: pa.Table, queries: int) -> list[list[int]]:
    """Per query, the ids of a DoExchange result (grouped by ``_query_index``)."""
    found: list[list[int]] = [[] for _ in range(queries)]
    indexes, ids = result.column("_query_index").to_pylist(), result.column("id").to_pylist()
    for index, row_id in zip(indexes, ids, strict=True):
        found[index].append(row_id)
    return found


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class Series:
    """Per-round figures of one contender at one concurrency."""

    qps: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p99_ms: list[float] = field(default_factory=list)
    server_cpu_ms: list[float] = field(default_factory=list)  # per query
    local_cpu_ms: list[float] = field(default_factory=list)  # per query, this process

    def add(self, result: Round, server_cpu: float, local_cpu: float) -> None:
        """Record one round and the CPU seconds the server and this process used in it."""
        self.qps.append(result.qps)
        self.p50_ms.append(result.percentile_ms(50))
        self.p99_ms.append(result.percentile_ms(99))
        self.server_cpu_ms.append(server_cpu / len(result.latencies) * 1e3)
        self.local_cpu_ms.append(local_cpu / len(result.latencies) * 1e3)


@dataclass
class IndexRun:
    """Everything measured for one index kind."""

    kind: str
    build_seconds: float = 0.0
    params: dict[str, int] = field(default_factory=dict)
    sweep: list[tuple[dict[str, int], float]] = field(default_factory=list)
    recall_flight: float = float("nan")
    recall_local: float = float("nan")
    recall_exchange: float = float("nan")
    search: dict[tuple[str, int], Series] = field(default_factory=lambda: collections.defaultdict(Series))
    exchange_qps: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


@dataclass
class Results:
    """Everything measured in one run."""

    ingest_seconds: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    indexes: list[IndexRun] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    """The run's parameters."""

    rows: int
    dim: int
    clusters: int
    rounds: int
    queries: int
    recall_queries: int
    exchange_queries: int
    concurrency: int
    k: int
    target_recall: float
    kinds: tuple[str, ...]
    seed: int


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (this process when None)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def measure_ingest(
    server: Server, client: flight.FlightClient, corpus: Corpus, plan: Plan, out: Results
) -> None:
    """Ingest the table ``plan.rounds`` times with one DoPut each, dropping it in between."""
    for i in range(plan.rounds):
        if i:
            action(client, "drop_dataset", {"dataset": DATASET})
        with RssSampler(server.pid) as rss:
            started = time.perf_counter()
            put = put_table(client, corpus.table)
            seconds = time.perf_counter() - started
        assert put.get("rows_written") == plan.rows, put
        out.ingest_seconds.append(seconds)
        out.rss_mb["ingest peak"].append(rss.peak / MB)
        log(
            f"  ingest #{i + 1}: {seconds:.2f} s, {plan.rows / seconds:,.0f} rows/s, "
            f"peak RSS {rss.peak / MB:.0f} MB"
        )
        # the server then builds its in-memory copy (issue 5): a build, measured apart like the index
        # builds, before the next round drops the table
        with RssSampler(server.pid) as rss:
            built = wait_served(client)
        if built:
            out.rss_mb["in-memory copy build peak"].append(rss.peak / MB)
    time.sleep(SETTLE_SECONDS)
    out.rss_mb["steady after ingest"].append(RssSampler(server.pid).sample() / MB)


def choose_params(table: Any, corpus: Corpus, truth: np.ndarray, plan: Plan, run: IndexRun) -> dict[str, int]:
    """The first (cheapest) candidate reaching the target recall in-process; the last one if none does."""
    queries = corpus.queries[: len(truth)]
    for params in CANDIDATES[run.kind]:
        found = result_ids([local_search(table, query, params, plan.k) for query in queries])
        run.sweep.append((params, recall(found, truth)))
        log(f"  {run.kind} {params}: recall@{plan.k} {run.sweep[-1][1]:.3f}")
        if run.sweep[-1][1] >= plan.target_recall:
            break
    run.params, run.recall_local = run.sweep[-1]
    return run.params


def measure_searches(
    server: Server, flight_searcher: FlightSearcher, local: LocalSearcher, plan: Plan, run: IndexRun
) -> None:
    """Warm up both contenders, then ``plan.rounds`` rounds at each concurrency, contenders interleaved."""
    contenders: dict[str, Searcher] = {"flight": flight_searcher, "in-process": local}
    warmup = [i % plan.queries for i in range(WARMUP_QUERIES)]
    for searcher in contenders.values():
        run_round(searcher, warmup, plan.concurrency)
    queries = list(range(plan.queries))
    for r in range(plan.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for concurrency in (1, plan.concurrency):
            for name in order:
                server_cpu, local_cpu = cpu_seconds(server.pid), cpu_seconds()
                result = run_round(contenders[name], queries, concurrency)
                server_cpu, local_cpu = cpu_seconds(server.pid) - server_cpu, cpu_seconds() - local_cpu
                run.search[(name, concurrency)].add(result, server_cpu, local_cpu)
                log(
                    f"  {run.kind} round {r + 1} {name:<10} c={concurrency:<2}: {result.qps:7.1f} q/s, "
                    f"p50 {result.percentile_ms(50):6.2f} ms, p99 {result.percentile_ms(99):6.2f} ms"
                )


def measure_exchange(
    client: flight.FlightClient, table: Any, corpus: Corpus, truth: np.ndarray, plan: Plan, run: IndexRun
) -> None:
    """DoExchange batch search against in-process multi-vector searches, ``plan.rounds`` times each."""
    queries = corpus.queries[: plan.exchange_queries]
    body = search_body(run.params, plan.k)
    flight_exchange(client, queries[:EXCHANGE_BATCH_ROWS], body)  # warm-up
    local_batches(table, queries[:EXCHANGE_BATCH_ROWS], run.params, plan.k)
    for r in range(plan.rounds):
        started = time.perf_counter()
        result = flight_exchange(client, queries, body)
        flight_seconds = time.perf_counter() - started
        assert result.num_rows == len(queries) * plan.k, result.num_rows
        started = time.perf_counter()
        local_batches(table, queries, run.params, plan.k)
        local_seconds = time.perf_counter() - started
        run.exchange_qps["flight"].append(len(queries) / flight_seconds)
        run.exchange_qps["in-process"].append(len(queries) / local_seconds)
        if r == 0:
            found = exchange_ids(result, len(queries))[: len(truth)]
            run.recall_exchange = recall(found, truth[: len(found)])
        log(
            f"  {run.kind} exchange round {r + 1}: flight {len(queries) / flight_seconds:7.1f} q/s, "
            f"in-process {len(queries) / local_seconds:7.1f} q/s"
        )


def measure_index(
    server: Server,
    client: flight.FlightClient,
    corpus: Corpus,
    truth: np.ndarray,
    plan: Plan,
    kind: str,
    out: Results,
) -> None:
    """Build one index, choose its parameters, then measure recall, searches and batch searches."""
    run = IndexRun(kind)
    out.indexes.append(run)
    with RssSampler(server.pid) as rss:
        run.build_seconds = build_index(client, kind, replace=len(out.indexes) > 1)
    out.rss_mb[f"{kind} build peak"].append(rss.peak / MB)
    log(f"  {kind} built in {run.build_seconds:.1f} s (peak RSS {rss.peak / MB:.0f} MB)")
    import lancedb  # here: scripts importing these helpers for a server process need not load it

    table = lancedb.connect(str(server.root / "lance")).open_table(DATASET)
    params = choose_params(table, corpus, truth, plan, run)
    tickets = search_tickets(corpus.queries[: max(plan.queries, len(truth))], search_body(params, plan.k))
    flight_searcher = FlightSearcher(server.location, tickets, plan.concurrency)
    try:
        with RssSampler(server.pid) as rss:
            checked = run_round(flight_searcher, list(range(len(truth))), 1)
            run.recall_flight = recall(result_ids(checked.results), truth)
            log(f"  {kind} {params}: recall@{plan.k} through Flight {run.recall_flight:.3f}")
            measure_searches(
                server, flight_searcher, LocalSearcher(table, corpus.queries, params, plan.k), plan, run
            )
            measure_exchange(flight_searcher.clients[0], table, corpus, truth, plan, run)
        out.rss_mb[f"{kind} search peak"].append(rss.peak / MB)
    finally:
        flight_searcher.close()


# -- report ----------------------------------------------------------------------------------------
def cell(values: list[float], digits: int) -> str:
    """``median`` formatted."""
    return f"{median(values):.{digits}f}"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


def render_ingest(results: Results, corpus: Corpus, plan: Plan) -> str:
    """The ingest table."""
    seconds = results.ingest_seconds
    mb = corpus.table.nbytes / MB
    return (
        "| DoPut ingest | median | <sub>min-max</sub> |\n|---|---:|---|\n"
        f"| seconds | {cell(seconds, 2)} | <sub>{spread(seconds, 2)}</sub> |\n"
        f"| rows/s | {plan.rows / median(seconds):,.0f} | <sub>{plan.rows / max(seconds):,.0f}-"
        f"{plan.rows / min(seconds):,.0f}</sub> |\n"
        f"| MB/s (Arrow data) | {mb / median(seconds):.1f} | <sub>{mb / max(seconds):.1f}-"
        f"{mb / min(seconds):.1f}</sub> |\n"
    )


def render_indexes(results: Results, plan: Plan) -> str:
    """Per index kind: build time, chosen parameters and their recall."""
    lines = [
        f"| `{run.kind}` | {run.build_seconds:.1f} | "
        + ", ".join(f"{key}={value}" for key, value in run.params.items())
        + f" | {run.recall_flight:.3f} / {run.recall_local:.3f} / {run.recall_exchange:.3f} |"
        for run in results.indexes
    ]
    return (
        f"| index | build (s, one build) | search parameters | recall@{plan.k} Flight DoGet / in-process / "
        "DoExchange |\n|---|---:|---|---|\n" + "\n".join(lines) + "\n"
    )


def render_searches(results: Results, plan: Plan) -> str:
    """One row per index kind and concurrency: QPS, latencies and CPU of both contenders, ratio."""
    header = (
        "| index | clients | Flight QPS | in-process QPS | ratio | Flight p50 / p99 ms "
        "| in-process p50 / p99 ms | CPU ms/query: server + client / in-process "
        "| <sub>min-max QPS Flight / in-process</sub> |\n"
        "|---|---:|---:|---:|---:|---|---|---|---|\n"
    )
    lines = []
    for run in results.indexes:
        for concurrency in (1, plan.concurrency):
            remote, local = run.search[("flight", concurrency)], run.search[("in-process", concurrency)]
            lines.append(
                f"| `{run.kind}` | {concurrency} | {cell(remote.qps, 1)} | {cell(local.qps, 1)} | "
                f"{median(remote.qps) / median(local.qps):.2f} | {cell(remote.p50_ms, 2)} / "
                f"{cell(remote.p99_ms, 2)} | {cell(local.p50_ms, 2)} / {cell(local.p99_ms, 2)} | "
                f"{cell(remote.server_cpu_ms, 2)} + {cell(remote.local_cpu_ms, 2)} / "
                f"{cell(local.local_cpu_ms, 2)} | "
                f"<sub>{spread(remote.qps, 1)} / {spread(local.qps, 1)}</sub> |"
            )
    return header + "\n".join(lines) + "\n"


def render_exchange(results: Results, plan: Plan) -> str:
    """DoExchange batch search against in-process multi-vector searches."""
    header = (
        "| index | Flight DoExchange QPS | in-process QPS | ratio "
        "| <sub>min-max Flight / in-process</sub> |\n"
        "|---|---:|---:|---:|---|\n"
    )
    lines = []
    for run in results.indexes:
        remote, local = run.exchange_qps["flight"], run.exchange_qps["in-process"]
        lines.append(
            f"| `{run.kind}` | {cell(remote, 1)} | {cell(local, 1)} | {median(remote) / median(local):.2f} | "
            f"<sub>{spread(remote, 1)} / {spread(local, 1)}</sub> |"
        )
    return header + "\n".join(lines) + "\n"


def render_memory(results: Results) -> str:
    """Server RSS per phase, with the < 500 MB target."""
    lines = [
        f"| {phase} | {median(values):.0f} | {max(values):.0f} | {verdict(max(values) < 500)} |"
        for phase, values in results.rss_mb.items()
    ]
    return "| server RSS (MB) | median | worst | < 500 MB |\n|---|---:|---:|---|\n" + "\n".join(lines) + "\n"


def render_targets(results: Results, plan: Plan) -> str:
    """The issue's targets, PASS/FAIL per index kind."""
    c = plan.concurrency
    lines = []
    for run in results.indexes:
        remote, local = run.search[("flight", c)], run.search[("in-process", c)]
        ratio = median(remote.qps) / median(local.qps)
        p99 = median(remote.p99_ms)
        lines.append(
            f"| `{run.kind}`: Flight >= 0.8x in-process QPS at {c} clients | {ratio:.2f}x "
            f"| {verdict(ratio >= 0.8)} |"
        )
        ok = p99 <= 20 and run.recall_flight >= plan.target_recall
        lines.append(
            f"| `{run.kind}`: p99 <= 20 ms at {c} clients with recall@10 >= {plan.target_recall} | "
            f"{p99:.1f} ms, recall {run.recall_flight:.3f} | {verdict(ok)} |"
        )
    search_peaks = [max(v) for phase, v in results.rss_mb.items() if "build" not in phase]
    lines.append(
        f"| server RSS < 500 MB (loading and searching; builds listed above) | {max(search_peaks):.0f} MB | "
        f"{verdict(max(search_peaks) < 500)} |"
    )
    return "| target | measured | pass/fail |\n|---|---|---|\n" + "\n".join(lines) + "\n"


def render(results: Results, corpus: Corpus, plan: Plan, server: Server) -> str:
    """The whole markdown report."""
    sweeps = "\n".join(
        f"- `{run.kind}` recall@{plan.k} in-process over {plan.recall_queries} queries: "
        + ", ".join(f"{params} {value:.3f}" for params, value in run.sweep)
        for run in results.indexes
    )
    warnings = server.warnings()
    noise = "".join(f"\n- server log: {count} x `{message}`" for message, count in warnings.most_common(3))
    return (
        f"{plan.rows:,} rows x {plan.dim} float32 ({corpus.table.nbytes / MB:.0f} MB of Arrow data), "
        f"{plan.clusters} clusters, seed {plan.seed}; k={plan.k}, metric {METRIC}; medians of {plan.rounds} "
        f"rounds of {plan.queries} queries per contender and concurrency; ratio = Flight / in-process\n\n"
        + render_ingest(results, corpus, plan)
        + "\n"
        + render_indexes(results, plan)
        + "\n"
        + render_searches(results, plan)
        + f"\nBatch search: {plan.exchange_queries} queries in batches of {EXCHANGE_BATCH_ROWS}, "
        "one stream\n\n"
        + render_exchange(results, plan)
        + "\n"
        + render_memory(results)
        + "\n"
        + render_targets(results, plan)
        + "\nParameter sweeps (cheapest first, stopped at the target):\n"
        + sweeps
        + noise
        + "\n"
    )


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--rows", type=int, default=100_000, help="vectors in the table (default %(default)s)"
    )
    parser.add_argument("--dim", type=int, default=384, help="vector dimension (default %(default)s)")
    parser.add_argument("--clusters", type=int, default=100, help="Gaussian clusters (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per measurement (default %(default)s)")
    parser.add_argument(
        "--queries",
        type=int,
        default=500,
        help="queries per round, contender and concurrency (default %(default)s)",
    )
    parser.add_argument(
        "--recall-queries", type=int, default=200, help="queries for recall (default %(default)s)"
    )
    parser.add_argument(
        "--exchange-queries",
        type=int,
        default=1000,
        help="queries per DoExchange stream (default %(default)s)",
    )
    parser.add_argument("--concurrency", type=int, default=10, help="client threads (default %(default)s)")
    parser.add_argument("--k", type=int, default=10, help="neighbours per query (default %(default)s)")
    parser.add_argument(
        "--target-recall", type=float, default=0.9, help="recall@k to reach (default %(default)s)"
    )
    parser.add_argument(
        "--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="index kinds, in order"
    )
    parser.add_argument("--seed", type=int, default=42, help="random seed (default %(default)s)")
    add_work_arguments(parser)
    args = parser.parse_args(argv)
    counts = (args.rows, args.dim, args.clusters, args.rounds, args.queries, args.recall_queries)
    if min(*counts, args.exchange_queries, args.concurrency, args.k) <= 0:
        parser.error("counts must be > 0")
    if args.clusters > args.rows or args.k > args.rows:
        parser.error("--clusters and --k must not exceed --rows")
    return args


def run(work: Path, plan: Plan, env: dict[str, str]) -> str:
    """Generate the input, measure everything against a fresh server, and render the report."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"generating {plan.rows:,} x {plan.dim} vectors ...")
    queries = max(plan.queries, plan.recall_queries, plan.exchange_queries, WARMUP_QUERIES)
    corpus = make_corpus(plan.rows, plan.dim, plan.clusters, queries, plan.seed)
    truth = exact_neighbours(corpus.vectors, corpus.queries[: plan.recall_queries], plan.k)
    server = Server(work / "lakehouse", work / "server.log", env)
    results = Results()
    try:
        server.start()
        log(f"server at {server.location} (pid {server.pid}), log {server.log}")
        results.rss_mb["idle at start"].append(RssSampler(server.pid).sample() / MB)
        client = flight.connect(server.location)
        try:
            measure_ingest(server, client, corpus, plan, results)
            for kind in plan.kinds:
                measure_index(server, client, corpus, truth, plan, kind, results)
            time.sleep(SETTLE_SECONDS)
            results.rss_mb["steady after searches"].append(RssSampler(server.pid).sample() / MB)
        finally:
            client.close()
    except BaseException:
        log("server log tail:\n" + server.log_tail())
        raise
    finally:
        server.stop()
    return render(results, corpus, plan, server)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    plan = Plan(
        rows=args.rows,
        dim=args.dim,
        clusters=args.clusters,
        rounds=args.rounds,
        queries=args.queries,
        recall_queries=args.recall_queries,
        exchange_queries=args.exchange_queries,
        concurrency=args.concurrency,
        k=args.k,
        target_recall=args.target_recall,
        kinds=tuple(args.kinds),
        seed=args.seed,
    )
    return print_report(args, "bench-vectors-", lambda work, env: run(work, plan, env))


if __name__ == "__main__":
    raise SystemExit(main())
