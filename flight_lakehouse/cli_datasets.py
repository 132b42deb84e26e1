"""The CLI's everyday dataset commands: ``datasets``, ``describe``, ``history``, ``drop``, ``search``,
``index create/list``, ``delete`` and ``optimize``. Each is one Flight action (or the DoGet search ticket)
on a running server; human tables by default, ``--json`` for scripts."""

from __future__ import annotations

import base64
import binascii
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import orjson
import pyarrow as pa

from flight_lakehouse.cli_options import Connect, call, client_options, json_option
from flight_lakehouse.client import LakehouseClient
from flight_lakehouse.terminal import (
    FORMATS,
    Rows,
    check_format,
    print_facts,
    print_json,
    print_records,
    print_table,
    show_rows,
)

METRICS = click.Choice(["cosine", "l2", "dot"])
INDEX_KINDS = click.Choice(["ivf_pq", "ivf_hnsw_sq", "fts", "btree", "bitmap"])
#: What ``describe`` shows in their own tables rather than among the facts.
DESCRIBE_TABLES = ("schema", "columns", "indexes")
INDEX_POLL_SECONDS = 0.5

yes_option = click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
vertical_option = click.option("--vertical", is_flag=True, help="One field per line.")
output_option = click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE."
)


def action(client: LakehouseClient, name: str, body: dict[str, Any]) -> Any:
    """The JSON answer of one action; a refusal is one ``Error:`` line."""
    return call(lambda: client.action(name, body), client.location)


def confirm(what: str, yes: bool) -> None:
    """Ask whether to ``what`` on a terminal unless ``yes``; without a terminal, refuse (nothing is done)."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise click.ClickException(f"not confirmed: {what}? (stdin is not a terminal: pass --yes)")
    click.confirm(f"{what[0].upper()}{what[1:]}?", abort=True, err=True)


def show(answer: Any, as_json: bool, human: Callable[[Any], None]) -> None:
    """A command's answer: as JSON with ``--json``, else as ``human`` prints it."""
    if as_json:
        print_json(answer)
    else:
        human(answer)


@click.command()
@json_option
@client_options
def datasets(as_json: bool, connect: Connect) -> None:
    """List the datasets on the server."""
    show(action(connect(), "list_datasets", {}), as_json, print_datasets)


def print_datasets(rows: list[dict[str, Any]]) -> None:
    """The datasets as a table."""
    header = ["name", "format", "rows", "bytes", "updated_at"]
    cells = [[r["name"], r["format"], f"{r['rows']:,}", f"{r['bytes']:,}", r["updated_at"]] for r in rows]
    print_table(header, cells)


@click.command()
@click.argument("name")
@json_option
@client_options
def describe(name: str, as_json: bool, connect: Connect) -> None:
    """Facts, schema and indexes of dataset NAME."""
    show(
        action(connect(), "describe_dataset", {"dataset": name}),
        as_json,
        lambda facts: print_dataset(name, facts),
    )


def print_dataset(name: str, facts: dict[str, Any]) -> None:
    """What ``describe_dataset`` says: facts, then schema and indexes as tables."""
    print_facts({k: v for k, v in facts.items() if k not in DESCRIBE_TABLES}, title=f"dataset {name}")
    print_table(["column", "type", "nullable"], schema_rows(facts), title="schema")
    print_indexes(name, facts.get("indexes", []))


def schema_rows(facts: dict[str, Any]) -> list[list[str]]:
    """Column, type and nullability of each field of ``describe_dataset``'s schema (base64 Arrow IPC);
    the plain ``columns`` list when the schema cannot be read."""
    try:
        schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(facts["schema"], validate=True)))
    except (KeyError, TypeError, binascii.Error, pa.ArrowException):
        return [[column["name"], column["type"], ""] for column in facts.get("columns", [])]
    return [[field.name, str(field.type), "yes" if field.nullable else "no"] for field in schema]


def print_indexes(name: str, indexes: list[dict[str, Any]]) -> None:
    """The indexes of a dataset as a table."""
    if indexes:
        print_records(indexes, title="indexes")
    else:
        click.echo(f"no indexes on {name}")


@click.command()
@click.argument("name")
@json_option
@client_options
def history(name: str, as_json: bool, connect: Connect) -> None:
    """The snapshots (Iceberg) or versions (Lance) of dataset NAME, newest first."""
    show(action(connect(), "dataset_history", {"dataset": name}), as_json, print_records)


@click.command()
@click.argument("name")
@click.option("--if-exists", is_flag=True, help="No error when NAME does not exist.")
@yes_option
@json_option
@client_options
def drop(name: str, if_exists: bool, yes: bool, as_json: bool, connect: Connect) -> None:
    """Drop dataset NAME and delete its files (asks first unless --yes)."""
    confirm(f"drop dataset {name} and delete its files", yes)
    answer = action(connect(), "drop_dataset", {"dataset": name, "if_exists": if_exists})
    show(
        answer,
        as_json,
        lambda dropped: click.echo(
            f"dropped {name}" if dropped["dropped"] else f"{name} does not exist; nothing dropped"
        ),
    )


