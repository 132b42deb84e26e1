"""The dataset catalog: Iceberg tables in a pyiceberg SQL catalog, one namespace, names as in the contract."""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import itertools
import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar

import pyarrow as pa
from pyiceberg.catalog import Catalog
from pyiceberg.catalog.sql import IcebergTables, SqlCatalog
from pyiceberg.exceptions import (
    CommitFailedException,
    NamespaceAlreadyExistsError,
    NoSuchTableError,
    TableAlreadyExistsError,
)
from pyiceberg.io.pyarrow import parquet_file_to_data_file, schema_to_pyarrow
from pyiceberg.manifest import DataFile
from pyiceberg.schema import Schema, assign_fresh_schema_ids
from pyiceberg.table import StaticTable, Table, TableProperties, Transaction
from pyiceberg.table.update.snapshot import ExpireSnapshots
from pyiceberg.types import ListType, MapType, NestedField, StructType
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

from flight_lakehouse.datasets.base import Retention
from flight_lakehouse.errors import NotFound, Unavailable
from flight_lakehouse.limits import OnePerKey
from flight_lakehouse.schema_types import storage_schema
from flight_lakehouse.storage import Storage

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long a catalog listing is reused while this process changes nothing (see ``metadata_locations``).
LISTING_FRESH_SECONDS = 0.05
CATALOG_NAME = "lakehouse"
#: How many data file names the cache of planned snapshots holds at most (~150 bytes each): the current
#: snapshots of the datasets being queried, and a few old ones being scanned.
CACHED_SNAPSHOT_FILES = 200_000
NAMESPACE = "lakehouse"
#: How long a commit that lost to a concurrent one (another server's, on a shared catalog) is tried again
#: on the new base before the upload is refused UNAVAILABLE.
COMMIT_RETRY_SECONDS = 60.0
#: Tries at setting up the catalog's tables and namespace while other servers do the same (a fresh
#: PostgreSQL database: two ``CREATE TABLE`` at once fail one of them).
SETUP_ATTEMPTS = 5
#: How long a server waits for another's hold of a dataset's lock (``server_lock``) before UNAVAILABLE.
SERVER_LOCK_SECONDS = 60.0


#: No retries inside pyiceberg's ``commit_transaction``: they rebuild only the snapshot of a transaction,
#: on the old base's other updates (an overwrite then deletes files another server's overwrite removed
#: already, and fails). :func:`retry_conflicts` makes the whole change again on the new base instead.
OWN_RETRIES = {TableProperties.COMMIT_NUM_RETRIES: "0"}


class CommitConflict(Unavailable):
    """A commit lost to a concurrent one (or a creation to a concurrent creation): nothing was committed,
    and the change may be applied again on the new base (:func:`retry_conflicts`)."""


