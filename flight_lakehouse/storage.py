"""Where bytes live: one abstract storage with small backends chosen by the root's scheme.

Shaped like pyiceberg's FileIO: the rest of the server speaks in URIs under the root and asks the storage
for a pyarrow filesystem, the pyiceberg FileIO properties and the paths DuckDB should read.
"""

from __future__ import annotations

import abc
import contextlib
import heapq
import itertools
import logging
import os
import posixpath
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlparse

import pyarrow.fs as pafs

from flight_lakehouse.file_cache import DirectFiles, FileCache, QueryFiles
from flight_lakehouse.settings import Settings, SettingsError

log = logging.getLogger(__name__)

#: Chunk of the copies between a local temporary file and an object.
COPY_BYTES = 8 << 20


class Storage(abc.ABC):
    """A root under which Iceberg tables (data and metadata) are kept."""

    kind: str

    def __init__(self, root_uri: str, filesystem: pafs.FileSystem) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.filesystem = filesystem
        #: Tables running queries read, and the deletions of dropped tables waiting for them.
        self.leases = ReadLeases()

    def uri(self, *parts: str) -> str:
        """The URI of ``parts`` joined under the root."""
        return posixpath.join(self.root_uri, *parts)

    @abc.abstractmethod
    def fs_path(self, uri: str) -> str:
        """The path of ``uri`` for :attr:`filesystem`."""

    @abc.abstractmethod
    def default_catalog_uri(self) -> str:
        """SQLAlchemy URI of the catalog when none is configured."""

    def iceberg_properties(self) -> dict[str, str]:
        """Properties of the pyiceberg catalog's FileIO for this storage."""
        return {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}

    def open_output(self, uri: str) -> pafs.NativeFile:
        """A writable stream for a new object at ``uri``."""
        return self.filesystem.open_output_stream(self.fs_path(uri))

    def write_atomically(self, uri: str, write: Callable[[IO[bytes]], None]) -> None:
        """Write one object whole with ``write(file)``: readers see the old object or the new one, never
        a part. Here: ``write`` fills a local temporary file (a failure uploads nothing), then one
        upload (an object store makes an object visible only when its upload completes)."""
        with tempfile.TemporaryFile(prefix="lakehouse-upload-") as local:
            write(local)
            local.seek(0)
            with self.open_output(uri) as out:
                shutil.copyfileobj(local, out, COPY_BYTES)

    @contextlib.contextmanager
    def open_local(self, uri: str) -> Iterator[IO[bytes]]:
        """A local, seekable file with the content of one object (here: downloaded to a temporary
        file). ``FileNotFoundError`` when there is no such object."""
        with (
            tempfile.TemporaryFile(prefix="lakehouse-download-") as local,
            self.filesystem.open_input_stream(self.fs_path(uri)) as stream,
        ):
            shutil.copyfileobj(stream, local, COPY_BYTES)
            local.seek(0)
            yield local

    def delete_files(self, uris: Iterable[str]) -> None:
        """Delete files, ignoring those already gone."""
        for uri in uris:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(self.fs_path(uri))

    def listing(self, uri: str) -> list[pafs.FileInfo]:
        """Every file and directory under ``uri``, recursively (none when it does not exist)."""
        selector = pafs.FileSelector(self.fs_path(uri), recursive=True, allow_not_found=True)
        return self.filesystem.get_file_info(selector)

    def delete_listed(self, uri: str, found: list[pafs.FileInfo]) -> None:
        """Delete the files of a :meth:`listing` of ``uri``, then its directories left empty: files
        written there since (a table re-created under the same name) are kept."""
        self.delete_files(info.path for info in found if info.type == pafs.FileType.File)
        directories = [info.path for info in found if info.type == pafs.FileType.Directory]
        for path in [*sorted(directories, key=len, reverse=True), self.fs_path(uri)]:
            self.remove_empty_dir(path)

    @abc.abstractmethod
    def remove_empty_dir(self, path: str) -> None:
        """Remove the directory ``path`` (a filesystem path) if it is empty."""

    def public_facts(self) -> dict[str, str]:
        """What clients may learn about the storage (no paths, no secrets)."""
        return {"kind": self.kind}

    @property
    def lance_uri(self) -> str:
        """The Lance folder (a ``<name>.lance`` table each) beside the Iceberg tables."""
        return self.uri("lance")

    def lance_storage_options(self) -> dict[str, str]:
        """Lance (pylance and lancedb) object-store options for this storage."""
        return {}

    @abc.abstractmethod
    def query_files(self, settings: Settings) -> QueryFiles:
        """Where DuckDB reads the data files of this storage (call once: a cache starts empty)."""

    def pending_uploads(self, uri: str) -> list[tuple[str, str, float]]:
        """Unfinished uploads under ``uri`` as (object URI, upload id, start epoch); none on a disk."""
        return []

    def abort_upload(self, uri: str, upload_id: str) -> None:
        """Abort an unfinished upload returned by :meth:`pending_uploads`."""
        raise NotImplementedError(f"{self.kind} storage has no unfinished uploads")


