"""Other engines reading the server's tables, as a user on another machine would: run by
``tests/test_engines.py`` with the Python of the engines' own virtual environment (Daft needs a pyarrow
older than the server's), never imported by the server's tests.

Usage: ``python tests/engines_runner.py SPEC.json``. The spec (JSON) says where the server's catalogs are
and what to read; every read is written to ``spec["out"]`` as an Arrow IPC file named
``<engine>-<route>-<dataset>.arrow``, and the names are printed as one JSON line at the end:

- ``rest``: pyiceberg ``RestCatalog`` properties (``uri`` of the server's ``/iceberg`` and ``token``);
  ``sql_catalog``: the SQL catalog's ``uri`` and ``warehouse``; both as the README gives them;
  ``storage``: the client's own storage properties (``s3.endpoint``, ``s3.access-key-id``, ...), added to
  both.
- ``tables``: Iceberg datasets, each read through both catalogs with pyiceberg and ``daft.read_iceberg``
  (and ``ray.data.read_iceberg`` through the REST catalog when ``ray`` is among ``engines``).
- ``lance``: dataset -> the location ``describe_dataset`` gives, read with ``daft.read_lance`` (and
  ``ray.data.read_lance``).
- ``queries``: name -> a Daft SQL query over the REST catalog attached to a Daft session as ``lakehouse``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa


def write(out: Path, name: str, table: pa.Table, written: list[str]) -> None:
    """One result as an Arrow IPC file (large string types made plain, as the server answers)."""
    with pa.OSFile(str(out / f"{name}.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    written.append(name)


def daft_io_config(storage: dict[str, str]) -> Any:
    """Daft's IOConfig for the client's storage properties (None for a local root)."""
    from daft.io import IOConfig, S3Config

    if "s3.endpoint" not in storage:
        return None
    endpoint = storage["s3.endpoint"]
    return IOConfig(
        s3=S3Config(
            endpoint_url=endpoint,
            region_name=storage.get("s3.region", "us-east-1"),
            key_id=storage.get("s3.access-key-id"),
            access_key=storage.get("s3.secret-access-key"),
            use_ssl=not endpoint.startswith("http://"),
        )
    )


def main(spec_path: str) -> None:
    from pyiceberg.catalog.rest import RestCatalog
    from pyiceberg.catalog.sql import SqlCatalog

    spec = json.loads(Path(spec_path).read_text())
    out = Path(spec["out"])
    out.mkdir(parents=True, exist_ok=True)
    engines = set(spec.get("engines", ["pyiceberg", "daft"]))
    storage = spec.get("storage", {})
    written: list[str] = []
    timings: dict[str, float] = {}
    catalogs = {
        "rest": RestCatalog("lakehouse", **spec["rest"], **storage),
        "sql": SqlCatalog("lakehouse", **spec["sql_catalog"], **storage),
    }
    started = time.monotonic()
    for route, catalog in catalogs.items():
        for name in spec["tables"]:
            table = catalog.load_table(("lakehouse", name))
            write(out, f"pyiceberg-{route}-{name}", table.scan().to_arrow(), written)
            if "daft" in engines:
                import daft

                write(out, f"daft-{route}-{name}", daft.read_iceberg(table).to_arrow(), written)
    timings["iceberg"] = time.monotonic() - started

    if "daft" in engines:
        import daft

        started = time.monotonic()
        io_config = daft_io_config(storage)
        for name, location in spec.get("lance", {}).items():
            write(
                out, f"daft-lance-{name}", daft.read_lance(location, io_config=io_config).to_arrow(), written
            )
        session = daft.Session()
        session.attach_catalog(catalogs["rest"], alias="lakehouse")
        for name, query in spec.get("queries", {}).items():
            write(out, f"daft-sql-{name}", session.sql(query).to_arrow(), written)
        timings["daft"] = time.monotonic() - started

    if "ray" in engines:
        import ray
        import ray.data

        started = time.monotonic()
        # one worker and a small object store: a test machine has 2 cores shared with other tests
        ray.init(num_cpus=1, object_store_memory=200 << 20, include_dashboard=False, log_to_driver=False)
        try:
            rest = {"type": "rest", **spec["rest"], **storage}
            for name in spec["tables"]:
                dataset = ray.data.read_iceberg(
                    table_identifier=f"lakehouse.{name}", catalog_kwargs={"name": "lakehouse", **rest}
                )
                write(out, f"ray-rest-{name}", ray_table(dataset), written)
            lance_options = lance_storage_options(storage)
            for name, location in spec.get("lance", {}).items():
                dataset = ray.data.read_lance(location, storage_options=lance_options)
                write(out, f"ray-lance-{name}", ray_table(dataset), written)
        finally:
            ray.shutdown()
        timings["ray"] = time.monotonic() - started
    print(json.dumps({"written": written, "seconds": {k: round(v, 2) for k, v in timings.items()}}))


def ray_table(dataset: Any) -> pa.Table:
    """A Ray dataset collected as one Arrow table."""
    import ray

    return pa.concat_tables(ray.get(dataset.to_arrow_refs()))


def lance_storage_options(storage: dict[str, str]) -> dict[str, str] | None:
    """Lance's object-store options for the client's storage properties (None for a local root)."""
    if "s3.endpoint" not in storage:
        return None
    endpoint = storage["s3.endpoint"]
    return {
        "endpoint": endpoint,
        "region": storage.get("s3.region", "us-east-1"),
        "access_key_id": storage.get("s3.access-key-id", ""),
        "secret_access_key": storage.get("s3.secret-access-key", ""),
        "allow_http": str(endpoint.startswith("http://")).lower(),
    }


if __name__ == "__main__":
    main(sys.argv[1])