def retry_conflicts(what: str, attempt: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
    """``attempt()``, again while it raises :class:`CommitConflict`, for up to :data:`COMMIT_RETRY_SECONDS`
    with a short random back-off (servers that collided do not collide again in step).

    Safe because a lost Iceberg commit changed nothing: the catalog row moves only by ``UPDATE ... WHERE
    metadata_location = <the base it was built on>`` (pyiceberg's ``SqlCatalog``), so each try re-reads the
    current table and applies the change to it: an append adds the same files once, an overwrite replaces
    whatever is current then."""
    deadline = time.monotonic() + COMMIT_RETRY_SECONDS
    for tries in itertools.count(1):
        try:
            return attempt()
        except CommitConflict:
            if time.monotonic() > deadline:
                raise
            if on_retry is not None:
                on_retry()
            log.info("commit to %s lost to a concurrent one (try %d); again on the new base", what, tries)
            time.sleep(random.uniform(0, min(0.2, 0.002 * 2 ** min(tries, 10))))
    raise AssertionError("unreachable")


#: Table properties of every commit (set on tables made without them at their next commit): no retries of
#: pyiceberg's own (``OWN_RETRIES``). Each append writes a manifest, which every later commit lists and
#: every new snapshot's query planning reads: the appends merge them once there are ``min-count-to-merge``
#: (one-row appends otherwise slowed down as manifests piled up). Each commit writes a metadata file: those
#: beyond the newest ``previous-versions-max`` are deleted after a commit (``gc`` no longer finds one per
#: commit).
COMMIT_PROPERTIES = {
    TableProperties.MANIFEST_MERGE_ENABLED: "true",
    TableProperties.MANIFEST_MIN_MERGE_COUNT: "16",
    TableProperties.METADATA_DELETE_AFTER_COMMIT_ENABLED: "true",
    TableProperties.METADATA_PREVIOUS_VERSIONS_MAX: "32",
    **OWN_RETRIES,
}


@dataclass(frozen=True)
class SnapshotFiles:
    """The data files and Arrow schema of one snapshot of a dataset."""

    schema: pa.Schema
    files: tuple[str, ...]
    snapshot_id: int | None
    #: Every file holds the same columns (by Iceberg field id, from the manifests): any subset of the
    #: files reads with the schema of all of them (``read_parquet(..., union_by_name = true)``).
    uniform: bool = False


class DatasetCatalog:
    """Datasets as Iceberg tables; the single place that talks to the pyiceberg catalog."""

    def __init__(
        self, storage: Storage, catalog_uri: str | None = None, retention: Retention | None = None
    ) -> None:
        self.storage = storage
        #: Applied at every commit, so that repeated overwrites reach a steady disk use (with ``gc``).
        self.retention = retention or Retention()
        uri = catalog_uri or storage.default_catalog_uri()
        #: The catalog is a server (not a SQLite file): a commit whose answer is lost may have landed.
        self.remote = not uri.startswith("sqlite")
        # a catalog server (PostgreSQL) may restart or drop idle connections: each one taken from the pool
        # is checked first (a SQLite file needs no check)
        ping = {"pool_pre_ping": "true"} if self.remote else {}
        self.iceberg = self._open(
            uri, {"warehouse": storage.uri("tables"), **ping, **storage.iceberg_properties()}
        )
        #: Commits that lost to a concurrent one and were applied again on the new base (a metric).
        self.commit_retries = 0
        #: Planned snapshots, newest use last, bounded by :data:`CACHED_SNAPSHOT_FILES` file names in all.
        self._snapshot_cache: OrderedDict[tuple[str, int | None], SnapshotFiles] = OrderedDict()
        self._cached_files = 0
        self._cache_guard = threading.Lock()
        self._planning = OnePerKey()  # one planning of a snapshot's files at a time; the others wait
        #: Bumped by every commit and drop of this process; a listing is reused only within one.
        self._generation = 0
        self._listed: tuple[int, float, dict[str, str]] | None = None
        #: The listing query, built once and run on a plain connection (SQLAlchemy caches its compiled
        #: form): every query lists the datasets, and building the statement and an ORM session each time
        #: took ~0.3 ms of a ~4 ms small query.
        self._listing = select(IcebergTables.table_name, IcebergTables.metadata_location).where(
            IcebergTables.catalog_name == CATALOG_NAME, IcebergTables.table_namespace == NAMESPACE
        )

    @staticmethod
    def _open(uri: str, properties: dict[str, str]) -> SqlCatalog:
        """The pyiceberg catalog, its tables and the namespace created when missing. Servers starting at once
        on a fresh shared database race to create them: the losers find them made and try again."""
        for attempt in range(1, SETUP_ATTEMPTS + 1):
            try:
                catalog = SqlCatalog(CATALOG_NAME, uri=uri, **properties)
                with contextlib.suppress(NamespaceAlreadyExistsError):
                    catalog.create_namespace(NAMESPACE)
                return catalog
            except (IntegrityError, OperationalError, ProgrammingError) as exc:
                # SQLite reports a table created meanwhile as an OperationalError; any other one (a catalog
                # server that cannot be reached) is not a race
                raced = not isinstance(exc, OperationalError) or "already exists" in str(exc.orig)
                if attempt == SETUP_ATTEMPTS or not raced:
                    raise
                log.info("catalog set up concurrently (%s); again", type(exc.orig).__name__)
                time.sleep(0.1 * attempt)
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def server_lock(self, name: str) -> Iterator[None]:
        """Hold dataset ``name``'s lock across the servers sharing a PostgreSQL catalog (a session advisory
        lock, keyed by the name in lower case; PostgreSQL lets it go if the holder's connection dies),
        waiting up to :data:`SERVER_LOCK_SECONDS`. Servers then create, commit to and drop a dataset one at
        a time, as one server's threads do: Lance makes a second concurrent creation of a table an
        overwrite of the first (its rows lost), and Iceberg commits that would lose are not tried at all.
        Nothing on a SQLite catalog (one server per file)."""
        if self.iceberg.engine.dialect.name != "postgresql":
            yield
            return
        digest = hashlib.blake2b(f"flight-lakehouse/{name.lower()}".encode(), digest_size=8).digest()
        key = {"key": int.from_bytes(digest, "big", signed=True)}
        with self.iceberg.engine.connect() as connection:
            connection.execute(text(f"SET lock_timeout = '{int(SERVER_LOCK_SECONDS * 1000)}ms'"))
            connection.execute(text("SELECT pg_advisory_lock(:key)"), key)
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), key)
                connection.execute(text("RESET lock_timeout"))

    def retried(self) -> None:
        """Count a commit applied again after losing to a concurrent one."""
        self.commit_retries += 1

    # -- names ---------------------------------------------------------------------------------
    @staticmethod
    def identifier(name: str) -> tuple[str, str]:
        """The Iceberg identifier of a dataset."""
        return (NAMESPACE, name)

    def table_location(self, name: str) -> str:
        """Where a dataset's data and metadata files are kept."""
        return self.storage.uri("tables", name)

    # -- reads -----------------------------------------------------------------------------------
    def metadata_locations(self) -> dict[str, str]:
        """Every dataset with its current metadata file, in one catalog query.

        A listing is reused for :data:`LISTING_FRESH_SECONDS` unless this process committed or dropped
        meanwhile (every query lists twice: 0.1 ms each of a ~3 ms repeated small query). Commits of other
        processes on the same catalog are seen that much later."""
        generation, listed = self._generation, self._listed
        if listed is not None and listed[0] == generation and time.monotonic() < listed[1]:
            return dict(listed[2])
        with self.iceberg.engine.connect() as connection:
            found = {name: location for name, location in connection.execute(self._listing) if location}
        self._listed = (generation, time.monotonic() + LISTING_FRESH_SECONDS, found)
        return dict(found)

    def _changed(self) -> None:
        """This process changed the catalog: the next listing reads it again."""
        self._generation += 1

    def names(self) -> list[str]:
        """All dataset names, sorted."""
        return sorted(self.metadata_locations())

    def exists(self, name: str) -> bool:
        """Whether the dataset exists (exact name)."""
        return name in self.metadata_locations()

    def load(self, name: str) -> Table:
        """The dataset's table at its current metadata; NOT_FOUND, or UNAVAILABLE when storage has lost the
        metadata file the catalog names."""
        try:
            return self.iceberg.load_table(self.identifier(name))
        except NoSuchTableError:
            raise NotFound(f"dataset {name!r} not found") from None
        except FileNotFoundError as exc:  # the catalog names a metadata file storage no longer has
            log.warning("cannot read the metadata of %s: %s", name, exc)
            raise Unavailable(f"storage error: the metadata of dataset {name!r} cannot be read") from None

    def snapshot_files(self, metadata_location: str, snapshot_id: int | None = None) -> SnapshotFiles:
        """Files and schema of a snapshot (the current one by default); cached, as snapshots are immutable."""
        key = (metadata_location, snapshot_id)
        cached = self._cached_snapshot(key)
        if cached is not None:
            return cached
        with self._planning.held(key):
            cached = self._cached_snapshot(key)  # planned while this call waited
            if cached is not None:
                return cached
            table = StaticTable.from_metadata(metadata_location, properties=self.iceberg.properties)
            result = files_of(table, snapshot_id)
            self._keep_snapshot(key, result)
            return result

    def _cached_snapshot(self, key: tuple[str, int | None]) -> SnapshotFiles | None:
        with self._cache_guard:
            cached = self._snapshot_cache.get(key)
            if cached is not None:
                self._snapshot_cache.move_to_end(key)
            return cached

    def _keep_snapshot(self, key: tuple[str, int | None], planned: SnapshotFiles) -> None:
        """Cache ``planned``, forgetting the least recently used snapshots beyond the bound (every commit
        of a growing table makes a new snapshot listing all its files: 4,096 of them, the old bound, held
        quadratically many names, and the soak's RSS grew by the minute)."""
        with self._cache_guard:
            if key in self._snapshot_cache:
                return
            self._snapshot_cache[key] = planned
            self._cached_files += len(planned.files) + 1
            while self._cached_files > CACHED_SNAPSHOT_FILES and len(self._snapshot_cache) > 1:
                _, forgotten = self._snapshot_cache.popitem(last=False)
                self._cached_files -= len(forgotten.files) + 1

    def cached_snapshot_files(self) -> int:
        """How many file names the snapshot cache holds (each snapshot counts one more)."""
        with self._cache_guard:
            return self._cached_files

    # -- catalog actions -------------------------------------------------------------------------
    def list_datasets(self) -> list[dict[str, Any]]:
        """One summary per dataset, as the ``list_datasets`` action returns it."""
        return [summarise(name, self.load(name)) for name in self.names()]

    def describe(self, name: str) -> dict[str, Any]:
        """Schema and facts of one dataset."""
        table = self.load(name)
        facts = summarise(name, table)
        snapshot = table.current_snapshot()
        facts.update(
            {
                "schema": base64.b64encode(arrow_schema(table).serialize().to_pybytes()).decode("ascii"),
                "columns": [{"name": f.name, "type": str(f.type)} for f in arrow_schema(table)],
                "files": summary_int(snapshot.summary if snapshot else None, "total-data-files"),
                "snapshot_id": snapshot.snapshot_id if snapshot else None,
                "snapshots": len(table.metadata.snapshots),
                "format_version": table.metadata.format_version,
                "indexes": [],
                # where other engines open it (pyiceberg, polars, DuckDB's iceberg extension)
                "metadata_location": table.metadata_location,
                "iceberg_identifier": f"{NAMESPACE}.{name}",
            }
        )
        return facts

    def history(self, name: str) -> list[dict[str, Any]]:
        """The dataset's snapshots, newest first."""
        table = self.load(name)
        current = table.current_snapshot()
        rows = []
        for snapshot in sorted(table.metadata.snapshots, key=lambda s: s.timestamp_ms, reverse=True):
            summary = snapshot.summary
            rows.append(
                {
                    "snapshot_id": snapshot.snapshot_id,
                    "parent_id": snapshot.parent_snapshot_id,
                    "timestamp": iso_time(snapshot.timestamp_ms),
                    "operation": summary.operation.value if summary else None,
                    "added_rows": summary_int(summary, "added-records"),
                    "rows": summary_int(summary, "total-records"),
                    "current": current is not None and snapshot.snapshot_id == current.snapshot_id,
                }
            )
        return rows

    def drop(self, name: str) -> None:
        """Drop a dataset: its name goes at once (and may be re-created); its files, as they are now, are
        deleted once no running query reads them (:class:`~flight_lakehouse.storage.ReadLeases`)."""
        location = self.table_location(name)
        found = self.storage.listing(location)
        try:
            self.iceberg.drop_table(self.identifier(name))
        except NoSuchTableError:
            raise NotFound(f"dataset {name!r} not found") from None
        finally:
            self._changed()
        delete = functools.partial(self.storage.delete_listed, location, found)
        now = self.storage.leases.delete_when_unread(name, delete)
        log.info("dropped dataset %s (files %s)", name, "deleted" if now else "kept for running queries")

    # -- commits ---------------------------------------------------------------------------------
    def create_with_files(self, name: str, schema: pa.Schema, files: list[str]) -> int | None:
        """Create dataset ``name`` holding ``files`` (written with ``schema``) in one commit."""
        try:
            tx = self.iceberg.create_table_transaction(
                self.identifier(name),
                schema=schema,
                location=self.table_location(name),
                properties={"write.parquet.compression-codec": "zstd", **COMMIT_PROPERTIES},
            )
            return self._commit_files(name, tx, schema, files, replace=False, evolve=False)
        except TableAlreadyExistsError:  # made by another server since this one looked (or during the commit)
            self._changed()
            raise CommitConflict(f"dataset {name!r} was created concurrently; retry the upload") from None

    def add_files(
        self, table: Table, schema: pa.Schema, files: list[str], replace: bool, evolve: bool
    ) -> int | None:
        """Commit ``files`` (written with ``schema``) to ``table`` as one snapshot: appended, or replacing
        every current file; ``evolve`` adds the new columns and, with ``replace``, removes absent ones."""
        return self._commit_files(table.name()[-1], table.transaction(), schema, files, replace, evolve)

    def _commit_files(
        self, name: str, tx: Transaction, schema: pa.Schema, files: list[str], replace: bool, evolve: bool
    ) -> int | None:
        if tx.table_metadata.name_mapping() is None:
            mapping = tx.table_metadata.schema().name_mapping.model_dump_json()
            tx.set_properties(**{TableProperties.DEFAULT_NAME_MAPPING: mapping})
        properties = tx.table_metadata.properties
        missing = {key: value for key, value in COMMIT_PROPERTIES.items() if properties.get(key) != value}
        if missing:  # a table made before these were set: from its next commit on
            tx.set_properties(**missing)
        if evolve:
            evolve_schema(tx, schema, drop_absent=replace)
        if not field_ids_hold(schema, tx.table_metadata.schema()):
            raise Unavailable(
                f"dataset {name!r} changed during the upload (another upload added a column first); "
                "nothing was written, retry"
            )
        new_files = data_files(tx, files) if files else []
        if replace:
            overwrite(tx, [task.file for task in tx._table.scan().plan_files()], new_files)
        elif new_files:  # merges the manifests once there are COMMIT_PROPERTIES' min-count of them
            with tx.update_snapshot().merge_append() as append:
                for data_file in new_files:
                    append.append_data_file(data_file)
        return self._commit_snapshot(name, tx)

    def replace_files(self, name: str, replaced: list[str], files: list[str]) -> int | None:
        """Commit ``files`` in place of the data files ``replaced`` (a compaction: the same rows), as one
        snapshot; the caller holds the dataset's write lock. CONFLICT (UNAVAILABLE) when a file of
        ``replaced`` left the current snapshot meanwhile (an overwrite); an append meanwhile is kept."""
        tx = self.load(name).transaction()
        current = {task.file.file_path: task.file for task in tx._table.scan().plan_files()}
        if not all(path in current for path in replaced):
            raise CommitConflict(
                f"files of dataset {name!r} were replaced during the compaction (an overwrite, or a "
                "compaction by another server); nothing changed, retry"
            )
        overwrite(tx, [current[path] for path in replaced], data_files(tx, files))
        return self._commit_snapshot(name, tx)

    def _commit_snapshot(self, name: str, tx: Transaction) -> int | None:
        """Commit ``tx`` with the expiry of the snapshots the server's retention lets go; the new current
        snapshot's id."""
        expire(tx, self.retention)
        snapshot = self._commit(name, tx).current_snapshot()
        return snapshot.snapshot_id if snapshot else None

    def _commit(self, name: str, tx: Transaction) -> Table:
        try:
            return tx.commit_transaction()
        except CommitFailedException:
            raise CommitConflict(f"dataset {name!r} changed during the commit; retry") from None
        finally:
            self._changed()

    def expire_snapshots(self, name: str, retention: Retention) -> dict[str, Any]:
        """Expire the snapshots ``retention`` lets go (the caller holds the dataset's write lock); their
        files no snapshot uses any more become garbage for ``gc``, after its grace period."""
        started = time.monotonic()

        def attempt() -> tuple[int, list[int]]:
            tx = self.load(name).transaction()
            snapshots = len(tx.table_metadata.snapshots)
            expired = expire(tx, retention)
            if expired:
                self._commit(name, tx)
            return snapshots, expired

        before, expired = retry_conflicts(name, attempt, self.retried)
        return {
            "dataset": name,
            "snapshots_before": before,
            "snapshots_expired": len(expired),
            "snapshots_after": before - len(expired),
            "seconds": round(time.monotonic() - started, 3),
        }


