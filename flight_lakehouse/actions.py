"""The DoAction handlers: one method per action, each declaring the role it needs."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from flight_lakehouse import __version__
from flight_lakehouse.commands import (
    CreateIndex,
    DatasetRef,
    DeleteRows,
    DropDataset,
    EmbedTexts,
    EmptyBody,
    ExpireSnapshots,
    Optimize,
    Reembed,
    SearchRequest,
)
from flight_lakehouse.datasets.base import Retention
from flight_lakehouse.process import large_work_finished
from flight_lakehouse.protocol import ActionRouter, ActionSpec, CallContext
from flight_lakehouse.services import Services


class Actions:
    """The catalog, search and maintenance actions over the :class:`Services`."""

    def __init__(self, services: Services) -> None:
        self.s = services

    def router(self) -> ActionRouter:
        """Every action by name, with its body, description and role."""
        return ActionRouter(
            {
                "health": ActionSpec(
                    EmptyBody,
                    "Liveness and version: {status, version, storage, datasets}.",
                    "reader",
                    self.health,
                ),
                "list_datasets": ActionSpec(
                    EmptyBody,
                    "Every dataset with format, rows, bytes, updated_at.",
                    "reader",
                    self.list_datasets,
                ),
                "describe_dataset": ActionSpec(
                    DatasetRef,
                    "Schema (Arrow IPC, base64) and facts of one dataset.",
                    "reader",
                    self.describe_dataset,
                ),
                "dataset_history": ActionSpec(
                    DatasetRef, "Snapshots of one dataset, newest first.", "reader", self.dataset_history
                ),
                "drop_dataset": ActionSpec(
                    DropDataset, "Drop a dataset and delete its files.", "writer", self.drop_dataset
                ),
                "vector_search": ActionSpec(
                    SearchRequest,
                    "k nearest rows (vector), best matches (text) or both fused; Arrow IPC stream bytes.",
                    "reader",
                    self.vector_search,
                ),
                "embed": ActionSpec(
                    EmbedTexts,
                    "Embed texts with the server's model: Arrow IPC stream bytes, one column 'vector'.",
                    "reader",
                    self.embed,
                ),
                "reembed": ActionSpec(
                    Reembed,
                    "Embed a text column again with the server's model, into a new column or dataset.",
                    "writer",
                    self.reembed,
                ),
                "create_index": ActionSpec(
                    CreateIndex,
                    "Build an ivf_pq, ivf_hnsw_sq, fts, btree or bitmap index on a Lance table.",
                    "writer",
                    self.create_index,
                ),
                "delete_rows": ActionSpec(
                    DeleteRows,
                    "Delete the rows of a Lance table matching an SQL predicate.",
                    "writer",
                    self.delete_rows,
                ),
                "optimize": ActionSpec(
                    Optimize,
                    "Lance: compact, update indexes, remove old versions; Parquet: expire old snapshots.",
                    "writer",
                    self.optimize,
                ),
                "expire_snapshots": ActionSpec(
                    ExpireSnapshots,
                    "Let go of old snapshots (Lance: versions) but the newest keep_last and younger ones.",
                    "writer",
                    self.expire_snapshots,
                ),
            }
        )

    def health(self, ctx: CallContext, _: EmptyBody) -> dict[str, Any]:
        """The ``health`` action."""
        return {
            "status": "ok",
            "version": __version__,
            "storage": self.s.storage.public_facts(),
            "datasets": len(self.s.datasets.names()),
            "result_cache": self.s.engine.results.facts(),
            "embedder": self.s.texts.facts(),
        }

    def list_datasets(self, ctx: CallContext, _: EmptyBody) -> list[dict[str, Any]]:
        """The ``list_datasets`` action."""
        return self.s.datasets.list_datasets()

    def describe_dataset(self, ctx: CallContext, body: DatasetRef) -> dict[str, Any]:
        """The ``describe_dataset`` action."""
        return self.s.datasets.describe(body.dataset)

    def dataset_history(self, ctx: CallContext, body: DatasetRef) -> list[dict[str, Any]]:
        """The ``dataset_history`` action."""
        return self.s.datasets.history(body.dataset)

    def drop_dataset(self, ctx: CallContext, body: DropDataset) -> dict[str, Any]:
        """The ``drop_dataset`` action."""
        return {"dropped": self.s.datasets.drop(body.dataset, body.if_exists)}

    def vector_search(self, ctx: CallContext, body: SearchRequest) -> bytes:
        """The ``vector_search`` action: the result as Arrow IPC stream bytes."""
        result = self.s.searcher.search(self.s.searcher.plan(body))
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, result.schema) as writer:
            writer.write_table(result)
        return sink.getvalue().to_pybytes()

    def embed(self, ctx: CallContext, body: EmbedTexts) -> bytes:
        """The ``embed`` action: the vectors as Arrow IPC stream bytes."""
        return self.s.texts.embed_action(body)

    def reembed(self, ctx: CallContext, body: Reembed) -> dict[str, Any]:
        """The ``reembed`` action."""
        try:
            return self.s.texts.reembed(body)
        finally:
            large_work_finished()

    def create_index(self, ctx: CallContext, body: CreateIndex) -> dict[str, Any]:
        """The ``create_index`` action."""
        self.s.datasets.vector_table(body.dataset, "create_index")
        return self.s.indexes.create(body)

    def delete_rows(self, ctx: CallContext, body: DeleteRows) -> dict[str, Any]:
        """The ``delete_rows`` action."""
        tables = self.s.datasets.vector_table(body.dataset, "delete_rows")
        self.s.searcher.check_filter(body.where, tables.schema(body.dataset), body.dataset)
        return tables.delete_rows(body.dataset, body.where)

    def optimize(self, ctx: CallContext, body: Optimize) -> dict[str, Any]:
        """The ``optimize`` action: Lance tables are compacted and cleaned up, Iceberg snapshots expired."""
        retention = Retention(self.s.settings.snapshot_keep_last, body.older_than_seconds)
        try:
            return self.s.datasets.optimize(body.dataset, retention)
        finally:
            large_work_finished()

    def expire_snapshots(self, ctx: CallContext, body: ExpireSnapshots) -> dict[str, Any]:
        """The ``expire_snapshots`` action."""
        settings = self.s.settings
        retention = Retention(
            body.keep_last or settings.snapshot_keep_last,
            settings.snapshot_keep_seconds if body.older_than_seconds is None else body.older_than_seconds,
        )
        return self.s.datasets.expire(body.dataset, retention)
