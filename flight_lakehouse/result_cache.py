"""Results of small queries, kept per snapshot: a dashboard asking the same question again is answered
without running it, as long as nothing it reads has changed.

A result is remembered only when it cannot change while the snapshots it read stay current: the query
reads Iceberg datasets only (their snapshots are the query database's identity; a Lance table is read at
whatever version is current, and a ``vector_search`` depends on an index), and every function it calls is
one DuckDB declares ``CONSISTENT`` (no ``random()``, ``now()``, ``current_date``, ``uuid()``, no
``USING SAMPLE``). Only whole small results are kept (:data:`~flight_lakehouse.query.SMALL_RESULT_BYTES`
at most), within a byte budget, least recently used first out. A new snapshot is a new query database:
results of the old one are never looked up again and age out.
"""

from __future__ import annotations

import datetime
import decimal
import functools
import threading
from collections import OrderedDict
from collections.abc import Hashable, Sequence
from typing import Any

import duckdb
import pyarrow as pa

from flight_lakehouse.sandbox import walk

#: Types of the parameter values a remembered result may be keyed by (their ``repr`` is exact).
KEYED_TYPES = (
    type(None),
    bool,
    int,
    float,
    str,
    bytes,
    decimal.Decimal,
    datetime.date,
    datetime.time,
    datetime.timedelta,
)
#: Words DuckDB binds as functions when they are not columns (SQL's value functions); none is consistent.
VALUE_KEYWORDS = frozenset(
    {
        "current_date",
        "current_time",
        "current_timestamp",
        "localtime",
        "localtimestamp",
        "current_user",
        "session_user",
        "user",
        "current_role",
        "current_catalog",
        "current_schema",
        "current_database",
    }
)
#: The kinds of DuckDB function a query's expressions call (table functions are never kept: see below).
CALLED_KINDS = ("scalar", "aggregate")


@functools.cache
def consistent_functions() -> frozenset[str]:
    """The functions whose every overload DuckDB declares ``CONSISTENT`` (same arguments, same result),
    and macros calling none of the others (computed once)."""
    with duckdb.connect(":memory:") as connection:
        rows = connection.execute(
            "SELECT lower(function_name), function_type, list(DISTINCT stability), "
            "string_agg(coalesce(macro_definition, ''), ' ') FROM duckdb_functions() GROUP BY 1, 2"
        ).fetchall()
    calls = [(name, stability == ["CONSISTENT"]) for name, kind, stability, _ in rows if kind in CALLED_KINDS]
    inconsistent = {name for name, same in calls if not same} | VALUE_KEYWORDS
    consistent = {name for name, same in calls if same}
    macros = {
        name
        for name, kind, _, definition in rows
        if kind == "macro" and not any(word in definition.lower() for word in inconsistent)
    }
    return frozenset((consistent | macros) - inconsistent)


def repeatable(tree: Any) -> bool:
    """Whether a query's parse tree gives the same result every time over the same data."""
    allowed = consistent_functions()
    for node in walk(tree):
        if node.get("class") == "FUNCTION" and str(node.get("function_name", "")).lower() not in allowed:
            return False
        if node.get("type") == "TABLE_FUNCTION" and "class" not in node:
            return False
        if node.get("sample"):
            return False
        names = node.get("column_names") if node.get("class") == "COLUMN_REF" else None
        if names and str(names[-1]).lower() in VALUE_KEYWORDS:
            return False
    return True


def parameters_key(params: Sequence[Any] | None) -> tuple[tuple[str, str], ...] | None:
    """An exact key of bound values (``1``, ``1.0`` and ``-0.0`` differ), None when one is of another type."""
    if not params:
        return ()
    if not all(isinstance(value, KEYED_TYPES) for value in params):
        return None
    return tuple((type(value).__qualname__, repr(value)) for value in params)


#: What a kept result costs besides its Arrow bytes: the table and schema objects, the key, the allocator's
#: rounding (one-row results of two columns kept 5 KB of RSS each, their ``nbytes`` 18 bytes).
ENTRY_BYTES = 4096


def owned(table: pa.Table) -> pa.Table:
    """A copy of ``table`` in Arrow's memory, of its own size: a DuckDB result's buffers point into DuckDB's
    vectors, which ``nbytes`` does not count (a kept one-row result held 25 KB of RSS)."""
    return table.take(pa.array(range(table.num_rows), pa.int64()))


def entry_bytes(table: pa.Table) -> int:
    """What keeping ``table`` (a copy made by :func:`owned`) costs against the budget."""
    return table.nbytes + ENTRY_BYTES


class ResultCache:
    """Whole small results by (query database, SQL text, parameters), within ``limit_bytes``."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.hits = 0
        self._results: OrderedDict[Hashable, pa.Table] = OrderedDict()
        self._guard = threading.Lock()

    def facts(self) -> dict[str, int]:
        """What the cache holds and how often it answered (the ``health`` action shows them)."""
        with self._guard:
            return {"hits": self.hits, "results": len(self._results), "bytes": self.used}

    def get(self, key: Hashable) -> pa.Table | None:
        """The result kept under ``key``, if any."""
        with self._guard:
            table = self._results.get(key)
            if table is not None:
                self._results.move_to_end(key)
                self.hits += 1
            return table

    def put(self, key: Hashable, table: pa.Table) -> None:
        """Keep a copy of ``table`` under ``key``, forgetting the least recently used beyond the budget."""
        if entry_bytes(table) > self.limit:
            return
        table = owned(table)
        with self._guard:
            previous = self._results.pop(key, None)
            if previous is not None:
                self.used -= entry_bytes(previous)
            self._results[key] = table
            self.used += entry_bytes(table)
            while self.used > self.limit:
                _, oldest = self._results.popitem(last=False)
                self.used -= entry_bytes(oldest)
