"""Load generator: a weighted mix of scenarios run by concurrent clients in spawned processes.

Three datasets are made first (``load_events``: Iceberg; ``load_items`` and ``load_churn``: Lance tables
with 16-dimensional vectors). Every row is derived from its ``id`` (``value = id % 1000``, the vector
``vector_of(id)``, the text ``text_of(id)``), so any row a query or search returns can be checked, and every
scenario checks its answer: a wrong answer is counted as an error (``WRONG``). UNAVAILABLE answers of an
intended limit (``max_concurrent_queries``, ``max_concurrent_ingests``, one index build at a time) are
counted apart (``limited``); the client then backs off a little, as a real one would. At the end every
dataset's row count is compared with what the clients committed, and the server's RSS, open files and
threads (sampled every second with psutil) are checked for growth after the warm-up.

Two mixes: ``mixed`` (every scenario, issue 18 point 1 and the soak of point 2) and ``churn`` (one-row
appends and deletes into a small vector table while other clients search it: point 3). Clients are
threads with a Flight client each, spread over ``--processes`` spawned processes (never forked: gRPC
deadlocks after a fork).

Usage (from the project root)::

    python -m scripts.loadgen --clients 50 --seconds 600 --chart docs/charts/load_soak.png
    python -m scripts.loadgen --mix churn --clients 12 --seconds 120

Library: :func:`prepare` then :func:`run_load` against a running server (``tests/test_load.py``), or
:func:`run_with_server`; :class:`LoadReport` has ``problems()``, ``markdown()`` and ``chart()``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.flight as flight

EVENTS, ITEMS, CHURN = "load_events", "load_items", "load_churn"
#: a dataset made and dropped before the run, to warm the maintenance up
WARMUP = "load_warmup"
DIM = 16
SEED_EVENTS, SEED_ITEMS, SEED_CHURN = 5_000, 2_000, 500
#: upsert keys: below SEED_ITEMS they replace a row, from there up to this they may insert one
ITEM_KEYS = SEED_ITEMS + 3_000
INGEST_ROWS = 10  # rows of one small ingest batch
UPSERT_ROWS = 5
SCAN_BELOW = 1_000  # the scan scenario reads ids below this (seed rows, never changed)
K = 10
EXCHANGE_QUERIES = 8
CLIENT_ID_STRIDE = 1_000_000_000  # ids of client c: (c + 1) * stride + n
BACKOFF = (0.05, 0.2)  # seconds a client waits after a limit's UNAVAILABLE
SAMPLE_SECONDS = 1.0
#: the messages of UNAVAILABLE answers that an intended limit gives (the server is busy by design)
LIMIT_MARKERS = ("max_concurrent_queries", "max_concurrent_ingests", "is being built; retry")

MIXES: dict[str, dict[str, float]] = {
    "mixed": {
        "ingest": 8,
        "upsert": 4,
        "point_lookup": 10,
        "aggregate": 6,
        "scan": 5,
        "old_snapshot_scan": 3,
        "knn": 12,
        "knn_filtered": 8,
        "hybrid": 3,
        "exchange": 4,
        "list_describe": 4,
        "create_index": 0.5,
        "append_one": 6,
        "delete_rows": 4,
        "churn_search": 6,
        "optimize": 0.3,
    },
    "churn": {"append_one": 5, "delete_rows": 4, "churn_search": 8},
}


# -- rows derived from their id --------------------------------------------------------------------
def vector_of(ids: np.ndarray | list[int]) -> np.ndarray:
    """The vector of each id (float32, never zero): every row's vector can be checked from its id."""
    ids = np.asarray(ids, dtype=np.float64).reshape(-1, 1)
    frequencies = 0.6180339887 * np.arange(1, DIM + 1) + 0.001
    return (np.sin(ids * frequencies + np.arange(DIM)) + 1.5).astype(np.float32)


def text_of(row_id: int) -> str:
    """The text column of a row."""
    return f"item {row_id} w{row_id % 50}"


def vector_array(ids: list[int]) -> pa.FixedSizeListArray:
    """The vectors of ``ids`` as a ``fixed_size_list<float32, DIM>`` array."""
    return pa.FixedSizeListArray.from_arrays(pa.array(vector_of(ids).ravel()), DIM)


def events_table(ids: list[int], client: int) -> pa.Table:
    """Rows of ``load_events``."""
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "client": pa.array([client] * len(ids), pa.int32()),
            "value": pa.array([i % 1000 for i in ids], pa.int64()),
        }
    )


def items_table(ids: list[int], revision: int = 0) -> pa.Table:
    """Rows of ``load_items``."""
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "text": pa.array([text_of(i) for i in ids]),
            "revision": pa.array([revision] * len(ids), pa.int64()),
            "vec": vector_array(ids),
        }
    )


def churn_table(ids: list[int]) -> pa.Table:
    """Rows of ``load_churn``."""
    return pa.table({"id": pa.array(ids, pa.int64()), "vec": vector_array(ids)})


# -- answers -----------------------------------------------------------------------------------------
class WrongAnswer(Exception):
    """A scenario's answer does not add up."""


def expect(condition: bool, message: str) -> None:
    """Raise :class:`WrongAnswer` with ``message`` unless ``condition``."""
    if not condition:
        raise WrongAnswer(message)


