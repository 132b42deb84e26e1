"""The SQLAlchemy dialect of flight-lakehouse (URL ``lakehouse://HOST:PORT?tls=false``): sqlalchemy-adbc's
Flight SQL dialect, listing the datasets as tables.

sqlalchemy-adbc 0.3 keeps only tables whose ADBC ``table_type`` is lower-case ``table``; Flight SQL servers,
this one included, report ``TABLE`` (the specification's and JDBC's spelling), so its table list came back
empty and tools such as Superset showed no tables. Install with the ``sqlalchemy`` extra.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy_adbc.flightsql import ADBCFlightSQLDialect


class LakehouseDialect(ADBCFlightSQLDialect):
    """sqlalchemy-adbc's Flight SQL dialect with the table list of a Flight SQL server."""

    name = "lakehouse"
    supports_statement_cache = True

    def get_table_names(self, connection: Any, schema: str | None = None, **kw: Any) -> list[str]:
        """Every dataset (table type ``TABLE``) of ``schema`` (all schemas when None)."""
        tree = self._tree(connection, schema=schema, depth="tables")
        return [
            table["table_name"]
            for catalog in tree
            for db_schema in catalog.get("catalog_db_schemas") or []
            if schema is None or db_schema.get("db_schema_name") == schema
            for table in db_schema.get("db_schema_tables") or []
            if str(table.get("table_type", "")).upper() == "TABLE"
        ]
