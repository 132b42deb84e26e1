"""The catalog on PostgreSQL when PostgreSQL is not there: one-line refusals, never its password.

(Everything the catalog does is tested on PostgreSQL too: tests/test_catalog.py runs on both catalogs, and
tests/test_several_servers.py shares one PostgreSQL catalog between three servers.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flight_lakehouse.catalog import DatasetCatalog, retry_conflicts
from flight_lakehouse.errors import Unavailable, catalog_fault, to_client_error
from flight_lakehouse.storage import LocalStorage
from tests.conftest import postgres_catalog, register_catalog, running_server
from tests.postgres import PostgreSQL
from tests.seaweedfs import free_port

PASSWORD = "Sekret-Catalog-Pw-1234"


def test_unreachable_catalog_is_refused_at_start_in_one_line(tmp_path: Path) -> None:
    uri = f"postgresql+psycopg://lakehouse:{PASSWORD}@127.0.0.1:{free_port()}/catalog"
    started = subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", "serve", "--root", str(tmp_path), "--port", "0"],
        env={**os.environ, "LAKEHOUSE_CATALOG_URI": uri, "LAKEHOUSE_HTTP_PORT": "-1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert started.returncode != 0
    output = started.stdout + started.stderr
    assert "cannot open the catalog: PostgreSQL connection failed" in output, output
    assert PASSWORD not in output and "Traceback" not in output, output


def test_a_uri_that_is_no_url_is_not_echoed(tmp_path: Path) -> None:
    started = subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", "serve", "--root", str(tmp_path), "--port", "0"],
        env={**os.environ, "LAKEHOUSE_CATALOG_URI": f"nonsense {PASSWORD}", "LAKEHOUSE_HTTP_PORT": "-1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = started.stdout + started.stderr
    assert started.returncode != 0 and "the catalog URI is not a SQLAlchemy URL" in output, output
    assert PASSWORD not in output and "Traceback" not in output, output


def test_postgres_driver_errors_map_to_unavailable() -> None:
    import psycopg
    import psycopg.errors

    with pytest.raises(psycopg.OperationalError) as refused:
        psycopg.connect(f"host=127.0.0.1 port={free_port()} user=x password={PASSWORD}", connect_timeout=5)
    assert catalog_fault(refused.value) == "PostgreSQL connection failed"
    assert catalog_fault(psycopg.errors.SerializationFailure("x")) == "PostgreSQL serialization failure"
    assert catalog_fault(psycopg.errors.UniqueViolation("x")) is None  # a bug, not a fault of the moment
    error = to_client_error(refused.value)
    assert isinstance(error, Unavailable)
    assert PASSWORD not in str(error)


def test_catalog_server_gone_is_unavailable(tmp_path: Path) -> None:
    """PostgreSQL stopping under a running server: calls are refused UNAVAILABLE in one line, and neither
    the refusal nor the server's log shows the password."""
    with PostgreSQL() as pg:
        root = str(tmp_path / "lakehouse")
        register_catalog(root, pg.create_database("gone"))
        with running_server(root) as server:
            server.put("kept", pa.table({"x": [1, 2]}))
            pg.stop()
            with pytest.raises(pa.ArrowException) as refused:
                server.action("list_datasets")
            message = str(refused.value)
            assert "PostgreSQL connection failed" in message and "retry later" in message, message
            assert pg.password not in message and "Traceback" not in message, message
            with pytest.raises(pa.ArrowException, match="PostgreSQL connection failed"):
                server.put("kept", pa.table({"x": [3]}))
            assert all(pg.password not in line for line in server.log_lines)


def test_a_lost_commit_is_made_again_on_the_new_base(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Two catalogs (two servers) on one PostgreSQL database, committing without the servers' lock: the
    commit built on a base the other moved is made again on the new one; an append adds its file once, an
    overwrite replaces every file current then."""
    uri = postgres_catalog(request)
    first, second = (DatasetCatalog(LocalStorage(tmp_path / "root"), uri) for _ in range(2))
    schema = pa.schema([("x", pa.int64())])
    data = tmp_path / "root" / "tables" / "t" / "data"
    data.mkdir(parents=True)

    def file(number: int) -> str:
        path = data / f"{number}.parquet"
        pq.write_table(pa.table({"x": [number]}, schema=schema), path)
        return str(path)

    first.create_with_files("t", schema, [file(1)])

    def stale_then_fresh(files: list[str], replace: bool) -> None:
        stale = first.load("t")
        second.add_files(second.load("t"), schema, [file(len(files) * 10 + 2)], replace=False, evolve=False)
        tries: list[int] = []

        def attempt() -> int | None:
            tries.append(1)
            table = stale if len(tries) == 1 else first.load("t")
            return first.add_files(table, schema, files, replace=replace, evolve=False)

        retry_conflicts("t", attempt, first.retried)
        assert len(tries) == 2

    stale_then_fresh([file(3)], replace=False)
    assert first.commit_retries == 1
    assert sorted(Path(f).name for f in first.snapshot_files(first.metadata_locations()["t"]).files) == [
        "1.parquet",
        "12.parquet",
        "3.parquet",
    ]
    stale_then_fresh([file(4), file(5)], replace=True)  # second appends 22 first: replaced too
    assert first.commit_retries == 2
    assert sorted(Path(f).name for f in first.snapshot_files(first.metadata_locations()["t"]).files) == [
        "4.parquet",
        "5.parquet",
    ]