class LocalStorage(Storage):
    """A directory on the server's disk: the embedded default."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        root = root.expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root.as_posix(), pafs.LocalFileSystem())

    def fs_path(self, uri: str) -> str:
        return uri.removeprefix("file://")

    def query_files(self, settings: Settings) -> QueryFiles:
        """The files themselves."""
        return DirectFiles(self.fs_path)

    def open_output(self, uri: str) -> pafs.NativeFile:
        self.filesystem.create_dir(posixpath.dirname(self.fs_path(uri)), recursive=True)
        return super().open_output(uri)

    def remove_empty_dir(self, path: str) -> None:
        with contextlib.suppress(OSError):  # not empty (or gone): kept
            os.rmdir(path)

    def default_catalog_uri(self) -> str:
        return f"sqlite:///{self.root_uri}/catalog.db"

    @contextlib.contextmanager
    def open_local(self, uri: str) -> Iterator[IO[bytes]]:
        """The file itself."""
        with open(self.fs_path(uri), "rb") as file:
            yield file

    def write_atomically(self, uri: str, write: Callable[[IO[bytes]], None]) -> None:
        """Write a temporary file beside ``uri`` with ``write(file)``, then rename it over ``uri`` (atomic
        on one file system)."""
        temporary = self.fs_path(f"{uri}.{uuid.uuid4().hex}.tmp")
        os.makedirs(posixpath.dirname(temporary), exist_ok=True)
        try:
            with open(temporary, "wb") as file:
                write(file)
            os.replace(temporary, self.fs_path(uri))
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        target = Path(self.fs_path(uri))
        for leftover in target.parent.glob(f"{target.name}.*.tmp"):  # from writers killed mid-write
            leftover.unlink(missing_ok=True)


class S3Storage(Storage):
    """A bucket and prefix on AWS S3 or any S3-compatible server (MinIO, Ceph, SeaweedFS)."""

    kind = "s3"

    def __init__(self, settings: Settings) -> None:
        parsed = urlparse(settings.root)
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.settings = settings
        self.endpoint = settings.s3_endpoint
        self.region = settings.s3_region or "us-east-1"
        secret = settings.s3_secret_access_key.get_secret_value() if settings.s3_secret_access_key else None
        self._access_key, self._secret_key = settings.s3_access_key_id, secret
        root = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        super().__init__(root, self._filesystem())

    def _filesystem(self) -> pafs.S3FileSystem:
        options: dict[str, Any] = {
            "region": self.region,
            "connect_timeout": self.settings.s3_connect_timeout_seconds,
            "request_timeout": self.settings.s3_request_timeout_seconds,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.settings.s3_max_attempts),
        }
        if self._access_key and self._secret_key:
            options.update(access_key=self._access_key, secret_key=self._secret_key)
        if self.endpoint:
            endpoint = urlparse(self.endpoint)
            options.update(
                endpoint_override=endpoint.netloc or endpoint.path, scheme=endpoint.scheme or "https"
            )
        return pafs.S3FileSystem(**options)

    @property
    def endpoint_name(self) -> str:
        """The endpoint as shown in messages (never with credentials)."""
        return self.endpoint or f"AWS S3 ({self.region})"

    def fs_path(self, uri: str) -> str:
        return uri.removeprefix("s3://")

    def query_files(self, settings: Settings) -> QueryFiles:
        """Local copies of the files, downloaded on first use (see :mod:`~flight_lakehouse.file_cache`)."""
        parent = settings.s3_cache_dir or tempfile.gettempdir()
        return FileCache(parent, settings.s3_cache_mb << 20, self.open_file)

    def open_file(self, uri: str) -> pafs.NativeFile:
        """The object at ``uri``, open for ranged reads."""
        return self.filesystem.open_input_file(self.fs_path(uri))

    def default_catalog_uri(self) -> str:
        state = Path(self.settings.state_dir).expanduser().resolve()
        state.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{state.as_posix()}/catalog.db"

    def iceberg_properties(self) -> dict[str, str]:
        properties = {
            **super().iceberg_properties(),
            "s3.region": self.region,
            "s3.connect-timeout": str(self.settings.s3_connect_timeout_seconds),
            "s3.request-timeout": str(self.settings.s3_request_timeout_seconds),
            "s3.retry-strategy-impl": "pyarrow.fs.AwsStandardS3RetryStrategy",
        }
        if self.endpoint:
            properties["s3.endpoint"] = self.endpoint
        if self._access_key and self._secret_key:
            properties.update(
                {"s3.access-key-id": self._access_key, "s3.secret-access-key": self._secret_key}
            )
        return properties

    def public_facts(self) -> dict[str, str]:
        return {"kind": self.kind, "bucket": self.bucket}

    def lance_storage_options(self) -> dict[str, str]:
        key, secret, token = self._credentials()
        options = {
            "aws_region": self.region,
            "connect_timeout": f"{self.settings.s3_connect_timeout_seconds:g}s",
            "timeout": f"{self.settings.s3_request_timeout_seconds:g}s",
            "client_max_retries": str(self.settings.s3_max_attempts - 1),
        }
        if self.endpoint:
            options.update(
                aws_endpoint=self.endpoint, allow_http=str(self.endpoint.startswith("http:")).lower()
            )
        if key and secret:
            options.update(aws_access_key_id=key, aws_secret_access_key=secret)
        if token:
            options["aws_session_token"] = token
        return options

    def pending_uploads(self, uri: str) -> list[tuple[str, str, float]]:
        """Multipart uploads under ``uri`` never completed (e.g. by a server killed mid-ingest)."""
        key_prefix = self.fs_path(uri).removeprefix(f"{self.bucket}/").rstrip("/") + "/"
        pages = (
            self.boto3_client()
            .get_paginator("list_multipart_uploads")
            .paginate(Bucket=self.bucket, Prefix=key_prefix)
        )
        return [
            (f"s3://{self.bucket}/{upload['Key']}", upload["UploadId"], upload["Initiated"].timestamp())
            for page in pages
            for upload in page.get("Uploads", [])
        ]

    def remove_empty_dir(self, path: str) -> None:
        """Delete the folder's marker object (pyarrow leaves one for each folder it empties), if that is
        all the folder holds."""
        client = self.boto3_client()
        marker = self._key(path).rstrip("/") + "/"
        try:
            listed = client.list_objects_v2(Bucket=self.bucket, Prefix=marker, MaxKeys=2).get("Contents", [])
            if listed and all(item["Key"] == marker for item in listed):
                client.delete_object(Bucket=self.bucket, Key=marker)
        except Exception:  # an empty marker left behind costs nothing
            log.debug("cannot remove the folder marker %s", marker, exc_info=True)

    def _key(self, path: str) -> str:
        """The object key of a filesystem path (``bucket/key``)."""
        return path.removeprefix(f"{self.bucket}/")

    def abort_upload(self, uri: str, upload_id: str) -> None:
        key = self._key(self.fs_path(uri))
        self.boto3_client().abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    def _credentials(self) -> tuple[str | None, str | None, str | None]:
        """Explicit credentials, else those of the standard AWS environment and profile chain."""
        if self._access_key and self._secret_key:
            return self._access_key, self._secret_key, None
        import boto3

        found = boto3.Session().get_credentials()
        if found is None:
            return None, None, None
        frozen = found.get_frozen_credentials()
        return frozen.access_key, frozen.secret_key, frozen.token

    def boto3_client(self) -> Any:
        """A boto3 S3 client with the same endpoint, credentials and timeouts."""
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=self.settings.s3_connect_timeout_seconds,
            read_timeout=self.settings.s3_request_timeout_seconds,
            retries={"max_attempts": self.settings.s3_max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"},
        )
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self._access_key,
            aws_secret_access_key=self._secret_key,
            config=config,
        )

    def check(self, create_bucket: bool) -> None:
        """Start-up check: endpoint reachable, credentials valid, bucket present (or created), writable."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            NoCredentialsError,
            PartialCredentialsError,
        )

        where = f"S3 endpoint {self.endpoint_name}, bucket {self.bucket!r}"
        client = self.boto3_client()
        try:
            try:
                client.head_bucket(Bucket=self.bucket)
            except ClientError as exc:
                if error_status(exc) != 404:
                    raise
                if not create_bucket:
                    raise SettingsError(
                        f"{where}: the bucket does not exist (pass --create-bucket to create it)"
                    ) from None
                client.create_bucket(Bucket=self.bucket)
            probe = "/".join(part for part in (self.prefix, ".write-probe") if part)
            client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
            client.delete_object(Bucket=self.bucket, Key=probe)
        except (NoCredentialsError, PartialCredentialsError):
            raise SettingsError(
                f"{where}: no credentials (set LAKEHOUSE_S3_ACCESS_KEY_ID and _SECRET_ACCESS_KEY)"
            ) from None
        except ClientError as exc:
            status, code = error_status(exc), exc.response.get("Error", {}).get("Code", "")
            if status == 403 or code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied"):
                raise SettingsError(f"{where}: credentials refused ({code or status})") from None
            raise SettingsError(f"{where}: {code or status}") from None
        except BotoCoreError as exc:
            raise SettingsError(f"{where}: unreachable ({type(exc).__name__})") from None


