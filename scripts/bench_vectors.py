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

    python -m scripts.bench_vectors                                          # 100k x 384, 5 rounds
    python -m scripts.bench_vectors --rows 20000 --rounds 3 --queries 200    # quick trial
"""

from __future__ import annotations

import argparse
import collections
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.harness import MB, cell, log, median, spread, verdict

LANCE_WARNING = re.compile(r"\bWARN\s+(\S+)\]\s*(.{0,90})")
KINDS = ("ivf_pq", "ivf_hnsw_sq")
WARMUP_QUERIES = 50
SETTLE_SECONDS = 2.0


# -- server log ------------------------------------------------------------------------------------
def lance_warnings(server: harness.Server) -> collections.Counter[str]:
    """Rust ``WARN`` lines of the server log, counted by target and message start."""
    return collections.Counter(
        f"{m.group(1)}: {m.group(2)}" for m in LANCE_WARNING.finditer(server.log_text())
    )


# -- Flight calls ----------------------------------------------------------------------------------
def index_state(client: flight.FlightClient, kind: str) -> str:
    """``ready`` once the vector column has a ready index of ``kind`` and no build running, else the state."""
    facts = harness.action(client, "describe_dataset", {"dataset": workloads.DATASET})
    entries = [entry for entry in facts.get("indexes", []) if entry.get("column") == workloads.VECTOR]
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
    answer = harness.action(
        client,
        "create_index",
        {"dataset": workloads.DATASET, "column": workloads.VECTOR, "kind": kind, "replace": replace},
    )
    while answer.get("state") != "ready" and index_state(client, kind) != "ready":
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"index {kind} not ready after {timeout:.0f} s")
        time.sleep(harness.POLL_SECONDS)
    return time.perf_counter() - started


def search_body(params: dict[str, int], k: int) -> dict[str, Any]:
    """A search request body without its vector."""
    return {"dataset": workloads.DATASET, "k": k, "columns": workloads.COLUMNS, **params}


# -- in-process contender -------------------------------------------------------------------------
class LocalSearcher:
    """lancedb in this process; all threads share one table handle, as the server's do."""

    def __init__(self, table: Any, queries: np.ndarray, params: dict[str, int], k: int) -> None:
        self.table, self.queries, self.params, self.k = table, queries, params, k

    def worker(self, slot: int) -> harness.QueryFn:
        """The search function (the same for every thread)."""
        return lambda i: workloads.local_search(self.table, self.queries[i], self.params, self.k)


# -- measurements ----------------------------------------------------------------------------------
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
    search: dict[tuple[str, int], harness.Series] = field(
        default_factory=lambda: collections.defaultdict(harness.Series)
    )
    exchange_qps: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))


@dataclass
class Results:
    """Everything measured in one run."""

    ingest_seconds: list[float] = field(default_factory=list)
    rss_mb: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    indexes: list[IndexRun] = field(default_factory=list)


@dataclass(frozen=True)
class Plan(workloads.VectorPlan):
    """The run's parameters."""

    recall_queries: int
    target_recall: float
    kinds: tuple[str, ...]


def measure_ingest(
    server: harness.Server, client: flight.FlightClient, corpus: workloads.Corpus, plan: Plan, out: Results
) -> None:
    """Ingest the table ``plan.rounds`` times with one DoPut each, dropping it in between."""
    for ingest in workloads.create_rounds(client, server.pid, corpus, plan.rounds):
        seconds = ingest.seconds
        out.ingest_seconds.append(seconds)
        out.rss_mb["ingest peak"].append(ingest.peak_rss / MB)
        log(
            f"  ingest #{ingest.number + 1}: {seconds:.2f} s, {plan.rows / seconds:,.0f} rows/s, "
            f"peak RSS {ingest.peak_rss / MB:.0f} MB"
        )
        # the server then builds its in-memory copy (issue 5): a build, measured apart like the index
        # builds, before the next round drops the table
        with harness.RssSampler(server.pid) as rss:
            built = harness.wait_served(client, workloads.DATASET)
        if built:
            out.rss_mb["in-memory copy build peak"].append(rss.peak / MB)
    time.sleep(SETTLE_SECONDS)
    out.rss_mb["steady after ingest"].append(harness.RssSampler(server.pid).sample() / MB)


