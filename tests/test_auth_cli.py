"""The auth file: the ``users`` and ``tokens`` commands (real subprocesses) and the :class:`Authenticator`
the server checks credentials with (in-process)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jwt
import pytest

from flight_lakehouse.auth import (
    INVALID_CREDENTIALS,
    Authenticator,
    AuthFile,
    AuthFileError,
    Identity,
    Role,
    check_grants,
)
from flight_lakehouse.errors import Unauthenticated

PASSWORD = "correct horse battery"


def cli(*args: str, stdin: str = "", env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``flight-lakehouse ARGS`` with ``stdin`` piped in (so never a terminal)."""
    clean = {key: value for key, value in os.environ.items() if key != "LAKEHOUSE_AUTH_FILE"}
    return subprocess.run(
        [sys.executable, "-m", "flight_lakehouse", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    """The stdout of a command that must have succeeded."""
    assert result.returncode == 0, result.stderr
    return result.stdout


def refused(result: subprocess.CompletedProcess[str]) -> str:
    """The one-line error of a command that must have failed."""
    assert result.returncode != 0, result.stdout
    return result.stderr.strip().splitlines()[-1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An auth file with user alice (writer, sales_* only) and token ci, made once (argon2 is slow)."""
    path = tmp_path_factory.mktemp("base") / "auth.json"
    AuthFile(path).add_user("alice", PASSWORD, "writer", ["sales_*"])
    return path


@pytest.fixture
def auth_path(base_file: Path, tmp_path: Path) -> Path:
    """A private copy of the base file."""
    path = tmp_path / "auth.json"
    shutil.copyfile(base_file, path)
    path.chmod(0o600)
    return path


def expect_refusal(check: Callable[[], object]) -> str:
    """The message of the Unauthenticated that ``check`` must raise."""
    with pytest.raises(Unauthenticated) as caught:
        check()
    return str(caught.value)


def flip(token: str, index: int) -> str:
    """``token`` with one base64url character changed."""
    return token[:index] + ("B" if token[index] == "A" else "A") + token[index + 1 :]


# -- the commands ------------------------------------------------------------------------------------


def test_users_commands(tmp_path: Path) -> None:
    path = tmp_path / "conf" / "auth.json"
    file = ("--auth-file", str(path))
    assert ok(cli("users", "add", "alice", "--role", "admin", *file, stdin=PASSWORD + "\n")).strip() == (
        "added user alice (admin)"
    )
    env = {"LAKEHOUSE_AUTH_FILE": str(path)}
    ok(cli("users", "add", "bob", "--role", "reader", "--dataset", "sales_*", stdin="bob-password", env=env))
    assert mode(path) == 0o600 and mode(path.with_name("auth.json.lock")) == 0o600
    text = path.read_text()
    assert PASSWORD not in text and "bob-password" not in text
    content = json.loads(text)
    assert content["version"] == 1 and set(content["users"]) == {"alice", "bob"}
    assert content["users"]["bob"]["password_hash"].startswith("$argon2id$")

    listed = json.loads(ok(cli("users", "list", "--json", *file)))
    assert [(u["name"], u["role"], u["datasets"]) for u in listed] == [
        ("alice", "admin", []),
        ("bob", "reader", ["sales_*"]),
    ]
    table = ok(cli("users", "list", *file))
    assert "sales_*" in table and "$argon2" not in table and "$argon2" not in json.dumps(listed)

    ok(cli("users", "update", "bob", "--role", "writer", "--all-datasets", *file))
    ok(cli("users", "passwd", "alice", *file, stdin="a new password\n"))
    users = json.loads(path.read_text())["users"]
    assert (users["bob"]["role"], users["bob"]["datasets"]) == ("writer", [])
    assert users["alice"]["generation"] == content["users"]["alice"]["generation"] + 1
    assert users["alice"]["password_hash"] != content["users"]["alice"]["password_hash"]

    ok(cli("users", "remove", "bob", *file))
    assert set(json.loads(path.read_text())["users"]) == {"alice"}
    assert mode(path) == 0o600


def test_users_commands_refuse(auth_path: Path) -> None:
    file = ("--auth-file", str(auth_path))
    before = auth_path.read_bytes()
    add = ("users", "add", "bob", "--role", "reader", *file)
    assert refused(cli(*add, stdin="short\n")) == "Error: password too short: at least 8 characters"
    assert "invalid dataset pattern '../x'" in refused(cli(*add, "--dataset", "../x", stdin=PASSWORD))
    assert refused(cli("users", "add", "alice", "--role", "reader", *file, stdin=PASSWORD)) == (
        "Error: user 'alice' exists already"
    )
    assert auth_path.read_bytes() == before

    auth_path.chmod(0o644)  # like ssh: a file others may read is refused, with the fix
    assert refused(cli("users", "list", *file)).endswith(f"(mode 0644); run: chmod 600 {auth_path}")


def test_tokens_commands_and_reread(auth_path: Path) -> None:
    file = ("--auth-file", str(auth_path))
    created = cli("tokens", "create", "ci", "--role", "reader", "--ttl", "12h", "--dataset", "hr", *file)
    token = ok(created).strip()
    assert token.startswith("flh_") and "\n" not in token
    assert "not shown again" in created.stderr and token not in created.stderr
    assert "flh_" not in auth_path.read_text() and token.split("_", 2)[2] not in auth_path.read_text()
    ok(cli("tokens", "create", "forever", "--role", "admin", "--ttl", "never", *file))
    assert "--ttl" in refused(cli("tokens", "create", "x", "--role", "reader", "--ttl", "5 weeks", *file))

    listed = json.loads(ok(cli("tokens", "list", "--json", *file)))
    by_name = {row["name"]: row for row in listed}
    ci = by_name["ci"]
    assert (ci["id"], ci["role"], ci["datasets"], ci["expired"]) == (token[4:20], "reader", ["hr"], False)
    assert by_name["forever"]["expires_at"] is None
    hashes = [record["hash"] for record in json.loads(auth_path.read_text())["tokens"].values()]
    shown = json.dumps(listed) + ok(cli("tokens", "list", *file))
    assert not any(secret in shown for secret in [token.split("_", 2)[2], *hashes])

    authenticator = Authenticator(auth_path)  # default reload interval: 0.5 s
    assert authenticator.verify_bearer(token) == Identity("ci", Role.READER, "token", ("hr",))
    bearer = authenticator.issue_bearer(authenticator.login("alice", PASSWORD))
    ok(cli("tokens", "revoke", "ci", *file))
    ok(cli("users", "remove", "alice", *file))
    started = time.monotonic()
    while time.monotonic() - started < 1.5:  # the file is re-read within about a second
        try:
            authenticator.verify_bearer(token)
        except Unauthenticated:
            break
        time.sleep(0.05)
    assert expect_refusal(lambda: authenticator.verify_bearer(token)) == INVALID_CREDENTIALS
    assert expect_refusal(lambda: authenticator.verify_bearer(bearer)) == INVALID_CREDENTIALS


def test_concurrent_adds_all_land(tmp_path: Path) -> None:
    path = tmp_path / "auth.json"
    names, file = [f"user_{n}" for n in range(8)], ("--auth-file", str(path))
    clean = {key: value for key, value in os.environ.items() if key != "LAKEHOUSE_AUTH_FILE"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "flight_lakehouse", "users", "add", name, "--role", "reader", *file],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean,
        )
        for name in names
    ]
    for process in processes:
        _, err = process.communicate(PASSWORD + "\n", timeout=120)
        assert process.returncode == 0, err
    assert sorted(AuthFile(path).load().users) == names
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# -- the authenticator -------------------------------------------------------------------------------


def test_login_bearer_and_api_token(auth_path: Path) -> None:
    authenticator = Authenticator(auth_path, reload_interval_seconds=0)
    alice = authenticator.login("alice", PASSWORD)
    assert (alice.name, alice.role, alice.kind) == ("alice", Role.WRITER, "user")
    assert alice.datasets == ("sales_*",)
    bearer = authenticator.issue_bearer(alice)
    assert authenticator.verify_bearer(bearer) == alice
    claims = jwt.decode(bearer, options={"verify_signature": False})
    assert set(claims) == {"sub", "role", "gen", "jti", "iat", "exp"}
    assert claims["exp"] - claims["iat"] == 3600

    token = AuthFile(auth_path).create_token("ci", "reader", ttl_seconds=3600)
    assert authenticator.verify_bearer(token) == Identity("ci", Role.READER, "token")
    with pytest.raises(ValueError, match="issued to users"):
        authenticator.issue_bearer(authenticator.verify_bearer(token))

    AuthFile(auth_path).update_user("alice", datasets=())  # grants come from the file, not the token
    assert authenticator.verify_bearer(bearer).datasets == ()


def test_every_bad_credential_is_refused_alike(auth_path: Path, tmp_path: Path) -> None:
    store = AuthFile(auth_path)
    authenticator = Authenticator(auth_path, reload_interval_seconds=0)
    alice = authenticator.login("alice", PASSWORD)
    bearer = authenticator.issue_bearer(alice)
    header, payload, signature = bearer.split(".")
    revoked = store.create_token("revoked", "reader")
    store.revoke_token("revoked")
    expired = store.create_token("expired", "reader", ttl_seconds=3600)
    assert authenticator.verify_bearer(expired).name == "expired"
    content = json.loads(auth_path.read_text())
    for record in content["tokens"].values():
        record["expires_at"] = "2001-01-01T00:00:00Z"
    auth_path.write_text(json.dumps(content))
    key = authenticator.file.load().key
    now = int(time.time())
    claims = {"sub": "alice", "gen": alice.generation, "iat": now - 60}
    assert authenticator.verify_bearer(jwt.encode({**claims, "exp": now + 60}, key)) == alice
    stale = jwt.encode({**claims, "exp": now - 1}, key)

    other = tmp_path / "other" / "auth.json"
    foreign_token = AuthFile(other).create_token("ci", "admin")  # the file, and its secret, are new
    foreign_bearer = Authenticator(other).issue_bearer(alice)

    attempts: list[Callable[[], object]] = [
        lambda: authenticator.login("alice", "wrong password"),
        lambda: authenticator.login("mallory", PASSWORD),
        lambda: authenticator.login("alice", ""),
        lambda: authenticator.verify_bearer(flip(bearer, len(header) + len(payload) + 10)),
        lambda: authenticator.verify_bearer(f"{header}.{flip(payload, 5)}.{signature}"),
        lambda: authenticator.verify_bearer(stale),
        lambda: authenticator.verify_bearer(foreign_bearer),
        lambda: authenticator.verify_bearer(foreign_token),
        lambda: authenticator.verify_bearer(revoked),
        lambda: authenticator.verify_bearer(expired),
        lambda: authenticator.verify_bearer(expired[:-2] + "xx"),
        lambda: authenticator.verify_bearer("flh_"),
        lambda: authenticator.verify_bearer("not a token"),
        lambda: authenticator.verify_bearer(""),
    ]
    assert {expect_refusal(attempt) for attempt in attempts} == {INVALID_CREDENTIALS}

    store.set_password("alice", "a new password")  # bearer tokens issued before stop working
    assert expect_refusal(lambda: authenticator.verify_bearer(bearer)) == INVALID_CREDENTIALS
    renewed = authenticator.issue_bearer(authenticator.login("alice", "a new password"))
    store.update_user("alice", role="admin")  # a role change too
    assert expect_refusal(lambda: authenticator.verify_bearer(renewed)) == INVALID_CREDENTIALS

    current = authenticator.issue_bearer(authenticator.login("alice", "a new password"))
    assert authenticator.verify_bearer(current).role == Role.ADMIN

    store.remove_user("alice")
    assert expect_refusal(lambda: authenticator.verify_bearer(current)) == INVALID_CREDENTIALS
    assert expect_refusal(lambda: authenticator.login("alice", "a new password")) == INVALID_CREDENTIALS
    store.add_user("alice", "a new password", "admin")  # the same name again: old tokens stay dead
    assert expect_refusal(lambda: authenticator.verify_bearer(current)) == INVALID_CREDENTIALS


def test_login_takes_as_long_for_unknown_users(auth_path: Path) -> None:
    authenticator = Authenticator(auth_path)

    def seconds(user: str) -> float:
        started = time.perf_counter()
        expect_refusal(lambda: authenticator.login(user, "wrong password"))
        return time.perf_counter() - started

    known, unknown = [], []
    for _ in range(3):
        known.append(seconds("alice"))
        unknown.append(seconds("nobody"))
    fast, slow = sorted([statistics.median(known), statistics.median(unknown)])
    assert fast > 0.01 and slow / fast < 3, (known, unknown)


def test_unusable_file_keeps_last_good(auth_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    token = AuthFile(auth_path).create_token("ci", "reader")
    authenticator = Authenticator(auth_path, reload_interval_seconds=0)
    good = auth_path.read_text()
    with caplog.at_level(logging.ERROR, logger="flight_lakehouse.auth"):
        auth_path.write_text("{not json")
        assert authenticator.verify_bearer(token).name == "ci"
        auth_path.unlink()
        assert authenticator.verify_bearer(token).name == "ci"
    assert [r.message.count("keeping its last good contents") for r in caplog.records] == [1, 1]

    content = json.loads(good)
    content["tokens"] = {}
    auth_path.write_text(json.dumps(content))
    auth_path.chmod(0o644)  # refused as well: the token is still known
    assert authenticator.verify_bearer(token).name == "ci"
    auth_path.chmod(0o600)
    auth_path.write_text(json.dumps(content) + " ")
    assert expect_refusal(lambda: authenticator.verify_bearer(token)) == INVALID_CREDENTIALS


def test_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    with pytest.raises(AuthFileError, match="no auth file at"):
        Authenticator(missing)
    with pytest.raises(AuthFileError, match="no auth file at"):
        AuthFile(missing).remove_user("alice")
    store = AuthFile(tmp_path / "new.json")
    refusals: list[tuple[str, Callable[[], object]]] = [
        ("empty password", lambda: store.add_user("bob", "", "reader")),
        ("invalid user name '../bob'", lambda: store.add_user("../bob", PASSWORD, "reader")),
        ("invalid token name 'a b'", lambda: store.create_token("a b", "reader")),
        ("a token's lifetime must be positive", lambda: store.create_token("ci", "reader", ttl_seconds=0)),
        ("unknown role 'root'", lambda: store.create_token("ci", "root")),
    ]
    for message, refusal in refusals:
        with pytest.raises(AuthFileError, match=message):
            refusal()
    assert not store.path.exists()
    store.create_token("ci", "reader")
    refusals = [
        ("token 'ci' exists already", lambda: store.create_token("ci", "reader")),
        ("no user 'nobody'", lambda: store.remove_user("nobody")),
        ("no user 'nobody'", lambda: store.set_password("nobody", PASSWORD)),
        ("no token named or with id 'cd'", lambda: store.revoke_token("cd")),
    ]
    for message, refusal in refusals:
        with pytest.raises(AuthFileError, match=message):
            refusal()
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"version": 1, "secret": "c2hvcnQ=", "users": {}, "tokens": {}}))
    bad.chmod(0o600)
    with pytest.raises(AuthFileError, match="is invalid: secret"):
        AuthFile(bad).load()


# -- roles and grants --------------------------------------------------------------------------------


def test_roles_and_grants() -> None:
    assert Role.ADMIN.allows("writer") and Role.WRITER.allows(Role.READER) and Role.READER.allows("reader")
    assert not Role.READER.allows("writer") and not Role.WRITER.allows(Role.ADMIN)

    limited = Identity("bob", Role.READER, datasets=("sales_*", "hr", "q?_report"))
    assert all(limited.can_see(name) for name in ["sales_2024", "SALES_eu", "sales_", "HR", "q3_report"])
    assert not any(limited.can_see(name) for name in ["sales", "hr_archive", "q10_report", "marketing"])
    assert Identity("alice", Role.ADMIN).can_see("anything")

    assert check_grants(["sales_*", "hr", "sales_*", "*", "_x?"]) == ("sales_*", "hr", "*", "_x?")
    for bad in ["../x", "", "a/b", "x y", "[ab]*", "1abc", "sales-*", "a" * 129, "x\n"]:
        with pytest.raises(AuthFileError, match="invalid dataset pattern"):
            check_grants([bad])
