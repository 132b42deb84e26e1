"""Core benchmark of the lakehouse server: DoPut ingest and DoGet queries next to in-process anchors.

* Ingest: the workers rows streamed with one DoPut, against pyarrow writing the same batches to a
  Parquet file (zstd level 1) in this process; the server's peak RSS (children included) is sampled.
* DoGet: a full scan and a GROUP BY through the server, against DuckDB on the Parquet files the server
  wrote; the Flight client and DuckDB each run in a spawned process of their own (timed there).

Every measurement is repeated (contenders interleaved) and reported as medians, with min/max.

Usage::

    python -m scripts.bench_core [--rows 5000000] [--repeats 5] [--root DIR] [--env KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.flight as flight
import pyarrow.parquet as pq

from scripts import harness, workloads
from scripts.harness import MB, median, spread, verdict


# -- contenders ------------------------------------------------------------------------------------
def anchor_ingest(source: workloads.Source, out: Path) -> int:
    """Write the source batches to a Parquet file with pyarrow in this process; returns rows written."""
    rows = 0
    with pq.ParquetWriter(out, source.schema, compression="zstd", compression_level=1) as writer:
        for batch in source.batches():
            writer.write_batch(batch)
            rows += batch.num_rows
    return rows


def data_files(root: Path) -> set[Path]:
    """The Parquet files under the root's workers data directory."""
    return set((root / "tables" / "workers" / "data").glob("*.parquet"))


def inprocess_connection(files: list[Path]) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB with a ``workers`` view over ``files``."""
    return workloads.files_connection(files)


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
    server: harness.Server,
    client: flight.FlightClient,
    source: workloads.Source,
    scratch: Path,
    repeats: int,
    out: Results,
) -> set[Path]:
    """Interleave server and anchor ingests; returns the files of the last (current) server ingest."""
    root = Path(server.root)
    current: set[Path] = set()
    for i in range(repeats):
        before = data_files(root)
        with harness.RssSampler(server.pid) as rss:
            seconds, put = harness.checked_put(lambda: workloads.server_ingest(client, source), source.rows)
        current = data_files(root) - before
        out.ingest_mbps.server.append(source.nbytes / MB / seconds)
        out.ingest_rss_mb.server.append(rss.peak / MB)
        anchor_seconds, rows = harness.timed(lambda: anchor_ingest(source, scratch / "anchor.parquet"))
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


def measure_queries(location: str, files: list[Path], rows: int, repeats: int, out: Results) -> None:
    """Interleave DoGet and DuckDB on the files, each in a spawned process (after one warm-up each)."""
    server, anchor = workloads.Spawned.flight_client(location), workloads.Spawned.duckdb(files)
    try:
        cases = ((workloads.SCAN_SQL, out.scan_seconds), (workloads.GROUP_SQL, out.group_seconds))
        for sql, _ in cases:  # warm-up: page cache, the server's snapshot database, the processes
            server.timed(sql)
            anchor.timed(sql)
        for i in range(repeats):
            for sql, samples in cases:
                server_seconds, server_rows = server.timed(sql)
                local_seconds, local_rows = anchor.timed(sql)
                assert server_rows == local_rows, (sql, server_rows, local_rows)
                if sql == workloads.SCAN_SQL:
                    assert server_rows == rows, (server_rows, rows)
                samples.server.append(server_seconds)
                samples.anchor.append(local_seconds)
                print(
                    f"  query #{i + 1} {sql[:30]!r}: server {server_seconds:.2f} s, "
                    f"in-process {local_seconds:.2f} s ({server_rows} rows)",
                    file=sys.stderr,
                )
    finally:
        server.close()
        anchor.close()


# -- report ----------------------------------------------------------------------------------------
def render(results: Results, source: workloads.Source, repeats: int) -> str:
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
        f"| {m} | {s} | {a} | {r} | {t} | {verdict(ok)} | <sub>{mm}</sub> |" for m, s, a, r, t, ok, mm in rows
    ]
    return header + "\n".join(lines) + "\n"


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    return harness.rows_and_repeats(__doc__.splitlines()[0], 5, argv)


def run(work: Path, rows: int, repeats: int, env: dict[str, str]) -> str:
    """Generate the input, run every measurement against a fresh server, and render the table."""
    work.mkdir(parents=True, exist_ok=True)
    print(f"generating {rows:,} rows ...", file=sys.stderr)
    source = workloads.generate_source(work / "workers-source.parquet", rows)
    results = Results()
    with harness.Server(work / "lakehouse", work / "server.log", {**harness.ENGINE_ENV, **env}) as server:
        print(f"server at {server.location} (pid {server.pid})", file=sys.stderr)
        with flight.connect(server.location) as client:
            current = measure_ingest(server, client, source, work, repeats, results)
            measure_queries(server.location, sorted(current), rows, repeats, results)
    results.notes.append(f"server files of the current snapshot: {len(current)}")
    return render(results, source, repeats) + "".join(f"\n- {note}" for note in results.notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown table on stdout."""
    args = parse_args(argv)
    return harness.print_report(
        args, "bench-core-", lambda work, env: run(work, args.rows, args.repeats, env)
    )


if __name__ == "__main__":
    raise SystemExit(main())