def choose_params(
    table: Any, corpus: workloads.Corpus, truth: np.ndarray, plan: Plan, run: IndexRun
) -> dict[str, int]:
    """The first (cheapest) candidate reaching the target recall in-process; the last one if none does."""
    queries = corpus.queries[: len(truth)]
    for params in workloads.CANDIDATES[run.kind]:
        found = harness.result_ids(
            [workloads.local_search(table, query, params, plan.k) for query in queries]
        )
        run.sweep.append((params, workloads.recall(found, truth)))
        log(f"  {run.kind} {params}: recall@{plan.k} {run.sweep[-1][1]:.3f}")
        if run.sweep[-1][1] >= plan.target_recall:
            break
    run.params, run.recall_local = run.sweep[-1]
    return run.params


def measure_searches(
    server: harness.Server,
    flight_searcher: harness.FlightSearcher,
    local: LocalSearcher,
    plan: Plan,
    run: IndexRun,
) -> None:
    """Warm up both contenders, then ``plan.rounds`` rounds at each concurrency, contenders interleaved."""
    contenders: dict[str, harness.Searcher] = {"flight": flight_searcher, "in-process": local}
    warmup = [i % plan.queries for i in range(WARMUP_QUERIES)]
    for searcher in contenders.values():
        harness.run_round(searcher, warmup, plan.concurrency)
    queries = list(range(plan.queries))
    for r in range(plan.rounds):
        order = list(contenders) if r % 2 == 0 else list(reversed(contenders))
        for concurrency in (1, plan.concurrency):
            for name in order:
                server_cpu, local_cpu = harness.cpu_seconds(server.pid), harness.cpu_seconds()
                result = harness.run_round(contenders[name], queries, concurrency)
                server_cpu, local_cpu = (
                    harness.cpu_seconds(server.pid) - server_cpu,
                    harness.cpu_seconds() - local_cpu,
                )
                run.search[(name, concurrency)].add(result, server_cpu, local_cpu)
                log(
                    f"  {run.kind} round {r + 1} {name:<10} c={concurrency:<2}: {result.qps:7.1f} q/s, "
                    f"p50 {result.percentile_ms(50):6.2f} ms, p99 {result.percentile_ms(99):6.2f} ms"
                )


def measure_exchange(
    client: flight.FlightClient,
    table: Any,
    corpus: workloads.Corpus,
    truth: np.ndarray,
    plan: Plan,
    run: IndexRun,
) -> None:
    """DoExchange batch search against in-process multi-vector searches, ``plan.rounds`` times each."""
    queries = corpus.queries[: plan.exchange_queries]
    body = search_body(run.params, plan.k)
    harness.flight_exchange(client, queries[: harness.EXCHANGE_BATCH_ROWS], body, workloads.VECTOR)  # warm-up
    workloads.local_batches(
        table, queries[: harness.EXCHANGE_BATCH_ROWS], run.params, plan.k, harness.EXCHANGE_BATCH_ROWS
    )
    for r in range(plan.rounds):
        started = time.perf_counter()
        result = harness.flight_exchange(client, queries, body, workloads.VECTOR)
        flight_seconds = time.perf_counter() - started
        assert result.num_rows == len(queries) * plan.k, result.num_rows
        started = time.perf_counter()
        workloads.local_batches(table, queries, run.params, plan.k, harness.EXCHANGE_BATCH_ROWS)
        local_seconds = time.perf_counter() - started
        run.exchange_qps["flight"].append(len(queries) / flight_seconds)
        run.exchange_qps["in-process"].append(len(queries) / local_seconds)
        if r == 0:
            found = harness.exchange_ids(result, len(queries))[: len(truth)]
            run.recall_exchange = workloads.recall(found, truth[: len(found)])
        log(
            f"  {run.kind} exchange round {r + 1}: flight {len(queries) / flight_seconds:7.1f} q/s, "
            f"in-process {len(queries) / local_seconds:7.1f} q/s"
        )


