"""Cost of a one-row append as a Parquet (Iceberg) dataset takes many of them (issue 18).

One client appends one row at a time, ``--appends`` times, to a new dataset on a fresh server with a
local root. Printed per ``--every`` appends: the milliseconds per commit (median), the manifests the
current snapshot lists, and the files under the table's ``metadata`` folder. Before manifest merging each
append added a manifest that every later commit listed and every new snapshot's query planning read, so
the cost rose with the count; with it, the count and the cost stay flat.

    python -m scripts.bench_appends --appends 2000 --every 100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
from pyiceberg.table import StaticTable

from scripts.harness import Server, add_work_arguments, do_put, print_report

DATASET = "appends"


def one_row(row_id: int) -> pa.Table:
    return pa.table({"id": pa.array([row_id], pa.int64()), "value": pa.array([float(row_id)])})


def table_files(root: Path) -> tuple[int, int]:
    """The manifests of the current snapshot and the files of the table's metadata folder."""
    folder = root / "tables" / DATASET / "metadata"
    newest = max(folder.glob("*.metadata.json"), key=lambda path: int(path.name.split("-", 1)[0]))
    table = StaticTable.from_metadata(str(newest))
    snapshot = table.current_snapshot()
    manifests = len(snapshot.manifests(table.io)) if snapshot else 0
    return manifests, sum(1 for _ in folder.iterdir())


def run(work: Path, env: dict[str, str], appends: int, every: int) -> str:
    root = work / "lakehouse"
    lines = [
        f"{appends} one-row appends, one client, local root; per {every} commits:",
        "",
        "| appends | ms/commit (median) | ms/commit (p95) | manifests | metadata-folder files |",
        "|---|---|---|---|---|",
    ]
    with Server(root, work / "server.log", env) as server, flight.connect(server.location) as client:
        first = one_row(0)
        do_put(client, {"ingest": {"dataset": DATASET, "mode": "create"}}, first.schema, first.to_batches())
        took: list[float] = []
        for row_id in range(1, appends + 1):
            table = one_row(row_id)
            started = time.perf_counter()
            command = {"ingest": {"dataset": DATASET, "expected_rows": 1}}
            do_put(client, command, table.schema, table.to_batches())
            took.append(time.perf_counter() - started)
            if row_id % every == 0:
                window = sorted(took[-every:])
                manifests, files = table_files(root)
                p95 = window[int(0.95 * (len(window) - 1))]
                lines.append(
                    f"| {row_id} | {1000 * statistics.median(window):.1f} | {1000 * p95:.1f} "
                    f"| {manifests} | {files} |"
                )
        ticket = flight.Ticket(json.dumps({"sql": f"SELECT count(*) AS n FROM {DATASET}"}).encode())
        counted = client.do_get(ticket).read_all().column("n")[0].as_py()
    assert counted == appends + 1, counted
    return "\n".join(lines)


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--appends", type=int, default=2000)
    parser.add_argument("--every", type=int, default=100)
    add_work_arguments(parser, "LAKEHOUSE_SNAPSHOT_KEEP_LAST=100")
    args = parser.parse_args()
    return print_report(args, "bench-appends-", lambda work, env: run(work, env, args.appends, args.every))


if __name__ == "__main__":
    raise SystemExit(main())
