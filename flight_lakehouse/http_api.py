"""The endpoints of the HTTP side port: probes, Prometheus metrics and Arrow over HTTP.

Every endpoint but the probes authenticates as the Flight port does (the same :class:`Gatekeeper`: Basic
credentials or a bearer token in ``Authorization``) and runs through the same codec, routers, role checks
and dataset grants. Work runs on a thread pool, never on the event loop: a query is started there and
each of its batches is fetched and encoded there, then written by the loop, which waits until the client
has taken it (so a slow reader holds one batch, not the result).

A refusal is an HTTP status with a JSON body ``{"error": one line, "code": gRPC status name}``: see
:data:`HTTP_STATUS`. An error after the first bytes of a result were sent cuts the connection (the chunked
response never ends), so a client never takes a partial result for a whole one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from flight_lakehouse.access import acting_as, require
from flight_lakehouse.audit import CallRecord, status_of
from flight_lakehouse.auth import Identity
from flight_lakehouse.commands import MAX_COMMAND_BYTES, EmptyBody
from flight_lakehouse.errors import Cancelled, InvalidArgument, TimedOut, storage_fault, to_client_error
from flight_lakehouse.http_formats import Encoder, NotAcceptable, encoder_for, first_line
from flight_lakehouse.protocol import CallContext
from flight_lakehouse.query import QueryStream
from flight_lakehouse.services import Services

if TYPE_CHECKING:
    from flight_lakehouse.server import LakehouseServer

log = logging.getLogger(__name__)
T = TypeVar("T")

#: The HTTP status of each gRPC status a call can end with.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "CANCELLED": 408,
    "INTERNAL": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
#: The challenge a 401 answers with.
CHALLENGE = 'Basic realm="flight-lakehouse", Bearer realm="flight-lakehouse"'
#: How long a readiness answer is reused, and how long a probe waits for a check.
READY_TTL_SECONDS = 1.0
READY_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True)
class HttpCall:
    """One authenticated HTTP call: its context (as a Flight call's) and the bearer token of a Basic login."""

    ctx: CallContext
    bearer: str | None = None


class Readiness:
    """Whether the server can serve: not shutting down, the catalog answers, the storage root is there."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self.stopping = False
        self._last: tuple[float, str | None] = (float("-inf"), None)
        self._guard = threading.Lock()

    def reason(self) -> str | None:
        """Why the server is not ready (None: ready); a check is reused for :data:`READY_TTL_SECONDS`."""
        if self.stopping:
            return "shutting down"
        with self._guard:  # one check at a time; probes arriving meanwhile reuse it
            taken, reason = self._last
            if time.monotonic() - taken >= READY_TTL_SECONDS:
                reason = self._check()
                self._last = (time.monotonic(), reason)
        return "shutting down" if self.stopping else reason

    def _check(self) -> str | None:
        try:
            with acting_as(None):
                self.s.datasets.iceberg.names()  # one query of the catalog database
        except Exception as exc:
            return f"the catalog does not answer ({type(exc).__name__})"
        storage = self.s.storage
        try:
            info = storage.filesystem.get_file_info(storage.fs_path(storage.root_uri))
        except OSError as exc:
            return f"storage is unreachable ({storage_fault(exc)})"
        if storage.kind == "local" and info.type != pafs.FileType.Directory:
            return "the root directory is gone"
        if storage.kind == "local":
            return local_write_fault(storage.fs_path(storage.root_uri))
        return None


def local_write_fault(root: str) -> str | None:
    """Why uploads cannot write under a local ``root`` (None: they can): its file system is mounted
    read-only (which stops root too), or the server may not write there."""
    try:
        if os.statvfs(root).f_flag & os.ST_RDONLY:
            return "the root is read-only"
    except OSError:
        return "the root directory is gone"
    return None if os.access(root, os.W_OK) else "the root is not writable"


class HttpApi:
    """The aiohttp application of one server: its routes over the Flight server's state."""

    def __init__(self, server: LakehouseServer, executor: ThreadPoolExecutor) -> None:
        self.server = server
        self.executor = executor
        self.settings = server.settings
        self.gatekeeper = server.access.gatekeeper if server.access is not None else None
        self.audit = server.access.audit if server.access is not None else None
        self.metrics = server.metrics
        self.readiness = Readiness(server.services)

    def app(self) -> web.Application:
        """The application: its routes and the middleware that turns errors into JSON refusals."""
        app = web.Application(middlewares=[refusals], client_max_size=MAX_COMMAND_BYTES)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_post("/v1/query", self.query)
        app.router.add_get("/v1/datasets", self.datasets)
        return app

    # -- probes and metrics ----------------------------------------------------------------------
    async def healthz(self, request: web.Request) -> web.Response:
        """``GET /healthz``: 200 while the process answers."""
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        """``GET /readyz``: 200 when ready, else 503 with the reason."""
        try:
            reason = await asyncio.wait_for(self.off_loop(self.readiness.reason), READY_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            reason = f"the catalog and storage checks took longer than {READY_TIMEOUT_SECONDS:g} s"
        if reason is not None:
            return web.json_response({"status": "not ready", "reason": reason}, status=503)
        return web.json_response({"status": "ready"})

    async def prometheus(self, request: web.Request) -> web.Response:
        """``GET /metrics``: every metric in the Prometheus text format."""
        metrics = self.metrics
        if metrics is None:
            raise web.HTTPNotFound(reason="metrics are off")
        async with self.calling(request, "GET /metrics") as call:
            text = await self.run(call, metrics.exposition)
            return self.answer(call, web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST}))

    # -- data ------------------------------------------------------------------------------------
    async def datasets(self, request: web.Request) -> web.Response:
        """``GET /v1/datasets``: what the ``list_datasets`` action answers, for the same caller."""
        async with self.calling(request, "GET /v1/datasets") as call:
            body = await self.run(call, self.list_datasets, call.ctx)
            return self.answer(call, web.Response(body=body, content_type="application/json"))

    def list_datasets(self, ctx: CallContext) -> bytes:
        """The ``list_datasets`` action, as JSON bytes (on a worker thread, as the caller)."""
        spec = self.server.actions.spec("list_datasets")
        ctx.note(call="list_datasets")
        require(spec.role, "run action 'list_datasets'")
        return self.server.codec.result(spec.handler(ctx, EmptyBody()))

    async def query(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/query``: a DoGet ticket's body (SQL, scan or search); the result streamed in the
        format ``Accept`` asks for."""
        encoder = encoder_for(request.headers.get("Accept"))
        async with self.calling(request, "POST /v1/query") as call:
            raw = await request.read()
            deadline = time.monotonic() + self.settings.query_timeout_seconds
            result = await self.run(call, self.start_query, call.ctx, raw, encoder)
            response = self.answer(call, web.StreamResponse())
            response.content_type = encoder.media_type
            try:
                await response.prepare(request)
                await self.stream(call, response, deadline, result)
                await response.write_eof()
            except BaseException as exc:
                if request.transport is not None:
                    request.transport.abort()  # the client must not take what it got for the whole
                raise StreamCut(response) from exc
            finally:
                await self.run(call, result.close)
            return response

    def start_query(self, ctx: CallContext, raw: bytes, encoder: Encoder) -> EncodedResult:
        """Decode the body as a DoGet ticket, route it as DoGet does and start it (on a worker thread, as
        the caller)."""
        request = self.server.codec.command(raw.lstrip(), "query body")
        result = self.server.dispatch(self.server.routes.get, request, ctx)(ctx, request)
        if isinstance(result, QueryStream):
            return EncodedResult(result.schema, result.batches, encoder, ctx)
        return EncodedResult(result.schema, iter(result.to_batches()), encoder, ctx)

    async def stream(
        self, call: HttpCall, response: web.StreamResponse, deadline: float, result: EncodedResult
    ) -> None:
        """Send the result, one batch at a time, each once the client took the one before (within the
        query's time limit, as a Flight reader that stalls)."""
        chunk: bytes | bytearray | None = result.head
        while chunk is not None:
            if chunk:
                remaining = deadline - time.monotonic()
                try:
                    await asyncio.wait_for(response.write(chunk), max(remaining, 0.001))
                except asyncio.TimeoutError:
                    raise TimedOut(
                        f"query exceeded the time limit of {self.settings.query_timeout_seconds:g} s "
                        "(the client did not read the result)"
                    ) from None
                except ConnectionError:
                    raise Cancelled("the client went away") from None
            chunk = await self.run(call, result.next_chunk)

    # -- calls -----------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def calling(self, request: web.Request, rpc: str) -> AsyncIterator[HttpCall]:
        """An authenticated call (UNAUTHENTICATED without valid credentials when auth is on), counted in the
        metrics and written to the audit log when it ends."""
        recorded = self.audit is not None or self.metrics is not None
        record = CallRecord(rpc=rpc, peer=request.remote or "") if recorded else None
        try:
            caller = await self.authenticate(request.headers.get("Authorization"))
        except BaseException as exc:
            self.ended(record, exc)
            raise
        if record is not None and caller[0] is not None:
            record.user = caller[0].name
        transport = request.transport
        ctx = CallContext(
            peer=request.remote or "",
            is_cancelled=lambda: transport is None or transport.is_closing(),
            caller=caller[0],
            record=record,
        )
        error: BaseException | None = None
        try:
            yield HttpCall(ctx, caller[1])
        except BaseException as exc:
            error = exc
            raise
        finally:
            self.ended(record, error)

    async def authenticate(self, header: str | None) -> tuple[Identity | None, str | None]:
        """The caller of ``header`` and the bearer token of a Basic login (None, None: auth is off)."""
        if self.gatekeeper is None:
            return None, None
        authenticated = await self.off_loop(self.gatekeeper.authenticate, header)
        return authenticated.identity, authenticated.bearer

    def ended(self, record: CallRecord | None, error: BaseException | None) -> None:
        """Count a call that ended (with ``error``) and write its audit line."""
        if record is None:
            return
        if isinstance(error, StreamCut):
            error = error.__cause__
        if isinstance(error, ConnectionError | asyncio.CancelledError):
            error = Cancelled("the client went away")
        elif isinstance(error, web.HTTPException):  # a body over the limit
            error = InvalidArgument(error.reason)
        elif error is not None:
            error = to_client_error(error)
        if self.audit is not None:
            self.audit.write(record, error)
        if self.metrics is not None:
            self.metrics.observe(record, error)

    @staticmethod
    def answer(call: HttpCall, response: web.StreamResponse) -> web.StreamResponse:
        """``response``, with the bearer token of a Basic login (as the Flight port sends it)."""
        if call.bearer is not None:
            response.headers["Authorization"] = f"Bearer {call.bearer}"
        return response

    async def run(self, call: HttpCall, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on a worker thread, as the call's caller; an error reaches the client safe."""
        return await self.off_loop(as_caller, call.ctx.caller, work, *args)

    async def off_loop(self, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on a worker thread; an error reaches the client safe."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, safe, work, *args)


def as_caller(caller: Identity | None, work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` as ``caller`` (the scope of its dataset lookups)."""
    with acting_as(caller):
        return work(*args)


def safe(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)``, raising only client-facing errors."""
    try:
        return work(*args)
    except BaseException as exc:
        raise to_client_error(exc) from None


class StreamCut(Exception):
    """A result failed after its first bytes were sent: the connection was cut (the cause says why)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__("result stream cut off")
        self.response = response


class EncodedResult:
    """A started result in a client's format: the bytes before the first batch, then chunk by chunk (each
    fetched and encoded on a worker thread)."""

    def __init__(
        self, schema: pa.Schema, batches: Iterator[pa.RecordBatch], encoder: Encoder, ctx: CallContext
    ) -> None:
        self.batches = batches
        self.encoder = encoder
        self.ctx = ctx
        self._ended = False
        try:
            self.head = encoder.start(schema)
        except BaseException:
            self.close()
            raise

    def next_chunk(self) -> bytes | bytearray | None:
        """The next batch encoded; after the last, the end of the stream; then None."""
        if self._ended:
            return None
        batch = next(self.batches, None)
        if batch is None:
            self._ended = True
            return self.encoder.finish()
        self.ctx.note(rows=batch.num_rows, size=batch.nbytes)
        return self.encoder.batch(batch)

    def close(self) -> None:
        """Stop the result's stream (a query's ``finally`` frees its cursor, slot and leases)."""
        closer = getattr(self.batches, "close", None)
        if closer is not None:
            closer()


@web.middleware
async def refusals(request: web.Request, handler: Callable[[web.Request], Any]) -> web.StreamResponse:
    """Every error as a JSON refusal with its HTTP status; aiohttp's own (no such endpoint, body too large)
    too."""
    try:
        return await handler(request)
    except StreamCut as exc:
        log.info("a result stream was cut off: %s", first_line(exc.__cause__ or exc))
        return exc.response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return refusal_of_http(exc, request)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:
        if request.transport is None or request.transport.is_closing():
            raise  # a stream cut off: nothing more can be sent
        return refusal(to_client_error(exc))


def refusal(exc: BaseException) -> web.Response:
    """The JSON refusal of a client-facing error."""
    code = status_of(exc)
    status = 406 if isinstance(exc, NotAcceptable) else HTTP_STATUS.get(code, 500)
    headers = {}
    if code == "UNAUTHENTICATED":
        headers["WWW-Authenticate"] = CHALLENGE
    if code == "UNAVAILABLE":
        headers["Retry-After"] = "1"
    return web.json_response({"error": first_line(exc), "code": code}, status=status, headers=headers)


def refusal_of_http(exc: web.HTTPException, request: web.Request) -> web.Response:
    """The JSON refusal of an error aiohttp raised (404, 405, 413, ...)."""
    if exc.status == 404:
        message = (
            f"no endpoint {request.path[:200]!r}; "
            "the endpoints are /healthz, /readyz, /metrics, /v1/..., /iceberg/v1/..."
        )
    elif exc.status == 413:
        message = f"request body larger than the limit of {MAX_COMMAND_BYTES} bytes"
    else:
        message = exc.reason
    code = "NOT_FOUND" if exc.status == 404 else "INTERNAL" if exc.status >= 500 else "INVALID_ARGUMENT"
    headers = {key: value for key, value in exc.headers.items() if key.lower() == "allow"}
    return web.json_response({"error": message, "code": code}, status=exc.status, headers=headers)
