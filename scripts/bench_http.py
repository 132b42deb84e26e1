"""HTTP side port benchmark (issue 19): Arrow over HTTP next to Flight DoGet, and the cost of the metrics.

* Data: ``--rows`` generated workers rows (scripts/gen_workers.py), one DoPut into a server started with
  ``--http-port 0`` and the result cache off (``harness.ENGINE_ENV``).
* Full scan: ``select * from workers`` through ``POST /v1/query`` (an Arrow IPC stream read with
  ``pyarrow.ipc.open_stream`` over ``urllib``, batch by batch, keeping nothing) and through Flight DoGet
  (read the same way), interleaved, after one warm-up each; ratio = DoGet seconds / HTTP seconds
  (target >= 0.8).
* Metrics cost: a small Flight query (``select * from workers limit 5``) one call after another,
  against a second server on the same root with ``--http-port -1`` (no HTTP port: no metrics, no call
  middleware); rounds interleaved; the median per-call latency of each, and the server's CPU seconds per
  call (less disturbed by other load on the machine); cost = on / off - 1 (target < 2%). And the Python
  work the metrics add to a call, timed in this process, as a share of the server's CPU per small query.

The clients run in a spawned process (not sharing this process's GIL or the servers' CPUs' accounting).

Usage::

    python -m scripts.bench_http                          # 5M rows, 5 scan rounds, 15 x 400 small calls
    python -m scripts.bench_http --rows 1000000 --repeats 3 --calls 200 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.audit import CallRecord
from flight_lakehouse.metrics import Metrics
from scripts import harness, workloads
from scripts.harness import MB, log, median, spread, verdict

SMALL_SQL = "select * from workers limit 5"


# -- clients (run in the spawned process) -------------------------------------------------------------
def http_scan(url: str, sql: str) -> tuple[float, int]:
    """Seconds and rows of ``sql`` through ``POST /v1/query``, read batch by batch."""
    started = time.perf_counter()
    request = urllib.request.Request(f"{url}/v1/query", data=json.dumps({"sql": sql}).encode())
    with urllib.request.urlopen(request) as response:
        reader = pa.ipc.open_stream(response)
        rows = harness.drain(reader.read_next_batch)
    return time.perf_counter() - started, rows


def flight_scan(location: str, sql: str) -> tuple[float, int]:
    """Seconds and rows of ``sql`` through Flight DoGet, read batch by batch."""
    with flight.connect(location) as client:
        started = time.perf_counter()
        rows = harness.server_query(client, sql)
        return time.perf_counter() - started, rows


def small_calls(location: str, sql: str, calls: int) -> list[float]:
    """Seconds of each of ``calls`` DoGets of ``sql``, one after another on one connection."""
    with flight.connect(location) as client:
        harness.server_query(client, sql)  # connected and warm
        seconds = []
        for _ in range(calls):
            started = time.perf_counter()
            harness.server_query(client, sql)
            seconds.append(time.perf_counter() - started)
    return seconds


# -- measurements -------------------------------------------------------------------------------------
def measure_scan(pool: multiprocessing.pool.Pool, server: harness.Server, rows: int, repeats: int) -> tuple:
    """DoGet and HTTP seconds of the full scan, interleaved after a warm-up of each."""
    pool.apply(flight_scan, (server.location, workloads.SCAN_SQL))
    pool.apply(http_scan, (server.http_url, workloads.SCAN_SQL))
    doget, http = [], []
    for number in range(repeats):
        seconds, got = pool.apply(flight_scan, (server.location, workloads.SCAN_SQL))
        assert got == rows, (got, rows)
        doget.append(seconds)
        seconds, got = pool.apply(http_scan, (server.http_url, workloads.SCAN_SQL))
        assert got == rows, (got, rows)
        http.append(seconds)
        log(f"scan #{number + 1}: DoGet {doget[-1]:.2f} s, HTTP {http[-1]:.2f} s")
    return doget, http


@dataclass
class SmallCalls:
    """Per-call medians of each round of small queries: wall seconds and the server's CPU seconds."""

    seconds: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)


def measure_metrics_cost(
    pool: multiprocessing.pool.Pool, on: harness.Server, off: harness.Server, calls: int, rounds: int
) -> tuple[SmallCalls, SmallCalls]:
    """Small queries with metrics on and off, rounds interleaved (the order alternating)."""
    with_metrics, without = SmallCalls(), SmallCalls()
    for number in range(rounds):
        first, second = (on, off) if number % 2 == 0 else (off, on)
        for server in (first, second):
            cpu = harness.cpu_seconds(server.pid)
            seconds = pool.apply(small_calls, (server.location, SMALL_SQL, calls))
            samples = with_metrics if server is on else without
            samples.cpu.append((harness.cpu_seconds(server.pid) - cpu) / (calls + 1))
            samples.seconds.append(median(seconds))
        log(
            f"small #{number + 1}: metrics on {with_metrics.seconds[-1] * 1e3:.3f} ms "
            f"({with_metrics.cpu[-1] * 1e3:.3f} ms CPU), off {without.seconds[-1] * 1e3:.3f} ms "
            f"({without.cpu[-1] * 1e3:.3f} ms CPU)"
        )
    return with_metrics, without


