"""The ``flight-lakehouse`` command line: ``serve``, and client commands that talk to a running server."""

from __future__ import annotations

import os

from flight_lakehouse import process

# Arrow picks its allocator, and glibc counts its malloc arenas, when pyarrow loads: before the imports below
process.before_pyarrow()

import contextlib
import json
import logging
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import click
import pyarrow as pa
import pyarrow.flight as flight
from rich.console import Console
from rich.progress import Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from flight_lakehouse.auth import AuthFile, AuthFileError, Role, check_grants, check_name, check_password
from flight_lakehouse.cli_datasets import COMMANDS as DATASET_COMMANDS
from flight_lakehouse.cli_options import Connect, client_options, json_option
from flight_lakehouse.cli_options import call as _call
from flight_lakehouse.errors import CATALOG_ERRORS, catalog_problem
from flight_lakehouse.local_files import LocalFileError, ReadOptions, open_upload
from flight_lakehouse.settings import SettingsError, load_settings
from flight_lakehouse.terminal import FORMATS, Rows, check_format, show_rows
from flight_lakehouse.tls import warn_if_clear_text

if TYPE_CHECKING:
    from flight_lakehouse.http_port import HttpPort
    from flight_lakehouse.server import LakehouseServer
    from flight_lakehouse.settings import Settings


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
@click.option(
    "--http-port",
    type=int,
    default=None,
    help="HTTP port: probes, metrics, Arrow over HTTP (default 8816; 0 picks a free one; -1: none).",
)
@storage_options
@click.option(
    "--create-bucket", is_flag=True, default=None, help="Create the S3 bucket of the root if missing."
)
@click.option("--state-dir", default=None, help="Local state (the catalog) of an S3 root.")
@click.option(
    "--insecure-no-auth", is_flag=True, default=None, help="Allow a non-loopback bind without auth."
)
@click.option("--auth-file", default=None, help="Users and API tokens (see `users`): turns auth on.")
@click.option("--tls-cert", default=None, metavar="FILE", help="PEM certificate chain: serve grpc+tls.")
@click.option("--tls-key", default=None, metavar="FILE", help="PEM private key of --tls-cert.")
@click.option(
    "--tls-client-ca", default=None, metavar="FILE", help="PEM CA: require client certificates (mTLS)."
)
@click.option("--audit-log", default=None, metavar="FILE", help="JSON line per call to FILE ('-': stderr).")
@click.option("--query-timeout-seconds", type=float, default=None, help="Time limit of one query.")
@click.option("--query-memory-mb", type=int, default=None, help="DuckDB memory limit (0: DuckDB's own).")
@click.option(
    "--result-buffer-mb", type=int, default=None, help="Memory for unsent result batches, all queries."
)
@click.option(
    "--vector-cache-mb", type=int, default=None, help="Memory for in-memory vector search (0: Lance only)."
)
@click.option(
    "--embedder",
    default=None,
    metavar="SPEC",
    help="What embeds text: builtin, onnx:DIR, openai:URL or none (default builtin with the embed extra).",
)
@click.option("--embedder-model", default=None, help="The model an openai:URL embedder runs.")
@click.option(
    "--advertise",
    default=None,
    metavar="LOCATION",
    help="Location clients reach this server at, named in other servers' endpoints (default: the bind).",
)
@click.option(
    "--peers",
    default=None,
    metavar="LOC,LOC",
    help="The other servers of the root (default: found in the catalog database by heartbeats).",
)
@click.option(
    "--heartbeat-seconds", type=float, default=None, help="Heartbeat to the catalog database (0: none)."
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
    warn_if_clear_text(settings)
    from flight_lakehouse.server import LakehouseServer  # heavy imports only when serving

    try:
        server = LakehouseServer(settings)
    except SettingsError as exc:
        _refuse(str(exc))
    except CATALOG_ERRORS as exc:
        _refuse(f"cannot open the catalog: {catalog_problem(exc)}")
    except (OSError, flight.FlightError, pa.ArrowException) as exc:
        reason = str(exc).split(". Detail:")[0].splitlines()[0]
        hint = "port in use, or a certificate gRPC cannot load?" if settings.tls_cert else "port in use?"
        _refuse(f"cannot start on {settings.location} ({hint}): {reason}")
    http = _start_http(server, settings)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    where = f"{settings.scheme}://{settings.host}:{server.port}"
    if http is not None:  # after the Flight address: scripts read "ready at grpc://HOST:PORT"
        where += f", http {http.url}"
    logging.getLogger("flight_lakehouse").info("ready at %s, root %s", where, settings.root)
    while not stop.wait(0.5):
        pass
    if http is not None:
        http.unready()  # /readyz answers 503 while both ports still take calls, then both drain
        time.sleep(settings.shutdown_unready_seconds)
    _shutdown(server, settings.shutdown_grace_seconds, http)


def _refuse(message: str) -> NoReturn:
    """Refuse to start with one line, as click prints an error, and leave at once (``os._exit``): DuckDB 2's
    bindings (nanobind) print a report of leaked objects when the interpreter exits normally."""
    click.echo(f"Error: {message}", err=True)
    sys.stderr.flush()
    os._exit(1)


def _start_http(server: LakehouseServer, settings: Settings) -> HttpPort | None:
    """The HTTP port, started (None when ``http_port`` is -1); a port it cannot bind stops the server."""
    if settings.http_port < 0:
        return None
    from flight_lakehouse.http_port import HttpPort

    try:
        return HttpPort(server).start()
    except OSError as exc:
        server.shutdown()
        reason = exc.strerror or str(exc).splitlines()[0]
        _refuse(
            f"cannot start the HTTP port on {settings.host}:{settings.http_port} (port in use? "
            f"--http-port -1 turns it off): {reason}"
        )


def _shutdown(server: LakehouseServer, grace_seconds: float, http: HttpPort | None = None) -> None:
    """Stop taking calls (on both ports), let running ones finish within the grace period, then exit 0."""
    log = logging.getLogger("flight_lakehouse")
    log.info("shutting down (waiting up to %g s for running calls)", grace_seconds)
    stops = [server.shutdown, *([http.stop] if http is not None else [])]
    threads = [threading.Thread(target=stop, daemon=True) for stop in stops]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + grace_seconds
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        server.engine.stop_all()  # what still runs gets its error instead of a cut connection
        for thread in threads:
            thread.join(min(grace_seconds, 1.0))
    if any(thread.is_alive() for thread in threads):
        log.warning("running calls did not finish in %g s; exiting anyway", grace_seconds)
    server.storage.leases.flush()  # files of dropped tables kept for the queries just ended
    server.engine.close()
    logging.shutdown()
    os._exit(0)


@main.command()
@click.argument("file", metavar="PATH")
@click.option("--dataset", required=True, help="Target dataset name.")
@click.option(
    "--mode", type=click.Choice(["append", "create", "overwrite"]), default="append", show_default=True
)
@click.option("--schema-mode", type=click.Choice(["strict", "evolve"]), default="strict", show_default=True)
@click.option("--batch-rows", type=int, default=65_536, show_default=True)
@click.option(
    "--delimiter", default=None, help="CSV field separator: one character or \\t (default , or for .tsv tab)."
)
@click.option(
    "--null-values",
    default=None,
    metavar="A,B,...",
    help="CSV: strings read as null in every column, string columns too (and empty fields), e.g. NA,NULL.",
)
@click.option(
    "--types",
    default=None,
    metavar="COL=TYPE,...",
    help="Column types (Arrow names), e.g. id=int64,day=date32,at=timestamp[us],price=decimal128(10,2).",
)
@click.option(
    "--header/--no-header",
    default=None,
    help="CSV: whether the first line names the columns (default yes; without: column_1, column_2, ...).",
)
@click.option(
    "--column-names",
    default=None,
    metavar="A,B,...",
    help="CSV: column names (replace the header line, if any).",
)
@click.option(
    "--embed",
    default=None,
    metavar="TEXT:VECTOR",
    help="Embed text column TEXT into a new vector column VECTOR with the server's model (e.g. body:vec).",
)
@client_options
def ingest(
    file: str,
    dataset: str,
    mode: str,
    schema_mode: str,
    batch_rows: int,
    delimiter: str | None,
    null_values: str | None,
    types: str | None,
    header: bool | None,
    column_names: str | None,
    embed: str | None,
    connect: Connect,
) -> None:
    """Stream PATH into DATASET through one DoPut: a file, a directory (its files) or a quoted glob
    ('data/*.csv.gz'), all of one schema. Formats by suffix: .csv, .txt, .tsv, .jsonl, .ndjson (each also
    .gz or .zst), .parquet, .pq, .arrow, .feather, .ipc.

    The upload states its row count (read from Parquet and IPC metadata, or counted in a first pass over the
    other formats), so the server commits only the whole upload. Ctrl-C or SIGTERM ends the process at
    once, which cancels the call: nothing is committed, exit code 130 (143 for SIGTERM)."""
    console = Console(stderr=True)
    columns = (
        TextColumn("{task.description}"),
        TextColumn("{task.fields[rows]:,} rows"),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[rate]:.1f} MB/s"),
        TimeElapsedColumn(),
    )
    progress = Progress(*columns, console=console)
    with _abort_on_signals(progress) as sent_all:
        try:
            flags = {"delimiter": delimiter, "null_values": null_values, "types": types, "header": header}
            options = ReadOptions.from_flags(**flags, column_names=column_names, batch_rows=batch_rows)
            upload = open_upload(file, options)  # checked and counted
        except LocalFileError as exc:
            raise click.ClickException(str(exc)) from None
        schema, rows = upload.schema, upload.rows
        client = connect()
        with progress:
            task = progress.add_task(f"ingest {upload.paths[0].name}", total=rows, rows=0, rate=0.0)
            started, sent = time.monotonic(), [0, 0]

            def show_file(number: int, path: Path) -> None:
                if len(upload.paths) > 1:
                    progress.update(task, description=f"ingest {path.name} ({number}/{len(upload.paths)})")

            def counted() -> Iterator[pa.RecordBatch]:
                try:
                    for batch in upload.batches(show_file):
                        yield batch
                        sent[0] += batch.num_rows
                        sent[1] += batch.nbytes
                        elapsed = max(time.monotonic() - started, 1e-6)
                        progress.update(task, completed=sent[0], rows=sent[0], rate=sent[1] / elapsed / 1e6)
                except Exception as exc:  # reading the file failed: cut the call off (see _abort)
                    _abort(progress, f"Error: {_first_line(exc)}; nothing was committed", 1)
                sent_all.set()  # from here on, an interrupt may come too late

            result = _call(
                lambda: client.ingest(
                    dataset,
                    schema,
                    counted(),
                    expected_rows=rows,
                    mode=mode,
                    schema_mode=schema_mode,
                    embed=_embed_option(embed),
                )
            )
    click.echo(
        f"{result['rows_written']} rows into {result['dataset']} "
        f"(snapshot {result.get('snapshot_id', result.get('version'))}, {time.monotonic() - started:.1f} s)"
    )