def check_rows(table: pa.Table, dataset: str) -> None:
    """Every returned row is a row of ``dataset`` at some version: its columns are those of its id."""
    ids = table.column("id").to_pylist()
    if "vec" in table.column_names and ids:
        vectors = np.asarray(table.column("vec").to_pylist(), dtype=np.float32)
        expect(np.allclose(vectors, vector_of(ids), atol=1e-6), f"{dataset}: a row's vector is not its id's")
    if "text" in table.column_names:
        expect(table.column("text").to_pylist() == [text_of(i) for i in ids], f"{dataset}: wrong text")
    if "value" in table.column_names:
        expect(table.column("value").to_pylist() == [i % 1000 for i in ids], f"{dataset}: wrong value")


def check_nearest(table: pa.Table, query_id: int, dataset: str, k: int = K) -> None:
    """A k-NN answer for the vector of ``query_id`` (a row never deleted): k rows, of the table, nearest
    first, the first the row itself at distance ~0."""
    expect(table.num_rows == k, f"{dataset}: {table.num_rows} rows, not {k}")
    check_rows(table, dataset)
    distances = table.column("_distance").to_numpy()
    expect(bool(np.all(np.diff(distances) >= -1e-6)), f"{dataset}: distances not in order")
    first = table.column("id")[0].as_py()
    expect(first == query_id and distances[0] < 1e-4, f"{dataset}: nearest of {query_id} is {first}")


def classify(exc: BaseException) -> str:
    """The outcome of a failed call: ``limited`` (an intended limit), ``WRONG``, or the status's name."""
    if isinstance(exc, WrongAnswer):
        return "WRONG"
    if isinstance(exc, flight.FlightUnavailableError):
        return "limited" if any(marker in str(exc) for marker in LIMIT_MARKERS) else "UNAVAILABLE"
    names = {
        flight.FlightTimedOutError: "DEADLINE_EXCEEDED",
        flight.FlightCancelledError: "CANCELLED",
        flight.FlightInternalError: "INTERNAL",
        flight.FlightUnauthenticatedError: "UNAUTHENTICATED",
        flight.FlightUnauthorizedError: "PERMISSION_DENIED",
        pa.ArrowInvalid: "INVALID_ARGUMENT",
        pa.ArrowKeyError: "NOT_FOUND",
        pa.ArrowNotImplementedError: "UNIMPLEMENTED",
    }
    return next((name for kind, name in names.items() if isinstance(exc, kind)), type(exc).__name__)


# -- a client ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fixture:
    """What the clients know of the datasets prepared for them."""

    location: str
    seed_snapshot: int  # load_events' snapshot holding the seed rows only


@dataclass
class Ledger:
    """What one client committed."""

    event_rows: int = 0
    item_keys: set[int] = field(default_factory=set)
    churn_appended: int = 0
    churn_deleted: int = 0


class Client:
    """One client: a Flight connection, its own id space and what it committed."""

    def __init__(self, number: int, fixture: Fixture, seed: int) -> None:
        self.number = number
        self.fixture = fixture
        self.flight = flight.connect(fixture.location)
        self.rng = random.Random(seed)
        self.ledger = Ledger()
        self.next_id = (number + 1) * CLIENT_ID_STRIDE
        self.event_ids: list[int] = []  # committed by this client (a sample, for lookups)
        self.churn_live: list[int] = []  # appended by this client and not deleted

    def new_ids(self, count: int) -> list[int]:
        """Ids no other client uses."""
        first, self.next_id = self.next_id, self.next_id + count
        return list(range(first, first + count))

    def put(self, dataset: str, table: pa.Table, **options: Any) -> dict[str, Any]:
        """DoPut ``table`` stating its row count; returns the PutResult JSON."""
        command = {"ingest": {"dataset": dataset, "expected_rows": table.num_rows, **options}}
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        writer, reader = self.flight.do_put(descriptor, table.schema)
        with writer:
            writer.write_table(table)
            writer.done_writing()
            result = reader.read()
        return json.loads(result.to_pybytes())

    def get(self, ticket: dict[str, Any]) -> pa.Table:
        """DoGet a JSON ticket, read whole."""
        return self.flight.do_get(flight.Ticket(json.dumps(ticket).encode())).read_all()

    def sql(self, query: str) -> pa.Table:
        """Run SQL through DoGet."""
        return self.get({"sql": query})

    def action(self, name: str, body: dict[str, Any]) -> Any:
        """Run an action; its JSON result."""
        results = list(self.flight.do_action(flight.Action(name, json.dumps(body).encode())))
        return json.loads(results[0].body.to_pybytes())

    def exchange(self, body: dict[str, Any], ids: list[int]) -> pa.Table:
        """DoExchange the vectors of ``ids`` as one batch; the whole result."""
        descriptor = flight.FlightDescriptor.for_command(json.dumps({"search": body}).encode())
        writer, reader = self.flight.do_exchange(descriptor)
        batch = pa.record_batch({"vec": vector_array(ids)})
        with writer:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            writer.done_writing()
            return reader.read_all()

    def close(self) -> None:
        """Close the connection."""
        self.flight.close()


# -- scenarios: each runs one call and checks its answer ------------------------------------------------
def ingest(client: Client) -> None:
    """DoPut append of a small batch into the Iceberg dataset."""
    ids = client.new_ids(INGEST_ROWS)
    result = client.put(EVENTS, events_table(ids, client.number))
    expect(result.get("rows_written") == INGEST_ROWS, f"ingest wrote {result}")
    client.ledger.event_rows += INGEST_ROWS
    client.event_ids.append(client.rng.choice(ids))