def overwrite(tx: Transaction, removed: list[DataFile], added: list[DataFile]) -> None:
    """Add to ``tx`` one snapshot taking the data files ``removed`` out and putting ``added`` in."""
    with tx.update_snapshot().overwrite() as change:
        for data_file in removed:
            change.delete_data_file(data_file)
        for data_file in added:
            change.append_data_file(data_file)


def expire(tx: Transaction, retention: Retention) -> list[int]:
    """Add the expiry of the snapshots ``retention`` lets go to ``tx`` (never a branch or tag head, such as
    the current snapshot); returns their ids."""
    metadata = tx.table_metadata
    heads = {ref.snapshot_id for ref in metadata.refs.values()}
    in_order = sorted(
        metadata.snapshots, key=lambda snapshot: (snapshot.sequence_number or 0, snapshot.timestamp_ms)
    )
    expired = [
        snapshot_id
        for snapshot_id in retention.expired([(s.snapshot_id, s.timestamp_ms) for s in in_order])
        if snapshot_id not in heads
    ]
    if expired:
        ExpireSnapshots(tx).by_ids(expired).commit()
    return expired


def evolve_schema(tx: Transaction, schema: pa.Schema, drop_absent: bool) -> None:
    """Add the columns of ``schema`` the table lacks; with ``drop_absent`` remove those it does not have."""
    current = [field.name for field in tx.table_metadata.schema().fields]
    with tx.update_schema() as update:
        update.union_by_name(schema)
        if drop_absent:
            for name in current:
                if name not in schema.names:
                    update.delete_column(name)