def _embed_option(value: str | None) -> dict[str, str] | None:
    """``--embed body:vec`` as the ingest command's ``embed`` object."""
    if value is None:
        return None
    source, _, into = value.partition(":")
    if not source or not into:
        raise click.ClickException(f"--embed {value!r}: give TEXT:VECTOR, e.g. body:vec")
    return {"from": source, "into": into}


@main.command()
@click.argument("dataset")
@click.option("--from", "source", default=None, help="The text column (default: the one embedded before).")
@click.option("--into", default=None, help="The vector column to write (a new one, or the target's).")
@click.option("--target-dataset", default=None, help="Write a new dataset instead of a new column.")
@click.option("--model", default=None, help="Refuse unless the server embeds with this model.")
@client_options
def reembed(
    dataset: str,
    source: str | None,
    into: str | None,
    target_dataset: str | None,
    model: str | None,
    connect: Connect,
) -> None:
    """Embed DATASET's text column again with the server's model, into a new column of DATASET or into a
    new dataset (--target-dataset), in one commit."""
    fields = {"dataset": dataset, "from": source, "into": into, "target_dataset": target_dataset}
    body = {key: value for key, value in {**fields, "model": model}.items() if value is not None}
    client = connect()
    result = _call(lambda: client.action("reembed", body))
    click.echo(
        f"{result['rows']} rows embedded with {result['model']} into {result['dataset']}.{result['into']} "
        f"({result['seconds']:.1f} s)"
    )


