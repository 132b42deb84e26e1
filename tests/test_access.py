"""Authentication, roles, grants and the audit log of a server started with ``--auth-file``, through real
clients: pyarrow Flight (Basic on the handshake or on any call, bearer tokens, API tokens) and ADBC with a
user name and password. Every role against every RPC, action and Flight SQL command; refusals change
nothing; a user's grants hide every other dataset everywhere; no secret reaches the audit log."""

from __future__ import annotations

import base64
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from adbc_driver_manager import Error as AdbcError
from google.protobuf import any_pb2

from flight_lakehouse import flight_sql_pb2 as sql
from flight_lakehouse.auth import AuthFile
from flight_lakehouse.protocol import pack
from tests.conftest import ServerProcess, vector_array
from tests.test_flight_sql_partitions import varint

ROLES = ("reader", "writer", "admin")
PASSWORDS = {
    "reader": "reader-secret-1",
    "writer": "writer-secret-2",
    "admin": "admin-secret-3",
    "sales": "sales-secret-4",
    "victim": "victim-secret-5",
    "leaver": "leaver-secret-6",
}
VECTORS = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
INVALID = "invalid credentials"


@dataclass
class Secured:
    """The module's server with authentication, its auth file and audit log, and secrets handed out."""

    server: ServerProcess
    auth: AuthFile
    audit: Path
    secrets: list[str]

    def login(self, user: str) -> Session:
        client = flight.connect(self.server.location)
        header = client.authenticate_basic_token(user, PASSWORDS[user])
        self.secrets.append(header[1].decode().removeprefix("Bearer "))
        return Session(client, flight.FlightCallOptions(headers=[header]))


@dataclass
class Session:
    """A client and the call options carrying its credentials."""

    client: flight.FlightClient
    options: flight.FlightCallOptions

    def action(self, name: str, body: dict | bytes | None = None) -> object:
        raw = body if isinstance(body, bytes) else json.dumps(body or {}).encode()
        results = list(self.client.do_action(flight.Action(name, raw), self.options))
        if not results or name[0].isupper() or name == "vector_search":  # Flight SQL, Arrow IPC bytes
            return results
        return json.loads(results[0].body.to_pybytes())

    def put(self, dataset: str, table: pa.Table) -> None:
        writer, _ = self.client.do_put(flight.FlightDescriptor.for_path(dataset), table.schema, self.options)
        with writer:
            writer.write_table(table)

    def sql(self, query: str) -> pa.Table:
        return self.client.do_get(flight.Ticket(json.dumps({"sql": query}).encode()), self.options).read_all()


def rows(start: int, count: int) -> pa.Table:
    return pa.table({"id": pa.array(range(start, start + count), pa.int64())})


def vectors(ids: list[int]) -> pa.Table:
    return pa.table({"id": pa.array(ids, pa.int64()), "vec": vector_array(VECTORS[: len(ids)])})


