"""Client-facing errors and their mapping onto Flight/gRPC status codes.

Every refusal the server sends is one of the classes below. Each maps to one gRPC status code:

* :class:`InvalidArgument` -> INVALID_ARGUMENT
* :class:`NotFound` -> NOT_FOUND
* :class:`Unimplemented` -> UNIMPLEMENTED
* :class:`Unavailable` -> UNAVAILABLE
* :class:`TimedOut` -> DEADLINE_EXCEEDED
* :class:`Cancelled` -> CANCELLED
* :class:`Unauthenticated` -> UNAUTHENTICATED
* :class:`PermissionDenied` -> PERMISSION_DENIED

pyarrow turns a Python exception raised by a Flight handler into a status whose detail is the
formatted traceback. For our own client-facing errors that formatting is refused (see
:func:`flight_lakehouse.process.hide_client_tracebacks`, which says why no other way works), so the
client only sees the one-line message and the error's class name. Anything else is turned into a
generic INTERNAL error by :func:`client_safe`, after logging it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

log = logging.getLogger(__name__)

F = TypeVar("F", bound=Callable[..., Any])


class ClientError(Exception):
    """Marker base class: an error whose message is meant for the client."""


class InvalidArgument(ClientError, pa.ArrowInvalid):
    """Bad input: INVALID_ARGUMENT."""


class NotFound(ClientError, pa.ArrowKeyError):
    """Unknown dataset, snapshot, column or action: NOT_FOUND."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else ""


class AlreadyExists(InvalidArgument):
    """The dataset exists already (``create`` mode): INVALID_ARGUMENT, as the contract allows."""


class SchemaConflict(InvalidArgument):
    """The uploaded schema differs from the dataset's: INVALID_ARGUMENT."""


class Unimplemented(ClientError, pa.ArrowNotImplementedError):
    """A command the server does not serve: UNIMPLEMENTED."""


class Unavailable(flight.FlightUnavailableError):
    """Busy, or storage unreachable: UNAVAILABLE."""


class TimedOut(flight.FlightTimedOutError):
    """A query ran past its time limit: DEADLINE_EXCEEDED."""


class Cancelled(flight.FlightCancelledError):
    """The client cancelled the call: CANCELLED."""


class Unauthenticated(flight.FlightUnauthenticatedError):
    """Wrong, missing, expired or revoked credentials: UNAUTHENTICATED."""


class PermissionDenied(flight.FlightUnauthorizedError):
    """An authenticated caller whose role or dataset grants do not allow the call: PERMISSION_DENIED."""


#: What opening a catalog raises when its URI, driver or server is wrong (see :func:`catalog_problem`).
CATALOG_ERRORS = (SQLAlchemyError, ModuleNotFoundError)
_CLIENT_FACING = (ClientError, flight.FlightError)
#: UTF-8 bytes of a refusal's message. gRPC sends it twice in the trailers (``grpc-message``, percent-encoded,
#: and Arrow's own copy), and a client drops trailers over 8 KiB: a schema conflict naming thousands of
#: columns reached the client as RESOURCE_EXHAUSTED "Stream removed" instead of its INVALID_ARGUMENT.
MAX_MESSAGE_BYTES = 1000


def to_client_error(exc: BaseException) -> BaseException:
    """``exc`` if client-facing (its message cut to :data:`MAX_MESSAGE_BYTES`), else UNAVAILABLE for storage
    and catalog faults (a locked or full SQLite file), else INTERNAL (logged)."""
    if isinstance(exc, _CLIENT_FACING):
        return shortened(exc)
    if isinstance(exc, OSError) and not isinstance(exc, FileNotFoundError | IsADirectoryError):
        log.warning("storage fault: %s", exc)
        return Unavailable(f"storage is unavailable ({storage_fault(exc)}); retry later")
    fault = catalog_fault(exc)
    if fault:
        log.warning("catalog fault: %s", fault)
        return Unavailable(f"the catalog is unavailable ({fault}); retry later")
    incident = uuid.uuid4().hex[:12]
    log.error("internal error %s", incident, exc_info=exc)
    return flight.FlightInternalError(f"internal error (incident {incident}); see the server log")


