"""The servers of one root: who is alive, so that GetFlightInfo can spread a split result over them.

Servers on one catalog database find each other in a small table of it, ``lakehouse_servers``: each writes
its advertised location and a heartbeat every ``heartbeat_seconds`` from a background thread, and deletes
its row when it stops cleanly. A row whose heartbeat is older than :data:`STALE_HEARTBEATS` intervals (a
server killed, or cut off from the database) is ignored, and removed by the next server that sees it.
Written with SQLAlchemy Core only, so it works unchanged on SQLite (servers of one machine) and PostgreSQL.

Alternatively ``peers`` names the other servers (a static list): each is taken as alive while its port
accepts a TCP connection (checked on the same interval), and the registry is not used.

:meth:`Peers.live_locations` is what GetFlightInfo asks: this server first, then the others (sorted),
remembered for a fraction of an interval.
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
#: How long a TCP check of a static peer may take.
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
        return settings.advertise
    host = socket.gethostname() if settings.host in WILDCARD_HOSTS else settings.host
    if ":" in host:  # an IPv6 address
        host = f"[{host}]"
    return f"{settings.scheme}://{host}:{port}"


def check_location(location: str, scheme: str, what: str) -> str:
    """``location`` when it is ``scheme://host:port``; else a one-line SettingsError naming ``what``."""
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
        self.interval = settings.heartbeat_seconds
        self.static = [
            check_location(peer.strip(), settings.scheme, "--peers entry")
            for peer in (settings.peers or "").split(",")
            if peer.strip()
        ]
        if settings.advertise:
            check_location(settings.advertise, settings.scheme, "--advertise")
        #: None: no registry (a static list, or heartbeats off)
        self.engine = engine if self.interval > 0 and not self.static else None
        self.location = ""
        self.server_id = secrets.token_hex(16)
        self.started = time.time()
        self._live: list[str] = []
        self._live_until = 0.0
        self._reachable: set[str] = set()
        self._guard = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, location: str) -> Peers:
        """Register as ``location`` and beat from a daemon thread (nothing to do when alone)."""
        self.location = location
        if self.engine is None and not self.static:
            return self
        if self.engine is not None:
            self._create_table()
        self._beat()
        self._thread = threading.Thread(target=self._run, name="lakehouse-heartbeat", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop beating and delete this server's row: new FlightInfos of the others stop naming it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(self.interval + PROBE_TIMEOUT_SECONDS * len(self.static) + 1)
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
        """One heartbeat (registry) or one round of TCP checks (static list); errors are logged, not raised:
        the server keeps serving, and others drop it from their FlightInfos until it beats again."""
        if self.engine is None:
            reachable = {peer for peer in self.static if reachable_port(peer)}
            with self._guard:
                self._reachable = reachable
            return
        now = time.time()
        try:
            with self.engine.begin() as connection:
                beat = update(SERVERS).where(self._own_row()).values(heartbeat=now)
                if connection.execute(beat).rowcount == 0:
                    # first beat, or another process took the location meanwhile: this one serves it now
                    connection.execute(delete(SERVERS).where(SERVERS.c.location == self.location))
                    row = {"server_id": self.server_id, "started": self.started, "heartbeat": now}
                    connection.execute(SERVERS.insert().values(location=self.location, **row))
                stale = now - STALE_HEARTBEATS * self.interval
                connection.execute(delete(SERVERS).where(SERVERS.c.heartbeat < stale))
        except SQLAlchemyError as exc:
            log.warning("heartbeat to the server registry failed: %s", one_line(exc))

    def _own_row(self):  # type: ignore[no-untyped-def]
        return (SERVERS.c.location == self.location) & (SERVERS.c.server_id == self.server_id)

    def _create_table(self) -> None:
        """The registry table, created by the first server (several starting at once may race: one wins)."""
        for _ in range(3):
            try:
                METADATA.create_all(self.engine, tables=[SERVERS], checkfirst=True)
                return
            except SQLAlchemyError:  # created by another server between the check and the CREATE
                time.sleep(0.1)
        METADATA.create_all(self.engine, tables=[SERVERS], checkfirst=True)

    # -- what GetFlightInfo asks -----------------------------------------------------------------
    def live_locations(self) -> list[str]:
        """The live servers' locations, this server first (just this one when it is alone or not started);
        remembered for half an interval (at most a second)."""
        if not self.location or (self.engine is None and not self.static):
            return [self.location] if self.location else []
        now = time.monotonic()
        with self._guard:
            if now < self._live_until:
                return list(self._live)
        others = self._others()
        live = [self.location, *sorted(set(others) - {self.location})]
        with self._guard:
            self._live, self._live_until = live, now + min(self.interval / 2, 1.0)
        return list(live)

    def _others(self) -> list[str]:
        if self.engine is None:
            with self._guard:
                return sorted(self._reachable)
        fresh = time.time() - STALE_HEARTBEATS * self.interval
        try:
            with self.engine.connect() as connection:
                rows = connection.execute(select(SERVERS.c.location).where(SERVERS.c.heartbeat >= fresh))
                return [row[0] for row in rows]
        except SQLAlchemyError as exc:  # the registry cannot be read: answer as a server alone
            log.warning("cannot read the server registry: %s", one_line(exc))
            return []


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
