"""Identities: the auth file of users and API tokens, and the checks the server makes with it.

The auth file is JSON (``AuthData``): a random HMAC secret for bearer tokens, users with argon2id password
hashes, and API tokens stored as the SHA-256 of their secret part. Edits take an exclusive ``flock`` on a
sibling ``.lock`` file and replace the file atomically (temp file 0600, fsync, rename, fsync of the
directory). Like ssh, a file that group or others may read or write is refused on load with the ``chmod``
that fixes it; every write leaves the file at 0600.

:class:`Authenticator` is what the server uses: HTTP Basic logins, signed expiring bearer tokens (PyJWT,
HS256) and API tokens (``flh_<id>_<secret>``). It re-reads the file when it changes (checked at most every
``reload_interval_seconds``), so a removed user or revoked token stops working within about a second; a file
that turns unreadable or invalid keeps the last good contents (logged), never opening up. Every refusal is
:class:`~flight_lakehouse.errors.Unauthenticated` with one message.
"""

from __future__ import annotations

import base64
import enum
import fcntl
import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from argon2 import Parameters, PasswordHasher, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError
from argon2.profiles import get_default_parameters
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
)

from flight_lakehouse.commands import NAME_PATTERN
from flight_lakehouse.errors import Unauthenticated
from flight_lakehouse.settings import SettingsError

log = logging.getLogger(__name__)

#: A dataset grant: a dataset name, or a pattern of one with ``*`` and ``?`` (matched case-insensitively).
GRANT_PATTERN = r"^[A-Za-z_*?][A-Za-z0-9_*?]{0,127}$"
TOKEN_PREFIX = "flh_"
MIN_PASSWORD_LENGTH = 8
#: The one answer to every failed login or bearer check.
INVALID_CREDENTIALS = "invalid credentials"
SECRET_BYTES = 32
JWT_ALGORITHM = "HS256"

Name = Annotated[str, StringConstraints(pattern=NAME_PATTERN)]
Grant = Annotated[str, StringConstraints(pattern=GRANT_PATTERN)]
TokenId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
#: What tells whether the auth file changed: (st_mtime_ns, st_size, st_ino).
Signature = tuple[int, int, int]


class AuthFileError(SettingsError):
    """An unusable auth file or a refused edit; the message is one line for the operator."""


class Role(str, enum.Enum):
    """What an identity may do; each role includes the ones before it."""

    READER = "reader"
    WRITER = "writer"
    ADMIN = "admin"

    def __str__(self) -> str:
        return self.value

    def allows(self, needed: Role | str) -> bool:
        """Whether this role includes ``needed``."""
        order = list(Role)
        return order.index(self) >= order.index(Role(needed))


@dataclass(frozen=True)
class Identity:
    """Who is calling: a user (logged in, or by bearer token) or an API token."""

    name: str
    role: Role
    kind: Literal["user", "token"] = "user"
    #: grant patterns; empty means every dataset
    datasets: tuple[str, ...] = ()
    #: the user's generation when authenticated: the bearer tokens it gets die with a password change
    generation: int = 0

    def can_see(self, dataset: str) -> bool:
        """Whether the grants cover ``dataset`` (case-insensitive ``fnmatch`` patterns)."""
        name = dataset.lower()
        return not self.datasets or any(fnmatch.fnmatchcase(name, p.lower()) for p in self.datasets)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UserRecord(_Record):
    """A user in the auth file."""

    role: Role
    password_hash: str = Field(pattern=r"^\$argon2(id|i|d)\$")
    datasets: tuple[Grant, ...] = ()
    #: random at creation (a re-created user never accepts its namesake's bearer tokens), +1 on passwd/role
    generation: int
    created_at: AwareDatetime


class TokenRecord(_Record):
    """An API token in the auth file (only the SHA-256 of its secret part)."""

    name: Name
    role: Role
    datasets: tuple[Grant, ...] = ()
    hash: str = Field(pattern=r"^[0-9a-f]{64}$")
    created_at: AwareDatetime
    expires_at: AwareDatetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        """Whether the token is past its expiry."""
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(timezone.utc))


