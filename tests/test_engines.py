"""Existing engines on the server's tables, local and on S3: Daft (``read_iceberg`` through the Iceberg REST
catalog and through the SQL catalog, ``read_lance``, a Daft SQL query), Ray Data (``read_iceberg`` through
the REST catalog, ``read_lance``) and pyiceberg (both catalogs) read every dataset the server wrote, with
the settings the README gives, and answer what the server answers.

Daft and Ray need a pyarrow older than the server's, so the reads run in the engines' own virtual environment
(:mod:`tests.engines_venv`, created here when missing) by :mod:`tests.engines_runner`, which writes each
result as an Arrow IPC file compared here with the server's own DoGet answer.
"""

from __future__ import annotations

import datetime
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from flight_lakehouse.auth import AuthFile
from tests import engines_venv
from tests.conftest import is_s3, running_server, s3_root, vector_array

pytestmark = [
    pytest.mark.parametrize("storage_root", ["local", "s3"], indirect=True),
    pytest.mark.timeout(
        900
    ),  # the first run creates the engines' environment (about a minute, more when busy)
]

RUNNER = Path(__file__).with_name("engines_runner.py")
RUNNER_TIMEOUT = 600
EVENTS = pa.table(
    {
        "id": pa.array([3, 1, 2, 4], pa.int64()),
        "city": pa.array(["Austin", "Boston", None, "Austin"]),
        "rate": pa.array([41.5, 52.0, 38.25, 7.0]),
        "seen": pa.array([datetime.date(2024, 1, d) for d in (1, 2, 3, 4)], pa.date32()),
        "at": pa.array([datetime.datetime(2024, 5, 1, 12, m) for m in (0, 1, 2, 3)], pa.timestamp("us")),
        "ok": pa.array([True, False, None, True]),
        "small": pa.array([1, 2, 3, None], pa.int32()),
    }
)
#: Daft SQL over the REST catalog attached as ``lakehouse`` (catalog.namespace.table), and the server's SQL.
BY_CITY = "SELECT city, count(*) AS n, sum(rate) AS total FROM {table} WHERE rate > 10 GROUP BY city"


@pytest.fixture(scope="module")
def engines_python() -> Path:
    """The Python of the engines' environment (created on first use: about a minute, once)."""
    return engines_venv.ensure()


@pytest.fixture
def lakehouse(storage_root: str, tmp_path: Path) -> Iterator[tuple]:
    """A server with authentication holding two Iceberg datasets (one with two snapshots) and a Lance one;
    a reader's API token, which the engines use for the REST catalog."""
    auth = AuthFile(tmp_path / "auth.json")
    auth.add_user("admin", "admin-secret-3", "admin")
    token = auth.create_token("engines", "reader")
    with running_server(storage_root, "--auth-file", str(tmp_path / "auth.json")) as server:
        options = flight.FlightCallOptions(headers=[(b"authorization", f"Bearer {token}".encode())])
        admin = flight.FlightCallOptions(
            headers=[server.client.authenticate_basic_token("admin", "admin-secret-3")]
        )
        vectors = vector_array(np.arange(12, dtype=np.float32).reshape(3, 4))
        for name, table in (
            ("events", EVENTS.slice(0, 3)),
            ("events", EVENTS.slice(3)),
            ("counts", pa.table({"id": pa.array(range(1000), pa.int64()), "v": pa.array(range(1000))})),
            (
                "docs",
                pa.table({"id": pa.array([1, 2, 3], pa.int64()), "vec": vectors, "body": ["a", "b", "c"]}),
            ),
        ):
            writer, reader = server.client.do_put(flight.FlightDescriptor.for_path(name), table.schema, admin)
            with writer:
                writer.write_table(table)
                writer.done_writing()
                reader.read()
        yield server, token, options


def action(server, options: flight.FlightCallOptions, name: str, body: dict) -> object:
    result = next(iter(server.client.do_action(flight.Action(name, json.dumps(body).encode()), options)))
    return json.loads(result.body.to_pybytes())


def sql(server, options: flight.FlightCallOptions, query: str) -> pa.Table:
    return server.client.do_get(flight.Ticket(json.dumps({"sql": query}).encode()), options).read_all()


def catalog_settings(root: str) -> tuple[dict[str, str], dict[str, str]]:
    """The SQL catalog settings the README gives for ``root``, and the client's own storage properties."""
    if not is_s3(root):
        return {"uri": f"sqlite:///{root}/catalog.db", "warehouse": f"file://{root}"}, {}
    entry = s3_root(root)
    storage = {
        "s3.endpoint": entry.s3.endpoint,
        "s3.access-key-id": entry.s3.access_key,
        "s3.secret-access-key": entry.s3.secret_key,
        "s3.region": "us-east-1",
    }
    return {"uri": f"sqlite:///{entry.state_dir}/catalog.db", "warehouse": entry.url}, storage


def rows(table: pa.Table, key: str) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: (row[key] is None, row[key]))


def test_daft_and_pyiceberg_read_every_dataset(
    lakehouse: tuple, storage_root: str, engines_python: Path, tmp_path: Path
) -> None:
    server, token, options = lakehouse
    datasets = action(server, options, "list_datasets", {})
    assert isinstance(datasets, list)
    iceberg = sorted(d["name"] for d in datasets if d["format"] == "parquet")
    lance = sorted(d["name"] for d in datasets if d["format"] == "lance")
    assert iceberg == ["counts", "events"] and lance == ["docs"], datasets
    sql_catalog, storage = catalog_settings(storage_root)
    spec = {
        "out": str(tmp_path / "results"),
        "engines": ["pyiceberg", "daft", "ray"],
        "rest": {"uri": f"{server.http_url}/iceberg", "token": token},
        "sql_catalog": sql_catalog,
        "storage": storage,
        "tables": iceberg,
        "lance": {
            name: action(server, options, "describe_dataset", {"dataset": name})["location"] for name in lance
        },
        "queries": {"by_city": BY_CITY.format(table="lakehouse.lakehouse.events")},
    }
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    run = subprocess.run(
        [str(engines_python), str(RUNNER), str(spec_file)],
        capture_output=True,
        text=True,
        timeout=RUNNER_TIMEOUT,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    written = json.loads(run.stdout.strip().splitlines()[-1])["written"]
    routes = {"pyiceberg": ("rest", "sql"), "daft": ("rest", "sql"), "ray": ("rest",)}
    expected = {
        f"{engine}-{route}-{name}" for engine, ways in routes.items() for route in ways for name in iceberg
    }
    expected |= {f"{engine}-lance-{name}" for engine in ("daft", "ray") for name in lance} | {
        "daft-sql-by_city"
    }
    assert set(written) == expected, written

    def result(name: str) -> pa.Table:
        with pa.memory_map(str(tmp_path / "results" / f"{name}.arrow")) as source:
            return pa.ipc.open_file(source).read_all()

    for name in [*iceberg, *lance]:
        server_rows = rows(sql(server, options, f"SELECT * FROM {name}"), "id")
        for read in [n for n in written if n.endswith(f"-{name}")]:
            table = result(read)
            assert table.column_names == sql(server, options, f"SELECT * FROM {name} LIMIT 0").column_names, (
                read
            )
            assert rows(table, "id") == server_rows, read
    by_city = rows(sql(server, options, BY_CITY.format(table="events")), "city")
    assert rows(result("daft-sql-by_city"), "city") == by_city
    assert by_city == [
        {"city": "Austin", "n": 1, "total": 41.5},
        {"city": "Boston", "n": 1, "total": 52.0},
        {"city": None, "n": 1, "total": 38.25},
    ]
