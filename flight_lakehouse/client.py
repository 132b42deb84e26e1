"""A small typed client for the server's Flight surface, used by the CLI (and handy in scripts)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

DEFAULT_SERVER = "grpc://127.0.0.1:8815"
#: How long a connection attempt may take (TCP, TLS and HTTP/2 handshakes) before a call fails: gRPC's own
#: default is 20 s, a long wait for a wrong address (a port that accepts but never answers).
CONNECT_TIMEOUT_SECONDS = 5.0


class LakehouseClient:
    """Talks to a running flight-lakehouse server over Arrow Flight."""

    def __init__(
        self,
        location: str = DEFAULT_SERVER,
        connect_timeout: float = CONNECT_TIMEOUT_SECONDS,
        **connect_options: Any,
    ) -> None:
        """Connect to ``location`` (``grpc+tls://`` for TLS); ``connect_options`` go to ``flight.connect``
        (the TLS ones: :func:`flight_lakehouse.tls.client_tls_options`). A connection attempt that takes
        longer than ``connect_timeout`` seconds fails the call that made it (UNAVAILABLE)."""
        self.location = location
        # gRPC's minimum reconnect backoff is also the deadline of each connection attempt
        timeout = ("grpc.min_reconnect_backoff_ms", max(1, round(connect_timeout * 1000)))
        generic = [*(connect_options.pop("generic_options", None) or ()), timeout]
        self.flight = flight.connect(location, generic_options=generic, **connect_options)
        self.options = flight.FlightCallOptions()  # of every call: the credentials, once given

    def use_token(self, token: str) -> None:
        """Send ``token`` (an API token or a bearer token) as ``authorization: Bearer`` on every call."""
        self.options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer " + token.encode())])

    def login(self, user: str, password: str) -> None:
        """Trade ``user`` and ``password`` (HTTP Basic) for a bearer token sent on every later call."""
        name, value = self.flight.authenticate_basic_token(user, password, options=self.options)
        if name:  # a server without authentication answers without a token
            self.options = flight.FlightCallOptions(headers=[(name, value)])

    def action(self, name: str, body: dict[str, Any] | None = None) -> Any:
        """Run an action and decode its JSON result."""
        action = flight.Action(name, json.dumps(body or {}).encode())
        results = list(self.flight.do_action(action, self.options))
        return json.loads(results[0].body.to_pybytes()) if results else None

    def ingest(
        self,
        dataset: str,
        schema: pa.Schema,
        batches: Iterable[pa.RecordBatch],
        *,
        expected_rows: int | None = None,
        **options: Any,
    ) -> dict[str, Any]:
        """Stream ``batches`` into ``dataset`` with one DoPut; returns the PutResult metadata.

        ``expected_rows`` (counted here when ``batches`` is a list or tuple) goes into the ingest command:
        the server then commits only when exactly that many rows arrived. When reading or writing a batch
        raises (any exception, KeyboardInterrupt included) the upload is abandoned: its count is made wrong
        and the call ended, so the server commits nothing. pyarrow cannot cancel a DoPut (its writer has no
        cancel, and closing or dropping it, or closing the client, ends the stream as if complete), so
        without ``expected_rows`` an abandoned upload would commit the rows sent so far.
        """
        if expected_rows is None and isinstance(batches, list | tuple):
            expected_rows = sum(batch.num_rows for batch in batches)
        fields = {"expected_rows": expected_rows, **options}
        command = {"ingest": {"dataset": dataset, **{k: v for k, v in fields.items() if v is not None}}}
        descriptor = flight.FlightDescriptor.for_command(json.dumps(command).encode())
        writer, metadata = self.flight.do_put(descriptor, schema, self.options)
        sent, last = 0, None
        try:
            for batch in batches:
                writer.write_batch(batch)
                sent += batch.num_rows
                last = batch if batch.num_rows else last
        except BaseException:
            abandon(writer, schema, sent != expected_rows, last)
            raise
        try:
            writer.done_writing()
            result = metadata.read()
        finally:
            writer.close()
        return json.loads(result.to_pybytes()) if result is not None else {}

    def query(self, sql: str) -> flight.FlightStreamReader:
        """Run SQL; the reader yields the result batch by batch."""
        return self.flight.do_get(flight.Ticket(json.dumps({"sql": sql}).encode()), self.options)

    def search(self, request: dict[str, Any]) -> flight.FlightStreamReader:
        """Run a vector, text or hybrid search (the ``vector_search`` body) as a DoGet ``{"search"}`` ticket;
        the reader yields the nearest rows with ``_distance`` (``_score`` for text and hybrid)."""
        ticket = flight.Ticket(json.dumps({"search": request}).encode())
        return self.flight.do_get(ticket, self.options)

    def query_batches(self, sql: str) -> Iterator[pa.RecordBatch]:
        """The result batches of ``sql``."""
        for chunk in self.query(sql):
            yield chunk.data

    def close(self) -> None:
        """Close the connection."""
        self.flight.close()


def abandon(
    writer: flight.FlightStreamWriter, schema: pa.Schema, count_is_wrong: bool, last: pa.RecordBatch | None
) -> None:
    """End an upload that must commit nothing. Unless its row count is already wrong, one more row goes
    first (the first of ``last``, the last batch sent, else nulls) so that the server refuses the count.
    Errors here are nobody's concern: the call may already be over, and the server refuses it either way."""
    with contextlib.suppress(Exception):
        if not count_is_wrong:
            extra = last.slice(0, 1) if last is not None else None
            if extra is None:
                nulls = [pa.nulls(1, field.type) for field in schema]
                extra = pa.RecordBatch.from_arrays(nulls, schema=schema)
            writer.write_batch(extra)
    with contextlib.suppress(Exception):
        writer.close()  # the server answers the wrong count with INVALID_ARGUMENT
