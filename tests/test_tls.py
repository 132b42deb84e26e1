"""TLS and mutual TLS with certificates made here (trustme): real servers started with ``--tls-cert``,
pyarrow, ADBC and CLI clients that trust the CA or not, plaintext clients against a TLS port, client
certificates, authentication over TLS, start-up refusals of bad TLS files, and the clear-text warning."""

from __future__ import annotations

import json
import logging
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import adbc_driver_flightsql.dbapi as dbapi
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import trustme
from adbc_driver_flightsql import DatabaseOptions
from adbc_driver_manager import Error as AdbcError

from flight_lakehouse.auth import AuthFile
from flight_lakehouse.settings import Settings, SettingsError, load_settings
from flight_lakehouse.tls import CLEAR_TEXT_WARNING, server_tls_options, warn_if_clear_text
from tests.conftest import ServerProcess

PASSWORD = "alice-password-1"
QUICK = flight.FlightCallOptions(timeout=10)  # a refused handshake fails at once; never wait longer


@dataclass(frozen=True)
class Pki:
    """PEM files: the server's CA and certificate, a client CA with a client certificate, and a rogue CA's
    certificate (server and client side) that nobody here trusts."""

    dir: Path

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def pem(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    base = tmp_path_factory.mktemp("pki")
    ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(base / "ca.pem")
    client_ca.cert_pem.write_to_path(base / "client-ca.pem")
    rogue_ca.cert_pem.write_to_path(base / "rogue-ca.pem")
    for name, issuer, identities in (
        ("server", ca, ("127.0.0.1", "localhost")),
        ("client", client_ca, ("client@example.org",)),
        ("rogue", rogue_ca, ("rogue@example.org",)),
    ):
        cert = issuer.issue_cert(*identities)
        (base / f"{name}.pem").write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        cert.private_key_pem.write_to_path(base / f"{name}.key")
    (base / "garbage.pem").write_text("not a certificate\n")
    (base / "bad-base64.pem").write_text("-----BEGIN CERTIFICATE-----\n@@@\n-----END CERTIFICATE-----\n")
    return Pki(base)


def started(request: pytest.FixtureRequest, server: ServerProcess) -> ServerProcess:
    """``server`` started, and stopped (by pid) at the end of the module."""
    request.addfinalizer(server.kill)
    request.addfinalizer(server.stop)
    return server.start()


def tls_args(pki: Pki) -> list[str]:
    return ["--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server.key")]


@pytest.fixture(scope="module")
def tls_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> ServerProcess:
    root = tmp_path_factory.mktemp("tls") / "lakehouse"
    return started(request, ServerProcess(str(root), tls_args(pki), tls_root=pki.pem("ca.pem")))


@pytest.fixture(scope="module")
def mtls_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> ServerProcess:
    root = tmp_path_factory.mktemp("mtls") / "lakehouse"
    args = [*tls_args(pki), "--tls-client-ca", pki.path("client-ca.pem")]
    return started(request, ServerProcess(str(root), args, tls_root=pki.pem("ca.pem")))


@pytest.fixture(scope="module")
def auth_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> ServerProcess:
    base = tmp_path_factory.mktemp("tls-auth")
    AuthFile(base / "auth.json").add_user("alice", PASSWORD, "writer")
    args = [*tls_args(pki), "--auth-file", str(base / "auth.json")]
    return started(request, ServerProcess(str(base / "lakehouse"), args, tls_root=pki.pem("ca.pem")))


def port(server: ServerProcess) -> str:
    return server.location.rsplit(":", 1)[1]


def health(client: flight.FlightClient, options: flight.FlightCallOptions = QUICK) -> dict:
    results = list(client.do_action(flight.Action("health", b"{}"), options))
    return json.loads(results[0].body.to_pybytes())


def assert_refused_quickly(client: flight.FlightClient) -> str:
    """A call that fails at the TLS handshake: UNAVAILABLE, in well under the call's time limit."""
    began = time.monotonic()
    with pytest.raises(flight.FlightUnavailableError) as exc:
        health(client)
    assert time.monotonic() - began < 5
    return str(exc.value)


def adbc_query(location: str, db_kwargs: dict[str, str], sql: str) -> list[tuple]:
    """The rows of ``sql`` run by the ADBC Flight SQL driver."""
    connection = dbapi.connect(location, db_kwargs=db_kwargs, autocommit=True)
    with connection, connection.cursor() as cursor:
        cursor.execute(sql)
        return cursor.fetchall()


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``flight-lakehouse ARGS`` without the caller's LAKEHOUSE_* credentials and TLS files."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("LAKEHOUSE_")}
    return subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
        stdin=subprocess.DEVNULL,
    )


