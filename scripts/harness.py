"""The benchmarks' shared harness: the server process, its memory and CPU, Flight clients, the report.

* Server process: ``python -m flight_lakehouse serve --root ROOT --port 0`` (or another command that logs
  ``ready at grpc://127.0.0.1:PORT`` on stderr) on a free loopback port, its stderr in a log file, stopped
  by pid: SIGTERM, then SIGKILL.
* Memory and CPU of a process: a sampling thread (:class:`RssSampler`), the kernel's high-water mark
  (:class:`PeakRss`), :func:`cpu_seconds`.
* Flight clients: a timed DoPut of a JSON command checked against the rows sent (every benchmark's
  ingest), DoGet drained batch by batch, actions, the in-memory serving state, search tickets, DoExchange
  batch search, and concurrent rounds of searches with one client per thread.
* Report: medians, min-max, PASS/FAIL, progress lines on stderr.
* Command line: ``--root`` and ``--env KEY=VALUE``, and the report printed from a work directory.

Run the benchmarks from the project root as modules: ``python -m scripts.bench_core`` (see ``scripts``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

READY = re.compile(r"ready at (grpc://127\.0\.0\.1:\d+)")
HTTP_READY = re.compile(r"ready at \S+, http (http://127\.0\.0\.1:\d+),")  # the HTTP port, when on
RSS_INTERVAL = 0.02
POLL_SECONDS = 0.25
BUILD_TIMEOUT = 900.0  # an in-memory copy or an index of a table
EXCHANGE_BATCH_ROWS = 100
MB = 1e6
STARTED = time.monotonic()


# -- server process --------------------------------------------------------------------------------
#: The environment of a server measuring the query engine: repeated queries are run, not answered from the
#: result cache (bench_flight_sql and bench_security measure the server as shipped or say what they set).
ENGINE_ENV = {"LAKEHOUSE_RESULT_CACHE_MB": "0"}


@dataclass
class Server:
    """``python -m flight_lakehouse serve`` on a free loopback port, its stderr in ``log``, stopped by pid.

    ``root`` is a directory or an ``s3://bucket/prefix`` URI; ``args`` are extra ``serve`` flags. A
    subclass may run another server by overriding :meth:`command`. As a context manager it is started
    on entry and stopped on exit, after printing the tail of its log (headed by ``name``) on a failure.
    """

    root: Path | str
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    name: str = "server"
    process: subprocess.Popen[bytes] | None = None
    location: str = ""
    http_url: str = ""  # the HTTP port's base URL ("" when off)

    def __enter__(self) -> Server:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is not None:
                log(f"{self.name} log tail:\n" + self.log_tail())
        finally:
            self.stop()

    @property
    def pid(self) -> int:
        """The server's process id."""
        assert self.process is not None
        return self.process.pid

    def command(self) -> list[str]:
        """The command line of the server process (it logs ``ready at grpc://...`` on stderr)."""
        serve = [sys.executable, "-m", "flight_lakehouse", "serve", "--root", str(self.root), "--port", "0"]
        serve += ["--http-port", "0"]  # a free one (the default 8816 collides between servers)
        return [*serve, *self.args]

    def start(self, timeout: float = 60.0) -> Server:
        """Start the server and wait for the ready line in its log."""
        with self.log.open("wb") as sink:
            self.process = subprocess.Popen(
                self.command(), stdout=subprocess.DEVNULL, stderr=sink, env={**os.environ, **self.env}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.process.poll() is None:
            match = READY.search(self.log_text())
            if match:
                self.location = match.group(1)
                http = HTTP_READY.search(self.log_text())
                self.http_url = http.group(1) if http else ""
                return self
            time.sleep(0.1)
        raise RuntimeError("server did not start:\n" + self.log_tail())

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM by pid, then SIGKILL if it does not exit within ``grace`` seconds."""
        stop_process(self.process, grace)

    def log_text(self) -> str:
        """The server's stderr so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the server's stderr."""
        return "\n".join(self.log_text().splitlines()[-lines:])


def stop_process(process: subprocess.Popen | None, grace: float = 30.0) -> None:
    """SIGTERM a child by pid, then SIGKILL if it does not exit within ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    os.kill(process.pid, signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)


# -- memory and CPU of a process -------------------------------------------------------------------
class RssSampler:
    """Samples the RSS of a process and its children every 20 ms in a thread; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    def __enter__(self) -> RssSampler:
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())

    def sample(self) -> int:
        """Current RSS in bytes of the process plus all its descendants."""
        total = 0
        for proc in [self._process, *self._process.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(RSS_INTERVAL):
            self.peak = max(self.peak, self.sample())


class PeakRss:
    """The kernel's peak RSS (``VmHWM``) of a process over a ``with`` block: reset on entry (Linux).

    No sampling thread competes with the clients for the GIL of this process.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0

    def __enter__(self) -> PeakRss:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # 5: reset the high-water mark to the RSS now
        return self

    def __exit__(self, *_: object) -> None:
        status = Path(f"/proc/{self.pid}/status").read_text()
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        assert match is not None, status
        self.peak = int(match.group(1)) * 1024


def metric_sum(http_url: str, families: Iterable[str], timeout: float = 10.0) -> float:
    """The sum of every sample of the metric ``families`` (a counter's family is named without its
    ``_total``) in the server's ``/metrics`` at ``http_url``; ``OSError`` when it cannot be read."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{http_url}/metrics", timeout=timeout) as answer:
        text = answer.read().decode()
    wanted = set(families)
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name in wanted
        for sample in family.samples
    )


def cpu_seconds(pid: int | None = None) -> float:
    """User + system CPU seconds of process ``pid`` (this process when None)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


# -- Flight clients --------------------------------------------------------------------------------
def timed(action: Callable[[], object]) -> tuple[float, object]:
    """Wall time of ``action()`` and its result."""
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def command_descriptor(command: dict[str, Any]) -> flight.FlightDescriptor:
    """A descriptor carrying ``command`` as JSON."""
    return flight.FlightDescriptor.for_command(json.dumps(command).encode())


def do_put(
    client: flight.FlightClient, command: dict[str, Any], schema: pa.Schema, batches: Iterable[pa.RecordBatch]
) -> dict[str, Any]:
    """DoPut ``batches`` under a JSON ``command`` (e.g. ``{"ingest": {...}}``); returns the PutResult JSON."""
    writer, metadata = client.do_put(command_descriptor(command), schema)
    with writer:
        for batch in batches:
            writer.write_batch(batch)
        writer.done_writing()
        result = metadata.read()
    return json.loads(result.to_pybytes()) if result is not None else {}


def checked_put(put: Callable[[], dict[str, Any]], rows: int) -> tuple[float, dict[str, Any]]:
    """Time one DoPut ``put()`` and check that its PutResult wrote ``rows`` rows; seconds and PutResult."""
    seconds, result = timed(put)
    assert isinstance(result, dict) and result.get("rows_written") == rows, result
    return seconds, result


@dataclass(frozen=True)
class IngestRound:
    """One round of :func:`ingest_rounds`: its number (from 0), the DoPut's seconds, the server's peak RSS."""

    number: int
    seconds: float
    peak_rss: int


def ingest_rounds(
    client: flight.FlightClient,
    pid: int,
    dataset: str,
    rounds: int,
    put: Callable[[], dict[str, Any]],
    rows: int,
    meter: Callable[[int], RssSampler | PeakRss] = RssSampler,
    then: Callable[[], object] | None = None,
) -> Iterator[IngestRound]:
    """Create ``dataset`` with ``put()`` (``rows`` rows) ``rounds`` times, dropping it in between.

    The peak RSS of process ``pid`` is measured by ``meter`` over the DoPut and ``then()`` (e.g. waiting
    until the table is served from memory); each round is yielded before the next one drops the table.
    """
    for number in range(rounds):
        if number:
            action(client, "drop_dataset", {"dataset": dataset})
        with meter(pid) as rss:
            seconds, _ = checked_put(put, rows)
            if then is not None:
                then()
        yield IngestRound(number, seconds, rss.peak)


def drain(read_next: Callable[[], pa.RecordBatch]) -> int:
    """Read a stream batch by batch until StopIteration, keeping nothing; returns the row count."""
    rows = 0
    while True:
        try:
            rows += read_next().num_rows
        except StopIteration:
            return rows


def server_query(client: flight.FlightClient, sql: str) -> int:
    """Run ``sql`` through DoGet, reading batch by batch and keeping nothing; returns the row count."""
    reader = client.do_get(flight.Ticket(json.dumps({"sql": sql}).encode()))
    return drain(lambda: reader.read_chunk().data)


def action(client: flight.FlightClient, name: str, body: dict[str, Any]) -> Any:
    """Run an action; returns its decoded JSON result."""
    results = list(client.do_action(flight.Action(name, json.dumps(body).encode())))
    return json.loads(results[0].body.to_pybytes()) if results else None


def serving(client: flight.FlightClient, dataset: str) -> dict[str, Any]:
    """The ``serving`` facts of ``describe_dataset`` (the in-memory copy of a vector table, issue 5)."""
    return action(client, "describe_dataset", {"dataset": dataset}).get("serving", {})


def wait_served(
    client: flight.FlightClient, dataset: str, timeout: float = BUILD_TIMEOUT, poll: float = POLL_SECONDS
) -> bool:
    """Wait until ``dataset`` is served from memory (True), or the server says it will not be (False)."""
    started = time.perf_counter()
    while (facts := serving(client, dataset)).get("from") != "memory":
        if facts.get("state") in ("failed", "over budget", "not served"):
            return False
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"not served from memory after {timeout:.0f} s: {facts}")
        time.sleep(poll)
    return True