class AuthData(BaseModel):
    """The auth file's contents."""

    model_config = ConfigDict(extra="forbid")

    version: Literal[1] = 1
    secret: str
    users: dict[Name, UserRecord] = Field(default_factory=dict)
    tokens: dict[TokenId, TokenRecord] = Field(default_factory=dict)

    @field_validator("secret")
    @classmethod
    def _secret_bytes(cls, secret: str) -> str:
        if len(base64.b64decode(secret, validate=True)) < SECRET_BYTES:
            raise ValueError(f"the secret must be at least {SECRET_BYTES} bytes")
        return secret

    @classmethod
    def new(cls) -> AuthData:
        """An empty auth file with a fresh secret."""
        return cls(secret=base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode())

    @property
    def key(self) -> bytes:
        """The HMAC key of bearer tokens."""
        return base64.b64decode(self.secret)

    def user(self, name: str) -> UserRecord:
        """The user ``name``, or an error for the operator."""
        if name not in self.users:
            raise AuthFileError(f"no user {name!r}")
        return self.users[name]


class AuthFile:
    """The auth file at ``path``: loads, and edits under a lock with atomic replaces."""

    def __init__(self, path: str | os.PathLike[str], hasher: PasswordHasher | None = None) -> None:
        self.path = Path(path)
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        #: hashes new passwords: argon2-cffi's defaults (argon2id, 64 MiB, 3 passes) unless given
        self.hasher = hasher or PasswordHasher()

    def load(self) -> AuthData:
        """The file's contents, validated."""
        return self.read()[0]

    def read(self) -> tuple[AuthData, Signature]:
        """The file's contents and the signature of the version read."""
        try:
            with open(self.path, "rb") as file:
                stat = os.fstat(file.fileno())
                self._check_mode(stat.st_mode)
                raw = file.read()
        except FileNotFoundError:
            raise AuthFileError(
                f"no auth file at {self.path} (create it with: flight-lakehouse users add)"
            ) from None
        except OSError as exc:
            raise AuthFileError(f"cannot read auth file {self.path}: {exc.strerror}") from None
        try:
            data = AuthData.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            raise AuthFileError(f"auth file {self.path} is invalid: {where}: {first['msg']}") from None
        return data, (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def signature(self) -> Signature:
        """The current file's (st_mtime_ns, st_size, st_ino): a cheap change check."""
        stat = os.stat(self.path)
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def _check_mode(self, mode: int) -> None:
        if mode & 0o077:
            raise AuthFileError(
                f"auth file {self.path} is accessible by group or others (mode {mode & 0o777:04o}); "
                f"run: chmod 600 {self.path}"
            )

    # -- edits ---------------------------------------------------------------------------------------

    def add_user(self, name: str, password: str, role: Role | str, datasets: Iterable[str] = ()) -> None:
        """Add a user; creates the file if missing."""
        check_name(name, "user")
        role, grants = _role(role), check_grants(datasets)
        record = UserRecord(
            role=role,
            password_hash=self._hash(password),
            datasets=grants,
            generation=secrets.randbits(48),
            created_at=_now(),
        )
        with self._edit(create=True) as data:
            if name in data.users:
                raise AuthFileError(f"user {name!r} exists already")
            data.users[name] = record

    def remove_user(self, name: str) -> None:
        """Remove a user; its bearer tokens stop working."""
        with self._edit() as data:
            data.user(name)
            del data.users[name]

    def set_password(self, name: str, password: str) -> None:
        """Change a user's password; bearer tokens issued before stop working."""
        password_hash = self._hash(password)
        with self._edit() as data:
            user = data.user(name)
            data.users[name] = user.model_copy(
                update={"password_hash": password_hash, "generation": user.generation + 1}
            )

    def update_user(
        self, name: str, *, role: Role | str | None = None, datasets: Iterable[str] | None = None
    ) -> None:
        """Change a user's role (ends its bearer tokens) and/or grants (``()``: every dataset)."""
        update: dict[str, Any] = {}
        if datasets is not None:
            update["datasets"] = check_grants(datasets)
        with self._edit() as data:
            user = data.user(name)
            if role is not None and _role(role) != user.role:
                update.update(role=_role(role), generation=user.generation + 1)
            data.users[name] = user.model_copy(update=update)

    def create_token(
        self,
        name: str,
        role: Role | str,
        ttl_seconds: float | None = None,
        datasets: Iterable[str] = (),
    ) -> str:
        """Create an API token (``ttl_seconds`` None: never expires); returns its text, shown once."""
        check_name(name, "token")
        if ttl_seconds is not None and not ttl_seconds > 0:
            raise AuthFileError(f"a token's lifetime must be positive (got {ttl_seconds} s)")
        token_id, secret, now = secrets.token_hex(8), secrets.token_urlsafe(SECRET_BYTES), _now()
        record = TokenRecord(
            name=name,
            role=_role(role),
            datasets=check_grants(datasets),
            hash=_digest(secret),
            created_at=now,
            expires_at=None if ttl_seconds is None else now + timedelta(seconds=ttl_seconds),
        )
        with self._edit(create=True) as data:
            if any(token.name == name for token in data.tokens.values()):
                raise AuthFileError(f"token {name!r} exists already (revoke it first)")
            data.tokens[token_id] = record
        return f"{TOKEN_PREFIX}{token_id}_{secret}"

    def revoke_token(self, name_or_id: str) -> str:
        """Revoke the token with this id or name; returns its id."""
        with self._edit() as data:
            by_name = (token_id for token_id, token in data.tokens.items() if token.name == name_or_id)
            token_id = name_or_id if name_or_id in data.tokens else next(by_name, None)
            if token_id is None:
                raise AuthFileError(f"no token named or with id {name_or_id!r}")
            del data.tokens[token_id]
        return token_id

    def list_users(self) -> list[dict[str, Any]]:
        """The users, without their password hashes."""
        users = self.load().users
        return [
            {
                "name": name,
                "role": user.role.value,
                "datasets": list(user.datasets),
                "created_at": _iso(user.created_at),
            }
            for name, user in sorted(users.items())
        ]

    def list_tokens(self) -> list[dict[str, Any]]:
        """The API tokens, without their hashes."""
        tokens, now = self.load().tokens, datetime.now(timezone.utc)
        return [
            {
                "id": token_id,
                "name": token.name,
                "role": token.role.value,
                "datasets": list(token.datasets),
                "created_at": _iso(token.created_at),
                "expires_at": None if token.expires_at is None else _iso(token.expires_at),
                "expired": token.expired(now),
            }
            for token_id, token in sorted(tokens.items(), key=lambda item: item[1].name)
        ]

    def _hash(self, password: str) -> str:
        check_password(password)
        return self.hasher.hash(password)

    @contextmanager
    def _edit(self, create: bool = False) -> Iterator[AuthData]:
        """The contents to change in place, written back atomically unless the block raises."""
        if create:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked():
            data = AuthData.new() if create and not self.path.exists() else self.load()
            yield data
            self._write(data)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise AuthFileError(f"cannot lock auth file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _write(self, data: AuthData) -> None:
        """Replace the file atomically with ``data`` (0600, the previous owner kept when allowed)."""
        directory = self.path.parent
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{self.path.name}.", suffix=".tmp")  # 0600
        try:
            with os.fdopen(fd, "wb") as file:
                _keep_owner(file.fileno(), self.path)
                file.write(data.model_dump_json(indent=2).encode() + b"\n")
                file.flush()
                os.fsync(file.fileno())
            os.replace(temp, self.path)
        except BaseException:
            Path(temp).unlink(missing_ok=True)
            raise
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


class Authenticator:
    """Logins, bearer tokens and API tokens against an auth file, re-read when it changes."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        bearer_ttl_seconds: float = 3600.0,
        reload_interval_seconds: float = 0.5,
    ) -> None:
        self.file = AuthFile(path)
        self.bearer_ttl_seconds = bearer_ttl_seconds
        self.reload_interval_seconds = reload_interval_seconds
        self._lock = threading.Lock()
        self._dummy: tuple[Parameters | None, str] = (None, "")
        data, self._signature = self.file.read()  # an unusable file refuses to start the server
        self._use(data)
        self._next_check = time.monotonic() + reload_interval_seconds
        self._problem: str | None = None

    def login(self, user: str, password: str) -> Identity:
        """The user whose password this is; the same time whether the user exists or not."""
        data, dummy = self._current(), self._dummy[1]
        record = data.users.get(user)
        try:
            verified = _VERIFIER.verify(record.password_hash if record else dummy, password)
        except (VerificationError, InvalidHashError, UnicodeError):
            verified = False
        if record is None or not verified:
            raise Unauthenticated(INVALID_CREDENTIALS)
        return _user_identity(user, record)

    def issue_bearer(self, identity: Identity) -> str:
        """A signed bearer token for a logged-in user, valid ``bearer_ttl_seconds``."""
        if identity.kind != "user":
            raise ValueError("bearer tokens are issued to users; an API token is a bearer token already")
        now = int(time.time())
        claims = {
            "sub": identity.name,
            "role": identity.role.value,
            "gen": identity.generation,
            "jti": secrets.token_hex(8),  # two logins in one second are two sessions
            "iat": now,
            "exp": now + max(1, round(self.bearer_ttl_seconds)),
        }
        import jwt  # on first use: PyJWT (and cryptography) would cost every CLI command ~0.1 s to import

        return jwt.encode(claims, self._current().key, algorithm=JWT_ALGORITHM)

    def verify_bearer(self, token: str) -> Identity:
        """Who sends this bearer token (ours, or an API token); role and grants as the file has them now."""
        data = self._current()
        if token.startswith(TOKEN_PREFIX):
            return _api_token_identity(data, token)
        import jwt

        try:
            claims = jwt.decode(
                token,
                data.key,
                algorithms=[JWT_ALGORITHM],
                options={"require": ["sub", "gen", "iat", "exp"]},
            )
        except jwt.PyJWTError:
            raise Unauthenticated(INVALID_CREDENTIALS) from None
        record = data.users.get(claims["sub"])
        if record is None or claims["gen"] != record.generation:
            raise Unauthenticated(INVALID_CREDENTIALS)
        return _user_identity(claims["sub"], record)

    def _current(self) -> AuthData:
        """The contents, re-read first if the file changed (looked at most every reload interval)."""
        if time.monotonic() >= self._next_check:
            with self._lock:
                if time.monotonic() >= self._next_check:
                    self._refresh()
                    self._next_check = time.monotonic() + self.reload_interval_seconds
        return self._data

    def _refresh(self) -> None:
        try:
            if self.file.signature() == self._signature:
                return
            data, signature = self.file.read()
        except (OSError, AuthFileError) as exc:
            problem = str(exc) if isinstance(exc, AuthFileError) else f"{self.file.path}: {exc.strerror}"
            if problem != self._problem:
                log.error("auth file unusable, keeping its last good contents: %s", problem)
                self._problem = problem
            return
        self._use(data)
        self._signature, self._problem = signature, None
        log.info("auth file re-read: %d user(s), %d token(s)", len(data.users), len(data.tokens))

    def _use(self, data: AuthData) -> None:
        """Serve ``data``; unknown users are checked against a hash as costly as a real user's."""
        params = next((_parameters(user.password_hash) for user in data.users.values()), None)
        params = params or get_default_parameters()
        if params != self._dummy[0]:
            self._dummy = (params, PasswordHasher.from_parameters(params).hash(secrets.token_hex(16)))
        self._data = data


_VERIFIER = PasswordHasher()
#: what an unknown API token id is compared with, so the time is the same as for a known one
_DUMMY_DIGEST = "0" * 64


def check_name(name: str, what: str) -> str:
    """``name`` if it is a valid user or token name (the dataset name pattern)."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise AuthFileError(
            f"invalid {what} name {name!r}: use letters, digits and _, not starting with a digit"
        )
    return name


def check_grants(patterns: Iterable[str]) -> tuple[str, ...]:
    """The dataset grant patterns, validated and without duplicates."""
    grants = tuple(dict.fromkeys(patterns))
    for pattern in grants:
        if not re.fullmatch(GRANT_PATTERN, pattern):
            raise AuthFileError(
                f"invalid dataset pattern {pattern!r}: a dataset name, with * and ? as wildcards"
            )
    return grants


def check_password(password: str) -> None:
    """Refuse empty and short passwords."""
    if not password:
        raise AuthFileError("empty password")
    if len(password) < MIN_PASSWORD_LENGTH:
        raise AuthFileError(f"password too short: at least {MIN_PASSWORD_LENGTH} characters")


def _role(role: Role | str) -> Role:
    try:
        return Role(role)
    except ValueError:
        raise AuthFileError(f"unknown role {role!r}: reader, writer or admin") from None


def _user_identity(name: str, record: UserRecord) -> Identity:
    return Identity(name, record.role, "user", record.datasets, record.generation)


def _api_token_identity(data: AuthData, token: str) -> Identity:
    token_id, _, secret = token.removeprefix(TOKEN_PREFIX).partition("_")
    record = data.tokens.get(token_id)
    matches = hmac.compare_digest(_digest(secret), record.hash if record else _DUMMY_DIGEST)
    if record is None or not matches or record.expired():
        raise Unauthenticated(INVALID_CREDENTIALS)
    return Identity(record.name, record.role, "token", record.datasets)


def _parameters(password_hash: str) -> Parameters | None:
    try:
        return extract_parameters(password_hash)
    except InvalidHashError:
        return None


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).hexdigest()


def _keep_owner(fd: int, path: Path) -> None:
    """Give the new file the old one's owner (root editing a service's file); a no-op when not allowed."""
    try:
        stat = os.stat(path)
        os.fchown(fd, stat.st_uid, stat.st_gid)
    except OSError:
        pass


def _now() -> datetime:
    return datetime.now(timezone.utc).replace(microsecond=0)


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")