def shortened(exc: BaseException) -> BaseException:
    """``exc``, or the same error with the middle of its message cut when longer than
    :data:`MAX_MESSAGE_BYTES` (its end often names the dataset)."""
    message = str(exc)
    encoded = message.encode("utf-8", "surrogatepass")
    if len(encoded) <= MAX_MESSAGE_BYTES:
        return exc
    head = encoded[: MAX_MESSAGE_BYTES * 2 // 3].decode("utf-8", "ignore")
    tail = encoded[-(MAX_MESSAGE_BYTES // 4) :].decode("utf-8", "ignore")
    try:
        return type(exc)(f"{head} ... ({len(message) - len(head) - len(tail):,} characters cut) ... {tail}")
    except Exception:  # an error class that takes other arguments: keep it whole
        return exc


#: What SQLite says when its file cannot be written now (locked by another process, disk full, read-only):
#: faults of the moment, not bugs (SQLite's messages name no path).
CATALOG_FAULTS = (
    "database is locked",
    "database table is locked",
    "disk I/O error",
    "database or disk is full",
    "attempt to write a readonly database",
    "unable to open database file",
)


#: The SQLSTATE classes of PostgreSQL faults of the moment, with what the client is told of each. The
#: messages are ours: PostgreSQL's name hosts, ports, users and databases.
POSTGRES_FAULTS = {
    "08": "PostgreSQL connection failed",
    "40": "PostgreSQL serialization failure",
    "53": "PostgreSQL is out of resources",
    "57": "PostgreSQL is shutting down or restarting",
    "28": "PostgreSQL refused the credentials",
}


def catalog_fault(exc: BaseException) -> str | None:
    """A short description when ``exc`` (or the driver error SQLAlchemy wraps) is a fault of the catalog of
    the moment: SQLite's message for its file, or one of :data:`POSTGRES_FAULTS` for a PostgreSQL server."""
    driver_error = getattr(exc, "orig", exc)
    if isinstance(driver_error, sqlite3.OperationalError):
        message = str(driver_error)
        return next((fault for fault in CATALOG_FAULTS if fault in message), None)
    return postgres_fault(driver_error)


def postgres_fault(driver_error: BaseException | None) -> str | None:
    """What :func:`catalog_fault` says of a psycopg error (no import of psycopg: it is optional)."""
    if driver_error is None or not type(driver_error).__module__.startswith("psycopg"):
        return None
    sqlstate = getattr(driver_error, "sqlstate", None) or ""
    if sqlstate == "55P03":  # lock_timeout: another server held a dataset's lock that long
        return "another server holds the dataset's lock"
    if sqlstate[:2] in POSTGRES_FAULTS:
        return POSTGRES_FAULTS[sqlstate[:2]]
    if type(driver_error).__name__ == "OperationalError":  # no SQLSTATE: the server was not reached
        return POSTGRES_FAULTS["08"]
    return None


def catalog_problem(exc: BaseException) -> str:
    """One line on why the catalog could not be opened, never its URI (which may hold a password)."""
    if isinstance(exc, ModuleNotFoundError):
        return (
            f"its driver {exc.name!r} is not installed (PostgreSQL: pip install 'flight-lakehouse[postgres]')"
        )
    if isinstance(exc, ArgumentError):  # its message quotes the URI
        return "the catalog URI is not a SQLAlchemy URL of a database SQLAlchemy knows"
    return catalog_fault(exc) or type(getattr(exc, "orig", None) or exc).__name__


def storage_fault(exc: OSError) -> str:
    """A short name for a storage error, without keys, paths or endpoints."""
    text = str(exc)
    aws = re.search(r"AWS Error ([A-Z_]+)", text)
    if aws:
        return f"S3 {aws.group(1)}"
    if exc.errno:  # pyarrow's strerror is its whole message, server paths included
        return os.strerror(exc.errno)
    return "I/O error"


def client_safe(handler: F) -> F:
    """Decorate a Flight handler so that only client-facing errors reach the client."""

    @functools.wraps(handler)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return handler(*args, **kwargs)
        except BaseException as exc:
            raise to_client_error(exc) from None

    return wrapper  # type: ignore[return-value]


def client_safe_iter(items: Iterator[Any]) -> Iterator[Any]:
    """Wrap a lazily consumed iterator (a streamed result) the way :func:`client_safe` wraps a call."""
    try:
        yield from items
    except GeneratorExit:
        raise
    except BaseException as exc:
        raise to_client_error(exc) from None
