"""Commit rate of small concurrent appends: one server vs three servers sharing one state.

Both setups store on one S3 bucket (SeaweedFS ``weed mini`` on loopback, ``tests/seaweedfs.py``) with the
Iceberg catalog on one PostgreSQL database (``tests/postgres.py``): the configuration several servers
need. ``--clients`` client processes (spawned, never forked) each append one-row uploads to one dataset
for ``--seconds``; with three servers the clients are spread over them round robin. Reported: commits per
second (uploads acknowledged), the row count the servers agree on afterwards (must equal the commits),
and the commits that lost to a concurrent one and were made again (``flight_lakehouse_commit_retries_total``
summed over the servers' ``/metrics``), with the load average of the machine.

Usage::

    python -m scripts.bench_commits [--clients 4] [--seconds 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from scripts.harness import Server, log, metric_sum
from tests.postgres import PostgreSQL
from tests.seaweedfs import SeaweedFS

BUCKET = "bench-commits"
DATASET = "events"


def append_for(location: str, seconds: float, client: int, results: multiprocessing.Queue) -> None:
    """One client process: one-row appends until ``seconds`` pass; puts (commits, failures, the first
    failure's message) on ``results``."""
    connection = flight.connect(location)
    command = json.dumps({"ingest": {"dataset": DATASET, "mode": "append"}}).encode()
    descriptor = flight.FlightDescriptor.for_command(command)
    commits = failures = 0
    first_failure = ""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        row = pa.table({"client": pa.array([client], pa.int32()), "n": pa.array([commits], pa.int64())})
        try:
            writer, reader = connection.do_put(descriptor, row.schema)
            with writer:
                writer.write_table(row)
                writer.done_writing()
                reader.read()
            commits += 1
        except (flight.FlightError, pa.ArrowException) as exc:
            failures += 1
            first_failure = first_failure or str(exc).splitlines()[0][:200]
    connection.close()
    results.put((commits, failures, first_failure))


def retries(server: Server) -> float:
    """The server's ``flight_lakehouse_commit_retries_total``."""
    return metric_sum(server.http_url, ["flight_lakehouse_commit_retries"])


def count(server: Server) -> int:
    connection = flight.connect(server.location)
    try:
        ticket = flight.Ticket(json.dumps({"sql": f"SELECT count(*) AS n FROM {DATASET}"}).encode())
        return connection.do_get(ticket).read_all().column("n")[0].as_py()
    finally:
        connection.close()


def run(servers: int, clients: int, seconds: float, s3: SeaweedFS, pg: PostgreSQL, work: Path) -> dict:
    """One measurement on a fresh root and database with ``servers`` servers."""
    root = f"s3://{BUCKET}/run-{servers}-{int(time.time())}"
    env = {
        **s3.env(root),
        "LAKEHOUSE_CATALOG_URI": pg.create_database(f"bench_{servers}_{os.getpid()}"),
        # every client's upload admitted (not refused busy) on one server as on three
        "LAKEHOUSE_MAX_CONCURRENT_INGESTS": str(clients),
    }
    with ExitStack() as stack:
        started = [
            stack.enter_context(
                Server(
                    root,
                    work / f"server-{servers}-{number}.log",
                    {**env, "LAKEHOUSE_STATE_DIR": str(work / f"state-{servers}-{number}")},
                    name=f"server {number}",
                )
            )
            for number in range(servers)
        ]
        first = flight.connect(started[0].location)
        schema = pa.schema([("client", pa.int32()), ("n", pa.int64())])
        command = json.dumps({"ingest": {"dataset": DATASET, "mode": "create"}}).encode()
        writer, reader = first.do_put(flight.FlightDescriptor.for_command(command), schema)
        with writer:
            writer.write_table(schema.empty_table())
            writer.done_writing()
            reader.read()
        first.close()
        context = multiprocessing.get_context("spawn")
        results: multiprocessing.Queue = context.Queue()
        processes = [
            context.Process(
                target=append_for, args=(started[n % servers].location, seconds, n, results), daemon=True
            )
            for n in range(clients)
        ]
        load_before = os.getloadavg()[0]
        for process in processes:
            process.start()
        outcomes = [results.get(timeout=seconds + 120) for _ in processes]
        for process in processes:
            process.join(30)
        commits = sum(outcome[0] for outcome in outcomes)
        rows = [count(server) for server in started]
        return {
            "servers": servers,
            "clients": clients,
            "seconds": seconds,
            "commits": commits,
            "failures": sum(outcome[1] for outcome in outcomes),
            "first_failure": next((outcome[2] for outcome in outcomes if outcome[2]), ""),
            "commits_per_second": round(commits / seconds, 1),
            "rows_seen_by_each_server": rows,
            "exact": all(found == commits for found in rows),
            "retries": int(sum(retries(server) for server in started)),
            "load_average_before": round(load_before, 2),
            "load_average_after": round(os.getloadavg()[0], 2),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--servers", type=int, nargs="+", default=[1, 3], help="setups to measure")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-commits-") as directory:
        work = Path(directory)
        with SeaweedFS(work / "s3") as s3, PostgreSQL() as pg:
            s3.create_bucket(BUCKET)
            for servers in options.servers:
                report = run(servers, options.clients, options.seconds, s3, pg, work)
                log(json.dumps(report))
                print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