@pytest.fixture(scope="module")
def secured(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Secured:
    base = tmp_path_factory.mktemp("access")
    auth = AuthFile(base / "auth.json")
    for role in ROLES:
        auth.add_user(role, PASSWORDS[role], role)
    auth.add_user("sales", PASSWORDS["sales"], "writer", ["sales_*"])
    auth.add_user("victim", PASSWORDS["victim"], "reader")
    audit = base / "audit.log"
    server = ServerProcess(
        str(base / "lakehouse"),
        ["--auth-file", str(base / "auth.json")],
        {"LAKEHOUSE_AUDIT_LOG": str(audit), "LAKEHOUSE_AUTH_TOKEN_TTL_SECONDS": "3600"},
    )
    request.addfinalizer(server.kill)
    request.addfinalizer(server.stop)
    server.start()
    secured = Secured(server, auth, audit, list(PASSWORDS.values()))
    admin = secured.login("admin")
    for name, table in (
        ("shared", rows(0, 10)),
        ("secret", rows(0, 5)),
        ("sales_q1", rows(0, 7)),
        ("vecs", vectors([1, 2, 3])),
        ("sales_vecs", vectors([4, 5])),
    ):
        admin.put(name, table)
    return secured


def state(secured: Secured) -> list:
    """Every dataset with its rows and snapshots, as the admin sees them: what a refused call must leave."""
    admin = secured.login("admin")
    listed = admin.action("list_datasets")
    assert isinstance(listed, list)
    return [
        (entry["name"], entry["rows"], admin.action("dataset_history", {"dataset": entry["name"]}))
        for entry in sorted(listed, key=lambda entry: entry["name"])
    ]


# -- every role against every call -------------------------------------------------------------------------


def flight_sql_info(session: Session, command: object) -> flight.FlightInfo:
    descriptor = flight.FlightDescriptor.for_command(pack(command))  # type: ignore[arg-type]
    return session.client.get_flight_info(descriptor, session.options)


def flight_sql_query(session: Session, tag: str) -> None:
    info = flight_sql_info(session, sql.CommandStatementQuery(query="SELECT count(*) FROM shared"))
    assert session.client.do_get(info.endpoints[0].ticket, session.options).read_all().num_rows == 1


def flight_sql_tables(session: Session, tag: str) -> None:
    info = flight_sql_info(session, sql.CommandGetTables())
    assert session.client.do_get(info.endpoints[0].ticket, session.options).read_all().num_rows >= 1


def flight_sql_metadata(command: object) -> Callable[[Session, str], None]:
    """GetFlightInfo and DoGet of one Flight SQL metadata command."""

    def call(session: Session, tag: str) -> None:
        info = flight_sql_info(session, command)
        session.client.do_get(info.endpoints[0].ticket, session.options).read_all()

    return call


def flight_sql_update(session: Session, tag: str) -> None:
    """SQL that writes: refused as read-only for every role that may send it (it writes nothing)."""
    command = sql.CommandStatementUpdate(query="DELETE FROM shared")
    descriptor = flight.FlightDescriptor.for_command(pack(command))
    with pytest.raises(pa.ArrowInvalid, match="read-only"):
        writer, _ = session.client.do_put(descriptor, pa.schema([]), session.options)
        writer.close()


def cancel(session: Session, tag: str) -> None:
    info = flight_sql_info(session, sql.CommandStatementQuery(query="SELECT 1")).serialize()
    body = b"\x0a" + varint(len(info)) + info  # CancelFlightInfoRequest {FlightInfo info = 1}
    list(session.client.do_action(flight.Action("CancelFlightInfo", body), session.options))


def prepared(session: Session, tag: str) -> None:
    request = sql.ActionCreatePreparedStatementRequest(query="SELECT * FROM shared")
    [result] = session.action("CreatePreparedStatement", pack(request))  # type: ignore[misc]
    created = sql.ActionCreatePreparedStatementResult()
    any_pb2.Any.FromString(result.body.to_pybytes()).Unpack(created)
    close = sql.ActionClosePreparedStatementRequest(
        prepared_statement_handle=created.prepared_statement_handle
    )
    session.action("ClosePreparedStatement", pack(close))


def flight_sql_ingest(session: Session, tag: str) -> None:
    options = sql.CommandStatementIngest.TableDefinitionOptions(
        if_not_exist=sql.CommandStatementIngest.TableDefinitionOptions.TABLE_NOT_EXIST_OPTION_CREATE,
        if_exists=sql.CommandStatementIngest.TableDefinitionOptions.TABLE_EXISTS_OPTION_APPEND,
    )
    command = sql.CommandStatementIngest(table=f"fsql_{tag}", table_definition_options=options)
    table = rows(0, 3)
    descriptor = flight.FlightDescriptor.for_command(pack(command))
    writer, reader = session.client.do_put(descriptor, table.schema, session.options)
    with writer:
        writer.write_table(table)
        writer.done_writing()
        reader.read()


def put_path(session: Session, tag: str) -> None:
    session.put(f"put_{tag}", rows(0, 2))


def put_command(session: Session, tag: str) -> None:
    command = {"ingest": {"dataset": "shared", "mode": "append"}}
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    writer, _ = session.client.do_put(descriptor, rows(100, 1).schema, session.options)
    with writer:
        writer.write_table(rows(100, 1))


def drop(session: Session, tag: str) -> None:
    assert session.action("drop_dataset", {"dataset": f"put_{tag}", "if_exists": True}) in (
        {"dropped": True},
        {"dropped": False},
    )


def search_body() -> dict:
    return {"dataset": "vecs", "vector": VECTORS[0].tolist(), "k": 2}


def exchange(session: Session, tag: str) -> None:
    body = {"dataset": "vecs", "k": 2}
    descriptor = flight.FlightDescriptor.for_command(json.dumps({"search": body}).encode())
    writer, reader = session.client.do_exchange(descriptor, session.options)
    queries = pa.table({"vec": vector_array(VECTORS[:1])})
    with writer:
        writer.begin(queries.schema)
        writer.write_table(queries)
        writer.done_writing()
        assert reader.read_all().num_rows >= 1


#: Each call, the role it needs, and how to make it (``tag`` tells the roles' own datasets apart).
CALLS: list[tuple[str, str, Callable[[Session, str], object]]] = [
    ("ListActions", "reader", lambda s, tag: list(s.client.list_actions(s.options))),
    ("ListFlights", "reader", lambda s, tag: list(s.client.list_flights(options=s.options))),
    (
        "GetFlightInfo",
        "reader",
        lambda s, tag: s.client.get_flight_info(flight.FlightDescriptor.for_path("shared"), s.options),
    ),
    (
        "GetSchema",
        "reader",
        lambda s, tag: s.client.get_schema(flight.FlightDescriptor.for_path("shared"), s.options),
    ),
    ("DoGet sql", "reader", lambda s, tag: s.sql("SELECT count(*) AS n FROM shared")),
    (
        "DoGet scan",
        "reader",
        lambda s, tag: s.client.do_get(flight.Ticket(b'{"dataset": "shared"}'), s.options).read_all(),
    ),
    (
        "DoGet search",
        "reader",
        lambda s, tag: s.client.do_get(
            flight.Ticket(json.dumps({"search": search_body()}).encode()), s.options
        ).read_all(),
    ),
    ("DoExchange search", "reader", exchange),
    ("health", "reader", lambda s, tag: s.action("health")),
    ("list_datasets", "reader", lambda s, tag: s.action("list_datasets")),
    ("describe_dataset", "reader", lambda s, tag: s.action("describe_dataset", {"dataset": "shared"})),
    ("dataset_history", "reader", lambda s, tag: s.action("dataset_history", {"dataset": "shared"})),
    ("vector_search", "reader", lambda s, tag: s.action("vector_search", search_body())),
    ("CommandStatementQuery", "reader", flight_sql_query),
    ("CommandGetTables", "reader", flight_sql_tables),
    ("CreatePreparedStatement", "reader", prepared),
    ("CancelFlightInfo", "reader", cancel),
    ("CommandStatementUpdate", "reader", flight_sql_update),
    *(
        (type(command).__name__, "reader", flight_sql_metadata(command))
        for command in (
            sql.CommandGetCatalogs(),
            sql.CommandGetDbSchemas(),
            sql.CommandGetTableTypes(),
            sql.CommandGetSqlInfo(),
            sql.CommandGetXdbcTypeInfo(),
            sql.CommandGetPrimaryKeys(table="shared"),
            sql.CommandGetExportedKeys(table="shared"),
            sql.CommandGetImportedKeys(table="shared"),
            sql.CommandGetCrossReference(pk_table="shared", fk_table="shared"),
        )
    ),
    ("DoPut path", "writer", put_path),
    ("DoPut ingest", "writer", put_command),
    ("CommandStatementIngest", "writer", flight_sql_ingest),
    ("drop_dataset", "writer", drop),
    (
        "create_index",
        "writer",
        lambda s, tag: s.action(
            "create_index", {"dataset": "vecs", "column": "id", "kind": "btree", "replace": True}
        ),
    ),
    (
        "delete_rows",
        "writer",
        lambda s, tag: s.action("delete_rows", {"dataset": "vecs", "where": "id > 1000"}),
    ),
    ("optimize", "writer", lambda s, tag: s.action("optimize", {"dataset": "vecs"})),
    ("expire_snapshots", "writer", lambda s, tag: s.action("expire_snapshots", {"dataset": "vecs"})),
]


@pytest.mark.parametrize("role", ROLES)
def test_every_role_against_every_call(secured: Secured, role: str) -> None:
    """A call the role allows works; one it does not is PERMISSION_DENIED with a one-line message naming
    the role needed, and nothing committed changes."""
    session = secured.login(role)
    order = list(ROLES)
    for name, needed, call in CALLS:
        if order.index(role) >= order.index(needed):
            call(session, role)
            continue
        before = state(secured)
        with pytest.raises(flight.FlightUnauthorizedError) as refused:
            call(session, role)
        message = str(refused.value).split(". Detail:")[0]
        assert f"needs the {needed} role" in message and "\n" not in message, (name, message)
        assert state(secured) == before, f"{name} refused, yet something changed"


@pytest.mark.parametrize("name, call", [(name, call) for name, _, call in CALLS], ids=[c[0] for c in CALLS])
def test_no_credentials_no_call(secured: Secured, name: str, call: Callable[[Session, str], object]) -> None:
    """Without credentials every call is UNAUTHENTICATED, with the one message."""
    anonymous = Session(flight.connect(secured.server.location), flight.FlightCallOptions())
    with pytest.raises((flight.FlightUnauthenticatedError, OSError), match=INVALID):  # GetSchema: OSError
        call(anonymous, "anonymous")


# -- credentials -------------------------------------------------------------------------------------------


def basic(user: str, password: str) -> tuple[bytes, bytes]:
    return (b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))


