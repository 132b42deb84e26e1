"""The Iceberg REST catalog on the HTTP port, through pyiceberg's ``RestCatalog`` and raw HTTP: the listing
(Iceberg tables only, as the caller's grants allow), loading a table (the same metadata file the server
committed, and the same rows as DoGet), 404s, 401 without credentials, the OAuth2 token exchange, writes
refused with the protocol's ErrorModel, and an S3 root with the client's own storage keys."""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from pyiceberg.catalog.rest import RestCatalog
from pyiceberg.exceptions import (
    NoSuchNamespaceError,
    NoSuchTableError,
    OAuthError,
    UnauthorizedError,
)
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField

from flight_lakehouse.auth import AuthFile
from tests.conftest import ServerProcess, root_forms, running_server, s3_root, vector_array

PASSWORDS = {"reader": "reader-secret-1", "sales": "sales-secret-2", "admin": "admin-secret-3"}
#: Role and dataset grants of each user ("sales" sees only the datasets named sales_*).
USERS = {"reader": ("reader", ()), "sales": ("reader", ("sales_*",)), "admin": ("admin", ())}
EVENTS = pa.table(
    {
        "id": pa.array([3, 1, 2], pa.int64()),
        "city": pa.array(["Austin", "Boston", None]),
        "rate": pa.array([41.5, 52.0, 38.25]),
    }
)


@dataclass
class Secured:
    """A server with an auth file, the admin's Flight call options and a reader's API token."""

    server: ServerProcess
    admin: flight.FlightCallOptions
    token: str

    @property
    def uri(self) -> str:
        return f"{self.server.http_url}/iceberg"

    def catalog(self, credential: str) -> RestCatalog:
        """pyiceberg's REST client with OAuth2 client credentials, as the README configures it."""
        oauth = {"oauth2-server-uri": f"{self.uri}/v1/oauth/tokens"}
        return RestCatalog("lakehouse", uri=self.uri, credential=credential, **oauth)

    def sql(self, query: str) -> pa.Table:
        """The server's own answer (DoGet as the admin)."""
        ticket = flight.Ticket(json.dumps({"sql": query}).encode())
        return self.server.client.do_get(ticket, self.admin).read_all()

    def describe(self, name: str) -> dict[str, Any]:
        action = flight.Action("describe_dataset", json.dumps({"dataset": name}).encode())
        return json.loads(next(iter(self.server.client.do_action(action, self.admin))).body.to_pybytes())


def put(server: ServerProcess, options: flight.FlightCallOptions, name: str, table: pa.Table) -> None:
    writer, reader = server.client.do_put(flight.FlightDescriptor.for_path(name), table.schema, options)
    with writer:
        writer.write_table(table)
        writer.done_writing()
        reader.read()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    """Two Iceberg datasets (one with two snapshots) and a Lance one, on a server with users and grants."""
    base = tmp_path_factory.mktemp("iceberg-rest")
    auth = AuthFile(base / "auth.json")
    for user, (role, grants) in USERS.items():
        auth.add_user(user, PASSWORDS[user], role, grants)
    token = auth.create_token("engines", "reader")
    with running_server(str(base / "lakehouse"), "--auth-file", str(base / "auth.json")) as server:
        header = server.client.authenticate_basic_token("admin", PASSWORDS["admin"])
        admin = flight.FlightCallOptions(headers=[header])
        put(server, admin, "events", EVENTS)
        put(server, admin, "events", EVENTS.slice(0, 1))
        put(server, admin, "sales_q1", pa.table({"id": pa.array(range(5), pa.int64())}))
        vectors = vector_array(np.arange(12, dtype=np.float32).reshape(3, 4))
        put(server, admin, "docs", pa.table({"id": pa.array([1, 2, 3], pa.int64()), "vec": vectors}))
        yield Secured(server, admin, token)


def by_id(table: pa.Table) -> list[dict]:
    return sorted(table.to_pylist(), key=lambda row: row["id"])


# -- raw HTTP --------------------------------------------------------------------------------------------


def call(
    url: str, method: str = "GET", headers: dict[str, str] | None = None, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()}


