"""Kill -9 at the worst moment (issue 18, point 4): SIGKILL the server at a random point of a write,
restart it on the same root, and check that nothing committed is lost and nothing uncommitted shows.

Each round starts one operation in a thread — a Parquet ingest with ``expected_rows`` (small row groups and
files, so the kill lands between Parquet writes or between them and the Iceberg commit), a Lance append, a
Lance upsert, ``delete_rows``, ``create_index`` (the build runs in the background after the call returns)
or ``optimize`` — and kills the server after a random batch of a DoPut's stream (a third of the time
shortly after its end, while the server commits), or a random delay into an action. After
the restart the rows of both datasets must be exactly the state before the operation or the state after it
(the state after when the client got its answer), every dataset reads in full, and a vector search answers.
Each round is classified by what storage shows (committed; files written but nothing committed; nothing
written), which is how we know the kill points were hit. At the end, with the server stopped, a ``gc
--apply --older-than-seconds 0`` is itself killed mid-way, then run to completion: it must remove every file
the uncommitted ingests left (and every unfinished S3 upload), a second gc finds nothing, and the restarted
server still has every committed row.

The suite runs :data:`ROUNDS` rounds per backend (and leaves out the killed gc); ``KILL9_ROUNDS=24`` is the
long form (documented in docs/benchmarks.md), ``KILL9_SEED`` replays a run.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight

from tests.conftest import (
    ServerProcess,
    is_s3,
    pending_uploads,
    search,
    storage_env,
    stored_files,
    vector_array,
)
from tests.test_s3 import SMALL_FILES, gc

ROUNDS = int(os.environ.get("KILL9_ROUNDS", "1"))
SEED = int(os.environ.get("KILL9_SEED", str(random.randrange(1 << 30))))
DIM = 16
INGEST_ROWS = 200_000
LANCE_UPLOAD_ROWS = 3_000
LANCE_ROWS = 2_000
#: Operation -> the longest delay before the kill (seconds) for the actions; a DoPut is killed after a random
#: batch of its stream, or shortly after its end (while the server closes its files and commits).
OPERATIONS = {
    "ingest": 0.0,
    "lance_append": 0.0,
    "lance_upsert": 0.0,
    "delete_rows": 0.5,
    "create_index": 1.5,
    "optimize": 0.8,
}
BATCH_ROWS = 1024
#: After the last batch: how long (at most) the kill waits, while the server finishes the upload.
AFTER_END_SECONDS = 0.3
CALL = flight.FlightCallOptions(timeout=60)

#: The state checked after each restart: rows per round of ``events``, and round per id of ``vecs``.
State = tuple[dict[int, int], dict[int, int]]


def events_rows(round_: int, count: int) -> pa.Table:
    rng = np.random.default_rng(round_)
    return pa.table(
        {
            "id": pa.array(rng.integers(0, 2**62, count)),
            "round": pa.array(np.full(count, round_), pa.int64()),
            "v": pa.array(rng.random(count)),  # incompressible: the files roll over often
        }
    )


def vecs_rows(ids: list[int], round_: int) -> pa.Table:
    rng = np.random.default_rng(round_ + 1000)
    return pa.table(
        {
            "id": pa.array(ids, pa.int64()),
            "round": pa.array([round_] * len(ids), pa.int64()),
            "vec": vector_array(rng.normal(size=(len(ids), DIM))),
        }
    )


@dataclass
class Killer:
    """Where a round kills the server: after batch ``point`` of a DoPut (``point`` = the batch count: after
    the stream's end), or ``delay`` seconds into an action."""

    point: int | None
    delay: float
    fired: threading.Event = field(default_factory=threading.Event)
    killed: threading.Event = field(default_factory=threading.Event)

    def at(self, sent: int) -> None:
        """Called by the client after each batch (and after the end): hold it there until the kill."""
        if sent == self.point:
            self.fired.set()
            self.killed.wait(60)


def put(client: flight.FlightClient, table: pa.Table, killer: Killer, **ingest: object) -> None:
    """A DoPut with an ingest command and ``expected_rows``, in batches of :data:`BATCH_ROWS` rows."""
    command = {"ingest": {**ingest, "expected_rows": table.num_rows}}
    descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
    writer, reader = client.do_put(descriptor, table.schema, options=CALL)
    with writer:
        batches = table.to_batches(max_chunksize=BATCH_ROWS)
        for sent, batch in enumerate(batches):
            killer.at(sent)
            writer.write_batch(batch)
        writer.done_writing()
        killer.fired.set()  # the stream ended: the kill comes while the server finishes it
        reader.read()


def action(client: flight.FlightClient, name: str, body: dict, killer: Killer) -> None:
    killer.fired.set()
    list(client.do_action(flight.Action(name, json.dumps(body).encode()), options=CALL))


@dataclass
class Model:
    """What the datasets hold, and the next free ids and rounds."""

    events: dict[int, int]
    vecs: dict[int, int]
    next_id: int = LANCE_ROWS
    records: list[dict[str, object]] = field(default_factory=list)

    def state(self) -> State:
        return dict(self.events), dict(self.vecs)

    def operation(
        self, name: str, round_: int, rng: random.Random
    ) -> tuple[Callable[[flight.FlightClient, Killer], None], State]:
        """The call of ``name`` in round ``round_``, and the state it leads to."""
        events, vecs = self.state()
        if name == "ingest":
            events[round_] = INGEST_ROWS
            return lambda c, k: put(c, events_rows(round_, INGEST_ROWS), k, dataset="events"), (events, vecs)
        if name == "delete_rows" and vecs:
            victim = rng.choice(sorted(set(vecs.values())))
            where = {"dataset": "vecs", "where": f"round = {victim}"}
            kept = {key: value for key, value in vecs.items() if value != victim}
            return lambda c, k: action(c, "delete_rows", where, k), (events, kept)
        if name in ("lance_append", "lance_upsert", "delete_rows"):  # delete_rows of an empty table: append
            new = list(range(self.next_id, self.next_id + LANCE_UPLOAD_ROWS))
            self.next_id += LANCE_UPLOAD_ROWS
            updated = rng.sample(sorted(vecs), min(200, len(vecs))) if name == "lance_upsert" else []
            vecs.update(dict.fromkeys(new + updated, round_))
            options = {"mode": "upsert", "key": "id"} if updated else {}
            table = vecs_rows(new + updated, round_)
            return lambda c, k: put(c, table, k, dataset="vecs", **options), (events, vecs)
        if name == "create_index":
            body = {"dataset": "vecs", "column": "vec", "kind": "ivf_pq", "num_partitions": 4}
            body |= {"num_sub_vectors": 4, "replace": True}
            return lambda c, k: action(c, "create_index", body, k), (events, vecs)
        return lambda c, k: action(c, "optimize", {"dataset": "vecs", "older_than_seconds": 0}, k), (
            events,
            vecs,
        )


def read_state(server: ServerProcess) -> State:
    """The rows the restarted server shows; every dataset is read in full on the way."""
    for entry in server.action("list_datasets"):  # type: ignore[union-attr]
        server.sql(f"SELECT * FROM {entry['name']}")  # unreadable data fails here
    grouped = server.sql("SELECT round, count(*) AS n FROM events GROUP BY round").to_pylist()
    ids = server.sql("SELECT id, round FROM vecs").to_pylist()
    return {row["round"]: row["n"] for row in grouped}, {row["id"]: row["round"] for row in ids}


def run_killed(
    server: ServerProcess, call: Callable[[flight.FlightClient, Killer], None], killer: Killer
) -> str:
    """Run ``call`` in a thread with a client of its own and SIGKILL the server at ``killer``'s point; the
    call's outcome: 'answered' or the error it got."""
    outcome: list[str] = []
    client = flight.connect(server.location)

    def target() -> None:
        try:
            call(client, killer)
            outcome.append("answered")
        except Exception as exc:  # any error is an outcome of a killed call
            outcome.append(type(exc).__name__)
        killer.fired.set()

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    assert killer.fired.wait(60), "the call never reached its kill point"
    time.sleep(killer.delay)
    server.kill()
    killer.killed.set()
    thread.join(60)
    client.close()
    assert outcome, "the call neither ended nor failed after the kill"
    return outcome[0]


def kill_gc_midway(root: str, delay: float) -> None:
    """Start ``gc --apply --older-than-seconds 0`` and SIGKILL it (by pid) after ``delay`` s."""
    command = [sys.executable, "-m", "flight_lakehouse", "gc", "--root", root, "--apply"]
    process = subprocess.Popen(
        [*command, "--older-than-seconds", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **storage_env(root)},
    )
    try:
        process.wait(delay)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(30)


def test_kill9_at_random_points(storage_root: str) -> None:
    """Rounds of kill -9 mid-write and restart; then gc (itself killed once) removes every orphan."""
    rng = random.Random(SEED + is_s3(storage_root))  # the backends take different turns
    server = ServerProcess(storage_root, env=SMALL_FILES)
    server.start()
    try:
        server.put("events", events_rows(0, 1000))
        server.put("vecs", vecs_rows(list(range(LANCE_ROWS)), 0))
        model = Model(events={0: 1000}, vecs=dict.fromkeys(range(LANCE_ROWS), 0))
        orphans: set[str] = set()
        names, first = list(OPERATIONS), rng.randrange(len(OPERATIONS))
        for round_ in range(1, ROUNDS + 1):
            name = names[(first + round_) % len(names)]  # every operation in turn, from a random one
            call, after = model.operation(name, round_, rng)
            before, files = model.state(), set(stored_files(storage_root))
            if OPERATIONS[name]:
                killer = Killer(None, rng.uniform(0, OPERATIONS[name]))
            else:
                batches = -(-(INGEST_ROWS if name == "ingest" else LANCE_UPLOAD_ROWS) // BATCH_ROWS)
                point = batches if rng.random() < 1 / 3 else rng.randrange(batches)  # a third at the end
                killer = Killer(point, rng.uniform(0, AFTER_END_SECONDS) if point == batches else 0.0)
            started = time.monotonic()
            outcome = run_killed(server, call, killer)
            killed_after = time.monotonic() - started
            new_files = set(stored_files(storage_root)) - files
            server.start()
            state = read_state(server)
            where = f"seed {SEED}, round {round_}: {name} killed at {killer} ({outcome})"
            assert state in (before, after), where
            if outcome == "answered":
                assert state == after, where
            applied = state == after and after != before
            if name == "ingest" and not applied:
                orphans |= {path for path in new_files if path.endswith(".parquet")}
            model.events, model.vecs = state
            found = search(server, {"dataset": "vecs", "vector": [0.5] * DIM, "k": 3, "columns": ["id"]})
            assert set(found.column("id").to_pylist()) <= set(model.vecs), where
            if after == before:  # create_index, optimize: no row changes; what the call got and wrote
                kind = f"{'answered' if outcome == 'answered' else 'cut off'}, {len(new_files)} new files"
            else:
                kind = (
                    "committed" if applied else ("files written, not committed" if new_files else "nothing")
                )
            model.records.append(
                {"op": name, "point": killer.point, "after_s": round(killed_after, 2), "call": outcome}
                | {"storage": kind, "new_files": len(new_files)}
            )
        server.stop()

        if len(OPERATIONS) <= ROUNDS:  # the long form only: the suite saves a CLI start per backend
            kill_gc_midway(storage_root, rng.uniform(0.5, 4.0))
        gc(storage_root, "--apply", "--older-than-seconds", "0")
        assert gc(storage_root, "--dry-run", "--older-than-seconds", "0") == {}
        assert not orphans & set(stored_files(storage_root)), "gc left files of an uncommitted ingest"
        assert pending_uploads(storage_root) == set(), "gc left an unfinished S3 upload"
        server.start()
        assert read_state(server) == model.state()
        summary = Counter(f"{record['op']}: {record['storage']}" for record in model.records)
        print(f"kill -9 seed {SEED}: {dict(summary)}")
        for record in model.records:
            print(f"  {record}")
    finally:
        server.stop()
        server.kill()
