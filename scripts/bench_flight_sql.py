"""Flight SQL benchmark of the lakehouse server through ADBC, next to DuckDB in-process and ROAPI.

* Full scan and GROUP BY: ``cursor.execute(sql)`` + ``fetch_arrow_table()`` through ADBC's Flight SQL
  driver against the server (the workers rows ingested by one DoPut) and against ROAPI's Flight SQL port
  (the same Parquet files, read from disk); the anchor is DuckDB in this process on those files, streamed
  as bench_core's anchor is and collected into one Arrow table as the ADBC client's is. CPU seconds of the
  server processes and of this process are recorded.
* Small aggregates: p50 and p99 latency of ``--runs`` executions on one connection (the DB-API cursor
  prepares the statement once), for all three: a count answered from Parquet metadata (the per-query
  cost of each path) and a count scanning one row group.
* The full scan through an ADBC connection with the driver's default options (16 MiB gRPC messages).

Every measurement is repeated (contenders interleaved) and reported as medians, with min/max.

Usage::

    python -m scripts.bench_flight_sql [--rows 5000000] [--repeats 5] [--runs 200] [--root DIR]
        [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import adbc_driver_flightsql
import adbc_driver_flightsql.dbapi
import adbc_driver_manager
import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.bench_core import data_files, inprocess_connection
from scripts.harness import cpu_seconds, log, median, spread, verdict

#: The small aggregates: a count from the Parquet footers alone, and one reading a single row group of
#: ``id`` (it ascends in the files, so their statistics prune the other row groups).
SMALL_SQLS = ("select count(*) from workers", "select count(*) from workers where id < 10000")
#: The ADBC client's gRPC message limit for the measurements: above the server's largest result piece
#: (a quarter of its 256 MB result budget); the driver's default is 16 MiB.
ADBC_MAX_MESSAGE_BYTES = 256 * 2**20
WARMUP_RUNS = 10
ROAPI_READY = re.compile(r"Listening on (127\.0\.0\.1:\d+) for FlightSQL traffic")
LOOPBACK_ANY_PORT = "127.0.0.1:0"
SERVER, ANCHOR, ROAPI = "lakehouse", "duckdb", "roapi"
#: The command line's counts (each must be > 0): flag, default, meaning.
COUNTS = (
    ("--rows", 5_000_000, "rows to generate"),
    ("--repeats", 5, "runs per measurement"),
    ("--runs", 200, "small-aggregate executions per run"),
)
CONTENDERS = (SERVER, ANCHOR, ROAPI)


# -- contenders ------------------------------------------------------------------------------------
def roapi_binary() -> str:
    """The ``roapi`` executable: next to this Python (a venv's bin) or on PATH."""
    search = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    found = shutil.which("roapi", path=search)
    if found is None:
        raise SystemExit("roapi not found: python -m pip install -e '.[bench]'")
    return found


class RoapiServer(harness.Server):
    """ROAPI serving the Parquet files of directory ``root`` as table ``workers``, read from disk (not
    copied into memory), every port on a free loopback port."""

    def command(self) -> list[str]:
        """ROAPI's command line: read-only, HTTP, Postgres and Flight SQL ports on loopback."""
        table = f"workers={self.root},format=parquet,use_memory_table=false"
        ports = ["--addr-http", "--addr-flight-sql", "--addr-postgres"]
        return [roapi_binary(), "--table", table, *(x for p in ports for x in (p, LOOPBACK_ANY_PORT))]

    def log_text(self) -> str:
        """ROAPI's log, its Flight SQL listening line restated as the harness's ready line."""
        text = super().log_text()
        match = ROAPI_READY.search(text)
        return f"{text}\nready at grpc://{match.group(1)}\n" if match else text


class AdbcClient:
    """One ADBC Flight SQL connection and cursor; ``max_message_bytes`` None keeps the driver's default."""

    def __init__(self, location: str, max_message_bytes: int | None = ADBC_MAX_MESSAGE_BYTES) -> None:
        option = adbc_driver_flightsql.DatabaseOptions.WITH_MAX_MSG_SIZE.value
        options = {option: str(max_message_bytes)} if max_message_bytes else {}
        self.connection = adbc_driver_flightsql.dbapi.connect(location, db_kwargs=options, autocommit=True)
        self.cursor = self.connection.cursor()

    def __enter__(self) -> AdbcClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.cursor.close()
        self.connection.close()

    def query(self, sql: str) -> pa.Table:
        """Run ``sql`` and fetch its whole result."""
        self.cursor.execute(sql)
        return self.cursor.fetch_arrow_table()


@dataclass(frozen=True)
class Contender:
    """A way to run a query to an Arrow table, and the pid of the server process it uses (if any)."""

    name: str
    query: Callable[[str], pa.Table]
    pid: int | None = None


def inprocess_table(con: duckdb.DuckDBPyConnection, sql: str) -> pa.Table:
    """DuckDB in this process: ``sql`` streamed in batches (as the server and bench_core's anchor read
    it), collected into one table (as ``fetch_arrow_table`` does)."""
    return con.sql(sql).to_arrow_reader(workloads.READER_BATCH_ROWS).read_all()


class CpuMeter:
    """CPU seconds used over a ``with`` block by process ``pid`` (0 when None) and by this process."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self.server = self.local = 0.0

    def _now(self) -> tuple[float, float]:
        return (cpu_seconds(self.pid) if self.pid else 0.0), cpu_seconds()

    def __enter__(self) -> CpuMeter:
        self.server, self.local = self._now()
        return self

    def __exit__(self, *_: object) -> None:
        server, local = self._now()
        self.server, self.local = server - self.server, local - self.local


@dataclass(frozen=True)
class Timing:
    """One timed query: wall seconds, CPU seconds of its server process and of this one, result rows."""

    seconds: float
    cpu: CpuMeter
    rows: int


def timed_query(contender: Contender, sql: str) -> Timing:
    """Run ``sql`` once, timing it; the result is dropped after the clock stops."""
    with CpuMeter(contender.pid) as cpu:
        seconds, table = harness.timed(lambda: contender.query(sql))
    assert isinstance(table, pa.Table)
    return Timing(seconds, cpu, table.num_rows)


def default_options_error(location: str) -> str:
    """The full scan through ADBC with the driver's default options: '' if it works, else the error."""
    try:
        with AdbcClient(location, None) as client:
            client.query(workloads.SCAN_SQL)
    except adbc_driver_manager.Error as exc:
        return str(exc).splitlines()[0]
    return ""


# -- measurements ----------------------------------------------------------------------------------
Samples = dict[str, list[float]]


def samples() -> Samples:
    """Per contender, a list of measurements."""
    return defaultdict(list)


@dataclass
class Cpu:
    """Per contender, CPU used per query (by its server process, by this process) in each run."""

    server: Samples = field(default_factory=samples)
    local: Samples = field(default_factory=samples)

    def add(self, name: str, meter: CpuMeter, queries: int = 1) -> None:
        """Record what ``meter`` measured over ``queries`` queries of contender ``name``."""
        self.server[name].append(meter.server / queries)
        self.local[name].append(meter.local / queries)


@dataclass
class Latency:
    """Per contender, the p50 and p99 (ms) and the CPU per execution of each run of a small aggregate."""

    p50_ms: Samples = field(default_factory=samples)
    p99_ms: Samples = field(default_factory=samples)
    cpu: Cpu = field(default_factory=Cpu)


@dataclass
class Results:
    """Everything measured in one run."""

    scan: Samples = field(default_factory=samples)
    group: Samples = field(default_factory=samples)
    small: dict[str, Latency] = field(default_factory=dict)  # per small aggregate
    scan_cpu: Cpu = field(default_factory=Cpu)
    default_errors: dict[str, str] = field(default_factory=dict)


def measure_queries(contenders: list[Contender], rows: int, repeats: int, out: Results) -> None:
    """Interleave the contenders on the full scan and the GROUP BY (after one warm-up each)."""
    cases = ((workloads.SCAN_SQL, out.scan), (workloads.GROUP_SQL, out.group))
    for sql, _ in cases:  # warm-up: page cache, the servers' snapshot databases and file listings
        for contender in contenders:
            contender.query(sql)
    for i in range(repeats):
        for sql, series in cases:
            timings = {c.name: timed_query(c, sql) for c in contenders}
            counts = {name: t.rows for name, t in timings.items()}
            assert len(set(counts.values())) == 1, (sql, counts)
            assert sql != workloads.SCAN_SQL or counts[SERVER] == rows, (counts, rows)
            for name, timing in timings.items():
                series[name].append(timing.seconds)
                if sql == workloads.SCAN_SQL:
                    out.scan_cpu.add(name, timing.cpu)
            times = ", ".join(f"{name} {t.seconds:.3f} s" for name, t in timings.items())
            log(f"query #{i + 1} {sql[:30]!r}: {times} ({counts[SERVER]} rows)")


def latencies(contender: Contender, sql: str, runs: int) -> list[float]:
    """Wall seconds of ``runs`` consecutive executions of ``sql``."""
    out = []
    for _ in range(runs):
        started = time.perf_counter()
        contender.query(sql)
        out.append(time.perf_counter() - started)
    return out


def measure_small(contenders: list[Contender], sql: str, runs: int, repeats: int, out: Latency) -> None:
    """``repeats`` rounds of ``runs`` executions of a small aggregate per contender; p50 and p99."""
    results = {c.name: c.query(sql) for c in contenders}
    values = {name: [column.to_pylist() for column in table.columns] for name, table in results.items()}
    assert all(v == values[SERVER] for v in values.values()), values
    for contender in contenders:
        latencies(contender, sql, WARMUP_RUNS)
    for i in range(repeats):
        for contender in contenders:
            with CpuMeter(contender.pid) as cpu:
                ms = np.array(latencies(contender, sql, runs)) * 1e3
            out.cpu.add(contender.name, cpu, runs)
            out.p50_ms[contender.name].append(float(np.percentile(ms, 50)))
            out.p99_ms[contender.name].append(float(np.percentile(ms, 99)))
        figures = ", ".join(f"{n} {out.p50_ms[n][-1]:.2f}/{out.p99_ms[n][-1]:.2f}" for n in out.p50_ms)
        log(f"{sql[:40]!r} #{i + 1}, p50/p99 ms over {runs} runs: {figures}")


# -- report ----------------------------------------------------------------------------------------
def time_ratio(values: Samples, other: str) -> float:
    """``other``'s median over the server's (of times: above 1, the server is faster)."""
    return median(values[other]) / median(values[SERVER])


@dataclass(frozen=True)
class Row:
    """One line of the table: medians per contender, ratios against the server, targets and verdicts."""

    metric: str
    values: Samples
    digits: int
    targets: tuple[str, ...] = ()
    verdicts: tuple[bool, ...] = ()

    def render(self) -> str:
        """The markdown line."""
        cells = [f"{median(self.values[name]):.{self.digits}f}" for name in CONTENDERS]
        ratios = [f"{time_ratio(self.values, name):.2f}" for name in (ANCHOR, ROAPI)]
        target = ", ".join(self.targets) or "-"
        verdicts = " / ".join(verdict(ok) for ok in self.verdicts) or "-"
        ranges = " / ".join(spread(self.values[name], self.digits) for name in CONTENDERS)
        return " | ".join(
            ["", self.metric, *cells, *ratios, target, verdicts, f"<sub>{ranges}</sub> |"]
        ).strip()


def small_rows(sql: str, latency: Latency) -> list[Row]:
    """The p50 (with its target) and p99 rows of a small aggregate."""
    p50 = median(latency.p50_ms[SERVER])
    return [
        Row(f"`{sql}` p50 (ms)", latency.p50_ms, 2, ("p50 < 3 ms",), (p50 < 3.0,)),
        Row(f"`{sql}` p99 (ms)", latency.p99_ms, 2),
    ]


def query_rows(results: Results, rows: int) -> list[Row]:
    """The table's rows of measured figures."""
    scan = results.scan
    small = [row for sql, latency in results.small.items() for row in small_rows(sql, latency)]
    return [
        Row(
            f"Full scan, {rows:,} rows (s, lower is better)",
            scan,
            3,
            (">= 0.90 vs DuckDB", ">= 1.30 vs ROAPI"),
            (time_ratio(scan, ANCHOR) >= 0.9, time_ratio(scan, ROAPI) >= 1.3),
        ),
        Row("GROUP BY (state, role) (s, lower is better)", results.group, 3),
        *small,
    ]


def default_options_line(errors: dict[str, str]) -> str:
    """The markdown line of the full scan through ADBC with the driver's default options."""
    state = {name: "fails" if errors[name] else "works" for name in (SERVER, ROAPI)}
    return (
        f"| Full scan, ADBC default options (16 MiB gRPC messages) | {state[SERVER]} | - | {state[ROAPI]} "
        f"| - | - | works | {verdict(not errors[SERVER])} | - |"
    )


def render(results: Results, source: workloads.Source, repeats: int, runs: int) -> str:
    """The markdown table of medians with ratios, targets and pass/fail."""
    header = (
        f"{source.rows:,} rows, {source.nbytes / 1e6:.0f} MB in Arrow memory; medians of {repeats} runs "
        f"(small aggregates: p50 and p99 of {runs} executions per run); vs = time of the other / time "
        "through the lakehouse server (above 1: the server is faster)\n\n"
        "| metric | lakehouse (ADBC) | DuckDB in-process | ROAPI (ADBC) | vs DuckDB | vs ROAPI | target "
        "| pass/fail | <sub>min-max lakehouse / DuckDB / ROAPI</sub> |\n"
        "|---|---:|---:|---:|---:|---:|---|---|---|\n"
    )
    lines = [row.render() for row in query_rows(results, source.rows)]
    return header + "\n".join([*lines, default_options_line(results.default_errors)]) + "\n"


def cpu_note(what: str, cpu: Cpu, scale: float, digits: int) -> str:
    """Median CPU per query (times ``scale``): server process + this process (the client), per contender."""
    parts = [
        f"{name} {median(cpu.server[name]) * scale:.{digits}f} + {median(cpu.local[name]) * scale:.{digits}f}"
        for name in CONTENDERS
    ]
    return f"CPU {what}, server process + this process (median): " + ", ".join(parts)


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default, text in COUNTS:
        parser.add_argument(flag, type=int, default=default, help=f"{text} (default %(default)s)")
    parser.add_argument(
        "--small-sql",
        action="append",
        help=f"a small aggregate to time (repeatable; default: {' and '.join(map(repr, SMALL_SQLS))})",
    )
    harness.add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=2")
    args = parser.parse_args(argv)
    if min(args.rows, args.repeats, args.runs) <= 0:
        parser.error("--rows, --repeats and --runs must be > 0")
    args.small_sql = args.small_sql or list(SMALL_SQLS)
    return args


def roapi_table(work: Path, files: list[Path]) -> Path:
    """A directory of links to ``files`` (the server's current snapshot), for ROAPI to serve."""
    table = work / "roapi-table"
    shutil.rmtree(table, ignore_errors=True)
    table.mkdir()
    for path in files:
        (table / path.name).symlink_to(path)
    return table


def measure(
    server: harness.Server, roapi: harness.Server, files: list[Path], args: argparse.Namespace
) -> Results:
    """All measurements, with the ADBC clients and the in-process DuckDB open."""
    results = Results()
    results.default_errors = {SERVER: default_options_error(server.location)}
    results.default_errors[ROAPI] = default_options_error(roapi.location)
    with (
        inprocess_connection(files) as con,
        AdbcClient(server.location) as ours,
        AdbcClient(roapi.location) as theirs,
    ):
        contenders = [
            Contender(SERVER, ours.query, server.pid),
            Contender(ANCHOR, lambda sql: inprocess_table(con, sql)),
            Contender(ROAPI, theirs.query, roapi.pid),
        ]
        measure_queries(contenders, args.rows, args.repeats, results)
        for sql in args.small_sql:
            results.small[sql] = Latency()
            measure_small(contenders, sql, args.runs, args.repeats, results.small[sql])
    return results


def run(work: Path, args: argparse.Namespace, env: dict[str, str]) -> str:
    """Generate the input, ingest it into a fresh server, start ROAPI on its files, measure, render."""
    work.mkdir(parents=True, exist_ok=True)
    log(f"generating {args.rows:,} rows ...")
    source = workloads.generate_source(work / "workers-source.parquet", args.rows)
    with harness.Server(work / "lakehouse", work / "server.log", env) as server:
        before = data_files(Path(server.root))  # a kept --root holds earlier snapshots' files too
        with flight.connect(server.location) as client:
            harness.checked_put(lambda: workloads.server_ingest(client, source), source.rows)
        files = sorted(data_files(Path(server.root)) - before)
        table = roapi_table(work, files)
        with RoapiServer(table, work / "roapi.log", name="roapi") as roapi:
            log(
                f"server at {server.location} (pid {server.pid}), ROAPI at {roapi.location} (pid {roapi.pid})"
            )
            results = measure(server, roapi, files, args)
    notes = [
        cpu_note("seconds per full scan", results.scan_cpu, 1.0, 2),
        *(cpu_note(f"ms per `{sql}`", latency.cpu, 1e3, 2) for sql, latency in results.small.items()),
        *(
            f"{name} with ADBC's default options: {error}"
            for name, error in results.default_errors.items()
            if error
        ),
        f"server files of the snapshot (ROAPI and DuckDB read the same): {len(files)}",
    ]
    return render(results, source, args.repeats, args.runs) + "".join(f"\n- {n}" for n in notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown table on stdout."""
    args = parse_args(argv)
    return harness.print_report(args, "bench-flight-sql-", lambda work, env: run(work, args, env))


if __name__ == "__main__":
    raise SystemExit(main())
