"""Storage-level maintenance run by the CLI without a server: catalog rebuild and garbage collection."""

from __future__ import annotations

import logging
import posixpath
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


def lance_tables(catalog: DatasetCatalog) -> dict[str, list[StoredFile]]:
    """The files under each ``<name>.lance`` folder of the Lance root, by folder URI."""
    base = catalog.storage.lance_uri
    tables: dict[str, list[StoredFile]] = {}
    for found in list_files(catalog, "lance"):
        folder = found.uri.removeprefix(base + "/").split("/", 1)[0]
        if folder.endswith(".lance"):
            tables.setdefault(f"{base}/{folder}", []).append(found)
    return tables


def lance_referenced(catalog: DatasetCatalog, uri: str) -> set[str]:
    """Paths (relative to the table) of the data, deletion and index files some version of the Lance table
    at ``uri`` uses. A table that cannot be read raises: gc must never take a live table for garbage."""
    import lance

    dataset = lance.dataset(uri, storage_options=catalog.storage.lance_storage_options())
    used: set[str] = set()
    for entry in dataset.versions():
        version = dataset.checkout_version(entry["version"])
        for fragment in version.get_fragments():
            metadata = fragment.metadata
            used.update(f"data/{data_file.path}" for data_file in metadata.data_files())
            if metadata.deletion_file is not None:
                used.add(metadata.deletion_file.path(metadata.id))
        used.update(f"_indices/{index['uuid']}/" for index in version.list_indices())
    return used


#: Folders of a Lance table whose files only versions reference (manifests and transactions always stay).
LANCE_VERSIONED = ("data/", "_deletions/", "_indices/")


def lance_garbage(catalog: DatasetCatalog) -> list[StoredFile]:
    """Files of Lance tables no version references (a crashed write's data files, say), and every file of
    a Lance folder without a version (a dropped table's leftovers)."""
    garbage: list[StoredFile] = []
    for uri, files in lance_tables(catalog).items():
        relative = {found.uri: found.uri.removeprefix(uri + "/") for found in files}
        if not any(path.startswith("_versions/") for path in relative.values()):
            garbage.extend(files)  # no manifest: nothing can read these files
            continue
        used = lance_referenced(catalog, uri)
        garbage.extend(
            found
            for found in files
            if relative[found.uri].startswith(LANCE_VERSIONED) and not is_used(relative[found.uri], used)
        )
    return garbage


def is_used(relative: str, used: set[str]) -> bool:
    """Whether a Lance file is referenced: by its path, or as a file of a referenced index folder."""
    if relative in used:
        return True
    parts = relative.split("/")
    return len(parts) > 2 and f"{parts[0]}/{parts[1]}/" in used


def garbage(catalog: DatasetCatalog, grace_seconds: float) -> list[StoredFile]:
    """Unreferenced files and unfinished uploads under ``tables/`` and ``lance/``, older than the grace
    period."""
    used = {uri.removeprefix("file://") for uri in referenced_files(catalog)}
    unused = [found for found in list_files(catalog, "tables") if found.uri not in used]
    cutoff = time.time() - grace_seconds
    files = [found for found in [*unused, *lance_garbage(catalog)] if found.modified < cutoff]
    storage = catalog.storage
    uploads = [
        StoredFile(uri, 0, started, upload_id)
        for folder in ("tables", "lance")
        for uri, upload_id, started in storage.pending_uploads(storage.uri(folder))
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
        remove_emptied_folders(catalog, [item.uri for item in found])
    return found


def remove_emptied_folders(catalog: DatasetCatalog, deleted: list[str]) -> None:
    """Remove the folders the deletion of ``deleted`` left empty, deepest first, up to ``tables/`` and
    ``lance/`` (kept): a dropped table's leftovers leave no empty tree behind."""
    storage = catalog.storage
    tops = {storage.fs_path(storage.uri(top)) for top in ("tables", "lance")}
    folders: set[str] = set()
    for uri in deleted:
        folder = posixpath.dirname(storage.fs_path(uri))
        while any(folder.startswith(top + "/") for top in tops):
            folders.add(folder)
            folder = posixpath.dirname(folder)
    for folder in sorted(folders, key=len, reverse=True):
        storage.remove_empty_dir(folder)