# -- TLS -------------------------------------------------------------------------------------------------


def test_tls_round_trip(tls_server: ServerProcess) -> None:
    """A client that trusts the CA puts a dataset and reads it back with SQL, over grpc+tls."""
    assert tls_server.location.startswith("grpc+tls://127.0.0.1:")
    table = pa.table({"id": pa.array(range(100), pa.int64()), "name": [f"n{i}" for i in range(100)]})
    assert tls_server.put("over_tls", table)["rows_written"] == 100
    assert tls_server.sql("SELECT count(*) AS n, sum(id) AS s FROM over_tls").to_pylist() == [
        {"n": 100, "s": sum(range(100))}
    ]


def test_untrusted_server_certificate_is_refused(tls_server: ServerProcess, pki: Pki) -> None:
    """A client whose roots do not include the server's CA refuses the server, quickly and cleanly."""
    client = flight.connect(tls_server.location, tls_root_certs=pki.pem("rogue-ca.pem"))
    try:
        assert "Traceback" not in assert_refused_quickly(client)
    finally:
        client.close()


def test_plaintext_client_against_tls_port(tls_server: ServerProcess) -> None:
    """A plaintext grpc:// client fails cleanly; the server keeps serving TLS clients."""
    for _ in range(3):
        client = flight.connect(f"grpc://127.0.0.1:{port(tls_server)}")
        try:
            assert_refused_quickly(client)
        finally:
            client.close()
    assert tls_server.process is not None and tls_server.process.poll() is None
    assert health(tls_server.client)["status"] == "ok"


def test_adbc_over_tls(tls_server: ServerProcess, pki: Pki) -> None:
    """The ADBC Flight SQL driver runs a query over TLS with the CA as its trusted root."""
    db_kwargs = {DatabaseOptions.TLS_ROOT_CERTS.value: pki.pem("ca.pem").decode()}
    assert adbc_query(tls_server.location, db_kwargs, "SELECT 42 AS answer") == [(42,)]


# -- mutual TLS ------------------------------------------------------------------------------------------


def test_mtls_needs_a_client_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    """With --tls-client-ca, a client without a certificate, or with one of another CA, is refused."""
    roots = pki.pem("ca.pem")
    anonymous = flight.connect(mtls_server.location, tls_root_certs=roots)
    rogue = flight.connect(
        mtls_server.location,
        tls_root_certs=roots,
        cert_chain=pki.pem("rogue.pem"),
        private_key=pki.pem("rogue.key"),
    )
    try:
        assert_refused_quickly(anonymous)
        assert_refused_quickly(rogue)
    finally:
        anonymous.close()
        rogue.close()


def test_mtls_with_a_client_certificate(mtls_server: ServerProcess, pki: Pki) -> None:
    """A certificate of the client CA is accepted, by pyarrow and by ADBC."""
    client = flight.connect(
        mtls_server.location,
        tls_root_certs=pki.pem("ca.pem"),
        cert_chain=pki.pem("client.pem"),
        private_key=pki.pem("client.key"),
    )
    try:
        assert health(client)["status"] == "ok"
    finally:
        client.close()
    db_kwargs = {
        DatabaseOptions.TLS_ROOT_CERTS.value: pki.pem("ca.pem").decode(),
        DatabaseOptions.MTLS_CERT_CHAIN.value: pki.pem("client.pem").decode(),
        DatabaseOptions.MTLS_PRIVATE_KEY.value: pki.pem("client.key").decode(),
    }
    assert adbc_query(mtls_server.location, db_kwargs, "SELECT 7 AS seven") == [(7,)]


def https_get(server: ServerProcess, path: str, context: ssl.SSLContext) -> tuple[int, bytes]:
    """Status and body of a GET on the server's HTTP port."""
    with urllib.request.urlopen(f"{server.http_url}{path}", context=context, timeout=10) as answer:
        return answer.status, answer.read()