#: The Parquet field metadata key of an Iceberg field id.
FIELD_ID = b"PARQUET:field_id"


def with_field_ids(schema: pa.Schema, table: Table | None, evolve: bool) -> pa.Schema:
    """``schema`` (of the files an upload writes) with each field's Iceberg field id, as the table will
    have it once the upload commits: a new table's fresh ids (assigned as its creation assigns them), or
    the table's, evolved by ``schema`` with ``evolve``. The Iceberg spec wants data files to carry them,
    and engines that read by id alone (Daft) read nothing else; the commit checks them against the table
    (a table that changed meanwhile fails the commit rather than mislabel a column).

    ``schema`` as it is when a field has no id in the planned table (files then rely on the table's name
    mapping, as files written before this did)."""
    if table is None:
        planned = assign_fresh_schema_ids(Catalog._convert_schema_if_needed(schema))
    elif evolve:
        planned = table.transaction().update_schema().union_by_name(schema)._apply()
    else:
        planned = table.schema()
    return apply_field_ids(schema, planned)


def apply_field_ids(schema: pa.Schema, planned: Schema) -> pa.Schema:
    """``schema`` with the field ids its fields have in ``planned`` (found by name), or as it is when one
    is not there."""
    fields = []
    for field in schema:
        try:
            nested = planned.find_field(field.name, case_sensitive=True)
        except ValueError:
            return schema
        fields.append(field_with_id(field, nested))
    return pa.schema(fields, metadata=schema.metadata)


