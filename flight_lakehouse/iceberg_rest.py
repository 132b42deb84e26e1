"""The Iceberg REST catalog protocol on the HTTP port, under ``/iceberg/`` (the read side).

Engines that speak it (pyiceberg's ``RestCatalog``, Daft, Spark, Trino, DuckDB, Snowflake) find the
server's Iceberg tables by URL instead of opening its SQL catalog database: the catalog's configuration,
its one namespace (``lakehouse``), the tables in it, and each table's current metadata file and metadata.
They then read the data files from storage themselves, with their own storage credentials (this catalog
vends none).

- The same users, API tokens, roles and dataset grants as every other call: ``Authorization: Basic`` or
  ``Bearer`` on each request, and a caller sees only the datasets its grants cover (others are "not
  found"). ``POST /iceberg/v1/oauth/tokens`` exchanges OAuth2 client credentials for a bearer token, as
  pyiceberg's ``credential="user:password"`` asks: ``client_id``/``client_secret`` are a user name and
  password (the token is a login's bearer token), or an empty id and an API token (the token is itself).
- Lance datasets are not Iceberg tables: they are not listed, and loading one is NoSuchTableException.
- Writes (create, commit, drop, rename, register, namespaces) are refused with the protocol's 406
  UnsupportedOperationException: datasets are written through the Flight port, which keeps the schema
  rules, write locks and snapshot retention. The config response lists the endpoints served, so clients
  refuse writes before sending them.
- Every refusal is the protocol's ``ErrorModel``: ``{"error": {"message", "type", "code"}}``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from flight_lakehouse.access import require, visible
from flight_lakehouse.audit import CallRecord, status_of
from flight_lakehouse.auth import TOKEN_PREFIX, Role
from flight_lakehouse.catalog import NAMESPACE
from flight_lakehouse.errors import (
    ClientError,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    Unimplemented,
    to_client_error,
)
from flight_lakehouse.http_api import CHALLENGE, HTTP_STATUS, HttpCall
from flight_lakehouse.http_formats import first_line

if TYPE_CHECKING:
    from flight_lakehouse.http_api import HttpApi

#: Where the catalog is served: its URI for clients is ``http(s)://host:http_port/iceberg``.
BASE = "/iceberg"
#: What separates the levels of a namespace in a path (the protocol's default; this catalog has one level).
SEPARATOR = "\x1f"
#: The endpoints served, as the config response lists them (the protocol's ``{prefix}`` is empty here).
ENDPOINTS = (
    "GET /v1/{prefix}/namespaces",
    "GET /v1/{prefix}/namespaces/{namespace}",
    "HEAD /v1/{prefix}/namespaces/{namespace}",
    "GET /v1/{prefix}/namespaces/{namespace}/tables",
    "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}",
    "HEAD /v1/{prefix}/namespaces/{namespace}/tables/{table}",
)
#: The ``type`` of an error response by HTTP status (the names the protocol's examples use).
ERROR_TYPES = {
    400: "BadRequestException",
    401: "NotAuthorizedException",
    403: "ForbiddenException",
    404: "NotFoundException",
    406: "UnsupportedOperationException",
    408: "CancelledException",
    500: "InternalServerError",
    501: "NotImplementedException",
    503: "ServiceUnavailableException",
    504: "TimeoutException",
}
#: What a caller does here, as a refusal of its role names it.
READING = "read the Iceberg catalog"
#: The longest name echoed in a message.
NAME_SHOWN_CHARS = 200
READ_ONLY = (
    "the Iceberg REST catalog of flight-lakehouse is read-only: {what} is not supported; "
    "write datasets through the Flight port (DoPut ingest, Flight SQL bulk ingest)"
)


class NoSuchNamespace(NotFound):
    """A namespace other than the catalog's one: 404 NoSuchNamespaceException."""

    iceberg_type = "NoSuchNamespaceException"


class NoSuchTable(NotFound):
    """A table that does not exist, is hidden from the caller, or is not an Iceberg table: 404."""

    iceberg_type = "NoSuchTableException"


class ReadOnly(Unimplemented):
    """A write: 406 UnsupportedOperationException, as the protocol answers an operation not supported."""

    iceberg_type = "UnsupportedOperationException"
    http_status = 406


class OAuthError(ClientError):
    """A refused token request, answered in OAuth2's error format (not the ErrorModel)."""

    def __init__(self, status: int, error: str, description: str) -> None:
        super().__init__(description)
        self.status, self.error = status, error


Work = Callable[[web.Request, HttpCall], Awaitable[web.StreamResponse]]


