"""What every table format offers the registry: its tables, their facts, writes, drops and scan pins."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import pyarrow as pa

from flight_lakehouse.commands import IngestOptions

Batches = Iterator[pa.RecordBatch]
#: Facts of a dataset or a commit, as actions and PutResults return them (JSON).
Facts = dict[str, Any]


@dataclass(frozen=True)
class Retention:
    """Which snapshots (Iceberg) or versions (Lance) of a dataset stay: the newest ``keep_last``, and every
    one newer than ``keep_seconds``; the others expire."""

    keep_last: int = 100
    keep_seconds: float = 7 * 86_400.0

    def expired(self, snapshots: list[tuple[int, int]], now: float | None = None) -> list[int]:
        """The ids this retention lets go among ``snapshots``, (id, epoch ms) pairs oldest first."""
        cutoff_ms = ((time.time() if now is None else now) - self.keep_seconds) * 1000
        older = snapshots[: max(0, len(snapshots) - self.keep_last)]
        return [snapshot_id for snapshot_id, timestamp_ms in older if timestamp_ms < cutoff_ms]


class Namespace(Protocol):
    """The one case-insensitive namespace of all datasets, whatever their format (the registry)."""

    def write_lock(self, name: str) -> AbstractContextManager[None]:
        """Serialise creations, commits and drops of one dataset (names differing in case share it)."""
        ...

    def refuse_taken(self, name: str) -> None:
        """Refuse to create ``name`` when a dataset of that name ignoring case exists, in any format."""
        ...


class TableFormat(ABC):
    """One table format (Iceberg, Lance): the tables kept in it and what can be done with them.

    The registry decides which format a dataset is in and owns the names and write locks; a format only
    ever sees names it holds, or a new one the registry gave it.
    """

    #: The format as ``list_datasets`` reports it.
    kind: ClassVar[str]

    @abstractmethod
    def names(self) -> list[str]:
        """Every table of this format, sorted."""

    def exists(self, name: str) -> bool:
        """Whether this format holds a table named exactly ``name``."""
        return name in self.names()

    @abstractmethod
    def schema(self, name: str) -> pa.Schema:
        """The table's current Arrow schema."""

    @abstractmethod
    def summarise(self, name: str) -> dict[str, Any]:
        """The table's ``list_datasets`` entry: name, format, rows, bytes, updated_at."""

    @abstractmethod
    def describe(self, name: str) -> dict[str, Any]:
        """The table's ``describe_dataset`` facts."""

    @abstractmethod
    def history(self, name: str) -> list[dict[str, Any]]:
        """The table's snapshots or versions, newest first."""

    @abstractmethod
    def expire(self, name: str, retention: Retention) -> Facts:
        """Let go of the snapshots or versions ``retention`` does not keep (the caller holds the table's
        write lock); returns ``{"dataset", "snapshots_before", "snapshots_expired", "snapshots_after"}``."""

    @abstractmethod
    def optimize(self, name: str, retention: Retention, names: Namespace) -> Facts:
        """The ``optimize`` action: make the table cheaper to read and let go of the snapshots or versions
        ``retention`` does not keep (the format takes the locks it needs)."""

    @abstractmethod
    def drop(self, name: str) -> None:
        """Drop the table (the caller holds its write lock); NOT_FOUND when it does not exist."""

    @abstractmethod
    def claims(self, options: IngestOptions, schema: pa.Schema) -> bool:
        """Whether an upload of ``schema`` with ``options`` that creates a dataset belongs in this format."""

    @abstractmethod
    def write(self, options: IngestOptions, schema: pa.Schema, batches: Batches, names: Namespace) -> Facts:
        """Write one upload as one commit (creating the table when missing); refused uploads commit nothing.
        Returns the PutResult metadata."""

    @abstractmethod
    def pins(self) -> dict[str, Hashable]:
        """What the query engine scans: each table with a token that changes when what a query of it
        reads changes (an Iceberg metadata file; a Lance table's schema: a query pins its version)."""
