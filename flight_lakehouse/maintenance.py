"""Storage-level maintenance run by the CLI without a server: catalog rebuild and garbage collection."""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

import pyarrow.fs as pafs

from flight_lakehouse.catalog import DatasetCatalog
from flight_lakehouse.commands import NAME_PATTERN

log = logging.getLogger(__name__)

METADATA_FILE = re.compile(r"^(\d+)-[0-9a-f-]+\.metadata\.json$")


@dataclass(frozen=True)
class StoredFile:
    """A file found under the root."""

    uri: str
    size: int
    modified: float
    upload_id: str | None = None  # set for an unfinished multipart upload (S3)


def list_files(catalog: DatasetCatalog, *parts: str) -> list[StoredFile]:
    """Every file under ``parts`` of the root, recursively."""
    storage = catalog.storage
    base = storage.uri(*parts)
    selector = pafs.FileSelector(storage.fs_path(base), recursive=True, allow_not_found=True)
    scheme = "s3://" if storage.kind == "s3" else ""
    return [
        StoredFile(scheme + info.path, info.size or 0, info.mtime.timestamp() if info.mtime else 0.0)
        for info in storage.filesystem.get_file_info(selector)
        if info.type == pafs.FileType.File
    ]


def newest_metadata(catalog: DatasetCatalog) -> dict[str, str]:
    """For each table directory under the root, its newest Iceberg metadata file."""
    best: dict[str, tuple[int, float, str]] = {}
    for found in list_files(catalog, "tables"):
        parts = found.uri.rsplit("/", 3)
        if len(parts) != 4 or parts[2] != "metadata" or not re.fullmatch(NAME_PATTERN, parts[1]):
            continue
        match = METADATA_FILE.match(parts[3])
        if match:
            rank = (int(match.group(1)), found.modified, found.uri)
            best[parts[1]] = max(best.get(parts[1], rank), rank)
    return {name: rank[2] for name, rank in best.items()}


def rebuild_catalog(catalog: DatasetCatalog) -> dict[str, str]:
    """Register every table found under the root at its newest metadata; returns what was (re)registered."""
    registered = catalog.metadata_locations()
    changed: dict[str, str] = {}
    for name, location in sorted(newest_metadata(catalog).items()):
        if registered.get(name) == location:
            continue
        catalog.iceberg.register_table(catalog.identifier(name), location, overwrite=name in registered)
        changed[name] = location
        log.info("registered %s at %s", name, location)
    return changed


def referenced_files(catalog: DatasetCatalog) -> set[str]:
    """Data, manifest and metadata files that some snapshot of some registered table still uses."""
    used: set[str] = set()
    for name, location in catalog.metadata_locations().items():
        table = catalog.load(name)
        used.update(table.inspect.all_data_files().column("file_path").to_pylist())
        used.update(table.inspect.all_manifests().column("path").to_pylist())
        used.update(snapshot.manifest_list for snapshot in table.metadata.snapshots)
        used.update(entry.metadata_file for entry in table.metadata.metadata_log)
        used.add(location)
    return used


def garbage(catalog: DatasetCatalog, grace_seconds: float) -> list[StoredFile]:
    """Unreferenced files and unfinished uploads under ``tables/``, older than the grace period."""
    used = {uri.removeprefix("file://") for uri in referenced_files(catalog)}
    cutoff = time.time() - grace_seconds
    files = [
        found for found in list_files(catalog, "tables") if found.uri not in used and found.modified < cutoff
    ]
    uploads = [
        StoredFile(uri, 0, started, upload_id)
        for uri, upload_id, started in catalog.storage.pending_uploads(catalog.storage.uri("tables"))
        if started < cutoff
    ]
    return files + uploads


def collect_garbage(catalog: DatasetCatalog, grace_seconds: float, apply: bool) -> list[StoredFile]:
    """List (and with ``apply``, delete) the garbage files."""
    found = garbage(catalog, grace_seconds)
    if apply:
        storage = catalog.storage
        storage.delete_files(item.uri for item in found if item.upload_id is None)
        for item in found:
            if item.upload_id is not None:
                storage.abort_upload(item.uri, item.upload_id)
    return found
