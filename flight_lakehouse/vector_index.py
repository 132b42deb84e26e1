"""Index builds on the Lance tables, in the background.

``create_index`` checks the request, queues the build on one worker thread and waits a moment: a small
build answers ``ready``, a large one ``building`` while searches keep using the table as it was. Lance
commits the index as a new version when the build ends; ``describe_dataset`` shows the builds in between.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from flight_lakehouse.commands import CreateIndex
from flight_lakehouse.errors import AlreadyExists, InvalidArgument, Unavailable
from flight_lakehouse.memory import release_unused_memory
from flight_lakehouse.settings import Settings
from flight_lakehouse.vectors import VectorTables, lance_error, table_metric, vector_columns

VECTOR_KINDS = ("ivf_pq", "ivf_hnsw_sq")


@dataclass
class IndexBuild:
    """One build, queued or running."""

    dataset: str
    column: str
    kind: str
    name: str
    rows: int
    queued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None
    error: str | None = None
    future: Future[None] | None = None

    def facts(self) -> dict[str, Any]:
        """How ``describe_dataset`` shows the build."""
        now = time.monotonic()
        state = "failed" if self.error else "building"
        facts: dict[str, Any] = {"name": self.name, "column": self.column, "kind": self.kind, "state": state}
        if self.error:
            facts["error"] = self.error
        else:
            facts["progress"] = {
                "phase": "queued" if self.started_at is None else "training and writing",
                "rows": self.rows,
                "elapsed_seconds": round(now - (self.started_at or now), 3),
            }
        return facts


class IndexBuilder:
    """Builds indexes one at a time on a background thread; remembers failures for ``describe``."""

    def __init__(self, tables: VectorTables, settings: Settings) -> None:
        self.tables = tables
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-build")
        self._builds: dict[tuple[str, str], IndexBuild] = {}
        self._guard = threading.Lock()

    def create(self, request: CreateIndex) -> dict[str, Any]:
        """Check and start a build; wait up to ``index_wait_seconds`` for it."""
        table = self.tables.table(request.dataset)
        config = index_config(request, self.tables.schema(request.dataset))
        existing = [index for index in table.list_indices() if request.column in index.columns]
        if existing and not request.replace:
            raise AlreadyExists(
                f"column {request.column!r} of {request.dataset!r} has index {existing[0].name!r}; "
                "pass replace: true to rebuild it"
            )
        name = existing[0].name if existing else f"{request.column}_idx"
        key = (request.dataset, request.column)
        with self._guard:
            running = self._builds.get(key)
            if running is not None and running.error is None:
                raise Unavailable(
                    f"an index on {request.dataset}.{request.column} is being built; retry later"
                )
            build = IndexBuild(request.dataset, request.column, request.kind, name, table.count_rows())
            self._builds[key] = build
            build.future = self._executor.submit(self._build, build, config, request.replace)
        answer = {"dataset": request.dataset, "index": name, "column": request.column, "kind": request.kind}
        try:
            build.future.result(timeout=self.settings.index_wait_seconds)
        except FutureTimeout:
            return {**answer, "state": "building"}
        if build.error is not None:
            raise InvalidArgument(build.error)
        return {**answer, "state": "ready"}

    def _build(self, build: IndexBuild, config: Any, replace: bool) -> None:
        build.started_at = time.monotonic()
        try:
            table = self.tables.table(build.dataset)
            table.create_index(build.column, config=config, replace=replace, name=build.name)
            self.tables.committed(build.dataset)
        except Exception as exc:
            error = lance_error(
                exc, self.tables.storage.root_uri, f"index {build.name!r} on {build.dataset!r}"
            )
            build.error = str(error)
            logging.getLogger(__name__).warning("index build failed: %s", build.error)
            return
        finally:
            release_unused_memory()
        with self._guard:
            if self._builds.get((build.dataset, build.column)) is build:
                del self._builds[(build.dataset, build.column)]

    def pending(self, dataset: str) -> list[dict[str, Any]]:
        """Builds of ``dataset`` not finished, and failed ones."""
        with self._guard:
            return [build.facts() for (name, _), build in self._builds.items() if name == dataset]

    def forget(self, dataset: str) -> None:
        """Drop the records of a dataset's builds (the dataset was dropped)."""
        with self._guard:
            for key in [key for key in self._builds if key[0] == dataset]:
                del self._builds[key]

    def shutdown(self) -> None:
        """Stop taking builds; a running one is abandoned (Lance commits nothing for it)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def index_config(request: CreateIndex, schema: pa.Schema) -> Any:
    """The lancedb index configuration of ``request``, refusing kinds that do not fit the column."""
    from lancedb.index import FTS, Bitmap, BTree, HnswSq, IvfPq

    if request.column not in schema.names:
        raise InvalidArgument(f"unknown column {request.column!r} in dataset {request.dataset!r}")
    column_type = schema.field(request.column).type
    vectors = vector_columns(schema)
    if request.kind in VECTOR_KINDS:
        if request.column not in vectors:
            raise InvalidArgument(
                f"index kind {request.kind!r} needs a vector column; {request.column!r} is {column_type}"
            )
        metric = request.metric or table_metric(schema)
        if request.kind == "ivf_pq":
            dimension = vectors[request.column]
            if request.num_sub_vectors is not None and dimension % request.num_sub_vectors:
                raise InvalidArgument(
                    f"num_sub_vectors {request.num_sub_vectors} must divide the dimension {dimension}"
                )
            return IvfPq(
                distance_type=metric,
                num_partitions=request.num_partitions,
                num_sub_vectors=request.num_sub_vectors,
            )
        options = {"m": request.m, "ef_construction": request.ef_construction}
        return HnswSq(
            distance_type=metric,
            num_partitions=request.num_partitions,
            **{key: value for key, value in options.items() if value is not None},
        )
    vector_only = {"metric", "num_partitions", "num_sub_vectors", "m", "ef_construction"}
    given = sorted(key for key in vector_only if getattr(request, key) is not None)
    if given:
        raise InvalidArgument(f"{given} apply to vector indexes, not to kind {request.kind!r}")
    if request.kind == "fts":
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise InvalidArgument(
                f"index kind 'fts' needs a string column; {request.column!r} is {column_type}"
            )
        return FTS()
    if request.column in vectors or pa.types.is_nested(column_type) or pa.types.is_binary(column_type):
        raise InvalidArgument(
            f"index kind {request.kind!r} needs a scalar column; {request.column!r} is {column_type}"
        )
    return BTree() if request.kind == "btree" else Bitmap()