def test_the_http_port_serves_https_with_the_same_certificate(tls_server: ServerProcess, pki: Pki) -> None:
    assert tls_server.http_url.startswith("https://127.0.0.1:")
    trusting = ssl.create_default_context(cafile=pki.path("ca.pem"))
    assert https_get(tls_server, "/healthz", trusting) == (200, b'{"status": "ok"}')
    body = json.dumps({"sql": "SELECT 5 AS five"}).encode()
    request = urllib.request.Request(f"{tls_server.http_url}/v1/query", data=body)
    with urllib.request.urlopen(request, context=trusting, timeout=10) as answer:
        assert pa.ipc.open_stream(answer).read_all().column("five").to_pylist() == [5]
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        https_get(tls_server, "/healthz", ssl.create_default_context(cafile=pki.path("rogue-ca.pem")))
    with pytest.raises((urllib.error.URLError, ConnectionError)):  # clear text to the TLS port
        urllib.request.urlopen(tls_server.http_url.replace("https://", "http://") + "/healthz", timeout=10)


def test_the_http_port_requires_client_certificates_under_mtls(mtls_server: ServerProcess, pki: Pki) -> None:
    without = ssl.create_default_context(cafile=pki.path("ca.pem"))
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        https_get(mtls_server, "/healthz", without)
    with_certificate = ssl.create_default_context(cafile=pki.path("ca.pem"))
    with_certificate.load_cert_chain(pki.path("client.pem"), pki.path("client.key"))
    assert https_get(mtls_server, "/healthz", with_certificate)[0] == 200


# -- authentication over TLS -----------------------------------------------------------------------------


def test_basic_login_over_tls(auth_server: ServerProcess, pki: Pki) -> None:
    """Basic credentials over TLS give a bearer token that later calls use; no credentials: refused.
    ADBC logs in with a user name and password over TLS too."""
    client = flight.connect(auth_server.location, tls_root_certs=pki.pem("ca.pem"))
    try:
        header = client.authenticate_basic_token("alice", PASSWORD, QUICK)
        assert header[1].startswith(b"Bearer ")
        assert health(client, flight.FlightCallOptions(headers=[header], timeout=10))["status"] == "ok"
        with pytest.raises(flight.FlightUnauthenticatedError):
            health(client)
    finally:
        client.close()
    db_kwargs = {
        "username": "alice",
        "password": PASSWORD,
        DatabaseOptions.TLS_ROOT_CERTS.value: pki.pem("ca.pem").decode(),
    }
    assert adbc_query(auth_server.location, db_kwargs, "SELECT 1 AS one") == [(1,)]


def test_cli_client_over_tls_with_credentials(auth_server: ServerProcess, pki: Pki) -> None:
    """The CLI talks to a TLS server with --tls-ca: as a user (password from the environment), with a
    bearer token from LAKEHOUSE_TOKEN (and ``host:port`` without a scheme), and not without either."""
    login = {"LAKEHOUSE_USER": "alice", "LAKEHOUSE_PASSWORD": PASSWORD}
    server = ["--server", auth_server.location, "--tls-ca", pki.path("ca.pem")]
    answered = cli("query", "SELECT 42 AS answer", "--format", "csv", *server, env=login)
    assert answered.returncode == 0, answered.stderr
    assert answered.stdout.splitlines() == ['"answer"', "42"]

    client = flight.connect(auth_server.location, tls_root_certs=pki.pem("ca.pem"))
    token = client.authenticate_basic_token("alice", PASSWORD, QUICK)[1].decode().removeprefix("Bearer ")
    client.close()
    by_token = cli(
        "datasets",
        "--server",
        f"127.0.0.1:{port(auth_server)}",
        env={"LAKEHOUSE_TOKEN": token, "LAKEHOUSE_TLS_CA": pki.path("ca.pem")},
    )
    assert by_token.returncode == 0, by_token.stderr
    assert "name" in by_token.stdout

    anonymous = cli("query", "SELECT 1", *server)
    assert anonymous.returncode != 0
    assert "Traceback" not in anonymous.stderr
    assert len(anonymous.stderr.strip().splitlines()) == 1, anonymous.stderr

    untrusting = cli("query", "SELECT 1", "--server", auth_server.location, env=login)
    assert untrusting.returncode != 0 and "Traceback" not in untrusting.stderr