@click.command()
@click.argument("name")
@click.option("--vector", "vector_json", metavar="JSON", help="Query vector as a JSON list: '[0.1, 0.2]'.")
@click.option(
    "--vector-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Query vector from a .json list, a .npy array, or a text file of one number per line.",
)
@click.option("--text", help="Full-text query (with a vector: hybrid search).")
@click.option("--query", help="Free text the server embeds into the query vector (semantic search).")
@click.option("-k", type=click.IntRange(1), default=10, show_default=True, help="How many rows.")
@click.option("--metric", type=METRICS, help="Distance (default: the table's).")
@click.option("--filter", "where", metavar="PREDICATE", help="SQL predicate the rows must match.")
@click.option("--columns", multiple=True, help="Columns to return (comma-separated or repeated).")
@click.option("--column", "vector_column", help="The vector column, when the table has several.")
@click.option("--nprobes", type=click.IntRange(1), help="IVF partitions to probe.")
@click.option("--refine-factor", type=click.IntRange(1), help="Re-rank k * N candidates exactly.")
@click.option("--ef", type=click.IntRange(1), help="HNSW search breadth.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@output_option
@vertical_option
@json_option
@client_options
def search(
    name: str,
    vector_json: str | None,
    vector_file: Path | None,
    fmt: str,
    output: Path | None,
    vertical: bool,
    as_json: bool,
    connect: Connect,
    **options: Any,
) -> None:
    """The nearest rows of dataset NAME to a query vector (--vector, --vector-file, or --query: text the
    server embeds), the best full-text matches (--text), or both fused (hybrid); with _distance (vector)
    or _score (text, hybrid)."""
    fmt = "json" if as_json else fmt
    check_format(fmt, output)
    request = search_request(name, query_vector(vector_json, vector_file), **options)
    client = connect()
    reader = call(lambda: client.search(request), client.location)
    rows = call(lambda: show_rows(Rows.of(reader), fmt, output, request["k"], vertical), client.location)
    if output is not None:
        click.echo(f"{rows} rows written to {output}", err=True)


def search_request(
    name: str, vector: list[float] | None, columns: tuple[str, ...], **options: Any
) -> dict[str, Any]:
    """The ``vector_search`` body of the search flags (those not given left out)."""
    if vector is None and options["text"] is None and options["query"] is None:
        raise click.ClickException(
            "give a query: --vector, --vector-file or --query (nearest rows), --text (full text), or both"
        )
    options["filter"] = options.pop("where")
    options["column"] = options.pop("vector_column")
    picked = [column.strip() for value in columns for column in value.split(",") if column.strip()]
    request = {"dataset": name, "vector": vector, "columns": picked or None, **options}
    return {key: value for key, value in request.items() if value is not None}


def query_vector(vector_json: str | None, vector_file: Path | None) -> list[float] | None:
    """The query vector of ``--vector`` or ``--vector-file``, if either is given (not both)."""
    if vector_json is not None and vector_file is not None:
        raise click.ClickException("--vector and --vector-file exclude each other")
    if vector_json is not None:
        return vector_of(json_value(vector_json, "--vector"), "--vector")
    if vector_file is not None:
        return read_vector_file(vector_file)
    return None


def read_vector_file(path: Path) -> list[float]:
    """A query vector from a ``.json`` list, a ``.npy`` array (one row) or text with one number per line."""
    where = f"--vector-file {path}"
    try:
        if path.suffix.lower() == ".npy":
            array = np.load(path, allow_pickle=False)
            if array.ndim == 2 and array.shape[0] == 1:
                array = array[0]
            if array.ndim != 1 or not np.issubdtype(array.dtype, np.number):
                raise click.ClickException(f"{where}: expected one vector of numbers, got {array.shape}")
            return vector_of(array.astype(np.float64).tolist(), where)
        text = path.read_text()
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{where}: cannot read it: {exc}") from None
    if path.suffix.lower() == ".json":
        return vector_of(json_value(text, where), where)
    try:
        return [float(line) for line in text.split()]
    except ValueError as exc:
        raise click.ClickException(f"{where}: expected one number per line: {exc}") from None


def json_value(text: str, where: str) -> Any:
    """Parsed JSON, or one line naming ``where``."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise click.ClickException(f"{where}: not valid JSON: {exc}") from None


def vector_of(value: Any, where: str) -> list[float]:
    """``value`` if it is a non-empty list of numbers."""
    numbers = isinstance(value, list) and all(
        isinstance(item, int | float) and not isinstance(item, bool) for item in value
    )
    if not numbers or not value:
        raise click.ClickException(f"{where}: expected a non-empty JSON list of numbers like [0.1, 0.2]")
    return [float(item) for item in value]


@click.group()
def index() -> None:
    """Build and list the indexes of a vector (Lance) dataset."""


@index.command("create")
@click.argument("name")
@click.option("--column", required=True, help="The column to index.")
@click.option("--kind", type=INDEX_KINDS, required=True, help="Vector (ivf_*), full-text or scalar index.")
@click.option("--metric", type=METRICS, help="Distance of a vector index (default: the table's).")
@click.option("--num-partitions", type=click.IntRange(1), help="IVF partitions.")
@click.option("--num-sub-vectors", type=click.IntRange(1), help="PQ sub-vectors (divides the dimension).")
@click.option("--m", type=click.IntRange(2), help="HNSW edges per node.")
@click.option("--ef-construction", type=click.IntRange(1), help="HNSW build breadth.")
@click.option("--replace", is_flag=True, help="Rebuild an existing index on the column.")
@click.option("--wait", is_flag=True, help="Wait until a build in the background is ready (or failed).")
@click.option("--timeout", type=float, default=3600.0, show_default=True, help="Longest --wait, seconds.")
@json_option
@client_options
def index_create(
    name: str, wait: bool, timeout: float, as_json: bool, connect: Connect, **options: Any
) -> None:
    """Build an index on a column of dataset NAME; large builds continue in the background."""
    client = connect()
    request = {
        "dataset": name,
        **{key: value for key, value in options.items() if value not in (None, False)},
    }
    answer = action(client, "create_index", request)
    if wait and answer.get("state") == "building":
        answer = {**answer, **wait_for_index(client, name, answer, timeout)}
    show(answer, as_json, lambda built: print_index_state(name, built))


def print_index_state(name: str, answer: dict[str, Any]) -> None:
    """One line: the index, its column and kind, and its state."""
    line = f"index {answer['index']} on {name}.{answer['column']} ({answer['kind']}): {answer['state']}"
    click.echo(line if answer["state"] == "ready" else f"{line}; `index list {name}` shows its progress")


def wait_for_index(client: LakehouseClient, name: str, answer: dict[str, Any], timeout: float) -> dict:
    """Poll ``describe_dataset`` until no build on the index's column runs; its entry then, or one line
    when the build failed, the index vanished or ``timeout`` passed."""
    click.echo(f"waiting for index {answer['index']} on {name}.{answer['column']} ...", err=True)
    deadline = time.monotonic() + timeout
    while True:
        indexes = action(client, "describe_dataset", {"dataset": name}).get("indexes", [])
        entries = [entry for entry in indexes if entry.get("column") == answer["column"]]
        failed = next((entry for entry in entries if entry.get("state") == "failed"), None)
        if failed is not None:
            raise click.ClickException(f"index {answer['index']} failed: {failed.get('error', 'no reason')}")
        if not entries:
            raise click.ClickException(f"index {answer['index']} on {name}.{answer['column']} is gone")
        if all(entry.get("state") == "ready" for entry in entries):
            return entries[0]
        if time.monotonic() > deadline:
            raise click.ClickException(f"index {answer['index']} still building after {timeout:g} s")
        time.sleep(INDEX_POLL_SECONDS)


@index.command("list")
@click.argument("name")
@json_option
@client_options
def index_list(name: str, as_json: bool, connect: Connect) -> None:
    """The indexes of dataset NAME with their state (builds in progress and failed ones too)."""
    indexes = action(connect(), "describe_dataset", {"dataset": name}).get("indexes", [])
    show(indexes, as_json, lambda entries: print_indexes(name, entries))


@click.command()
@click.argument("name")
@click.option("--where", required=True, metavar="PREDICATE", help="SQL predicate of the rows to delete.")
@yes_option
@json_option
@client_options
def delete(name: str, where: str, yes: bool, as_json: bool, connect: Connect) -> None:
    """Delete the rows of vector (Lance) dataset NAME that match --where (asks first unless --yes)."""
    confirm(f"delete the rows of {name} where {where}", yes)
    answer = action(connect(), "delete_rows", {"dataset": name, "where": where})
    show(
        answer,
        as_json,
        lambda done: click.echo(
            f"{done['rows_deleted']} rows deleted from {name} (version {done.get('version')})"
        ),
    )


@click.command()
@click.argument("name")
@click.option(
    "--older-than-seconds",
    type=click.FloatRange(0),
    default=None,
    help="Remove versions older than this (default: the server's, 7 days).",
)
@json_option
@client_options
def optimize(name: str, older_than_seconds: float | None, as_json: bool, connect: Connect) -> None:
    """Compact vector (Lance) dataset NAME, update its indexes and remove its old versions; expire the old
    snapshots of a Parquet dataset."""
    body: dict[str, Any] = {"dataset": name}
    if older_than_seconds is not None:
        body["older_than_seconds"] = older_than_seconds
    show(
        action(connect(), "optimize", body),
        as_json,
        lambda facts: print_facts(facts, title=f"optimized {name}"),
    )


#: What :mod:`flight_lakehouse.cli` adds to its command group.
COMMANDS: tuple[click.Command, ...] = (datasets, describe, history, drop, search, index, delete, optimize)
