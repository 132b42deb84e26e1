"""What every client command of the CLI shares: the connection flags, ``--json``, and Flight errors as one
``Error:`` line. Imported by :mod:`flight_lakehouse.cli` and the command modules beside it."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable
from typing import Any, TypeVar

import click
import pyarrow as pa
import pyarrow.flight as flight

from flight_lakehouse.client import DEFAULT_SERVER, LakehouseClient
from flight_lakehouse.settings import SettingsError
from flight_lakehouse.tls import client_tls_options

T = TypeVar("T")
Connect = Callable[[], LakehouseClient]  # what a client command gets from its flags (client_options)

server_option = click.option(
    "--server",
    envvar="LAKEHOUSE_SERVER",
    default=DEFAULT_SERVER,
    show_default=True,
    help="Flight location (HOST:PORT, or grpc://, grpc+tls://).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts).")
CONNECTION_OPTIONS = [
    server_option,
    click.option(
        "--tls-ca",
        envvar="LAKEHOUSE_TLS_CA",
        default=None,
        metavar="FILE",
        help="PEM CA certificates to trust for a grpc+tls server (default: the system's).",
    ),
    click.option(
        "--tls-cert",
        envvar="LAKEHOUSE_TLS_CLIENT_CERT",
        default=None,
        metavar="FILE",
        help="Client certificate (PEM), for mTLS.",
    ),
    click.option(
        "--tls-key",
        envvar="LAKEHOUSE_TLS_CLIENT_KEY",
        default=None,
        metavar="FILE",
        help="Key of --tls-cert.",
    ),
    click.option(
        "--user",
        envvar="LAKEHOUSE_USER",
        default=None,
        help="Log in as USER (password: LAKEHOUSE_PASSWORD or a prompt); else LAKEHOUSE_TOKEN is sent.",
    ),
]
#: How pyarrow words an error of the transport (not one the server raised): the status, then gRPC's text.
TRANSPORT_ERROR = re.compile(r"Flight returned (\w+) error, with message: (.*)", re.DOTALL)


def client_options(command):  # type: ignore[no-untyped-def]
    """``--server`` with the TLS and credential flags; the command gets ``connect``, which opens the client
    they describe."""

    @functools.wraps(command)
    def run(**params: Any) -> Any:
        flags = [params.pop(name) for name in ("server", "tls_ca", "tls_cert", "tls_key", "user")]
        return command(connect=functools.partial(connect_client, *flags), **params)

    for option in reversed(CONNECTION_OPTIONS):
        run = option(run)
    return run


def connect_client(
    server: str, tls_ca: str | None, tls_cert: str | None, tls_key: str | None, user: str | None
) -> LakehouseClient:
    """A client of ``server`` (``host:port``: TLS when a TLS file is given) with its credentials: ``user``
    logged in once (password from LAKEHOUSE_PASSWORD or a prompt), else LAKEHOUSE_TOKEN if set."""
    tls = bool(tls_ca or tls_cert or tls_key)
    if "://" not in server:
        server = f"{'grpc+tls' if tls else 'grpc'}://{server}"
    if tls and not server.startswith("grpc+tls://"):
        raise click.UsageError(f"--tls-ca/--tls-cert/--tls-key need a grpc+tls:// server, not {server}")
    try:
        options = client_tls_options(tls_ca, tls_cert, tls_key)
    except SettingsError as exc:
        raise click.ClickException(str(exc)) from None
    client: LakehouseClient = call(lambda: LakehouseClient(server, **options), server)
    token = os.environ.get("LAKEHOUSE_TOKEN")
    if user:
        password = os.environ.get("LAKEHOUSE_PASSWORD") or click.prompt(
            f"Password of {user}", hide_input=True, err=True
        )
        call(lambda: client.login(user, password), server)
    elif token:
        client.use_token(token)
    return client


def call(function: Callable[[], T], server: str | None = None) -> T:
    """Run a client call; Flight errors become one-line CLI errors (a server that cannot be reached is
    named when ``server`` is given)."""
    try:
        return function()
    except (flight.FlightError, pa.ArrowException) as exc:
        raise click.ClickException(error_line(exc, server)) from None


def error_line(exc: BaseException, server: str | None = None) -> str:
    """The first line of a Flight error, without gRPC's detail; a transport failure says so."""
    message = (str(exc).split(". Detail:")[0].splitlines() or [type(exc).__name__])[0]
    transport = TRANSPORT_ERROR.match(message)
    if transport is None:
        return message
    status, text = transport.groups()
    if status == "unavailable":
        return f"cannot reach the server{f' at {server}' if server else ''}: {text}"
    return f"{status.replace('_', ' ')}: {text}"