def field_ids_hold(schema: pa.Schema, table_schema: Schema) -> bool:
    """Whether the field ids ``schema``'s files carry (if any) are the ones ``table_schema`` gives the same
    names (not so when another upload added a column first and took the id this one planned)."""
    carried = field_ids(schema)
    return not carried or carried == field_ids(apply_field_ids(schema, table_schema))


def field_ids(schema: pa.Schema) -> dict[str, bytes]:
    """Dotted path -> Parquet field id of every field of ``schema`` that has one (children too)."""
    found: dict[str, bytes] = {}

    def walk(field: pa.Field, path: str) -> None:
        value = (field.metadata or {}).get(FIELD_ID)
        if value is not None:
            found[path] = value
        kind = field.type
        if pa.types.is_struct(kind):
            children = list(kind)
        elif pa.types.is_map(kind):
            children = [kind.key_field, kind.item_field]
        elif pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            children = [kind.value_field]
        else:
            children = []
        for child in children:
            walk(child, f"{path}.{child.name}")

    for field in schema:
        walk(field, field.name)
    return found


def field_with_id(field: pa.Field, nested: NestedField) -> pa.Field:
    """``field`` with the id of ``nested``, and its children (struct fields, list elements, map keys and
    values) with theirs."""
    kind, iceberg = field.type, nested.field_type
    if pa.types.is_struct(kind) and isinstance(iceberg, StructType):
        children = {child.name: child for child in iceberg.fields}
        kind = pa.struct(
            [
                field_with_id(child, children[child.name]) if child.name in children else child
                for child in kind
            ]
        )
    elif pa.types.is_list(kind) and isinstance(iceberg, ListType):
        kind = pa.list_(field_with_id(kind.value_field, iceberg.element_field))
    elif pa.types.is_large_list(kind) and isinstance(iceberg, ListType):
        kind = pa.large_list(field_with_id(kind.value_field, iceberg.element_field))
    elif pa.types.is_fixed_size_list(kind) and isinstance(iceberg, ListType):
        kind = pa.list_(field_with_id(kind.value_field, iceberg.element_field), kind.list_size)
    elif pa.types.is_map(kind) and isinstance(iceberg, MapType):
        key = field_with_id(kind.key_field, iceberg.key_field)
        kind = pa.map_(key, field_with_id(kind.item_field, iceberg.value_field), kind.keys_sorted)
    metadata = {**(field.metadata or {}), FIELD_ID: str(nested.field_id).encode()}
    return pa.field(field.name, kind, field.nullable, metadata)