# -- refusals at start-up --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--tls-cert", "server.pem", "--tls-key", "nope.key"], ["--tls-key", "nope.key", "cannot be read"]),
        (["--tls-cert", "server.pem"], ["--tls-cert needs --tls-key"]),
        (["--tls-key", "server.key"], ["--tls-key needs --tls-cert"]),
        (["--tls-client-ca", "client-ca.pem"], ["--tls-client-ca", "needs --tls-cert"]),
        (["--tls-cert", "garbage.pem", "--tls-key", "server.key"], ["--tls-cert", "garbage.pem", "no PEM"]),
        (["--tls-cert", "server.pem", "--tls-key", "garbage.pem"], ["--tls-key", "garbage.pem", "no PEM"]),
        (["--tls-cert", "bad-base64.pem", "--tls-key", "server.key"], ["bad-base64.pem", "malformed PEM"]),
        (["--tls-cert", "server.pem", "--tls-key", "rogue.key"], ["rogue.key", "key values mismatch"]),
        (
            ["--tls-cert", "server.pem", "--tls-key", "server.key", "--tls-client-ca", "garbage.pem"],
            ["--tls-client-ca", "garbage.pem", "no PEM"],
        ),
    ],
    ids=[
        "missing-key-file",
        "cert-without-key",
        "key-without-cert",
        "client-ca-without-cert",
        "garbage-cert",
        "garbage-key",
        "malformed-cert",
        "key-of-another-cert",
        "garbage-client-ca",
    ],
)
def test_bad_tls_files_refuse_to_start(
    pki: Pki, tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    """Each exits non-zero with one error line naming the problem: no traceback, no gRPC log noise."""
    paths = [pki.path(arg) if not arg.startswith("--") else arg for arg in args]
    result = cli("serve", "--root", str(tmp_path / "lakehouse"), "--port", "0", "--http-port=-1", *paths)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: "), result.stderr
    for fragment in fragments:
        assert fragment in last, result.stderr
    assert "Traceback" not in result.stderr and "E0000" not in result.stderr, result.stderr


def test_settings_of_tls(pki: Pki, tmp_path: Path) -> None:
    """A certificate makes the location grpc+tls; the options carry the PEMs read once; mTLS adds the
    client CA; a mismatched pair is refused by ``load_settings``-style one-liners."""
    plain = Settings(root=str(tmp_path))
    assert plain.location.startswith("grpc://") and server_tls_options(plain) == {}
    settings = load_settings(
        root=str(tmp_path),
        tls_cert=pki.path("server.pem"),
        tls_key=pki.path("server.key"),
        tls_client_ca=pki.path("client-ca.pem"),
    )
    assert settings.location == "grpc+tls://127.0.0.1:8815"
    options = server_tls_options(settings)
    assert options["verify_client"] is True and options["root_certificates"] == pki.pem("client-ca.pem")
    [pair] = options["tls_certificates"]
    assert pair.cert == pki.pem("server.pem") and pair.key == pki.pem("server.key")
    with pytest.raises(SettingsError, match=r"^invalid settings: --tls-key needs --tls-cert"):
        load_settings(root=str(tmp_path), tls_key=pki.path("server.key"))


# -- the clear-text warning ------------------------------------------------------------------------------


def test_clear_text_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture, pki: Pki) -> None:
    """Authentication without TLS on a non-loopback address warns; with TLS, on loopback, or without
    authentication it does not (the function the CLI calls at start, so no public address is bound)."""
    auth = str(tmp_path / "auth.json")
    tls = {"tls_cert": pki.path("server.pem"), "tls_key": pki.path("server.key")}
    cases = [
        (Settings(root=str(tmp_path), host="0.0.0.0", auth_file=auth), True),
        (Settings(root=str(tmp_path), host="192.0.2.10", auth_file=auth), True),
        (Settings(root=str(tmp_path), host="0.0.0.0", auth_file=auth, **tls), False),
        (Settings(root=str(tmp_path), host="127.0.0.1", auth_file=auth), False),
        (Settings(root=str(tmp_path), host="::1", auth_file=auth), False),
        (Settings(root=str(tmp_path), host="0.0.0.0", insecure_no_auth=True), False),
    ]
    for settings, warns in cases:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="flight_lakehouse"):
            assert warn_if_clear_text(settings) is warns
        messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert messages == ([CLEAR_TEXT_WARNING] if warns else []), settings.host
    assert "passwords and tokens travel in clear" in CLEAR_TEXT_WARNING


def test_adbc_without_the_ca_cannot_connect(tls_server: ServerProcess) -> None:
    """ADBC with the system's roots only refuses the test CA's server (an error, not a hang)."""
    began = time.monotonic()
    with pytest.raises(AdbcError):
        adbc_query(tls_server.location, {}, "SELECT 1")
    assert time.monotonic() - began < 30
