"""The first thing a user does: start, ingest, query, restart."""

from __future__ import annotations

import pyarrow as pa

from tests.conftest import ServerProcess


def test_ingest_query_restart(server: ServerProcess) -> None:
    table = pa.table({"id": list(range(1000)), "city": ["a", "b"] * 500})
    result = server.put("smoke", table)
    assert result["rows_written"] == 1000
    assert server.sql("select count(*) as n, sum(id) as s from smoke").to_pylist() == [
        {"n": 1000, "s": 499500}
    ]
    server.restart()
    assert server.sql("select count(*) as n from smoke").to_pylist() == [{"n": 1000}]
    assert server.action("health")["status"] == "ok"
