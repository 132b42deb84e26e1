"""The HTTP side port: an aiohttp server on a uvloop event loop, on a thread of the Flight server's process,
serving :mod:`~flight_lakehouse.http_api` and the Iceberg REST catalog (:mod:`~flight_lakehouse.iceberg_rest`)
over the same state (catalog, query engine, vector search, limits, authentication). It binds the Flight
server's host; with TLS configured it serves HTTPS with the same certificate and key (and requires client
certificates under mTLS)."""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import uvloop
from aiohttp import web

from flight_lakehouse.http_api import HttpApi
from flight_lakehouse.iceberg_rest import IcebergRest
from flight_lakehouse.settings import Settings

if TYPE_CHECKING:
    from flight_lakehouse.server import LakehouseServer

log = logging.getLogger(__name__)

#: Worker threads of HTTP calls: each call holds one only while it starts a query or fetches a batch.
HTTP_THREADS = 32
#: How long starting the port may take.
START_TIMEOUT_SECONDS = 30.0


class HttpPort:
    """The HTTP port of one :class:`~flight_lakehouse.server.LakehouseServer`: :meth:`start`, then
    :meth:`unready` and :meth:`stop` at shutdown."""

    def __init__(self, server: LakehouseServer) -> None:
        self.settings = server.settings
        self.executor = ThreadPoolExecutor(max_workers=HTTP_THREADS, thread_name_prefix="http-call")
        self.api = HttpApi(server, self.executor)
        self.loop = uvloop.new_event_loop()
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="http-port", daemon=True)

    def start(self) -> HttpPort:
        """Bind and serve (an OSError when the port is taken)."""
        self._thread.start()
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(
                START_TIMEOUT_SECONDS
            )
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            raise
        return self

    async def _start(self) -> int:
        app = self.api.app()
        IcebergRest(self.api).add_routes(app)  # the Iceberg REST catalog under /iceberg/
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.settings.shutdown_grace_seconds,
        )
        await self._runner.setup()
        site = web.TCPSite(
            self._runner, self.settings.host, self.settings.http_port, ssl_context=ssl_context(self.settings)
        )
        await site.start()
        return int(self._runner.addresses[0][1])

    @property
    def url(self) -> str:
        """Where the port listens: ``http://host:port`` (``https`` with TLS)."""
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{'https' if self.settings.tls_cert else 'http'}://{host}:{self.port}"

    def unready(self) -> None:
        """Answer 503 on ``/readyz`` from now on (the server is shutting down)."""
        self.api.readiness.stopping = True

    def stop(self) -> None:
        """Stop listening, let running calls finish within the shutdown grace period, stop the loop."""
        if self._runner is not None:
            cleanup = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self.loop)
            try:
                cleanup.result(self.settings.shutdown_grace_seconds + 5)
            except Exception:
                log.warning("the HTTP port did not stop cleanly", exc_info=True)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.executor.shutdown(wait=False, cancel_futures=True)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of the Flight port's certificate and key (None without TLS); with a client CA,
    clients must present a certificate it signed."""
    if not settings.tls_cert or not settings.tls_key:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca:
        context.load_verify_locations(settings.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context
