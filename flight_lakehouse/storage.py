"""Where bytes live: one abstract storage with small backends chosen by the root's scheme.

Shaped like pyiceberg's FileIO: the rest of the server speaks in URIs under the root and asks the storage
for a pyarrow filesystem, the pyiceberg FileIO properties and the paths DuckDB should read.
"""

from __future__ import annotations

import abc
import contextlib
import posixpath
from collections.abc import Iterable
from pathlib import Path

import pyarrow.fs as pafs

from flight_lakehouse.settings import Settings, SettingsError


class Storage(abc.ABC):
    """A root under which Iceberg tables (data and metadata) are kept."""

    kind: str

    def __init__(self, root_uri: str, filesystem: pafs.FileSystem) -> None:
        self.root_uri = root_uri.rstrip("/")
        self.filesystem = filesystem

    def uri(self, *parts: str) -> str:
        """The URI of ``parts`` joined under the root."""
        return posixpath.join(self.root_uri, *parts)

    @abc.abstractmethod
    def fs_path(self, uri: str) -> str:
        """The path of ``uri`` for :attr:`filesystem`."""

    @abc.abstractmethod
    def scan_path(self, uri: str) -> str:
        """The path DuckDB reads ``uri`` from."""

    @abc.abstractmethod
    def default_catalog_uri(self) -> str:
        """SQLAlchemy URI of the catalog when none is configured."""

    def iceberg_properties(self) -> dict[str, str]:
        """Properties of the pyiceberg catalog's FileIO for this storage."""
        return {"py-io-impl": "pyiceberg.io.pyarrow.PyArrowFileIO"}

    def open_output(self, uri: str) -> pafs.NativeFile:
        """A writable stream for a new object at ``uri``."""
        return self.filesystem.open_output_stream(self.fs_path(uri))

    def delete_files(self, uris: Iterable[str]) -> None:
        """Delete files, ignoring those already gone."""
        for uri in uris:
            with contextlib.suppress(FileNotFoundError):
                self.filesystem.delete_file(self.fs_path(uri))

    def delete_tree(self, uri: str) -> None:
        """Delete everything under ``uri``, if anything."""
        with contextlib.suppress(FileNotFoundError):
            self.filesystem.delete_dir(self.fs_path(uri))

    def public_facts(self) -> dict[str, str]:
        """What clients may learn about the storage (no paths, no secrets)."""
        return {"kind": self.kind}


class LocalStorage(Storage):
    """A directory on the server's disk: the embedded default."""

    kind = "local"

    def __init__(self, root: Path) -> None:
        root = root.expanduser().resolve()
        root.mkdir(parents=True, exist_ok=True)
        super().__init__(root.as_posix(), pafs.LocalFileSystem())

    def fs_path(self, uri: str) -> str:
        return uri.removeprefix("file://")

    def scan_path(self, uri: str) -> str:
        return self.fs_path(uri)

    def open_output(self, uri: str) -> pafs.NativeFile:
        self.filesystem.create_dir(posixpath.dirname(self.fs_path(uri)), recursive=True)
        return super().open_output(uri)

    def default_catalog_uri(self) -> str:
        return f"sqlite:///{self.root_uri}/catalog.db"


def open_storage(settings: Settings) -> Storage:
    """The storage backend for ``settings.root``."""
    if settings.is_s3:
        raise SettingsError(f"root {settings.root!r}: S3 storage is not available in this build yet")
    return LocalStorage(Path(settings.root))
