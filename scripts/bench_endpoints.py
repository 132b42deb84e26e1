"""Parallel endpoints benchmark: a full scan fetched from one server versus from the endpoints of three.

Three servers share one local root and one SQLite catalog (they find each other by heartbeats); the
generated ``workers`` table is ingested as PARTS appends (one file each). Three ways to read the whole
``select * from workers``, each client in a spawned process of its own, pre-started (no spawn in the timing),
every stream drained batch by batch and kept nowhere:

* ``one server``: one DoGet of ``{"sql"}`` to one server, the whole result in one stream;
* ``one server, parts``: GetFlightInfo, then every endpoint's ticket fetched in parallel from that same
  server (one client process per endpoint);
* ``three servers``: GetFlightInfo, then every endpoint fetched in parallel from the server its location
  names (dealt round-robin over the three).

The times include GetFlightInfo. The median of ``--repeats`` runs of each (in turn) and the ratio of one
server to three are printed, with the machine's load average before and after (other work on the machine
counts in every figure).

Usage::

    python -m scripts.bench_endpoints [--rows 5000000] [--repeats 3] [--root DIR]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pyarrow.flight as flight
import pyarrow.parquet as pq

from scripts import harness
from scripts.harness import ENGINE_ENV, Server, drain, log
from scripts.workloads import SCAN_SQL, Source, generate_source

SERVERS = 3
PARTS = 6


def fetch(location: str, ticket: bytes) -> int:
    """DoGet ``ticket`` from ``location`` (in a spawned client process), drained; its row count."""
    with flight.connect(location) as client:
        reader = client.do_get(flight.Ticket(ticket))
        return drain(lambda: reader.read_chunk().data)


def ready() -> int:
    """A no-op: the pool's processes are started before anything is timed."""
    return os.getpid()


def ingest(location: str, source: Source) -> None:
    """The source as PARTS appends (a file each, at least)."""
    table = pq.read_table(source.path)
    step = -(-table.num_rows // PARTS)
    with flight.connect(location) as client:
        for index in range(PARTS):
            chunk = table.slice(index * step, step)
            command = {"ingest": {"dataset": "workers", "mode": "append", "expected_rows": chunk.num_rows}}
            harness.do_put(client, command, chunk.schema, chunk.to_batches(65_536))


class Readers:
    """PARTS client processes (spawned): each call fetches tickets from locations in parallel."""

    def __init__(self) -> None:
        context = multiprocessing.get_context("spawn")
        self.pool = ProcessPoolExecutor(PARTS, mp_context=context)
        started = {self.pool.submit(ready) for _ in range(4 * PARTS)}
        assert len({future.result() for future in started}) >= 1

    def read(self, fetches: list[tuple[str, bytes]]) -> int:
        """Rows of every ``(location, ticket)``, fetched in parallel, one per process."""
        futures = [self.pool.submit(fetch, location, ticket) for location, ticket in fetches]
        return sum(future.result() for future in futures)

    def close(self) -> None:
        self.pool.shutdown()


def flight_info(location: str) -> flight.FlightInfo:
    with flight.connect(location) as client:
        return client.get_flight_info(
            flight.FlightDescriptor.for_command(json.dumps({"sql": SCAN_SQL}).encode())
        )


def contenders(first: str, readers: Readers) -> dict[str, Callable[[], int]]:
    """Each way to read the scan: a function returning its rows."""

    def one_server() -> int:
        return readers.read([(first, json.dumps({"sql": SCAN_SQL}).encode())])

    def one_server_parts() -> int:
        info = flight_info(first)
        return readers.read([(first, endpoint.ticket.ticket) for endpoint in info.endpoints])

    def three_servers() -> int:
        info = flight_info(first)
        return readers.read([(e.locations[0].uri.decode(), e.ticket.ticket) for e in info.endpoints])

    return {"one server": one_server, "one server, parts": one_server_parts, "three servers": three_servers}


def run(work: Path, rows: int, repeats: int, env: dict[str, str]) -> str:
    root, catalog = work / "lakehouse", f"sqlite:///{(work / 'catalog.db').as_posix()}"
    root.mkdir(parents=True, exist_ok=True)
    log(f"generating {rows:,} rows")
    source = generate_source(work / "workers.parquet", rows)
    server_env = {
        **ENGINE_ENV,
        "LAKEHOUSE_HEARTBEAT_SECONDS": "1",
        "LAKEHOUSE_QUERY_PARTS_MAX": str(PARTS),
        **env,
    }
    servers = [
        Server(root, work / f"server{i}.log", server_env, ("--catalog-uri", catalog), f"server {i}")
        for i in range(SERVERS)
    ]
    readers = None
    try:
        servers[0].start()  # the first creates the catalog's tables; the others then start together
        for server in servers[1:]:
            server.start()
        log("ingesting")
        ingest(servers[0].location, source)
        info = flight_info(servers[0].location)
        found = {e.locations[0].uri.decode() for e in info.endpoints if e.locations}
        deadline = time.monotonic() + 30
        while len(found) < SERVERS and time.monotonic() < deadline:
            time.sleep(0.5)
            info = flight_info(servers[0].location)
            found = {e.locations[0].uri.decode() for e in info.endpoints if e.locations}
        assert len(found) == SERVERS, f"the FlightInfo names {found}, not {SERVERS} servers"
        readers = Readers()
        load_before = os.getloadavg()
        times: dict[str, list[float]] = {}
        for round_ in range(repeats + 1):  # round 0 warms the servers (footers, page cache), untimed
            for name, read in contenders(servers[0].location, readers).items():
                started = time.perf_counter()
                got = read()
                seconds = time.perf_counter() - started
                assert got == rows, f"{name} read {got} rows, not {rows}"
                if round_:
                    times.setdefault(name, []).append(seconds)
                    log(f"{name}: {seconds:.2f} s")
        load_after = os.getloadavg()
    finally:
        if readers is not None:
            readers.close()
        for server in servers:
            server.stop()
    return report(rows, repeats, len(info.endpoints), times, load_before, load_after)


def report(
    rows: int,
    repeats: int,
    endpoints: int,
    times: dict[str, list[float]],
    load_before: tuple[float, float, float],
    load_after: tuple[float, float, float],
) -> str:
    one = harness.median(times["one server"])
    lines = [
        f"Full scan of {rows:,} rows ({endpoints} endpoints), {os.cpu_count()} cores, median of {repeats}:",
        "",
        "| read | seconds (median) | min-max | rows/s | one server / this |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        median = harness.median(values)
        spread = harness.spread(values, 2)
        lines.append(f"| {name} | {median:.2f} | {spread} | {rows / median:,.0f} | {one / median:.2f}x |")
    lines += [
        "",
        f"load average before {'/'.join(f'{x:.1f}' for x in load_before)}, "
        f"after {'/'.join(f'{x:.1f}' for x in load_after)} (1/5/15 min)",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    return harness.rows_and_repeats(__doc__.splitlines()[0], 3, argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return harness.print_report(
        args, "bench-endpoints-", lambda work, env: run(work, args.rows, args.repeats, env)
    )


if __name__ == "__main__":
    raise SystemExit(main())
