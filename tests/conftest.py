"""Shared fixtures: a real server process on a free loopback port, over real storage."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight
import pytest

READY = re.compile(r"ready at (grpc://127\.0\.0\.1:\d+)")
START_TIMEOUT = 60


@dataclass
class ServerProcess:
    """A ``flight-lakehouse serve`` child process and a Flight client connected to it."""

    root: str
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[str] | None = None
    location: str = ""
    log_lines: list[str] = field(default_factory=list)
    _client: flight.FlightClient | None = None

    def start(self) -> ServerProcess:
        """Start the server and wait for its ready line."""
        command = [sys.executable, "-m", "flight_lakehouse", "serve", "--root", self.root, "--port", "0", *self.extra_args]
        self.process = subprocess.Popen(
            command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env={**os.environ, **self.env}
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(ready,), daemon=True).start()
        if not ready.wait(START_TIMEOUT) or not self.location:
            self.kill()
            raise RuntimeError("server did not start:\n" + "\n".join(self.log_lines[-30:]))
        self._client = None
        return self

    def _pump(self, ready: threading.Event) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.log_lines.append(line.rstrip())
            match = READY.search(line)
            if match:
                self.location = match.group(1)
                ready.set()
        ready.set()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def client(self) -> flight.FlightClient:
        """A Flight client for this server (reconnected after a restart)."""
        if self._client is None:
            self._client = flight.connect(self.location)
        return self._client

    def action(self, name: str, body: dict | None = None) -> object:
        """Run an action and decode its JSON result."""
        results = list(self.client.do_action(flight.Action(name, json.dumps(body or {}).encode())))
        return json.loads(results[0].body.to_pybytes())

    def put(self, dataset: str | None, table: pa.Table, batch_rows: int = 50_000, **options: object) -> dict:
        """DoPut ``table`` (a path descriptor when no options are given); returns the PutResult JSON."""
        if options or dataset is None:
            command = {"ingest": {"dataset": dataset, **options}}
            descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        else:
            descriptor = flight.FlightDescriptor.for_path(dataset)
        writer, reader = self.client.do_put(descriptor, table.schema)
        with writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
            writer.done_writing()
            result = reader.read()
        return json.loads(result.to_pybytes())

    def sql(self, query: str) -> pa.Table:
        """Run SQL through DoGet and read the whole (small, in tests) result."""
        return self.client.do_get(flight.Ticket(json.dumps({"sql": query}).encode())).read_all()

    def ticket(self, body: dict) -> pa.Table:
        """DoGet any JSON ticket."""
        return self.client.do_get(flight.Ticket(json.dumps(body).encode())).read_all()

    def stop(self) -> int | None:
        """SIGTERM by pid, wait, and return the exit code."""
        if self._client is not None:
            self._client.close()
            self._client = None
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else None
        os.kill(self.pid, signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL by pid."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
            self.process.wait(30)

    def restart(self) -> ServerProcess:
        """Stop and start again on the same root."""
        self.stop()
        return self.start()


@pytest.fixture(params=["local"])
def storage_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The data root of a test server (parametrised over the storage backends)."""
    return str(tmp_path / "lakehouse")


@pytest.fixture
def server(storage_root: str) -> Iterator[ServerProcess]:
    """A fresh server on a free loopback port, stopped (by pid) after the test."""
    process = ServerProcess(storage_root).start()
    try:
        yield process
    finally:
        process.stop()
        process.kill()


@pytest.fixture
def start_server(storage_root: str) -> Iterator:
    """Factory for servers with extra flags; every one is stopped after the test."""
    started: list[ServerProcess] = []

    def start(*extra_args: str, env: dict[str, str] | None = None, root: str | None = None) -> ServerProcess:
        process = ServerProcess(root or storage_root, list(extra_args), env or {}).start()
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()
        process.kill()


def data_files(root: str) -> set[Path]:
    """Every Parquet data file under a local root."""
    return set(Path(root).rglob("*.parquet"))
