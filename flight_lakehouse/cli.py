"""The ``flight-lakehouse`` command line: ``serve``, and client commands that talk to a running server."""

from __future__ import annotations

import os

from flight_lakehouse import process

# Arrow picks its allocator, and glibc counts its malloc arenas, when pyarrow loads: before the imports below
process.before_pyarrow()

import logging
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import click
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.flight as flight
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flight_lakehouse.client import DEFAULT_SERVER, LakehouseClient
from flight_lakehouse.settings import SettingsError, load_settings

if TYPE_CHECKING:
    from flight_lakehouse.server import LakehouseServer

server_option = click.option(
    "--server", envvar="LAKEHOUSE_SERVER", default=DEFAULT_SERVER, show_default=True, help="Flight location."
)


def storage_options(command):  # type: ignore[no-untyped-def]
    """The flags that say where the data lives (also read from LAKEHOUSE_* and .env)."""
    command = click.option("--catalog-uri", default=None, help="SQLAlchemy URI of the Iceberg SQL catalog.")(
        command
    )
    return click.option("--root", default=None, help="Data root: a directory or s3://bucket/prefix.")(command)


@click.group()
@click.version_option(package_name="flight-lakehouse")
def main() -> None:
    """flight-lakehouse: a small lakehouse behind one Arrow Flight server."""


@main.command()
@click.option("--host", default=None, help="Address to bind (default 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default 8815; 0 picks a free one).")
@storage_options
@click.option(
    "--create-bucket", is_flag=True, default=None, help="Create the S3 bucket of the root if missing."
)
@click.option("--state-dir", default=None, help="Local state (the catalog) of an S3 root.")
@click.option(
    "--insecure-no-auth", is_flag=True, default=None, help="Allow a non-loopback bind without auth."
)
@click.option("--query-timeout-seconds", type=float, default=None, help="Time limit of one query.")
@click.option("--query-memory-mb", type=int, default=None, help="DuckDB memory limit (0: DuckDB's own).")
@click.option(
    "--result-buffer-mb", type=int, default=None, help="Memory for unsent result batches, all queries."
)
@click.option(
    "--vector-cache-mb", type=int, default=None, help="Memory for in-memory vector search (0: Lance only)."
)
@click.option("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR.")
def serve(**options: object) -> None:
    """Run the server until SIGINT/SIGTERM."""
    try:
        settings = load_settings(**options)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for chatty in ("botocore", "boto3", "urllib3", "s3transfer"):  # at DEBUG they log signed request headers
        logging.getLogger(chatty).setLevel(max(logging.INFO, logging.getLogger().level))
    if settings.log_level != "DEBUG":  # "Loaded FileIO" on every table load
        logging.getLogger("pyiceberg.io").setLevel(logging.WARNING)
        logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # which CPU build it tried
    process.tune_process(settings.log_level)
    from flight_lakehouse.server import LakehouseServer  # heavy imports only when serving

    try:
        server = LakehouseServer(settings)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, flight.FlightError, pa.ArrowException) as exc:
        reason = str(exc).split(". Detail:")[0].splitlines()[0]
        raise click.ClickException(f"cannot start on {settings.location} (port in use?): {reason}") from None
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    where = f"grpc://{settings.host}:{server.port}"
    logging.getLogger("flight_lakehouse").info("ready at %s, root %s", where, settings.root)
    while not stop.wait(0.5):
        pass
    _shutdown(server, settings.shutdown_grace_seconds)


def _shutdown(server: LakehouseServer, grace_seconds: float) -> None:
    """Stop taking calls, let running ones finish within the grace period, then exit 0."""
    log = logging.getLogger("flight_lakehouse")
    log.info("shutting down (waiting up to %g s for running calls)", grace_seconds)
    done = threading.Thread(target=server.shutdown, daemon=True)
    done.start()
    done.join(grace_seconds)
    if done.is_alive():
        server.engine.stop_all()  # what still runs gets its error instead of a cut connection
        done.join(min(grace_seconds, 1.0))
    if done.is_alive():
        log.warning("running calls did not finish in %g s; exiting anyway", grace_seconds)
    server.storage.leases.flush()  # files of dropped tables kept for the queries just ended
    server.engine.close()
    logging.shutdown()
    os._exit(0)


