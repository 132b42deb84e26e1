"""TLS and mutual TLS: the server's certificate options, a client's, and the clear-text warning."""

from __future__ import annotations

import logging
import re
import ssl
from pathlib import Path
from typing import Any

import pyarrow.flight as flight

from flight_lakehouse.settings import Settings, SettingsError, is_loopback

log = logging.getLogger("flight_lakehouse")

PEM_BLOCKS = {
    "certificate": re.compile(rb"-----BEGIN CERTIFICATE-----"),
    "private key": re.compile(rb"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
}
CLEAR_TEXT_WARNING = (
    "authentication is on without TLS on a non-loopback address: passwords and tokens travel in clear; "
    "pass --tls-cert/--tls-key"
)


def server_tls_options(settings: Settings) -> dict[str, Any]:
    """The ``FlightServerBase`` keyword arguments of the TLS settings (none without a certificate).

    The PEM files are read once, here, and checked with OpenSSL first: gRPC only says that the server "did
    not start properly" about a certificate it cannot load, so that becomes a :class:`SettingsError`
    naming the file instead.
    """
    if not settings.tls_cert or not settings.tls_key:
        return {}
    cert = read_pem(settings.tls_cert, "--tls-cert", "certificate")
    key = read_pem(settings.tls_key, "--tls-key", "private key")
    client_ca = settings.tls_client_ca
    roots = read_pem(client_ca, "--tls-client-ca", "certificate") if client_ca else None
    check_pems(settings.tls_cert, settings.tls_key, client_ca)
    options: dict[str, Any] = {"tls_certificates": [flight.CertKeyPair(cert=cert, key=key)]}
    if roots is not None:
        options.update(verify_client=True, root_certificates=roots)
    return options


def check_pems(cert: str, key: str, client_ca: str | None = None) -> None:
    """Refuse, in one line, a certificate, key or CA file that OpenSSL cannot load (or a key not of the
    certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_password)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise SettingsError(
            f"TLS certificate {cert!r} and key {key!r} cannot be loaded: {_reason(exc)} "
            "(expected PEM files: the certificate chain and its unencrypted private key)"
        ) from None
    if client_ca:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise SettingsError(
                f"TLS client CA {client_ca!r} cannot be loaded: {_reason(exc)} (expected PEM certificates)"
            ) from None


def client_tls_options(
    root_certs: str | None = None, cert: str | None = None, key: str | None = None
) -> dict[str, bytes]:
    """The ``flight.connect`` keyword arguments of a client's PEM files: the roots it trusts (default: the
    system's) and its own certificate and key for mutual TLS."""
    if bool(cert) != bool(key):
        raise SettingsError("a client certificate needs its key, and a key its certificate")
    options: dict[str, bytes] = {}
    if root_certs:
        options["tls_root_certs"] = read_pem(root_certs, "--tls-ca", "certificate")
    if cert and key:
        options["cert_chain"] = read_pem(cert, "--tls-cert", "certificate")
        options["private_key"] = read_pem(key, "--tls-key", "private key")
    return options


def warn_if_clear_text(settings: Settings) -> bool:
    """Log a warning when authentication is on, TLS off and the address not loopback; whether it did."""
    if settings.auth_file and not settings.tls_cert and not is_loopback(settings.host):
        log.warning(CLEAR_TEXT_WARNING)
        return True
    return False


def read_pem(path: str, flag: str, what: str) -> bytes:
    """The bytes of the PEM file ``path`` (given by ``flag``) holding a ``what`` (a key of
    :data:`PEM_BLOCKS`); a one-line :class:`SettingsError` when it cannot be read or holds none."""
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise SettingsError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from None
    if not PEM_BLOCKS[what].search(pem):
        raise SettingsError(f"{flag} {path!r} holds no PEM {what} (-----BEGIN ...-----)")
    return pem


def _no_password() -> str:
    """An encrypted key is refused instead of prompting on the terminal (gRPC cannot load one either)."""
    raise ValueError("the private key is encrypted")


def _reason(exc: BaseException) -> str:
    """OpenSSL's reason in words, without its source location (``[SSL] PEM lib (_ssl.c:4123)``)."""
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason.replace("_", " ").lower() if exc.reason else str(exc)
        reason = re.sub(r"^\[SSL\] | \(_ssl\.c:\d+\)$", "", reason)
        return "malformed PEM" if reason == "PEM lib" else reason
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)
