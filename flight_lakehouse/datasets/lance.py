"""Lance tables: the datasets that hold vectors, beside the Iceberg datasets under the same root.

A dataset whose schema holds a vector column (``fixed_size_list<float32|float16>``) is a Lance table at
``<root>/lance/<name>.lance``. :class:`LanceTables` opens, lists, describes, writes and maintains them.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.fs as pafs

from flight_lakehouse.commands import IngestOptions
from flight_lakehouse.datasets.base import Batches, Facts, Namespace, Retention, TableFormat
from flight_lakehouse.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from flight_lakehouse.settings import Settings
from flight_lakehouse.storage import Lease, Storage
from flight_lakehouse.vector_memory import ReadWriteLock
from flight_lakehouse.vectors import (
    WRITE_BUFFER_BYTES,
    UploadPlan,
    lance_error,
    table_metric,
    vector_columns,
)

if TYPE_CHECKING:
    import lance
    import lancedb
    from lancedb.db import DBConnection
    from lancedb.table import LanceTable

log = logging.getLogger(__name__)


def summary(name: str, dataset: lance.LanceDataset, versions: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``list_datasets`` entry of a Lance table from its dataset and versions."""
    return {
        "name": name,
        "format": "lance",
        "rows": dataset.count_rows(),
        "bytes": total_bytes(dataset, versions),
        "updated_at": iso(versions[-1]["timestamp"]),
    }


#: The share of ``lance_cache_mb`` for metadata (manifests, fragment metadata of the versions read).
METADATA_CACHE_SHARE = 0.25
#: Tries at reading a table's versions while another call's ``optimize`` removes old ones.
VERSION_READS = 5


def versions_of(dataset: lance.LanceDataset) -> list[dict[str, Any]]:
    """``dataset.versions()``, read again when an old version's manifest went between Lance's listing of
    the manifests and its reading of them (an ``optimize`` removing old versions meanwhile)."""
    for attempt in range(VERSION_READS):
        try:
            return dataset.versions()
        except (OSError, ValueError) as exc:
            if "not found" not in str(exc).lower() or attempt == VERSION_READS - 1:
                raise
    raise AssertionError("unreachable")


def as_utc(moment: datetime) -> datetime:
    """``moment`` as an aware UTC time (Lance's naive timestamps are UTC, as :func:`iso` reads them)."""
    return moment.replace(tzinfo=timezone.utc) if moment.tzinfo is None else moment.astimezone(timezone.utc)


#: Tries of an ``optimize`` whose commit a concurrent write preempted (it changes no rows: it tries again).
OPTIMIZE_ATTEMPTS = 5


def is_conflict(error: BaseException) -> bool:
    """Whether :func:`~flight_lakehouse.vectors.lance_error` made ``error`` of a commit conflict."""
    return isinstance(error, Unavailable) and "a concurrent write won" in str(error)


def retry_preempted(attempt: Callable[[], None], attempts: int, root: str, doing: str) -> None:
    """Run ``attempt`` (a change that leaves the rows as they are: a compaction, an index), again when a
    concurrent commit preempted its own; anything else, or the last preemption, is raised as
    :func:`~flight_lakehouse.vectors.lance_error` makes it."""
    for number in range(1, attempts + 1):
        try:
            attempt()
            return
        except Exception as exc:
            error = lance_error(exc, root, doing)
            if number == attempts or not is_conflict(error):
                raise error from None
            log.info("%s preempted by a concurrent commit (attempt %d); again", doing, number)


def total_bytes(dataset: lance.LanceDataset, versions: list[dict[str, Any]]) -> int:
    """Bytes of the table's current data files and indexes (deleted versions' files not counted)."""
    current = next((v for v in versions if v["version"] == dataset.version), versions[-1])
    data = int(current.get("metadata", {}).get("total_files_size", 0) or 0)
    return data + sum(index.total_size_bytes or 0 for index in dataset.describe_indices())