@main.command()
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--dataset", required=True, help="Target dataset name.")
@click.option(
    "--mode", type=click.Choice(["append", "create", "overwrite"]), default="append", show_default=True
)
@click.option("--schema-mode", type=click.Choice(["strict", "evolve"]), default="strict", show_default=True)
@click.option("--batch-rows", type=int, default=65_536, show_default=True)
@server_option
def ingest(file: Path, dataset: str, mode: str, schema_mode: str, batch_rows: int, server: str) -> None:
    """Stream a CSV or Parquet FILE into DATASET through DoPut."""
    schema, batches = _read_file(file, batch_rows)
    client = LakehouseClient(server)
    columns = (
        TextColumn("{task.description}"),
        TextColumn("{task.fields[rows]:,} rows"),
        TextColumn("{task.fields[rate]:.1f} MB/s"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task(f"ingest {file.name}", rows=0, rate=0.0)
        started, sent = time.monotonic(), [0, 0]

        def counted() -> Iterator[pa.RecordBatch]:
            for batch in batches:
                yield batch
                sent[0] += batch.num_rows
                sent[1] += batch.nbytes
                elapsed = max(time.monotonic() - started, 1e-6)
                progress.update(task, rows=sent[0], rate=sent[1] / elapsed / 1e6)

        result = _call(lambda: client.ingest(dataset, schema, counted(), mode=mode, schema_mode=schema_mode))
    click.echo(
        f"{result['rows_written']} rows into {result['dataset']} "
        f"(snapshot {result['snapshot_id']}, {time.monotonic() - started:.1f} s)"
    )


def _read_file(file: Path, batch_rows: int) -> tuple[pa.Schema, Iterator[pa.RecordBatch]]:
    """A schema and a lazy batch iterator for a CSV or Parquet file."""
    if file.suffix.lower() in (".parquet", ".pq"):
        parquet = pq.ParquetFile(file)
        return parquet.schema_arrow, parquet.iter_batches(batch_size=batch_rows)
    if file.suffix.lower() in (".csv", ".tsv", ".txt"):
        delimiter = "\t" if file.suffix.lower() == ".tsv" else ","
        reader = pacsv.open_csv(
            file,
            read_options=pacsv.ReadOptions(block_size=16 << 20),
            parse_options=pacsv.ParseOptions(delimiter=delimiter),
        )
        return reader.schema, rechunk(reader, batch_rows)
    raise click.BadParameter(f"{file.name}: expected a .csv or .parquet file", param_hint="FILE")


def rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Slice batches to at most ``rows`` rows each (zero-copy)."""
    for batch in batches:
        for offset in range(0, batch.num_rows, rows):
            yield batch.slice(offset, rows)


@main.command()
@click.argument("sql")
@click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "parquet"]), default="table", show_default=True
)
@click.option(
    "--output", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE."
)
@click.option("--max-rows", type=int, default=100, show_default=True, help="Rows shown by --format table.")
@server_option
def query(sql: str, fmt: str, output: Path | None, max_rows: int, server: str) -> None:
    """Run SQL on the server and print or save the streamed result."""
    if fmt == "parquet" and output is None:
        raise click.BadParameter("--format parquet needs --output FILE", param_hint="--output")
    client = LakehouseClient(server)
    reader = _call(lambda: client.query(sql))
    rows = _call(lambda: _write_result(reader, fmt, output, max_rows))
    if output is not None:
        click.echo(f"{rows} rows written to {output}", err=True)


def _write_result(reader: flight.FlightStreamReader, fmt: str, output: Path | None, max_rows: int) -> int:
    if fmt == "table":
        return _print_table(reader, max_rows)
    sink = pa.OSFile(str(output), "wb") if output else pa.PythonFile(sys.stdout.buffer, mode="w")
    writer = (
        pq.ParquetWriter(sink, reader.schema, compression="zstd")
        if fmt == "parquet"
        else pacsv.CSVWriter(sink, reader.schema)
    )
    rows = 0
    with writer:
        for chunk in reader:
            writer.write_batch(chunk.data)
            rows += chunk.data.num_rows
    sink.flush()
    return rows


def _print_table(reader: flight.FlightStreamReader, max_rows: int) -> int:
    table = Table(*reader.schema.names)
    rows = 0
    for chunk in reader:
        for row in chunk.data.slice(0, max_rows - rows).to_pylist():
            table.add_row(*("NULL" if v is None else str(v) for v in row.values()))
        rows += min(chunk.data.num_rows, max_rows - rows)
        if rows >= max_rows:
            reader.cancel()  # the server stops the query; no need to read what is not shown
            break
    Console().print(table)
    if rows >= max_rows:
        click.echo(f"(first {max_rows} rows shown)", err=True)
    return rows


def open_catalog(**options: object):  # type: ignore[no-untyped-def]
    """The catalog of the configured root, opened directly on storage (no server)."""
    from flight_lakehouse.catalog import DatasetCatalog
    from flight_lakehouse.storage import open_storage

    try:
        settings = load_settings(**options)
        return DatasetCatalog(open_storage(settings), settings.catalog_uri)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None


@main.group()
def catalog() -> None:
    """Maintain the Iceberg catalog."""


@catalog.command()
@storage_options
def rebuild(**options: object) -> None:
    """Re-register every table from the newest Iceberg metadata found under the root."""
    from flight_lakehouse.maintenance import rebuild_catalog

    changed = rebuild_catalog(open_catalog(**options))
    for name, location in changed.items():
        click.echo(f"registered {name} -> {location}")
    click.echo(f"{len(changed)} table(s) registered")


@main.command()
@storage_options
@click.option("--dry-run/--apply", default=True, help="List only (default), or delete.")
@click.option("--older-than-seconds", type=float, default=3600.0, show_default=True, help="Grace period.")
def gc(dry_run: bool, older_than_seconds: float, **options: object) -> None:
    """List or delete files under the root that no snapshot or Lance version references (older than the
    grace period)."""
    from flight_lakehouse.maintenance import collect_garbage

    found = collect_garbage(open_catalog(**options), older_than_seconds, apply=not dry_run)
    for item in found:
        kind = ", unfinished upload" if item.upload_id else ""
        click.echo(f"{'would delete' if dry_run else 'deleted'} {item.uri} ({item.size} bytes{kind})")
    total = sum(item.size for item in found)
    click.echo(f"{len(found)} file(s), {total} bytes {'reclaimable' if dry_run else 'reclaimed'}")


@main.command()
@server_option
def datasets(server: str) -> None:
    """List the datasets on the server."""
    rows = _call(lambda: LakehouseClient(server).action("list_datasets"))
    table = Table("name", "format", "rows", "bytes", "updated_at")
    for row in rows:
        table.add_row(row["name"], row["format"], f"{row['rows']:,}", f"{row['bytes']:,}", row["updated_at"])
    Console().print(table)


def _call(function):  # type: ignore[no-untyped-def]
    """Run a client call; Flight errors become one-line CLI errors."""
    try:
        return function()
    except (flight.FlightError, pa.ArrowException) as exc:
        raise click.ClickException(str(exc).split(". Detail:")[0].splitlines()[0]) from None