def assert_error(answer: tuple[int, dict[str, str], bytes], status: int, kind: str, *fragments: str) -> str:
    """The protocol's ErrorModel with this status and type: one line, no traceback."""
    code, _, body = answer
    assert code == status, (code, body)
    error = json.loads(body)["error"]
    assert error["code"] == status and error["type"] == kind, error
    assert "\n" not in error["message"] and "Traceback" not in error["message"], error
    for fragment in fragments:
        assert fragment in error["message"], error
    return error["message"]


def test_the_protocol_over_raw_http(secured: Secured) -> None:
    uri, auth = secured.uri, bearer(secured.token)
    status, _, body = call(f"{uri}/v1/config?warehouse=anything", headers=auth)
    config = json.loads(body)
    assert status == 200 and config["overrides"] == {}, config
    assert "GET /v1/{prefix}/namespaces/{namespace}/tables/{table}" in config["endpoints"]
    assert not any(endpoint.startswith(("POST", "DELETE")) for endpoint in config["endpoints"])
    assert json.loads(call(f"{uri}/v1/namespaces", headers=auth)[2]) == {"namespaces": [["lakehouse"]]}
    assert json.loads(call(f"{uri}/v1/namespaces?parent=lakehouse", headers=auth)[2]) == {"namespaces": []}
    assert json.loads(call(f"{uri}/v1/namespaces/lakehouse", headers=auth)[2]) == {
        "namespace": ["lakehouse"],
        "properties": {},
    }
    assert call(f"{uri}/v1/namespaces/lakehouse", "HEAD", auth)[0] == 204
    assert call(f"{uri}/v1/namespaces/lakehouse/tables/events", "HEAD", auth)[0] == 204
    assert call(f"{uri}/v1/namespaces/lakehouse/tables/nope", "HEAD", auth)[0] == 404
    assert call(f"{uri}/v1/namespaces/nope", "HEAD", auth)[0] == 404

    listing = json.loads(call(f"{uri}/v1/namespaces/lakehouse/tables", headers=auth)[2])
    names = [entry["name"] for entry in listing["identifiers"]]
    assert names == ["events", "sales_q1"], listing  # the Lance table "docs" is not an Iceberg table
    assert all(entry["namespace"] == ["lakehouse"] for entry in listing["identifiers"])
    first = json.loads(call(f"{uri}/v1/namespaces/lakehouse/tables?pageSize=1", headers=auth)[2])
    assert [entry["name"] for entry in first["identifiers"]] == ["events"]
    token = first["next-page-token"]
    second = json.loads(
        call(f"{uri}/v1/namespaces/lakehouse/tables?pageSize=1&pageToken={token}", headers=auth)[2]
    )
    assert [entry["name"] for entry in second["identifiers"]] == [
        "sales_q1"
    ] and "next-page-token" not in second
    assert_error(
        call(f"{uri}/v1/namespaces/lakehouse/tables?pageSize=0", headers=auth), 400, "BadRequestException"
    )

    status, _, body = call(f"{uri}/v1/namespaces/lakehouse/tables/events", headers=auth)
    loaded = json.loads(body)
    facts = secured.describe("events")
    assert status == 200 and loaded["metadata-location"] == facts["metadata_location"]
    assert loaded["config"] == {}
    metadata = loaded["metadata"]
    assert metadata["current-snapshot-id"] == facts["snapshot_id"] and len(metadata["snapshots"]) == 2
    assert loaded["metadata-location"].startswith(metadata["location"] + "/metadata/")
    # case-insensitive, as SQL and engines that fold identifiers (Trino) address it
    upper = json.loads(call(f"{uri}/v1/namespaces/lakehouse/tables/EVENTS", headers=auth)[2])
    assert upper["metadata-location"] == loaded["metadata-location"]

    table_url = f"{uri}/v1/namespaces/lakehouse/tables"
    assert_error(call(f"{table_url}/nope", headers=auth), 404, "NoSuchTableException", "lakehouse.nope")
    assert_error(call(f"{table_url}/docs", headers=auth), 404, "NoSuchTableException", "'docs'", "Lance")
    assert_error(
        call(f"{uri}/v1/namespaces/other/tables", headers=auth), 404, "NoSuchNamespaceException", "'other'"
    )
    assert_error(call(f"{uri}/v1/namespaces/a%1Fb", headers=auth), 404, "NoSuchNamespaceException", "'a.b'")
    assert_error(call(f"{uri}/v1/namespaces/lakehouse/views", headers=auth), 404, "NotFoundException")


