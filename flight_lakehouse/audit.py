"""The audit log: one JSON line per Flight call (who, from where, what, on which dataset, how much, how it
ended, how long it took), to a file or stderr. It never holds a password, a token, a secret key or SQL
text (a query's literals may be secrets): only the names the server chose and the dataset names."""

from __future__ import annotations

import datetime
import logging
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.flight as flight

#: gRPC status names of the exceptions a call can end with (most specific first).
STATUSES: tuple[tuple[type[BaseException], str], ...] = (
    (flight.FlightUnauthenticatedError, "UNAUTHENTICATED"),
    (flight.FlightUnauthorizedError, "PERMISSION_DENIED"),
    (flight.FlightTimedOutError, "DEADLINE_EXCEEDED"),
    (flight.FlightCancelledError, "CANCELLED"),
    (flight.FlightUnavailableError, "UNAVAILABLE"),
    (pa.ArrowNotImplementedError, "UNIMPLEMENTED"),
    (pa.ArrowKeyError, "NOT_FOUND"),
    (pa.ArrowInvalid, "INVALID_ARGUMENT"),
)


def status_of(exception: BaseException | None) -> str:
    """The status a call ended with, as gRPC names it."""
    if exception is None:
        return "OK"
    return next((name for kind, name in STATUSES if isinstance(exception, kind)), "INTERNAL")


@dataclass
class CallRecord:
    """What the audit log says of one call; handlers add the dataset, rows and bytes as they learn them."""

    rpc: str
    peer: str = ""
    user: str | None = None
    call: str | None = None
    dataset: str | None = None
    rows: int | None = None
    bytes: int | None = None
    started: float = field(default_factory=time.perf_counter)

    def note(self, dataset: str | None = None, rows: int | None = None, size: int | None = None) -> None:
        """Add what the handler learnt (None: leaves the field as it was); rows and bytes add up."""
        self.dataset = dataset if dataset is not None else self.dataset
        if rows is not None:
            self.rows = (self.rows or 0) + rows
        if size is not None:
            self.bytes = (self.bytes or 0) + size

    def line(self, status: str) -> bytes:
        """The record as one JSON line (fields without a value left out)."""
        entry: dict[str, Any] = {
            "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
            "user": self.user,
            "peer": self.peer or None,
            "rpc": self.rpc,
            "call": self.call,
            "dataset": self.dataset,
            "rows": self.rows,
            "bytes": self.bytes,
            "status": status,
            "ms": round((time.perf_counter() - self.started) * 1e3, 3),
        }
        return orjson.dumps({key: value for key, value in entry.items() if value is not None})


class AuditLog:
    """Writes call records to ``target``: a file path (appended), or ``-`` for stderr."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._log = logging.getLogger("flight_lakehouse.audit")
        self._log.propagate = False
        self._log.setLevel(logging.INFO)
        handler: logging.Handler
        if target == "-":
            handler = logging.StreamHandler(sys.stderr)
        else:
            handler = logging.FileHandler(target, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        self._log.handlers = [handler]

    def write(self, record: CallRecord, exception: BaseException | None) -> None:
        """Append the line of a finished call."""
        self._log.info(record.line(status_of(exception)).decode())
