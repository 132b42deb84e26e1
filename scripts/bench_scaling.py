"""Cost as work grows (issue 20, point 4): ingest and scan times and the server's peak RSS at each size.

For each size (1M, 2M, 5M and 20M generated workers by default) one server on a local root takes an
overwrite DoPut of the rows, then answers the full scan and the GROUP BY through DoGet (a client in a
spawned process); DuckDB in-process on the same files is the anchor of each query. The server's peak RSS
(the kernel's high-water mark, reset before each step) is read for the ingest and for the scan. Medians of
``--repeats`` runs per size. Time should grow linearly with the rows (seconds per million rows flat) and
the server's memory should not grow with them (it streams batch by batch).

Usage::

    python -m scripts.bench_scaling [--sizes 1000000,2000000,5000000,20000000] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from scripts import harness, workloads
from scripts.harness import MB, median, spread

DEFAULT_SIZES = (1_000_000, 2_000_000, 5_000_000, 20_000_000)


@dataclass
class Size:
    """What was measured at one size."""

    rows: int
    arrow_mb: float = 0.0
    ingest_seconds: list[float] = field(default_factory=list)
    ingest_rss_mb: list[float] = field(default_factory=list)
    scan_seconds: list[float] = field(default_factory=list)
    scan_rss_mb: list[float] = field(default_factory=list)
    scan_anchor_seconds: list[float] = field(default_factory=list)
    group_seconds: list[float] = field(default_factory=list)
    group_anchor_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class Prefix(workloads.Source):
    """The first ``rows`` rows of a larger generated input (the generator is deterministic: the first rows
    of a larger run are the rows of a smaller one), so that the input is generated once, at the largest
    size."""

    def batches(self) -> Iterator[pa.RecordBatch]:
        left = self.rows
        for batch in super().batches():
            if left <= 0:
                return
            yield batch.slice(0, left)
            left -= batch.num_rows


def prefix(source: workloads.Source, rows: int) -> Prefix:
    """The first ``rows`` rows of ``source``, with their Arrow size."""
    head = Prefix(source.path, rows, 0)
    return Prefix(source.path, rows, sum(batch.nbytes for batch in head.batches()))


def measure_size(
    server: harness.Server, client: flight.FlightClient, source: workloads.Source, repeats: int
) -> Size:
    """Ingest ``source`` and query it ``repeats`` times."""
    rows = source.rows
    size = Size(rows, source.nbytes / MB)
    root = Path(server.root)
    files: set[Path] = set()
    for i in range(repeats):
        before = set((root / "tables" / "workers" / "data").glob("*.parquet"))
        with harness.PeakRss(server.pid) as rss:
            seconds, _ = harness.checked_put(lambda: workloads.server_ingest(client, source), rows)
        files = set((root / "tables" / "workers" / "data").glob("*.parquet")) - before
        size.ingest_seconds.append(seconds)
        size.ingest_rss_mb.append(rss.peak / MB)
        harness.log(f"{rows:,} rows, ingest #{i + 1}: {seconds:.2f} s, peak RSS {rss.peak / MB:.0f} MB")
    measure_queries(server, sorted(files), size, repeats)
    return size


def measure_queries(server: harness.Server, files: list[Path], size: Size, repeats: int) -> None:
    """The scan and the GROUP BY through DoGet and in-process, interleaved, after one warm-up each."""
    client, anchor = workloads.Spawned.flight_client(server.location), workloads.Spawned.duckdb(files)
    try:
        for sql in (workloads.SCAN_SQL, workloads.GROUP_SQL):
            client.timed(sql)
            anchor.timed(sql)
        for i in range(repeats):
            with harness.PeakRss(server.pid) as rss:
                seconds, rows = client.timed(workloads.SCAN_SQL)
            assert rows == size.rows, (rows, size.rows)
            size.scan_seconds.append(seconds)
            size.scan_rss_mb.append(rss.peak / MB)
            size.scan_anchor_seconds.append(anchor.timed(workloads.SCAN_SQL)[0])
            size.group_seconds.append(client.timed(workloads.GROUP_SQL)[0])
            size.group_anchor_seconds.append(anchor.timed(workloads.GROUP_SQL)[0])
            harness.log(
                f"{size.rows:,} rows, queries #{i + 1}: scan {seconds:.2f} s (in-process "
                f"{size.scan_anchor_seconds[-1]:.2f} s, peak RSS {rss.peak / MB:.0f} MB), GROUP BY "
                f"{size.group_seconds[-1]:.3f} s (in-process {size.group_anchor_seconds[-1]:.3f} s)"
            )
    finally:
        client.close()
        anchor.close()


def per_million(seconds: list[float], rows: int) -> float:
    """Median seconds per million rows."""
    return median(seconds) / (rows / 1e6)


def render(sizes: list[Size], repeats: int) -> str:
    """The markdown table, then the linearity and memory verdicts."""
    lines = [
        f"Medians of {repeats} runs per size; RSS is the server's peak (VmHWM) during the step; "
        "s/M = seconds per million rows; ratio = in-process seconds / server seconds.",
        "",
        "| rows | Arrow MB | ingest s | ingest s/M | ingest peak RSS MB | scan s | scan s/M | scan ratio | "
        "scan peak RSS MB | GROUP BY s | GROUP BY ratio | <sub>min-max ingest / scan</sub> |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for size in sizes:
        scan_ratio = median(size.scan_anchor_seconds) / median(size.scan_seconds)
        group_ratio = median(size.group_anchor_seconds) / median(size.group_seconds)
        lines.append(
            f"| {size.rows:,} | {size.arrow_mb:.0f} | {median(size.ingest_seconds):.2f} | "
            f"{per_million(size.ingest_seconds, size.rows):.2f} | {max(size.ingest_rss_mb):.0f} | "
            f"{median(size.scan_seconds):.2f} | {per_million(size.scan_seconds, size.rows):.2f} | "
            f"{scan_ratio:.2f} | {max(size.scan_rss_mb):.0f} | {median(size.group_seconds):.3f} | "
            f"{group_ratio:.2f} | "
            f"<sub>{spread(size.ingest_seconds, 2)} / {spread(size.scan_seconds, 2)}</sub> |"
        )
    first, last = sizes[0], sizes[-1]
    lines.append("")
    for label, attribute in (("ingest", "ingest_seconds"), ("scan", "scan_seconds")):
        growth = per_million(getattr(last, attribute), last.rows) / per_million(
            getattr(first, attribute), first.rows
        )
        lines.append(
            f"- {label}: seconds per million rows at {last.rows:,} / at {first.rows:,} = {growth:.2f} "
            "(1.00 = linear)"
        )
    for label, attribute in (("ingest", "ingest_rss_mb"), ("scan", "scan_rss_mb")):
        peaks = [max(getattr(size, attribute)) for size in sizes]
        lines.append(
            f"- {label} peak RSS from {first.rows:,} to {last.rows:,} rows: "
            + " / ".join(f"{peak:.0f}" for peak in peaks)
            + f" MB (largest / smallest {max(peaks) / min(peaks):.2f})"
        )
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default=",".join(str(rows) for rows in DEFAULT_SIZES),
        help="comma-separated row counts (default %(default)s)",
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per size (default %(default)s)")
    harness.add_work_arguments(parser, "e.g. LAKEHOUSE_QUERY_THREADS=2")
    args = parser.parse_args(argv)
    try:
        args.sizes = [int(rows) for rows in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes takes comma-separated integers")
    if args.repeats <= 0 or any(rows <= 0 for rows in args.sizes):
        parser.error("--sizes and --repeats must be > 0")
    return args


def run(work: Path, sizes: list[int], repeats: int, env: dict[str, str]) -> str:
    """Measure every size against one server and render the table."""
    work.mkdir(parents=True, exist_ok=True)
    harness.log(f"generating {max(sizes):,} rows ...")
    largest = workloads.generate_source(work / "workers-source.parquet", max(sizes))
    with harness.Server(work / "lakehouse", work / "server.log", {**harness.ENGINE_ENV, **env}) as server:
        harness.log(f"server at {server.location} (pid {server.pid})")
        with flight.connect(server.location) as client:
            measured = [measure_size(server, client, prefix(largest, rows), repeats) for rows in sizes]
    return render(measured, repeats) + f"- load average at the end: {os.getloadavg()}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown table on stdout."""
    args = parse_args(argv)
    return harness.print_report(
        args, "bench-scaling-", lambda work, env: run(work, args.sizes, args.repeats, env)
    )


if __name__ == "__main__":
    sys.exit(main())