def measure_index(
    server: harness.Server,
    client: flight.FlightClient,
    corpus: workloads.Corpus,
    truth: np.ndarray,
    plan: Plan,
    kind: str,
    out: Results,
) -> None:
    """Build one index, choose its parameters, then measure recall, searches and batch searches."""
    run = IndexRun(kind)
    out.indexes.append(run)
    with harness.RssSampler(server.pid) as rss:
        run.build_seconds = build_index(client, kind, replace=len(out.indexes) > 1)
    out.rss_mb[f"{kind} build peak"].append(rss.peak / MB)
    log(f"  {kind} built in {run.build_seconds:.1f} s (peak RSS {rss.peak / MB:.0f} MB)")
    import lancedb  # loaded when the in-process contender is needed, not during the ingests

    table = lancedb.connect(str(Path(server.root) / "lance")).open_table(workloads.DATASET)
    params = choose_params(table, corpus, truth, plan, run)
    tickets = harness.search_tickets(
        corpus.queries[: max(plan.queries, len(truth))], search_body(params, plan.k)
    )
    flight_searcher = harness.FlightSearcher(server.location, tickets, plan.concurrency)
    try:
        with harness.RssSampler(server.pid) as rss:
            checked = harness.run_round(flight_searcher, list(range(len(truth))), 1)
            run.recall_flight = workloads.recall(harness.result_ids(checked.results), truth)
            log(f"  {kind} {params}: recall@{plan.k} through Flight {run.recall_flight:.3f}")
            measure_searches(
                server, flight_searcher, LocalSearcher(table, corpus.queries, params, plan.k), plan, run
            )
            measure_exchange(flight_searcher.clients[0], table, corpus, truth, plan, run)
        out.rss_mb[f"{kind} search peak"].append(rss.peak / MB)
    finally:
        flight_searcher.close()


# -- report ----------------------------------------------------------------------------------------
def render_ingest(results: Results, corpus: workloads.Corpus, plan: Plan) -> str:
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


def render(results: Results, corpus: workloads.Corpus, plan: Plan, server: harness.Server) -> str:
    """The whole markdown report."""
    sweeps = "\n".join(
        f"- `{run.kind}` recall@{plan.k} in-process over {plan.recall_queries} queries: "
        + ", ".join(f"{params} {value:.3f}" for params, value in run.sweep)
        for run in results.indexes
    )
    warnings = lance_warnings(server)
    noise = "".join(f"\n- server log: {count} x `{message}`" for message, count in warnings.most_common(3))
    return (
        f"{plan.rows:,} rows x {plan.dim} float32 ({corpus.table.nbytes / MB:.0f} MB of Arrow data), "
        f"{plan.clusters} clusters, seed {plan.seed}; k={plan.k}, metric {workloads.METRIC}; "
        f"medians of {plan.rounds} rounds of {plan.queries} queries per contender and concurrency; "
        "ratio = Flight / in-process\n\n"
        + render_ingest(results, corpus, plan)
        + "\n"
        + render_indexes(results, plan)
        + "\n"
        + render_searches(results, plan)
        + f"\nBatch search: {plan.exchange_queries} queries in batches of {harness.EXCHANGE_BATCH_ROWS}, "
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
    parser = workloads.vector_parser(__doc__.splitlines()[0])
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
    counts = ("queries", "recall_queries", "exchange_queries", "concurrency")
    return workloads.parse_vector_arguments(parser, argv, counts)


def run(work: Path, plan: Plan, env: dict[str, str]) -> str:
    """Generate the input, measure everything against a fresh server, and render the report."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"generating {plan.rows:,} x {plan.dim} vectors ...")
    queries = max(plan.queries, plan.recall_queries, plan.exchange_queries, WARMUP_QUERIES)
    corpus = workloads.make_corpus(plan.rows, plan.dim, plan.clusters, queries, plan.seed)
    truth = workloads.exact_neighbours(corpus.vectors, corpus.queries[: plan.recall_queries], plan.k)
    server = harness.Server(work / "lakehouse", work / "server.log", env)
    results = Results()
    with server:
        log(f"server at {server.location} (pid {server.pid}), log {server.log}")
        results.rss_mb["idle at start"].append(harness.RssSampler(server.pid).sample() / MB)
        with flight.connect(server.location) as client:
            measure_ingest(server, client, corpus, plan, results)
            for kind in plan.kinds:
                measure_index(server, client, corpus, truth, plan, kind, results)
            time.sleep(SETTLE_SECONDS)
            results.rss_mb["steady after searches"].append(harness.RssSampler(server.pid).sample() / MB)
    return render(results, corpus, plan, server)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    plan = Plan.from_args(args, kinds=tuple(args.kinds))
    return harness.print_report(args, "bench-vectors-", lambda work, env: run(work, plan, env))


if __name__ == "__main__":
    raise SystemExit(main())
