"""Core benchmark of the lakehouse server: DoPut ingest and DoGet queries next to in-process anchors.

* Ingest: the workers rows streamed with one DoPut, against pyarrow writing the same batches to a
  Parquet file (zstd level 1) in this process; the server's peak RSS (children included) is sampled.
* DoGet: a full scan and a GROUP BY through the server, against DuckDB in this process on the Parquet
  files the server wrote.

Every measurement is repeated (contenders interleaved) and reported as medians, with min/max.

Usage::

    python scripts/bench_core.py [--rows 5000000] [--repeats 5] [--root DIR] [--env KEY=VALUE ...]
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pyarrow.flight as flight
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gen_workers import WORKERS_SCHEMA, iter_worker_batches

READY = re.compile(r"ready at (grpc://127\.0\.0\.1:\d+)")
CLIENT_BATCH_ROWS = 65_536
READER_BATCH_ROWS = 131_072
RSS_INTERVAL = 0.02
MB = 1e6
SCAN_SQL = "select * from workers"
GROUP_SQL = (
    "select state, role, count(*), avg(hourly_rate), max(years_experience) from workers group by state, role"
)
INGEST_COMMAND = {"ingest": {"dataset": "workers", "mode": "overwrite"}}


# -- input -----------------------------------------------------------------------------------------
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


# -- server process --------------------------------------------------------------------------------
@dataclass
class Server:
    """``python -m flight_lakehouse serve`` on a free port, stopped by pid.

    ``root`` is a directory or an ``s3://bucket/prefix`` URI; ``args`` are extra ``serve`` flags.
    """

    root: Path | str
    env: dict[str, str]
    args: tuple[str, ...] = ()
    process: subprocess.Popen[str] | None = None
    location: str = ""
    log_lines: list[str] = field(default_factory=list)

    def start(self, timeout: float = 60.0) -> Server:
        """Start the server and wait for its ready line."""
        command = [sys.executable, "-m", "flight_lakehouse", "serve", "--root", str(self.root), "--port", "0"]
        command.extend(self.args)
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **self.env},
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(timeout) or not self.location:
            raise RuntimeError("server did not start:\n" + "\n".join(self.log_lines[-30:]))
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip())
            match = READY.search(line)
            if match:
                self.location = match.group(1)
                ready.set()
        ready.set()

    def stop(self, grace: float = 30.0) -> None:
        """SIGTERM by pid, then SIGKILL if it does not exit within ``grace`` seconds."""
        stop_process(self.process, grace)


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


# -- contenders ------------------------------------------------------------------------------------
def timed(action: Callable[[], object]) -> tuple[float, object]:
    """Wall time of ``action()`` and its result."""
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def server_ingest(client: flight.FlightClient, source: Source) -> dict:
    """DoPut the source with an overwrite command; returns the PutResult JSON."""
    descriptor = flight.FlightDescriptor.for_command(json.dumps(INGEST_COMMAND).encode())
    writer, metadata = client.do_put(descriptor, source.schema)
    with writer:
        for batch in source.batches():
            writer.write_batch(batch)
        writer.done_writing()
        result = metadata.read()
    return json.loads(result.to_pybytes()) if result is not None else {}


def anchor_ingest(source: Source, out: Path) -> int:
    """Write the source batches to a Parquet file with pyarrow in this process; returns rows written."""
    rows = 0
    with pq.ParquetWriter(out, source.schema, compression="zstd", compression_level=1) as writer:
        for batch in source.batches():
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def drain(read_next: Callable[[], pa.RecordBatch]) -> int:
    """Read a stream batch by batch until StopIteration, keeping nothing; returns the row count."""
    rows = 0
    while True:
        try:
            rows += read_next().num_rows
        except StopIteration:
            return rows


def server_query(client: flight.FlightClient, sql: str) -> int:
    """Run ``sql`` through DoGet; returns the row count."""
    reader = client.do_get(flight.Ticket(json.dumps({"sql": sql}).encode()))
    return drain(lambda: reader.read_chunk().data)


def inprocess_query(con: duckdb.DuckDBPyConnection, sql: str) -> int:
    """Run ``sql`` on DuckDB in this process; returns the row count."""
    reader = con.sql(sql).to_arrow_reader(READER_BATCH_ROWS)
    return drain(reader.read_next_batch)


def data_files(root: Path) -> set[Path]:
    """The Parquet files under the root's workers data directory."""
    return set((root / "tables" / "workers" / "data").glob("*.parquet"))