def quote_literal(text: str) -> str:
    """A DuckDB string literal."""
    return "'" + text.replace("'", "''") + "'"


def error_status(exc: Any) -> int:
    """The HTTP status of a botocore ClientError."""
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def open_storage(settings: Settings, check: bool = True) -> Storage:
    """The storage backend for ``settings.root``; an S3 root is checked first (:meth:`S3Storage.check`)."""
    storage: Storage = S3Storage(settings) if settings.is_s3 else LocalStorage(Path(settings.root))
    if isinstance(storage, S3Storage) and check:
        storage.check(settings.create_bucket)
    # a query ends by its time limit (stalled readers included): no reader of a dropped table is left then
    storage.leases.max_wait_seconds = settings.query_timeout_seconds + 30
    return storage


class ReadLeases:
    """Which tables running reads use, so that files a change removes (a drop, an optimize's clean-up of
    old versions) are deleted only after the reads that were running when it happened.

    A query holds a lease on each table it reads (keyed by the table's name) from before it looks the
    table up until it ends; a search holds one while it runs. A deletion runs at once when no lease holds
    its table, else when the last of the leases holding it then is released (reads started later see the
    change and are not waited for: under steady reads a deletion would wait for ever), and at the latest
    after ``max_wait_seconds`` (a query ends by its time limit, so no reader is left then). A drop bumps
    :attr:`epoch`, so that a query that looked its tables up before taking its leases can tell that it
    must look again.
    """

    def __init__(self, max_wait_seconds: float = 330.0) -> None:
        self.max_wait_seconds = max_wait_seconds
        self.epoch = 0
        self._held: dict[str, set[int]] = {}  # key -> the leases holding it
        #: key -> (the leases still awaited, the deletion waiting for them)
        self._pending: dict[str, list[tuple[set[int], Callable[[], None]]]] = {}
        self._tokens = itertools.count()
        self._guard = threading.Lock()
        #: (deadline, tiebreak, key, deletion): when a waiting deletion runs anyway, watched by one thread
        #: (a timer thread each lived ``max_wait_seconds``: under steady optimizes, dozens at once)
        self._deadlines: list[tuple[float, int, str, Callable[[], None]]] = []
        self._deadline_added = threading.Condition(self._guard)
        self._watchdog: threading.Thread | None = None

    def hold(self, keys: Iterable[str]) -> Lease:
        """Take a lease on each of ``keys`` (released by :meth:`Lease.release`, or when it is freed)."""
        held = tuple(keys)
        token = next(self._tokens)
        with self._guard:
            for key in held:
                self._held.setdefault(key, set()).add(token)
        return Lease(self, held, token)

    def release(self, keys: Iterable[str], token: int) -> None:
        """Give a lease back; deletions waiting only for it start (on a thread of their own)."""
        ready: list[Callable[[], None]] = []
        with self._guard:
            for key in keys:
                holders = self._held.get(key)
                if holders is not None:
                    holders.discard(token)
                    if not holders:
                        del self._held[key]
                waiting = self._pending.pop(key, [])
                for awaited, delete in waiting:
                    awaited.discard(token)
                    if not awaited:
                        ready.append(delete)
                still = [entry for entry in waiting if entry[0]]
                if still:
                    self._pending[key] = still
        if ready:
            threading.Thread(target=run_all, args=(ready,), name="deferred-delete", daemon=True).start()

    def delete_when_unread(self, key: str, delete: Callable[[], None]) -> bool:
        """:meth:`run_when_unread`; queries that looked their tables up before taking their leases look
        again (:attr:`epoch`)."""
        with self._guard:
            self.epoch += 1
        return self.run_when_unread(key, delete)

    def run_when_unread(self, key: str, delete: Callable[[], None]) -> bool:
        """Run ``delete`` now if no lease holds ``key`` (returns True; its errors are raised), else once
        the leases holding it now are released, at the latest after :attr:`max_wait_seconds` (errors then
        logged)."""
        with self._guard:
            holders = set(self._held.get(key, ()))
            if holders:
                self._pending.setdefault(key, []).append((holders, delete))
                deadline = time.monotonic() + self.max_wait_seconds
                heapq.heappush(self._deadlines, (deadline, next(self._tokens), key, delete))
                if self._watchdog is None:
                    self._watchdog = threading.Thread(target=self._watch, name="lease-deadlines", daemon=True)
                    self._watchdog.start()
                self._deadline_added.notify()
        if not holders:
            delete()
            return True
        return False

    def _watch(self) -> None:
        """Run each waiting deletion whose deadline has come (:meth:`_expire`: unless it already ran)."""
        while True:
            with self._guard:
                if not self._deadlines:
                    self._deadline_added.wait()
                    continue
                deadline, _, key, delete = self._deadlines[0]
                if deadline > time.monotonic():
                    self._deadline_added.wait(deadline - time.monotonic())
                    continue
                heapq.heappop(self._deadlines)
            self._expire(key, delete)

    def _expire(self, key: str, delete: Callable[[], None]) -> None:
        with self._guard:
            waiting = self._pending.get(key, [])
            entry = next((entry for entry in waiting if entry[1] is delete), None)
            if entry is None:
                return
            waiting.remove(entry)
            if not waiting:
                self._pending.pop(key, None)
        log.info("deleting the files of dropped table %s after %g s", key, self.max_wait_seconds)
        run_all([delete])

    def flush(self) -> None:
        """Run every waiting deletion now (at shutdown, after the queries have been stopped)."""
        with self._guard:
            waiting = [delete for entries in self._pending.values() for _, delete in entries]
            self._pending.clear()
        run_all(waiting)


class Lease:
    """Leases on some tables, given back once (explicitly, or when the object is freed)."""

    def __init__(self, leases: ReadLeases, keys: tuple[str, ...], token: int) -> None:
        self.keys = keys
        self._release = weakref.finalize(self, leases.release, keys, token)

    def release(self) -> None:
        """Give the leases back (later calls do nothing)."""
        self._release()

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def run_all(deletes: list[Callable[[], None]]) -> None:
    """Run deletions; one that fails is logged (``gc`` finds what it left)."""
    for delete in deletes:
        try:
            delete()
        except Exception:
            log.warning("deleting the files of a dropped table failed; gc will find them", exc_info=True)
