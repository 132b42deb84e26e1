"""Prometheus metrics of one server: calls (Flight and HTTP) by RPC, call and status, their latency, the
rows and bytes they moved, and the server's state read when scraped (running queries and uploads,
datasets, the vector cache, index builds, the process).

Each server has a registry of its own (not prometheus-client's global one). Calls are counted from their
:class:`~flight_lakehouse.audit.CallRecord` when they end; the state is collected on scrape, the dataset
summaries at most every :data:`DATASETS_TTL_SECONDS`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from flight_lakehouse.access import acting_as
from flight_lakehouse.audit import CallRecord, status_of
from flight_lakehouse.services import Services

disable_created_metrics()  # no ``_created`` series beside each counter: they double a scrape for nothing

#: How long a scrape's dataset counts are reused (listing them reads every table's metadata).
DATASETS_TTL_SECONDS = 5.0
#: Latency buckets, in seconds: from a cached small query to a long scan.
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
)
#: The call label of a call whose name is not one the server knows (an unknown action's name).
OTHER = "other"
#: The RPCs whose rows and bytes come in (uploads); every other call's go out.
INBOUND_RPCS = frozenset({"DoPut"})


class Metrics:
    """The metrics registry of one server and the counters calls feed."""

    def __init__(self, services: Services, call_names: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.call_names = frozenset(call_names)
        self.calls = Counter(
            "flight_lakehouse_calls",
            "Calls ended, by RPC (Flight RPC or HTTP endpoint), call (command or action) and status.",
            ["rpc", "call", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "flight_lakehouse_call_duration_seconds",
            "Time from a call's start to its end (its result streamed), by RPC.",
            ["rpc"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rows = Counter(
            "flight_lakehouse_rows",
            "Rows received (in: uploads) and sent (out).",
            ["direction"],
            registry=self.registry,
        )
        self.bytes = Counter(
            "flight_lakehouse_data_bytes",
            "Arrow bytes received (in: uploads) and sent (out).",
            ["direction"],
            registry=self.registry,
        )
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, process_open_fds, ...
        self.registry.register(StateCollector(services))
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        self._guard = threading.Lock()

    def observe(self, record: CallRecord, exception: BaseException | None) -> None:
        """Count one ended call."""
        call = record.call or ""
        key = (record.rpc, call if call in self.call_names or not call else OTHER, status_of(exception))
        children = self._children.get(key)
        if children is None:  # labels() costs a few microseconds: look each series up once
            with self._guard:
                children = self._children.setdefault(
                    key, (self.calls.labels(*key), self.latency.labels(record.rpc))
                )
        calls, latency = children
        calls.inc()
        latency.observe(time.perf_counter() - record.started)
        direction = "in" if record.rpc in INBOUND_RPCS else "out"
        if record.rows:
            self.rows.labels(direction).inc(record.rows)
        if record.bytes:
            self.bytes.labels(direction).inc(record.bytes)

    def exposition(self) -> bytes:
        """Every metric in the Prometheus text format (runs the state collector: call off the event loop)."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """The server's state, read when scraped."""

    def __init__(self, services: Services) -> None:
        self.s = services
        self._datasets: tuple[float, list[dict[str, Any]]] = (float("-inf"), [])
        self._guard = threading.Lock()

    def collect(self) -> Iterator[Metric]:
        """The gauges of one scrape."""
        yield gauge("flight_lakehouse_queries_running", "Queries running now.", self.s.engine.running.used)
        yield gauge(
            "flight_lakehouse_ingests_running", "Uploads being written now.", self.s.datasets.ingests.used
        )
        yield from self._dataset_gauges()
        cache_bytes, states = self.s.cache.usage()
        yield gauge(
            "flight_lakehouse_vector_cache_bytes", "Memory held by in-memory vector tables.", cache_bytes
        )
        yield gauge(
            "flight_lakehouse_vector_cache_budget_bytes",
            "Memory the vector cache may use.",
            self.s.cache.budget,
        )
        tables = GaugeMetricFamily(
            "flight_lakehouse_vector_tables",
            "Lance tables by serving state (warm: searched in memory).",
            labels=["state"],
        )
        for state in ("warm", "building", "over budget", "failed", "not served"):
            tables.add_metric([state], states.get(state, 0))
        yield tables
        yield gauge(
            "flight_lakehouse_index_builds_running",
            "Index builds queued or running.",
            self.s.indexes.running(),
        )
        yield counter(
            "flight_lakehouse_index_build_failures", "Index builds that failed.", self.s.indexes.failures
        )
        yield counter(
            "flight_lakehouse_commit_retries",
            "Iceberg commits that lost to a concurrent one (another server's, on a shared catalog) and were "
            "made again on the new base.",
            self.s.datasets.iceberg.catalog.commit_retries,
        )
        lance_caches = GaugeMetricFamily(
            "flight_lakehouse_lance_cache_bytes",
            "Memory held by Lance's caches of index parts and table metadata, by session.",
            labels=["session"],
        )
        for session, held in self.s.datasets.lance.cache_bytes().items():
            lance_caches.add_metric([session], held)
        yield lance_caches
        results = self.s.engine.results.facts()
        yield gauge("flight_lakehouse_result_cache_bytes", "Memory held by cached results.", results["bytes"])
        yield counter(
            "flight_lakehouse_result_cache_hits", "Queries answered from the result cache.", results["hits"]
        )

    def _dataset_gauges(self) -> Iterator[Metric]:
        datasets = GaugeMetricFamily("flight_lakehouse_datasets", "Datasets, by format.", labels=["format"])
        rows = GaugeMetricFamily(
            "flight_lakehouse_dataset_rows", "Rows of all datasets, by format.", labels=["format"]
        )
        size = GaugeMetricFamily(
            "flight_lakehouse_dataset_bytes", "Stored bytes of all datasets, by format.", labels=["format"]
        )
        totals: dict[str, list[int]] = {"parquet": [0, 0, 0], "lance": [0, 0, 0]}
        for summary in self._summaries():
            total = totals.setdefault(str(summary.get("format")), [0, 0, 0])
            total[0] += 1
            total[1] += int(summary.get("rows") or 0)
            total[2] += int(summary.get("bytes") or 0)
        for name, (count, row_count, byte_count) in sorted(totals.items()):
            datasets.add_metric([name], count)
            rows.add_metric([name], row_count)
            size.add_metric([name], byte_count)
        yield from (datasets, rows, size)

    def _summaries(self) -> list[dict[str, Any]]:
        """Every dataset's summary (as no particular caller: all of them), reused for a few seconds."""
        with self._guard:
            taken, summaries = self._datasets
            if time.monotonic() - taken < DATASETS_TTL_SECONDS:
                return summaries
            with acting_as(None):
                summaries = self.s.datasets.list_datasets()
            self._datasets = (time.monotonic(), summaries)
            return summaries


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    """A gauge without labels."""
    return GaugeMetricFamily(name, documentation, value=value)


def counter(name: str, documentation: str, value: float) -> Metric:
    """A counter without labels, read from a count kept elsewhere (exposed as ``name_total``)."""
    return CounterMetricFamily(name, documentation, value=value)