def answers(secured: Secured, header: tuple[bytes, bytes]) -> pa.Table:
    client = flight.connect(secured.server.location)
    ticket = flight.Ticket(b'{"sql": "SELECT 42 AS answer"}')
    return client.do_get(ticket, flight.FlightCallOptions(headers=[header])).read_all()


def eventually(call: Callable[[], object], seconds: float = 3.0) -> object:
    """``call``'s result once it stops failing (the server re-reads the auth file within a second)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except flight.FlightError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def refused_with_one_message(call: Callable[[], object]) -> None:
    with pytest.raises(flight.FlightUnauthenticatedError) as refused:
        call()
    assert str(refused.value).startswith(INVALID), refused.value


def test_basic_on_any_call_and_the_bearer_token_it_returns(secured: Secured) -> None:
    """Basic credentials on a plain call work (no handshake) and the answer carries a bearer token that
    works alone; an API token is a bearer token."""
    assert answers(secured, basic("reader", PASSWORDS["reader"])).to_pylist() == [{"answer": 42}]
    client = flight.connect(secured.server.location)
    header = client.authenticate_basic_token("reader", PASSWORDS["reader"])
    assert header[1].startswith(b"Bearer ")
    assert answers(secured, header).num_rows == 1
    token = secured.auth.create_token("ci_reader", "reader", 3600)
    secured.secrets.append(token)
    assert eventually(lambda: answers(secured, (b"authorization", f"Bearer {token}".encode()))).num_rows == 1


@pytest.mark.parametrize(
    "header",
    [
        basic("reader", "not-the-password"),
        basic("nobody", "whatever-password"),
        (b"authorization", b"Basic !!!notbase64"),
        (b"authorization", b"Bearer not.a.token"),
        (b"authorization", b"Bearer flh_0000000000000000_forged"),
        (b"authorization", b"Digest abc"),
        (b"authorization", b"Basic " + base64.b64encode(b"x" * 5000)),
    ],
    ids=[
        "wrong_password",
        "unknown_user",
        "bad_base64",
        "garbage_bearer",
        "forged_api_token",
        "scheme",
        "huge",
    ],
)
def test_bad_credentials_are_one_message(secured: Secured, header: tuple[bytes, bytes]) -> None:
    refused_with_one_message(lambda: answers(secured, header))
    assert answers(secured, basic("reader", PASSWORDS["reader"])).num_rows == 1  # still serving


def test_tampered_expired_revoked_and_removed_credentials(secured: Secured) -> None:
    """A bearer token with one character changed, an API token revoked, and the token of a user removed
    while connected stop working (within the file's re-read interval)."""
    client = flight.connect(secured.server.location)
    _, bearer = client.authenticate_basic_token("writer", PASSWORDS["writer"])
    head, payload, signature = bearer.decode().removeprefix("Bearer ").split(".")
    flipped = signature[:-2] + ("A" if signature[-2] != "A" else "B") + signature[-1]
    for forged in (f"{head}.{payload}.{flipped}", f"{head}.{payload[:-1]}x.{signature}"):
        refused_with_one_message(
            lambda forged=forged: answers(secured, (b"authorization", f"Bearer {forged}".encode()))
        )

    token = secured.auth.create_token("short_lived", "reader", 3600)
    secured.secrets.append(token)
    assert eventually(lambda: answers(secured, (b"authorization", f"Bearer {token}".encode()))).num_rows == 1
    secured.auth.revoke_token("short_lived")
    time.sleep(1.5)
    refused_with_one_message(lambda: answers(secured, (b"authorization", f"Bearer {token}".encode())))

    secured.auth.add_user("leaver", PASSWORDS["leaver"], "reader")
    session = eventually(lambda: secured.login("leaver"))
    assert isinstance(session, Session)
    assert session.sql("SELECT 1 AS one").num_rows == 1
    secured.auth.remove_user("leaver")
    time.sleep(1.5)
    refused_with_one_message(lambda: session.sql("SELECT 1 AS one"))
    refused_with_one_message(lambda: answers(secured, basic("leaver", PASSWORDS["leaver"])))


def test_expired_bearer_tokens_are_refused(tmp_path: Path) -> None:
    """A server whose bearer tokens live 3 s: the token works, then is refused with the one message."""
    auth = AuthFile(tmp_path / "auth.json")
    auth.add_user("reader", PASSWORDS["reader"], "reader")
    server = ServerProcess(
        str(tmp_path / "lakehouse"),
        ["--auth-file", str(tmp_path / "auth.json")],
        {"LAKEHOUSE_AUTH_TOKEN_TTL_SECONDS": "3"},  # 1 s expired before its first use on a loaded machine
    )
    try:
        server.start()
        client = flight.connect(server.location)
        header = client.authenticate_basic_token("reader", PASSWORDS["reader"])
        options = flight.FlightCallOptions(headers=[header])
        assert list(client.list_actions(options))
        time.sleep(4.2)
        with pytest.raises(flight.FlightUnauthenticatedError, match=INVALID):
            list(client.list_actions(options))
    finally:
        server.stop()
        server.kill()


def test_login_takes_as_long_for_unknown_users_and_failures_are_slowed(secured: Secured) -> None:
    """A wrong password of a real user and any password of an unknown one take about as long; after
    repeated failures the name is refused at once for a while, then the right password works again."""

    def login_seconds(user: str) -> float:
        started = time.perf_counter()
        refused_with_one_message(lambda: answers(secured, basic(user, f"wrong-{time.time_ns()}")))
        return time.perf_counter() - started

    known = statistics.median(login_seconds("writer") for _ in range(3))
    unknown = statistics.median(login_seconds(f"ghost{i}") for i in range(3))
    assert min(known, unknown) > 0.01 and max(known, unknown) / min(known, unknown) < 3, (known, unknown)

    for _ in range(6):
        refused_with_one_message(lambda: answers(secured, basic("victim", "wrong-password")))
    with pytest.raises(flight.FlightUnauthenticatedError, match="too many failed logins"):
        answers(secured, basic("victim", PASSWORDS["victim"]))
    time.sleep(1.2)
    assert answers(secured, basic("victim", PASSWORDS["victim"])).num_rows == 1


def test_adbc_with_user_and_password(secured: Secured) -> None:
    """ADBC logs in with a user name and password (Basic on the handshake, then the bearer token); a
    reader queries and reads metadata; its ingest is refused; a wrong password cannot connect."""
    kwargs = {"username": "reader", "password": PASSWORDS["reader"]}
    with dbapi.connect(secured.server.location, db_kwargs=kwargs, autocommit=True) as connection:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM sales_q1")
            assert cursor.fetchone() == (7,)
            with pytest.raises(AdbcError, match="writer role"):
                cursor.adbc_ingest("adbc_reader", rows(0, 2), mode="create")
        objects = connection.adbc_get_objects(depth="tables").read_all().to_pylist()
        assert objects
    with pytest.raises(AdbcError, match=r"(?i)unauthenticated|invalid credentials"):
        bad = {"username": "reader", "password": "wrong-password"}
        with dbapi.connect(secured.server.location, db_kwargs=bad, autocommit=True) as connection:
            connection.cursor().execute("SELECT 1")


# -- grants ------------------------------------------------------------------------------------------------


def test_grants_hide_every_other_dataset(secured: Secured) -> None:
    """``sales`` (writer on ``sales_*``) sees and touches its datasets only: lists, ListFlights, Flight SQL
    metadata, SQL (catalog functions included), searches, describe, history and drops answer as if the
    others did not exist; writing another name is PERMISSION_DENIED, whether it exists or not."""
    sales = secured.login("sales")
    listed = sales.action("list_datasets")
    assert sorted(entry["name"] for entry in listed) == ["sales_q1", "sales_vecs"]  # type: ignore[union-attr]
    assert sorted(
        info.descriptor.path[0].decode() for info in sales.client.list_flights(options=sales.options)
    ) == [
        "sales_q1",
        "sales_vecs",
    ]
    tables = sales.client.do_get(
        flight_sql_info(sales, sql.CommandGetTables()).endpoints[0].ticket, sales.options
    )
    assert sorted(tables.read_all().column("table_name").to_pylist()) == ["sales_q1", "sales_vecs"]
    assert sales.sql("SELECT count(*) AS n FROM sales_q1").to_pylist() == [{"n": 7}]

    def not_found(call: Callable[[], object], name: str) -> str:
        with pytest.raises(pa.ArrowKeyError) as missing:
            call()
        message = str(missing.value).split(". Detail:")[0]
        assert name in message and "not found" in message, message
        return message

    hidden = not_found(lambda: sales.sql("SELECT * FROM secret"), "secret")
    absent = not_found(lambda: sales.sql("SELECT * FROM nosuch"), "nosuch")
    assert hidden.replace("secret", "X") == absent.replace("nosuch", "X")
    for body_name in ("describe_dataset", "dataset_history"):
        not_found(lambda body_name=body_name: sales.action(body_name, {"dataset": "secret"}), "secret")
    not_found(lambda: sales.action("drop_dataset", {"dataset": "shared"}), "shared")
    not_found(lambda: sales.action("vector_search", {**search_body(), "dataset": "vecs"}), "vecs")
    query = f"SELECT id FROM vector_search('vecs', {VECTORS[0].tolist()}, 2)"
    not_found(lambda: sales.sql(query), "vecs")
    assert sales.sql(query.replace("'vecs'", "'sales_vecs'")).num_rows == 2
    for catalog_query in (
        "SELECT table_name FROM information_schema.tables",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM sqlite_master",
    ):
        with pytest.raises(pa.ArrowException):
            sales.sql(catalog_query)

    before = state(secured)
    for name in ("secret", "brand_new"):
        with pytest.raises(flight.FlightUnauthorizedError, match="not in its grants"):
            sales.put(name, rows(0, 1))
    assert state(secured) == before
    sales.put("sales_q2", rows(0, 3))
    assert sales.sql("SELECT count(*) AS n FROM sales_q2").to_pylist() == [{"n": 3}]


# -- the audit log -----------------------------------------------------------------------------------------


def test_the_audit_log_has_a_line_per_call_and_no_secret(secured: Secured) -> None:
    session = secured.login("reader")
    session.sql("SELECT count(*) AS n FROM shared")
    with pytest.raises(flight.FlightUnauthorizedError):
        session.action("drop_dataset", {"dataset": "shared"})
    with pytest.raises(flight.FlightUnauthenticatedError):
        answers(secured, basic("reader", "wrong-password-x"))
    time.sleep(0.2)
    lines = [json.loads(line) for line in secured.audit.read_text().splitlines()]
    mine = [line for line in lines if line.get("user") == "reader"]
    assert any(
        line["rpc"] == "DoGet" and line["call"] == "sql" and line["rows"] == 1 and line["status"] == "OK"
        for line in mine
    )
    assert any(line.get("call") == "drop_dataset" and line["status"] == "PERMISSION_DENIED" for line in mine)
    assert any(line["status"] == "UNAUTHENTICATED" for line in lines)
    for line in lines:
        assert {"time", "rpc", "status", "ms"} <= set(line), line
    text = secured.audit.read_text() + "\n".join(secured.server.log_lines)
    for secret in [*secured.secrets, "wrong-password-x"]:
        assert secret not in text, "a secret reached the audit or server log"
