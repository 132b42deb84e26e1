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
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from flight_lakehouse.commands import CreateIndex
from flight_lakehouse.datasets.lance import LanceTables, retry_preempted
from flight_lakehouse.errors import AlreadyExists, InvalidArgument, Unavailable
from flight_lakehouse.process import large_work_finished
from flight_lakehouse.settings import Settings
from flight_lakehouse.vectors import table_metric, vector_columns

if TYPE_CHECKING:
    import lance

VECTOR_KINDS = ("ivf_pq", "ivf_hnsw_sq")
#: lancedb's HNSW build defaults, kept when the builds moved to Lance's own API.
HNSW_M, HNSW_EF_CONSTRUCTION = 20, 300


@dataclass(frozen=True)
class IndexSpec:
    """How Lance builds one index: its type name and build options (Lance's defaults for the rest)."""

    lance_type: str  # IVF_PQ, IVF_HNSW_SQ, BTREE, BITMAP, INVERTED
    options: dict[str, Any] = field(default_factory=dict)

    def build(self, dataset: lance.LanceDataset, column: str, name: str, replace: bool) -> None:
        """Build the index on ``dataset`` (Lance commits it as a new version)."""
        if self.lance_type.startswith("IVF_"):
            dataset.create_index(column, self.lance_type, name=name, replace=replace, **self.options)
        else:
            dataset.create_scalar_index(column, self.lance_type, name=name, replace=replace, **self.options)


#: Tries of an index build whose commit a concurrent one preempted.
BUILD_ATTEMPTS = 3


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
    retryable: bool = False  # the error is a conflict that a later try may not meet (UNAVAILABLE)
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

    def __init__(self, tables: LanceTables, settings: Settings) -> None:
        self.tables = tables
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="index-build")
        self._builds: dict[tuple[str, str], IndexBuild] = {}
        self._guard = threading.Lock()
        #: Builds that failed since the server started (the metrics count them).
        self.failures = 0
        tables.on_drop.append(self.forget)
        tables.on_describe.append(self.describe)

    def create(self, request: CreateIndex) -> dict[str, Any]:
        """Check and start a build; wait up to ``index_wait_seconds`` for it."""
        dataset = self.tables.dataset(request.dataset)
        spec = index_spec(request, self.tables.schema(request.dataset))
        existing = [index for index in dataset.describe_indices() if request.column in index.field_names]
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
            build = IndexBuild(request.dataset, request.column, request.kind, name, dataset.count_rows())
            self._builds[key] = build
            build.future = self._executor.submit(self._build, build, spec, request.replace)
        answer = {"dataset": request.dataset, "index": name, "column": request.column, "kind": request.kind}
        try:
            build.future.result(timeout=self.settings.index_wait_seconds)
        except FutureTimeout:
            return {**answer, "state": "building"}
        if build.error is not None:
            raise (Unavailable if build.retryable else InvalidArgument)(build.error)
        return {**answer, "state": "ready"}

    def _build(self, build: IndexBuild, spec: IndexSpec, replace: bool) -> None:
        build.started_at = time.monotonic()
        try:
            retry_preempted(
                lambda: self._build_once(build, spec, replace),
                BUILD_ATTEMPTS,
                self.tables.storage.root_uri,
                f"index {build.name!r} on {build.dataset!r}",
            )
        except Exception as error:  # as lance_error made it
            build.error, build.retryable = str(error), isinstance(error, Unavailable)
            self.failures += 1
            logging.getLogger(__name__).warning("index build failed: %s", build.error)
            return
        finally:
            large_work_finished()
        with self._guard:
            if self._builds.get((build.dataset, build.column)) is build:
                del self._builds[(build.dataset, build.column)]

    def _build_once(self, build: IndexBuild, spec: IndexSpec, replace: bool) -> None:
        """One try of the build, on the newest version (a commit meanwhile, an ``optimize``'s compaction or
        a write by another server, may preempt the index's commit: :func:`retry_preempted` tries again)."""
        self.tables.refresh_version(build.dataset)
        spec.build(self.tables.writable(build.dataset), build.column, build.name, replace)
        self.tables.committed(build.dataset)
        self.tables.renew_caches()  # let go of the readers of a replaced index

    def describe(self, dataset: str, facts: dict[str, Any]) -> None:
        """Add the builds not finished (and failed ones) to a table's ``describe_dataset`` indexes."""
        facts["indexes"] = facts["indexes"] + self.pending(dataset)

    def pending(self, dataset: str) -> list[dict[str, Any]]:
        """Builds of ``dataset`` not finished, and failed ones."""
        with self._guard:
            return [build.facts() for (name, _), build in self._builds.items() if name == dataset]

    def running(self) -> int:
        """Builds queued or running (not failed)."""
        with self._guard:
            return sum(build.error is None for build in self._builds.values())

    def forget(self, dataset: str) -> None:
        """Drop the records of a dataset's builds (the dataset was dropped)."""
        with self._guard:
            for key in [key for key in self._builds if key[0] == dataset]:
                del self._builds[key]

    def shutdown(self) -> None:
        """Stop taking builds; a running one is abandoned (Lance commits nothing for it)."""
        self._executor.shutdown(wait=False, cancel_futures=True)


def index_spec(request: CreateIndex, schema: pa.Schema) -> IndexSpec:
    """How Lance builds the index of ``request``, refusing kinds that do not fit the column."""
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
            sub_vectors = request.num_sub_vectors or suggested_sub_vectors(dimension)
            return IndexSpec("IVF_PQ", partitions(request, metric=metric, num_sub_vectors=sub_vectors))
        return IndexSpec(
            "IVF_HNSW_SQ",
            partitions(
                request,
                metric=metric,
                m=request.m or HNSW_M,
                ef_construction=request.ef_construction or HNSW_EF_CONSTRUCTION,
            ),
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
        return IndexSpec("INVERTED")  # Lance's defaults, the same as lancedb's FTS()
    if request.column in vectors or pa.types.is_nested(column_type) or pa.types.is_binary(column_type):
        raise InvalidArgument(
            f"index kind {request.kind!r} needs a scalar column; {request.column!r} is {column_type}"
        )
    return IndexSpec(request.kind.upper())


def partitions(request: CreateIndex, **options: Any) -> dict[str, Any]:
    """``options`` with the requested IVF partitions, if any (else Lance sizes them by the row count)."""
    if request.num_partitions is not None:
        options["num_partitions"] = request.num_partitions
    return options


def suggested_sub_vectors(dimension: int) -> int:
    """lancedb's default PQ sub-vectors: a sixteenth of the dimension, else an eighth, else one."""
    for share in (16, 8):
        if dimension % share == 0:
            return dimension // share
    return 1
