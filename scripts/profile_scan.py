"""Where a DoGet's time goes (issue 20, point 3): the server's CPU by component during a query, sampled.

One server on a local root takes ``--rows`` generated workers; a client in a spawned process runs the
query (the full scan by default, ``--query group`` for the GROUP BY) over and over while ``perf``
samples every thread of the server on the CPU (DuckDB's and gRPC's native threads included, which a
Python sampler does not see). Each sample goes to a component by its library and symbol: DuckDB (Parquet
decoding, the query, its Arrow export), Arrow IPC encoding, gRPC and Flight's transport, other Arrow code,
the Python interpreter, the kernel (loopback TCP), the C library (``memcpy``, ``malloc``). Needs
``perf`` (Debian's ``linux-perf``). Also
printed: CPU seconds per query of the server and of the client, against DuckDB's own CPU seconds for the
same query in a process of its own, and the wall time of each.

Usage::

    python -m scripts.profile_scan [--rows 5000000] [--query scan|group] [--seconds 20] [--env KEY=VALUE]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.harness import MB, median

#: Components by a pattern of a sample's ``dso symbol``; the first that matches wins.
COMPONENTS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("DuckDB (Parquet decode, query, Arrow export)", re.compile(r"_duckdb")),
    ("Arrow IPC encoding", re.compile(r"arrow::ipc|Serializ|IpcPayload")),
    ("gRPC and Flight transport", re.compile(r"grpc|libarrow_flight|absl|protobuf")),
    ("other Arrow (pyarrow, buffers)", re.compile(r"arrow")),
    ("Python interpreter", re.compile(r"python|\.so\.1\.0")),
    ("kernel (loopback TCP, page faults, scheduling)", re.compile(r"kernel")),
    ("C library (memcpy, malloc)", re.compile(r"libc|ld-linux|libm")),
)
QUERIES = {"scan": workloads.SCAN_SQL, "group": workloads.GROUP_SQL}
#: One line of ``perf report --stdio -F overhead,dso,sym``: the share, then the DSO and symbol.
REPORT_LINE = re.compile(r"^\s+([\d.]+)%\s+(.*)$")


def component(sample: str) -> str:
    """The component of a sample's ``dso [.] symbol``."""
    for name, pattern in COMPONENTS:
        if pattern.search(sample):
            return name
    return "other"


def breakdown(data: Path) -> collections.Counter[str]:
    """Percent of the samples per component, from ``perf record``'s data file."""
    report = subprocess.run(
        [
            "perf",
            "report",
            "-i",
            str(data),
            "--stdio",
            "--no-children",
            "--sort",
            "dso,sym",
            "-F",
            "overhead,dso,sym",
            "--percent-limit",
            "0",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    shares: collections.Counter[str] = collections.Counter()
    for line in report.splitlines():
        match = REPORT_LINE.match(line)
        if match:
            shares[component(match.group(2))] += float(match.group(1))
    return shares


def run_queries(client: workloads.Spawned, sql: str, seconds: float) -> list[float]:
    """Run ``sql`` in the spawned client until ``seconds`` have passed; the time of each run."""
    times: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        times.append(client.timed(sql)[0])
    return times


def cpu_per_query(
    server_pid: int, client: workloads.Spawned, sql: str, runs: int
) -> tuple[float, float, list[float]]:
    """Server and client CPU seconds per query over ``runs`` runs, and each run's wall time."""
    client_pid = client.call(os.getpid)
    server_before, client_before = harness.cpu_seconds(server_pid), harness.cpu_seconds(client_pid)
    times = [client.timed(sql)[0] for _ in range(runs)]
    server_cpu = (harness.cpu_seconds(server_pid) - server_before) / runs
    client_cpu = (harness.cpu_seconds(client_pid) - client_before) / runs
    return server_cpu, client_cpu, times


def profile(work: Path, rows: int, query: str, seconds: float, env: dict[str, str]) -> str:
    """Ingest, measure CPU per query, sample the server with py-spy, and render the report."""
    work.mkdir(parents=True, exist_ok=True)
    sql = QUERIES[query]
    harness.log(f"generating {rows:,} rows ...")
    source = workloads.generate_source(work / "workers-source.parquet", rows)
    with harness.Server(work / "lakehouse", work / "server.log", {**harness.ENGINE_ENV, **env}) as server:
        data_dir = Path(server.root) / "tables" / "workers" / "data"
        earlier = set(data_dir.glob("*.parquet"))
        with flight.connect(server.location) as connection:
            harness.checked_put(lambda: workloads.server_ingest(connection, source), rows)
        files = sorted(set(data_dir.glob("*.parquet")) - earlier)  # the overwrite's snapshot
        client, anchor = workloads.Spawned.flight_client(server.location), workloads.Spawned.duckdb(files)
        try:
            client.timed(sql)  # warm-up
            anchor.timed(sql)
            server_cpu, client_cpu, times = cpu_per_query(server.pid, client, sql, 3)
            anchor_pid = anchor.call(os.getpid)
            before = harness.cpu_seconds(anchor_pid)
            anchor_times = [anchor.timed(sql)[0] for _ in range(3)]
            anchor_cpu = (harness.cpu_seconds(anchor_pid) - before) / 3
            data = work / f"perf-{query}.data"
            harness.log(f"sampling the server for {seconds:.0f} s ...")
            perf = subprocess.Popen(  # cpu-clock: on-CPU samples of every thread (DuckDB's and gRPC's too)
                ["perf", "record", "-e", "cpu-clock", "-F", "499", "-p", str(server.pid), "-o", str(data)],
                stdout=subprocess.DEVNULL,
                stderr=(work / "perf.log").open("wb"),
            )
            sampled = run_queries(client, sql, seconds)
            perf.send_signal(signal.SIGINT)
            perf.wait(60)
        finally:
            client.close()
            anchor.close()
    shares = breakdown(data)
    lines = [
        f"{rows:,} rows ({source.nbytes / MB:.0f} MB in Arrow memory), `{sql}`",
        "",
        "| | wall s (median of 3) | CPU s per query |",
        "|---|---:|---:|",
        f"| DoGet: server | {median(times):.3f} | {server_cpu:.2f} |",
        f"| DoGet: client (pyarrow, reading every batch) | | {client_cpu:.2f} |",
        f"| DuckDB in-process (to_arrow_reader) | {median(anchor_times):.3f} | {anchor_cpu:.2f} |",
        "",
        f"Server CPU by component: `perf record -e cpu-clock` (every thread, on-CPU samples) over "
        f"{len(sampled)} queries:",
        "",
        "| component | share |",
        "|---|---:|",
        *(f"| {name} | {share:.1f}% |" for name, share in shares.most_common()),
        "",
        f"- load average at the end: {os.getloadavg()}",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows to generate (default %(default)s)")
    parser.add_argument("--query", choices=sorted(QUERIES), default="scan", help="default %(default)s")
    parser.add_argument("--seconds", type=float, default=20.0, help="sampling time (default %(default)s)")
    harness.add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=1")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    return harness.print_report(
        args, "profile-scan-", lambda work, env: profile(work, args.rows, args.query, args.seconds, env)
    )


if __name__ == "__main__":
    sys.exit(main())
