"""The servers of one root: who is alive, so that GetFlightInfo can spread a split result over them.

Servers on one catalog database find each other in a small table of it, ``lakehouse_servers``: each writes
its advertised location and a heartbeat every ``heartbeat_seconds`` from a background thread, and deletes
its row when it stops cleanly. A row whose heartbeat is older than :data:`STALE_HEARTBEATS` intervals (a
server killed, or cut off from the database) is ignored, and removed by the next server that sees it.
Written with SQLAlchemy Core only, so it works unchanged on SQLite (servers of one machine) and PostgreSQL.

Alternatively ``peers`` names the other servers (a static list), and the registry is not used.

:meth:`Peers.live_locations` is what GetFlightInfo asks: this server first, then the others (sorted), as
the heartbeat thread last found them: fresh in the registry (or listed) and accepting a TCP connection on
their port (a server killed and restarted on another port leaves a fresh row for three intervals).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import threading
import time
from urllib.parse import urlparse

from sqlalchemy import Column, Float, MetaData, String, Table, delete, select, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from flight_lakehouse.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: A server whose heartbeat is older than this many intervals is taken for stopped.
STALE_HEARTBEATS = 3
#: Seconds between probes of a static ``peers`` list when ``heartbeat_seconds`` is 0.
STATIC_PROBE_SECONDS = 5.0
#: How long a TCP check of a peer may take.
PROBE_TIMEOUT_SECONDS = 1.0
#: Hosts a server may bind to that no client can reach it at: its advertised location names the machine.
WILDCARD_HOSTS = ("0.0.0.0", "::", "")

METADATA = MetaData()
SERVERS = Table(
    "lakehouse_servers",
    METADATA,
    Column("location", String(512), primary_key=True),
    #: Random per process: a restarted server on the same location does not delete its successor's row.
    Column("server_id", String(32), nullable=False),
    Column("started", Float, nullable=False),
    Column("heartbeat", Float, nullable=False),
)


def advertised_location(settings: Settings, port: int) -> str:
    """The location other clients reach this server at: ``advertise``, else the bound host and ``port`` (the
    machine's name for a wildcard bind), with the server's scheme."""
    if settings.advertise:
        return check_location(settings.advertise, settings.scheme, "--advertise")
    host = socket.gethostname() if settings.host in WILDCARD_HOSTS else settings.host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{settings.scheme}://{host}:{port}"


def check_location(location: str, scheme: str, what: str) -> str:
    """``location`` as ``scheme://host:port`` (``host:port`` gets the server's scheme, as ``--server`` does);
    else a one-line SettingsError naming ``what``."""
    if "://" not in location:
        location = f"{scheme}://{location}"
    parsed = urlparse(location)
    try:
        port = parsed.port
    except ValueError:
        port = None
    if parsed.scheme != scheme or not parsed.hostname or port is None or parsed.path not in ("", "/"):
        raise SettingsError(f"{what} {location!r} is not a {scheme}://HOST:PORT location")
    return location.rstrip("/")


class Peers:
    """The live servers of this root, as Flight locations (see the module's description)."""

    def __init__(self, settings: Settings, engine: Engine | None) -> None:
        #: Seconds between heartbeats (registry), or between probes of a static list
        self.interval = settings.heartbeat_seconds or STATIC_PROBE_SECONDS
        self.static = [
            check_location(peer.strip(), settings.scheme, "--peers entry")
            for peer in (settings.peers or "").split(",")
            if peer.strip()
        ]
        if settings.advertise:  # refused at start, before the port is bound
            check_location(settings.advertise, settings.scheme, "--advertise")
        #: None: no registry (a static list, or heartbeats off)
        self.engine = engine if settings.heartbeat_seconds > 0 and not self.static else None
        self.location = ""
        self.server_id = secrets.token_hex(16)
        self.started = time.time()
        #: The other live servers, as of the last heartbeat
        self._others: list[str] = []
        self._table_ready = False
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, location: str) -> Peers:
        """Register as ``location`` and beat from a daemon thread (nothing to do when alone)."""
        self.location = location
        if self.engine is None and not self.static:
            return self
        self._beat()
        self._thread = threading.Thread(target=self._run, name="lakehouse-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and delete this server's row: new FlightInfos of the others stop naming it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(PROBE_TIMEOUT_SECONDS * (len(self.static) + len(self._others)) + 2)
        if self.engine is None or not self.location:
            return
        try:
            with self.engine.begin() as connection:
                connection.execute(delete(SERVERS).where(self._own_row()))
        except SQLAlchemyError as exc:
            log.warning("could not remove this server from the registry: %s", one_line(exc))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._beat()

    def _beat(self) -> None:
        """One heartbeat: this server's row written, then the others found (fresh rows of the registry, or
        the static list) and kept when their port accepts a TCP connection (a server killed and restarted
        elsewhere leaves a fresh row behind for three intervals). Errors are logged, not raised: the server
        keeps serving, and the others drop it from their FlightInfos until it beats again."""
        others = self.static if self.engine is None else self._write_and_read()
        live = sorted(peer for peer in set(others) - {self.location} if reachable_port(peer))
        with self._guard:
            self._others = live

    def _write_and_read(self) -> list[str]:
        """Write this server's heartbeat, remove stale rows, and read the locations of the fresh ones."""
        now = time.time()
        stale = now - STALE_HEARTBEATS * self.interval
        try:
            if not self._table_ready:  # at the first beat, and after a failed one (a catalog rebuilt)
                self._create_table()
                self._table_ready = True
            with self.engine.begin() as connection:  # type: ignore[union-attr]
                beat = update(SERVERS).where(self._own_row()).values(heartbeat=now)
                if connection.execute(beat).rowcount == 0:
                    # first beat, or another process took the location meanwhile: this one serves it now
                    connection.execute(delete(SERVERS).where(SERVERS.c.location == self.location))
                    row = {"server_id": self.server_id, "started": self.started, "heartbeat": now}
                    connection.execute(SERVERS.insert().values(location=self.location, **row))
                connection.execute(delete(SERVERS).where(SERVERS.c.heartbeat < stale))
                return [row[0] for row in connection.execute(select(SERVERS.c.location))]
        except SQLAlchemyError as exc:  # the registry cannot be reached: answer as a server alone
            log.warning("heartbeat to the server registry failed: %s", one_line(exc))
            self._table_ready = False
            return []

    def _own_row(self):  # type: ignore[no-untyped-def]
        return (SERVERS.c.location == self.location) & (SERVERS.c.server_id == self.server_id)

    def _create_table(self) -> None:
        """The registry table, created by the first server (several starting at once may race: one wins)."""
        assert self.engine is not None
        for _ in range(3):
            try:
                METADATA.create_all(self.engine, tables=[SERVERS], checkfirst=True)
                return
            except SQLAlchemyError:  # created by another server between the check and the CREATE
                time.sleep(0.1)
        METADATA.create_all(self.engine, tables=[SERVERS], checkfirst=True)

    # -- what GetFlightInfo asks -----------------------------------------------------------------
    def live_locations(self) -> list[str]:
        """The live servers' locations, this server first, the others sorted (as of the last heartbeat:
        no database query or probe on the call's path); just this one when alone or not started."""
        if not self.location:
            return []
        with self._guard:
            return [self.location, *self._others]


def reachable_port(location: str) -> bool:
    """Whether the host and port of a location accept a TCP connection."""
    parsed = urlparse(location)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=PROBE_TIMEOUT_SECONDS):
            return True
    except OSError:
        return False


def one_line(exc: BaseException) -> str:
    """The first line of an error, without SQLAlchemy's statement and parameters."""
    with contextlib.suppress(Exception):
        return str(getattr(exc, "orig", None) or exc).splitlines()[0][:300]
    return type(exc).__name__