def test_writes_are_refused_and_change_nothing(secured: Secured) -> None:
    uri, auth = secured.uri, {**bearer(secured.token), "Content-Type": "application/json"}
    before = secured.describe("events")
    create = json.dumps({"name": "made", "schema": {"type": "struct", "fields": []}}).encode()
    writes = [
        ("POST", f"{uri}/v1/namespaces", json.dumps({"namespace": ["x"]}).encode()),
        ("DELETE", f"{uri}/v1/namespaces/lakehouse", None),
        ("POST", f"{uri}/v1/namespaces/lakehouse/properties", b"{}"),
        ("POST", f"{uri}/v1/namespaces/lakehouse/tables", create),
        ("POST", f"{uri}/v1/namespaces/lakehouse/tables/events", b'{"requirements": [], "updates": []}'),
        ("DELETE", f"{uri}/v1/namespaces/lakehouse/tables/events?purgeRequested=true", None),
        ("POST", f"{uri}/v1/tables/rename", b"{}"),
        ("POST", f"{uri}/v1/namespaces/lakehouse/register", b"{}"),
        ("POST", f"{uri}/v1/transactions/commit", b"{}"),
    ]
    for method, url, body in writes:
        message = assert_error(call(url, method, auth, body), 406, "UnsupportedOperationException", method)
        assert "read-only" in message and "Flight" in message
    # refused before anything else: without credentials the answer is 401, not 406
    assert call(f"{uri}/v1/namespaces/lakehouse/tables/events", "DELETE")[0] == 401
    after = secured.describe("events")
    assert after["metadata_location"] == before["metadata_location"]
    names = [
        entry["name"]
        for entry in json.loads(call(f"{uri}/v1/namespaces/lakehouse/tables", headers=auth)[2])["identifiers"]
    ]
    assert names == ["events", "sales_q1"]

    catalog = RestCatalog("lakehouse", uri=secured.uri, token=secured.token)
    schema = Schema(NestedField(1, "id", LongType(), required=False))
    with pytest.raises(NotImplementedError, match="does not support"):  # the client knows from /config
        catalog.create_table("lakehouse.made", schema)
    with pytest.raises(NotImplementedError):
        catalog.drop_table("lakehouse.events")


def test_authentication_is_the_http_ports(secured: Secured) -> None:
    uri = secured.uri
    for path in ("/v1/config", "/v1/namespaces", "/v1/namespaces/lakehouse/tables/events", "/v1/nowhere"):
        status, headers, body = call(uri + path)
        assert_error((status, headers, body), 401, "NotAuthorizedException")
        assert "Bearer" in headers["WWW-Authenticate"], headers
    assert_error(
        call(f"{uri}/v1/namespaces", headers=bearer("flh_forged_token")), 401, "NotAuthorizedException"
    )
    # Basic credentials answer with a bearer token, as every other endpoint does
    status, headers, _ = call(f"{uri}/v1/namespaces", headers=basic("reader"))
    assert status == 200 and headers["Authorization"].startswith("Bearer ")
    assert call(f"{uri}/v1/namespaces", headers={"Authorization": headers["Authorization"]})[0] == 200

    with pytest.raises(UnauthorizedError):
        RestCatalog("lakehouse", uri=uri)
    with pytest.raises(UnauthorizedError):
        RestCatalog("lakehouse", uri=uri, token="flh_not_a_token")


def test_oauth_client_credentials_are_users_and_api_tokens(secured: Secured) -> None:
    uri = secured.uri
    expected = by_id(secured.sql("SELECT * FROM events"))
    for credential in (f"reader:{PASSWORDS['reader']}", f":{secured.token}"):
        catalog = secured.catalog(credential)
        assert by_id(catalog.load_table("lakehouse.events").scan().to_arrow()) == expected
    with pytest.raises(OAuthError, match="invalid_client"):
        secured.catalog("reader:wrong-password")
    with pytest.raises(OAuthError, match="invalid_client"):
        secured.catalog(":flh_forged_token")

    form = b"grant_type=password&username=reader&password=x"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    status, _, body = call(f"{uri}/v1/oauth/tokens", "POST", headers, form)
    assert status == 400 and json.loads(body)["error"] == "unsupported_grant_type", body
    form = f"grant_type=client_credentials&client_id=reader&client_secret={PASSWORDS['reader']}".encode()
    status, headers_out, body = call(f"{uri}/v1/oauth/tokens", "POST", headers, form)
    answer = json.loads(body)
    assert status == 200 and answer["token_type"] == "bearer" and answer["expires_in"] > 0, answer
    assert headers_out["Cache-Control"] == "no-store"
    assert call(f"{uri}/v1/namespaces", headers=bearer(answer["access_token"]))[0] == 200