def bookkeeping_seconds(calls: int = 50_000) -> float:
    """CPU seconds of the Python work the metrics add to one call, in this process: its record, the rows and
    bytes noted, and counting it (the counters, the histogram) when it ends."""
    metrics = Metrics(cast(Any, None), {"sql"})  # the services are read only when scraped
    started = time.process_time()  # CPU time: other load on the machine does not count
    for _ in range(calls):
        record = CallRecord(rpc="DoGet")
        record.call = "sql"
        record.note(dataset="workers", rows=5, size=640)
        metrics.observe(record, None)
    return (time.process_time() - started) / calls


# -- report -------------------------------------------------------------------------------------------
def report(work: Path, env: dict[str, str], args: argparse.Namespace) -> str:
    """Generate, ingest, measure; the markdown report."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"generating {args.rows:,} rows ...")
    source = workloads.generate_source(work / "workers-source.parquet", args.rows)
    env = {**harness.ENGINE_ENV, **env}
    pool = multiprocessing.get_context("spawn").Pool(1)
    root = work / "lakehouse"
    try:
        with harness.Server(root, work / "on.log", env, name="metrics on") as on:
            with flight.connect(on.location) as client:
                harness.checked_put(lambda: workloads.server_ingest(client, source), source.rows)
            log(f"ingested; HTTP at {on.http_url}")
            doget, http = measure_scan(pool, on, source.rows, args.repeats)
            with harness.Server(
                root, work / "off.log", env, ("--http-port", "-1"), name="metrics off"
            ) as off:
                assert not off.http_url
                with_metrics, without = measure_metrics_cost(pool, on, off, args.calls, args.rounds)
    finally:
        pool.close()
    ratio = median(doget) / median(http)
    cost = median(with_metrics.seconds) / median(without.seconds) - 1
    cpu_cost = median(with_metrics.cpu) / median(without.cpu) - 1
    bookkeeping = median([bookkeeping_seconds() for _ in range(5)])
    share = bookkeeping / median(without.cpu)
    scan_mb = source.nbytes / MB

    def ms(values: list[float]) -> list[float]:
        return [value * 1e3 for value in values]

    return "\n".join(
        [
            f"{source.rows:,} rows ({scan_mb:.0f} MB in Arrow memory); scan: medians of {args.repeats} runs; "
            f"small query: medians of {args.rounds} rounds of {args.calls} calls",
            "",
            "| metric | server | anchor | ratio | target | pass/fail | <sub>min-max server / anchor</sub> |",
            "|---|---:|---:|---:|---|---|---|",
            f"| full scan as Arrow over HTTP (s) vs DoGet | {median(http):.3f} | {median(doget):.3f} | "
            f"{ratio:.2f} | >= 0.80 | {verdict(ratio >= 0.8)} | "
            f"<sub>{spread(http, 3)} / {spread(doget, 3)}</sub> |",
            f"| small Flight query (ms), metrics on vs off | {median(ms(with_metrics.seconds)):.3f} | "
            f"{median(ms(without.seconds)):.3f} | {cost:+.1%} | < +2% | {verdict(cost < 0.02)} | "
            f"<sub>{spread(ms(with_metrics.seconds), 3)} / {spread(ms(without.seconds), 3)}</sub> |",
            f"| server CPU per small query (ms), metrics on vs off | {median(ms(with_metrics.cpu)):.3f} | "
            f"{median(ms(without.cpu)):.3f} | {cpu_cost:+.1%} | < +2% | {verdict(cpu_cost < 0.02)} | "
            f"<sub>{spread(ms(with_metrics.cpu), 3)} / {spread(ms(without.cpu), 3)}</sub> |",
            f"| metrics bookkeeping per call (us, in-process) vs server CPU per small query | "
            f"{bookkeeping * 1e6:.1f} | {median(without.cpu) * 1e6:.0f} | {share:+.1%} | < +2% | "
            f"{verdict(share < 0.02)} | - |",
            "",
            f"- scan throughput: HTTP {scan_mb / median(http):.0f} MB/s, "
            f"DoGet {scan_mb / median(doget):.0f} MB/s",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="workers rows (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="full-scan runs (default %(default)s)")
    parser.add_argument("--calls", type=int, default=400, help="small queries a round (default %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=15, help="rounds of small queries (default %(default)s)"
    )
    harness.add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=2")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeats, args.calls, args.rounds) <= 0:
        parser.error("--rows, --repeats, --calls and --rounds must be > 0")
    return harness.print_report(args, "bench-http-", lambda work, env: report(work, env, args))


if __name__ == "__main__":
    raise SystemExit(main())