@contextmanager
def _abort_on_signals(progress: Progress) -> Iterator[threading.Event]:
    """SIGINT and SIGTERM end the process within the block through :func:`_abort`, at once: from the signal
    handler, or, while the main thread waits in a call that keeps Python handlers from running (a write the
    server is slow to take, the wait for the commit), from a thread woken by the signal (``set_wakeup_fd``).

    Yields an event the block sets once the whole upload is sent; an interrupt after it may come too late to
    stop the commit, and says so."""
    sent_all = threading.Event()

    def stop(signum: int) -> None:
        what = "interrupted" if signum == signal.SIGINT else "terminated"
        if sent_all.is_set():
            message = f"Error: {what} after the whole upload was sent; the server may have committed it"
        else:
            message = f"Error: {what}; nothing was committed"
        _abort(progress, message, 128 + signum)

    def watch(read_fd: int) -> None:
        with contextlib.suppress(OSError):
            while data := os.read(read_fd, 64):
                for signum in data:
                    if signum in STOP_SIGNALS:
                        stop(signum)
        os.close(read_fd)

    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    previous = {  # a signal the process was told to ignore (``nohup``, ``&`` in a script) stays ignored
        signum: signal.signal(signum, lambda signum, _: stop(signum))
        for signum in STOP_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    threading.Thread(target=watch, args=(read_fd,), daemon=True, name="ingest-signals").start()
    try:
        yield sent_all
    finally:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        os.close(write_fd)  # the watcher reads end-of-file and returns


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_aborting = threading.Lock()


def _abort(progress: Progress, message: str, code: int) -> None:
    """Print ``message`` and leave with ``code`` at once (``os._exit``): a process that exits normally closes
    its DoPut writer, which ends the stream as if complete (pyarrow has no cancel for DoPut), while one that
    vanishes cuts the call off, and the server commits nothing. The upload's ``expected_rows`` is the second
    guard: the server refuses a stream with fewer rows too."""
    _aborting.acquire()  # the signal handler and the watcher may both get here: the second waits for the exit
    with contextlib.suppress(Exception):
        if progress.console.is_terminal:
            progress.stop()  # restores the cursor
    sys.stdout.flush()
    sys.stderr.write(message + "\n")
    sys.stderr.flush()
    os._exit(code)


def _first_line(exc: BaseException) -> str:
    """The first line of an error, without gRPC's detail."""
    return (str(exc).split(". Detail:")[0].splitlines() or [type(exc).__name__])[0]


@main.command()
@click.argument("sql")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Write to FILE."
)
@click.option("--max-rows", type=int, default=100, show_default=True, help="Rows shown by --format table.")
@click.option("--vertical", is_flag=True, help="--format table: one field per line.")
@json_option
@client_options
def query(
    sql: str, fmt: str, output: Path | None, max_rows: int, vertical: bool, as_json: bool, connect: Connect
) -> None:
    """Run SQL on the server and print or save the streamed result (``--json``: JSON lines)."""
    fmt = "json" if as_json else fmt
    check_format(fmt, output)
    client = connect()
    reader = _call(lambda: client.query(sql), client.location)
    rows = _call(lambda: show_rows(Rows.of(reader), fmt, output, max_rows, vertical), client.location)
    if output is not None:
        click.echo(f"{rows} rows written to {output}", err=True)


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