def data_files(tx: Transaction, files: Iterable[str]) -> list[DataFile]:
    """Iceberg DataFile entries (with column statistics) of freshly written Parquet files."""
    metadata = tx.table_metadata
    io = tx._table.io
    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(lambda path: parquet_file_to_data_file(io, metadata, path), files))


def arrow_schema(table: Table) -> pa.Schema:
    """The dataset's current schema as Arrow, in the types its files are written with (no large types)."""
    return storage_schema(schema_to_pyarrow(table.schema(), include_field_ids=False))


def files_of(table: Table, snapshot_id: int | None) -> SnapshotFiles:
    """Data files of ``snapshot_id`` (current when None), with the schema that snapshot was written with."""
    if snapshot_id is not None and table.snapshot_by_id(snapshot_id) is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    snapshot = table.snapshot_by_id(snapshot_id) if snapshot_id is not None else table.current_snapshot()
    schema = table.schema()
    if snapshot is not None and snapshot.schema_id is not None:
        schema = table.schemas().get(snapshot.schema_id, schema)
    tasks = list(table.scan(snapshot_id=snapshot.snapshot_id).plan_files()) if snapshot is not None else []
    columns = {frozenset(task.file.column_sizes or ()) for task in tasks}
    return SnapshotFiles(
        schema=schema_to_pyarrow(schema, include_field_ids=False),
        files=tuple(sorted(task.file.file_path for task in tasks)),
        snapshot_id=snapshot.snapshot_id if snapshot else None,
        uniform=len(columns) == 1 and frozenset() not in columns,
    )


def summarise(name: str, table: Table) -> dict[str, Any]:
    """The ``list_datasets`` entry of one table."""
    snapshot = table.current_snapshot()
    summary = snapshot.summary if snapshot else None
    return {
        "name": name,
        "format": "parquet",
        "rows": summary_int(summary, "total-records"),
        "bytes": summary_int(summary, "total-files-size"),
        "updated_at": iso_time(table.metadata.last_updated_ms),
    }


def summary_int(summary: Any, key: str) -> int:
    """An integer field of a snapshot summary (0 when absent)."""
    return int(summary.get(key) or 0) if summary else 0


def iso_time(epoch_ms: int) -> str:
    """ISO-8601 UTC time of an epoch in milliseconds."""
    return datetime.fromtimestamp(epoch_ms / 1000, tz=timezone.utc).isoformat(timespec="milliseconds")
