"""Access to the server: who is calling (authenticated once per call by a gRPC middleware), what their
role allows (checked where each call is dispatched), and which datasets they see (their grants: the
scope every dataset lookup of the call goes through, so that a hidden dataset is "not found" everywhere).

Credentials come as HTTP Basic (on the Flight handshake or on any call: the answer carries a signed bearer
token in its ``authorization`` header) or as ``authorization: Bearer ...`` (a token from a login, or an
API token). Every failure is UNAUTHENTICATED with one message. Password checks are memory-hard and so
costly: at most :data:`CONCURRENT_PASSWORD_CHECKS` run at once, a verified Basic header is remembered
(as a keyed digest) for :data:`BASIC_REMEMBERED_SECONDS`, and failures for one user name are slowed
down (:class:`LoginThrottle`).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import contextvars
import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cachetools
import pyarrow.flight as flight

from flight_lakehouse.audit import AuditLog, CallRecord
from flight_lakehouse.auth import INVALID_CREDENTIALS, Authenticator, Identity, Role
from flight_lakehouse.errors import PermissionDenied, Unauthenticated

if TYPE_CHECKING:
    from flight_lakehouse.metrics import Metrics

#: The caller of the call running on this thread (None: authentication is off, everything is visible).
CALLER: contextvars.ContextVar[Identity | None] = contextvars.ContextVar("lakehouse_caller", default=None)
#: The middleware's key in a call's context.
MIDDLEWARE = "access"
#: Password checks running at once (each takes ~64 MiB and tens of milliseconds).
CONCURRENT_PASSWORD_CHECKS = 2
#: How long a verified Basic header is answered without checking the password again.
BASIC_REMEMBERED_SECONDS = 60.0
#: The longest ``authorization`` header looked at (user name, password or token).
MAX_CREDENTIALS_CHARS = 4096
#: How long a verified bearer token is believed without a new check.
VERIFIED_SECONDS = 1.0
#: Verified Basic headers (and bearer tokens) remembered at most.
BASIC_REMEMBERED = 1024
RPC_NAMES = {
    flight.FlightMethod.HANDSHAKE: "Handshake",
    flight.FlightMethod.LIST_FLIGHTS: "ListFlights",
    flight.FlightMethod.GET_FLIGHT_INFO: "GetFlightInfo",
    flight.FlightMethod.GET_SCHEMA: "GetSchema",
    flight.FlightMethod.DO_GET: "DoGet",
    flight.FlightMethod.DO_PUT: "DoPut",
    flight.FlightMethod.DO_ACTION: "DoAction",
    flight.FlightMethod.LIST_ACTIONS: "ListActions",
    flight.FlightMethod.DO_EXCHANGE: "DoExchange",
}


# -- the scope of a call -----------------------------------------------------------------------------


def visible(name: str) -> bool:
    """Whether the caller of this call may see dataset ``name``."""
    caller = CALLER.get()
    return caller is None or caller.can_see(name)


def caller_name() -> str | None:
    """The name of the caller of this call (None: authentication is off)."""
    caller = CALLER.get()
    return caller.name if caller is not None else None


def check_writable(name: str) -> None:
    """PERMISSION_DENIED unless the caller's grants cover ``name`` (whether it exists or not: the refusal
    says nothing of datasets the caller cannot see)."""
    caller = CALLER.get()
    if caller is not None and not caller.can_see(name):
        raise PermissionDenied(f"{caller.name!r} may not write dataset {name!r}: not in its grants")


def require(role: Role | str, what: str) -> None:
    """PERMISSION_DENIED unless the caller's role includes ``role`` (``what``: the call, for the message)."""
    caller = CALLER.get()
    if caller is not None and not caller.role.allows(role):
        raise PermissionDenied(
            f"{caller.name!r} ({caller.role.value}) may not {what}: it needs the {Role(role).value} role"
        )


@contextlib.contextmanager
def acting_as(caller: Identity | None) -> Iterator[None]:
    """Run the block as ``caller`` (the server wraps each handler in it)."""
    token = CALLER.set(caller)
    try:
        yield
    finally:
        CALLER.reset(token)


# -- authentication ----------------------------------------------------------------------------------