# -- users and API tokens: edits of the auth file (no server needed) ------------------------------------

auth_file_option = click.option(
    "--auth-file",
    envvar="LAKEHOUSE_AUTH_FILE",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="The auth file of users and API tokens.",
)
ROLES = click.Choice([role.value for role in Role])
grants_option = click.option(
    "--dataset",
    "datasets",
    multiple=True,
    metavar="PATTERN",
    help="Limit to these datasets: names or patterns like sales_* (repeatable; default all).",
)
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ISO_UTC = "%Y-%m-%dT%H:%M:%SZ"


@contextmanager
def _auth_errors() -> Iterator[None]:
    """Refusals of the auth file become one-line CLI errors."""
    try:
        yield
    except AuthFileError as exc:
        raise click.ClickException(str(exc)) from None


def _read_password() -> str:
    """A new password: the first line of stdin when it is not a terminal, else a prompt typed twice."""
    if sys.stdin.isatty():
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    else:
        password = sys.stdin.readline().removesuffix("\n").removesuffix("\r")
    check_password(password)
    return password


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> float | None:
    """Seconds of a duration such as 30d, 12h, 90m, 3600s; None for ``never``."""
    if value == "never":
        return None
    match = re.fullmatch(r"([1-9][0-9]{0,9})([smhd])", value)
    if not match:
        raise click.BadParameter(f"{value!r}: use a duration like 30d, 12h, 90m, 3600s, or never")
    return int(match[1]) * DURATION_UNITS[match[2]]


def _print_rows(rows: list[dict[str, object]], columns: list[str], as_json: bool) -> None:
    """Rows as JSON, or as a table of ``columns``."""
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = Table()
    for column in columns:  # whole ids and times; the grants wrap
        table.add_column(column, no_wrap=column != "datasets", overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row[column]) for column in columns))
    Console().print(table)