#: Lance's index types as ``create_index`` names them.
INDEX_KINDS = {
    "IVF_PQ": "ivf_pq",
    "IVF_HNSW_SQ": "ivf_hnsw_sq",
    "BTree": "btree",
    "Bitmap": "bitmap",
    "Inverted": "fts",
}


def indexes(dataset: lance.LanceDataset) -> list[dict[str, Any]]:
    """The built indexes of ``dataset``."""
    found = []
    for index in dataset.describe_indices():
        stats = dataset.index_statistics(index.name)
        details = stats.get("indices") or [{}]
        kind = str(stats.get("index_type", ""))
        found.append(
            {
                "name": index.name,
                "column": index.field_names[0] if index.field_names else None,
                "kind": INDEX_KINDS.get(kind, kind.lower()),
                "state": "ready",
                "metric": details[0].get("metric_type"),
                "indexed_rows": stats.get("num_indexed_rows"),
                "unindexed_rows": stats.get("num_unindexed_rows"),
            }
        )
    return found


def iso(value: datetime) -> str:
    """ISO-8601 UTC time, to the millisecond."""
    return as_utc(value).isoformat(timespec="milliseconds")


class LanceTables(TableFormat):
    """The Lance tables under the root: one pylance dataset per table, lancedb handles opened on demand.

    Lance itself (pylance) opens, lists, describes, writes, indexes, reads and k-NN searches the tables.
    lancedb runs full-text and hybrid searches (its query builders), and loads on the first of them: each
    of the two libraries carries its own copy of Lance, and lancedb costs a server about 90 MB of RSS (its
    imports, its code pages) that a server ingesting, indexing and searching vectors never needs.
    """

    kind = "lance"

    def __init__(self, storage: Storage, settings: Settings) -> None:
        self.storage = storage
        self.settings = settings
        self._db: DBConnection | None = None
        self._db_session: lancedb.Session | None = None
        #: The newest version of each table this server knows, and when the store was last asked.
        self._datasets: dict[str, lance.LanceDataset] = {}
        self._checked: dict[str, float] = {}
        self._queryable: dict[str, LanceTable] = {}
        self._schemas: dict[str, pa.Schema] = {}
        self._guard = threading.Lock()
        #: Per table: row changes (deletes, upserts) share it, ``optimize`` holds it alone (a compaction
        #: that a concurrent delete preempts fails; deletes in a row kept preempting every retry).
        self._rewrites: dict[str, ReadWriteLock] = {}
        #: Bumped whenever a table is created or dropped: query databases are rebuilt when it changes.
        self.generation = 0
        #: Called with a table's name after each commit to it by this server, and after it is dropped.
        self.on_commit: list[Callable[[str], None]] = []
        self.on_drop: list[Callable[[str], None]] = []
        #: Called with a table's name and its ``describe_dataset`` facts, to add their own.
        self.on_describe: list[Callable[[str, dict[str, Any]], None]] = []
        #: When the folders were last listed (tables created and dropped by other servers), and the lock
        #: that lets one thread list them at a time.
        self._listed_at = time.monotonic()
        self._listing = threading.Lock()
        for name, dataset in self._stored_tables().items():
            self._adopt(name, dataset, new=True)

    def _uri(self, name: str) -> str:
        return f"{self.storage.lance_uri}/{name}.lance"

    def _open(self, name: str) -> lance.LanceDataset:
        """The newest version of ``name``, read from the store."""
        import lance

        return lance.dataset(
            self._uri(name), storage_options=self.storage.lance_storage_options(), session=self._session
        )

    @functools.cached_property
    def _session(self) -> lance.Session:
        """The caches every table shares, bounded: Lance keeps each version's manifest and fragment metadata
        and every index part it loads, and its defaults (1 GiB and 6 GiB) let a server grow with the writes
        (~0.3 MB per one-row write: 87 MB/min under sustained one-row appends and deletes)."""
        import lance

        return lance.Session(**self._cache_sizes())

    def _cache_sizes(self) -> dict[str, int]:
        """The bounds of a Lance session's caches (pylance's and lancedb's have the same parameters)."""
        total = self.settings.lance_cache_mb << 20
        metadata = int(total * METADATA_CACHE_SHARE)
        return {"index_cache_size_bytes": total - metadata, "metadata_cache_size_bytes": metadata}

    def renew_caches(self) -> None:
        """Start Lance's caches afresh (after an ``optimize`` or an index build). A session keeps a reader,
        with its open files, of every index version a search loaded until its byte bound evicts it, so
        each rebuilt index left files open (a 10-minute soak: +110 open files). The known tables are
        opened again in a new session; the old one goes with the last read using it."""
        import lance

        session = lance.Session(**self._cache_sizes())
        with self._guard:
            known = {name: dataset.version for name, dataset in self._datasets.items()}
        reopened = {}
        for name, version in known.items():
            try:
                reopened[name] = lance.dataset(
                    self._uri(name),
                    version=version,
                    storage_options=self.storage.lance_storage_options(),
                    session=session,
                )
            except Exception:  # dropped or unreadable meanwhile: the next refresh deals with it
                log.debug("cannot reopen %s in a new session", name, exc_info=True)
        with self._guard:
            self.__dict__["_session"] = session
            for name, dataset in reopened.items():
                current = self._datasets.get(name)
                if current is not None and current.version == dataset.version:
                    self._datasets[name] = dataset
            self._db, self._db_session = None, None
            self._queryable.clear()

    def cache_bytes(self) -> dict[str, int]:
        """Bytes held by Lance's caches: pylance's session, and lancedb's once a search opened it."""
        held = {"pylance": self._session.size_bytes() if "_session" in self.__dict__ else 0, "lancedb": 0}
        if self._db_session is not None:
            held["lancedb"] = self._db_session.size_bytes
        return held

    @property
    def _connection(self) -> DBConnection:
        """The lancedb connection, opened on first use."""
        if self._db is None:
            import lancedb

            self._db_session = lancedb.Session(**self._cache_sizes())
            self._db = lancedb.connect(
                self.storage.lance_uri,
                storage_options=self.storage.lance_storage_options(),
                read_consistency_interval=timedelta(seconds=self.settings.lance_refresh_seconds),
                session=self._db_session,
            )
        return self._db

    def _folders(self) -> list[str]:
        """The names of the ``<name>.lance`` folders under the root (one listing)."""
        selector = pafs.FileSelector(self.storage.fs_path(self.storage.lance_uri), allow_not_found=True)
        return [
            info.base_name.removesuffix(".lance")
            for info in self.storage.filesystem.get_file_info(selector)
            if info.type == pafs.FileType.Directory and info.base_name.endswith(".lance")
        ]

    def _stored_tables(self, among: list[str] | None = None) -> dict[str, lance.LanceDataset]:
        """Tables with at least one version (an object store may keep the folder of a dropped one), of
        every folder or of those ``among``. Lance (a second of imports) loads only when there is one."""
        tables = {}
        for name in self._folders() if among is None else among:
            dataset = self._try_open(name)
            if dataset is not None:
                tables[name] = dataset
        return tables

    def _try_open(self, name: str) -> lance.LanceDataset | None:
        """The newest version of ``name``, or None when its folder holds no table."""
        try:
            return self._open(name)
        except Exception:  # no manifest: an empty folder left behind, or no folder
            log.debug("skipping %s: not a Lance table", name, exc_info=True)
            return None

    def _notice_other_servers(self, force: bool = False) -> None:
        """Adopt the tables other servers (sharing the root) created, forget those whose folder went: by
        one listing of the folders, at most every ``lance_refresh_seconds`` unless ``force``. A table
        dropped elsewhere whose folder is still there (files kept for queries) goes when its versions
        are read (:meth:`refresh_version`)."""
        if not force and time.monotonic() - self._listed_at < self.settings.lance_refresh_seconds:
            return
        if not self._listing.acquire(blocking=force):
            return  # another thread is listing
        try:
            self._listed_at = time.monotonic()
            with self._guard:  # before the listing: a table created meanwhile is not taken for dropped
                known = set(self._datasets)
            folders = set(self._folders())
            for name, dataset in self._stored_tables(sorted(folders - known)).items():
                self._found(name, dataset)
            for name in known - folders:
                if self._try_open(name) is None:  # a listing that missed it is not a drop
                    self._forget(name, "its folder is gone")
        except Exception:  # storage unreachable: the tables known stay as they are
            log.warning("cannot list the Lance tables", exc_info=True)
        finally:
            self._listing.release()

    def _found(self, name: str, dataset: lance.LanceDataset) -> None:
        """Adopt a table another server created, and tell the listeners (the vector cache serves it)."""
        with self._guard:
            if name in self._datasets:
                return
        self._adopt(name, dataset, new=True)
        log.info("found Lance table %s (created by another server)", name)
        for listener in self.on_commit:
            with contextlib.suppress(NotFound):  # dropped again meanwhile: the listeners were told
                listener(name)

    def _forget(self, name: str, why: str) -> None:
        """Forget a table another server dropped (its files are that server's to delete)."""
        with self._guard:
            if self._datasets.pop(name, None) is None:
                return
            self._queryable.pop(name, None)
            self._schemas.pop(name, None)
            self._checked.pop(name, None)
            self.generation += 1
        log.info("Lance table %s dropped by another server (%s)", name, why)
        for listener in self.on_drop:
            listener(name)

    def _adopt(self, name: str, dataset: lance.LanceDataset, new: bool = False) -> None:
        """Make ``dataset`` the known newest version of ``name`` (never going back to an older one).
        Only a ``new`` table is added: a late commit or refresh does not bring back a dropped one."""
        with self._guard:
            known = self._datasets.get(name)
            if known is None and not new:
                return
            if known is None or dataset.version >= known.version:
                self._datasets[name] = dataset
            self._checked[name] = time.monotonic()
            if known is None:
                self.generation += 1

    # -- names -----------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every Lance table, sorted (those of other servers sharing the root within
        ``lance_refresh_seconds``)."""
        self._notice_other_servers()
        with self._guard:
            return sorted(self._datasets)

    def exists(self, name: str) -> bool:
        """Whether the Lance table ``name`` exists."""
        self._notice_other_servers()
        with self._guard:
            return name in self._datasets

    def _known(self, name: str) -> lance.LanceDataset:
        with self._guard:
            dataset = self._datasets.get(name)
        if dataset is None:
            raise NotFound(f"dataset {name!r} not found")
        return dataset

    def table(self, name: str) -> LanceTable:
        """lancedb's handle of ``name``, for full-text and hybrid search (loads lancedb on first use)."""
        self._known(name)
        with self._guard:
            table = self._queryable.get(name)
        if table is None:
            table = self._connection.open_table(name)
            with self._guard:
                table = self._queryable.setdefault(name, table)
        return table

    def dataset(self, name: str, version: int | None = None) -> lance.LanceDataset:
        """The Lance dataset of ``name`` at ``version`` (the newest when None), pinned for one query.

        The newest is what this server committed last, or what the store holds when the last look is
        older than ``lance_refresh_seconds`` (commits by other processes)."""
        if version is None:
            if time.monotonic() - self._checked.get(name, 0.0) >= self.settings.lance_refresh_seconds:
                self.refresh_version(name)
            return self._known(name)
        try:
            return self._known(name).checkout_version(version)
        except NotFound:
            raise
        except Exception:
            raise NotFound(f"version {version} of dataset {name!r} not found") from None

    def version(self, name: str) -> int:
        """The table's current version as this server knows it (updated by its own commits)."""
        return self._known(name).version

    def refresh_version(self, name: str) -> int:
        """The table's current version, asking the store (commits by other processes included)."""
        known = self._known(name)
        try:
            latest = known.latest_version
        except Exception as exc:
            if is_missing(exc) and self._try_open(name) is None:  # dropped elsewhere: manifests go first
                self._forget(name, "its versions are gone")
                raise NotFound(f"dataset {name!r} not found") from None
            log.debug("cannot read the versions of %s", name, exc_info=True)  # storage: try again later
            return known.version
        self._adopt(name, known if latest == known.version else known.checkout_version(latest))
        return self._known(name).version

    def committed(self, name: str, dataset: lance.LanceDataset | None = None) -> None:
        """Record a commit by this server (``dataset``: the version it made, else read from the store)
        and tell the listeners, before the commit's call returns."""
        if dataset is None:
            self.refresh_version(name)
        else:
            self._adopt(name, dataset)
        with self._guard:
            queryable = self._queryable.get(name)
            self._schemas.pop(name, None)  # a commit may add columns (reembed into a new column)
        if queryable is not None:
            queryable.checkout_latest()
        for listener in self.on_commit:
            listener(name)

    def schema(self, name: str) -> pa.Schema:
        """The table's Arrow schema (with its metric in the metadata), read once per commit: uploads cannot
        change columns (``check_compatible``; ``reembed`` adds one), and asking Lance costs ~0.4 ms, a third
        of an in-memory search."""
        schema = self._schemas.get(name)
        if schema is None:
            schema = self._schemas[name] = self._known(name).schema
        return schema

    def _versions(self, name: str, dataset: lance.LanceDataset) -> list[dict[str, Any]]:
        """The table's versions, or NOT_FOUND when there are none left: another server dropped it (its
        manifests go first) since this one last looked."""
        try:
            versions = versions_of(dataset)
        except Exception as exc:
            if not is_missing(exc):
                raise
            versions = []
        if not versions and self._try_open(name) is None:
            self._forget(name, "its versions are gone")
            raise NotFound(f"dataset {name!r} not found")
        if not versions:  # read while another server dropped and re-created it: read again
            versions = versions_of(self.dataset(name))
        return versions

    # -- catalog actions -------------------------------------------------------------------------
    def summarise(self, name: str) -> dict[str, Any]:
        """The ``list_datasets`` entry of one Lance table."""
        dataset = self.dataset(name)
        return summary(name, dataset, self._versions(name, dataset))

    def describe(self, name: str) -> dict[str, Any]:
        """Schema, vector columns, versions and indexes (and what the ``on_describe`` listeners add)."""
        dataset = self.dataset(name)
        schema = self.schema(name)
        vectors = vector_columns(schema)
        versions = self._versions(name, dataset)
        facts = summary(name, dataset, versions)
        facts.update(
            {
                "schema": base64.b64encode(schema.serialize().to_pybytes()).decode("ascii"),
                "columns": [{"name": f.name, "type": str(f.type)} for f in schema],
                "files": len(dataset.get_fragments()),
                "version": dataset.version,
                "versions": len(versions),
                "vector_columns": vectors,
                "dimension": next(iter(vectors.values()), None),
                "metric": table_metric(schema),
                "indexes": indexes(dataset),
                "location": self._uri(name),  # where lancedb or pylance opens it
            }
        )
        for listener in self.on_describe:
            listener(name, facts)
        return facts

    def history(self, name: str) -> list[dict[str, Any]]:
        """The table's versions, newest first."""
        versions = self._versions(name, self.dataset(name))
        current = versions[-1]["version"] if versions else None
        return [
            {
                "version": entry["version"],
                "timestamp": iso(entry["timestamp"]),
                "rows": int(entry.get("metadata", {}).get("total_rows", 0) or 0),
                "current": entry["version"] == current,
            }
            for entry in reversed(versions)
        ]

    def drop(self, name: str) -> None:
        """Drop a Lance table and delete its files."""
        with self._guard:
            if self._datasets.pop(name, None) is None:
                raise NotFound(f"dataset {name!r} not found")
            self._queryable.pop(name, None)
            self._schemas.pop(name, None)
            self._checked.pop(name, None)
            self.generation += 1
        self._delete_folder(name)
        for listener in self.on_drop:
            listener(name)
        log.info("dropped Lance table %s", name)

    def _delete_folder(self, name: str) -> None:
        """Delete a dropped table's files: its manifests now (a table re-created under the name writes
        manifests of the same names), the rest as they are now once no running query reads them."""
        uri = self._uri(name)
        found = self.storage.listing(uri)
        manifests = [info for info in found if is_manifest(info.path)]
        self.storage.delete_files(info.path for info in manifests)
        rest = [info for info in found if not is_manifest(info.path)]
        self.storage.leases.delete_when_unread(name, functools.partial(self.storage.delete_listed, uri, rest))

    def rewrites(self, name: str) -> ReadWriteLock:
        """The lock ordering row changes of ``name`` and its compaction (see ``_rewrites``)."""
        with self._guard:
            return self._rewrites.setdefault(name, ReadWriteLock())

    def expire(self, name: str, retention: Retention) -> Facts:
        """Remove the versions ``retention`` lets go, and the files only they used (Lance deletes them), once
        the reads of the table running now have ended: a search or query of an old version would find its
        files gone."""
        removed: dict[str, int] = {}

        def clean_up() -> None:
            with self.rewrites(name).writing():  # as optimize's clean-up: after running row changes
                try:
                    stats = self.writable(name).cleanup_old_versions(
                        older_than=timedelta(seconds=retention.keep_seconds),
                        retain_versions=retention.keep_last,
                    )
                except Exception as exc:
                    raise lance_error(exc, self.storage.root_uri, f"expiring versions of {name!r}") from None
            removed.update(versions=stats.old_versions, bytes=stats.bytes_removed)

        versions = versions_of(self.dataset(name))
        now = self.storage.leases.run_when_unread(name, clean_up)
        in_order = sorted((v["version"], as_utc(v["timestamp"]).timestamp() * 1000) for v in versions)
        expired = removed["versions"] if now else len(retention.expired(in_order))
        return {
            "dataset": name,
            "snapshots_before": len(versions),
            "snapshots_expired": expired,
            "snapshots_after": len(versions) - expired,
            "bytes_removed": removed.get("bytes", 0),
            "old_versions_removed": "now" if now else "after the running reads",
        }

    def delete_rows(self, name: str, where: str) -> dict[str, Any]:
        """Delete the rows matching ``where``."""
        try:
            with self.rewrites(name).reading():
                dataset = self.writable(name)
                result = dataset.delete(where)
        except Exception as exc:
            raise lance_error(exc, self.storage.root_uri, f"delete_rows on {name!r}") from None
        self.committed(name, dataset)
        return {"dataset": name, "rows_deleted": result["num_deleted_rows"], "version": dataset.version}

    def writable(self, name: str) -> lance.LanceDataset:
        """A handle of its own for a commit: Lance moves the handle it commits with to the new version,
        and the shared one may be in use by a query."""
        known = self._known(name)
        return known.checkout_version(known.version)

    def optimize(self, name: str, retention: Retention, names: Namespace) -> Facts:
        """Compact small fragments, bring indexes up to date, remove versions older than
        ``retention.keep_seconds`` but the newest (concurrent writes go on: no write lock)."""
        older_than_seconds = retention.keep_seconds
        before = self.dataset(name)
        versions = versions_of(before)
        versions_before, bytes_before = len(versions), total_bytes(before, versions)
        started = time.monotonic()
        with self.rewrites(name).writing():
            retry_preempted(
                lambda: self._optimize_once(name),
                OPTIMIZE_ATTEMPTS,
                self.storage.root_uri,
                f"optimize on {name!r}",
            )
            self.committed(name)  # before a delete waiting for the lock takes its handle
        self.renew_caches()  # let go of the readers of the index versions optimize replaced
        # the versions up to the compaction's go once no running read uses them (a search or a query
        # reading the version it started on would find its fragments gone)
        cutoff = time.time() - older_than_seconds
        cleaned = self.storage.leases.run_when_unread(name, functools.partial(self._clean_up, name, cutoff))
        after = self.dataset(name)
        versions = versions_of(after)
        bytes_after = total_bytes(after, versions)
        return {
            "dataset": name,
            "version": after.version,
            "fragments_before": len(before.get_fragments()),
            "fragments_after": len(after.get_fragments()),
            "versions_before": versions_before,
            "versions_after": len(versions),
            "bytes_before": bytes_before,
            "bytes_after": bytes_after,
            "bytes_removed": max(0, bytes_before - bytes_after),
            "old_versions_removed": "now" if cleaned else "after the running reads",
            "seconds": round(time.monotonic() - started, 3),
        }

    def _clean_up(self, name: str, cutoff: float) -> None:
        """Remove the versions of ``name`` made before ``cutoff`` (a wall-clock time), but the newest, and
        the files only they use."""
        with self.rewrites(name).writing():  # after running row changes, as optimize's compaction
            try:
                dataset = self.writable(name)
                dataset.cleanup_old_versions(older_than=timedelta(seconds=max(0.0, time.time() - cutoff)))
            except Exception as exc:
                raise lance_error(exc, self.storage.root_uri, f"optimize on {name!r}") from None

    def reading(self, name: str) -> Lease:
        """A lease on ``name`` for a read outside a query (a search): its version's files stay meanwhile."""
        return self.storage.leases.hold([name])

    def _optimize_once(self, name: str) -> None:
        """One try of :meth:`optimize`'s compaction on the newest version (a concurrent write may preempt
        it)."""
        self.refresh_version(name)
        dataset = self.writable(name)
        dataset.optimize.compact_files()
        dataset.optimize.optimize_indices()  # rows added since an index was built join it

    # -- writes ----------------------------------------------------------------------------------
    def claims(self, options: IngestOptions, schema: pa.Schema) -> bool:
        """An upload creates a Lance table when asked to (format, vector column, upsert) or when it holds a
        vector column."""
        if options.format is not None:
            return options.format == "lance"
        return options.vector_column is not None or options.mode == "upsert" or bool(vector_columns(schema))

    def pins(self) -> dict[str, pa.Schema]:  # type: ignore[override]
        """Each table with its schema (a query pins the version it reads when it starts)."""
        return {name: self.schema(name) for name in self.names()}

    def write(self, options: IngestOptions, schema: pa.Schema, batches: Batches, names: Namespace) -> Facts:
        """Write one upload as one new version (a new table when missing); refused uploads write nothing."""
        name = options.dataset
        if options.schema_mode == "evolve":
            raise InvalidArgument(f"dataset {name!r}: schema_mode 'evolve' is not supported for Lance tables")
        if options.mode == "upsert" and options.key is None:
            raise InvalidArgument("mode 'upsert' needs 'key': the column that identifies a row")
        if options.mode != "upsert" and options.key is not None:
            raise InvalidArgument("field 'key' is only used with mode 'upsert'")
        started = time.monotonic()
        if self.exists(name):
            # Upserts run one at a time (across servers on a shared catalog), each on the newest version:
            # two merges inserting the same new key would both insert it (Lance sees no conflict
            # between two inserts), as would a merge into a version older than another's insert.
            with names.write_lock(name) if options.mode == "upsert" else contextlib.nullcontext():
                result, dataset = self._write_existing(options, schema, batches)
        else:
            with names.write_lock(name):  # on a shared catalog, other servers' creations wait for it too
                created_elsewhere = self._try_open(name)  # since this server last listed the tables
                if created_elsewhere is not None:
                    self._found(name, created_elsewhere)
                if self.exists(name):  # created meanwhile: write into it
                    result, dataset = self._write_existing(options, schema, batches)
                else:
                    names.refuse_taken(name)
                    result, dataset = self._create(options, schema, batches)
        self.committed(name, dataset)
        result.update(dataset=name, format="lance", seconds=round(time.monotonic() - started, 3))
        return result

    def _create(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> tuple[dict, lance.LanceDataset]:
        import lance

        name = options.dataset
        batches = iter(batches)
        first = next(batches, None) if options.vector_column is not None else None
        plan = UploadPlan.for_new_table(schema, options, first)
        if first is not None:
            batches = itertools.chain([first], batches)
        stream = plan.stream(batches, self.settings.max_batch_mb << 20)
        try:
            dataset = lance.write_dataset(
                stream.reader(),
                self._uri(name),
                schema=plan.table_schema,
                mode="create",
                data_cache_bytes=WRITE_BUFFER_BYTES,
                storage_options=self.storage.lance_storage_options(),
                session=self._session,
            )
        except BaseException as exc:
            if self._try_open(name) is not None:  # another server sharing the root created it first
                raise Unavailable(
                    f"dataset {name!r} was created concurrently by another server; retry the upload"
                ) from None
            with contextlib.suppress(Exception):  # nothing committed under the name: remove what was written
                self._delete_folder(name)
            raise stream.failure(exc, self.storage.root_uri, f"create {name!r}") from None
        self._adopt(name, dataset, new=True)
        log.info("created Lance table %s (%d rows)", name, stream.rows)
        return {"rows_written": stream.rows, "version": dataset.version, "created": True}, dataset

    def _write_existing(
        self, options: IngestOptions, schema: pa.Schema, batches: Iterator[pa.RecordBatch]
    ) -> tuple[dict, lance.LanceDataset]:
        import lance

        name = options.dataset
        if options.mode == "create":
            raise AlreadyExists(f"dataset {name!r} already exists (mode 'create')")
        metric = table_metric(self.schema(name))
        if options.metric is not None and options.metric != metric:
            raise InvalidArgument(
                f"dataset {name!r} has metric {metric!r}; it is set when the table is created"
            )
        plan = UploadPlan.for_table(self.schema(name), schema, options)
        stream = plan.stream(batches, self.settings.max_batch_mb << 20)
        if options.mode == "upsert":  # under the write lock: merge into the newest version, whoever made it
            self.refresh_version(name)
        dataset = self.writable(name)
        result: dict[str, Any] = {"created": False}
        try:
            if options.mode == "upsert":
                with self.rewrites(name).reading():
                    merged = (
                        dataset.merge_insert(options.key)
                        .when_matched_update_all()
                        .when_not_matched_insert_all()
                        .execute(stream.reader())
                    )
                result.update(
                    rows_inserted=merged["num_inserted_rows"], rows_updated=merged["num_updated_rows"]
                )
            else:
                dataset = lance.write_dataset(
                    stream.reader(),
                    dataset,
                    schema=plan.table_schema,
                    mode="overwrite" if options.mode == "overwrite" else "append",
                    data_cache_bytes=WRITE_BUFFER_BYTES,
                    storage_options=self.storage.lance_storage_options(),
                    session=self._session,
                )
        except BaseException as exc:
            raise stream.failure(exc, self.storage.root_uri, f"write to {name!r}") from None
        result.update(rows_written=stream.rows, version=dataset.version)
        return result, dataset


def is_missing(error: BaseException) -> bool:
    """Whether Lance's ``error`` says the table's files are gone (not a fault of the storage)."""
    text = str(error).lower()
    return isinstance(error, FileNotFoundError) or "not found" in text or "does not exist" in text


def is_manifest(path: str) -> bool:
    """Whether ``path`` is a Lance version manifest (named by version: re-used by a re-created table)."""
    return "/_versions/" in path or path.endswith("/_latest.manifest")