def inprocess_connection(files: list[Path]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a ``workers`` view over ``files``."""
    con = duckdb.connect(":memory:")
    listing = ", ".join("'" + str(path).replace("'", "''") + "'" for path in files)
    con.execute(f"create view workers as select * from read_parquet([{listing}])")
    return con


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class Samples:
    """Repeated measurements of one metric for the server and its anchor."""

    server: list[float] = field(default_factory=list)
    anchor: list[float] = field(default_factory=list)


@dataclass
class Results:
    """Everything measured in one run."""

    ingest_mbps: Samples = field(default_factory=Samples)
    ingest_rss_mb: Samples = field(default_factory=Samples)
    scan_seconds: Samples = field(default_factory=Samples)
    group_seconds: Samples = field(default_factory=Samples)
    notes: list[str] = field(default_factory=list)


def measure_ingest(
    server: Server, client: flight.FlightClient, source: Source, scratch: Path, repeats: int, out: Results
) -> set[Path]:
    """Interleave server and anchor ingests; returns the files of the last (current) server ingest."""
    assert server.process is not None
    current: set[Path] = set()
    for i in range(repeats):
        before = data_files(server.root)
        with RssSampler(server.process.pid) as rss:
            seconds, put = timed(lambda: server_ingest(client, source))
        current = data_files(server.root) - before
        out.ingest_mbps.server.append(source.nbytes / MB / seconds)
        out.ingest_rss_mb.server.append(rss.peak / MB)
        assert isinstance(put, dict) and put.get("rows_written") == source.rows, put
        anchor_seconds, rows = timed(lambda: anchor_ingest(source, scratch / "anchor.parquet"))
        assert rows == source.rows
        out.ingest_mbps.anchor.append(source.nbytes / MB / anchor_seconds)
        print(
            f"  ingest #{i + 1}: server {seconds:.2f} s (peak RSS {rss.peak / MB:.0f} MB, "
            f"{put['files_written']} files, {put['bytes_written'] / MB:.0f} MB), "
            f"anchor {anchor_seconds:.2f} s",
            file=sys.stderr,
        )
    out.notes.append(f"anchor file: {(scratch / 'anchor.parquet').stat().st_size / MB:.0f} MB on disk")
    return current


def measure_queries(
    client: flight.FlightClient, files: list[Path], rows: int, repeats: int, out: Results
) -> None:
    """Interleave DoGet and in-process DuckDB for the scan and the GROUP BY (after one warm-up each)."""
    con = inprocess_connection(files)
    try:
        cases = ((SCAN_SQL, out.scan_seconds), (GROUP_SQL, out.group_seconds))
        for sql, _ in cases:  # warm-up: page cache, the server's snapshot database
            server_query(client, sql)
            inprocess_query(con, sql)
        for i in range(repeats):
            for sql, samples in cases:
                server_seconds, server_rows = timed(lambda sql=sql: server_query(client, sql))
                local_seconds, local_rows = timed(lambda sql=sql: inprocess_query(con, sql))
                assert server_rows == local_rows, (sql, server_rows, local_rows)
                if sql == SCAN_SQL:
                    assert server_rows == rows, (server_rows, rows)
                samples.server.append(server_seconds)
                samples.anchor.append(local_seconds)
                print(
                    f"  query #{i + 1} {sql[:30]!r}: server {server_seconds:.2f} s, "
                    f"in-process {local_seconds:.2f} s ({server_rows} rows)",
                    file=sys.stderr,
                )
    finally:
        con.close()


# -- report ----------------------------------------------------------------------------------------
def spread(values: list[float], digits: int) -> str:
    """``min-max`` of ``values``."""
    return f"{min(values):.{digits}f}-{max(values):.{digits}f}" if values else "-"


def median(values: list[float]) -> float:
    """The median (NaN when empty)."""
    return statistics.median(values) if values else float("nan")


def render(results: Results, source: Source, repeats: int) -> str:
    """The markdown table of medians with ratios, targets and pass/fail."""
    mbps, rss = results.ingest_mbps, results.ingest_rss_mb
    ingest_ratio = median(mbps.server) / median(mbps.anchor)
    rows = [
        (
            "Ingest throughput (MB/s, higher is better)",
            f"{median(mbps.server):.1f}",
            f"{median(mbps.anchor):.1f}",
            f"{ingest_ratio:.2f}",
            ">= 0.80",
            ingest_ratio >= 0.8,
            f"{spread(mbps.server, 1)} / {spread(mbps.anchor, 1)}",
        ),
        (
            "Ingest peak server RSS (MB)",
            f"{median(rss.server):.0f}",
            "-",
            "-",
            "< 600 MB",
            max(rss.server) < 600,
            f"{spread(rss.server, 0)} / -",
        ),
    ]
    for label, samples in (
        ("DoGet full scan (s, lower is better)", results.scan_seconds),
        ("DoGet GROUP BY (s, lower is better)", results.group_seconds),
    ):
        ratio = median(samples.anchor) / median(samples.server)
        rows.append(
            (
                label,
                f"{median(samples.server):.3f}",
                f"{median(samples.anchor):.3f}",
                f"{ratio:.2f}",
                ">= 0.90",
                ratio >= 0.9,
                f"{spread(samples.server, 3)} / {spread(samples.anchor, 3)}",
            )
        )
    header = (
        f"{source.rows:,} rows, {source.nbytes / MB:.0f} MB in Arrow memory; medians of {repeats} runs; "
        "ratio = server/anchor throughput (time_anchor / time_server); "
        "the RSS verdict uses the worst run\n\n"
        "| metric | server | anchor | ratio | target | pass/fail | <sub>min-max server / anchor</sub> |\n"
        "|---|---:|---:|---:|---|---|---|\n"
    )
    lines = [
        f"| {m} | {s} | {a} | {r} | {t} | {'PASS' if ok else 'FAIL'} | <sub>{mm}</sub> |"
        for m, s, a, r, t, ok, mm in rows
    ]
    return header + "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------
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


def print_report(args: argparse.Namespace, prefix: str, report: Callable[[Path, dict[str, str]], str]) -> int:
    """Print ``report(work directory, server environment)``: in ``--root``, else in a temp directory."""
    env = dict(args.env)
    if args.root is not None:
        print(report(args.root, env))
        return 0
    with tempfile.TemporaryDirectory(prefix=prefix) as work:
        print(report(Path(work), env))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows to generate (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per measurement (default %(default)s)")
    add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=2")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.repeats <= 0:
        parser.error("--rows and --repeats must be > 0")
    return args


def run(work: Path, rows: int, repeats: int, env: dict[str, str]) -> str:
    """Generate the input, run every measurement against a fresh server, and render the table."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating {rows:,} rows ...", file=sys.stderr)
    source = generate_source(work / "workers-source.parquet", rows)
    server = Server(work / "lakehouse", env)
    results = Results()
    try:
        server.start()
        print(f"server at {server.location} (pid {server.process.pid})", file=sys.stderr)
        client = flight.connect(server.location)
        try:
            current = measure_ingest(server, client, source, work, repeats, results)
            measure_queries(client, sorted(current), rows, repeats, results)
        finally:
            client.close()
    finally:
        server.stop()
    results.notes.append(f"server files of the current snapshot: {len(current)}")
    return render(results, source, repeats) + "".join(f"\n- {note}" for note in results.notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown table on stdout."""
    args = parse_args(argv)
    return print_report(args, "bench-core-", lambda work, env: run(work, args.rows, args.repeats, env))


if __name__ == "__main__":
    raise SystemExit(main())