class LoginThrottle:
    """Slows down guessing: after ``free`` failed logins in a row for one user name (existing or not),
    the name is refused without a check for 1, 2, 4 ... up to ``longest`` seconds after each failure."""

    def __init__(self, free: int = 5, longest: float = 60.0) -> None:
        self.free = free
        self.longest = longest
        #: Failures in a row and until when the name waits, by name; forgotten a quarter hour after the
        #: last failure (and the oldest first, past 100,000 names guessed at random).
        self._failures: cachetools.TTLCache[str, tuple[int, float]] = cachetools.TTLCache(100_000, ttl=900)
        self._guard = threading.Lock()

    def check(self, user: str) -> None:
        """UNAUTHENTICATED while ``user`` waits after its failures."""
        with self._guard:
            _, until = self._failures.get(user.lower(), (0, 0.0))
        wait = until - time.monotonic()
        if wait > 0:
            raise Unauthenticated(f"{INVALID_CREDENTIALS}; too many failed logins, retry in {wait:.0f} s")

    def failed(self, user: str) -> None:
        """Count a failed login for ``user``."""
        with self._guard:
            count, _ = self._failures.get(user.lower(), (0, 0.0))
            count += 1
            delay = 0.0 if count <= self.free else min(self.longest, 2.0 ** (count - self.free - 1))
            self._failures[user.lower()] = (count, time.monotonic() + delay)

    def succeeded(self, user: str) -> None:
        """Forget the failures of ``user``."""
        with self._guard:
            self._failures.pop(user.lower(), None)


@dataclass(frozen=True)
class Authenticated:
    """The caller of a call, and the bearer token to send back (after a Basic login)."""

    identity: Identity
    bearer: str | None = None


class Sessions:
    """The bearer tokens each user got from logins: past ``per_user``, a new login ends the oldest."""

    def __init__(self, per_user: int, lifetime: float) -> None:
        self.per_user = per_user
        self.lifetime = lifetime
        self._live: dict[str, OrderedDict[bytes, float]] = {}
        self._ended: dict[bytes, float] = {}
        self._guard = threading.Lock()

    def started(self, user: str, token: str) -> None:
        """Count a new session of ``user``."""
        now = time.monotonic()
        with self._guard:
            live = self._live.setdefault(user, OrderedDict())
            live[digest(token)] = now + self.lifetime
            for key, expiry in list(live.items()):
                if expiry < now:
                    del live[key]
            while len(live) > self.per_user:
                oldest, expiry = live.popitem(last=False)
                self._ended[oldest] = expiry
            self._ended = {key: expiry for key, expiry in self._ended.items() if expiry >= now}

    def ended(self, token: str) -> bool:
        """Whether ``token``'s session was ended by newer ones."""
        with self._guard:
            return digest(token) in self._ended


def digest(token: str) -> bytes:
    """A short fingerprint of a token (what is kept of it in memory)."""
    return hashlib.sha256(token.encode()).digest()[:16]


class Gatekeeper:
    """Turns a call's ``authorization`` header into its caller."""

    def __init__(self, authenticator: Authenticator, sessions_per_user: int = 64) -> None:
        self.authenticator = authenticator
        self.throttle = LoginThrottle()
        self.sessions = Sessions(sessions_per_user, authenticator.bearer_ttl_seconds)
        self._checks = threading.BoundedSemaphore(CONCURRENT_PASSWORD_CHECKS)
        #: Bearer tokens of verified Basic credentials (by a keyed digest), and identities of verified
        #: bearer tokens: each believed for a while without a new check.
        self._remembered: cachetools.TTLCache[bytes, str] = cachetools.TTLCache(
            BASIC_REMEMBERED, ttl=BASIC_REMEMBERED_SECONDS
        )
        self._verified: cachetools.TTLCache[str, Identity] = cachetools.TTLCache(
            BASIC_REMEMBERED, ttl=VERIFIED_SECONDS
        )
        self._guard = threading.Lock()
        self._key = secrets.token_bytes(32)

    def authenticate(self, header: str | None, login: bool = False) -> Authenticated:
        """The caller sending ``header`` (its ``authorization`` value), or UNAUTHENTICATED. A ``login``
        (the Flight handshake) checks Basic credentials afresh and starts a new session."""
        if header is not None and len(header) > MAX_CREDENTIALS_CHARS:  # checked before any work
            raise Unauthenticated(INVALID_CREDENTIALS)
        scheme, _, credentials = (header or "").strip().partition(" ")
        credentials = credentials.strip()
        if scheme.lower() == "bearer" and credentials:
            return Authenticated(self._bearer(credentials))
        if scheme.lower() == "basic" and credentials:
            return self._basic(credentials, login)
        raise Unauthenticated(INVALID_CREDENTIALS)

    def _bearer(self, token: str) -> Identity:
        """The caller of a bearer token: verified at most once per :data:`VERIFIED_SECONDS` (a token's
        check, ~0.1 ms, was a fifth of a small query's cost), so a revocation takes a second longer."""
        with self._guard:
            known = self._verified.get(token)
        if known is not None:
            return known
        if self.sessions.ended(token):
            raise Unauthenticated(INVALID_CREDENTIALS)
        identity = self.authenticator.verify_bearer(token)
        with self._guard:
            self._verified[token] = identity
        return identity

    def _basic(self, credentials: str, login: bool) -> Authenticated:
        key = hmac.new(self._key, credentials.encode(), hashlib.sha256).digest()
        with self._guard:
            remembered = None if login else self._remembered.get(key)
        if remembered is not None:
            with contextlib.suppress(Unauthenticated):  # removed, or a new password: check it again
                return Authenticated(self._bearer(remembered), remembered)
        user, password = basic_credentials(credentials)
        self.throttle.check(user)
        with self._checks:
            try:
                identity = self.authenticator.login(user, password)
            except Unauthenticated:
                self.throttle.failed(user)
                raise
        self.throttle.succeeded(user)
        bearer = self.authenticator.issue_bearer(identity)
        self.sessions.started(identity.name, bearer)
        with self._guard:
            self._remembered[key] = bearer
        return Authenticated(identity, bearer)