def test_pyiceberg_rest_catalog_reads_what_the_server_wrote(secured: Secured) -> None:
    catalog = RestCatalog("lakehouse", uri=secured.uri, token=secured.token)
    assert catalog.list_namespaces() == [("lakehouse",)]
    assert catalog.namespace_exists("lakehouse") and not catalog.namespace_exists("other")
    assert catalog.list_tables("lakehouse") == [("lakehouse", "events"), ("lakehouse", "sales_q1")]
    for name in ("events", "sales_q1"):
        table = catalog.load_table(f"lakehouse.{name}")
        assert table.metadata_location == secured.describe(name)["metadata_location"]
        assert by_id(table.scan().to_arrow()) == by_id(secured.sql(f"SELECT * FROM {name}"))
    table = catalog.load_table("lakehouse.events")
    assert len(table.metadata.snapshots) == 2
    first = min(table.metadata.snapshots, key=lambda snapshot: snapshot.timestamp_ms).snapshot_id
    assert (
        table.scan(snapshot_id=first).to_arrow().num_rows == EVENTS.num_rows
    )  # time travel, as Iceberg does
    assert catalog.table_exists("lakehouse.events") and not catalog.table_exists("lakehouse.docs")
    with pytest.raises(NoSuchTableError, match="Lance"):
        catalog.load_table("lakehouse.docs")
    with pytest.raises(NoSuchTableError, match=r"lakehouse\.missing"):
        catalog.load_table("lakehouse.missing")
    with pytest.raises(NoSuchNamespaceError):
        catalog.list_tables("other")


def test_grants_decide_what_a_user_sees(secured: Secured) -> None:
    catalog = secured.catalog(f"sales:{PASSWORDS['sales']}")
    assert catalog.list_tables("lakehouse") == [("lakehouse", "sales_q1")]
    assert catalog.load_table("lakehouse.sales_q1").scan().to_arrow().num_rows == 5
    with pytest.raises(NoSuchTableError, match=r"lakehouse\.events"):  # hidden is "not found", as on Flight
        catalog.load_table("lakehouse.events")
    assert not catalog.table_exists("lakehouse.events")


# -- without authentication, on an S3 root ---------------------------------------------------------------


@pytest.mark.parametrize("storage_root", ["s3"], indirect=True)
def test_an_s3_root_with_the_clients_own_keys(storage_root: str) -> None:
    root = s3_root(storage_root)
    with running_server(storage_root) as server:
        server.put("events", EVENTS)
        server.put("events", EVENTS.slice(0, 1), mode="append")
        status, _, body = call(f"{server.http_url}/iceberg/v1/config")
        defaults = json.loads(body)["defaults"]
        assert status == 200 and defaults["s3.endpoint"] == root.s3.endpoint, defaults
        assert defaults["s3.region"] and defaults["warehouse"] == f"{root.url}/tables"
        text = body.decode()
        assert root.s3.access_key not in text and root.s3.secret_key not in text  # no credential vending
        assert "secret" not in text
        keys = {"s3.access-key-id": root.s3.access_key, "s3.secret-access-key": root.s3.secret_key}
        catalog = RestCatalog("lakehouse", uri=f"{server.http_url}/iceberg", **keys)
        table = catalog.load_table("lakehouse.events")
        assert table.metadata_location.startswith(root.url + "/tables/events/metadata/")
        assert by_id(table.scan().to_arrow()) == by_id(server.sql("SELECT * FROM events"))
        for form in root_forms(storage_root)[2:]:  # the server's local state directory is never shown
            assert form not in text
        # without --auth-file there is no credential to exchange: a clear OAuth2 error, not a dummy token
        form = b"grant_type=client_credentials&client_id=reader&client_secret=x"
        headers = {"Content-Type": "application/x-www-form-urlencoded"}
        status, _, body = call(f"{server.http_url}/iceberg/v1/oauth/tokens", "POST", headers, form)
        answer = json.loads(body)
        assert status == 400 and answer["error"] == "invalid_request", answer
        assert "authentication is off" in answer["error_description"]