def search_tickets(queries: np.ndarray, body: dict[str, Any]) -> list[flight.Ticket]:
    """One DoGet ``{"search": ...}`` ticket per query vector (encoded before any timing)."""
    return [
        flight.Ticket(json.dumps({"search": {**body, "vector": row.tolist()}}).encode()) for row in queries
    ]


def flight_exchange(
    client: flight.FlightClient,
    queries: np.ndarray,
    body: dict[str, Any],
    column: str,
    batch_rows: int = EXCHANGE_BATCH_ROWS,
) -> pa.Table:
    """Stream ``queries`` (as ``column``) through DoExchange in batches of ``batch_rows``, sent on a
    thread; all results."""
    vector_type = pa.list_(pa.float32(), queries.shape[1])
    schema = pa.schema([(column, vector_type)])
    writer, reader = client.do_exchange(command_descriptor({"search": body}))

    def send() -> None:
        writer.begin(schema)
        for start in range(0, len(queries), batch_rows):
            chunk = queries[start : start + batch_rows]
            array = pa.FixedSizeListArray.from_arrays(pa.array(chunk.reshape(-1)), queries.shape[1])
            writer.write_batch(pa.record_batch([array], schema=schema))
        writer.done_writing()

    with writer, ThreadPoolExecutor(1) as pool:
        sent = pool.submit(send)
        result = reader.read_all()
        sent.result()
    return result