def upsert(client: Client) -> None:
    """Upsert a few rows into a Lance table: some replace a row, some may insert one."""
    keys = client.rng.sample(range(ITEM_KEYS), UPSERT_ROWS)
    result = client.put(ITEMS, items_table(keys, client.rng.randrange(1 << 30)), mode="upsert", key="id")
    inserted, updated = result.get("rows_inserted", -1), result.get("rows_updated", -1)
    expect(inserted + updated == UPSERT_ROWS, f"upsert of {UPSERT_ROWS} rows answered {result}")
    client.ledger.item_keys.update(keys)


def point_lookup(client: Client) -> None:
    """SQL lookup of one row by id: a seed row, or one this client committed (read-your-writes)."""
    row_id = client.rng.choice(client.event_ids) if client.event_ids else client.rng.randrange(SEED_EVENTS)
    table = client.sql(f"SELECT id, value FROM {EVENTS} WHERE id = {row_id}")
    expect(table.num_rows == 1, f"lookup of id {row_id}: {table.num_rows} rows")
    check_rows(table, EVENTS)


def aggregate(client: Client) -> None:
    """Counts and sums that must add up: all rows, and exactly this client's committed rows."""
    totals = client.sql(
        f"SELECT count(*) AS n, sum(value - id % 1000) AS off, "
        f"count(*) FILTER (WHERE client = {client.number}) AS mine FROM {EVENTS}"
    ).to_pylist()[0]
    expect(totals["off"] == 0, f"aggregate: values off by {totals['off']}")
    expect((totals["n"] - SEED_EVENTS) % INGEST_ROWS == 0, f"aggregate: {totals['n']} rows")
    expect(totals["mine"] == client.ledger.event_rows, f"aggregate: mine {totals} != {client.ledger}")


def scan(client: Client) -> None:
    """A filtered scan ticket over seed rows (never changed)."""
    table = client.get({"dataset": EVENTS, "columns": ["id", "value"], "filter": f"id < {SCAN_BELOW}"})
    expect(table.num_rows == SCAN_BELOW, f"scan: {table.num_rows} rows")
    check_rows(table, EVENTS)


def old_snapshot_scan(client: Client) -> None:
    """A scan of the snapshot that held the seed rows only."""
    table = client.get({"dataset": EVENTS, "snapshot_id": client.fixture.seed_snapshot})
    expect(table.num_rows == SEED_EVENTS, f"old snapshot: {table.num_rows} rows")
    expect(table.column("id").to_pylist() == list(range(SEED_EVENTS)), "old snapshot: wrong ids")


def knn(client: Client) -> None:
    """k-NN of a seed row's vector: the row itself first."""
    row_id = client.rng.randrange(SEED_ITEMS)
    body = {"dataset": ITEMS, "vector": vector_of([row_id])[0].tolist(), "k": K}
    check_nearest(client.get({"search": body}), row_id, ITEMS)