class IcebergRest:
    """The catalog's endpoints over one server's datasets; :meth:`add_routes` puts them on the HTTP app."""

    def __init__(self, api: HttpApi) -> None:
        self.api = api
        self.services = api.server.services

    def add_routes(self, app: web.Application) -> None:
        """Every path under ``/iceberg/``: the endpoints served, anything else a 404 (reads) or 406."""
        namespace = f"{BASE}/v1/namespaces/{{namespace}}"
        routes: list[tuple[str, dict[str, Work]]] = [
            (f"{BASE}/v1/config", {"GET": self.config}),
            (f"{BASE}/v1/namespaces", {"GET": self.namespaces}),
            (namespace, {"GET": self.namespace, "HEAD": self.namespace}),
            (f"{namespace}/tables", {"GET": self.tables}),
            (f"{namespace}/tables/{{table}}", {"GET": self.table, "HEAD": self.table}),
            (f"{BASE}/{{tail:.*}}", {}),
        ]
        app.router.add_post(f"{BASE}/v1/oauth/tokens", self.token)
        for path, methods in routes:
            app.router.add_route("*", path, self.endpoint(path, methods))

    def endpoint(self, path: str, methods: dict[str, Work]) -> Callable[[web.Request], Awaitable[Any]]:
        """The handler of ``path``: authenticate, then the method's work, or a refusal as an ErrorModel."""
        served = "GET" in methods

        async def handle(request: web.Request) -> web.StreamResponse:
            rpc = f"{request.method} {path if served else BASE + '/...'}"[:100]
            try:
                async with self.api.calling(request, rpc) as call:
                    work = methods.get(request.method)
                    if work is not None:
                        return await work(request, call)
                    if request.method in ("GET", "HEAD"):
                        raise NotFound(f"no Iceberg REST endpoint {request.path[:NAME_SHOWN_CHARS]!r}")
                    raise ReadOnly(
                        READ_ONLY.format(what=f"{request.method} {request.path[:NAME_SHOWN_CHARS]}")
                    )
            except Exception as exc:
                return error_response(exc)

        return handle

    # -- the endpoints ---------------------------------------------------------------------------
    async def config(self, request: web.Request, call: HttpCall) -> web.StreamResponse:
        """``GET /v1/config``: defaults for the client (where the tables are, the S3 endpoint and region,
        never credentials) and the endpoints served. The ``warehouse`` parameter is accepted and ignored:
        the server has one warehouse."""
        storage = self.services.storage
        defaults = {"warehouse": storage.uri("tables")}
        if storage.kind == "s3":
            endpoint = getattr(storage, "endpoint", None)
            if endpoint:
                defaults["s3.endpoint"] = endpoint
            defaults["s3.region"] = getattr(storage, "region", "us-east-1")
        await self.api.run(call, require, Role.READER, READING)
        body = {"defaults": defaults, "overrides": {}, "endpoints": list(ENDPOINTS)}
        return self.api.answer(call, web.json_response(body))

    async def namespaces(self, request: web.Request, call: HttpCall) -> web.StreamResponse:
        """``GET /v1/namespaces``: the one namespace (none below it: ``parent`` lists nothing)."""
        parent = request.query.get("parent")
        if parent is not None:
            check_namespace(parent)
        await self.api.run(call, require, Role.READER, READING)
        body = {"namespaces": [] if parent is not None else [[NAMESPACE]]}
        return self.api.answer(call, web.json_response(body))

    async def namespace(self, request: web.Request, call: HttpCall) -> web.StreamResponse:
        """``GET|HEAD /v1/namespaces/{namespace}``: the namespace and its (no) properties."""
        check_namespace(request.match_info["namespace"])
        await self.api.run(call, require, Role.READER, READING)
        if request.method == "HEAD":
            return self.api.answer(call, web.Response(status=204))
        return self.api.answer(call, web.json_response({"namespace": [NAMESPACE], "properties": {}}))

    async def tables(self, request: web.Request, call: HttpCall) -> web.StreamResponse:
        """``GET /v1/namespaces/{namespace}/tables``: the Iceberg datasets the caller sees, sorted; paged
        by ``pageSize`` (the token is the last name of the page before)."""
        check_namespace(request.match_info["namespace"])
        size = page_size(request.query.get("pageSize"))
        after = request.query.get("pageToken") or ""
        names = [name for name in await self.api.run(call, self.visible_tables) if name > after]
        body: dict[str, Any] = {"identifiers": [{"namespace": [NAMESPACE], "name": n} for n in names[:size]]}
        if size is not None and len(names) > size:
            body["next-page-token"] = names[size - 1]
        return self.api.answer(call, web.json_response(body))

    async def table(self, request: web.Request, call: HttpCall) -> web.StreamResponse:
        """``GET|HEAD /v1/namespaces/{namespace}/tables/{table}``: the LoadTableResult (metadata location,
        the table metadata as stored, and no per-table config), or 204 for HEAD."""
        check_namespace(request.match_info["namespace"])
        name = request.match_info["table"]
        if request.method == "HEAD":
            await self.api.run(call, self.resolve, name)
            return self.api.answer(call, web.Response(status=204))
        body = await self.api.run(call, self.load_result, name)
        return self.api.answer(call, web.Response(body=body, content_type="application/json"))

    async def token(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/oauth/tokens``: OAuth2 client credentials (form-encoded) for a bearer token."""
        record = CallRecord(rpc=f"POST {BASE}/v1/oauth/tokens", peer=request.remote or "")
        error: BaseException | None = None
        try:
            form = await request.post()
            answer = await self.api.off_loop(self.grant, {key: str(value) for key, value in form.items()})
            record.user = answer.pop("user")
            return web.json_response(answer, headers={"Cache-Control": "no-store"})
        except OAuthError as exc:
            error = Unauthenticated(str(exc)) if exc.status == 401 else InvalidArgument(str(exc))
            body = {"error": exc.error, "error_description": str(exc)}
            return web.json_response(body, status=exc.status, headers={"Cache-Control": "no-store"})
        except Exception as exc:
            error = exc
            return error_response(exc)
        finally:
            self.api.ended(record, error)

    # -- work on a worker thread, as the caller --------------------------------------------------
    def visible_tables(self) -> list[str]:
        """The Iceberg datasets the caller sees, sorted."""
        require(Role.READER, READING)
        return [name for name in self.services.datasets.iceberg.names() if visible(name)]

    def resolve(self, name: str) -> str:
        """The stored name of Iceberg dataset ``name`` (exact, else ignoring case as SQL and engines that
        fold identifiers do), or NoSuchTableException."""
        require(Role.READER, READING)
        datasets = self.services.datasets
        stored, table_format = name, datasets.format_of(name)
        if table_format is None:  # the name in another case, as engines that fold identifiers send it
            stored = datasets.find(name) or name
            table_format = datasets.format_of(stored)
        if table_format is None:
            raise NoSuchTable(f"table {NAMESPACE}.{name[:NAME_SHOWN_CHARS]} not found")
        if table_format is not datasets.iceberg:
            raise NoSuchTable(
                f"dataset {stored!r} is a Lance table, not an Iceberg table: read it with Lance "
                "(lance, lancedb, daft.read_lance) at the location describe_dataset gives"
            )
        return stored

    def load_result(self, name: str) -> bytes:
        """The LoadTableResult of ``name``, as JSON bytes."""
        stored = self.resolve(name)
        try:
            table = self.services.datasets.iceberg.catalog.load(stored)
        except NotFound:  # dropped meanwhile
            raise NoSuchTable(f"table {NAMESPACE}.{stored} not found") from None
        location = json.dumps(table.metadata_location)
        metadata = table.metadata.model_dump_json()  # what pyiceberg wrote to the metadata file
        return f'{{"metadata-location": {location}, "metadata": {metadata}, "config": {{}}}}'.encode()

    def grant(self, form: dict[str, str]) -> dict[str, Any]:
        """The token answer of a client-credentials grant (with ``user``: who it is for, for the audit)."""
        grant_type = form.get("grant_type", "")
        if grant_type != "client_credentials":
            raise OAuthError(
                400, "unsupported_grant_type", f"grant_type {grant_type[:50]!r}: only client_credentials"
            )
        gatekeeper = self.api.gatekeeper
        if gatekeeper is None:
            raise OAuthError(
                400, "invalid_request", "authentication is off on this server: connect without a credential"
            )
        client_id, secret = form.get("client_id", ""), form.get("client_secret", "")
        try:
            if secret.startswith(TOKEN_PREFIX) and not client_id:  # an API token is a bearer token
                identity = gatekeeper.authenticate(f"Bearer {secret}").identity
                answer: dict[str, Any] = {"access_token": secret}
            else:
                basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode("ascii")
                authenticated = gatekeeper.authenticate(f"Basic {basic}", login=True)
                identity = authenticated.identity
                answer = {
                    "access_token": authenticated.bearer,
                    "expires_in": round(gatekeeper.authenticator.bearer_ttl_seconds),
                }
        except Unauthenticated as exc:
            raise OAuthError(401, "invalid_client", str(exc)) from None
        return {
            **answer,
            "token_type": "bearer",
            "issued_token_type": "urn:ietf:params:oauth:token-type:access_token",
            "user": identity.name,
        }


def check_namespace(encoded: str) -> None:
    """NoSuchNamespaceException unless ``encoded`` (a path's namespace, levels joined by the separator) is
    the catalog's namespace."""
    if encoded != NAMESPACE:
        shown = encoded.replace(SEPARATOR, ".")[:NAME_SHOWN_CHARS]
        raise NoSuchNamespace(f"namespace {shown!r} not found; this catalog has one: {NAMESPACE!r}")


def page_size(value: str | None) -> int | None:
    """The ``pageSize`` parameter (None: everything in one page)."""
    if value is None:
        return None
    if not value.isdigit() or int(value) < 1:
        raise InvalidArgument(f"pageSize must be a positive integer, not {value[:50]!r}")
    return int(value)


def error_response(exc: BaseException) -> web.Response:
    """The protocol's ErrorModel for a refusal (401 with the same challenge as the other endpoints)."""
    exc = to_client_error(exc)
    status = getattr(exc, "http_status", None) or HTTP_STATUS.get(status_of(exc), 500)
    kind = getattr(exc, "iceberg_type", None) or ERROR_TYPES.get(status, "RESTException")
    headers = {"WWW-Authenticate": CHALLENGE} if status == 401 else {}
    if status == 503:
        headers["Retry-After"] = "1"
    body = {"error": {"message": first_line(exc), "type": kind, "code": status}}
    return web.json_response(body, status=status, headers=headers)
