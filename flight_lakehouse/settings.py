"""Server settings: pydantic-settings with the ``LAKEHOUSE_`` prefix, a ``.env`` file, and CLI overrides."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SUPPORTED_SCHEMES = ("", "file", "s3")


class SettingsError(ValueError):
    """Settings that cannot start a server; the message is one line for the operator."""


def default_query_memory_mb() -> int:
    """A quarter of the machine's memory, between 256 and 2048 MB: room for the rest of the server (Arrow
    buffers, vector graphs, gRPC) on a small machine, and DuckDB spills to disk beyond it."""
    memory = machine_memory()
    return 1024 if memory is None else max(256, min(2048, memory // 4 >> 20))


def machine_memory() -> int | None:
    """Bytes of physical memory, or of the container's limit (cgroup v2) when that is smaller."""
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
    except OSError:
        return physical
    return min(physical, int(limit)) if limit.isdigit() else physical


class Settings(BaseSettings):
    """Everything the server is configured with. Field names match the CLI flags."""

    model_config = SettingsConfigDict(env_prefix="LAKEHOUSE_", env_file=".env", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8815, ge=0, le=65535)
    http_port: int = Field(
        default=8816,
        ge=-1,
        le=65535,
        description="HTTP side port (probes, metrics, Arrow over HTTP) on the same host; 0 = free, -1 = off",
    )
    root: str = "./lakehouse-data"
    catalog_uri: str | None = None
    s3_endpoint: str | None = None
    s3_region: str | None = None
    s3_access_key_id: str | None = None
    s3_secret_access_key: SecretStr | None = None
    s3_connect_timeout_seconds: float = Field(default=3.0, gt=0)
    s3_request_timeout_seconds: float = Field(default=30.0, gt=0)
    s3_max_attempts: int = Field(default=4, ge=1, le=20, description="tries per S3 request, with backoff")
    create_bucket: bool = False
    state_dir: str = Field(default="./lakehouse-state", description="local state (the catalog) of an S3 root")
    s3_cache_mb: int = Field(
        default=4096,
        ge=0,
        description=(
            "disk for local copies of an S3 root's data files that queries read (DuckDB reads the copies); "
            "least recently used copies go beyond this, copies running queries read stay; 0 = keep none"
        ),
    )
    s3_cache_dir: str | None = Field(
        default=None, description="where the copies of s3_cache_mb are made (default: the temp directory)"
    )
    insecure_no_auth: bool = False
    auth_file: str | None = Field(
        default=None, description="users and API tokens (flight_lakehouse.auth); set: authentication on"
    )
    auth_token_ttl_seconds: float = Field(
        default=3600.0, gt=0, le=30 * 86_400, description="how long a bearer token from a login is valid"
    )
    tls_cert: str | None = Field(default=None, description="PEM certificate chain; set: serve grpc+tls")
    tls_key: str | None = Field(default=None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(
        default=None, description="PEM CA certificates; set: clients must present a certificate they signed"
    )
    audit_log: str | None = Field(
        default=None, description="one JSON line per call to this file ('-': stderr); unset: no audit log"
    )
    query_timeout_seconds: float = Field(
        default=300.0, gt=0, description="time limit of a query: planning, running and a reader that stalls"
    )
    query_threads: int = Field(
        default=0, ge=0, description="DuckDB threads per query database; 0 = all cores"
    )
    query_memory_mb: int = Field(
        default_factory=default_query_memory_mb,
        ge=0,
        description=(
            "DuckDB memory limit of a query database: by default a quarter of physical memory, "
            "between 256 and 2048 MB (about 1 GB on a 4 GB machine); 0 = DuckDB's own (80% of memory)"
        ),
    )
    result_buffer_mb: int = Field(
        default=256,
        ge=1,
        description=(
            "memory for result batches produced but not yet sent, across all queries (a stalled reader "
            "holds its share until its time limit); a single larger row is refused"
        ),
    )
    result_cache_mb: int = Field(
        default=64,
        ge=0,
        description=(
            "memory for whole small results kept until a dataset they read changes (repeated dashboard "
            "queries); 0 = off"
        ),
    )
    target_file_mb: int = Field(default=128, ge=1, le=4096)
    row_group_rows: int = Field(default=1 << 20, ge=1024)
    max_batch_mb: int = Field(default=256, ge=1)
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    shutdown_unready_seconds: float = Field(
        default=0.0,
        ge=0,
        le=600,
        description=(
            "after SIGTERM, how long /readyz answers 503 while both ports still take calls (for a load "
            "balancer to stop sending them) before the server drains"
        ),
    )
    snapshot_keep_last: int = Field(
        default=100,
        ge=1,
        description="snapshots of an Iceberg dataset always kept, newest first (expiry keeps these)",
    )
    snapshot_keep_seconds: float = Field(
        default=7 * 86_400.0,
        ge=0,
        description="snapshots newer than this are kept too; older ones beyond snapshot_keep_last expire",
    )
    lance_refresh_seconds: float = Field(
        default=5.0,
        ge=0,
        description="how stale a Lance table may look to searches (writes by other servers)",
    )
    lance_cache_mb: int = Field(
        default=256,
        ge=1,
        description=(
            "memory for Lance's caches of index parts and table metadata (manifests, fragments), for "
            "pylance and for lancedb's searches each; a quarter of it for metadata"
        ),
    )
    vector_cache_mb: int = Field(
        default=1024, ge=0, description="memory for in-memory vector search graphs; 0 = serve from Lance"
    )
    vector_graph_m: int = Field(default=32, ge=4, le=128, description="HNSW links per vector")
    vector_graph_ef_construction: int = Field(default=64, ge=8, le=2048)
    vector_graph_ef_search: int = Field(default=64, ge=8, le=4096)
    vector_graph_code_bits: int = Field(
        default=8,
        description="bits a dimension of a graph's quantised vectors: 4, 6 or 8 (re-ranked exactly)",
    )
    index_wait_seconds: float = Field(
        default=2.0, ge=0, description="how long create_index waits for its build before answering 'building'"
    )
    prepared_statements_max: int = Field(
        default=1024, ge=1, le=1_000_000, description="Flight SQL prepared statements open at once"
    )
    prepared_statements_per_user: int = Field(
        default=128, ge=1, le=1_000_000, description="open prepared statements of one user (with auth)"
    )
    sessions_per_user: int = Field(
        default=64,
        ge=1,
        le=100_000,
        description="bearer tokens from logins one user holds at once; a new login ends the oldest",
    )
    max_concurrent_queries: int = Field(
        default=8, ge=1, le=10_000, description="queries running at once; more are UNAVAILABLE at once"
    )
    max_concurrent_ingests: int = Field(
        default=2, ge=1, le=1_000, description="uploads being written at once; more are UNAVAILABLE at once"
    )
    max_ingest_mb: int = Field(
        default=4096, ge=0, description="Arrow bytes one upload may send; 0 = no limit"
    )
    prepared_statement_idle_seconds: float = Field(
        default=900.0, gt=0, description="a prepared statement unused this long is closed"
    )
    query_parts_max: int = Field(
        default=0,
        ge=0,
        le=1024,
        description=(
            "endpoints a query reading one dataset's files row by row is split into (a client fetches them "
            "in parallel; several servers: at least one each); 0 = twice the CPU count, 1 = never split"
        ),
    )
    advertise: str | None = Field(
        default=None,
        description=(
            "the Flight location clients reach this server at (grpc://HOST:PORT, grpc+tls:// with TLS), "
            "named in the endpoints other servers answer; default: the bound host and port"
        ),
    )
    peers: str | None = Field(
        default=None,
        description=(
            "the other servers of this root, comma-separated locations (each taken as alive while its "
            "port answers); unset: they find each other in the catalog database"
        ),
    )
    heartbeat_seconds: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description=(
            "how often this server tells the catalog database it is alive; servers silent for three "
            "intervals are left out of FlightInfos; 0 = do not register (alone, or --peers)"
        ),
    )
    embedder: str | None = Field(
        default=None,
        description=(
            "what embeds text into vectors: builtin, onnx:DIR, openai:URL or none; "
            "unset: builtin when the embed extra is installed, else none"
        ),
    )
    embedder_model: str | None = Field(default=None, description="the model an openai:URL embedder runs")
    embedder_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="time limit of one request to an openai:URL embedder"
    )
    log_level: str = "INFO"

    @field_validator("vector_graph_code_bits")
    @classmethod
    def _quantiser_bits(cls, bits: int) -> int:
        if bits not in (4, 6, 8):
            raise ValueError("faiss quantises to 4, 6 or 8 bits a dimension")
        return bits

    @field_validator("root")
    @classmethod
    def _known_scheme(cls, root: str) -> str:
        scheme = urlparse(root).scheme if "://" in root else ""
        if scheme not in SUPPORTED_SCHEMES:
            raise ValueError(f"unknown storage scheme {scheme!r} in root {root!r} (use a directory or s3://)")
        if scheme == "s3" and not urlparse(root).netloc:
            raise ValueError(f"root {root!r} names no bucket (use s3://bucket/prefix)")
        return root

    @field_validator(
        "s3_endpoint",
        "s3_region",
        "s3_access_key_id",
        "s3_secret_access_key",
        "auth_file",
        "advertise",
        "peers",
        "tls_cert",
        "tls_key",
        "tls_client_ca",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        """An empty value (``LAKEHOUSE_S3_ACCESS_KEY_ID=``) means unset: the AWS chain applies."""
        return None if value == "" else value

    @field_validator("embedder")
    @classmethod
    def _known_embedder(cls, spec: str | None) -> str | None:
        if spec is None or spec in ("builtin", "none"):
            return spec
        kind, _, target = spec.partition(":")
        if kind not in ("onnx", "openai") or not target:
            raise ValueError(f"unknown embedder {spec!r} (builtin, onnx:DIR, openai:URL or none)")
        return spec

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, level: str) -> str:
        if level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError(f"unknown log level {level!r}")
        return level.upper()

    @model_validator(mode="after")
    def _loopback_without_auth(self) -> Settings:
        if not self.insecure_no_auth and not self.auth_file and not is_loopback(self.host):
            raise ValueError(
                f"host {self.host!r} is not a loopback address and authentication is off; "
                "bind to 127.0.0.1 or pass --insecure-no-auth"
            )
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        if self.tls_cert and not self.tls_key:
            raise ValueError("--tls-cert needs --tls-key (the certificate's private key)")
        if self.tls_key and not self.tls_cert:
            raise ValueError("--tls-key needs --tls-cert (the certificate of the key)")
        if self.tls_client_ca and not self.tls_cert:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        check_readable("--tls-cert", self.tls_cert)
        check_readable("--tls-key", self.tls_key)
        check_readable("--tls-client-ca", self.tls_client_ca)
        return self

    @property
    def is_s3(self) -> bool:
        """Whether the root is an S3 location."""
        return self.root.startswith("s3://")

    @property
    def scheme(self) -> str:
        """``grpc+tls`` with a TLS certificate, else ``grpc``."""
        return "grpc+tls" if self.tls_cert else "grpc"

    @property
    def location(self) -> str:
        """The Flight location the server binds to."""
        return f"{self.scheme}://{self.host}:{self.port}"


def check_readable(flag: str, path: str | None) -> None:
    """Refuse (one line naming ``flag``) a file ``path`` that cannot be opened for reading."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ValueError(f"{flag} {path!r} cannot be read: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_settings(**overrides: Any) -> Settings:
    """Build settings from env/.env with CLI ``overrides`` on top; refuse bad ones with one line."""
    given = {key: value for key, value in overrides.items() if value is not None}
    try:
        settings = Settings(**given)
    except ValidationError as exc:
        first = exc.errors()[0]
        message = first["msg"].removeprefix("Value error, ")
        if not first["loc"]:
            raise SettingsError(f"invalid settings: {message}") from None
        field = ".".join(str(part) for part in first["loc"])
        raise SettingsError(f"invalid setting {field}: {message} (got {first.get('input')!r})") from None
    if not settings.is_s3:
        check_local_root(Path(settings.root))
    return settings


def check_local_root(root: Path) -> None:
    """Create the root directory if needed and check that it is writable."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise SettingsError(f"root {str(root)!r} is not a writable directory: {exc.strerror}") from None