def result_ids(tables: Sequence[pa.Table]) -> list[list[int]]:
    """The ``id`` column of every result table."""
    return [table.column("id").to_pylist() for table in tables]


def exchange_ids(result: pa.Table, queries: int) -> list[list[int]]:
    """Per query, the ids of a batch search result (grouped by ``_query_index``)."""
    found: list[list[int]] = [[] for _ in range(queries)]
    indexes, ids = result.column("_query_index").to_pylist(), result.column("id").to_pylist()
    for index, row_id in zip(indexes, ids, strict=True):
        found[index].append(row_id)
    return found


# -- concurrent rounds of searches -----------------------------------------------------------------
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


# -- report ----------------------------------------------------------------------------------------
def log(message: str) -> None:
    """Progress on stderr, with the seconds since the start."""
    print(f"[{time.monotonic() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    """The median (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], digits: int) -> str:
    """``min-max`` of ``values``."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else "-"


def cell(values: list[float], digits: int) -> str:
    """The median, formatted."""
    return f"{median(values):.{digits}f}"


def verdict(ok: bool) -> str:
    """PASS or FAIL."""
    return "PASS" if ok else "FAIL"


# -- command line ----------------------------------------------------------------------------------
def env_pair(text: str) -> tuple[str, str]:
    """One ``--env KEY=VALUE`` argument."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--env takes KEY=VALUE, got {text!r}")
    return key, value


def add_work_arguments(parser: argparse.ArgumentParser, env_example: str = "") -> None:
    """``--root`` (the work directory) and ``--env KEY=VALUE`` (the server's extra environment)."""
    parser.add_argument("--root", type=Path, default=None, help="work directory (default: a temp dir)")
    example = f", {env_example}" if env_example else ""
    parser.add_argument(
        "--env",
        type=env_pair,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"extra server environment{example} (repeatable)",
    )


def rows_and_repeats(description: str, repeats: int, argv: list[str] | None) -> argparse.Namespace:
    """``--rows``, ``--repeats`` (both > 0) and the work arguments of a workers benchmark."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows to generate (default %(default)s)")
    parser.add_argument(
        "--repeats", type=int, default=repeats, help="runs per measurement (default %(default)s)"
    )
    add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=2")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.repeats <= 0:
        parser.error("--rows and --repeats must be > 0")
    return args


def print_report(args: argparse.Namespace, prefix: str, report: Callable[[Path, dict[str, str]], str]) -> int:
    """Print ``report(work directory, server environment)``: in ``--root``, else in a temp directory."""
    env = dict(getattr(args, "env", []))
    if args.root is not None:
        print(report(args.root, env))
        return 0
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        print(report(Path(work), env))
    return 0