def basic_credentials(credentials: str) -> tuple[str, str]:
    """User and password of a Basic header's credentials."""
    padded = credentials + "=" * (-len(credentials) % 4)  # ADBC's Go driver sends it unpadded
    try:
        text = base64.b64decode(padded, validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated(INVALID_CREDENTIALS) from None
    user, colon, password = text.partition(":")
    if not colon or not user:
        raise Unauthenticated(INVALID_CREDENTIALS)
    return user, password


# -- the middleware ------------------------------------------------------------------------------------


class AccessMiddleware(flight.ServerMiddleware):
    """One call's caller, the bearer token its answer carries, and its record (audit log, metrics)."""

    def __init__(
        self,
        caller: Authenticated | None,
        record: CallRecord | None,
        audit: AuditLog | None,
        metrics: Metrics | None = None,
    ) -> None:
        self.caller = caller
        self.record = record
        self._audit = audit
        self._metrics = metrics

    @property
    def identity(self) -> Identity | None:
        """Who calls (None: authentication is off)."""
        return self.caller.identity if self.caller else None

    def sending_headers(self) -> dict[str, str]:
        """The bearer token of a Basic login, for the client's next calls."""
        if self.caller is None or self.caller.bearer is None:
            return {}
        return {"authorization": f"Bearer {self.caller.bearer}"}

    def call_completed(self, exception: BaseException | None) -> None:
        """Write the call's audit line and count it in the metrics."""
        if self.record is None:
            return
        if self._audit is not None:
            self._audit.write(self.record, exception)
        if self._metrics is not None:
            self._metrics.observe(self.record, exception)


class AccessMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Authenticates every call (when there is a :class:`Gatekeeper`) and starts its record (for the
    audit log and the metrics)."""

    def __init__(
        self, gatekeeper: Gatekeeper | None, audit: AuditLog | None, metrics: Metrics | None = None
    ) -> None:
        self.gatekeeper = gatekeeper
        self.audit = audit
        self.metrics = metrics

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[str]]) -> AccessMiddleware:
        """The call's middleware, or UNAUTHENTICATED (logged) for bad or missing credentials."""
        recorded = self.audit is not None or self.metrics is not None
        record = CallRecord(rpc=RPC_NAMES.get(info.method, str(info.method))) if recorded else None
        if self.gatekeeper is None:
            return AccessMiddleware(None, record, self.audit, self.metrics)
        values = headers.get("authorization") or [None]
        try:
            header = str(values[0]) if values[0] is not None else None
            caller = self.gatekeeper.authenticate(header, login=info.method == flight.FlightMethod.HANDSHAKE)
        except Unauthenticated as exc:
            AccessMiddleware(None, record, self.audit, self.metrics).call_completed(exc)
            raise
        if record is not None:
            record.user = caller.identity.name
        return AccessMiddleware(caller, record, self.audit, self.metrics)


class HandshakeByHeaders(flight.ServerAuthHandler):
    """The Flight handshake with authentication in headers: the middleware has checked the call's Basic
    credentials and its answer carries the bearer token, so the handshake itself has nothing to do."""

    def authenticate(self, outgoing: flight.ServerAuthSender, incoming: flight.ServerAuthReader) -> None:
        """Nothing to exchange: the credentials came in the call's headers."""

    def is_valid(self, token: bytes) -> str:
        """Every call is authenticated by the middleware; the handshake's own token is not used."""
        return ""


def middleware_of(context: flight.ServerCallContext) -> AccessMiddleware | None:
    """The access middleware of a call (None when the server runs without one)."""
    return context.get_middleware(MIDDLEWARE)
