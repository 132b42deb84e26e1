"""The command line: client commands against a real server, and start-up refusals."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from scripts.gen_workers import write_workers
from tests.conftest import ServerProcess

ROWS = 500_000


def cli(
    *args: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``flight-lakehouse ARGS`` (with ``env`` added to the environment)."""
    return subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_cli_ingest_query_and_list(server: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "workers.csv"
    assert write_workers(source, rows=ROWS, fmt="csv") == ROWS
    ingested = cli("ingest", str(source), "--dataset", "workers", "--server", server.location)
    assert ingested.returncode == 0, ingested.stderr
    assert f"{ROWS} rows into workers" in ingested.stdout
    assert "MB/s" in ingested.stderr  # the progress bar
    expected = pacsv.read_csv(source).column("hourly_rate").to_pylist()
    assert server.sql("select count(*) as n, sum(hourly_rate) as s from workers").to_pylist() == [
        {"n": ROWS, "s": pytest.approx(sum(expected))}
    ]

    as_csv = cli(
        "query",
        "select state, count(*) as n from workers group by state order by state",
        "--format",
        "csv",
        "--server",
        server.location,
    )
    assert as_csv.returncode == 0, as_csv.stderr
    lines = as_csv.stdout.strip().splitlines()
    assert lines[0] == '"state","n"' and sum(int(line.split(",")[1]) for line in lines[1:]) == ROWS

    out = tmp_path / "top.parquet"
    as_parquet = cli(
        "query",
        "select * from workers where id < 1000",
        "--format",
        "parquet",
        "--output",
        str(out),
        "--server",
        server.location,
    )
    assert as_parquet.returncode == 0, as_parquet.stderr
    assert pq.read_table(out).num_rows == 1000

    listed = cli("datasets", "--server", server.location)
    assert listed.returncode == 0 and "workers" in listed.stdout and "500,000" in listed.stdout

    again = cli(
        "ingest", str(source), "--dataset", "workers", "--mode", "create", "--server", server.location
    )
    assert again.returncode == 1
    assert again.stderr.strip().splitlines()[-1] == "Error: dataset 'workers' already exists (mode 'create')"


def test_cli_query_errors_are_one_line(server: ServerProcess) -> None:
    result = cli("query", "select * from missing", "--server", server.location)
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: dataset 'missing' not found"


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--port", "70000"], {}, "invalid setting port"),
        (["--root", "gs://bucket/x"], {}, "unknown storage scheme 'gs'"),
        (["--root", "/proc/forbidden"], {}, "is not a writable directory"),
        (["--host", "0.0.0.0"], {}, "is not a loopback address"),
        ([], {"LAKEHOUSE_VECTOR_GRAPH_CODE_BITS": "5"}, "invalid setting vector_graph_code_bits"),
    ],
)
def test_serve_refuses_bad_settings(args: list[str], env: dict[str, str], message: str) -> None:
    result = cli("serve", "--http-port=-1", *args, timeout=60, env=env)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


ARENA_PROBE = """
import ctypes, threading
import flight_lakehouse.cli  # the entry point's process set-up, then what the server imports
import pyarrow.flight
keep = []
def allocate():
    keep.extend(bytearray(200_000) for _ in range(50))
threads = [threading.Thread(target=allocate) for _ in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
out = ctypes.c_void_p(libc.fopen(b"/dev/stdout", b"w"))
libc.malloc_info(0, out)
libc.fflush(out)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc arenas")
def test_command_line_process_has_one_malloc_arena() -> None:
    """The CLI caps glibc's arenas before pyarrow starts its threads: allocating threads share one
    arena (capped after the import, they spread over four)."""
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    probe = subprocess.run([sys.executable, "-c", ARENA_PROBE], capture_output=True, text=True, env=env)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.count("<heap nr=") == 1, probe.stdout[:2000]