def _cell(value: object) -> str:
    """A table cell: no expiry is ``never``, no dataset grants is ``all``."""
    if value is None:
        return "never"
    if isinstance(value, list):
        return ", ".join(map(str, value)) or "all"
    return str(value)


@main.group()
def users() -> None:
    """Manage the users of an auth file (passwords from stdin or a prompt)."""


@users.command("add")
@click.argument("name")
@click.option("--role", type=ROLES, required=True, help="What the user may do.")
@grants_option
@auth_file_option
def users_add(name: str, role: str, datasets: tuple[str, ...], auth_file: Path) -> None:
    """Add user NAME; creates the auth file if missing."""
    with _auth_errors():
        check_name(name, "user")
        check_grants(datasets)
        AuthFile(auth_file).add_user(name, _read_password(), role, datasets)
    click.echo(f"added user {name} ({role})")


@users.command("remove")
@click.argument("name")
@auth_file_option
def users_remove(name: str, auth_file: Path) -> None:
    """Remove user NAME; its sessions end within seconds."""
    with _auth_errors():
        AuthFile(auth_file).remove_user(name)
    click.echo(f"removed user {name}")


@users.command("list")
@json_option
@auth_file_option
def users_list(as_json: bool, auth_file: Path) -> None:
    """List the users (never their password hashes)."""
    with _auth_errors():
        rows = AuthFile(auth_file).list_users()
    _print_rows(rows, ["name", "role", "datasets", "created_at"], as_json)


@users.command("passwd")
@click.argument("name")
@auth_file_option
def users_passwd(name: str, auth_file: Path) -> None:
    """Set the password of user NAME; its bearer tokens stop working."""
    with _auth_errors():
        store = AuthFile(auth_file)
        store.load().user(name)  # before asking for a password
        store.set_password(name, _read_password())
    click.echo(f"password of {name} changed")


@users.command("update")
@click.argument("name")
@click.option("--role", type=ROLES, help="The new role (ends the user's bearer tokens).")
@grants_option
@click.option("--all-datasets", is_flag=True, help="Remove the dataset limits.")
@auth_file_option
def users_update(
    name: str, role: str | None, datasets: tuple[str, ...], all_datasets: bool, auth_file: Path
) -> None:
    """Change the role and/or the datasets of user NAME."""
    if datasets and all_datasets:
        raise click.UsageError("--dataset and --all-datasets exclude each other")
    if role is None and not datasets and not all_datasets:
        raise click.UsageError("nothing to change: give --role, --dataset or --all-datasets")
    with _auth_errors():
        AuthFile(auth_file).update_user(name, role=role, datasets=() if all_datasets else datasets or None)
    click.echo(f"updated user {name}")


@main.group()
def tokens() -> None:
    """Manage the API tokens of an auth file (sent as bearer tokens)."""


@tokens.command("create")
@click.argument("name")
@click.option("--role", type=ROLES, required=True, help="What the token may do.")
@click.option(
    "--ttl",
    default="90d",
    show_default=True,
    callback=_duration,
    help="Lifetime: 30d, 12h, 90m, 3600s or never.",
)
@grants_option
@auth_file_option
def tokens_create(
    name: str, role: str, ttl: float | None, datasets: tuple[str, ...], auth_file: Path
) -> None:
    """Create API token NAME and print it (alone on stdout; it is shown only this once)."""
    with _auth_errors():
        token = AuthFile(auth_file).create_token(name, role, ttl, datasets)
    click.echo(token)
    until = None if ttl is None else time.gmtime(time.time() + ttl)
    expiry = "never expires" if until is None else time.strftime(f"expires {ISO_UTC}", until)
    click.echo(f"token {name} ({role}, {expiry}): store it now, it is not shown again", err=True)


@tokens.command("list")
@json_option
@auth_file_option
def tokens_list(as_json: bool, auth_file: Path) -> None:
    """List the API tokens (never their secrets)."""
    with _auth_errors():
        rows = AuthFile(auth_file).list_tokens()
    _print_rows(rows, ["id", "name", "role", "datasets", "expires_at", "expired"], as_json)


@tokens.command("revoke")
@click.argument("name_or_id")
@auth_file_option
def tokens_revoke(name_or_id: str, auth_file: Path) -> None:
    """Revoke an API token by name or id; it stops working within seconds."""
    with _auth_errors():
        token_id = AuthFile(auth_file).revoke_token(name_or_id)
    click.echo(f"revoked token {token_id}")


for command in DATASET_COMMANDS:
    main.add_command(command)