def knn_filtered(client: Client) -> None:
    """k-NN with a filter: every row passes it, the row itself first."""
    row_id = client.rng.randrange(SEED_ITEMS // 3) * 3
    body = {"dataset": ITEMS, "vector": vector_of([row_id])[0].tolist(), "k": K, "filter": "id % 3 = 0"}
    table = client.get({"search": body})
    check_nearest(table, row_id, ITEMS)
    expect(all(i % 3 == 0 for i in table.column("id").to_pylist()), "filtered k-NN: a row fails the filter")


def hybrid(client: Client) -> None:
    """Hybrid search (vector and full text): rows of the table, scored."""
    row_id = client.rng.randrange(SEED_ITEMS)
    body = {"dataset": ITEMS, "vector": vector_of([row_id])[0].tolist(), "text": f"w{row_id % 50}", "k": K}
    table = client.get({"search": body})
    expect(0 < table.num_rows <= K and "_score" in table.column_names, f"hybrid: {table.schema}")
    check_rows(table, ITEMS)


def exchange(client: Client) -> None:
    """DoExchange batch search: per query, k rows, the query's own row first."""
    ids = client.rng.sample(range(SEED_ITEMS), EXCHANGE_QUERIES)
    table = client.exchange({"dataset": ITEMS, "k": K, "columns": ["id", "vec"]}, ids)
    expect(table.num_rows == K * EXCHANGE_QUERIES, f"exchange: {table.num_rows} rows")
    for index, row_id in enumerate(ids):
        rows = table.filter(pa.compute.equal(table.column("_query_index"), index))
        check_nearest(rows, row_id, ITEMS)


def list_describe(client: Client) -> None:
    """list_datasets names every dataset; describe_dataset of a vector table adds up."""
    listed = {entry["name"]: entry for entry in client.action("list_datasets", {})}
    expect({EVENTS, ITEMS, CHURN} <= set(listed), f"list_datasets: {sorted(listed)}")
    described = client.action("describe_dataset", {"dataset": ITEMS})
    expect(SEED_ITEMS <= described["rows"] <= ITEM_KEYS, f"describe: {described['rows']} rows")


def create_index(client: Client) -> None:
    """Rebuild a scalar index on the vector table while others search it."""
    result = client.action(
        "create_index", {"dataset": ITEMS, "column": "id", "kind": "btree", "replace": True}
    )
    expect(result.get("state") in ("ready", "building"), f"create_index: {result}")


def append_one(client: Client) -> None:
    """A one-row append into the small vector table."""
    ids = client.new_ids(1)
    result = client.put(CHURN, churn_table(ids))
    expect(result.get("rows_written") == 1, f"append_one: {result}")
    client.ledger.churn_appended += 1
    client.churn_live.append(ids[0])


def delete_rows(client: Client) -> None:
    """Delete one row this client appended (or append one first when it has none)."""
    if not client.churn_live:
        append_one(client)
    row_id = client.churn_live.pop(client.rng.randrange(len(client.churn_live)))
    try:
        result = client.action("delete_rows", {"dataset": CHURN, "where": f"id = {row_id}"})
    except BaseException:
        client.churn_live.append(row_id)  # not deleted (a refused call changes nothing)
        raise
    expect(result.get("rows_deleted") == 1, f"delete of id {row_id}: {result}")
    client.ledger.churn_deleted += 1


def churn_search(client: Client) -> None:
    """k-NN on the small vector table being written, half of them filtered: the row itself first (a seed
    row, never deleted), every row one of the table (and passing the filter)."""
    row_id = client.rng.randrange(SEED_CHURN // 2) * 2
    body = {"dataset": CHURN, "vector": vector_of([row_id])[0].tolist(), "k": K}
    if client.rng.random() < 0.5:
        body["filter"] = "id % 2 = 0"
    table = client.get({"search": body})
    check_nearest(table, row_id, CHURN)
    if "filter" in body:
        expect(
            all(i % 2 == 0 for i in table.column("id").to_pylist()), "churn search: a row fails the filter"
        )


def optimize(client: Client) -> None:
    """The maintenance an operator runs: optimize one of the datasets, each in turn (Lance: compact, bring
    the indexes up to date, remove versions older than a minute; Parquet: compact the small files, keep
    the snapshots). Without it the writes pile up fragments, versions and small files that every read of
    the table goes through."""
    dataset = client.rng.choice((CHURN, ITEMS, EVENTS))
    older_than = 3600 if dataset == EVENTS else 60  # old_snapshot_scan reads the seed snapshot
    result = client.action("optimize", {"dataset": dataset, "older_than_seconds": older_than})
    if dataset == EVENTS:
        expect(result.get("snapshots_after", 0) >= 1, f"optimize: {result}")
    else:
        expect(result.get("fragments_after", 0) >= 1, f"optimize: {result}")


SCENARIOS: dict[str, Callable[[Client], None]] = {
    fn.__name__: fn
    for fn in (
        ingest,
        upsert,
        point_lookup,
        aggregate,
        scan,
        old_snapshot_scan,
        knn,
        knn_filtered,
        hybrid,
        exchange,
        list_describe,
        create_index,
        append_one,
        delete_rows,
        churn_search,
        optimize,
    )
}


# -- worker processes ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkerSpec:
    """What one spawned process runs: its clients (numbers), the mix, and when to stop."""

    fixture: Fixture
    clients: tuple[int, ...]
    mix: tuple[tuple[str, float], ...]
    seconds: float
    count: int  # calls per client (0: until ``seconds``)
    seed: int


@dataclass
class Outcomes:
    """Per scenario: latencies and end times (seconds, wall clock) of successes, and failures by kind."""

    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    ends: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: dict[str, Counter] = field(default_factory=lambda: defaultdict(Counter))
    examples: dict[str, str] = field(default_factory=dict)  # one message per failure kind
    ledgers: list[Ledger] = field(default_factory=list)

    def merge(self, other: Outcomes) -> None:
        """Add ``other``'s outcomes to these."""
        for name, values in other.latencies.items():
            self.latencies[name].extend(values)
            self.ends[name].extend(other.ends[name])
        for name, counts in other.failures.items():
            self.failures[name].update(counts)
        for key, message in other.examples.items():
            self.examples.setdefault(key, message)
        self.ledgers.extend(other.ledgers)

    def plain(self) -> Outcomes:
        """A copy with plain dicts (picklable)."""
        copy = Outcomes(dict(self.latencies), dict(self.ends), dict(self.failures), self.examples)
        copy.ledgers = self.ledgers
        return copy


def run_client(client: Client, spec: WorkerSpec, outcomes: Outcomes, guard: threading.Lock) -> None:
    """Run scenarios drawn from the mix until the time or the count is up."""
    names, weights = zip(*spec.mix, strict=True)
    deadline = time.monotonic() + spec.seconds
    done = 0
    while time.monotonic() < deadline and (spec.count == 0 or done < spec.count):
        name = client.rng.choices(names, weights)[0]
        started = time.perf_counter()
        try:
            SCENARIOS[name](client)
        except Exception as exc:
            kind = classify(exc)
            with guard:
                outcomes.failures[name][kind] += 1
                outcomes.examples.setdefault(f"{name}/{kind}", str(exc).splitlines()[0][:300])
            if kind == "limited":
                time.sleep(client.rng.uniform(*BACKOFF))
        else:
            with guard:
                outcomes.latencies[name].append(time.perf_counter() - started)
                outcomes.ends[name].append(time.time())
        done += 1


def run_worker(spec: WorkerSpec) -> Outcomes:
    """One spawned process: its clients as threads; their outcomes and ledgers."""
    outcomes, guard = Outcomes(), threading.Lock()
    clients = [Client(number, spec.fixture, spec.seed * 7919 + number) for number in spec.clients]
    threads = [threading.Thread(target=run_client, args=(c, spec, outcomes, guard)) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for client in clients:
        outcomes.ledgers.append(client.ledger)
        client.close()
    return outcomes.plain()


# -- the server, sampled ---------------------------------------------------------------------------------
@dataclass
class Sample:
    """One look at the server: time (wall clock), RSS, open files, threads; how the churn table is served."""

    time: float
    rss: int
    files: int
    threads: int
    from_memory: bool | None = None
    version_lag: int | None = None
    state: str | None = None
    caches: int | None = None  # bytes held by the server's bounded caches (its /metrics), when known


#: The gauges of the server's caches, each bounded by a setting (result, Lance, in-memory vector).
CACHE_GAUGES = (
    "flight_lakehouse_result_cache_bytes",
    "flight_lakehouse_lance_cache_bytes",
    "flight_lakehouse_vector_cache_bytes",
)


def cache_bytes(metrics_url: str) -> int | None:
    """The bytes the server's bounded caches hold, summed from its ``/metrics`` (None when unreadable)."""
    from scripts.harness import metric_sum

    try:
        return int(metric_sum(metrics_url, CACHE_GAUGES, timeout=5))
    except OSError:
        return None


class Sampler:
    """Samples the server process (psutil), its caches (``/metrics``, when ``metrics_url`` is given) and
    the serving of ``load_churn`` every second, in a thread."""

    def __init__(self, pid: int, location: str, metrics_url: str = "") -> None:
        self.process = psutil.Process(pid)
        self.location = location
        self.metrics_url = metrics_url
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with flight.connect(self.location) as client:
            while True:
                self.samples.append(self.sample(client))
                if self._stop.wait(SAMPLE_SECONDS):
                    return

    def sample(self, client: flight.FlightClient) -> Sample:
        """One sample of the server now."""
        with self.process.oneshot():
            sample = Sample(
                time.time(),
                self.process.memory_info().rss,
                self.process.num_fds(),
                self.process.num_threads(),
            )
        if self.metrics_url:
            sample.caches = cache_bytes(self.metrics_url)
        try:
            body = json.dumps({"dataset": CHURN}).encode()
            facts = json.loads(
                next(client.do_action(flight.Action("describe_dataset", body))).body.to_pybytes()
            )
        except flight.FlightError:
            return sample
        serving = facts.get("serving", {})
        sample.from_memory = serving.get("from") == "memory"
        sample.state = serving.get("state")
        if "version" in serving:
            sample.version_lag = int(facts["version"]) - int(serving["version"])
        return sample


# -- preparing and checking the datasets -----------------------------------------------------------------
def connect_action(client: flight.FlightClient, name: str, body: dict[str, Any]) -> Any:
    """Run an action on ``client``; its JSON result."""
    results = list(client.do_action(flight.Action(name, json.dumps(body).encode())))
    return json.loads(results[0].body.to_pybytes())


def ready(seeder: Client, deadline: float) -> bool:
    """Whether both vector tables are served from memory and the full-text index is built."""
    items = seeder.action("describe_dataset", {"dataset": ITEMS})
    churn = seeder.action("describe_dataset", {"dataset": CHURN})
    served = all(facts["serving"].get("from") == "memory" for facts in (items, churn))
    indexed = any(i["column"] == "text" and i["state"] == "ready" for i in items["indexes"])
    if not (served and indexed) and time.monotonic() > deadline:
        raise RuntimeError(f"datasets not ready: {items['serving']}, {churn['serving']}, {items['indexes']}")
    return served and indexed


def prepare(location: str, timeout: float = 120.0) -> Fixture:
    """Create the three datasets with their seed rows and the full-text index, and wait until both vector
    tables are served from memory."""
    seeder = Client(-1, Fixture(location, 0), 0)
    try:
        events = seeder.put(EVENTS, events_table(list(range(SEED_EVENTS)), -1), mode="create")
        seeder.put(ITEMS, items_table(list(range(SEED_ITEMS))), mode="create", metric="cosine")
        seeder.put(CHURN, churn_table(list(range(SEED_CHURN))), mode="create", metric="cosine")
        seeder.action("create_index", {"dataset": ITEMS, "column": "text", "kind": "fts"})
        deadline = time.monotonic() + timeout
        while not ready(seeder, deadline):
            time.sleep(0.1)
        warm_maintenance(seeder)
        while not ready(seeder, deadline):
            time.sleep(0.1)
    finally:
        seeder.close()
    return Fixture(location, int(events["snapshot_id"]))


def warm_maintenance(seeder: Client) -> None:
    """Run each kind of ``optimize`` once before the clients start: the thread pools the server starts on
    the first one (pyiceberg's Arrow scan for a compaction, lancedb's connection in Lance's new sessions)
    are not growth (a short run counted them: +33 threads)."""
    for number in range(2):  # two small files: something to compact
        seeder.put(WARMUP, events_table([number], -1))
    seeder.action("optimize", {"dataset": WARMUP})
    seeder.action("drop_dataset", {"dataset": WARMUP})
    seeder.action("optimize", {"dataset": ITEMS, "older_than_seconds": 3600})


def expected_rows(ledgers: list[Ledger]) -> dict[str, int]:
    """Each dataset's row count after the run, from what the clients committed."""
    item_keys = set().union(*(ledger.item_keys for ledger in ledgers))
    return {
        EVENTS: SEED_EVENTS + sum(ledger.event_rows for ledger in ledgers),
        ITEMS: SEED_ITEMS + len({key for key in item_keys if key >= SEED_ITEMS}),
        CHURN: SEED_CHURN + sum(ledger.churn_appended - ledger.churn_deleted for ledger in ledgers),
    }


def stored_rows(location: str) -> dict[str, int]:
    """Each dataset's row count as SQL counts it."""
    with flight.connect(location) as client:
        counts = {}
        for name in (EVENTS, ITEMS, CHURN):
            ticket = flight.Ticket(json.dumps({"sql": f"SELECT count(*) AS n FROM {name}"}).encode())
            counts[name] = client.do_get(ticket).read_all().column("n")[0].as_py()
        return counts


# -- the report -----------------------------------------------------------------------------------------
@dataclass
class Limits:
    """What a run must show besides zero errors: growth bounds after the warm-up."""

    warmup_share: float = 0.2  # of the run, before growth is measured
    rss_mb_per_min: float = 5.0
    files_growth: int = 10
    threads_growth: int = 10


@dataclass
class LoadReport:
    """The outcomes of a run, the server's samples, and the row counts expected and found."""

    mix: str
    clients: int
    processes: int
    seconds: float
    outcomes: Outcomes
    samples: list[Sample]
    expected: dict[str, int]
    stored: dict[str, int]
    alive: bool
    limits: Limits = field(default_factory=Limits)

    @property
    def errors(self) -> Counter:
        """Failures that are not an intended limit, by scenario/kind."""
        found: Counter = Counter()
        for name, counts in self.outcomes.failures.items():
            for kind, count in counts.items():
                if kind != "limited":
                    found[f"{name}/{kind}"] += count
        return found

    @property
    def steady(self) -> list[Sample]:
        """The samples after the warm-up, while the clients were running (not while they wound down)."""
        ends = [max(values) for values in self.outcomes.ends.values() if values]
        if not self.samples or not ends:
            return []
        first, last = self.samples[0].time, max(ends)
        start = first + self.limits.warmup_share * (last - first)
        return [sample for sample in self.samples if start <= sample.time <= last]

    def rss_slope(self, less_caches: bool = False) -> float:
        """RSS growth after the warm-up, MB per minute (least squares); with ``less_caches``, of the RSS
        less what the server's bounded caches hold (0 when they were not sampled)."""
        steady = [s for s in self.steady if s.caches is not None or not less_caches]
        if len(steady) < 3:
            return 0.0
        minutes = np.array([s.time for s in steady]) / 60
        held = np.array([(s.rss - (s.caches or 0) if less_caches else s.rss) for s in steady]) / 1e6
        return float(np.polyfit(minutes - minutes[0], held, 1)[0])

    def caches_sampled(self) -> bool:
        """Whether the server's caches were read in the steady samples."""
        return sum(s.caches is not None for s in self.steady) >= 3

    def growth(self, attribute: str) -> int:
        """How much ``files`` or ``threads`` rose after the warm-up: the median of the last fifth of the
        steady samples minus that of the first fifth."""
        values = [getattr(sample, attribute) for sample in self.steady]
        if not values:
            return 0
        fifth = max(1, len(values) // 5)
        return int(np.median(values[-fifth:]) - np.median(values[:fifth]))

    def problems(self) -> list[str]:
        """Everything that fails the run's checks (empty: it passed)."""
        found = [f"{key}: {count} ({self.example(key)})" for key, count in sorted(self.errors.items())]
        if not self.alive:
            found.append("the server died")
        for name, count in self.expected.items():
            if self.stored.get(name) != count:
                found.append(f"{name}: {self.stored.get(name)} rows stored, {count} committed")
        if self.rss_slope() > self.limits.rss_mb_per_min:
            found.append(f"RSS grows {self.rss_slope():.1f} MB/min after the warm-up")
        for attribute, bound in (
            ("files", self.limits.files_growth),
            ("threads", self.limits.threads_growth),
        ):
            if self.growth(attribute) > bound:
                found.append(f"{attribute} grew by {self.growth(attribute)} after the warm-up")
        return found

    def example(self, key: str) -> str:
        """One message of a failure kind ``scenario/kind``."""
        return self.outcomes.examples.get(key, "")

    def served_share(self) -> float | None:
        """Share of the samples in which ``load_churn`` was served from memory."""
        looks = [s.from_memory for s in self.samples if s.from_memory is not None]
        return sum(looks) / len(looks) if looks else None

    def markdown(self) -> str:
        """The per-scenario table and the server's figures."""
        lines = [
            f"mix `{self.mix}`, {self.clients} clients in {self.processes} processes, {self.seconds:.0f} s",
            "",
            "| scenario | ok | ok/s | p50 ms | p95 ms | p99 ms | p50 first / last fifth | limited | errors |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        names = sorted(set(self.outcomes.latencies) | set(self.outcomes.failures))
        for name in names:
            lines.append(self._row(name))
        total = sum(len(v) for v in self.outcomes.latencies.values())
        lines.append(
            f"| **all** | {total:,} | {total / self.seconds:,.0f} | | | | | {self._limited():,} | "
            f"{sum(self.errors.values())} |"
        )
        return "\n".join([*lines, "", *self._server_lines()]) + "\n"

    def _row(self, name: str) -> str:
        latencies = np.array(self.outcomes.latencies.get(name, [])) * 1e3
        failures = self.outcomes.failures.get(name, Counter())
        errors = ", ".join(f"{kind} {count}" for kind, count in sorted(failures.items()) if kind != "limited")
        p50, p95, p99 = np.percentile(latencies, [50, 95, 99]) if len(latencies) else (np.nan,) * 3
        early, late = self.fifths(name)
        return (
            f"| {name} | {len(latencies):,} | {len(latencies) / self.seconds:,.1f} | {p50:.1f} | {p95:.1f} | "
            f"{p99:.1f} | {early:.0f} / {late:.0f} | {failures.get('limited', 0):,} | {errors or 0} |"
        )

    def fifths(self, name: str) -> tuple[float, float]:
        """The p50 latency (ms) of ``name``'s calls that ended in the first and in the last fifth of the run
        (NaN without any): whether a scenario slows down as the run goes on."""
        latencies = np.array(self.outcomes.latencies.get(name, [])) * 1e3
        ends = np.array(self.outcomes.ends.get(name, []))
        every = np.concatenate([np.asarray(v) for v in self.outcomes.ends.values() if v] or [np.empty(0)])
        if not len(latencies) or not len(every):
            return np.nan, np.nan
        first, last = every.min(), every.max()
        span = last - first
        early = latencies[ends <= first + span / 5]
        late = latencies[ends >= last - span / 5]
        return (
            float(np.median(early)) if len(early) else np.nan,
            float(np.median(late)) if len(late) else np.nan,
        )

    def _limited(self) -> int:
        return sum(counts.get("limited", 0) for counts in self.outcomes.failures.values())

    def _server_lines(self) -> list[str]:
        steady = self.steady
        rss = [s.rss / 1e6 for s in self.samples]
        facts = [
            f"- server RSS: {rss[0]:.0f} MB at the start, {max(rss):.0f} MB peak, "
            f"{rss[-1]:.0f} MB at the end; after the warm-up ({self.limits.warmup_share:.0%} of the run) "
            "it grows "
            f"{self.rss_slope():+.2f} MB/min"
            if rss
            else "- no samples of the server",
            self._cache_line(),
            f"- open files {steady[0].files} -> {steady[-1].files} (growth {self.growth('files'):+d}), "
            f"threads {steady[0].threads} -> {steady[-1].threads} (growth {self.growth('threads'):+d}) "
            f"after the warm-up (max {max(s.files for s in self.samples)} files, "
            f"{max(s.threads for s in self.samples)} threads)"
            if steady
            else "",
            "- rows committed by the clients / stored: "
            + ", ".join(
                f"{name} {self.expected[name]:,} / {self.stored.get(name, 0):,}" for name in self.expected
            ),
        ]
        share = self.served_share()
        if share is not None:
            lags = [s.version_lag for s in self.samples if s.version_lag is not None]
            states = Counter(s.state for s in self.samples if s.state is not None)
            facts.append(
                f"- `{CHURN}` served from memory in {share:.0%} of the samples (version lag max "
                f"{max(lags, default=0)}; states {dict(states)})"
            )
        facts.append("- problems: " + ("; ".join(self.problems()) or "none"))
        return [fact for fact in facts if fact]

    def _cache_line(self) -> str:
        """How much of the RSS growth the bounded caches explain ("" when they were not sampled)."""
        if not self.caches_sampled():
            return ""
        held = [s.caches / 1e6 for s in self.steady if s.caches is not None]
        net = self.rss_slope(less_caches=True)
        return (
            f"- the bounded caches (result, Lance, in-memory vector) held {held[0]:.0f} MB after the "
            f"warm-up, {held[-1]:.0f} MB at the end; RSS less them grows {net:+.2f} MB/min"
        )

    def chart(self, path: Path) -> None:
        """A PNG: throughput over time, latency percentiles per scenario, RSS, open files and threads."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        figure = Figure(figsize=(11, 7.5), dpi=100)
        FigureCanvasAgg(figure)
        rate, latency, memory, handles = figure.subplots(2, 2).ravel()
        start = self.samples[0].time if self.samples else 0.0
        ends = np.concatenate([np.asarray(v) for v in self.outcomes.ends.values()] or [np.empty(0)])
        if len(ends):
            seconds = np.floor(ends - start)
            bins = np.arange(0, seconds.max() + 2)
            counts, _ = np.histogram(seconds, bins)
            rate.plot(bins[:-1], counts, linewidth=0.8)
        rate.set(title="successful calls per second", xlabel="s")
        names = sorted(self.outcomes.latencies)
        for offset, q in ((-0.25, 50), (0, 95), (0.25, 99)):
            values = [np.percentile(np.array(self.outcomes.latencies[n]) * 1e3, q) for n in names]
            latency.barh(np.arange(len(names)) + offset, values, height=0.25, label=f"p{q}")
        latency.set_yticks(range(len(names)), names, fontsize=7)
        latency.set_xscale("log")
        latency.set(title="latency per scenario (ms)")
        latency.legend(fontsize=7)
        times = [s.time - start for s in self.samples]
        memory.plot(times, [s.rss / 1e6 for s in self.samples], label="RSS")
        cached = [
            (t, s.caches / 1e6) for t, s in zip(times, self.samples, strict=True) if s.caches is not None
        ]
        if cached:
            memory.plot(*zip(*cached, strict=True), label="bounded caches")
            memory.legend(fontsize=7)
        memory.set(title=f"server RSS (MB); after warm-up {self.rss_slope():+.2f} MB/min", xlabel="s")
        handles.plot(times, [s.files for s in self.samples], label="open files")
        handles.plot(times, [s.threads for s in self.samples], label="threads")
        handles.set(title="server open files and threads", xlabel="s")
        handles.legend(fontsize=7)
        figure.suptitle(
            f"loadgen mix '{self.mix}': {self.clients} clients, {self.processes} processes, "
            f"{self.seconds:.0f} s",
            fontsize=10,
        )
        figure.tight_layout()
        figure.savefig(path)


# -- running ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadPlan:
    """How many clients in how many processes run which mix, for how long."""

    clients: int = 4
    processes: int = 2
    seconds: float = 20.0
    count: int = 0
    mix: str = "mixed"
    weights: tuple[tuple[str, float], ...] = ()  # overrides the mix's weights
    seed: int = 1

    def scenario_weights(self) -> tuple[tuple[str, float], ...]:
        """The mix with its overrides, zero weights left out."""
        weights = {**MIXES[self.mix], **dict(self.weights)}
        return tuple((name, weight) for name, weight in weights.items() if weight > 0)

    def specs(self, fixture: Fixture) -> list[WorkerSpec]:
        """The clients spread over the processes."""
        processes = max(1, min(self.processes, self.clients))
        return [
            WorkerSpec(
                fixture,
                tuple(range(p, self.clients, processes)),
                self.scenario_weights(),
                self.seconds,
                self.count,
                self.seed * 1000 + p,
            )
            for p in range(processes)
        ]


def run_load(
    fixture: Fixture, pid: int, plan: LoadPlan, limits: Limits | None = None, metrics_url: str = ""
) -> LoadReport:
    """Run ``plan`` against the server at ``fixture.location`` (process ``pid``; its HTTP port at
    ``metrics_url``, if any) and check the datasets."""
    specs = plan.specs(fixture)
    outcomes = Outcomes()
    context = multiprocessing.get_context("spawn")
    with (
        Sampler(pid, fixture.location, metrics_url) as sampler,
        ProcessPoolExecutor(len(specs), context) as pool,
    ):
        started = time.monotonic()
        for result in pool.map(run_worker, specs):
            outcomes.merge(result)
        seconds = time.monotonic() - started
    alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return LoadReport(
        plan.mix,
        plan.clients,
        len(specs),
        seconds,
        outcomes,
        sampler.samples,
        expected_rows(outcomes.ledgers),
        stored_rows(fixture.location) if alive else {},
        alive,
        limits or Limits(),
    )


def run_with_server(work: Path, plan: LoadPlan, env: dict[str, str], limits: Limits) -> LoadReport:
    """Start a server on ``work/lakehouse``, prepare the datasets, run the plan, stop the server."""
    from scripts.harness import Server

    work.mkdir(parents=True, exist_ok=True)
    with Server(work / "lakehouse", work / "server.log", env) as server:
        fixture = prepare(server.location)
        return run_load(fixture, server.pid, plan, limits, server.http_url)


def parse_weights(text: str) -> tuple[tuple[str, float], ...]:
    """``name=weight,...``"""
    pairs = []
    for item in filter(None, text.split(",")):
        name, _, weight = item.partition("=")
        if name not in SCENARIOS:
            raise argparse.ArgumentTypeError(f"unknown scenario {name!r}; known: {', '.join(SCENARIOS)}")
        pairs.append((name, float(weight)))
    return tuple(pairs)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line arguments."""
    from scripts.harness import add_work_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default %(default)s)")
    parser.add_argument("--processes", type=int, default=0, help="client processes (default: 2 per CPU)")
    parser.add_argument("--seconds", type=float, default=60.0, help="run time (default %(default)s)")
    parser.add_argument("--count", type=int, default=0, help="calls per client instead of a time (0: off)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="mixed", help="scenario mix (default mixed)")
    parser.add_argument("--weights", type=parse_weights, default=(), help="override: name=weight,...")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--warmup", type=float, default=0.2, help="share of the run before growth is measured"
    )
    parser.add_argument("--chart", type=Path, default=None, help="write the PNG chart here")
    add_work_arguments(parser, "e.g. LAKEHOUSE_MAX_CONCURRENT_INGESTS=8")
    args = parser.parse_args(argv)
    if args.clients <= 0 or args.seconds <= 0:
        parser.error("--clients and --seconds must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the markdown report on stdout; exit 1 when a check fails."""
    args = parse_args(argv)
    processes = args.processes or 2 * len(os.sched_getaffinity(0))
    plan = LoadPlan(args.clients, processes, args.seconds, args.count, args.mix, args.weights, args.seed)
    limits = Limits(warmup_share=args.warmup)
    env = dict(args.env)
    if args.root is not None:
        report = run_with_server(args.root, plan, env, limits)
    else:
        with tempfile.TemporaryDirectory(prefix="loadgen-") as work:
            report = run_with_server(Path(work), plan, env, limits)
    print(report.markdown())
    if args.chart is not None:
        report.chart(args.chart)
        print(f"chart: {args.chart}", file=sys.stderr)
    return 1 if report.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
