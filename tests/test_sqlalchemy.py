"""SQLAlchemy over Flight SQL (what Superset and other SQLAlchemy tools use): the project's dialect (URL
``lakehouse://HOST:PORT?tls=false``, sqlalchemy-adbc's Flight SQL dialect over the ADBC driver) reflects
the datasets and runs queries against a real server."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import sqlalchemy as sa

from tests.conftest import ServerProcess, running_server, vector_array

PEOPLE = pa.table(
    {
        "id": pa.array([1, 2, 3], pa.int64()),
        "name": ["ada", "grace", "edsger"],
        "score": pa.array([9.5, 8.25, None], pa.float64()),
        "active": [True, False, True],
    }
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[sa.Engine]:
    """An engine on a module-wide local server with ``people`` (Iceberg) and ``docs`` (Lance)."""
    with running_server(str(tmp_path_factory.mktemp("sqlalchemy") / "lakehouse")) as server:
        server.put("people", PEOPLE)
        vectors = vector_array(np.eye(3, dtype=np.float32))
        server.put("docs", pa.table({"id": pa.array([1, 2, 3], pa.int64()), "vec": vectors}))
        engine = sa.create_engine(url(server), connect_args={"autocommit": True})
        yield engine
        engine.dispose()


def url(server: ServerProcess) -> str:
    """The SQLAlchemy URL of ``server`` (plain gRPC on loopback)."""
    return server.location.replace("grpc://", "lakehouse://") + "?tls=false"


def test_reflects_schemas_and_columns(engine: sa.Engine) -> None:
    """The one schema ``main``, each dataset's columns with SQL types (from the server's type names)."""
    inspector = sa.inspect(engine)
    assert inspector.get_schema_names() == ["main"]
    assert inspector.has_table("people") and inspector.has_table("docs", schema="main")
    assert not inspector.has_table("nope")
    columns = {column["name"]: column["type"] for column in inspector.get_columns("people")}
    assert list(columns) == PEOPLE.column_names
    expected = {"id": sa.BigInteger, "name": sa.String, "score": sa.Float, "active": sa.Boolean}
    assert {name: type(kind) for name, kind in columns.items()} == expected
    assert [column["name"] for column in inspector.get_columns("docs", schema="main")] == ["id", "vec"]


def test_lists_table_names(engine: sa.Engine) -> None:
    """Every dataset, Iceberg or Lance, is a table (sqlalchemy-adbc's own dialect lists none of them)."""
    assert sorted(sa.inspect(engine).get_table_names(schema="main")) == ["docs", "people"]
    assert sorted(sa.inspect(engine).get_table_names()) == ["docs", "people"]


def test_queries_through_the_engine(engine: sa.Engine) -> None:
    """Text SQL with a bound parameter, a Core select over a reflected table, and ``pandas.read_sql``."""
    with engine.connect() as connection:
        found = connection.execute(sa.text("SELECT name FROM people WHERE id = :id"), {"id": 2}).all()
        assert found == [("grace",)]
        people = sa.Table("people", sa.MetaData(), autoload_with=connection)
        query = sa.select(people.c.id, people.c.name).where(people.c.active).order_by(people.c.id)
        assert connection.execute(query).all() == [(1, "ada"), (3, "edsger")]
    frame = pd.read_sql("SELECT * FROM people ORDER BY id", engine)
    pd.testing.assert_frame_equal(frame, PEOPLE.to_pandas())
